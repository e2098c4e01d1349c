"""`SharedBaseArguments(value_lora_embeddings=True)`: a LoRA adapter on the input embeddings, in the value role only.

What it must do: train (gradient reaches it, in the value's trainable set across role switches, not the policy's);
leave the policy, reference and reward roles on the base's embeddings, also when the base ties its LM head to them;
save and load with the value role (identical values); stay out of what the vLLM sync sends; be refused where the value
role has no adapter of its own (policy_trunk); and resume exactly in PPOTrainer.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_ext.models import SharedBase, SharedBaseArguments
from rlhf_ext.testing import randomize_lora, tiny_causal_lm
from rlhf_ext.trainers.vllm_sync import merged_adapter_weights

LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)
TIED = pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied_embeddings"])


def build(tied: bool = False, **overrides) -> SharedBase:
    args = SharedBaseArguments(**LORA, **{"value_lora_embeddings": True, **overrides})
    return SharedBase(tiny_causal_lm(seed=0, tie_word_embeddings=tied), args)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 101, (2, 7), generator=torch.Generator().manual_seed(5))
    return ids, torch.ones_like(ids)


def embedding_lora(shared: SharedBase) -> dict[str, torch.nn.Parameter]:
    """The value role's LoRA factors on the input embeddings, by name."""
    return {n: p for n, p in shared.peft_model.named_parameters() if "embed_tokens.lora_embedding_" in n}


def train_one_step(shared: SharedBase) -> None:
    """One AdamW step on -mean policy log-prob + (value - 1)^2: "policy forward, value forward, one backward"."""
    optimizer = torch.optim.AdamW(shared.trainable_parameters(), lr=1e-2)
    ids, mask = batch()
    loss = -shared.policy_logits(ids, mask).log_softmax(-1).mean() + (shared.values(ids, mask) - 1).pow(2).mean()
    loss.backward()
    optimizer.step()


def test_default_is_off_and_policy_trunk_is_refused():
    assert SharedBaseArguments().value_lora_embeddings is False
    with pytest.raises(ValueError, match="value_lora_embeddings"):
        SharedBaseArguments(value_lora_embeddings=True, value_layout="policy_trunk")


def test_the_embedding_lora_is_the_value_roles_and_trains():
    shared = build()
    factors = embedding_lora(shared)
    assert sorted(n.rsplit(".", 1)[0].rsplit(".", 1)[-1] for n in factors) == ["lora_embedding_A", "lora_embedding_B"]
    assert all(".value" in n for n in factors)  # the policy adapter has none
    value_params, policy_params = shared.trainable_parameters("value"), shared.trainable_parameters("policy")
    for param in factors.values():
        assert any(p is param for p in value_params) and not any(p is param for p in policy_params)
    ids, mask = batch()
    # peft starts one factor at 0, so only the other gets a gradient on the first step; two steps move both
    before = {n: p.detach().clone() for n, p in factors.items()}
    with torch.no_grad():
        values_before = shared.values(ids, mask)
    train_one_step(shared)
    train_one_step(shared)
    assert all(not torch.equal(p, before[n]) for n, p in factors.items())  # requires_grad survives role switches
    with torch.no_grad():
        assert not torch.allclose(shared.values(ids, mask), values_before)


@TIED
def test_after_a_step_policy_and_reference_see_the_base_embeddings(tied):
    shared = build(tied)
    without = SharedBase(tiny_causal_lm(seed=0, tie_word_embeddings=tied), SharedBaseArguments(**LORA))
    for model in (shared, without):
        randomize_lora(model.peft_model, "policy", seed=1)
    train_one_step(shared)
    train_one_step(without)
    plain = tiny_causal_lm(seed=0, tie_word_embeddings=tied)
    base = shared.peft_model.get_base_model()
    assert torch.equal(base.get_input_embeddings().weight, plain.get_input_embeddings().weight)
    assert torch.equal(base.get_output_embeddings().weight, plain.get_output_embeddings().weight)
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(shared.reference_logits(ids, mask), plain(input_ids=ids, attention_mask=mask).logits)
        # the same policy step from the same adapters: the value option does not change what the policy computes
        assert torch.equal(shared.policy_logits(ids, mask), without.policy_logits(ids, mask))


