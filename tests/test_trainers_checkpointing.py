"""Every trainer makes the same update with gradient checkpointing on (TRL's default) as with it off.

One optimizer step per run, identical seeds, lr 1e-2; every trainable tensor is compared after the
step, as a relative difference of the update (new - old) between the runs. With
`use_reentrant` left unset, transformers uses the non-reentrant checkpoint; the reentrant one is
tested too. Before `adapter_state_checkpointing`, the PPO update of the shared base's value adapter
differed by 135-164%.
"""

import dataclasses

import pytest
import torch
from datasets import Dataset
from kway_records import LISTS
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head
from rlhf_ext.testing import fraction_of_a, save_tiny_model, tiny_causal_lm, tiny_llama_config, tiny_tokenizer
from rlhf_ext.trainers import (
    PlackettLuceDPOConfig,
    PlackettLuceDPOTrainer,
    PlackettLuceRewardConfig,
    PlackettLuceRewardTrainer,
)
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer

LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.1)
# None: TRL's default (gradient_checkpointing=True, use_reentrant unset); then each explicit choice
CHECKPOINTING = {
    "trl_default": {},
    "non_reentrant": {"gradient_checkpointing_kwargs": {"use_reentrant": False}},
    "reentrant": {"gradient_checkpointing_kwargs": {"use_reentrant": True}},
}
COMMON = dict(report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, seed=0,
              learning_rate=1e-2, max_steps=1, logging_steps=1)


def randomize_lora(model, seed: int = 3, scale: float = 0.2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator))


def trainable_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def updates(module: torch.nn.Module, run) -> dict[str, torch.Tensor]:
    """new - old of every trainable tensor of `module` over `run()`."""
    before = trainable_snapshot(module)
    run()
    after = dict(module.named_parameters())
    return {name: after[name].detach() - old for name, old in before.items()}


def assert_same_updates(got: dict, expected: dict, must_move: tuple[str, ...]) -> None:
    assert got.keys() == expected.keys()
    for fragment in must_move:
        moved = [n for n, u in expected.items() if fragment in n and u.abs().max() > 0]
        assert moved, f"nothing matching {fragment!r} moved: the comparison would be vacuous"
    errors = {n: ((got[n] - expected[n]).norm() / expected[n].norm().clamp(min=1e-30)).item() for n in expected}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, f"{worst}: the update differs by {errors[worst]:.3g} (relative)"


# ----------------------------------------------------------------------------- PPO


def ppo_config(tmp_path, checkpointing: dict | None) -> PPOConfig:
    gc = {"gradient_checkpointing": False} if checkpointing is None else checkpointing
    return PPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_completion_length=6,
                     num_ppo_epochs=1, kl_coef=0.1, **COMMON, **gc)


def prompt_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory):
    donor = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(**LORA))
    randomize_lora(donor.peft_model)
    folder = tmp_path_factory.mktemp("reward") / "reward"
    return str(save_adapter_with_head(donor.peft_model, "value", donor.heads["value"], folder, "reward"))


def shared_ppo_update(tmp_path, reward_folder, checkpointing, base="fp32"):
    args = SharedBaseArguments(reward_adapter_path=reward_folder, **LORA)
    if base == "fp32":
        shared = SharedBase(tiny_causal_lm(seed=0), args)
    else:  # bitsandbytes quantizes at load time, from a folder
        torch.manual_seed(0)
        args = dataclasses.replace(args, dtype="bfloat16" if base == "bf16" else "float32", load_in_4bit=base == "4bit")
        shared = SharedBase.from_pretrained(save_tiny_model(tmp_path / "base", seed=0, hidden_size=64), args)
    randomize_lora(shared.peft_model, seed=5, scale=0.1)  # policy != value != reference
    trainer = PPOTrainer(shared, args=ppo_config(tmp_path, checkpointing), processing_class=prompt_tokenizer(),
                         train_dataset=Dataset.from_dict({"prompt": ["abc", "hello", "xy", "qrs"] * 2}))
    return updates(shared, trainer.train)


@pytest.fixture(scope="module")
def shared_ppo_reference(tmp_path_factory, reward_folder):
    return shared_ppo_update(tmp_path_factory.mktemp("plain"), reward_folder, None)


