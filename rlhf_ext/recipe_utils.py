"""What every recipe does around its trainer: the parser and its short usage block, seeding, up-front checks of
paths and splits, model-loading kwargs, and train / save / push."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import transformers
import yaml
from packaging.version import Version
from transformers import enable_full_determinism, set_seed
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from .cards import CardInfo, list_sizes, trained_card, write_card
from .data.loading import LOCAL_FORMATS, load_dataset_or_file
from .names import looks_like_local_path
from .publish import hold_back_push, push_layout, repo_id_for, training_record

# -- the parser ------------------------------------------------------------------------------------------------------


class _UsageFirstFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with the recipe's own usage block kept as written (line breaks and all) and every flag's default."""


def recipe_parser(dataclass_types, usage: str, description: str):
    """A TrlParser whose --help starts with a short `usage` line and a `description` block (what the recipe does,
    --config, the flags that matter) before the hundreds of TRL and transformers flags. Argparse's own usage line
    would list every flag (hundreds of lines) and never mention --config, which TrlParser handles by hand."""
    return RecipeParser(dataclass_types, usage=usage, description=description, formatter_class=_UsageFirstFormatter)


# Keys a YAML config may give as local paths of data that must exist before anything is loaded
YAML_DATA_KEYS = ("dataset_name",)


class RecipeParser(TrlParser):
    """TrlParser whose error for a missing local data path says that the path came from the YAML config (the key and
    the file): a path nobody typed on the command line is otherwise a puzzle."""

    def parse_args_and_config(self, args=None, *rest, **kwargs):
        argv = list(args) if args is not None else sys.argv[1:]
        parsed = super().parse_args_and_config(argv, *rest, **kwargs)
        check_yaml_data_paths(argv)
        return parsed


