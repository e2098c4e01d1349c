"""Seconds per PPO update and peak memory: TRL's last PPOTrainer (trl 1.12.0) versus rlhf_ext on the shared base.

Both run the same PPO configuration on the same base weights and prompts, each in its own process, so each peak
RSS (ru_maxrss) is its own:

    trl      trl==1.12.0 `trl.experimental.ppo.PPOTrainer` in a separate virtual environment (created here, with
             trl 1.12.0 installed without dependencies over this environment's packages): policy, reference, value
             and reward as four full models, policy and value fully trained, as TRL laid it out
    rlhf_ext `rlhf_ext.PPOTrainer` on a `SharedBase`: one base, policy and value LoRA adapters (r=16), a frozen
             reward adapter + head, reference = adapters disabled
    trunk    the same with `value_layout="policy_trunk"`: no value adapter, the value head reads the policy
             adapter's last hidden state, so one forward and one backward per minibatch serve policy and value

One update = one rollout of `batch_size` prompts (generation, reference log-probs, values, reward) followed by
`num_ppo_epochs` optimizer steps on it. The first update is warm-up and not timed; the table gives the median of the
others. Models are built from config with random weights (no download) in the shapes "char-70m" and "char-135m" of
benchmarks/harness.py: SmolLM2-135M's width with the tiny character-level vocabulary of `rlhf_ext.testing` (101
tokens), so the layer stacks are deeper than SmolLM2's to keep the parameter counts at ~70M and ~135M. From the
repository root:

    python -m benchmarks.ppo_vs_trl                         # both sizes, prints the table
    python -m benchmarks.ppo_vs_trl --sizes char-70m --updates 4
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import (
    DEFAULT_TRL_VENV,
    SHAPES,
    TRL_BASELINE_VERSION,
    add_result_file_argument,
    peak_rss_gib,
    run_child,
    training_timer,
    trl_baseline_python,
    write_json,
)

SIZES = ["char-70m", "char-135m"]  # the default shapes
WORKERS = ("trl", "rlhf_ext", "trunk")
PPO = dict(learning_rate=3e-6, kl_coef=0.05, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95)


# -- the shared setup: base weights, reward adapter, prompts ---------------------------------------


def prepare(size: str, directory: Path, num_prompts: int, prompt_length: int) -> dict:
    """Save the base model, a reward model for each trainer (same backbone) and the prompts under `directory`; the
    base's parameter count in millions."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head
    from rlhf_ext.testing import tiny_llama_config, tiny_tokenizer

    torch.manual_seed(0)
    config = tiny_llama_config(**SHAPES[size], max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(directory / "base")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(directory / "base")
    # TRL's reward model: a sequence-classification model on the base weights
    reward = LlamaForSequenceClassification.from_pretrained(directory / "base", num_labels=1)
    reward.save_pretrained(directory / "trl_reward")
    # rlhf_ext's reward role: an adapter + head folder on the same base
    donor = SharedBase.from_pretrained(str(directory / "base"), SharedBaseArguments(lora_r=16, lora_alpha=32))
    save_adapter_with_head(donor.peft_model, "value", donor.heads["value"], directory / "reward_role", "reward")
    generator = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    prompts = [
        "".join(letters[i] for i in torch.randint(len(letters), (prompt_length,), generator=generator))
        for _ in range(num_prompts)
    ]
    (directory / "prompts.json").write_text(json.dumps(prompts))
    return {"parameters_m": parameter_count(directory)}


# -- workers: one per process ----------------------------------------------------------------------


def seconds_per_update(timer) -> list[float]:
    """Wall seconds of each PPO update a `training_timer` recorded."""
    return [lap.wall_s for lap in timer.laps]


def run_trl(directory: Path, args) -> list[float]:
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(directory / "base", padding_side="left")
    prompts = json.loads((directory / "prompts.json").read_text())
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})
    config = PPOConfig(
        output_dir=str(directory / "trl_out"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=args.num_ppo_epochs,
        total_episodes=args.batch_size * args.updates, response_length=args.response_length,
        temperature=args.temperature, local_rollout_forward_batch_size=args.batch_size, num_sample_generations=0,
        report_to=[], bf16=False, use_cpu=True, save_strategy="no", logging_steps=1000, seed=0, **PPO,
    )  # fmt: skip
    timer = training_timer(every=1)  # TRL's PPOTrainer counts one global step per update
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(directory / "base"),
        ref_model=AutoModelForCausalLM.from_pretrained(directory / "base"),
        reward_model=AutoModelForSequenceClassification.from_pretrained(directory / "trl_reward", num_labels=1),
        value_model=AutoModelForSequenceClassification.from_pretrained(directory / "trl_reward", num_labels=1),
        train_dataset=dataset,
        callbacks=[timer],
    )
    trainer.train()
    return seconds_per_update(timer)


