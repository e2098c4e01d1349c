"""PPO with a critic on one shared base: policy and value LoRA adapters, a frozen reward adapter, reference = base.

    accelerate launch recipes/ppo.py --config recipes/configs/ppo.yaml --reward_adapter_path out/reward
    accelerate launch --multi_gpu --num_processes 2 recipes/ppo.py --config recipes/configs/ppo.yaml --use_cpu --max_steps 20
    python recipes/ppo.py --help

Every field of `PPOScriptArguments`, `PPOConfig` and `SharedBaseArguments` is a CLI flag and a YAML key; flags
override the YAML. The reward is the reward role (`--reward_adapter_path`, the adapter + head folder the K-way
reward recipe writes to its --output_dir) or a sequence-classification model (`--reward_model_name_or_path`),
never both. The shared base always trains LoRA adapters: `--use_peft` is accepted (as in the DPO and reward
recipes, where it is the default too) and `--use_peft false` is refused.

Writes `<output_dir>/policy` (peft adapter folder + tokenizer + card) and `<output_dir>/value` (adapter + head folder
+ card). `--push_to_hub` uploads once, at the end: `policy/` as the repository root (AutoPeftModelForCausalLM loads
it), `value/` beside it, and `training/` (hyperparameters, log history); see `rlhf_ext.publish`.
"""  # noqa: E501 (a shell command in the docstring; wrapping it would break copy-paste)

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset
from transformers import AutoTokenizer

from rlhf_ext.callbacks import CompletionsTableCallback
from rlhf_ext.cards import CardInfo, trained_card, write_card
from rlhf_ext.data import load_dataset_or_file
from rlhf_ext.distributed import whole_weights_on_main_process
from rlhf_ext.models import SharedBase, SharedBaseArguments
from rlhf_ext.models.role_checks import check_folder_role, check_reward_models
from rlhf_ext.publish import hold_back_push, push_layout, repo_id_for, training_record
from rlhf_ext.recipe_utils import (
    check_local_folder,
    check_model_path,
    eval_split,
    recipe_parser,
    seed_before_models,
    train_split,
)
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer

USAGE = "ppo.py --config recipes/configs/ppo.yaml --reward_adapter_path DIR [--FLAG VALUE ...]"
DESCRIPTION = """\
PPO with a critic on one shared base: policy and value LoRA adapters, a frozen reward adapter + head, and the
base itself as the reference. Writes <output_dir>/policy (adapter + tokenizer) and <output_dir>/value.

--config FILE.yaml            every key is a flag below; flags given on the command line override it
--model_name_or_path PATH     base model: Hub id or local folder
--reward_adapter_path DIR     reward role folder (the K-way reward recipe's --output_dir), or instead:
--reward_model_name_or_path   a sequence-classification reward model (num_labels=1); not both
--dataset_name NAME           Hub dataset, or a local .json / .jsonl / .parquet file with a "prompt" column
--output_dir DIR              where policy/, value/ and checkpoints are written
--max_prompt_length N         longest prompt in tokens; --long_prompts error|drop for longer ones
--max_completion_length 53    tokens sampled per completion
--kl_coef 0.05, --kl_target   KL penalty coefficient; a target KL turns on the adaptive controller
--learning_rate, --max_steps, --per_device_train_batch_size, --num_ppo_epochs, --seed
--lora_r 16, --load_in_4bit   LoRA rank of policy and value; quantized base (--use_peft: always on here)
--resume_from_checkpoint DIR|latest (docs/faults.md), --push_to_hub --hub_model_id ID

All PPOConfig (TRL GRPOConfig) and transformers TrainingArguments flags follow.
"""


