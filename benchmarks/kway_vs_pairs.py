"""K-way Plackett-Luce DPO on ranked lists vs TRL's DPOTrainer on all K(K-1)/2 pairs per list.

What users do today with K ranked completions is split each list into pairs; this compares that with one
PlackettLuceDPOTrainer pass over the lists. Same small Llama (from config, same seed), same beta, learning
rate (constant), epochs; the reference is the initial model for both. TRL's batches are sized two ways: the
pairs of `--lists_per_batch` lists per step (both trainers take the same number of optimizer steps per epoch),
and as many sequences per step as the K-way batch (TRL takes K-1 times more steps per epoch).

The task is synthetic and learnable: each completion is a random string and a list is ranked by how many
times it contains the target character (more is better, counts distinct, so no ties). The score is pairwise
ranking accuracy of the implicit reward beta * (log pi - log pi_ref) on held-out lists, over all pairs
(and top-1 accuracy), computed by the same function for both trainers.

Each prompt computed once (`PlackettLuceDPOConfig.shared_prompt`, on by default where exact) changes the cost of a
K-way step, not what it learns: `--shared_prompt on off --seeds 0 1 2 --no_trl` trains the K-way policy with it on and
off for each seed and prints the held-out accuracy of each, their spread over the seeds, and the largest difference of
a held-out implicit reward between on and off (rounding, if the shared rows are exact).

    python -m benchmarks.kway_vs_pairs                      # K=4, 3 epochs: prints the table
    python -m benchmarks.kway_vs_pairs --epochs 5 --num_train_lists 256
    python -m benchmarks.kway_vs_pairs --shared_prompt on off --seeds 0 1 2 --no_trl   # ~2 min, 1 core
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PrinterCallback
from trl import DPOConfig, DPOTrainer

from benchmarks.harness import training_timer, write_json
from rlhf_ext.data import (
    DataCollatorForRankedPreference,
    prepare_ranked_dataset,
    split_into_lists,
)
from rlhf_ext.testing import save_tiny_model, tiny_causal_lm, tiny_tokenizer
from rlhf_ext.trainers import PlackettLuceDPOConfig, PlackettLuceDPOTrainer

TARGET = "x"
FILLER = "abcdefgh"


def ranked_lists(num_lists: int, k: int, length: int, seed: int) -> list[dict]:
    """Lists of k random strings, best first = most TARGET characters (distinct counts, so a strict order)."""
    rng = random.Random(seed)
    lists = []
    for i in range(num_lists):
        counts = sorted(rng.sample(range(length // 2 + 1), k), reverse=True)
        completions = []
        for count in counts:
            chars = [TARGET] * count + [rng.choice(FILLER) for _ in range(length - count)]
            rng.shuffle(chars)
            completions.append("".join(chars))
        lists.append({"prompt": f"#{i % 97} many {TARGET}: ", "completions": completions})
    return lists


def all_pairs(lists: list[dict]) -> list[dict]:
    """TRL's pairwise records: every (better, worse) pair of every list, K(K-1)/2 per list."""
    return [
        {"prompt": item["prompt"], "chosen": item["completions"][i], "rejected": item["completions"][j]}
        for item in lists
        for i, j in itertools.combinations(range(len(item["completions"])), 2)
    ]


@torch.no_grad()
def heldout_rewards(policy, reference, lists: list[dict], beta: float) -> list[list[float]]:
    """The implicit reward beta*(log pi - log pi_ref) of each completion of each held-out list (best first)."""
    tokenizer = tiny_tokenizer()
    data = prepare_ranked_dataset(Dataset.from_list(lists), tokenizer, max_length=None, name="held-out")
    collate = DataCollatorForRankedPreference(pad_token_id=tokenizer.pad_token_id)
    rewards = []
    for start in range(0, len(data), 16):
        batch = collate([data[i] for i in range(start, min(start + 16, len(data)))])
        table, mask = split_into_lists(beta * (sequence_logps(policy, batch) - sequence_logps(reference, batch)),
                                       batch["num_completions"])  # fmt: skip
        rewards.extend(row[real].tolist() for row, real in zip(table, mask))
    return rewards


def ranking_accuracy(rewards: list[list[float]]) -> tuple[float, float]:
    """(pairwise, top-1) accuracy of per-list rewards of completions listed best first.

    Pairwise: fraction of pairs (i better than j) whose reward is higher for i, a tie counting 1/2 (so the
    untrained policy, all rewards 0, scores 0.5). Top-1: fraction of lists whose best completion has the
    strictly highest reward.
    """
    correct = total = top1 = 0
    for scores in rewards:
        top1 += all(scores[0] > s for s in scores[1:])
        for i, j in itertools.combinations(range(len(scores)), 2):
            correct += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
            total += 1
    return correct / total, top1 / len(rewards)


