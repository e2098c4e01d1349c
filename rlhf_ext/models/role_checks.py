"""Refuse a role folder given to the wrong flag, role or base, and a reward model PPO would misread.

Every one of these loads without an error of its own and trains the wrong thing (issue 18):

- a reward role folder given as a full reward model (`--reward_model_name_or_path`, `reward_funcs="<folder>"`):
  transformers builds a sequence classifier with a fresh score head and never reads head.safetensors;
- a folder of one role loaded as another (a PPO critic as the reward, a reward adapter as the policy);
- a folder saved on another base of the same shape;
- a sequence classifier with num_labels != 1: TRL reads logit 0, so PPO maximises the first label.

docs/shared-base.md ("Role folder checks") says what each error means and how to fix the input.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from torch import nn

from .fingerprint import FINGERPRINT_FILE, base_fingerprint, first_difference
from .role_folder import ADAPTER_CONFIG, HEAD_CONFIG, read_json

ROLE_FLAGS = {
    "policy": "--policy_adapter_path (SharedBaseArguments.policy_adapter_path)",
    "value": "--value_adapter_path (SharedBaseArguments.value_adapter_path)",
    "reward": "--reward_adapter_path (SharedBaseArguments.reward_adapter_path)",
}
# The task type peft records for the adapter of each role: the reward trainer trains a sequence classifier.
POLICY_TASK_TYPE = "CAUSAL_LM"
REWARD_TASK_TYPE = "SEQ_CLS"
# Architectures of generative models: loaded as a sequence classifier, their score head is freshly initialised.
# (Only these are refused: a remote-code reward model may have an architecture name of its own.)
GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def folder_role(directory: str | os.PathLike) -> tuple[str | None, str]:
    """(role, why) of a role folder: head_config.json's "role" for value and reward; a peft adapter without a head
    is a reward model's when its task type is SEQ_CLS, else a policy. (None, "") when it holds neither file."""
    directory = Path(directory)
    if (directory / HEAD_CONFIG).is_file():
        role = read_json(directory / HEAD_CONFIG).get("role")
        return role, f"{HEAD_CONFIG} says role={role!r}"
    if (directory / ADAPTER_CONFIG).is_file():
        task_type = read_json(directory / ADAPTER_CONFIG).get("task_type")
        role = "reward" if task_type == REWARD_TASK_TYPE else "policy"
        return role, f"a peft adapter without a head, {ADAPTER_CONFIG} task_type={task_type!r}"
    return None, ""


def check_folder_role(directory: str | os.PathLike, role: str) -> None:
    """ValueError naming the flag to use when `directory` holds another role than `role` (e.g. a PPO critic given
    as the reward, or a reward trainer's SEQ_CLS adapter given as the policy)."""
    found, why = folder_role(directory)
    headless = not (Path(directory) / HEAD_CONFIG).is_file()
    if found == role == "reward" and headless:
        # TRL's RewardTrainer writes this (the score head inside the adapter): transformers loads it as a model
        raise ValueError(
            f"{directory} holds a SEQ_CLS adapter without {HEAD_CONFIG} ({why}): a reward model saved by peft, not a "
            "reward role folder. Pass it as --reward_model_name_or_path (reward_funcs=<path>), which loads the adapter "
            "with its score head, or save the reward model with PlackettLuceRewardTrainer.save_model to get a role "
            f"folder for {ROLE_FLAGS['reward']}."
        )
    if found is None or found == role:
        return
    if found == "reward" and headless:
        # a plain peft sequence-classification adapter: a reward model's, but without the head PPO reads
        raise ValueError(
            f"{directory} holds a SEQ_CLS adapter ({why}), a reward model's, not a {role}: a {role} adapter is "
            f"{POLICY_TASK_TYPE}. Save the reward model with PlackettLuceRewardTrainer.save_model (which writes its "
            f"head too) and pass that folder as {ROLE_FLAGS['reward']}."
        )
    raise ValueError(
        f"{directory} is a {found} role folder ({why}), not a {role} one: pass it as {ROLE_FLAGS.get(found, found)}; "
        f"{ROLE_FLAGS[role]} takes a folder saved as the {role} role."
    )


def check_folder_base(directory: str | os.PathLike, role: str, model: nn.Module, base_name: str | None) -> None:
    """ValueError when `directory` was saved on a base whose weights differ from `model`'s; a warning when it
    predates base_fingerprint.json, so its base cannot be checked."""
    directory = Path(directory)
    path = directory / FINGERPRINT_FILE
    saved_name = saved_base_name(directory)
    if not path.is_file():
        warnings.warn(
            f"The {role} role folder {directory} does not record the base it was saved on ({FINGERPRINT_FILE} is "
            f"missing; it was saved for {saved_name!r}, this base is {base_name!r}), so rlhf_ext cannot check that it "
            "belongs to this base. Load it onto its own base and re-save it (SharedBase.save_role) to record it.",
            UserWarning,
            stacklevel=3,
        )
        return
    saved, current = read_json(path), base_fingerprint(model)
    if not set(saved.get("tensors", {})) & set(current["tensors"]):
        # e.g. written from a sharded model (ZeRO-3, FSDP2), or under other weight names: nothing could be compared
        warnings.warn(
            f"The {role} role folder {directory} records no weight this base has ({FINGERPRINT_FILE}), so rlhf_ext "
            f"cannot check that it belongs to this base (saved for {saved_name!r}, this base is {base_name!r}). "
            "Load it onto its own base and re-save it (SharedBase.save_role) to record it.",
            UserWarning,
            stacklevel=3,
        )
        return
    differing = first_difference(saved, current)
    if differing is not None:
        raise ValueError(
            f"The {role} role folder {directory} was saved on another base: this base's weights differ from the ones "
            f"it recorded (first at '{differing}'). It was saved for {saved_name!r}; this base is {base_name!r}. "
            "Load it onto the base it was trained on (--model_name_or_path), or train the role again on this base."
        )


