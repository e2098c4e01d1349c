"""The policy's own trainable LM head (`SharedBaseArguments(policy_lm_head="trainable")`), held by peft.

peft's `modules_to_save` wraps the LM head in a `ModulesToSaveWrapper` holding the original module and one copy per
adapter that asked for it; the copy runs only while that adapter is active. Its parameters are named
`lm_head.original_module.weight` and `lm_head.modules_to_save.<adapter>.weight`; these helpers map them back to the
transformers name (`lm_head.weight`) for what leaves the live model (the vLLM sync).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_WRAPPED = re.compile(r"^(?P<wrapper>.*)\.(?P<kind>original_module|modules_to_save)\.(?P<rest>.+)$")


def is_modules_to_save_parameter(name: str) -> bool:
    """Whether `name` is a parameter of a peft `ModulesToSaveWrapper` (the original module or a copy)."""
    return _WRAPPED.match(name) is not None


def adapter_view_of(base: nn.Module, name: str, param: torch.Tensor, adapter: str) -> tuple[str, torch.Tensor] | None:
    """(transformers name, tensor) of wrapper parameter `name` as the model with only `adapter` sees it, or None.

    With `adapter` active the wrapper runs `adapter`'s copy if it has one, else the original module; so that one is
    returned under the unwrapped name (`lm_head.weight`) and the other copies and the replaced original are None.
    """
    match = _WRAPPED.match(name)
    wrapper = base.get_submodule(match["wrapper"])
    has_copy = adapter in wrapper.modules_to_save
    if match["kind"] == "original_module":
        return None if has_copy else (f"{match['wrapper']}.{match['rest']}", param)
    owner, _, param_name = match["rest"].partition(".")
    return (f"{match['wrapper']}.{param_name}", param) if owner == adapter else None


def has_own_head(peft_model: nn.Module, adapter: str) -> bool:
    """Whether `adapter` trains its own copy of a module (the policy's LM head with policy_lm_head="trainable")."""
    return bool(getattr(peft_model.peft_config[adapter], "modules_to_save", None))


def ties_output_embeddings(model: nn.Module) -> bool:
    """Whether `model`'s config ties its LM head to the input embeddings."""
    return bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))


@contextmanager
def copying_a_tied_head() -> Iterator[None]:
    """Silence peft's warning that a tied layer is adapted without `ensure_weight_tying`: untying only the policy's
    copy of the LM head (or only the value role's LoRA on the embeddings) is the intent; the reference and the other
    roles keep the tied original."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")
        yield
