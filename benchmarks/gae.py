"""Benchmark `rlhf_ext.gae` against the per-token Python loop of TRL's former PPOTrainer.

The baseline is the classic loop (vectorised over the batch, one iteration per token):

    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)

TRL ran it on right-padded batches whose rewards and values were already zeroed on padding; then
the deltas on padding are 0, V after the last real token is 0, and the loop computes the same
quantity as `rx.gae(rewards, values, mask)` on the real tokens. Both get the same masked inputs;
errors are measured on real tokens only.

    python -m benchmarks.gae                    # the four default shapes, torch's default threads
    python -m benchmarks.gae --threads 1 --repeats 5 --shapes 64x1024

On a machine whose cores are shared with other busy processes, prefer --threads 1: rx.gae's ops
work on whole [B, T] tensors and go multi-threaded, and each parallel op then waits for a thread
the scheduler has parked (milliseconds per op), while the loop's ops on [B] slices stay on one
thread. The header prints the load average so a reader can tell.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

import rlhf_ext as rx
from benchmarks.harness import Clock

DEFAULT_SHAPES = "16x256,64x1024,256x2048,8x8192"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated BxT list (default {DEFAULT_SHAPES})")
    p.add_argument("--repeats", type=int, default=9, help="timed calls per shape and method, at most (default 9)")
    p.add_argument(
        "--seconds-per-shape", type=float, default=4.0,
        help="time budget per shape: shapes whose loop is slow get fewer repeats (never fewer than 3; default 4)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--gamma", type=float, default=1.0, help="discount (default 1.0)")
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p.parse_args()


def gae_loop(
    rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's former PPOTrainer GAE: a Python loop over tokens, vectorised over the batch."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages, returns


def make_batch(batch: int, length: int, generator: torch.Generator):
    """Right-padded rollout: per-token KL-like rewards plus a score on the last real token, random values.

    Row lengths are random in [1, T] and differ; one row has the full length T.
    """
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    rewards = 0.05 * torch.randn(batch, length, generator=generator)
    rewards[torch.arange(batch), lengths - 1] += torch.randn(batch, generator=generator)
    values = torch.randn(batch, length, generator=generator)
    m = mask.to(torch.float32)
    return rewards * m, values * m, mask  # zeroed on padding, as TRL's rollouts were


def max_rel_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """max |a - b| / max |b| over real tokens."""
    return ((a - b)[mask].abs().max() / b[mask].abs().max().clamp(min=1e-30)).item()


def time_pair(f_loop, f_rx, repeats: int) -> tuple[list[float], list[float]]:
    """Alternate the two methods so that load from other processes hits both alike."""
    t_loop, t_rx = [], []
    for _ in range(repeats):
        for f, out in ((f_loop, t_loop), (f_rx, t_rx)):
            clock = Clock(cpu=False)
            f()
            out.append(clock.lap().wall_s)
    return t_loop, t_rx


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    shapes = [tuple(int(n) for n in s.lower().split("x")) for s in args.shapes.split(",")]

    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()} (cpus: {os.cpu_count()}, "
        f"load avg {os.getloadavg()[0]:.2f}), float32, gamma={args.gamma}, lam={args.lam}"
    )
    print("times are medians over reps; 'min ratio' is loop/rx of the fastest runs (robust to load);")
    print("rel err = max |rx - loop| / max |loop| over real tokens, for advantages A and returns R")
    header = (
        f"{'B x T':>10} {'reps':>4} {'loop ms':>10} {'rx.gae ms':>10} {'loop/rx':>8} "
        f"{'min ratio':>9} {'rel err A':>10} {'rel err R':>10}"
    )
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for batch, length in shapes:
            rewards, values, mask = make_batch(batch, length, generator)

            # the loop variables are bound as defaults: both closures are only called within this iteration
            def run_loop(rewards=rewards, values=values):
                return gae_loop(rewards, values, args.gamma, args.lam)

            def run_rx(rewards=rewards, values=values, mask=mask):
                return rx.gae(rewards, values, mask, gamma=args.gamma, lam=args.lam)

            clock = Clock(cpu=False)
            adv_loop, ret_loop = run_loop()  # warm-up, and the time estimate for the repeat count
            warm = clock.lap().wall_s
            adv_rx, ret_rx = run_rx()
            repeats = max(3, min(args.repeats, int(args.seconds_per_shape / max(warm, 1e-6))))
            t_loop, t_rx = time_pair(run_loop, run_rx, repeats)
            med_loop, med_rx = statistics.median(t_loop), statistics.median(t_rx)
            print(
                f"{f'{batch}x{length}':>10} {repeats:>4} {med_loop * 1e3:>10.2f} {med_rx * 1e3:>10.2f} "
                f"{med_loop / med_rx:>7.1f}x {min(t_loop) / min(t_rx):>8.1f}x "
                f"{max_rel_err(adv_rx, adv_loop, mask):>10.2e} "
                f"{max_rel_err(ret_rx, ret_loop, mask):>10.2e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