@dataclass
class PromptRecipeArguments:
    """Prompts and reward of the recipes that sample on a shared base: PPO and online K-way DPO."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset name, or a local .json / .jsonl / .parquet file of prompts."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Split to evaluate on when --eval_strategy is not 'no'."}
    )
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
            "shared base (--reward_adapter_path); giving both is an error."
        },
    )
    use_peft: bool = field(
        default=True,
        metadata={
            "help": "Accepted for symmetry with the DPO and reward recipes, where LoRA is the default too: the shared "
            "base always trains LoRA adapters on one frozen base, which is also the reference, so --use_peft false "
            "(full fine-tuning) is refused."
        },
    )


@dataclass
class PPOScriptArguments(PromptRecipeArguments):
    """Data, reward and callbacks of the PPO recipe."""

    completions_every_n_steps: int = field(
        default=0,
        metadata={"help": "Write a table of sampled completions every this many steps (0: never)."},
    )


def load_prompts(args: PPOScriptArguments, training_args: PPOConfig) -> tuple[Dataset, Dataset | None]:
    """The training prompts (and the evaluation prompts when the run evaluates) as Datasets with a 'prompt'
    column; a clear error if there are none, or if the split evaluation needs is missing."""
    dataset = load_dataset_or_file(args.dataset_name, args.dataset_config)
    train = train_split(dataset, args.dataset_train_split, args.dataset_name)
    evaluation = eval_split(dataset, args.dataset_test_split, args.dataset_name, training_args.eval_strategy)
    train = prompt_column(train, args.prompt_column, args.dataset_name)
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if len(train) == 0:
        raise ValueError(f"{args.dataset_name}: --max_train_samples {args.max_train_samples} leaves no prompts.")
    if evaluation is not None:
        evaluation = prompt_column(evaluation, args.prompt_column, args.dataset_name)
    return train, evaluation


def prompt_column(dataset: Dataset, column: str, dataset_name: str) -> Dataset:
    """`dataset` reduced to its prompt column, named 'prompt' as the trainer expects; a clear error if it has none.

    Other columns are dropped: TRL hands every column to the reward functions as keyword arguments, and a ranked
    dataset's own `completions` would collide with the sampled ones (the reward here reads only prompt + completion).
    """
    if column not in dataset.column_names:
        raise ValueError(f"{dataset_name} has no column {column!r} (--prompt_column); columns: {dataset.column_names}.")
    dataset = dataset.select_columns([column])
    return dataset.rename_column(column, "prompt") if column != "prompt" else dataset


def check_arguments(script_args: PPOScriptArguments, model_args: SharedBaseArguments) -> None:
    """Refuse contradictory or missing flags and missing local folders before anything is loaded."""
    if not script_args.use_peft:
        raise ValueError(
            "--use_peft false: the PPO recipe always trains LoRA adapters (policy and value share one frozen base, "
            "which is also the reference); full fine-tuning is not supported. Drop the flag."
        )
    has_role, has_model = bool(model_args.reward_adapter_path), bool(script_args.reward_model_name_or_path)
    if has_role and has_model:
        raise ValueError(
            f"Both --reward_adapter_path ({model_args.reward_adapter_path}) and --reward_model_name_or_path "
            f"({script_args.reward_model_name_or_path}) are set; the reward is one or the other. Keep one."
        )
    if not has_role and not has_model:
        raise ValueError("No reward: set --reward_adapter_path (reward role folder) or --reward_model_name_or_path.")
    check_model_path(model_args.model_name_or_path, "model_name_or_path")
    if has_model:
        check_model_path(script_args.reward_model_name_or_path, "reward_model_name_or_path")
        # a role folder or a classifier with 2 labels loads without error and trains on the wrong reward
        check_reward_models(script_args.reward_model_name_or_path, "--reward_model_name_or_path")
    for flag in ("reward_adapter_path", "policy_adapter_path", "value_adapter_path"):
        check_local_folder(getattr(model_args, flag), flag)
        if getattr(model_args, flag):
            check_folder_role(getattr(model_args, flag), flag.removesuffix("_adapter_path"))  # before the base loads


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
    trainer, shared, tokenizer, push = trainer_on_shared_base(PPOTrainer, script_args, training_args, model_args)
    if script_args.completions_every_n_steps > 0:
        trainer.add_callback(CompletionsTableCallback(trainer, every_n_steps=script_args.completions_every_n_steps))

    return train_save_policy_push(trainer, shared, tokenizer, training_args, script_args, model_args, push)


def trainer_on_shared_base(trainer_class, script_args, training_args, model_args):
    """(trainer, shared base, tokenizer, push?) of the PPO and online K-way recipes: the arguments checked, the
    prompts loaded, the shared base built and the trainer made on it, with the Trainer's own pushes held back."""
    check_arguments(script_args, model_args)
    # Seeded before the shared base exists: its LoRA A matrices and value head are drawn when it is built, before
    # the Trainer seeds, so two runs with the same --seed would otherwise differ from the first step.
    seed_before_models(training_args)
    train_dataset, eval_dataset = load_prompts(script_args, training_args)
    tokenizer = load_tokenizer(model_args, training_args.trust_remote_code)
    shared = SharedBase.from_pretrained(
        model_args.model_name_or_path, model_args, trust_remote_code=training_args.trust_remote_code
    )
    push = hold_back_push(training_args)  # pushed once, at the end, with the policy as the repository root
    trainer = trainer_class(
        shared,
        reward_funcs=script_args.reward_model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    return trainer, shared, tokenizer, push


def train_save_policy_push(trainer, shared: SharedBase, tokenizer, training_args, script_args, model_args,
                           push: bool = False, kind: str = "ppo"):
    """Train (resuming if asked), save the checkpoint layout (tokenizer, training args, the value role in value/ for
    PPO), the policy role in <output_dir>/policy and the model cards; then, if asked, push once: the policy folder
    as the repository root, PPO's value role as value/ (`rlhf_ext.publish`). Returns the trainer."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    save_policy_role(trainer, shared, tokenizer, training_args.output_dir)
    out = Path(training_args.output_dir)
    cards = role_cards(kind, trainer, training_args, script_args, model_args, push)
    if trainer.accelerator.is_main_process:
        for folder, role in (("policy", "policy"), (".", "policy"), ("value", "value")):
            if role in cards:  # the output folder's own README is PEFT's empty template otherwise
                write_card(out / folder, cards[role])
    saved = f"Policy saved to {out / 'policy'}" + (f", value role to {out / 'value'}" if "value" in cards else "")
    trainer.accelerator.print(saved)
    if push and trainer.accelerator.is_main_process:
        layout = {"": out / "policy", **({"value": out / "value"} if "value" in cards else {})}
        push_layout(layout, training_args, training_record(cards["policy"].hyperparameters, trainer.state.log_history))
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{repo_id_for(training_args)} (root: policy)")
    return trainer


def role_cards(kind: str, trainer, training_args, script_args, model_args, push: bool) -> dict[str, CardInfo]:
    """The policy's card and, for PPO, the value role's: method, base, prompts, reward, settings, final metrics."""
    common = dict(
        base_model=model_args.model_name_or_path, dataset=script_args.dataset_name,
        reward=model_args.reward_adapter_path or script_args.reward_model_name_or_path,
        log_history=trainer.state.log_history, repo_id=repo_id_for(training_args) if push else None,
    )  # fmt: skip
    cards = {"policy": trained_card(kind, training_args, model_args, **common)}
    if kind == "ppo" and (Path(training_args.output_dir) / "value").is_dir():
        cards["value"] = trained_card("value", training_args, model_args, **common)
    return cards


def save_policy_role(trainer, shared: SharedBase, tokenizer, output_dir: str) -> None:
    """Write the policy role folder (adapter + tokenizer) to <output_dir>/policy from the main process.

    Every process calls it: under ZeRO-3 (or FSDP) the weights are gathered first (a collective), since each process
    holds only a slice of them.
    """
    with whole_weights_on_main_process(trainer.accelerator, trainer.model):
        if trainer.accelerator.is_main_process:
            shared.save_role("policy", os.path.join(output_dir, "policy"))
            tokenizer.save_pretrained(os.path.join(output_dir, "policy"))
    trainer.accelerator.wait_for_everyone()


def make_parser():
    dataclass_types = (PPOScriptArguments, PPOConfig, SharedBaseArguments)
    return recipe_parser(dataclass_types, USAGE, DESCRIPTION)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
