"""The vLLM weight sync of a `SharedBase`: vLLM gets the policy merged into the base, and nothing else.

`merged_adapter_weights` computes the merge on the side (the live base, which is also the reference and the body of
the value and reward roles, is only read); `SharedBaseVLLMGeneration` is TRL's vLLM backend with that weight
iteration. PPO and online K-way re-class the backend GRPOTrainer builds when the model is a shared base.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import dequantize_module_weight
from torch import nn
from trl.generation.vllm_generation import VLLMGeneration

from ..models.policy_head import adapter_view_of, has_own_head, is_modules_to_save_parameter, ties_output_embeddings


def merged_adapter_weights(peft_model: PeftModel, adapter: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter of the base with `adapter` merged in, under transformers' names.

    The merge is computed on the side, W + delta_W(adapter) summed in float32 on the base weight (dequantized on a
    4-bit or 8-bit base) and cast to that weight's dtype, so the live model is only read: its other adapters, its
    active adapter and its base stay exactly as they were. The parameters are the base model's in `named_parameters`
    order, each once (tied weights once, as vLLM expects), without peft's `lora_*` weights and with `.base_layer`
    dropped from the names; nothing attached outside the base (such as the trainer's critic) is included. A module
    `adapter` trains a copy of (`modules_to_save`: the policy's own LM head) is sent as that copy, under its name.
    """
    base = peft_model.get_base_model()
    for name, param in base.named_parameters():
        if ".lora_" in name:  # adapter weights: vLLM has no such parameters; `adapter`'s are merged below
            continue
        if is_modules_to_save_parameter(name):
            view = adapter_view_of(base, name, param.detach(), adapter)  # None: not what `adapter` runs
            if view is not None:
                yield view
            continue
        module_name, _, param_name = name.rpartition(".")
        if param_name != "weight":
            yield name.replace(".base_layer", ""), param.detach()
            continue
        weight = dequantize_module_weight(base.get_submodule(module_name)).detach()
        tuner = _lora_layer_wrapping(base, module_name)
        if tuner is not None and (adapter in tuner.lora_A or adapter in tuner.lora_embedding_A):
            _check_plain_lora(tuner, adapter, module_name)
            weight = (weight.float() + tuner.get_delta_weight(adapter).float()).to(weight.dtype)
        yield name.replace(".base_layer", ""), weight


def _lora_layer_wrapping(base: nn.Module, module_name: str) -> LoraLayer | None:
    """The LoRA layer whose `base_layer` is the module `module_name`, or None for a module peft did not wrap."""
    if not module_name.endswith(".base_layer"):
        return None
    layer = base.get_submodule(module_name.removesuffix(".base_layer"))
    return layer if isinstance(layer, LoraLayer) else None


def _check_plain_lora(tuner: LoraLayer, adapter: str, module_name: str) -> None:
    """Refuse what `W + get_delta_weight` does not merge exactly: LoRA variants (DoRA), LoRA biases, merged layers."""
    if adapter in tuner.lora_variant or tuner.lora_bias.get(adapter, False):
        raise NotImplementedError(
            f"Adapter {adapter!r} of {module_name} is not plain LoRA (DoRA or lora_bias); the shared base's vLLM "
            "weight sync merges plain LoRA only."
        )
    if tuner.merged_adapters:
        raise RuntimeError(f"{module_name} has adapters merged in place ({tuner.merged_adapters}); unmerge them first.")


class SharedBaseVLLMGeneration(VLLMGeneration):
    """TRL's vLLM backend for a `SharedBase`: a weight sync sends the policy merged into the base, nothing else.

    PPOTrainer turns the backend GRPOTrainer builds into this class; only the weight iteration differs, so TRL's
    `sync_weights` (server and colocate modes) and its generation are unchanged. The vLLM path itself is unverified
    until a GPU run (docs/ppo.md); tests/test_ppo_vllm_sync.py checks what is sent, on CPU, with vLLM stood in for.
    """

    def _iter_named_params(self):
        # Replaces VLLMGeneration._iter_named_params (TRL 1.16). For a peft model it merges the *active* adapter into
        # the live base in place, sends every parameter of the trainer's model and unmerges. On a shared base that sends
        # the critic attached as `value_model` (its value and reward heads), sends the value adapter merged if that is
        # the active one, and round-trips the base through merge and unmerge: a bfloat16 base moves by a rounding step
        # per sync and a 4-bit base is requantized (and sent packed), though the base is also the reference and the
        # body of the value and reward roles. Here the policy is merged on the side, by name.
        if self._dist.is_fsdp:
            raise NotImplementedError("The shared base's vLLM weight sync does not support FSDP; use DDP or ZeRO.")
        if has_own_head(self.model, "policy") and ties_output_embeddings(self.model.get_base_model()):
            # vLLM builds a tied model from the base's config and skips a sent `lm_head.weight`: it would sample with
            # the reference's head while the trainer scores with the policy's.
            raise NotImplementedError(
                "policy_lm_head='trainable' on a base with tie_word_embeddings=True cannot be synced to vLLM, which "
                "ties lm_head to embed_tokens and ignores a sent lm_head.weight; generate without vLLM, or serve an "
                "untied copy of the base (export_merged_policy writes one)."
            )
        with self._dist.gather_params(list(self.model.parameters())):  # ZeRO-3: the whole model, as TRL gathers it
            for name, tensor in merged_adapter_weights(self.model, "policy"):
                yield self._fix_param_name_to_vllm(name), tensor
