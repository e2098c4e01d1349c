"""One tiny training run of a trainer (PPO on the shared base, K-way DPO or K-way reward), for
tests/test_distributed.py.

Run alone (`python tests/distributed_worker.py ...`: one process, no engine, the reference run) or under
`accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero{2,3}.yaml --num_processes 2` (DeepSpeed on
2 CPU processes). The global batch is fixed (`--global_batch`), so the per-process batch is global_batch / processes
and every run sees the same data per optimizer step.

Writes to `--output_dir`:
    weights.safetensors   every trainable weight after training, whole (gathered under ZeRO-3), by parameter name
and prints, on the main process, one line `RLHF_EXT_OK {json}` with the checksum of the trainable weights on every
process (the test asserts on this line, not only on the exit code: a launch can abort at shutdown after training).
"""

from __future__ import annotations

import argparse
import json
import os
import zlib

import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import set_seed

if os.environ.get("RLHF_EXT_FSDP_ON_CPU") == "1":
    import fsdp_cpu_shim  # noqa: E402, F401  (test-only: accelerate's FSDP2 path on CPU processes)

from rlhf_ext.distributed import full_parameters, full_tensor  # noqa: E402
from rlhf_ext.testing import StopAfter, tiny_tokenizer  # noqa: E402

MARKER = "RLHF_EXT_OK"
# All prompts have 3 characters (3 tokens): no padding inside a batch, so the sums of a 2-process run and of a
# one-process run on the same global batch differ only by float rounding.
PPO_PROMPTS = ["abc", "xyz", "qrs", "hel", "lmn", "tuv", "def", "ijk"]
LISTS = [
    {"prompt": "q1 ", "completions": ["aa", "bb", "cc"]},
    {"prompt": "q2 ", "completions": ["dd", "ee", "ff", "gg"]},
    {"prompt": "q3 ", "completions": ["hh", "ii"]},
    {"prompt": "q4 ", "completions": ["jj", "kk", "ll", "mm"]},
    {"prompt": "q5 ", "completions": ["nn", "oo", "pp"]},
    {"prompt": "q6 ", "completions": ["rr", "ss"]},
    {"prompt": "q7 ", "completions": ["tt", "uu", "vv"]},
    {"prompt": "q8 ", "completions": ["ww", "xx", "yy", "zz"]},
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=["ppo", "dpo", "reward"], required=True)
    parser.add_argument("--base", required=True, help="tiny causal LM folder (save_tiny_model)")
    parser.add_argument("--reward_base", help="tiny sequence-classification folder (reward trainer)")
    parser.add_argument("--reward_adapter", help="reward role folder (PPO)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--global_batch", type=int, default=4)
    parser.add_argument("--save_steps", type=int, default=0, help="0: no checkpoints")
    parser.add_argument("--stop_after", type=int, default=0, help="interrupt after this many steps (0: never)")
    parser.add_argument("--resume_from_checkpoint")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--load_in_4bit", action="store_true", help="PPO on a 4-bit base (for the refusal test)")
    return parser.parse_args()