@pytest.mark.parametrize("mode", list(CHECKPOINTING))
def test_ppo_on_the_shared_base(tmp_path, reward_folder, shared_ppo_reference, mode):
    got = shared_ppo_update(tmp_path, reward_folder, CHECKPOINTING[mode])
    assert_same_updates(got, shared_ppo_reference, must_move=(".policy.", ".value.", "heads.value"))


@pytest.mark.parametrize("base", ["bf16", "4bit"])
def test_ppo_on_a_bf16_and_a_4bit_shared_base(tmp_path, reward_folder_64, base):
    expected = shared_ppo_update(tmp_path / "plain", reward_folder_64, None, base)
    got = shared_ppo_update(tmp_path / "ckpt", reward_folder_64, CHECKPOINTING["trl_default"], base)
    assert_same_updates(got, expected, must_move=(".policy.", ".value.", "heads.value"))


@pytest.fixture(scope="module")
def reward_folder_64(tmp_path_factory):
    donor = SharedBase(tiny_causal_lm(seed=0, hidden_size=64), SharedBaseArguments(**LORA))
    randomize_lora(donor.peft_model)
    folder = tmp_path_factory.mktemp("reward64") / "reward"
    return str(save_adapter_with_head(donor.peft_model, "value", donor.heads["value"], folder, "reward"))


def separate_ppo_update(tmp_path, checkpointing):
    """A peft policy (reference = adapters off) and a separate fully trained critic."""
    policy = get_peft_model(tiny_causal_lm(seed=0), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1))
    randomize_lora(policy)
    torch.manual_seed(1)
    critic = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=1))
    trainer = PPOTrainer(policy, reward_funcs=fraction_of_a, args=ppo_config(tmp_path, checkpointing),
                         value_model=critic, processing_class=prompt_tokenizer(),
                         train_dataset=Dataset.from_dict({"prompt": ["abc", "hello", "xy", "qrs"] * 2}))
    return updates(trainer.model, trainer.train)


@pytest.mark.parametrize("mode", ["trl_default", "reentrant"])
def test_ppo_with_a_peft_policy_and_a_separate_critic(tmp_path, mode):
    expected = separate_ppo_update(tmp_path / "plain", None)
    got = separate_ppo_update(tmp_path / "ckpt", CHECKPOINTING[mode])
    assert_same_updates(got, expected, must_move=(".lora_B.", "value_model."))


# ----------------------------------------------------------------------------- K-way DPO and reward


def kway_dpo_update(model_path, tmp_path, checkpointing):
    gc = {"gradient_checkpointing": False} if checkpointing is None else checkpointing
    args = PlackettLuceDPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_length=64, beta=0.5,
                                 **COMMON, **gc)
    torch.manual_seed(0)
    model = get_peft_model(tiny_causal_lm(seed=0), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1))
    randomize_lora(model)
    trainer = PlackettLuceDPOTrainer(model, args=args, train_dataset=Dataset.from_list(LISTS),
                                     processing_class=tiny_tokenizer())
    return updates(model, trainer.train)


@pytest.mark.parametrize("mode", ["trl_default", "reentrant"])
def test_kway_dpo_with_a_peft_model(model_path, tmp_path, mode):
    expected = kway_dpo_update(model_path, tmp_path / "plain", None)
    got = kway_dpo_update(model_path, tmp_path / "ckpt", CHECKPOINTING[mode])
    assert_same_updates(got, expected, must_move=(".lora_B.",))


def kway_reward_update(model_path, tmp_path, checkpointing):
    gc = {"gradient_checkpointing": False} if checkpointing is None else checkpointing
    args = PlackettLuceRewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_length=64,
                                    **COMMON, **gc)
    trainer = PlackettLuceRewardTrainer(
        model=model_path, args=args, train_dataset=Dataset.from_list(LISTS), processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False),
    )
    return updates(trainer.model, trainer.train)


@pytest.mark.parametrize("mode", ["trl_default", "reentrant"])
def test_kway_reward_with_a_peft_model(model_path, tmp_path, mode):
    expected = kway_reward_update(model_path, tmp_path / "plain", None)
    got = kway_reward_update(model_path, tmp_path / "ckpt", CHECKPOINTING[mode])
    assert_same_updates(got, expected, must_move=(".lora_B.", "score"))
