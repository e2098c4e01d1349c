"""Gradient checkpointing on the shared base gives the gradients of the same step without it.

The failure this guards against: a checkpointed layer recomputes its forward during backward with
the adapter active at backward time. "Policy forward, value forward, one backward" then trains the
value adapter with the gradient of the policy's function (relative error > 1 with use_reentrant=False;
no value gradient at all and a wrong policy gradient with use_reentrant=True). Without
`adapter_state_checkpointing` every test here fails.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from rlhf_ext.models import SharedBase, SharedBaseArguments, adapter_state_checkpointing
from rlhf_ext.testing import tiny_causal_lm

LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.1)  # dropout on: the recompute must replay its masks too
IDS = torch.tensor([[5, 9, 23, 41, 7, 12, 3, 2], [0, 0, 17, 8, 33, 5, 61, 2]])
MASK = torch.tensor([[1] * 8, [0, 0] + [1] * 6])


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm().clamp(min=1e-30)).item()


def randomize_adapters(shared: SharedBase, seed: int = 1) -> None:
    """Random LoRA weights (peft starts lora_B at 0, under which policy and value compute the same function)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in shared.peft_model.named_parameters():
            if ".lora_" in name:
                param.copy_((0.3 * torch.randn(param.shape, generator=generator)).to(param.dtype))


def make_shared(dtype=torch.float32) -> SharedBase:
    shared = SharedBase(tiny_causal_lm(seed=0).to(dtype), SharedBaseArguments(**LORA))
    randomize_adapters(shared)
    return shared.train()


def shared_step_gradients(shared: SharedBase) -> dict[str, torch.Tensor]:
    """Gradients of one PPO-shaped training step: policy forward, value forward, one backward."""
    shared.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same LoRA dropout masks in every run
    logits = shared.policy_logits(IDS, MASK)
    values = shared.values(IDS, MASK)
    loss = logits.float().log_softmax(-1)[..., 11].mean() + (values - 1.0).pow(2).mean()
    loss.backward()
    named = {f"heads.{n}": p for n, p in shared.heads.named_parameters()} | dict(shared.peft_model.named_parameters())
    trainable = {id(p) for p in shared.trainable_parameters()}
    return {n: p.grad.clone() for n, p in named.items() if id(p) in trainable and p.grad is not None}


def assert_same_gradients(got: dict, expected: dict, tolerance: float) -> None:
    assert expected.keys() == got.keys(), f"gradients missing with checkpointing: {sorted(expected.keys() - got)[:3]}"
    assert any(".value." in n for n in expected) and any(".policy." in n for n in expected)
    errors = {name: relative_error(got[name], expected[name]) for name in expected}
    worst = max(errors, key=errors.get)
    assert errors[worst] < tolerance, f"{worst}: relative error {errors[worst]:.3g}"


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpointed_step_has_the_gradients_of_the_plain_step(use_reentrant, dtype):
    expected = shared_step_gradients(make_shared(dtype))
    shared = make_shared(dtype)
    shared.enable_gradient_checkpointing(use_reentrant=use_reentrant)
    assert shared.is_gradient_checkpointing
    assert_same_gradients(shared_step_gradients(shared), expected, tolerance=1e-5 if dtype == torch.float32 else 1e-2)


def test_checkpointing_turned_on_through_transformers_is_exact_too():
    """Trainer, TRL and users call the base's own enable method (TRL again after every generation)."""
    expected = shared_step_gradients(make_shared())
    shared = make_shared()
    base = shared.peft_model.get_base_model()
    base.gradient_checkpointing_enable({"use_reentrant": False})
    base.gradient_checkpointing_disable()
    shared.peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same_gradients(shared_step_gradients(shared), expected, tolerance=1e-5)


def test_checkpointing_really_recomputes():
    """The layers run again during backward, so the equality above is not two plain runs compared."""
    shared = make_shared()
    shared.enable_gradient_checkpointing()
    calls = []
    # transformers checkpoints a layer's forward, not its __call__: hook a projection inside it
    projection = shared.peft_model.get_base_model().model.layers[0].self_attn.q_proj
    projection.register_forward_hook(lambda *a: calls.append(a))
    shared_step_gradients(shared)
    assert len(calls) == 4  # policy and value forwards, then both recomputes


def test_plain_peft_model_with_two_adapters_switched_between_forwards():
    """Not only the shared base: any peft model whose adapter changes between forward and backward."""

    def activate(model, adapter: str, lora: dict) -> None:
        model.set_adapter(adapter)
        for param in lora.values():  # peft's set_adapter freezes the other adapter; both train here
            param.requires_grad_(True)

    def gradients(checkpointing: bool) -> dict:
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
        model = get_peft_model(tiny_causal_lm(seed=0), config, adapter_name="a")
        model.add_adapter("b", config)
        adapter_state_checkpointing(model).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
        activate(model, "a", lora)
        first = model(input_ids=IDS).logits.mean()
        activate(model, "b", lora)
        second = model(input_ids=IDS).logits.pow(2).mean()
        (first + second).backward()
        return {n: p.grad.clone() for n, p in lora.items()}

    expected, got = gradients(False), gradients(True)
    assert expected.keys() == got.keys() and any(".a." in n for n in got) and any(".b." in n for n in got)
    for name in expected:
        assert relative_error(got[name], expected[name]) < 1e-5, name
