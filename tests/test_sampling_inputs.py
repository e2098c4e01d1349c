"""Bad input a tired user gives the sampling trainers (PPO, online K-way) and their recipes (issue 18, section 4):
refused when the trainer is built, naming the record, field or setting, instead of failing inside generation."""

import json

import pytest
from datasets import Dataset
from scripts import load_recipe

from rlhf_ext.models import SharedBase, SharedBaseArguments
from rlhf_ext.testing import fraction_of_a, tiny_causal_lm, tiny_tokenizer
from rlhf_ext.trainers import OnlinePlackettLuceConfig, OnlinePlackettLuceTrainer
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer

COMMON = dict(report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no",
              disable_tqdm=True, seed=0, max_steps=1, per_device_train_batch_size=2, max_completion_length=4)


def build(trainer_class, tmp_path, prompts, tokenizer, **overrides):
    shared = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    settings = {**COMMON, **overrides}
    if trainer_class is PPOTrainer:
        args = PPOConfig(output_dir=str(tmp_path), **settings)
    else:
        args = OnlinePlackettLuceConfig(output_dir=str(tmp_path), num_generations=2, **settings)
    return trainer_class(shared, reward_funcs=fraction_of_a, args=args, train_dataset=Dataset.from_dict(
        {"prompt": prompts}), processing_class=tokenizer)


def left_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.mark.parametrize("trainer_class", [PPOTrainer, OnlinePlackettLuceTrainer])
def test_a_tokenizer_without_eos_is_refused_before_generation(tmp_path, trainer_class):
    tokenizer = left_tokenizer()
    tokenizer.eos_token = None  # generation used to fail at step 1: "'NoneType' object cannot be interpreted ..."
    with pytest.raises(ValueError, match=r"no eos_token.*tokenizer\.eos_token"):
        build(trainer_class, tmp_path, ["abc", "de"], tokenizer)


@pytest.mark.parametrize("trainer_class", [PPOTrainer, OnlinePlackettLuceTrainer])
def test_chat_prompts_with_an_unknown_role_are_named(tmp_path, trainer_class):
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "human", "content": "hello"}]]
    with pytest.raises(ValueError, match=r"train dataset, record 1 \(0-based\).*message 0.*'human'.*'user'"):
        build(trainer_class, tmp_path, prompts, left_tokenizer())


def test_ppo_recipe_reads_csv_prompts_and_names_a_utf16_file(tmp_path):
    ppo = load_recipe("ppo")
    args = ppo.PPOScriptArguments(dataset_name=str(tmp_path / "prompts.csv"))
    training_args = PPOConfig(output_dir=str(tmp_path / "out"), **COMMON)
    (tmp_path / "prompts.csv").write_text("prompt\nWrite a haiku.\n\"Say hi, politely.\"\n")
    train, _ = ppo.load_prompts(args, training_args)
    assert train["prompt"] == ["Write a haiku.", "Say hi, politely."]
    (tmp_path / "prompts.jsonl").write_bytes(json.dumps({"prompt": "hi"}).encode("utf-16"))
    args.dataset_name = str(tmp_path / "prompts.jsonl")
    with pytest.raises(ValueError, match=r"prompts\.jsonl.*UTF-16.*UTF-8"):
        ppo.load_prompts(args, training_args)


@pytest.mark.parametrize("trainer_class", [PPOTrainer, OnlinePlackettLuceTrainer])
def test_fewer_prompts_than_one_generation_batch_is_refused_instead_of_training_zero_steps(tmp_path, trainer_class):
    # 4 completions per generation batch: PPO samples them for 4 prompts, online K-way (2 completions each) for 2.
    # GRPO's sampler yields only whole batches, so fewer prompts trained 0 steps and the recipe saved the untrained
    # policy as if it had trained.
    needed = 4 if trainer_class is PPOTrainer else 2
    prompts = ["abc", "de", "fgh", "ij"]
    with pytest.raises(ValueError, match=rf"train dataset has {needed - 1} prompt.*one generation batch.*{needed}"):
        build(trainer_class, tmp_path, prompts[: needed - 1], left_tokenizer(), per_device_train_batch_size=4)
    trainer = build(trainer_class, tmp_path, prompts[:needed], left_tokenizer(), per_device_train_batch_size=4)
    trainer.train()
    assert trainer.state.global_step == 1
