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
others. Models are built from config with random weights (no download) in SmolLM2-135M's shape and a smaller one
of the same family, with the tiny character-level vocabulary of `rlhf_ext.testing` (101 tokens), so the layer
stacks are deeper than SmolLM2's to keep the parameter counts at ~70M and ~135M.

    python benchmarks/ppo_vs_trl.py                         # both sizes, prints the table
    python benchmarks/ppo_vs_trl.py --sizes 70m --updates 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRL_VERSION = "1.12.0"
SIZES = {
    # hidden/heads/MLP of SmolLM2-135M; depth chosen for the parameter count with a 101-token vocabulary
    "70m": dict(hidden_size=576, num_hidden_layers=20, num_attention_heads=9, num_key_value_heads=3,
                intermediate_size=1536),
    "135m": dict(hidden_size=576, num_hidden_layers=38, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536),
}  # fmt: skip
WORKERS = ("trl", "rlhf_ext", "trunk")
PPO = dict(learning_rate=3e-6, kl_coef=0.05, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95)


# -- the shared setup: base weights, reward adapter, prompts ---------------------------------------


def prepare(size: str, directory: Path, num_prompts: int, prompt_length: int) -> None:
    """Save the base model, a reward model for each trainer (same backbone) and the prompts under `directory`."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head
    from rlhf_ext.testing import tiny_llama_config, tiny_tokenizer

    torch.manual_seed(0)
    config = tiny_llama_config(**SIZES[size], max_position_embeddings=512)
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


# -- workers: one per process ----------------------------------------------------------------------


class UpdateTimer:
    """Wall-clock time of each PPO update: the time between optimizer-step ends `steps_per_update` apart."""

    def __init__(self, steps_per_update: int):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                timer.marks = [time.perf_counter()]

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step % steps_per_update == 0:
                    timer.marks.append(time.perf_counter())

        self.callback = Callback()
        self.marks: list[float] = []

    def seconds_per_update(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


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
    timer = UpdateTimer(steps_per_update=1)  # TRL's PPOTrainer counts one global step per update
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(directory / "base"),
        ref_model=AutoModelForCausalLM.from_pretrained(directory / "base"),
        reward_model=AutoModelForSequenceClassification.from_pretrained(directory / "trl_reward", num_labels=1),
        value_model=AutoModelForSequenceClassification.from_pretrained(directory / "trl_reward", num_labels=1),
        train_dataset=dataset,
        callbacks=[timer.callback],
    )
    trainer.train()
    return timer.seconds_per_update()


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
    timer = UpdateTimer(steps_per_update=args.num_ppo_epochs)
    trainer = PPOTrainer(
        shared,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        callbacks=[timer.callback],
    )
    trainer.train()
    return timer.seconds_per_update()


def worker(trainer_name: str, directory: Path, args) -> None:
    runs = {"trl": run_trl, "rlhf_ext": run_rlhf_ext, "trunk": lambda d, a: run_rlhf_ext(d, a, "policy_trunk")}
    times = runs[trainer_name](directory, args)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"seconds_per_update": times, "peak_rss_mb": peak_rss_mb}), flush=True)


# -- the driver ------------------------------------------------------------------------------------


def ensure_trl_venv(venv: Path) -> Path:
    """A virtual environment with trl==1.12.0 over this environment's packages; returns its python."""
    python = venv / "bin" / "python"
    if python.exists() and _trl_version(python) == TRL_VERSION:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The venv sees this environment's site-packages (torch, transformers, ...) through a .pth file; its own
    # site-packages come first on sys.path, so its trl 1.12.0 shadows the newer one.
    site_packages = [p for p in sys.path if p.endswith("site-packages")]
    venv_site = Path(subprocess.check_output([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                             text=True).strip())  # fmt: skip
    (venv_site / "parent_env.pth").write_text("\n".join(site_packages) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", f"trl=={TRL_VERSION}"], check=True)
    if _trl_version(python) != TRL_VERSION:
        raise RuntimeError(f"{venv} does not import trl {TRL_VERSION}")
    return python


def _trl_version(python: Path) -> str | None:
    result = subprocess.run([str(python), "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def run_worker(python: Path, trainer_name: str, directory: Path, args) -> dict:
    command = [
        str(python), __file__, "--worker", trainer_name, "--directory", str(directory),
        "--batch_size", str(args.batch_size), "--response_length", str(args.response_length),
        "--num_ppo_epochs", str(args.num_ppo_epochs), "--updates", str(args.updates),
        "--temperature", str(args.temperature),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{trainer_name} worker failed:\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def parameter_count(directory: Path) -> float:
    """Millions of parameters in the saved base."""
    from safetensors import safe_open

    with safe_open(str(directory / "base" / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--updates", type=int, default=3, help="PPO updates per run; the first is warm-up")
    parser.add_argument("--batch_size", type=int, default=4, help="prompts per rollout")
    parser.add_argument("--response_length", type=int, default=16)
    parser.add_argument("--prompt_length", type=int, default=24)
    parser.add_argument("--num_ppo_epochs", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.7, help="TRL PPO's default")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each worker")
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / f"rlhf_ext-bench-trl-{TRL_VERSION}")
    parser.add_argument("--prepare", choices=list(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--directory", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare, args.directory, args.batch_size * args.updates, args.prompt_length)
        return
    if args.worker:
        worker(args.worker, args.directory, args)
        return
    if args.updates < 2:
        parser.error("--updates must be >= 2: the first update is warm-up")

    trl_python = ensure_trl_venv(args.venv)
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            prepare_command = [
                sys.executable, __file__, "--prepare", size, "--directory", str(directory), "--updates",
                str(args.updates), "--batch_size", str(args.batch_size), "--prompt_length", str(args.prompt_length),
            ]  # fmt: skip
            subprocess.run(prepare_command, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            params = parameter_count(directory)
            results = {name: run_worker(trl_python if name == "trl" else Path(sys.executable), name, directory, args)
                       for name in WORKERS}  # fmt: skip
        seconds = {name: statistics.median(r["seconds_per_update"][1:]) for name, r in results.items()}
        rss = {name: r["peak_rss_mb"] for name, r in results.items()}
        rows.append((size, params, seconds, rss))
        print(f"{size} done: {seconds} {rss}", file=sys.stderr, flush=True)

    print(f"\nPPO update (batch {args.batch_size}, response {args.response_length} tokens,"
          f" {args.num_ppo_epochs} epochs, {args.threads} CPU thread(s)); TRL {TRL_VERSION} four full models"
          f" vs rlhf_ext shared base (LoRA r=16): ours = value adapter, trunk = value head on the policy trunk\n")
    header = (
        f"{'size':>6} {'params':>8} | {'TRL s/upd':>10} {'ours s/upd':>10} {'ratio':>6} {'trunk s/upd':>11} "
        f"{'ratio':>6} | {'TRL RSS MB':>10} {'ours RSS MB':>11} {'ratio':>6} {'trunk RSS MB':>12} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for size, params, seconds, rss in rows:
        print(f"{size:>6} {params:>7.1f}M | {seconds['trl']:>10.2f} {seconds['rlhf_ext']:>10.2f} "
              f"{seconds['rlhf_ext'] / seconds['trl']:>5.2f}x {seconds['trunk']:>11.2f} "
              f"{seconds['trunk'] / seconds['trl']:>5.2f}x | {rss['trl']:>10.0f} {rss['rlhf_ext']:>11.0f} "
              f"{rss['rlhf_ext'] / rss['trl']:>5.2f}x {rss['trunk']:>12.0f} {rss['trunk'] / rss['trl']:>5.2f}x")
    print("\ntrunk / ours: " + ", ".join(f"{size} time {s['trunk'] / s['rlhf_ext']:.2f}x memory "
                                        f"{r['trunk'] / r['rlhf_ext']:.2f}x" for size, _, s, r in rows))
    print("\ntargets: time ratio <= 1.0x, memory ratio <= 0.5x")


if __name__ == "__main__":
    main()
