"""End-to-end: PPO raises a programmatic reward while the KL to the reference stays bounded; and the recipe
runs with two CPU processes (DDP over gloo) with both processes holding the same weights afterwards.

`accelerate launch --num_processes 2 --cpu` starts a single process unless MPI is set up (accelerate runs multi-CPU
jobs through mpirun), so the two-process test launches with torchrun, which accelerate's state picks up the same way.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head
from rlhf_ext.testing import (
    save_tiny_model,
    tiny_causal_lm,
    tiny_llama_config,
    tiny_tokenizer,
)
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer

REPO = Path(__file__).resolve().parents[1]
TARGET = set("abcdefghijklmnopqrstuvwxyz")  # 26 of the tiny tokenizer's 101 tokens: ~26% of random text


def fraction_of_target_tokens(completions, **kwargs):
    return [sum(ch in TARGET for ch in c) / max(len(c), 1) for c in completions]


def test_reward_rises_while_kl_stays_bounded(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    torch.manual_seed(1)
    critic = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=1))
    args = PPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=64, steps_per_generation=1, num_ppo_epochs=2,
        max_completion_length=8, max_steps=60, learning_rate=1e-3, lr_scheduler_type="constant", kl_coef=0.05,
        report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no",
        logging_steps=10, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = PPOTrainer(
        tiny_causal_lm(seed=0),
        reward_funcs=fraction_of_target_tokens,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["abc", "hello", "xy", "qrs"] * 64}),
        processing_class=tokenizer,
        value_model=critic,
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "objective/scores" in log]
    first, last = logs[0], logs[-1]
    assert last["objective/scores"] > first["objective/scores"] + 0.15, [log["objective/scores"] for log in logs]
    assert max(log["objective/kl"] for log in logs) < 10.0  # nats per completion of 8 tokens
    assert last["val/explained_variance"] > 0.0  # the critic learned something too


SYNC_CHECK = """
import torch
from rlhf_ext.scripts.ppo import main, make_parser
script_args, training_args, model_args = make_parser().parse_args_and_config()
trainer = main(script_args, training_args, model_args)
params = [p.detach().double().sum() for p in trainer.shared_base.trainable_parameters()]
checksums = trainer.accelerator.gather(torch.stack(params)[None])
assert torch.equal(checksums[0], checksums[1]), checksums
if trainer.accelerator.is_main_process:
    print("WEIGHTS_IN_SYNC", trainer.accelerator.num_processes)
"""


@pytest.mark.slow
def test_recipe_with_two_cpu_processes_keeps_weights_in_sync(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    donor = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(lora_r=4, lora_alpha=8, model_name_or_path=base))
    reward = save_adapter_with_head(donor.peft_model, "value", donor.heads["value"], tmp_path / "reward", "reward")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["abc", "hello", "xy", "qrs"] * 4))
    script = tmp_path / "run_and_check.py"
    script.write_text(SYNC_CHECK)
    output_dir = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), "--use_cpu", "true",
        "--config", str(REPO / "recipes/configs/ppo.yaml"), "--model_name_or_path", base,
        "--reward_adapter_path", str(reward), "--dataset_name", str(prompts), "--lora_r", "4", "--lora_alpha", "8",
        "--per_device_train_batch_size", "2", "--steps_per_generation", "2", "--max_completion_length", "6",
        "--max_prompt_length", "32", "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-2",
        "--output_dir", str(output_dir), "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WEIGHTS_IN_SYNC 2" in result.stdout
    assert {"adapter_model.safetensors", "head.safetensors"} <= {p.name for p in (output_dir / "value").iterdir()}
    assert (output_dir / "policy" / "adapter_model.safetensors").exists()
    assert (output_dir / "checkpoint-4" / "value" / "head.safetensors").exists()
