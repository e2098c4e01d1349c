"""Each prompt computed once: one K-way DPO training step today (K rows per list) vs shared prompts (one row per list)
vs shared and packed (the lists grouped into rows as the trainers do, `rows_by_cost`), side by side in one run, and
beside them what TRL's DPOTrainer does for the same lists split into all their pairs.

Variants (`--variants`; the first is the base of the "x" columns):

    today           PlackettLuceDPOTrainer, K rows per list (shared_prompt=False)
    shared          one row per list, each prompt computed once (shared_prompt=True)
    shared+packed   shared rows, the lists grouped into rows as the trainers choose (pack="auto")
    trl-all-pairs   trl.DPOTrainer as shipped (sigmoid loss, beta 0.1, separate reference, TRL's fused LM head) on
                    every (better, worse) pair of each list, best first: K(K-1)/2 pairs per fully ranked list
                    (pairs (i, j), i < j, i < num_ranked), 2 rows each, batched by TRL's own collator
                    (`trainer.data_collator`) on the pre-tokenized pairs. One epoch over those pairs is one step of
                    gradient accumulation: micro-batches of `--pairs_per_microbatch` consecutive pairs (default 4,
                    8 rows; all K(K-1) rows at once do not fit in memory, and at K = 8, UltraFeedback-like, 4 pairs
                    grew the process to 16 GB: use 2 there), each forward + backward in turn, gradients zeroed once;
                    its time is the sum of the micro-batches' times, its peak RSS the step's (the largest over the
                    micro-batches). The pairs stay in list order, so a micro-batch holds the pairs of one or two
                    prompts: less padding than TRL's shuffled sampler would give it; the fewer pairs per micro-batch,
                    the less padding. Not in the default set: its step is 1.6-2.8x today's time at K = 4 and 4.5x at
                    K = 8 (minutes on one core).

A step is what `PlackettLuceDPOTrainer` (or DPOTrainer) runs for a batch: the policy forward with TRL's fused LM head,
its backward, and the reference model's forward (a separate reference, full fine-tuning), through
`trainer.compute_loss` and `loss.backward()` (no optimizer step: the same for every variant). Both trainers get the
same weights (seed 0). Model: a Llama-shaped decoder from config, hidden 768, 12 layers, 12 heads, intermediate 2048,
vocabulary 32000, tied embeddings (109.5M parameters), float32, sdpa attention, one CPU thread
(`torch.set_num_threads(1)`), random weights and token ids: the cost of a step does not depend on them.

Lengths (tokens) are drawn per list from log-normal distributions shaped like three public preference sets. They
are approximations from their published statistics and typical Llama-tokenizer counts, not measured here (nothing is
downloaded); the prompt and each completion are drawn independently, clipped to [min, max]:

    dataset          prompt mean (sigma, clip)     completion mean (sigma, clip)
    UltraFeedback    160 (0.9, 8..1024)            300 (0.7, 4..1024)     long-tailed prompts and answers
    HH-RLHF          180 (0.8, 8..1024)             90 (0.8, 2..512)      dialogue history, short replies
    TL;DR            400 (0.35, 64..1024)           40 (0.35, 8..128)     a Reddit post, a short summary

Reported per (dataset, K, variant): `seqs`, the completion sequences the step scores (K per list; 2 per pair for
trl-all-pairs: K(K-1) per list); positions the model computes (the padded batch, rows x width, summed over
micro-batches); real tokens (the unshared count is TRL's `num_tokens`; the shared one counts each prompt once plus
its last token once more per extra completion; trl-all-pairs counts prompt + chosen and prompt + rejected of every
pair); the median over `--repeats` steps of the wall time and of this process's CPU time (steadier when other jobs
share the CPU; benchmarks/harness.py's clock); `x wall`, `x cpu`, the speed-up over the first variant (today);
`x trl`, with trl-all-pairs measured, its CPU time over the variant's (the speed-up over TRL on all pairs); the bytes
autograd saves for the backward (activations, parameters excluded, each storage once; the largest micro-batch's) and
the peak resident set above the one at the step's start (Linux: /proc/self/clear_refs; approximate, as the allocator
keeps some freed memory). Under the table, each trl-all-pairs row's micro-batch count and their CPU times (min-max).

    python -m benchmarks.shared_prompt                 # K=4, the three datasets, 2 lists per step (~10 min, 1 core)
    python -m benchmarks.shared_prompt --ks 2 4 8 --repeats 3   # the whole grid, medians of 3 (about 9x longer)
    python -m benchmarks.shared_prompt --quick         # 2 layers, half lengths, 1 dataset: about a minute
    python -m benchmarks.shared_prompt --quick --variants shared+packed trl-all-pairs   # about a minute
    python -m benchmarks.shared_prompt --ks 4 --datasets UltraFeedback HH-RLHF \\
        --variants today shared shared+packed trl-all-pairs      # ~13 min CPU, 12 pairs in 3 micro-batches
    python -m benchmarks.shared_prompt --ks 8 --datasets UltraFeedback --lists_per_step 1 --pairs_per_microbatch 2 \\
        --variants today shared shared+packed trl-all-pairs      # ~14 min CPU, 28 pairs in 14 micro-batches

The default times one step per variant after an untimed warm-up (a step is 10 s to a minute on one core; `--repeats`
gives the median of several). One batch of `--lists_per_step` lists per (dataset, K), drawn with a fixed seed: the
ratios move with the draw (how long the longest completion is), `--seed` draws another.

Activation checkpointing is off (`--checkpointing` turns it on, TRL's default): it adds the same recomputation to
every variant. A JSON copy of the table goes to benchmarks/results/shared_prompt[-quick].json.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import platform
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer

from benchmarks.harness import RESULTS_DIR, Clock, Lap, median_lap, proc_status_gib, write_json
from rlhf_ext.testing import tiny_tokenizer
from rlhf_ext.trainers import PlackettLuceDPOConfig, PlackettLuceDPOTrainer
from rlhf_ext.trainers.kway.common import SharedPromptSwitch


@dataclass(frozen=True)
class LengthModel:
    """Log-normal token counts with the given mean: exp(N(ln(mean) - sigma^2 / 2, sigma^2)), clipped."""

    mean: float
    sigma: float
    low: int
    high: int

    def draw(self, rng: random.Random, scale: float = 1.0) -> int:
        value = rng.lognormvariate(math.log(self.mean * scale) - self.sigma**2 / 2, self.sigma)
        return int(min(max(round(value), max(1, round(self.low * scale))), round(self.high * scale)))


DATASETS = {
    "UltraFeedback": (LengthModel(160, 0.9, 8, 1024), LengthModel(300, 0.7, 4, 1024)),
    "HH-RLHF": (LengthModel(180, 0.8, 8, 1024), LengthModel(90, 0.8, 2, 512)),
    "TL;DR": (LengthModel(400, 0.35, 64, 1024), LengthModel(40, 0.35, 8, 128)),
}
MODEL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
             intermediate_size=2048, vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=4096)
QUICK_MODEL = {**MODEL, "num_hidden_layers": 2}
# K-way variants: (shared, pack) of SharedPromptSwitch; "trl-all-pairs" is TRL's DPOTrainer on every pair of the lists
KWAY_VARIANTS = {"today": (False, False), "shared": (True, False), "shared+packed": (True, "auto")}
TRL_PAIRS = "trl-all-pairs"
VARIANTS = [*KWAY_VARIANTS, TRL_PAIRS]


def ranked_lists(dataset: str, k: int, num_lists: int, seed: int, scale: float, vocab: int) -> list[dict]:
    """`num_lists` pre-tokenized lists of K completions with random ids, lengths drawn from DATASETS[dataset]."""
    prompt_lengths, completion_lengths = DATASETS[dataset]
    rng = random.Random(f"{dataset}-{k}-{seed}")
    lists = []
    for _ in range(num_lists):
        prompt = [rng.randrange(3, vocab) for _ in range(prompt_lengths.draw(rng, scale))]
        completions = [[rng.randrange(3, vocab) for _ in range(completion_lengths.draw(rng, scale))]
                       for _ in range(k)]  # fmt: skip
        lists.append({"prompt_ids": prompt, "completion_ids": completions, "num_ranked": k - 1})
    return lists


def all_pairs(lists: list[dict]) -> list[dict]:
    """TRL's pre-tokenized pairwise records of ranked lists (best first): (y_i chosen, y_j rejected) for every i < j
    whose order is known, i.e. i < num_ranked; K(K-1)/2 pairs per fully ranked list (num_ranked = K - 1)."""
    return [{"prompt_ids": item["prompt_ids"], "chosen_ids": completions[i], "rejected_ids": completions[j]}
            for item in lists for completions in [item["completion_ids"]]
            for i in range(item["num_ranked"]) for j in range(i + 1, len(completions))]  # fmt: skip


def build_models(model_settings: dict) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(policy, reference), the same weights on every call (seed 0)."""
    torch.manual_seed(0)
    config = LlamaConfig(**model_settings, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config), LlamaForCausalLM(config)