def test_value_reads_its_embedding_lora_and_no_other_role_does():
    shared = build()
    ids, mask = batch()
    with torch.no_grad():
        policy, reference, values = shared.policy_logits(ids, mask), shared.reference_logits(ids, mask), None
        values = shared.values(ids, mask)
        randomize_lora(shared.peft_model, "value", seed=3)
        assert torch.equal(shared.policy_logits(ids, mask), policy)
        assert torch.equal(shared.reference_logits(ids, mask), reference)
        assert not torch.allclose(shared.values(ids, mask), values)


def test_value_folder_round_trip_gives_identical_values(tmp_path):
    shared = build()
    randomize_lora(shared.peft_model, "value", seed=2)
    shared.save_role("value", tmp_path / "value")
    ids, mask = batch()
    expected = shared.values(ids, mask).detach()

    # the folder's adapter config targets the embeddings: a base built without the option loads them too
    loaded = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(**LORA, value_adapter_path=str(tmp_path / "value")))
    assert torch.equal(loaded.values(ids, mask), expected)
    reloaded = build()
    reloaded.load_role("value", tmp_path / "value")
    assert torch.equal(reloaded.values(ids, mask), expected)
    value_params = reloaded.trainable_parameters("value")
    assert embedding_lora(reloaded)
    assert all(any(p is f for p in value_params) for f in embedding_lora(reloaded).values())


def test_vllm_sync_sends_the_base_embeddings_under_their_name():
    shared = build()
    randomize_lora(shared.peft_model, "value", seed=2)
    sent = dict(merged_adapter_weights(shared.peft_model, "policy"))
    plain = dict(tiny_causal_lm(seed=0).named_parameters())
    assert list(sent) == list(plain)
    assert torch.equal(sent["model.embed_tokens.weight"], plain["model.embed_tokens.weight"])


def test_ppo_resume_with_the_embedding_lora_equals_straight_run(tmp_path, left_tokenizer):
    from test_ppo_trainer import assert_same_trained_weights, prompts, straight_and_resumed

    from rlhf_ext.testing import fraction_of_a
    from rlhf_ext.trainers.ppo.trainer import PPOTrainer

    def build_trainer(args, callbacks):
        shared = build()
        trainer = PPOTrainer(shared, reward_funcs=fraction_of_a, args=args, train_dataset=prompts(16),
                             processing_class=left_tokenizer, callbacks=callbacks)  # fmt: skip
        return shared, trainer

    straight, resumed = straight_and_resumed(tmp_path, build_trainer, stop_after=2, max_steps=4, num_ppo_epochs=2,
                                             learning_rate=3e-3)  # fmt: skip
    assert all(p.abs().sum() > 0 for p in embedding_lora(straight).values())  # both factors trained
    assert_same_trained_weights(straight, resumed)  # the embedding LoRA is among the trained weights compared
    ids, mask = batch()
    assert torch.equal(resumed.reference_logits(ids, mask), tiny_causal_lm(seed=0)(ids).logits)


def test_memory_estimate_counts_the_embedding_lora_and_its_optimizer_state():
    from rlhf_ext.memory import estimate
    from rlhf_ext.testing import tiny_llama_config

    config = tiny_llama_config(vocab_size=1000, hidden_size=64)
    plain = estimate(config, bits=32, device="cpu", lora_r=8)
    with_lora = estimate(config, bits=32, device="cpu", lora_r=8, value_lora_embeddings=True)
    # r x (vocab + hidden) float32 weights + gradient + AdamW's two moments = 16 bytes per weight
    assert with_lora.adapters_optimizer - plain.adapters_optimizer == 8 * (1000 + 64) * 16
    assert with_lora.total - plain.total == 8 * (1000 + 64) * 16
    with pytest.raises(ValueError, match="value_lora_embeddings"):
        estimate(config, value_layout="policy_trunk", value_lora_embeddings=True)


def test_an_architecture_without_a_preset_gets_all_linear_layers_and_the_embeddings():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from rlhf_ext.models.presets import lora_config, value_lora_config

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64))  # fmt: skip
    args = SharedBaseArguments(**LORA, value_lora_embeddings=True)
    assert lora_config(args, model.config.model_type).target_modules == "all-linear"  # no preset for gpt_neox
    targets = value_lora_config(args, model).target_modules
    assert "gpt_neox.embed_in" in targets and "gpt_neox.layers.1.mlp.dense_4h_to_h" in targets
    assert not any("embed_out" in t for t in targets)  # the LM head stays out, as with "all-linear"
