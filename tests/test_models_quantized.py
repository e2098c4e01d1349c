"""A 4-bit shared base: LoRA gradients after a rollout-style forward, and the repacking guard.

bitsandbytes sets `support_avx512bf16_for_cpu` on each Linear4bit from the CPU it runs on; the
tests set it to True by hand, as an AVX512-BF16 CPU would, so they exercise the failure on any CPU.
With the guard removed (SharedBase not calling disable_cpu_4bit_repacking), the gradient test
fails on an AVX2 CPU with a LoRA gradient relative error of 0.87.
"""

import dataclasses

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from bitsandbytes.nn import Linear4bit
from transformers import AutoModelForCausalLM

from rlhf_ext.models import SharedBase, SharedBaseArguments, load_base_model
from rlhf_ext.testing import save_tiny_model

ARGS_4BIT = SharedBaseArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0, load_in_4bit=True)


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    # hidden 64: a multiple of bitsandbytes' 4-bit block size
    return save_tiny_model(tmp_path_factory.mktemp("base"), seed=0, hidden_size=64)


def quantized_base_as_on_avx512(path: str):
    """The 4-bit base with every layer flagged for CPU repacking, as bitsandbytes does on AVX512-BF16."""
    model = load_base_model(dataclasses.replace(ARGS_4BIT, model_name_or_path=path))
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers, "the base should have been quantized"
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    return model


def fp32_copy_with_dequantized_weights(path: str, quantized) -> torch.nn.Module:
    """The same base in float32, holding exactly the weights the 4-bit layers represent."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, Linear4bit):
                weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
                model.get_submodule(name).weight.copy_(weight.float())
    return model


def copy_adapters(source: SharedBase, target: SharedBase, seed: int = 1) -> None:
    """Give both containers the same random LoRA weights (lora_B starts at 0, which hides the adapters)."""
    generator = torch.Generator().manual_seed(seed)
    target_params = dict(target.peft_model.named_parameters())
    with torch.no_grad():
        for name, param in source.peft_model.named_parameters():
            if ".lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
                target_params[name].copy_(param)
        target.heads["value"].load_state_dict(source.heads["value"].state_dict())


def ppo_step_gradients(shared: SharedBase, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Rollout (eval mode, no grad: reference, policy, values), then one training backward; returns grads."""
    shared.eval()
    with torch.no_grad():
        shared.reference_logits(input_ids)
        shared.policy_logits(input_ids)
        shared.values(input_ids)
    shared.train()
    loss = shared.policy_logits(input_ids).logsumexp(-1).mean() + shared.values(input_ids).square().mean()
    loss.backward()
    return [p.grad for p in shared.trainable_parameters()]


def test_lora_gradients_on_4bit_base_match_a_dequantized_fp32_copy_after_a_rollout(base_path):
    quantized = quantized_base_as_on_avx512(base_path)
    reference = fp32_copy_with_dequantized_weights(base_path, quantized)
    shared_4bit = SharedBase(quantized, ARGS_4BIT)
    shared_fp32 = SharedBase(reference, SharedBaseArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    copy_adapters(shared_4bit, shared_fp32)
    input_ids = torch.randint(3, 101, (2, 10), generator=torch.Generator().manual_seed(0))

    grads_4bit = torch.cat([g.flatten() for g in ppo_step_gradients(shared_4bit, input_ids)])
    grads_fp32 = torch.cat([g.flatten() for g in ppo_step_gradients(shared_fp32, input_ids)])

    relative_error = (grads_4bit - grads_fp32).norm() / grads_fp32.norm()
    assert relative_error < 1e-4
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in quantized.modules() if isinstance(m, Linear4bit))


def test_guard_refuses_a_base_already_repacked_by_an_eval_forward(base_path):
    quantized = quantized_base_as_on_avx512(base_path)
    quantized.eval()
    with torch.no_grad():
        quantized(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match=r"model\.layers\.0\..*repacked"):
        SharedBase(quantized, ARGS_4BIT)


def test_from_pretrained_loads_4bit_once_with_repacking_off(base_path):
    shared = SharedBase.from_pretrained(base_path, ARGS_4BIT)
    layers = [m for m in shared.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 2 * 7  # every projection of the 2 layers is quantized, the LM head is not
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers)
    assert shared.values(torch.tensor([[5, 6, 7]])).shape == (1, 3)