def build_trainer(model_settings: dict, checkpointing: bool, output_dir: str) -> PlackettLuceDPOTrainer:
    policy, reference = build_models(model_settings)
    args = PlackettLuceDPOConfig(output_dir, use_cpu=True, bf16=False, report_to=[], disable_tqdm=True, max_length=None,
                                 gradient_checkpointing=checkpointing, per_device_train_batch_size=1)
    placeholder = Dataset.from_list([{"prompt_ids": [5, 6], "completion_ids": [[7], [8]]}])
    trainer = PlackettLuceDPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=placeholder,
                                     processing_class=tiny_tokenizer())
    return ready_to_train(trainer, checkpointing)


def build_trl_trainer(model_settings: dict, checkpointing: bool, output_dir: str, pairs_per_microbatch: int):
    """TRL's DPOTrainer as shipped (sigmoid loss, beta 0.1, separate reference, its fused LM head) on models with the
    K-way trainer's weights; its batches come from its own collator, `trainer.data_collator`, on pre-tokenized pairs."""
    policy, reference = build_models(model_settings)
    args = DPOConfig(output_dir, use_cpu=True, bf16=False, report_to=[], disable_tqdm=True, max_length=None,
                     gradient_checkpointing=checkpointing, per_device_train_batch_size=pairs_per_microbatch)
    placeholder = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=placeholder,
                         processing_class=tiny_tokenizer())
    assert trainer.loss_types == ["sigmoid"] and trainer.ref_model is reference
    return ready_to_train(trainer, checkpointing)