def heldout_accuracy(policy, reference, lists: list[dict], beta: float) -> tuple[float, float]:
    """(pairwise, top-1) accuracy of the implicit reward on held-out lists (`ranking_accuracy`)."""
    return ranking_accuracy(heldout_rewards(policy, reference, lists, beta))


def sequence_logps(model, batch) -> torch.Tensor:
    """Summed log-probs of the completion tokens of each sequence [N], from plain logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(dim=1)


def common_args(output_dir: str, args) -> dict:
    return dict(
        output_dir=output_dir, num_train_epochs=args.epochs, learning_rate=args.learning_rate, beta=args.beta,
        max_length=128, report_to="none", bf16=False, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False, disable_tqdm=True, logging_strategy="no", save_strategy="no", seed=args.seed,
        lr_scheduler_type="constant", dataloader_drop_last=False,
    )


def run(name: str, trainer_cls, config_cls, records, per_device_batch, model_path, args, heldout,
        log_losses: bool = False, **settings):
    """Train, then score on the held-out lists; with `log_losses`, the training loss of every step is kept (logged
    each step, not printed)."""
    timer = training_timer(unit="epoch")
    with tempfile.TemporaryDirectory() as output_dir:
        logging = {"logging_strategy": "steps", "logging_steps": 1} if log_losses else {}
        config = config_cls(**{**common_args(output_dir, args), **logging, **settings},
                            per_device_train_batch_size=per_device_batch)
        trainer = trainer_cls(
            model=model_path, args=config, train_dataset=Dataset.from_list(records),
            processing_class=tiny_tokenizer(), callbacks=[timer],
        )
        if log_losses:
            trainer.remove_callback(PrinterCallback)
        trainer.train()
    policy = trainer.model.eval()
    reference = tiny_causal_lm(seed=args.seed, **model_overrides(args)).to(policy.device)
    rewards = heldout_rewards(policy, reference, heldout, args.beta)
    accuracy, top1 = ranking_accuracy(rewards)
    epoch_s = [lap.wall_s for lap in timer.laps]
    switch = getattr(trainer, "_shared_prompt", None)  # the K-way trainers' switch: was each prompt computed once?
    return {"name": name, "seed": args.seed, "epoch_s": epoch_s, "accuracy": accuracy, "top1": top1,
            "steps": trainer.state.global_step, "shared_prompt": None if switch is None else switch.active,
            "rewards": rewards, "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]}


def model_overrides(args) -> dict:
    return {"hidden_size": args.hidden_size, "num_layers": args.num_layers}


SHARED_PROMPT_SETTINGS = {"auto": None, "on": True, "off": False}


def one_seed(args, seed: int) -> list[dict]:
    """Every run of one seed (data, initial weights, training order): the K-way trainer at each `--shared_prompt`
    setting, then (unless --no_trl) TRL on the pairs; prints the seed's table."""
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    train = ranked_lists(args.num_train_lists, args.k, args.completion_length, seed=args.seed)
    heldout = ranked_lists(args.num_eval_lists, args.k, args.completion_length, seed=args.seed + 1)
    pairs = all_pairs(train)
    k, lists_per_batch = args.k, args.lists_per_batch
    # two ways to batch the pairs "with the same settings": the pairs of as many lists per optimizer step (so
    # both trainers take the same number of steps per epoch), or as many sequences per step (more steps)
    same_lists = lists_per_batch * k * (k - 1) // 2
    same_sequences = lists_per_batch * k // 2
    with tempfile.TemporaryDirectory() as model_dir:
        model_path = save_tiny_model(model_dir, seed=args.seed, **model_overrides(args))
        untrained = tiny_causal_lm(seed=args.seed, **model_overrides(args))
        initial, _ = heldout_accuracy(untrained, untrained, heldout, args.beta)
        results = [
            run(f"K-way, {lists_per_batch} lists/step" + ("" if setting == "auto" else f", shared {setting}"),
                PlackettLuceDPOTrainer, PlackettLuceDPOConfig, train, lists_per_batch, model_path, args, heldout,
                log_losses={"on", "off"} <= set(args.shared_prompt), shared_prompt=SHARED_PROMPT_SETTINGS[setting])
            for setting in args.shared_prompt
        ]  # fmt: skip
        if not args.no_trl:
            results += [
                run(f"TRL pairs, {n} pairs/step", DPOTrainer, DPOConfig, pairs, n, model_path, args, heldout)
                for n in (same_lists, same_sequences)
            ]

    print(f"\nseed {args.seed}, K={k}: {len(train)} training lists = {len(pairs)} pairs; held-out {len(heldout)} lists "
          f"({len(heldout) * k * (k - 1) // 2} pairs); {args.epochs} epochs, lr {args.learning_rate}, beta "
          f"{args.beta}; device {'cuda' if torch.cuda.is_available() else 'cpu'}, {args.threads} thread(s)")
    print(f"K-way: {lists_per_batch} lists = {k * lists_per_batch} sequences per step. TRL: {same_lists} pairs "
          f"(the pairs of {lists_per_batch} lists, {2 * same_lists} sequences) or {same_sequences} pairs "
          f"({2 * same_sequences} sequences, as many as K-way) per step")
    print(f"held-out pairwise accuracy before training: {initial:.3f} (ties count 1/2)\n")
    header = (f"{'trainer':<34}{'steps':>6}{'median s/epoch':>16}{'x K-way time':>14}   {'each epoch (s)':<24}"
              f"{'held-out pair acc':>18}{'top-1 acc':>11}")
    print(header)
    print("-" * len(header))
    kway_median = statistics.median(results[0]["epoch_s"])
    for result in results:
        median = statistics.median(result["epoch_s"])
        epochs = ", ".join(f"{s:.1f}" for s in result["epoch_s"])
        print(f"{result['name']:<34}{result['steps']:>6}{median:>16.2f}{median / kway_median:>13.2f}x   "
              f"{epochs:<24}{result['accuracy']:>18.3f}{result['top1']:>11.3f}")
    for result in results:
        result["initial_accuracy"] = initial
    return results


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def print_over_seeds(results: list[dict], settings: list[str]) -> None:
    """Per trainer: each seed's held-out accuracy and the median [min, max]; with shared_prompt on and off, per seed,
    the largest held-out reward difference between them and how their training losses part (the first step where
    they differ by more than 1e-4: one run's rounding, grown by the training steps after it)."""
    names = list(dict.fromkeys(result["name"] for result in results))
    print(f"\nover seeds {', '.join(str(s) for s in dict.fromkeys(r['seed'] for r in results))}: median [min, max]")
    header = (f"{'trainer':<34}{'shared':>7}  {'pair acc per seed':<24}{'pair acc':>22}  {'top-1 per seed':<24}"
              f"{'top-1':>22}{'s/epoch':>9}")
    print(header)
    print("-" * len(header))
    for name in names:
        runs = [result for result in results if result["name"] == name]
        shared = "/".join(sorted({"-" if r["shared_prompt"] is None else "on" if r["shared_prompt"] else "off"
                                  for r in runs}))  # fmt: skip
        accuracy, top1 = [r["accuracy"] for r in runs], [r["top1"] for r in runs]
        epoch_s = statistics.median(s for r in runs for s in r["epoch_s"])
        print(f"{name:<34}{shared:>7}  {' / '.join(f'{a:.3f}' for a in accuracy):<24}{spread(accuracy):>22}  "
              f"{' / '.join(f'{a:.3f}' for a in top1):<24}{spread(top1):>22}{epoch_s:>9.2f}")
    if {"on", "off"} <= set(settings):
        on, off = ([r for r in results if r["name"].endswith(f"shared {setting}")] for setting in ("on", "off"))
        for a, b in zip(on, off):
            difference = max(abs(x - y) for ra, rb in zip(a["rewards"], b["rewards"]) for x, y in zip(ra, rb))
            scale = max(abs(x) for ra in b["rewards"] for x in ra)
            losses = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
            parted = next((step for step, d in enumerate(losses, 1) if d > 1e-4), None)
            print(f"seed {a['seed']}: largest |held-out reward, shared on - off| = {difference:.2e} (largest "
                  f"|reward| {scale:.2f}); pair accuracy on {a['accuracy']:.4f}, off {b['accuracy']:.4f}; training "
                  f"loss |on - off| at step 1 {losses[0]:.1e}, max over steps 1-10 {max(losses[:10]):.1e}, first "
                  f"> 1e-4 at step {parted} of {len(losses)}, at the last {losses[-1]:.1e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=4, help="completions per list")
    parser.add_argument("--num_train_lists", type=int, default=128)
    parser.add_argument("--num_eval_lists", type=int, default=64)
    parser.add_argument("--completion_length", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lists_per_batch", type=int, default=4, help="lists per K-way batch")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run each of these seeds (default: --seed); several print the spread over them")
    parser.add_argument("--shared_prompt", nargs="+", default=["auto"], choices=list(SHARED_PROMPT_SETTINGS),
                        help="K-way runs with PlackettLuceDPOConfig.shared_prompt None (auto: on where exact, the "
                             "default), True (on) or False (off); several train one K-way policy each")
    parser.add_argument("--no_trl", action="store_true", help="K-way runs only (TRL on all pairs is the slow part)")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    seeds = args.seeds or [args.seed]
    results = [result for seed in seeds for result in one_seed(args, seed)]
    if len(seeds) > 1 or len(args.shared_prompt) > 1:
        print_over_seeds(results, args.shared_prompt)
    if not args.no_trl:
        print("\ntargets: K-way >= 2.5x faster per epoch than TRL on all pairs, held-out accuracy not lower")
    if args.output is not None:
        write_json(args.output, {"args": {key: str(value) if isinstance(value, Path) else value
                                          for key, value in vars(args).items()}, "results": results})  # fmt: skip
        print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