def run_rlhf_ext(directory: Path, args, value_layout: str = "own_adapter") -> list[float]:
    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed

    from rlhf_ext.models import SharedBase, SharedBaseArguments
    from rlhf_ext.trainers.ppo.config import PPOConfig
    from rlhf_ext.trainers.ppo.trainer import PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(directory / "base", padding_side="left")
    prompts = json.loads((directory / "prompts.json").read_text())
    # Seeded as the trainer is (seed=0), but before the shared base draws its LoRA A matrices and value head.
    set_seed(0)
    shared = SharedBase.from_pretrained(
        str(directory / "base"),
        SharedBaseArguments(
            lora_r=16, lora_alpha=32, lora_dropout=0.0, reward_adapter_path=str(directory / "reward_role"),
            value_layout=value_layout,
        ),
    )
    config = PPOConfig(
        output_dir=str(directory / "rlhf_ext_out"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, steps_per_generation=1, num_ppo_epochs=args.num_ppo_epochs,
        max_steps=args.updates * args.num_ppo_epochs, max_completion_length=args.response_length,
        temperature=args.temperature, report_to=[], bf16=False, use_cpu=True, gradient_checkpointing=False,
        save_strategy="no", logging_steps=1000, disable_tqdm=True, seed=0, **PPO,
    )  # fmt: skip
    timer = training_timer(every=args.num_ppo_epochs)  # an update is num_ppo_epochs optimizer steps
    trainer = PPOTrainer(
        shared,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    return seconds_per_update(timer)


def worker(trainer_name: str, directory: Path, args) -> dict:
    """Time `args.updates` PPO updates of one trainer; its seconds per update and peak RSS (MiB)."""
    runs = {"trl": run_trl, "rlhf_ext": run_rlhf_ext, "trunk": lambda d, a: run_rlhf_ext(d, a, "policy_trunk")}
    times = runs[trainer_name](directory, args)
    return {"seconds_per_update": times, "peak_rss_mb": peak_rss_gib() * 1024}


# -- the driver ------------------------------------------------------------------------------------


def run_worker(python: Path, trainer_name: str, directory: Path, args) -> dict:
    """One trainer's worker in its own process (its own peak RSS), with `python`'s packages."""
    worker_args = [
        "--worker", trainer_name, "--directory", str(directory),
        "--batch_size", str(args.batch_size), "--response_length", str(args.response_length),
        "--num_ppo_epochs", str(args.num_ppo_epochs), "--updates", str(args.updates),
        "--temperature", str(args.temperature),
    ]  # fmt: skip
    return run_child("benchmarks.ppo_vs_trl", worker_args, directory / f"{trainer_name}.json", python=python,
                     env={"OMP_NUM_THREADS": str(args.threads)})  # fmt: skip


def parameter_count(directory: Path) -> float:
    """Millions of parameters in the saved base."""
    from safetensors import safe_open

    with safe_open(str(directory / "base" / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=SIZES, choices=list(SHAPES), help="benchmarks/harness.py shapes")
    parser.add_argument("--updates", type=int, default=3, help="PPO updates per run; the first is warm-up")
    parser.add_argument("--batch_size", type=int, default=4, help="prompts per rollout")
    parser.add_argument("--response_length", type=int, default=16)
    parser.add_argument("--prompt_length", type=int, default=24)
    parser.add_argument("--num_ppo_epochs", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.7, help="TRL PPO's default")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each worker")
    parser.add_argument("--venv", type=Path, default=DEFAULT_TRL_VENV)
    parser.add_argument("--prepare", choices=list(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--directory", type=Path, help=argparse.SUPPRESS)
    add_result_file_argument(parser)
    args = parser.parse_args()
    if args.prepare:
        write_json(args.result_file, prepare(args.prepare, args.directory, args.batch_size * args.updates,
                                             args.prompt_length))  # fmt: skip
        return
    if args.worker:
        write_json(args.result_file, worker(args.worker, args.directory, args))
        return
    if args.updates < 2:
        parser.error("--updates must be >= 2: the first update is warm-up")

    trl_python = trl_baseline_python(args.venv)
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            prepare_args = [
                "--prepare", size, "--directory", str(directory), "--updates", str(args.updates), "--batch_size",
                str(args.batch_size), "--prompt_length", str(args.prompt_length),
            ]  # fmt: skip
            params = run_child("benchmarks.ppo_vs_trl", prepare_args, directory / "prepare.json")["parameters_m"]
            results = {name: run_worker(trl_python if name == "trl" else Path(sys.executable), name, directory, args)
                       for name in WORKERS}  # fmt: skip
        seconds = {name: statistics.median(r["seconds_per_update"][1:]) for name, r in results.items()}
        rss = {name: r["peak_rss_mb"] for name, r in results.items()}
        rows.append((size, params, seconds, rss))
        print(f"{size} done: {seconds} {rss}", file=sys.stderr, flush=True)

    print(f"\nPPO update (batch {args.batch_size}, response {args.response_length} tokens,"
          f" {args.num_ppo_epochs} epochs, {args.threads} CPU thread(s)); TRL {TRL_BASELINE_VERSION} four full models"
          f" vs rlhf_ext shared base (LoRA r=16): ours = value adapter, trunk = value head on the policy trunk\n")
    header = (
        f"{'size':>9} {'params':>8} | {'TRL s/upd':>10} {'ours s/upd':>10} {'ratio':>6} {'trunk s/upd':>11} "
        f"{'ratio':>6} | {'TRL RSS MB':>10} {'ours RSS MB':>11} {'ratio':>6} {'trunk RSS MB':>12} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for size, params, seconds, rss in rows:
        print(f"{size:>9} {params:>7.1f}M | {seconds['trl']:>10.2f} {seconds['rlhf_ext']:>10.2f} "
              f"{seconds['rlhf_ext'] / seconds['trl']:>5.2f}x {seconds['trunk']:>11.2f} "
              f"{seconds['trunk'] / seconds['trl']:>5.2f}x | {rss['trl']:>10.0f} {rss['rlhf_ext']:>11.0f} "
              f"{rss['rlhf_ext'] / rss['trl']:>5.2f}x {rss['trunk']:>12.0f} "
              f"{rss['trunk'] / rss['trl']:>5.2f}x")  # fmt: skip
    print("\ntrunk / ours: " + ", ".join(f"{size} time {s['trunk'] / s['rlhf_ext']:.2f}x memory "
                                        f"{r['trunk'] / r['rlhf_ext']:.2f}x" for size, _, s, r in rows))
    print("\ntargets: time ratio <= 1.0x, memory ratio <= 0.5x")


if __name__ == "__main__":
    main()