def ready_to_train(trainer, checkpointing: bool):
    if checkpointing:  # as Trainer.train turns it on
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer.model.train()
    return trainer


@contextlib.contextmanager
def saved_for_backward(parameters):
    """Count the bytes autograd saves for the backward in the block (each storage once, parameters excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in parameters}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    total = [0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total
    total[0] = sum(seen.values())


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS, after handing the allocator's free memory back to the
    system (glibc's malloc_trim, so that an earlier, larger step's freed pages do not hide this one's rise); False
    where Linux's clear_refs is not writable."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def one_step(trainer, batch) -> dict:
    """One training step's forward + backward, with what it saved for the backward and its peak RSS rise."""
    trainer.model.zero_grad(set_to_none=True)
    can_reset = reset_peak_rss()
    start = proc_status_gib("VmRSS")
    clock = Clock()
    with saved_for_backward(list(trainer.model.parameters())) as saved:
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    lap = clock.lap()
    peak = proc_status_gib("VmHWM") if can_reset else None
    rise = None if peak is None or start is None else max(peak - start, 0.0) * 1024
    return {"wall_s": lap.wall_s, "cpu_s": lap.cpu_s, "saved_mib": saved[0] / 2**20, "peak_rss_rise_mib": rise}


def accumulated_step(trainer, batches) -> dict:
    """One training step as gradient accumulation runs it: forward + backward of each micro-batch in turn, the
    gradients summed (zeroed once, before the first). Its time is the sum of the micro-batches' times, its saved bytes
    the largest micro-batch's, its peak RSS rise the step's (VmHWM reset once, at the start: the largest over the
    micro-batches, with the gradients the earlier ones left)."""
    trainer.model.zero_grad(set_to_none=True)
    can_reset = reset_peak_rss()
    start = proc_status_gib("VmRSS")
    parameters = list(trainer.model.parameters())
    wall = cpu = saved_max = 0.0
    microbatch_cpu = []
    for batch in batches:
        clock = Clock()
        with saved_for_backward(parameters) as saved:
            loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()  # Trainer.training_step divides by the accumulation steps first: the same cost
        lap = clock.lap()
        wall, cpu, saved_max = wall + lap.wall_s, cpu + lap.cpu_s, max(saved_max, saved[0])
        microbatch_cpu.append(lap.cpu_s)
    peak = proc_status_gib("VmHWM") if can_reset else None
    rise = None if peak is None or start is None else max(peak - start, 0.0) * 1024
    return {"wall_s": wall, "cpu_s": cpu, "saved_mib": saved_max / 2**20, "peak_rss_rise_mib": rise,
            "microbatch_cpu_s": microbatch_cpu}


