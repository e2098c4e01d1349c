"""Peak memory and time of one PPO-shaped step: four separate models versus one shared base.

One step = rollout scoring (4 no-grad forwards: policy, reference, value, reward) + training
(policy forward, value forward, one backward, one AdamW step). Configurations:

    separate_full   four models as TRL's PPOTrainer laid them out: policy + reference causal LMs,
                    value + reward sequence-classification models; policy and value fully trained
    separate_lora   the same four models, LoRA on policy and value (reference and reward full copies)
    shared_fp32     SharedBase: one base, policy/value/reward adapters + heads, reference = adapters off
    shared_bf16     the same with the base in bfloat16
    shared_4bit     the same with the base in 4-bit NF4 (compute in float32)

Each configuration runs in its own process (this module with `--child`, a child run of
benchmarks/harness.py), so peak RSS (ru_maxrss) is its own. Models are built from config with random
weights (no download) in shapes of benchmarks/harness.py: "smollm2-135m" is SmolLM2-135M's,
"smollm2-narrow-70m" a smaller model of the same family. From the repository root:

    python -m benchmarks.shared_base_memory                      # both sizes, all configurations
    python -m benchmarks.shared_base_memory --sizes smollm2-narrow-70m --steps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import (
    SHAPES,
    Clock,
    add_result_file_argument,
    median_lap,
    model_config,
    peak_rss_gib,
    run_child,
    write_json,
)

SIZES = ["smollm2-narrow-70m", "smollm2-135m"]  # the default shapes
CONFIGS = ["separate_full", "separate_lora", "shared_fp32", "shared_bf16", "shared_4bit"]


# -- child: build one configuration and time its steps -------------------------------------------


def llama_config(size: str):
    """A LlamaConfig of the shape `size` (benchmarks/harness.py), pad = 0."""
    return model_config(size, max_position_embeddings=2048, pad_token_id=0)


def lora_args():
    from rlhf_ext.models import SharedBaseArguments

    return SharedBaseArguments(lora_r=16, lora_alpha=32, lora_dropout=0.0)


class SeparateModels:
    """Four models in the layout of TRL's old PPOTrainer; `lora` puts LoRA on policy and value."""

    def __init__(self, config, lora: bool):
        import torch
        from peft import get_peft_model
        from transformers import LlamaForCausalLM, LlamaForSequenceClassification

        from rlhf_ext.models import lora_config

        self.policy = LlamaForCausalLM(config)
        self.reference = LlamaForCausalLM(config).requires_grad_(False)
        self.value = LlamaForSequenceClassification(config.__class__(**{**config.to_dict(), "num_labels": 1}))
        self.reward = LlamaForSequenceClassification(config.__class__(**{**config.to_dict(), "num_labels": 1}))
        self.reward.requires_grad_(False)
        if lora:
            peft_config = lora_config(lora_args(), "llama")
            self.policy = get_peft_model(self.policy, peft_config)
            # SEQ_CLS makes peft train the score head too (modules_to_save), as the value head must
            self.value = get_peft_model(self.value, dataclasses.replace(peft_config, task_type="SEQ_CLS"))
        self.torch = torch

    def parameters(self):
        return [p for m in (self.policy, self.value) for p in m.parameters() if p.requires_grad]

    def _value_model(self):
        return self.value.get_base_model() if hasattr(self.value, "get_base_model") else self.value

    def policy_logits(self, ids, mask):
        return self.policy(input_ids=ids, attention_mask=mask).logits

    def reference_logits(self, ids, mask):
        return self.reference(input_ids=ids, attention_mask=mask).logits

    def values(self, ids, mask):
        # as TRL's PPO did: run the backbone, apply the score head to every position
        model = self._value_model()
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return model.score(hidden).squeeze(-1)

    def reward_scores(self, ids, mask):
        hidden = self.reward.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.reward.score(hidden[:, -1]).squeeze(-1)

    def train(self):
        for model in (self.policy, self.value, self.reference, self.reward):
            model.train()


def build_shared(config, kind: str, base_dir: str | None):
    """A SharedBase in fp32, bf16 or 4-bit, with a reward role loaded from a saved adapter+head folder."""
    import torch
    from transformers import LlamaForCausalLM

    from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head

    if kind == "shared_4bit":
        args = SharedBaseArguments(**{**vars(lora_args()), "load_in_4bit": True})
        shared = SharedBase.from_pretrained(base_dir, args)
    else:
        dtype = torch.bfloat16 if kind == "shared_bf16" else torch.float32
        shared = SharedBase(LlamaForCausalLM(config).to(dtype), lora_args())
    with tempfile.TemporaryDirectory() as reward_dir:
        # the value adapter and head saved as a reward role stand in for a folder the reward trainer saved
        save_adapter_with_head(shared.peft_model, "value", shared.heads["value"], reward_dir, "reward")
        shared.load_role("reward", reward_dir)
    return shared


