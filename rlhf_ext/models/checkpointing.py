"""Gradient checkpointing that recomputes each layer with the adapters it first ran with.

A checkpointed layer keeps only its inputs during the forward and runs again during backward to
rebuild its activations. peft selects an adapter through state on every LoRA layer (the active
adapter, and whether adapters are disabled), so the recompute reads that state at *backward*
time. On a shared base, one backward follows several forwards under different roles ("policy
forward, value forward, one backward"): every layer of the value forward would be recomputed
with the policy adapter, and the value adapter would get the gradient of the wrong function.
No error, no warning, and grad norms look normal. The same holds for any peft model whose
adapter changes between a forward and its backward.

`adapter_state_checkpointing(model)` fixes that for every way checkpointing can be turned on
(`model.gradient_checkpointing_enable()`, `activation_checkpointing_enable()`, transformers'
Trainer, TRL's re-enabling after generation): each checkpointed layer records its LoRA layers'
adapter state when it first runs, and its recompute runs with that state and restores the
current one afterwards. This works for both of torch's checkpoint implementations
(`use_reentrant=True` and `False`), because the state is set inside the function that torch
recomputes, rather than through `context_fn`, which only the non-reentrant one has.

Why the instance hook: transformers installs `_gradient_checkpointing_func` on every layer from
`PreTrainedModel._set_gradient_checkpointing`, the one method all its enable paths reach, and TRL
disables and re-enables checkpointing around every generation. Wrapping the functions once would
be undone at the next step; wrapping `_set_gradient_checkpointing` on the instance keeps every
later enable exact. The adapter state is peft's `BaseTunerLayer._active_adapter` and
`_disable_adapters`, written directly: `set_adapter` and `enable_adapters` would also flip
requires_grad on the adapters, and a leaf whose requires_grad is off when backward reaches it
silently gets no gradient (tests/test_trl_signatures.py checks that these attributes exist).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from contextlib import contextmanager

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel

_MARK = "_rlhf_ext_adapter_state_checkpointing"


def tuner_layers(module: nn.Module) -> list[BaseTunerLayer]:
    """The peft tuner layers (LoRA-wrapped projections) inside `module`, in module order."""
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


AdapterState = list[tuple[BaseTunerLayer, object, bool]]


def adapter_state(layers: list[BaseTunerLayer]) -> AdapterState:
    """(layer, active adapter(s), adapters disabled) of each tuner layer: what selects a role."""
    return [(layer, layer._active_adapter, layer._disable_adapters) for layer in layers]


@contextmanager
def adapter_state_applied(state: AdapterState):
    """Run the block with `state` set on its layers; the state they had before is restored on exit.

    Writes the private attributes, never `set_adapter`, so requires_grad stays what the trainer set.
    """
    current = adapter_state([layer for layer, _, _ in state])
    try:
        for layer, active, disabled in state:
            layer._active_adapter, layer._disable_adapters = active, disabled
        yield
    finally:
        for layer, active, disabled in current:
            layer._active_adapter, layer._disable_adapters = active, disabled


class AdapterStateCheckpoint:
    """A layer's `_gradient_checkpointing_func` that recomputes with the adapter state of the first run.

    `checkpoint_function` is what transformers would have installed (`torch.utils.checkpoint.checkpoint`
    with the user's kwargs, e.g. use_reentrant); the layer's forward is wrapped so that the call torch makes
    again during backward sets the adapter state recorded now. On the first run the state is already the
    recorded one, so the forward is unchanged.
    """

    def __init__(self, layer: nn.Module, checkpoint_function: Callable):
        self.layer = layer
        self.checkpoint_function = checkpoint_function

    def __call__(self, function: Callable, *args, **kwargs):
        state = adapter_state(tuner_layers(self.layer))
        if not state:
            return self.checkpoint_function(function, *args, **kwargs)

        def run_with_recorded_adapters(*inner_args, **inner_kwargs):
            with adapter_state_applied(state):
                return function(*inner_args, **inner_kwargs)

        return self.checkpoint_function(run_with_recorded_adapters, *args, **kwargs)


def wrap_checkpointed_layers(model: nn.Module) -> None:
    """Wrap the checkpoint function of every layer of `model` that checkpoints in an `AdapterStateCheckpoint`."""
    for module in model.modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        checkpoints = getattr(module, "gradient_checkpointing", False) and function is not None
        if checkpoints and not isinstance(function, AdapterStateCheckpoint):
            module._gradient_checkpointing_func = AdapterStateCheckpoint(module, function)


def _set_gradient_checkpointing_with_adapter_state(self: PreTrainedModel, *args, **kwargs):
    # The class's own method installs a fresh checkpoint function on every layer; then each gets wrapped.
    type(self)._set_gradient_checkpointing(self, *args, **kwargs)
    wrap_checkpointed_layers(self)


def adapter_state_checkpointing(model: nn.Module) -> nn.Module:
    """Make gradient checkpointing of `model` recompute every layer with the adapters it ran with; returns `model`.

    `model` is a transformers model or a peft model wrapping one. Applies to checkpointing turned on before
    (wrapped now) and after this call. Idempotent; a model without checkpointing support is left alone.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel) or not base.supports_gradient_checkpointing:
        return model
    if not getattr(base, _MARK, False):
        # A bound method, so that deepcopy (e.g. a frozen reference copy) binds the copy to itself.
        base._set_gradient_checkpointing = types.MethodType(_set_gradient_checkpointing_with_adapter_state, base)
        setattr(base, _MARK, True)
    wrap_checkpointed_layers(base)
    return model