def pair_microbatches(trainer, lists: list[dict], pairs_per_microbatch: int) -> tuple[list[dict], list[dict]]:
    """(all pairs of `lists`, TRL's collated micro-batches of `pairs_per_microbatch` consecutive pairs). The pairs stay
    in list order, so a micro-batch holds pairs of one or two prompts: less padding than TRL's shuffled sampler."""
    pairs = all_pairs(lists)
    return pairs, [trainer.data_collator(pairs[start:start + pairs_per_microbatch])
                   for start in range(0, len(pairs), pairs_per_microbatch)]  # fmt: skip


def measure_trl_pairs(trainer, lists: list[dict], pairs_per_microbatch: int, repeats: int) -> dict:
    pairs, batches = pair_microbatches(trainer, lists, pairs_per_microbatch)
    steps = [accumulated_step(trainer, batches) for _ in range(repeats)]
    trainer.model.zero_grad(set_to_none=True)  # the gradients' memory back before the next variant
    lap = median_lap(Lap(s["wall_s"], s["cpu_s"]) for s in steps)
    return {"variant": TRL_PAIRS, "positions": sum(b["input_ids"].numel() for b in batches),
            "tokens": sum(int(b["attention_mask"].sum()) for b in batches), "wall_s": lap.wall_s, "cpu_s": lap.cpu_s,
            "saved_mib": max(s["saved_mib"] for s in steps),
            "peak_rss_rise_mib": max((s["peak_rss_rise_mib"] for s in steps if s["peak_rss_rise_mib"] is not None),
                                     default=None),
            "pairs": len(pairs), "microbatches": len(batches), "sequences": 2 * len(pairs),
            "microbatch_cpu_s": [s["microbatch_cpu_s"] for s in steps]}  # fmt: skip


def measure(trainer, batch, variant: str, repeats: int) -> dict:
    shared, pack = KWAY_VARIANTS[variant]
    trainer._shared_prompt = SharedPromptSwitch(shared, scores=False, pack=pack)
    layout = trainer._shared_prompt.batch(batch, trainer)
    if layout is None:
        positions, tokens = batch["input_ids"].numel(), int(batch["attention_mask"].sum())
    else:
        positions, tokens = layout.input_ids.numel(), layout.layout.num_tokens
    steps = [one_step(trainer, batch) for _ in range(repeats)]
    trainer.model.zero_grad(set_to_none=True)  # the gradients' memory back before the next variant
    lap = median_lap(Lap(s["wall_s"], s["cpu_s"]) for s in steps)
    return {"variant": variant, "positions": positions, "tokens": tokens, "wall_s": lap.wall_s, "cpu_s": lap.cpu_s,
            "sequences": int(batch["num_completions"].sum()), "saved_mib": max(s["saved_mib"] for s in steps),
            "peak_rss_rise_mib": max((s["peak_rss_rise_mib"] for s in steps if s["peak_rss_rise_mib"] is not None),
                                     default=None)}  # fmt: skip