def saved_base_name(directory: Path) -> str | None:
    """The base name or path a role folder records (adapter_config.json, else head_config.json), if any."""
    for name in (ADAPTER_CONFIG, HEAD_CONFIG):
        if (directory / name).is_file():
            return read_json(directory / name).get("base_model_name_or_path")
    return None


def check_role_folder(directory: str | os.PathLike, role: str, model: nn.Module, base_name: str | None) -> None:
    """Refuse `directory` as `role` on the base of `model` (a peft model or transformers model) unless it holds that
    role and was saved on that base (see `check_folder_role`, `check_folder_base`)."""
    check_folder_role(directory, role)
    check_folder_base(directory, role, model, base_name)


# -- reward models given to the trainers -----------------------------------------------------------------------------


LABEL_EXAMPLE = """\
    classifier = AutoModelForSequenceClassification.from_pretrained(path)
    LABEL = classifier.config.label2id["POSITIVE"]    # the label to reward

    def reward(prompts, completions, **kwargs):
        batch = tokenizer([p + c for p, c in zip(prompts, completions)], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = classifier(**batch).logits
        return logits[:, LABEL].tolist()              # or logits.softmax(-1)[:, LABEL].tolist()

and pass reward_funcs=reward (docs/shared-base.md, "Role folder checks")."""


def check_reward_models(reward_funcs, source: str = "reward_funcs", config_kwargs: dict | None = None) -> None:
    """Refuse each reward of `reward_funcs` (one or a list: a path, a module or a callable) that PPO would misread:
    a role folder given as a model path, a model path that is no sequence classifier, or a sequence classifier with
    num_labels != 1. `source` names where the reward was given ("reward_funcs", "--reward_model_name_or_path");
    `config_kwargs` (revision, trust_remote_code) are passed to AutoConfig for a path."""
    for func in reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]:
        if isinstance(func, (str, os.PathLike)):
            check_reward_model_path(str(func), source, config_kwargs or {})
        elif isinstance(func, nn.Module):
            check_num_labels(getattr(func, "config", None), f"{source} model {type(func).__name__}")


def check_trainer_reward_models(reward_funcs, args) -> None:
    """`check_reward_models` for a trainer's `reward_funcs`, reading a path's config as TRL will load the model
    (the revision of `args.model_init_kwargs`, `args.trust_remote_code`)."""
    revision = (args.model_init_kwargs or {}).get("revision")
    config_kwargs = {"trust_remote_code": args.trust_remote_code, **({"revision": revision} if revision else {})}
    check_reward_models(reward_funcs, "reward_funcs", config_kwargs)


def check_reward_model_path(path: str, source: str, config_kwargs: dict) -> None:
    """A reward model path must be a full sequence-classification model with one label, not a role folder."""
    if Path(path).expanduser().is_dir():
        role, why = folder_role(Path(path).expanduser())
        if role is not None and not (role == "reward" and "task_type" in why):
            raise ValueError(
                f"{source} {path}: this is a {role} role folder ({why}), not a full reward model; loaded as one, its "
                f"score head would be freshly initialised and never read from head.safetensors. Pass it as "
                f"{ROLE_FLAGS.get(role, ROLE_FLAGS['reward'])}."
            )
    config = reward_model_config(path, config_kwargs)
    if config is None:
        return
    architectures = getattr(config, "architectures", None) or []
    if architectures and all(name.endswith(GENERATIVE_SUFFIXES) for name in architectures):
        raise ValueError(
            f"{source} {path} is a {', '.join(architectures)}, not a sequence-classification reward model: its score "
            "head would be freshly initialised. Give a model trained as a reward model (num_labels=1), a reward role "
            f"folder as {ROLE_FLAGS['reward']}, or a reward function."
        )
    check_num_labels(config, f"{source} {path}")


def reward_model_config(path: str, config_kwargs: dict):
    """The transformers config of a reward model path, or None when it cannot be read here (loading will say why)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, **config_kwargs)
    except (OSError, ValueError):
        return None


def check_num_labels(config, what: str) -> None:
    """ValueError when a sequence classifier's config has num_labels != 1, with how to reward one label."""
    num_labels = getattr(config, "num_labels", 1)
    if num_labels == 1:
        return
    labels = getattr(config, "id2label", None) or {}
    first = labels.get(0, "label 0")
    raise ValueError(
        f"{what} has num_labels={num_labels} ({', '.join(map(str, labels.values()))}): TRL scores a reward model "
        f"by its first logit, so training would maximise {first!r}. A reward model must have one label "
        f"(num_labels=1). To reward one label of a classifier, wrap it in a reward function:\n\n{LABEL_EXAMPLE}"
    )