def ppo_step(model, optimizer, ids, mask) -> None:
    """Rollout scoring (4 no-grad forwards), then 2 forwards, 1 backward and an AdamW step."""
    import torch

    with torch.no_grad():
        model.policy_logits(ids, mask)
        model.reference_logits(ids, mask)
        model.values(ids, mask)
        model.reward_scores(ids, mask)
    logits = model.policy_logits(ids, mask)
    logprobs = logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    values = model.values(ids, mask)
    loss = -logprobs + values.float().square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(kind: str, size: str, steps: int, batch: int, seq: int, base_dir: str | None) -> dict:
    """Build one configuration, run warm-up + `steps` PPO steps; returns timings and peak RSS."""
    import torch

    torch.manual_seed(0)
    config = llama_config(size)
    build = Clock()
    if kind.startswith("separate"):
        model = SeparateModels(config, lora=kind == "separate_lora")
        params = model.parameters()
    else:
        model = build_shared(config, kind, base_dir)
        params = model.trainable_parameters()
    model.train()
    build_s = build.lap().wall_s
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    ids = torch.randint(1, config.vocab_size, (batch, seq))
    mask = torch.ones_like(ids)
    ppo_step(model, optimizer, ids, mask)  # the first step allocates the optimizer state; not timed
    laps = []
    for _ in range(steps):
        clock = Clock()
        ppo_step(model, optimizer, ids, mask)
        laps.append(clock.lap())
    step = median_lap(laps)
    return {
        "config": kind,
        "size": size,
        "trainable_m": sum(p.numel() for p in params) / 1e6,
        "build_s": build_s,
        "step_s": step.wall_s,
        "cpu_s": step.cpu_s,
        "peak_rss_mb": peak_rss_gib() * 1024,
    }


# -- parent: one process per configuration, then the table ---------------------------------------


def save_base(size: str, directory: str) -> str:
    """Save a random base of `size` so the 4-bit configuration can load (and quantize) it."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(size)).save_pretrained(directory)
    return directory


def run_in_subprocess(kind: str, size: str, cli: argparse.Namespace, base_dir: str | None, folder: str) -> dict:
    """One configuration's row, measured in a process of its own (its result file and log go to `folder`)."""
    args = ["--child", kind, "--sizes", size, "--steps", str(cli.steps), "--batch", str(cli.batch), "--seq",
            str(cli.seq), "--threads", str(cli.threads)]  # fmt: skip
    if base_dir:
        args += ["--base_dir", base_dir]
    return run_child("benchmarks.shared_base_memory", args, Path(folder) / f"{size}-{kind}.json")


def print_table(rows: list[dict]) -> None:
    """One line per (size, configuration), with ratios to separate_full of the same size."""
    header = (f"{'size':>18} {'configuration':<14} {'trainable M':>11} {'peak RSS MB':>11} {'wall s':>7} "
              f"{'cpu s':>7} {'RSS / full':>10} {'wall / full':>11} {'cpu / full':>10}")
    print(header)
    print("-" * len(header))
    for row in rows:
        full = next((r for r in rows if r["size"] == row["size"] and r["config"] == "separate_full"), None)
        ratios = " ".join(
            f"{row[key] / full[key]:>{width - 1}.2f}x" if full else f"{'n/a':>{width}}"
            for key, width in (("peak_rss_mb", 10), ("step_s", 11), ("cpu_s", 10))
        )
        print(f"{row['size']:>18} {row['config']:<14} {row['trainable_m']:>11.2f} {row['peak_rss_mb']:>11.0f} "
              f"{row['step_s']:>7.2f} {row['cpu_s']:>7.2f} {ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=SIZES, choices=list(SHAPES), help="benchmarks/harness.py shapes")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    # One thread by default: on a CPU shared with other jobs, OpenMP threads that wait for a busy
    # core make every op several times slower and the timings meaningless.
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each configuration's process")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--base_dir", help=argparse.SUPPRESS)
    add_result_file_argument(parser)
    cli = parser.parse_args()

    if cli.child:
        import torch

        torch.set_num_threads(cli.threads)
        write_json(cli.result_file, measure(cli.child, cli.sizes[0], cli.steps, cli.batch, cli.seq, cli.base_dir))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in cli.sizes:
            base_dir = save_base(size, os.path.join(tmp, size)) if "shared_4bit" in cli.configs else None
            for kind in cli.configs:
                row = run_in_subprocess(kind, size, cli, base_dir, tmp)
                print(f"  {size} {kind}: {row['peak_rss_mb']:.0f} MB, {row['step_s']:.2f} s/step "
                      f"({row['cpu_s']:.2f} s CPU)", file=sys.stderr)
                rows.append(row)
    print(f"\nPPO-shaped step, batch {cli.batch} x {cli.seq} tokens, median of {cli.steps} steps, "
          f"{cli.threads} thread(s), torch {__import__('torch').__version__}. wall s: elapsed time per step; "
          "cpu s: this process's CPU time per step (steadier when other jobs share the CPU).\n")
    print_table(rows)


if __name__ == "__main__":
    main()
