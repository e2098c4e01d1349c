"""A cheap fingerprint of a base model's weights, written beside every role folder and compared on load.

Two bases of the same architecture and size (a base and its instruct variant, two seeds, a merged SFT model)
accept each other's adapters without any shape error, and the role then computes something it was never trained
for. The fingerprint tells them apart: a few values, at fixed positions, of every floating-point weight of the
base's body (the decoder without its LM or score head, so that the K-way reward trainer's sequence classifier and
the shared base's causal LM give the same fingerprint on one base).

    base_fingerprint.json   {"format": 1, "base_model_name_or_path": ...,
                             "tensors": {"layers.0.input_layernorm.weight": {"dtype": "float32", "shape": [32],
                                                                             "values": [1.0, ...]}, ...}}

Values of the same dtype must be equal; across dtypes (a base loaded in bfloat16 here, float32 there) they must
agree to bfloat16 rounding. Quantized weights (bitsandbytes stores them as integers) and weights sharded away
from this process are left out; what both sides have is compared.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

FINGERPRINT_FILE = "base_fingerprint.json"
FINGERPRINT_FORMAT = 1
SAMPLES_PER_TENSOR = 4
# bfloat16 keeps 8 bits of mantissa: the same weight loaded in two dtypes differs by at most 2^-8 relative.
CROSS_DTYPE_RTOL = 1e-2
CROSS_DTYPE_ATOL = 1e-5


def base_body(model: nn.Module) -> nn.Module:
    """The transformers body (no LM or score head) of a peft model, a causal LM or a sequence classifier."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "base_model", model)


def base_weight_name(name: str) -> str | None:
    """`name` of a body parameter without peft's wrapping, or None for an adapter's own weight."""
    if ".lora_" in name or "lora_magnitude" in name or ".modules_to_save." in name:
        return None
    return name.replace(".base_layer", "").replace(".original_module", "")


def sampled_tensor(param: torch.Tensor) -> torch.Tensor | None:
    """SAMPLES_PER_TENSOR values of `param` at fixed flat positions (first to last), or None when they cannot be
    read here: integer (quantized), empty (sharded by ZeRO-3), meta, or a DTensor (sharded by FSDP2)."""
    if not param.is_floating_point() or param.numel() == 0 or param.is_meta or hasattr(param, "full_tensor"):
        return None
    flat = param.detach().reshape(-1)
    last = flat.numel() - 1
    positions = [last * i // (SAMPLES_PER_TENSOR - 1) for i in range(SAMPLES_PER_TENSOR)]
    return flat[torch.tensor(positions, device=flat.device)]


def base_fingerprint(model: nn.Module) -> dict:
    """The fingerprint of `model`'s base weights (see the module docstring)."""
    names, dtypes, shapes, samples = [], [], [], []
    for name, param in base_body(model).named_parameters():
        weight_name = base_weight_name(name)
        sample = sampled_tensor(param) if weight_name is not None else None
        if sample is not None:
            names.append(weight_name)
            dtypes.append(str(param.dtype).removeprefix("torch."))
            shapes.append(list(param.shape))
            # on the first sample's device (a base spread over several GPUs by device_map="auto"), so that all
            # samples come to the host in one copy, not one per tensor
            samples.append(sample.float().to(samples[0].device if samples else sample.device))
    values = torch.stack(samples).cpu().tolist() if samples else []
    tensors = {
        name: {"dtype": dtype, "shape": shape, "values": vals}
        for name, dtype, shape, vals in zip(names, dtypes, shapes, values)
    }
    return {"format": FINGERPRINT_FORMAT, "tensors": tensors}


def write_base_fingerprint(model: nn.Module, directory: str | os.PathLike, base_name_or_path: str | None) -> Path:
    """Write the fingerprint of `model`'s base to `directory`/base_fingerprint.json; returns its path."""
    fingerprint = {**base_fingerprint(model), "base_model_name_or_path": base_name_or_path}
    path = Path(directory) / FINGERPRINT_FILE
    path.write_text(json.dumps(fingerprint) + "\n")
    return path


def first_difference(saved: dict, current: dict) -> str | None:
    """The name of the first weight whose samples differ between two fingerprints (beyond dtype rounding), or
    None when every weight both hold agrees."""
    for name, entry in saved.get("tensors", {}).items():
        now = current["tensors"].get(name)
        if now is None:
            continue
        if entry["shape"] != now["shape"]:
            return name
        a, b = torch.tensor(entry["values"]), torch.tensor(now["values"])
        same = torch.equal(a, b) if entry["dtype"] == now["dtype"] else torch.allclose(
            a, b, rtol=CROSS_DTYPE_RTOL, atol=CROSS_DTYPE_ATOL
        )
        if not same:
            return name
    return None
