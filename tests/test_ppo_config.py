"""PPOConfig: TRL PPO's defaults, a help string on every field, PPO's reading of GRPO's fields, clear errors."""

import dataclasses

import pytest
from trl import GRPOConfig

from rlhf_ext.trainers.ppo_config import PPOConfig


def config(**overrides) -> PPOConfig:
    return PPOConfig(output_dir="unused", use_cpu=True, bf16=False, report_to=[], **overrides)


def test_defaults_follow_trl_ppo():
    c = config()
    trl_ppo = dict(learning_rate=3e-6, kl_coef=0.05, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2,
                   vf_coef=0.1, num_ppo_epochs=4)  # fmt: skip
    assert {name: getattr(c, name) for name in trl_ppo} == trl_ppo
    assert c.num_iterations == 4 and c.epsilon == 0.2 and c.beta == 0.0


def test_every_field_has_a_help_string():
    missing = [f.name for f in dataclasses.fields(PPOConfig) if f.init and not f.metadata.get("help")]
    assert not missing, missing
    added = {f.name for f in dataclasses.fields(PPOConfig)} - {f.name for f in dataclasses.fields(GRPOConfig)}
    assert {"kl_coef", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam", "num_ppo_epochs"} <= added


def test_long_prompts_are_an_error_unless_dropping_is_asked_for():
    assert config().long_prompts == "error"
    assert config(long_prompts="drop").long_prompts == "drop"


def test_critic_options_default_to_plain_ppo():
    c = config()
    assert (c.value_warmup_steps, c.value_learning_rate, c.value_head_init) == (0, None, "zero")
    c = config(value_warmup_steps=3, value_learning_rate=1e-5, value_head_init="first_rollout_mean")
    assert (c.value_warmup_steps, c.value_learning_rate, c.value_head_init) == (3, 1e-5, "first_rollout_mean")


def test_one_completion_per_prompt_is_allowed():
    c = config(num_generations=1, per_device_train_batch_size=3)
    assert c.num_generations == 1 and type(c.num_generations) is int and c.generation_batch_size == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(beta=0.1), "beta must be 0"),
        (dict(kl_estimator="k4"), "kl_estimator must be one of"),
        (dict(advantage_estimator="vtrace"), "advantage_estimator must be one of"),
        (dict(loss_aggregation="batch"), "loss_aggregation must be one of"),
        (dict(num_iterations=2, num_ppo_epochs=4), "derives num_iterations from num_ppo_epochs"),
        (dict(lam=1.5), "gamma and lam must lie in"),
        (dict(mask_truncated_completions=True), "missing_eos_penalty"),
        (dict(num_ppo_epochs=0), "num_ppo_epochs must be >= 1"),
        (dict(long_prompts="truncate"), "long_prompts must be one of"),
        (dict(value_warmup_steps=-1), "value_warmup_steps must be >= 0"),
        (dict(value_learning_rate=-1e-5), "value_learning_rate must be >= 0 or None"),
        (dict(value_head_init="mean"), "value_head_init must be one of"),
    ],
)
def test_bad_values_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)
