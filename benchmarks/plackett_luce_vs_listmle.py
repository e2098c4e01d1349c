"""Benchmark `rlhf_ext.plackett_luce_loss` against allRank's listMLE: speed and accuracy under offsets.

Both compute the same quantity, the negative log Plackett-Luce likelihood of the true order,

    loss_b = sum_k [ log sum_{j>=k} exp(s_{b,j}) - s_{b,k} ]        (scores s in the true order).

The baseline is allRank's `listMLE` (allegro/allRank, allrank/models/losses/listMLE.py), written
again here from its published formula so that the script needs nothing but torch:

    shuffle the columns (random tie breaking), sort the scores by the true labels (best first),
    set padded items (label -1) to -inf, subtract the row max,
    cumsums = flip(cumsum(flip(exp(s))))                            (the tails sum_{j>=k})
    loss    = mean_b sum_k [ log(cumsums + eps) - s ],  eps = 1e-10, 0 on padding.

Timed: forward + backward of the batch mean, B=256 lists, K in {4, 8, 16}, float32, one torch
thread, the median of many calls per method, the methods interleaved round by round so that load
on a shared machine hits them alike. "listMLE" is the published function (shuffle, sort, gather
included); "listMLE core" is its arithmetic alone on scores already in the true order, the
stricter baseline. "padded" lists have 2..K real items (mask for rlhf_ext, label -1 for listMLE).

Accuracy: float32 scores s + offset for offsets 0, 1e4, 1e8 (rounded to float32 first, so every
method sees the same numbers); the error is the largest |gradient - reference| of the summed
per-list losses over the batch, the reference being the float64 loss of the same float32 numbers. "raw logcumsumexp" is
logcumsumexp(s) - s without the shift by the row max (rlhf_ext's formula before the shift).

    python -m benchmarks.plackett_luce_vs_listmle
    python -m benchmarks.plackett_luce_vs_listmle --ks 4,8 --calls 200 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

import rlhf_ext as rx
from benchmarks.harness import Clock, median_lap

PADDED_LABEL = -1.0  # allRank's PADDED_Y_VALUE
LISTMLE_EPS = 1e-10  # allRank's DEFAULT_EPS


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=256, help="lists per batch (default 256)")
    p.add_argument("--ks", default="4,8,16", help="comma-separated list lengths K (default 4,8,16)")
    p.add_argument("--calls", type=int, default=300, help="timed calls per method and round (default 300)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the table has their median (default 7)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p.parse_args()


def listmle(y_pred: torch.Tensor, y_true: torch.Tensor, eps: float = LISTMLE_EPS) -> torch.Tensor:
    """allRank's listMLE from its published formula: batch mean of the per-list loss."""
    shuffle = torch.randperm(y_pred.shape[-1])
    pred, true = y_pred[:, shuffle], y_true[:, shuffle]
    true_sorted, order = true.sort(descending=True, dim=-1)
    padded = true_sorted == PADDED_LABEL
    in_true_order = torch.gather(pred, dim=1, index=order)
    in_true_order[padded] = float("-inf")
    shifted = in_true_order - in_true_order.max(dim=1, keepdim=True).values
    tails = torch.cumsum(shifted.exp().flip(dims=[1]), dim=1).flip(dims=[1])
    per_place = torch.log(tails + eps) - shifted
    per_place[padded] = 0.0
    return per_place.sum(dim=1).mean()


def listmle_core(scores: torch.Tensor, eps: float = LISTMLE_EPS) -> torch.Tensor:
    """listMLE's arithmetic alone, on full lists already in the true order (no shuffle, sort or padding)."""
    shifted = scores - scores.max(dim=1, keepdim=True).values
    tails = torch.cumsum(shifted.exp().flip(dims=[1]), dim=1).flip(dims=[1])
    return (torch.log(tails + eps) - shifted).sum(dim=1).mean()


def raw_logcumsumexp(scores: torch.Tensor) -> torch.Tensor:
    """logcumsumexp of the raw scores, without the shift by the row max."""
    return (torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1) - scores).sum(dim=1).mean()


def reference_grad(scores32: torch.Tensor) -> torch.Tensor:
    """Gradient of the summed per-list losses in float64, of the same float32 numbers (shifted exactly in float64)."""
    s = scores32.detach().double().requires_grad_(True)
    shifted = s - s.detach().amax(dim=1, keepdim=True)
    loss = (torch.logcumsumexp(shifted.flip(-1), dim=-1).flip(-1) - shifted).sum()
    loss.backward()
    return s.grad