def print_table(rows: list[dict]) -> None:
    with_trl = any("speedup_vs_trl_cpu" in row for row in rows)
    trl_column = f"{'x trl':>7}" if with_trl else ""
    header = (f"{'dataset':<14}{'K':>3} {'variant':<14}{'seqs':>5}{'positions':>10}{'tokens':>8}{'wall s':>9}"
              f"{'cpu s':>9}{'x wall':>8}{'x cpu':>7}{trl_column}{'saved MiB':>11}{'peak+ MiB':>11}")
    print(header)
    print("-" * len(header))
    for row in rows:
        rise = "" if row["peak_rss_rise_mib"] is None else f"{row['peak_rss_rise_mib']:.0f}"
        trl = f"{row['speedup_vs_trl_cpu']:>6.2f}x" if "speedup_vs_trl_cpu" in row else " " * 7
        print(f"{row['dataset']:<14}{row['k']:>3} {row['variant']:<14}{row['sequences']:>5}{row['positions']:>10}"
              f"{row['tokens']:>8}{row['wall_s']:>9.2f}{row['cpu_s']:>9.2f}{row['speedup_wall']:>7.2f}x"
              f"{row['speedup_cpu']:>6.2f}x{trl if with_trl else ''}{row['saved_mib']:>11.0f}{rise:>11}")
    for row in rows:
        if row["variant"] == TRL_PAIRS:
            spread = [f"{min(cpu):.1f}-{max(cpu):.1f}" for cpu in row["microbatch_cpu_s"]]
            print(f"  {row['dataset']} K={row['k']} {TRL_PAIRS}: {row['pairs']} pairs in {row['microbatches']} "
                  f"micro-batches of <= {row['pairs_per_microbatch']} pairs, each {', '.join(spread)} cpu s")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers, half lengths, UltraFeedback-like, K=4")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="list sizes K (default 4)")
    parser.add_argument("--datasets", nargs="+", default=None, choices=list(DATASETS))
    parser.add_argument("--lists_per_step", type=int, default=2, help="lists per training step (B)")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per variant (their median is reported)")
    parser.add_argument("--seed", type=int, default=0, help="which lists are drawn")
    parser.add_argument("--variants", nargs="+", default=list(KWAY_VARIANTS), choices=VARIANTS,
                        help=f"default: the K-way ones; {TRL_PAIRS} (TRL's DPOTrainer on all K(K-1)/2 pairs of each "
                             "list, as gradient accumulation over micro-batches) is the long one")
    parser.add_argument("--pairs_per_microbatch", type=int, default=4,
                        help=f"{TRL_PAIRS}: pairs per micro-batch (2 rows each); the step's time is their sum")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on (TRL's default)")
    parser.add_argument("--output", type=Path, default=None, help="JSON results (default benchmarks/results/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    model_settings, scale = (QUICK_MODEL, 0.5) if args.quick else (MODEL, 1.0)
    ks = args.ks or [4]
    datasets = args.datasets or (["UltraFeedback"] if args.quick else list(DATASETS))
    repeats = args.repeats
    kway_variants = [variant for variant in args.variants if variant in KWAY_VARIANTS]
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(model_settings, args.checkpointing, output_dir)
        trl_trainer = None
        if TRL_PAIRS in args.variants:
            trl_trainer = build_trl_trainer(model_settings, args.checkpointing, output_dir, args.pairs_per_microbatch)
        parameters = sum(p.numel() for p in trainer.model.parameters())
        print(f"Llama {model_settings['num_hidden_layers']} layers x {model_settings['hidden_size']}, "
              f"vocab {model_settings['vocab_size']}: {parameters / 1e6:.1f}M parameters; {args.lists_per_step} lists "
              f"per step, median of {repeats} timed step(s) per variant, 1 thread, activation checkpointing "
              f"{'on' if args.checkpointing else 'off'}")
        warmup_lists = ranked_lists("HH-RLHF", 2, 1, seed=99, scale=0.1, vocab=model_settings["vocab_size"])
        warmup = trainer.data_collator(warmup_lists)
        for variant in kway_variants:  # first calls of each kernel and allocator pools, untimed
            measure(trainer, warmup, variant, 1)
        if trl_trainer is not None:
            measure_trl_pairs(trl_trainer, warmup_lists, args.pairs_per_microbatch, 1)
        rows = []
        for dataset in datasets:
            for k in ks:
                lists = ranked_lists(dataset, k, args.lists_per_step, seed=args.seed, scale=scale,
                                     vocab=model_settings["vocab_size"])
                batch = trainer.data_collator(lists)
                results = []
                for variant in args.variants:
                    if variant == TRL_PAIRS:
                        result = measure_trl_pairs(trl_trainer, lists, args.pairs_per_microbatch, repeats)
                        results.append({**result, "pairs_per_microbatch": args.pairs_per_microbatch})
                    else:
                        results.append(measure(trainer, batch, variant, repeats))
                base = results[0]
                trl = next((result for result in results if result["variant"] == TRL_PAIRS), None)
                for result in results:
                    row = {"dataset": dataset, "k": k, "lists": args.lists_per_step, **result,
                           "speedup_wall": base["wall_s"] / result["wall_s"],
                           "speedup_cpu": base["cpu_s"] / result["cpu_s"]}
                    if trl is not None:
                        row["speedup_vs_trl_wall"] = trl["wall_s"] / result["wall_s"]
                        row["speedup_vs_trl_cpu"] = trl["cpu_s"] / result["cpu_s"]
                    rows.append(row)
                print_table(rows[-len(results):])
    print()
    print_table(rows)
    output = args.output or RESULTS_DIR / f"shared_prompt{'-quick' if args.quick else ''}.json"
    write_json(output, {"model": model_settings, "parameters": parameters, "lists_per_step": args.lists_per_step,
                        "pairs_per_microbatch": args.pairs_per_microbatch, "repeats": repeats,
                        "seed": args.seed, "checkpointing": args.checkpointing,
                        "length_scale": scale, "machine": platform.processor() or platform.machine(), "rows": rows})
    print(f"\nwrote {output}")
    return rows


if __name__ == "__main__":
    main()
