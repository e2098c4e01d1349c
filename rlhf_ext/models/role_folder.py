"""Save and load one role on disk: a peft adapter folder, plus a scalar head for value and reward.

The layout (fixed in docs/architecture.md):

    <role_dir>/
      adapter_config.json          # peft LoraConfig, base_model_name_or_path set
      adapter_model.safetensors    # peft LoRA weights, keys as peft saves them
      head.safetensors             # "weight": [1, hidden_size] float32, "bias": [1]   (value, reward)
      head_config.json             # {"hidden_size": H, "base_model_name_or_path": ..., "role": ...}
      base_fingerprint.json        # a few values of the base's weights, checked on load (fingerprint.py)

A value role of the "policy_trunk" layout (its head reads the policy adapter's hidden state) has no adapter of
its own: its folder holds the two head files, and head_config.json says "value_layout": "policy_trunk".

The K-way reward trainer calls `save_adapter_with_head` for its LoRA reward model, and
`SharedBase` loads that folder as its reward role.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .fingerprint import write_base_fingerprint
from .heads import ScalarHead

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head_config.json"
HEAD_ROLES = ("value", "reward")
# peft prefixes every saved key with the PeftModel's path to the transformers model.
PEFT_KEY_PREFIX = "base_model.model."


def base_model_name_or_path(peft_model: PeftModel) -> str | None:
    """The name or path the base was loaded from ("" or None for a model built from a config)."""
    return peft_model.get_base_model().config._name_or_path or None


def save_adapter(peft_model: PeftModel, adapter_name: str, directory: str | os.PathLike) -> Path:
    """Write one adapter of `peft_model` as a flat peft folder (adapter_config.json + safetensors).

    peft's own `save_pretrained` puts every adapter but "default" in a subfolder; the role layout
    wants the files at the top, so `PeftModel.from_pretrained(base, directory)` loads them as is.
    """
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r} to save; the model has {sorted(peft_model.peft_config)}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, directory / ADAPTER_WEIGHTS, {"format": "pt"})
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    config.base_model_name_or_path = config.base_model_name_or_path or base_model_name_or_path(peft_model)
    config.inference_mode = True  # as peft saves it; loading decides whether it trains
    config.save_pretrained(str(directory))
    # which base the adapter was trained on, so that loading it onto another base of the same shape is refused
    write_base_fingerprint(peft_model, directory, config.base_model_name_or_path)
    return directory


def save_head(
    head: ScalarHead,
    directory: str | os.PathLike,
    role: str,
    base_name_or_path: str | None,
    value_layout: str = "own_adapter",
) -> Path:
    """Write `head` as head.safetensors + head_config.json in `directory` (with the value layout if not the
    default, so that loading it into the other layout fails with a clear error)."""
    if role not in HEAD_ROLES:
        raise ValueError(f"role must be one of {HEAD_ROLES} for a head, got {role!r}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {
        "weight": head.linear.weight.detach().to(torch.float32).cpu().contiguous(),
        "bias": head.linear.bias.detach().to(torch.float32).cpu().contiguous(),
    }
    save_file(weights, directory / HEAD_WEIGHTS, {"format": "pt"})
    config = {"hidden_size": head.hidden_size, "base_model_name_or_path": base_name_or_path, "role": role}
    if value_layout != "own_adapter":
        config["value_layout"] = value_layout
    (directory / HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def save_adapter_with_head(
    peft_model: PeftModel, adapter_name: str, head: nn.Module, directory: str | os.PathLike, role: str
) -> Path:
    """Write the adapter `adapter_name` of `peft_model` and its scalar `head` as one role folder.

    `head` is a ScalarHead, or any module with a `weight` [1, H] and `bias` [1] (e.g. the `score`
    Linear of a sequence-classification model; a missing bias is saved as 0).
    """
    save_adapter(peft_model, adapter_name, directory)
    save_head(as_scalar_head(head), directory, role, base_model_name_or_path(peft_model))
    return Path(directory)


def as_scalar_head(head: nn.Module) -> ScalarHead:
    """`head` itself if it is a ScalarHead, else a ScalarHead holding a copy of its weight [1, H] and bias."""
    if isinstance(head, ScalarHead):
        return head
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2 or weight.shape[0] != 1:
        raise ValueError(f"A head must have a weight of shape [1, hidden_size]; got {type(head).__name__}.")
    scalar = ScalarHead(weight.shape[1])
    with torch.no_grad():
        scalar.linear.weight.copy_(weight.float())
        bias = getattr(head, "bias", None)
        scalar.linear.bias.copy_(bias.float() if bias is not None else torch.zeros(1))
    return scalar


def load_head(directory: str | os.PathLike, expected_hidden_size: int | None = None) -> ScalarHead:
    """Read the ScalarHead of a role folder, checking its shapes against head_config.json and the base.

    Raises FileNotFoundError when a file is missing and ValueError (naming the file) when the
    shapes disagree with each other or with `expected_hidden_size` (the base's hidden size).
    """
    directory = Path(directory)
    config = read_json(directory / HEAD_CONFIG)
    weights = load_file(require_file(directory / HEAD_WEIGHTS))
    hidden_size = config.get("hidden_size")
    if not isinstance(hidden_size, int):
        raise ValueError(f"{directory / HEAD_CONFIG}: field 'hidden_size' must be an int, got {hidden_size!r}.")
    if set(weights) != {"weight", "bias"}:
        raise ValueError(f"{directory / HEAD_WEIGHTS}: expected tensors 'weight' and 'bias', found {sorted(weights)}.")
    if tuple(weights["weight"].shape) != (1, hidden_size) or tuple(weights["bias"].shape) != (1,):
        raise ValueError(
            f"{directory / HEAD_WEIGHTS}: weight {tuple(weights['weight'].shape)} and bias "
            f"{tuple(weights['bias'].shape)} do not match hidden_size={hidden_size} of {HEAD_CONFIG}."
        )
    if expected_hidden_size is not None and hidden_size != expected_hidden_size:
        raise ValueError(
            f"{directory}: the head expects hidden_size={hidden_size} but the base model has "
            f"hidden_size={expected_hidden_size}; this folder was saved for another base."
        )
    head = ScalarHead(hidden_size)
    head.linear.load_state_dict(weights)
    return head


def check_value_layout(directory: str | os.PathLike, value_layout: str) -> None:
    """ValueError unless the value role folder `directory` was saved in `value_layout`."""
    saved = read_json(Path(directory) / HEAD_CONFIG).get("value_layout", "own_adapter")
    if saved != value_layout:
        raise ValueError(
            f"{directory} holds a value role saved with value_layout={saved!r}, but this base was built with "
            f"value_layout={value_layout!r}; build it with SharedBaseArguments(value_layout={saved!r})."
        )


def check_adapter_fits(model: nn.Module, directory: str | os.PathLike) -> None:
    """Raise ValueError (naming `directory`) unless every LoRA tensor saved there fits a module of `model`.

    `model` is the transformers model (bare or already wrapped by peft). Each saved
    `...<module>.lora_A.weight` [r, in] and `...<module>.lora_B.weight` [out, r] must name a module
    of `model` with those in/out features: an adapter trained on another base fails here, with
    the module and shapes in the message, instead of deep inside peft.
    """
    directory = Path(directory)
    read_json(directory / ADAPTER_CONFIG)
    weights_path = require_file(directory / ADAPTER_WEIGHTS)
    with safe_open(str(weights_path), framework="pt") as saved:
        for key in saved.keys():
            check_lora_tensor_fits(model, key, tuple(saved.get_slice(key).get_shape()), weights_path)


def check_lora_tensor_fits(model: nn.Module, key: str, shape: tuple[int, ...], weights_path: Path) -> None:
    """Check one saved LoRA tensor (`key` with `shape`) against the module of `model` it adapts."""
    for suffix, dim, feature in ((".lora_A.weight", 1, "in"), (".lora_B.weight", 0, "out")):
        if not key.endswith(suffix):
            continue
        module_name = key.removeprefix(PEFT_KEY_PREFIX)[: -len(suffix)]
        module = find_base_module(model, module_name)
        if module is None:
            raise ValueError(
                f"{weights_path}: the adapter targets module '{module_name}', which the base model does not have; "
                "it was saved for another architecture."
            )
        in_features, out_features = linear_features(module)
        expected = in_features if feature == "in" else out_features
        if shape[dim] != expected:
            raise ValueError(
                f"{weights_path}: '{key}' has shape {list(shape)} but module '{module_name}' of the base model has "
                f"{feature}_features={expected}; the adapter was saved for another base."
            )


def find_base_module(model: nn.Module, module_name: str) -> nn.Module | None:
    """The module `module_name` (path inside the transformers model) of `model`, unwrapping peft; None if absent."""
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    try:
        module = root.get_submodule(module_name)
    except AttributeError:
        return None
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a bitsandbytes Linear, or a GPT-2 Conv1D (weight [in, out])."""
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    if hasattr(module, "nf"):  # transformers' Conv1D
        return module.weight.shape[0], module.nf
    raise ValueError(f"LoRA on {type(module).__name__} is not supported by the role-folder check.")


def require_file(path: Path) -> Path:
    """`path` if it is a file, else FileNotFoundError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"Missing {path.name} in role folder {path.parent} (looked for {path}).")
    return path


def read_json(path: Path) -> dict:
    """The JSON object in `path`, with errors naming the file."""
    try:
        value = json.loads(require_file(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}.")
    return value