def grad_of(loss_fn, scores: torch.Tensor) -> torch.Tensor:
    s = scores.detach().clone().requires_grad_(True)
    loss_fn(s).backward()
    return s.grad


def time_fwd_bwd(loss_fn, scores: torch.Tensor, calls: int) -> float:
    """Median seconds of one forward + backward over `calls` calls."""
    laps = []
    for _ in range(calls):
        s = scores.detach().requires_grad_(True)
        clock = Clock(cpu=False)
        loss_fn(s).backward()
        laps.append(clock.lap())
    return median_lap(laps).wall_s


def methods_for(K: int, batch: int, padded: bool, g: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Scores in the true order and {name: loss_fn(scores)} for one configuration."""
    scores = torch.randn(batch, K, generator=g)
    labels = torch.arange(K, 0, -1, dtype=torch.float32).expand(batch, K).clone()  # best first
    if not padded:
        return scores, {
            "rlhf_ext": lambda s: rx.plackett_luce_loss(s).mean(),
            "listMLE": lambda s: listmle(s, labels),
            "listMLE core": listmle_core,
        }
    lengths = torch.randint(2, K + 1, (batch,), generator=g)
    mask = torch.arange(K)[None] < lengths[:, None]
    labels = labels.masked_fill(~mask, PADDED_LABEL)
    return scores, {
        "rlhf_ext": lambda s: rx.plackett_luce_loss(s, mask).mean(),
        "listMLE": lambda s: listmle(s, labels),
    }


def speed_table(args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(args.seed)
    print(f"forward+backward, B={args.batch}, float32, {torch.get_num_threads()} thread(s); "
          f"median us per call (median over {args.rounds} rounds of {args.calls} calls)")
    print(f"{'lists':>7} {'K':>3} | {'rlhf_ext':>9} {'listMLE':>9} {'core':>9} | "
          f"{'vs listMLE':>10} {'vs core':>8}")
    for padded in (False, True):
        for K in (int(k) for k in args.ks.split(",")):
            scores, methods = methods_for(K, args.batch, padded, g)
            for fn in methods.values():  # warm-up
                time_fwd_bwd(fn, scores, 20)
            rounds = {name: [] for name in methods}
            for _ in range(args.rounds):
                for name, fn in methods.items():
                    rounds[name].append(time_fwd_bwd(fn, scores, args.calls))
            us = {name: statistics.median(t) * 1e6 for name, t in rounds.items()}
            core = us.get("listMLE core")
            core_cols = f"{core:9.0f}" if core else f"{'-':>9}"
            vs_core = f"{us['rlhf_ext'] / core:7.2f}x" if core else f"{'-':>8}"
            print(f"{'padded' if padded else 'full':>7} {K:>3} | {us['rlhf_ext']:9.0f} {us['listMLE']:9.0f} "
                  f"{core_cols} | {us['rlhf_ext'] / us['listMLE']:9.2f}x {vs_core}")


def accuracy_table(args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(args.seed)
    K = 8
    base = torch.randn(args.batch, K, generator=g)
    labels = torch.arange(K, 0, -1, dtype=torch.float32).expand(args.batch, K).clone()
    methods = {  # summed over the lists: gradients per list, not scaled by 1/B
        "rlhf_ext": lambda s: rx.plackett_luce_loss(s).sum(),
        "listMLE": lambda s: listmle(s, labels) * args.batch,
        "raw logcumsumexp": lambda s: raw_logcumsumexp(s) * args.batch,
    }
    print(f"\nmax |grad - float64 reference|, B={args.batch}, K={K}, float32 scores randn + offset")
    print(f"{'offset':>8} | " + " ".join(f"{name:>16}" for name in methods))
    for offset in (0.0, 1e4, 1e8):
        scores = (base.double() + offset).float()  # the float32 numbers every method sees
        reference = reference_grad(scores)
        errors = [(grad_of(fn, scores).double() - reference).abs().max().item() for fn in methods.values()]
        print(f"{offset:>8.0e} | " + " ".join(f"{e:>16.1e}" for e in errors))
    tie = torch.tensor([[1e8, 1e8]])
    print(f"\ntwo tied items at 1e8 (exact: log 2 = 0.6931): rlhf_ext {rx.plackett_luce_loss(tie).item():.4f}, "
          f"listMLE {listmle(tie, torch.tensor([[2.0, 1.0]])).item():.4f}, "
          f"raw logcumsumexp {raw_logcumsumexp(tie).item():.4f}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # listMLE's shuffles
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load}")
    speed_table(args)
    accuracy_table(args)


if __name__ == "__main__":
    main()
