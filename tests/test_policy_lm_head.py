"""`SharedBaseArguments(policy_lm_head="trainable")`: a copy of the LM head that trains with the policy role only.

What it must do: train (non-zero gradient, in the policy's trainable set across role switches); leave the reference
(adapters off), value and reward roles on the original head, also when the base ties its LM head to its embeddings;
save and load with the policy role; merge into `export_merged_policy`; be what the vLLM sync sends for the LM head;
resume exactly in PPOTrainer; and be counted by `rlhf_ext.memory`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_ext.memory import estimate
from rlhf_ext.models import SharedBase, SharedBaseArguments
from rlhf_ext.testing import randomize_lora, tiny_causal_lm, tiny_llama_config
from rlhf_ext.trainers.vllm_sync import merged_adapter_weights

LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)
TIED = pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied_embeddings"])


def build(tied: bool, **overrides) -> SharedBase:
    args = SharedBaseArguments(**LORA, policy_lm_head="trainable", **overrides)
    return SharedBase(tiny_causal_lm(seed=0, tie_word_embeddings=tied), args)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 101, (2, 7), generator=torch.Generator().manual_seed(5))
    return ids, torch.ones_like(ids)


def head_copy(shared: SharedBase) -> torch.nn.Parameter:
    """The policy's LM head weight: peft's copy of the head for the policy adapter."""
    (param,) = [p for n, p in shared.peft_model.named_parameters() if "lm_head.modules_to_save.policy." in n]
    return param


def train_one_step(shared: SharedBase) -> None:
    """One AdamW step on -mean policy log-prob + mean value: "policy forward, value forward, one backward"."""
    optimizer = torch.optim.AdamW(shared.trainable_parameters(), lr=1e-2)
    ids, mask = batch()
    loss = -shared.policy_logits(ids, mask).log_softmax(-1).mean() + shared.values(ids, mask).mean()
    loss.backward()
    assert head_copy(shared).grad is not None and head_copy(shared).grad.abs().sum() > 0
    optimizer.step()


def test_default_is_the_frozen_shared_head():
    assert SharedBaseArguments().policy_lm_head == "frozen"
    with pytest.raises(ValueError, match="policy_lm_head"):
        SharedBaseArguments(policy_lm_head="lora")


@TIED
def test_head_copy_trains_with_the_policy_only(tied):
    shared = build(tied)
    assert any(p is head_copy(shared) for p in shared.trainable_parameters("policy"))
    assert not any(p is head_copy(shared) for p in shared.trainable_parameters("value"))
    plain = tiny_causal_lm(seed=0, tie_word_embeddings=tied)
    ids, mask = batch()
    train_one_step(shared)
    # requires_grad survives the role switches of the step, so a second step trains it too
    assert head_copy(shared).requires_grad
    base = shared.peft_model.get_base_model()
    torch.testing.assert_close(base.model.embed_tokens.weight, plain.model.embed_tokens.weight, rtol=0, atol=0)
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(shared.reference_logits(ids, mask), expected)  # the reference keeps the base's head
        assert not torch.allclose(shared.policy_logits(ids, mask), expected)


@TIED
def test_value_and_reward_roles_read_the_original_head(tied):
    shared = build(tied)
    with torch.no_grad():
        head_copy(shared).add_(1.0)
    original = shared.peft_model.get_base_model().model.embed_tokens.weight if tied else None
    for role in ("value", "reference"):
        with shared.role(role) as model:
            weight = model.get_output_embeddings().weight
            assert weight is not head_copy(shared)
            if tied:
                assert weight is original


def test_head_copy_is_saved_and_loaded_with_the_policy_role(tmp_path):
    shared = build(tied=True)
    randomize_lora(shared.peft_model, "policy", seed=1)
    with torch.no_grad():
        head_copy(shared).add_(0.3 * torch.randn_like(head_copy(shared)))
    shared.save_role("policy", tmp_path / "policy")
    ids, mask = batch()
    expected = shared.policy_logits(ids, mask).detach()

    loaded = SharedBase(tiny_causal_lm(seed=0, tie_word_embeddings=True),
                        SharedBaseArguments(**LORA, policy_adapter_path=str(tmp_path / "policy")))  # fmt: skip
    assert torch.equal(loaded.policy_logits(ids, mask), expected)
    reloaded = build(tied=True)
    reloaded.load_role("policy", tmp_path / "policy")
    assert torch.equal(reloaded.policy_logits(ids, mask), expected)
    assert any(p is head_copy(reloaded) for p in reloaded.trainable_parameters("policy"))


@TIED
def test_export_merged_policy_has_the_policy_head(tmp_path, tied):
    shared = build(tied)
    randomize_lora(shared.peft_model, "policy", seed=1)
    train_one_step(shared)
    ids, mask = batch()
    directory = shared.export_merged_policy(tmp_path / "merged", base=tiny_causal_lm(seed=0, tie_word_embeddings=tied))
    exported = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids, attention_mask=mask).logits, shared.policy_logits(ids, mask),
                                   rtol=0, atol=1e-5)  # fmt: skip
    plain = tiny_causal_lm(seed=0, tie_word_embeddings=tied)
    assert torch.equal(exported.model.embed_tokens.weight, plain.model.embed_tokens.weight)  # input side untouched


@TIED
def test_vllm_sync_tensors_are_the_merged_copy(tmp_path, tied):
    shared = build(tied)
    randomize_lora(shared.peft_model, "policy", seed=1)
    train_one_step(shared)
    fresh = tiny_causal_lm(seed=0, tie_word_embeddings=tied)
    expected = dict(AutoModelForCausalLM.from_pretrained(
        shared.export_merged_policy(tmp_path / "merged", base=fresh)).named_parameters())  # fmt: skip
    sent = dict(merged_adapter_weights(shared.peft_model, "policy"))
    assert list(sent) == list(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(sent[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert torch.equal(sent["lm_head.weight"], head_copy(shared))


def test_memory_estimate_counts_the_head_copy_and_its_optimizer_state():
    config = tiny_llama_config(vocab_size=1000, hidden_size=64)
    frozen = estimate(config, bits=32, device="cpu")
    trainable = estimate(config, bits=32, device="cpu", policy_lm_head="trainable")
    # float32 weight + float32 gradient + AdamW's two float32 moments = 16 bytes per weight
    assert trainable.adapters_optimizer - frozen.adapters_optimizer == 1000 * 64 * 16
    assert trainable.total - frozen.total == 1000 * 64 * 16
    bf16 = estimate(config, bits=16, device="cuda", policy_lm_head="trainable")
    assert bf16.adapters_optimizer - estimate(config, bits=16, device="cuda").adapters_optimizer == 1000 * 64 * 8


@pytest.mark.parametrize("gradient_checkpointing", [True, False])  # True: TRL's default
def test_ppo_resume_with_the_head_copy_equals_straight_run(tmp_path, left_tokenizer, gradient_checkpointing):
    from test_ppo_trainer import assert_same_trained_weights, prompts, straight_and_resumed

    from rlhf_ext.testing import fraction_of_a
    from rlhf_ext.trainers.ppo.trainer import PPOTrainer

    def build_trainer(args, callbacks):
        shared = build(tied=True)
        trainer = PPOTrainer(shared, reward_funcs=fraction_of_a, args=args, train_dataset=prompts(16),
                             processing_class=left_tokenizer, callbacks=callbacks)  # fmt: skip
        return shared, trainer

    straight, resumed = straight_and_resumed(
        tmp_path, build_trainer, stop_after=2, max_steps=4, num_ppo_epochs=2, learning_rate=3e-3,
        gradient_checkpointing=gradient_checkpointing,
    )  # fmt: skip
    plain = tiny_causal_lm(seed=0, tie_word_embeddings=True).lm_head.weight
    assert not torch.equal(head_copy(straight), plain)  # it trained
    assert_same_trained_weights(straight, resumed)  # the head copy is one of the trained weights compared
    ids, mask = batch()
    plain_logits = tiny_causal_lm(seed=0, tie_word_embeddings=True)(ids).logits
    assert torch.equal(resumed.reference_logits(ids, mask), plain_logits)


@pytest.mark.parametrize("mode", ["server", "colocate"])
def test_trainer_vllm_sync_sends_the_merged_copy(tmp_path, monkeypatch, mode):
    from test_ppo_vllm_sync import assert_sent_is, install_recorder_instead_of_vllm, sent_on_sync, vllm_trainer
    from trl.generation.vllm_generation import VLLMGeneration

    monkeypatch.setattr(VLLMGeneration, "_init_vllm", install_recorder_instead_of_vllm)
    shared = build(tied=False)
    randomize_lora(shared.peft_model, "policy", seed=1)
    with torch.no_grad():
        head_copy(shared).add_(0.3 * torch.randn_like(head_copy(shared)))
    sent = sent_on_sync(vllm_trainer(shared, tmp_path, mode))
    directory = shared.export_merged_policy(tmp_path / "merged", base=tiny_causal_lm(seed=0))
    assert_sent_is(sent, AutoModelForCausalLM.from_pretrained(directory).state_dict(), rtol=0, atol=1e-6)
    assert torch.equal(sent["lm_head.weight"], head_copy(shared))


def test_trainer_vllm_sync_refuses_a_head_copy_on_a_tied_base(tmp_path, monkeypatch):
    # vLLM would skip the sent lm_head.weight of a tied model and sample with the reference's head
    from test_ppo_vllm_sync import install_recorder_instead_of_vllm, vllm_trainer
    from trl.generation.vllm_generation import VLLMGeneration

    monkeypatch.setattr(VLLMGeneration, "_init_vllm", install_recorder_instead_of_vllm)
    trainer = vllm_trainer(build(tied=True), tmp_path, "colocate")
    with pytest.raises(NotImplementedError, match="tie_word_embeddings"):
        trainer.vllm_generation.sync_weights()


@pytest.mark.parametrize("value_lora_embeddings", [False, True])
def test_all_linear_value_lora_stays_off_the_policys_head_copy(tmp_path, value_lora_embeddings):
    # "all-linear" expanded on the base the policy already wraps found the head copy's inner Linears, put value LoRA
    # in them, and saving the policy failed with a KeyError
    args = SharedBaseArguments(lora_r=4, lora_alpha=8, lora_target_modules="all-linear", policy_lm_head="trainable",
                               value_lora_embeddings=value_lora_embeddings)
    shared = SharedBase(tiny_causal_lm(seed=0), args)
    names = [name for name, _ in shared.peft_model.named_parameters()]
    assert not [name for name in names if "lm_head" in name and ".value." in name]
    assert any(".lora_A.value." in name for name in names)  # the value role still has its LoRA elsewhere
    shared.save_role("policy", tmp_path / "policy")
    assert (tmp_path / "policy" / "adapter_model.safetensors").is_file()
