"""Guard against bitsandbytes' CPU weight repacking, which breaks training on a 4-bit base.

bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a Linear4bit's weight into an inference-only
layout on its first forward in eval mode without grad (exactly a PPO rollout). From then on every
forward of that layer goes through an op with no autograd formula, so gradients of the LoRA
adapters below it are silently wrong, and `state_dict()` un-packs a lossy copy (absmax rounded
to bf16). The layer decides this from its `support_avx512bf16_for_cpu` flag, set at construction
from the CPU; turning it off keeps the trainable layout. It costs the fast CPU inference kernel,
which a model being trained cannot use anyway.
"""

from __future__ import annotations

from torch import nn


def linear4bit_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every bitsandbytes Linear4bit in `model`; empty when bitsandbytes is absent."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Linear4bit)]


def disable_cpu_4bit_repacking(model: nn.Module) -> int:
    """Turn off the AVX512-BF16 repacking on every Linear4bit of `model`; returns how many layers.

    Raises ValueError naming the first layer that was already repacked (it ran an eval no-grad
    forward before this call): its weights can no longer be trained, reload the model instead.
    """
    layers = linear4bit_layers(model)
    for name, layer in layers:
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            raise ValueError(
                f"4-bit layer '{name}' was already repacked for CPU inference (an eval-mode no-grad forward ran "
                "before the guard); gradients through it would be wrong. Reload the base model."
            )
        layer.support_avx512bf16_for_cpu = False
    return len(layers)
