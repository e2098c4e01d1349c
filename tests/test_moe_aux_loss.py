"""MoE router auxiliary loss (issue 21 item 2): PPO and online K-way add router_aux_loss_coef * aux_loss as TRL's GRPO
does (divided by the gradient-accumulation steps), and all three trainers log it as `aux_loss`, TRL's name.

Each check is by hand: the model's own aux_loss on the batch the loss saw, and the loss with coef c minus the loss
with coef 0 on that batch."""

import copy

import pytest
import torch
from datasets import Dataset
from kway_records import PAIRS
from transformers import AutoModelForSequenceClassification, MixtralConfig, MixtralForCausalLM
from trl import DPOConfig, DPOTrainer

from rlhf_ext.testing import fraction_of_a, tiny_llama_config, tiny_tokenizer
from rlhf_ext.trainers import PlackettLuceDPOConfig, PlackettLuceDPOTrainer
from rlhf_ext.trainers.kway.online import OnlinePlackettLuceConfig, OnlinePlackettLuceTrainer
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer

COEF = 0.5
PROMPTS = ["abc", "hello", "xy", "qrs"]
RUN = dict(
    report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no", logging_steps=1,
    disable_tqdm=True, seed=0,
)  # fmt: skip


def tiny_moe(seed: int = 0) -> MixtralForCausalLM:
    """A randomly initialised 2-layer Mixtral with 4 experts (2 per token): a model that returns an aux_loss."""
    tok = tiny_tokenizer()
    config = MixtralConfig(
        vocab_size=101, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return MixtralForCausalLM(config)


def left_tokenizer():
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    return tok


def own_aux_loss(model, batch: dict) -> float:
    """The model's aux_loss on the prompt + completion sequences of a (flat) rollout batch."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True).aux_loss.item()


def ppo(tmp_path, policy, coef, gradient_checkpointing=False):
    torch.manual_seed(1)
    critic = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=1))
    args = PPOConfig(
        output_dir=str(tmp_path / f"ppo{coef}"), per_device_train_batch_size=4, max_completion_length=6, max_steps=1,
        num_ppo_epochs=1, router_aux_loss_coef=coef, **{**RUN, "gradient_checkpointing": gradient_checkpointing},
    )  # fmt: skip
    return PPOTrainer(
        policy, reward_funcs=fraction_of_a, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2}),
        processing_class=left_tokenizer(), value_model=critic,
    )  # fmt: skip


def online(tmp_path, policy, coef, gradient_checkpointing=False):
    args = OnlinePlackettLuceConfig(
        output_dir=str(tmp_path / f"online{coef}"), per_device_train_batch_size=4, num_generations=2,
        max_completion_length=6, max_steps=1, router_aux_loss_coef=coef,
        **{**RUN, "gradient_checkpointing": gradient_checkpointing},
    )  # fmt: skip
    return OnlinePlackettLuceTrainer(
        policy, reward_funcs=fraction_of_a, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2}),
        processing_class=left_tokenizer(),
    )  # fmt: skip


def flat(batch: dict) -> dict:
    """An online K-way batch [G, K, ...] back to [G*K, ...] (the loss's own flattening); a PPO batch as it is."""
    if "item_mask" not in batch:
        return batch
    groups = batch["item_mask"].shape
    grouped = {key: value for key, value in batch.items() if torch.is_tensor(value) and value.shape[:2] == groups}
    return {key: value.flatten(0, 1) for key, value in grouped.items()}


@pytest.mark.parametrize("build", [ppo, online], ids=["ppo", "online_kway"])
@pytest.mark.parametrize(("accumulation", "checkpointing"), [(1, True), (2, False)])  # True: TRL's default
def test_grpo_based_trainers_add_and_log_the_router_aux_loss(tmp_path, build, accumulation, checkpointing):
    policy = tiny_moe()
    with_aux = build(tmp_path, policy, COEF, checkpointing)
    without = build(tmp_path, copy.deepcopy(policy), 0.0, checkpointing)
    assert with_aux.aux_loss_enabled
    with_aux.model.train()
    without.model.train()
    with_aux.current_gradient_accumulation_steps = without.current_gradient_accumulation_steps = accumulation
    batch = with_aux._generate_and_score_completions([{"prompt": p} for p in PROMPTS])
    with_aux._metrics["train"].clear()
    loss_c = with_aux._compute_loss(with_aux.model, batch).item()
    loss_0 = without._compute_loss(without.model, batch).item()
    aux = own_aux_loss(policy, flat(batch))
    assert aux > 0
    assert with_aux._metrics["train"]["aux_loss"] == [pytest.approx(aux, rel=1e-5)]
    assert "aux_loss" not in without._metrics["train"]
    assert loss_c - loss_0 == pytest.approx(COEF * aux / accumulation, rel=1e-4, abs=1e-6)


def dpo_args(tmp_path, config_class, **overrides):
    return config_class(
        output_dir=str(tmp_path), per_device_eval_batch_size=len(PAIRS), report_to="none", bf16=False, use_cpu=True,
        gradient_checkpointing=False, disable_tqdm=True, max_length=64, beta=0.5, seed=0, **overrides,
    )  # fmt: skip


def test_plackett_luce_dpo_logs_the_aux_loss_trl_logs_and_adds_it(tmp_path):
    policy, ref = tiny_moe(0), tiny_moe(1)
    data = Dataset.from_list(PAIRS)

    def build(trainer_class, config_class, coef):
        args = dpo_args(tmp_path / f"{trainer_class.__name__}{coef}", config_class, router_aux_loss_coef=coef)
        return trainer_class(
            model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args, train_dataset=data,
            eval_dataset=data, processing_class=tiny_tokenizer(),
        )  # fmt: skip

    expected = build(DPOTrainer, DPOConfig, COEF).evaluate()
    got = build(PlackettLuceDPOTrainer, PlackettLuceDPOConfig, COEF).evaluate()
    without = build(PlackettLuceDPOTrainer, PlackettLuceDPOConfig, 0.0).evaluate()
    assert got["eval_aux_loss"] == pytest.approx(expected["eval_aux_loss"], rel=1e-5)
    assert got["eval_aux_loss"] > 0 and "eval_aux_loss" not in without
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
    assert got["eval_loss"] - without["eval_loss"] == pytest.approx(COEF * got["eval_aux_loss"], rel=1e-4)


def test_shared_prompts_are_refused_while_the_router_loss_is_on(tmp_path):
    """The router loss averages over every token the model sees, so with each prompt computed once it would change:
    shared_prompt=True is refused (None runs unshared, the test above)."""
    args = dpo_args(tmp_path, PlackettLuceDPOConfig, router_aux_loss_coef=COEF, shared_prompt=True)
    with pytest.raises(ValueError, match=r"shared_prompt=True.*router load-balancing loss is on"):
        PlackettLuceDPOTrainer(
            model=tiny_moe(0), ref_model=tiny_moe(1), args=args, train_dataset=Dataset.from_list(PAIRS),
            eval_dataset=Dataset.from_list(PAIRS), processing_class=tiny_tokenizer(),
        ).evaluate()