def check_yaml_data_paths(argv: list[str]) -> None:
    """FileNotFoundError naming the key and the config file when a YAML key of `YAML_DATA_KEYS`, not overridden on
    the command line, names a local file or folder that does not exist (relative paths: from the current folder)."""
    if "--config" not in argv:
        return
    config_path = argv[argv.index("--config") + 1]
    config = yaml.safe_load(Path(config_path).read_text()) or {}
    given = {arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    for key in YAML_DATA_KEYS:
        value = config.get(key)
        if key in given or not isinstance(value, str):
            continue
        is_file_name = Path(value).suffix.lower() in LOCAL_FORMATS
        if (is_file_name or looks_like_local_path(value)) and not Path(value).expanduser().exists():
            raise FileNotFoundError(
                f"{key}: {value} (from {config_path}) does not exist; relative paths are read from the current "
                f"folder, {os.getcwd()}. Run from the repository root, or give --{key} on the command line."
            )


@dataclass
class LoraModelConfig(ModelConfig):
    """TRL's ModelConfig with LoRA on by default, as in every rlhf_ext recipe (the PPO recipe's shared base is
    always LoRA): the reward recipe's role folder and the DPO recipe's adapter-off reference need it."""

    use_peft: bool = field(
        default=True,
        metadata={
            "help": "Train LoRA adapters (default, as in every rlhf_ext recipe). --use_peft false trains every weight: "
            "the reward recipe then saves a full model instead of the reward role folder PPO loads."
        },
    )


# -- before any model is built ---------------------------------------------------------------------------------------


def seed_before_models(training_args) -> None:
    """Seed torch, numpy and random from `training_args` as the Trainer would, but before any model is built.

    The Trainer seeds in its __init__, after the recipe has built the models: LoRA A matrices, value and score heads
    would otherwise start from whatever state the global RNG is in, so two runs with the same --seed would differ.
    """
    if training_args.full_determinism:
        enable_full_determinism(training_args.seed)
    else:
        set_seed(training_args.seed)


def check_model_path(name_or_path: str | None, flag: str) -> None:
    """FileNotFoundError for a local model path that does not exist, instead of a Hub "repo id" error from it."""
    if not name_or_path:
        raise ValueError(f"Set --{flag} to a Hub model id or a local model folder.")
    if looks_like_local_path(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise FileNotFoundError(f"--{flag} {name_or_path}: no such folder")


def check_local_folder(path: str | None, flag: str) -> None:
    """FileNotFoundError unless `path` (a flag naming a folder on disk, never a Hub id) is an existing folder."""
    if path and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"--{flag} {path}: no such folder")


def train_split(dataset, split: str, dataset_name: str):
    """dataset[split], with errors naming the dataset and its splits when it is missing or has no records."""
    if split not in dataset:
        raise ValueError(
            f"{dataset_name} has no split {split!r} (--dataset_train_split); its splits are {sorted(dataset)}."
        )
    if len(dataset[split]) == 0:
        raise ValueError(f"{dataset_name}: split {split!r} has no records to train on.")
    return dataset[split]


def eval_split(dataset, split: str, dataset_name: str, eval_strategy) -> object | None:
    """dataset[split] when the run evaluates (eval_strategy is not "no"), None otherwise; a clear error when the
    split the evaluation needs is missing (a single local file has only "train") or empty."""
    if str(getattr(eval_strategy, "value", eval_strategy)) == "no":
        return None
    if split not in dataset:
        raise ValueError(
            f"--eval_strategy {getattr(eval_strategy, 'value', eval_strategy)} evaluates on split {split!r} "
            f"(--dataset_test_split), but {dataset_name} has only {sorted(dataset)}. Use a dataset with that split, "
            "name another with --dataset_test_split, or set --eval_strategy no."
        )
    if len(dataset[split]) == 0:
        raise ValueError(f"{dataset_name}: evaluation split {split!r} has no records.")
    return dataset[split]


# -- the trained model -----------------------------------------------------------------------------------------------


def model_init_kwargs(model_args, training_args) -> dict:
    """kwargs for `from_pretrained` of the trained model from TRL's ModelConfig; the config's own
    `model_init_kwargs` take precedence."""
    return {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }


def train_save_push(trainer, training_args, dataset_name: str | None, push: bool = False, kind: str | None = None,
                    model_args=None):
    """Train (resuming if asked), save to output_dir with a card saying what was trained (`kind` "dpo" or "reward",
    `model_args` its LoRA settings), then push output_dir once if asked (`push`, from `hold_back_push` before the
    trainer was built; `rlhf_ext.publish`); returns the trainer."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    card = kway_card(kind, trainer, training_args, model_args, dataset_name, push) if kind else None
    if card is not None and trainer.accelerator.is_main_process:
        write_card(training_args.output_dir, card)  # over PEFT's empty template
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    if push and trainer.accelerator.is_main_process:
        record = training_record(card.hyperparameters if card else {}, trainer.state.log_history)
        push_layout({"": Path(training_args.output_dir)}, training_args, record)
        trainer.accelerator.print(f"Model pushed to https://huggingface.co/{repo_id_for(training_args)}")
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()  # finish the trackers and the process group
    return trainer


def kway_card(kind: str, trainer, training_args, model_args, dataset_name: str | None, push: bool) -> CardInfo:
    """The card of a K-way DPO or reward output: K from the prepared lists, final metrics from the log history."""
    return trained_card(
        kind, training_args, model_args, base_model=model_args.model_name_or_path, dataset=dataset_name,
        log_history=trainer.state.log_history, k=list_sizes(trainer.train_dataset),
        repo_id=repo_id_for(training_args) if push else None, peft=bool(getattr(model_args, "use_peft", True)),
    )  # fmt: skip


def run_kway_recipe(trainer_class, kind: str, script_args: ScriptArguments, training_args, model_args):
    """The K-way DPO and reward recipes: seed (the LoRA adapter and a reward model's score head are built before the
    Trainer would seed), load the data, train, save to `training_args.output_dir` with a card, push once if asked;
    returns the trainer."""
    seed_before_models(training_args)
    check_model_path(model_args.model_name_or_path, "model_name_or_path")
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    name = script_args.dataset_name
    dataset = load_dataset_or_file(name, script_args.dataset_config)
    push = hold_back_push(training_args)  # pushed once, after the card is written (rlhf_ext.publish)
    trainer = trainer_class(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_split(dataset, script_args.dataset_train_split, name),
        eval_dataset=eval_split(dataset, script_args.dataset_test_split, name, training_args.eval_strategy),
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    return train_save_push(trainer, training_args, name, push=push, kind=kind, model_args=model_args)
