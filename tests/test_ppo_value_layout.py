"""The critic's layout on the shared base (issue 13, item 3): `value_layout="policy_trunk"` puts the value head on the
policy adapter's last hidden state, so one forward and one backward serve policy and value.

Checked against independent computations: the values are the head applied to the hidden state the policy's own
forward gives; PPO's loss and every gradient equal those of separate policy and value forwards; a training step runs
the decoder once instead of twice; the value role folder holds the head alone. (Resume: tests/test_ppo_trainer.py.)
"""

import pytest
import torch
from test_ppo_trainer import (
    LORA,
    assert_loss_and_gradients_are_ppo_loss,
    independent_policy_terms,
    ppo_args,
    prompts,
    rollout,
)

from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head
from rlhf_ext.testing import fraction_of_a, randomize_lora, tiny_causal_lm
from rlhf_ext.trainers.ppo.trainer import PPOTrainer

CHECKPOINTING = pytest.mark.parametrize("gradient_checkpointing", [True, False], ids=["trl_default_gc", "no_gc"])


@pytest.fixture
def reward_folder(tmp_path):
    donor = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(**LORA))
    randomize_lora(donor.peft_model, "value", seed=3)
    return str(save_adapter_with_head(donor.peft_model, "value", donor.heads["value"], tmp_path / "reward", "reward"))


def trunk_shared(reward_folder=None, **overrides) -> SharedBase:
    args = SharedBaseArguments(value_layout="policy_trunk", reward_adapter_path=reward_folder, **LORA, **overrides)
    return SharedBase(tiny_causal_lm(seed=0), args)


def body_forward_counter(shared: SharedBase) -> list[int]:
    """A one-element list counting the forwards of the decoder body (each role's forward runs it once)."""
    count = [0]
    body = shared.peft_model.get_base_model().base_model
    body.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


# ----------------------------------------------------------------------------- the SharedBase


def test_policy_trunk_values_are_the_value_head_on_the_policy_hidden_state():
    shared = trunk_shared()
    randomize_lora(shared.peft_model, "policy", seed=5)
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        out = shared.peft_model(input_ids=ids, output_hidden_states=True)
        head = shared.heads["value"].linear
        expected = (out.hidden_states[-1] @ head.weight.T + head.bias).squeeze(-1)
        # the policy adapter is what produced that hidden state: with it off, the values would differ
        with shared.role("reference"):
            reference_hidden = shared.peft_model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(shared.values(ids), expected)
    assert (reference_hidden - out.hidden_states[-1]).abs().max() > 1e-3
    assert "value" not in shared.peft_model.peft_config
    assert {id(p) for p in shared.trainable_parameters("value")} == {id(p) for p in shared.heads["value"].parameters()}


def test_captured_hidden_state_gives_the_values_with_their_gradient():
    shared = trunk_shared()
    randomize_lora(shared.peft_model, "policy", seed=5)
    ids = torch.randint(3, 100, (2, 7))
    with shared.capture_last_hidden_state() as hidden:
        logits = shared.policy_logits(ids)
    assert len(hidden) == 1
    fused = shared.heads["value"](hidden[0])
    torch.testing.assert_close(fused, shared.values(ids))
    (fused.sum() + logits.sum()).backward()
    assert shared.heads["value"].linear.weight.grad.abs().max() > 0
    assert all(p.grad is not None for p in shared.trainable_parameters("policy"))


def test_value_role_folder_holds_the_head_and_loads_only_into_the_same_layout(tmp_path):
    shared = trunk_shared()
    torch.nn.init.normal_(shared.heads["value"].linear.weight)
    folder = shared.save_role("value", tmp_path / "value")
    assert {p.name for p in folder.iterdir()} == {"head.safetensors", "head_config.json", "base_fingerprint.json"}

    reloaded = trunk_shared(value_adapter_path=str(folder))
    torch.testing.assert_close(reloaded.heads["value"].linear.weight, shared.heads["value"].linear.weight)
    again = trunk_shared()
    again.load_role("value", folder)
    torch.testing.assert_close(again.heads["value"].linear.weight, shared.heads["value"].linear.weight)
    with pytest.raises(ValueError, match="value_layout='policy_trunk'"):
        SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(value_adapter_path=str(folder), **LORA))

    own = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(**LORA)).save_role("value", tmp_path / "own")
    with pytest.raises(ValueError, match="value_layout='own_adapter'"):
        again.load_role("value", own)


