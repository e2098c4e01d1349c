"""Training on a 4-bit or 8-bit base: the CPU repacking guard and QLoRA's preparation.

The repacking guard:

bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a Linear4bit's weight into an inference-only
layout on its first forward in eval mode without grad (exactly a PPO rollout). From then on every
forward of that layer goes through an op with no autograd formula, so gradients of the LoRA
adapters below it are silently wrong, and `state_dict()` un-packs a lossy copy (absmax rounded
to bf16). The layer decides this from its `support_avx512bf16_for_cpu` flag, set at construction
from the CPU; turning it off keeps the trainable layout. It costs the fast CPU inference kernel,
which a model being trained cannot use anyway.
"""

from __future__ import annotations

import torch
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


# -- k-bit training, as QLoRA does it --------------------------------------------------------------


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` (or the model a peft wrapper holds) was loaded in 4 or 8 bits by bitsandbytes."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the base computes in: that of its unquantized weights (the input embeddings, loaded in `--dtype`)."""
    return model.get_input_embeddings().weight.dtype


def adapter_dtype_for(model: nn.Module) -> torch.dtype:
    """The dtype trainable adapters of a quantized base are kept in: bfloat16 when the base computes in bfloat16
    (QLoRA, section 3), else float32 (float16 master weights lose Adam's small updates)."""
    return torch.bfloat16 if compute_dtype(model) == torch.bfloat16 else torch.float32


def _output_in_input_dtype(module: nn.Module, args: tuple, output):
    # A float32 norm would turn the bfloat16 residual stream into float32 for the rest of the network (twice the
    # activation memory); the normalisation is done in float32, the activations stay in the compute dtype.
    if args and torch.is_tensor(args[0]) and torch.is_tensor(output):
        return output.to(args[0].dtype)
    return output


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the normalisation layers (LayerNorm, RMSNorm and their per-architecture classes)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module).__name__.endswith(("Norm", "RMSNorm", "LayerNorm"))
        and isinstance(getattr(module, "weight", None), torch.nn.Parameter)
    ]


def prepare_kbit_base(model: nn.Module) -> int:
    """Prepare a 4-bit or 8-bit base for LoRA training as QLoRA does; returns the number of norm layers cast.

    - normalisation weights in float32 (their output cast back to the compute dtype), as peft's
      `prepare_model_for_kbit_training` and the QLoRA paper keep them;
    - gradients on the input embeddings' output, which reentrant checkpointing needs to reach the adapters;
    - nothing else is upcast: peft's helper casts every unquantized weight (embeddings, LM head) to float32,
      which at 1B+ parameters costs more memory than the 4-bit layers save.
    Idempotent; a model that is not quantized is left alone.
    """
    if not is_quantized(model):
        return 0
    layers = norm_layers(model)
    for _, module in layers:
        if module.weight.dtype != torch.float32:
            module.float()
            module.register_forward_hook(_output_in_input_dtype)
    model.enable_input_require_grads()
    return len(layers)


def match_trainable_dtype(model: nn.Module) -> int:
    """On a 4-bit or 8-bit base, put the trainable weights back in the dtype the base computes in; returns how many
    were cast. Also keeps bitsandbytes from repacking 4-bit layers for CPU inference (which breaks their gradients).

    TRL's trainers cast every trainable parameter of a quantized model to bfloat16 (QLoRA's adapters), whatever the
    compute dtype. LoRA layers cast their input and survive that, but a trained plain module does not: the reward
    model's score head then multiplies float32 hidden states by bfloat16 weights and fails at step 1 ("expected m1
    and m2 to have the same dtype") unless --dtype bfloat16. So the trainable weights follow the base, as the shared
    base keeps them: bfloat16 when it computes in bfloat16, float32 otherwise.
    """
    if not is_quantized(model):
        return 0
    disable_cpu_4bit_repacking(model)
    dtype = adapter_dtype_for(model.get_base_model() if hasattr(model, "get_base_model") else model)
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)  # in place: the parameter objects (and any optimizer's view) stay
            cast += 1
    return cast