def under_engine() -> bool:
    """Whether accelerate launched this process with DeepSpeed or FSDP (it sets ACCELERATE_USE_DEEPSPEED/FSDP)."""
    return any(os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true" for name in ("DEEPSPEED", "FSDP"))


def common_args(cli: argparse.Namespace) -> dict:
    """TrainingArguments shared by the three trainers. Under DeepSpeed on CPU: use_cpu=False (with use_cpu=True
    accelerate ignores DeepSpeed) and the gloo backend (without it accelerate counts one process and DeepSpeed's
    batch-size check fails); bf16 is off, as CPUs run float32."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cli.global_batch % world:
        raise ValueError(f"--global_batch {cli.global_batch} is not divisible by {world} processes")
    engine = under_engine()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return dict(
        output_dir=cli.output_dir, per_device_train_batch_size=cli.global_batch // world, max_steps=cli.max_steps,
        learning_rate=1e-2, lr_scheduler_type="constant", report_to="none", bf16=False, use_cpu=not deepspeed,
        ddp_backend="gloo" if engine or world > 1 else None, disable_tqdm=True, seed=0, data_seed=0,
        gradient_checkpointing=cli.gradient_checkpointing, logging_steps=1,
        save_strategy="steps" if cli.save_steps else "no", save_steps=cli.save_steps or 500,
        dataloader_drop_last=True,
    )  # fmt: skip


def lora(task_type: str) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type=task_type)


def deterministic_trainables(model: torch.nn.Module) -> None:
    """Give every trainable weight a value that depends only on its name.

    Fresh LoRA A matrices and heads are drawn from the global RNG, which ZeRO-3's partitioned loading advances
    differently from a plain load; starting every run from the same weights makes the runs comparable. Run before
    the engine starts (trainer.train), so no optimizer master copy exists yet.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with full_parameters([p for _, p in params], modifier_rank=0), torch.no_grad():
        for name, param in params:
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            param.copy_(0.1 * torch.randn(param.shape, generator=generator).to(param.dtype))


def build_ppo(cli, args):
    from rlhf_ext.models import SharedBase, SharedBaseArguments
    from rlhf_ext.trainers.ppo.config import PPOConfig
    from rlhf_ext.trainers.ppo.trainer import PPOTrainer

    config = PPOConfig(
        **args, steps_per_generation=1, num_ppo_epochs=2, num_generations=1, max_completion_length=6,
        max_prompt_length=16, top_k=1, kl_coef=0.05, value_head_init="first_rollout_mean",
    )  # fmt: skip
    # top_k=1: greedy sampling, the same completions whatever each process's RNG. Advantages are whitened (the
    # default) with the statistics of both processes' completions (whiten_across_processes), as one process would.
    # first_rollout_mean: the value head's bias is written after the engine has started (its master copy too).
    shared_args = SharedBaseArguments(
        lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"],
        reward_adapter_path=cli.reward_adapter, load_in_4bit=cli.load_in_4bit,
    )  # fmt: skip
    shared = SharedBase.from_pretrained(cli.base, shared_args)  # after the config: ZeRO-3 loads it partitioned
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    trainer = PPOTrainer(
        shared, args=config, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": PPO_PROMPTS * 8}),
    )  # fmt: skip
    return trainer


def build_dpo(cli, args):
    from rlhf_ext.trainers import PlackettLuceDPOConfig, PlackettLuceDPOTrainer

    config = PlackettLuceDPOConfig(**args, max_length=32, beta=0.5)
    return PlackettLuceDPOTrainer(
        model=cli.base, args=config, train_dataset=Dataset.from_list(LISTS * 4), processing_class=tiny_tokenizer(),
        peft_config=lora("CAUSAL_LM"),
    )


def build_reward(cli, args):
    from rlhf_ext.trainers import PlackettLuceRewardConfig, PlackettLuceRewardTrainer

    config = PlackettLuceRewardConfig(**args, max_length=32)
    return PlackettLuceRewardTrainer(
        model=cli.reward_base, args=config, train_dataset=Dataset.from_list(LISTS * 4),
        processing_class=tiny_tokenizer(), peft_config=lora("SEQ_CLS"),
    )


BUILDERS = {"ppo": build_ppo, "dpo": build_dpo, "reward": build_reward}


def trainable_weights(trainer) -> dict[str, torch.Tensor]:
    """Every trainable weight of the trainer's model, whole, by name (a collective under ZeRO-3)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with full_parameters([p for _, p in params]):  # ZeRO-3; an FSDP2 DTensor is gathered by full_tensor
        return {name: full_tensor(param).float().cpu().clone() for name, param in params}


def trainer_is_sharded(trainer) -> bool:
    """Whether the trainer's parameters are really partitioned (ZeRO-3) or DTensor shards (FSDP2)."""
    params = trainer.accelerator.unwrap_model(trainer.model).parameters()
    return any(hasattr(p, "ds_id") or hasattr(p, "full_tensor") for p in params)


def report(trainer, weights: dict[str, torch.Tensor], output_dir: str) -> None:
    """Save the weights (main process) and print the success line with every process's checksums."""
    checksum = [float(weights[name].double().sum()) for name in sorted(weights)]
    world = trainer.accelerator.num_processes
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, checksum)
    else:
        gathered = [checksum]
    if trainer.accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(output_dir, "weights.safetensors"))
        summary = {
            "processes": world,
            "engine": trainer.accelerator.distributed_type.value,
            "zero_stage": getattr(trainer.accelerator.state.deepspeed_plugin, "zero_stage", None),
            "fsdp_version": getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "fsdp_version", None),
            "sharded": trainer_is_sharded(trainer),
            "global_step": trainer.state.global_step,
            "checksums": gathered,
        }
        print(MARKER, json.dumps(summary), flush=True)


def main() -> None:
    cli = parse_args()
    os.makedirs(cli.output_dir, exist_ok=True)
    set_seed(0)
    args = common_args(cli)
    trainer = BUILDERS[cli.trainer](cli, args)
    if not cli.resume_from_checkpoint:
        deterministic_trainables(trainer.accelerator.unwrap_model(trainer.model))
    if cli.stop_after:
        trainer.add_callback(StopAfter(cli.stop_after))
    trainer.train(resume_from_checkpoint=cli.resume_from_checkpoint)
    weights = trainable_weights(trainer)
    final = os.path.join(cli.output_dir, "final")
    trainer.save_model(final)
    if cli.trainer == "ppo":
        from rlhf_ext.scripts.ppo import save_policy_role  # the recipe's own policy save

        save_policy_role(trainer, trainer.shared_base, trainer.processing_class, final)
    report(trainer, weights, cli.output_dir)
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