def test_policy_role_reloads_when_it_is_the_only_adapter(tmp_path):
    shared = trunk_shared()
    randomize_lora(shared.peft_model, "policy", seed=5)
    folder = shared.save_role("policy", tmp_path / "policy")
    fresh = trunk_shared()
    fresh.load_role("policy", folder)
    ids = torch.randint(3, 100, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(fresh.policy_logits(ids), shared.policy_logits(ids))
    assert fresh.peft_model.active_adapter == "policy"


def test_unknown_value_layout_is_refused():
    with pytest.raises(ValueError, match="value_layout must be one of"):
        SharedBaseArguments(value_layout="shared")


# ----------------------------------------------------------------------------- the trainer


def layout_trainer(tmp_path, reward_folder, left_tokenizer, value_layout, **overrides):
    args = SharedBaseArguments(value_layout=value_layout, reward_adapter_path=reward_folder, **LORA)
    shared = SharedBase(tiny_causal_lm(seed=0), args)
    randomize_lora(shared.peft_model, "policy", seed=5, scale=0.1)
    config = ppo_args(tmp_path, cliprange_value=0.05, ent_coef=0.01, **overrides)
    trainer = PPOTrainer(
        shared, reward_funcs=fraction_of_a, args=config, train_dataset=prompts(), processing_class=left_tokenizer
    )
    return trainer, shared


@CHECKPOINTING
def test_policy_trunk_loss_and_gradients_equal_separate_policy_and_value_forwards(
    tmp_path, reward_folder, left_tokenizer, gradient_checkpointing
):
    trainer, shared = layout_trainer(
        tmp_path, reward_folder, left_tokenizer, "policy_trunk", gradient_checkpointing=gradient_checkpointing
    )
    batch = rollout(trainer)
    with torch.no_grad():
        _, _, rollout_values = independent_policy_terms(shared, batch)
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(batch["old_values"] * mask, rollout_values * mask, atol=1e-5, rtol=1e-5)

    trainer.model.train()
    got = assert_loss_and_gradients_are_ppo_loss(trainer, shared, batch)
    assert any(n.endswith("heads.value.linear.weight") for n in got)
    assert not any(".lora_" in n and ".value." in n for n in got)  # no value adapter to train


@CHECKPOINTING
@pytest.mark.parametrize(("value_layout", "forwards"), [("policy_trunk", 1), ("own_adapter", 2)])
def test_a_training_step_runs_the_decoder_once_with_the_policy_trunk(
    tmp_path, reward_folder, left_tokenizer, value_layout, forwards, gradient_checkpointing
):
    trainer, shared = layout_trainer(
        tmp_path, reward_folder, left_tokenizer, value_layout, gradient_checkpointing=gradient_checkpointing
    )
    batch = rollout(trainer)
    trainer.model.train()
    count = body_forward_counter(shared)
    trainer._compute_loss(trainer.model, batch).backward()
    assert count[0] == forwards


@CHECKPOINTING
def test_policy_trunk_warmup_trains_only_the_value_head(
    tmp_path, reward_folder, left_tokenizer, gradient_checkpointing
):
    trainer, shared = layout_trainer(
        tmp_path, reward_folder, left_tokenizer, "policy_trunk", value_warmup_steps=1,
        gradient_checkpointing=gradient_checkpointing,
    )  # fmt: skip
    policy = {id(p): p.detach().clone() for p in shared.trainable_parameters("policy")}
    head = shared.heads["value"].linear.weight.detach().clone()
    trainer.train()
    assert all(torch.equal(p, policy[id(p)]) for p in shared.trainable_parameters("policy"))
    assert not torch.equal(shared.heads["value"].linear.weight, head)