def test_8bit_base_trains_both_adapters_and_its_reference_tracks_the_fp32_base(base_path):
    from bitsandbytes.nn import Linear8bitLt

    shared = SharedBase.from_pretrained(base_path, SharedBaseArguments(lora_r=4, load_in_8bit=True))
    assert any(isinstance(m, Linear8bitLt) for m in shared.modules())
    input_ids = torch.tensor([[5, 6, 7, 8, 9]])
    (shared.policy_logits(input_ids).logsumexp(-1).mean() + shared.values(input_ids).sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in shared.trainable_parameters())

    fp32_logits = AutoModelForCausalLM.from_pretrained(base_path)(input_ids).logits
    relative_error = (shared.reference_logits(input_ids) - fp32_logits).norm() / fp32_logits.norm()
    assert relative_error < 0.05  # int8 rounding, not a different model


def dequantized_8bit_copy(path: str, quantized) -> torch.nn.Module:
    """The base in float32 holding exactly the weights the int8 layers represent: W = CB * SCB / 127 per row."""
    from bitsandbytes.nn import Linear8bitLt

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, Linear8bitLt):
                weight = module.weight
                model.get_submodule(name).weight.copy_(weight.data.float() * weight.SCB.float()[:, None] / 127)
    return model


def test_lora_gradients_on_8bit_base_match_a_dequantized_fp32_copy_after_a_rollout(base_path):
    args_8bit = dataclasses.replace(ARGS_4BIT, load_in_4bit=False, load_in_8bit=True, model_name_or_path=base_path)
    quantized = load_base_model(args_8bit)
    reference = dequantized_8bit_copy(base_path, quantized)
    shared_8bit = SharedBase(quantized, args_8bit)
    shared_fp32 = SharedBase(reference, SharedBaseArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    copy_adapters(shared_8bit, shared_fp32)
    input_ids = torch.randint(3, 101, (2, 10), generator=torch.Generator().manual_seed(0))

    grads_8bit = torch.cat([g.flatten() for g in ppo_step_gradients(shared_8bit, input_ids)])
    grads_fp32 = torch.cat([g.flatten() for g in ppo_step_gradients(shared_fp32, input_ids)])
    # 1.7e-6 measured: bitsandbytes' CPU backend dequantizes the int8 weight (a GPU also quantizes activations)
    assert (grads_8bit - grads_fp32).norm() / grads_fp32.norm() < 1e-4


@pytest.mark.parametrize("bits", [4, 8])
def test_kbit_base_is_prepared_as_qlora_does_without_upcasting_the_base(base_path, bits):
    args = dataclasses.replace(ARGS_4BIT, load_in_4bit=bits == 4, load_in_8bit=bits == 8, dtype="bfloat16")
    shared = SharedBase.from_pretrained(base_path, args)
    base = shared.peft_model.get_base_model()
    dtypes = {name: p.dtype for name, p in base.named_parameters()}
    norms = [n for n in dtypes if "norm" in n]
    assert norms and all(dtypes[n] == torch.float32 for n in norms)
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16 and base.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in shared.trainable_parameters("policy")} == {torch.bfloat16}  # QLoRA: adapters in bf16
    assert {p.dtype for p in shared.heads.parameters()} == {torch.float32}
    hidden = []
    base.model.layers[0].register_forward_hook(lambda module, args, out: hidden.append(out))
    shared.train()
    values = shared.values(torch.tensor([[5, 6, 7, 8]]))
    output = hidden[0][0] if isinstance(hidden[0], tuple) else hidden[0]
    assert output.dtype == torch.bfloat16, "the float32 norms must not turn the activations into float32"
    assert values.dtype == torch.float32
    values.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in shared.trainable_parameters("value"))


def test_float32_compute_keeps_float32_adapters(base_path):
    shared = SharedBase.from_pretrained(base_path, ARGS_4BIT)
    assert {p.dtype for p in shared.trainable_parameters()} == {torch.float32}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_on_a_4bit_base_gives_the_plain_gradients(base_path, use_reentrant):
    def gradients(checkpointing: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)  # the same value head in both runs
        shared = SharedBase.from_pretrained(base_path, ARGS_4BIT)
        copy_adapters(shared, shared)
        if checkpointing:
            shared.enable_gradient_checkpointing(use_reentrant=use_reentrant)
        return ppo_step_gradients(shared, torch.randint(3, 101, (2, 10), generator=torch.Generator().manual_seed(0)))

    expected, got = gradients(False), gradients(True)
    for g, e in zip(got, expected, strict=True):
        assert (g - e).norm() <= 1e-5 * e.norm()
