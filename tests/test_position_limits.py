"""Refused at once instead of dying late (issue 18, item 9): sequences longer than the model's positions (learned
positions fail with an IndexError steps into the run, rotary ones silently run past them), and a PPO rollout with a
single real completion token (whitening's variance needs two)."""

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_ext.models import SharedBase, SharedBaseArguments
from rlhf_ext.testing import fraction_of_a, save_tiny_model, tiny_causal_lm, tiny_tokenizer
from rlhf_ext.trainers import (
    OnlinePlackettLuceConfig,
    OnlinePlackettLuceTrainer,
    PlackettLuceDPOConfig,
    PlackettLuceDPOTrainer,
    PlackettLuceRewardConfig,
    PlackettLuceRewardTrainer,
)
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer

LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)
COMMON = dict(report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no",
              disable_tqdm=True, seed=0, max_steps=1, logging_steps=1)
# 12 and 3 tokens with the character-level tiny tokenizer
PROMPTS = ["hello world!", "abc"]


def shared_base(positions: int = 16) -> SharedBase:
    return SharedBase(tiny_causal_lm(seed=0, max_position_embeddings=positions), SharedBaseArguments(**LORA))


def left_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


# --- PPO and online K-way: longest prompt + max_completion_length --------------------------------------------------


def test_ppo_refuses_prompt_plus_completion_beyond_the_positions_naming_the_settings(tmp_path):
    args = PPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_completion_length=6,
                     max_prompt_length=100, **COMMON)
    with pytest.raises(ValueError, match=r"record 0.*12 tokens.*max_completion_length=6.*max_position_embeddings=16"
                                         r".*max_completion_length.*max_prompt_length"):
        PPOTrainer(shared_base(), reward_funcs=fraction_of_a, args=args,
                   train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=left_tokenizer())


def test_ppo_accepts_prompts_that_leave_room_for_the_completion(tmp_path):
    args = PPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_completion_length=4,
                     max_prompt_length=100, **COMMON)
    PPOTrainer(shared_base(), reward_funcs=fraction_of_a, args=args,
               train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=left_tokenizer())


def test_online_kway_refuses_prompt_plus_completion_beyond_the_positions(tmp_path):
    args = OnlinePlackettLuceConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                                    max_completion_length=6, **COMMON)
    with pytest.raises(ValueError, match=r"record 0.*12 tokens.*max_completion_length=6.*max_position_embeddings=16"):
        OnlinePlackettLuceTrainer(shared_base(), reward_funcs=fraction_of_a, args=args,
                                  train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                                  processing_class=left_tokenizer())


# --- K-way: the longest prompt + completion, after truncation to max_length ----------------------------------------


RECORDS = [{"prompt": "Q", "completions": ["a", "b"]}, {"prompt": "hello world!", "completions": ["abcdefgh", "x"]}]


def gpt2_path(tmp_path) -> str:
    """A tiny GPT-2 (learned positions, n_positions=16) saved with the tiny tokenizer."""
    tokenizer = tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    return str(tmp_path / "gpt2")


@pytest.mark.parametrize("trainer_class, config_class", [
    (PlackettLuceDPOTrainer, PlackettLuceDPOConfig), (PlackettLuceRewardTrainer, PlackettLuceRewardConfig),
])
def test_kway_refuses_a_list_longer_than_the_positions_naming_record_and_max_length(
    tmp_path, trainer_class, config_class
):
    args = config_class(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_length=64, **COMMON)
    with pytest.raises(ValueError, match=r"train dataset, record 1.*21 tokens.*max_position_embeddings=16.*"
                                         r"max_length=64.*max_length to 16 or less"):
        trainer_class(gpt2_path(tmp_path), args=args, train_dataset=Dataset.from_list(RECORDS))


def test_kway_with_max_length_within_the_positions_truncates_and_trains(tmp_path):
    path = save_tiny_model(tmp_path / "llama", seed=0, max_position_embeddings=16)
    args = PlackettLuceRewardConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_length=16,
                                    **COMMON)
    PlackettLuceRewardTrainer(path, args=args, train_dataset=Dataset.from_list(RECORDS)).train()


# --- PPO: a rollout with one real completion token ---------------------------------------------------------------


def test_ppo_rollout_with_a_single_real_token_skips_whitening_with_a_metric(tmp_path, caplog):
    args = PPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=1, max_completion_length=1,
                     whiten_rewards=True, **COMMON)
    trainer = PPOTrainer(shared_base(positions=512), reward_funcs=fraction_of_a, args=args,
                         train_dataset=Dataset.from_dict({"prompt": ["abc"]}), processing_class=left_tokenizer())
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "objective/whitening_skipped" in entry]
    assert logged and logged[0]["objective/whitening_skipped"] == 1.0
    assert "whitening" in caplog.text
