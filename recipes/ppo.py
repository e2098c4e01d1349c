"""PPO with a critic on one shared base: policy and value LoRA adapters, a frozen reward adapter, reference = base.

    accelerate launch recipes/ppo.py --config recipes/configs/ppo.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/ppo.py --config recipes/configs/ppo.yaml --use_cpu --max_steps 20
    python recipes/ppo.py --help

Every field of `PPOScriptArguments`, `PPOConfig` and `SharedBaseArguments` is a CLI flag and a YAML key; flags
override the YAML. The reward is the reward role (`--reward_adapter_path`, an adapter + head folder such as the
K-way reward trainer writes) or a sequence-classification model (`--reward_model_name_or_path`).

Writes `<output_dir>/policy` (peft adapter folder) and `<output_dir>/value` (adapter + head folder), and pushes
`<output_dir>` to the Hub with `--push_to_hub`.
"""  # noqa: E501 (a shell command in the docstring; wrapping it would break copy-paste)

from __future__ import annotations

import os
from dataclasses import dataclass, field

from datasets import Dataset
from transformers import AutoTokenizer
from trl import TrlParser

from rlhf_ext.callbacks import AdaptiveKLCallback, CompletionsTableCallback
from rlhf_ext.data import load_dataset_or_file
from rlhf_ext.models import SharedBase, SharedBaseArguments
from rlhf_ext.trainers.ppo_config import PPOConfig
from rlhf_ext.trainers.ppo_trainer import PPOTrainer


@dataclass
class PPOScriptArguments:
    """Data, reward and callbacks of the PPO recipe."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset name, or a local .json / .jsonl / .parquet file of prompts."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on (Hub datasets)."})
    prompt_column: str = field(
        default="prompt", metadata={"help": "Column holding the prompts (text or a list of chat messages)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first this many prompts only (None: all)."}
    )
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A sequence-classification reward model (num_labels=1) used instead of the reward role of the "
            "shared base (--reward_adapter_path)."
        },
    )
    kl_target: float | None = field(
        default=None,
        metadata={"help": "Turn on the adaptive KL controller with this target KL per completion (nats)."},
    )
    kl_horizon: float = field(
        default=10000, metadata={"help": "Horizon of the adaptive KL controller, in completions."}
    )
    completions_every_n_steps: int = field(
        default=0,
        metadata={"help": "Write a table of sampled completions every this many steps (0: never)."},
    )


def load_prompts(args: PPOScriptArguments) -> Dataset:
    """The training prompts as a Dataset with a 'prompt' column; a clear error if there are none."""
    if not args.dataset_name:
        raise ValueError("Set --dataset_name to a Hub dataset or a local .json / .jsonl / .parquet file.")
    dataset = load_dataset_or_file(args.dataset_name, args.dataset_config)[args.dataset_train_split]
    if args.prompt_column not in dataset.column_names:
        raise ValueError(f"{args.dataset_name} has no column {args.prompt_column!r}; columns: {dataset.column_names}.")
    if args.prompt_column != "prompt":
        dataset = dataset.rename_column(args.prompt_column, "prompt")
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"{args.dataset_name} has no prompts to train on.")
    return dataset


def load_tokenizer(model_args: SharedBaseArguments, trust_remote_code: bool):
    # Generation needs left padding: completions start right after the prompt's last token.
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, padding_side="left", revision=model_args.model_revision,
        trust_remote_code=trust_remote_code,
    )  # fmt: skip
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def main(script_args: PPOScriptArguments, training_args: PPOConfig, model_args: SharedBaseArguments) -> PPOTrainer:
    """Train, save the policy and value roles under `training_args.output_dir`, and push if asked."""
    if not model_args.model_name_or_path:
        raise ValueError("Set --model_name_or_path to the base model (Hub id or local folder).")
    if not model_args.reward_adapter_path and not script_args.reward_model_name_or_path:
        raise ValueError("No reward: set --reward_adapter_path (reward role folder) or --reward_model_name_or_path.")

    dataset = load_prompts(script_args)
    tokenizer = load_tokenizer(model_args, training_args.trust_remote_code)
    shared = SharedBase.from_pretrained(
        model_args.model_name_or_path, model_args, trust_remote_code=training_args.trust_remote_code
    )
    trainer = PPOTrainer(
        shared,
        reward_funcs=script_args.reward_model_name_or_path,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    if script_args.kl_target is not None:
        trainer.add_callback(AdaptiveKLCallback(target=script_args.kl_target, horizon=script_args.kl_horizon))
    if script_args.completions_every_n_steps > 0:
        trainer.add_callback(CompletionsTableCallback(trainer, every_n_steps=script_args.completions_every_n_steps))

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    trainer.save_model(training_args.output_dir)  # tokenizer, training args, and the value role in value/
    if trainer.accelerator.is_main_process:
        shared.save_role("policy", os.path.join(training_args.output_dir, "policy"))
        tokenizer.save_pretrained(os.path.join(training_args.output_dir, "policy"))
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def make_parser(subparsers=None) -> TrlParser:
    dataclass_types = (PPOScriptArguments, PPOConfig, SharedBaseArguments)
    if subparsers is not None:
        return subparsers.add_parser("ppo", help="Run the PPO recipe", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types)


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config()
    main(script_args, training_args, model_args)
