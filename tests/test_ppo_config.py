"""PPOConfig: TRL PPO's defaults, a help string on every field, PPO's reading of GRPO's fields, clear errors."""

import dataclasses

import pytest
from trl import GRPOConfig

from rlhf_ext.trainers.ppo.config import PPOConfig


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
        (dict(lam=1.5), r"PPOConfig.lam must be in \[0, 1\]"),
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


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("vf_coef", -0.1, ">= 0"), ("vf_coef", NAN, ">= 0"),
        ("cliprange_value", -0.2, "> 0 or None"), ("cliprange_value", 0.0, "> 0 or None"),
        ("cliprange", NAN, "> 0"), ("cliprange", INF, "> 0"),
        ("kl_coef", NAN, ">= 0"), ("kl_coef", INF, ">= 0"),
        ("ent_coef", -0.01, ">= 0"),
        ("gamma", -0.1, r"in \[0, 1\]"), ("gamma", NAN, r"in \[0, 1\]"), ("lam", -0.5, r"in \[0, 1\]"),
        ("missing_eos_penalty", -1.0, ">= 0 or None"),
        ("num_ppo_epochs", 1.5, ">= 1"),
        ("value_warmup_steps", 0.5, ">= 0"),
        ("value_learning_rate", NAN, ">= 0 or None"),
        ("max_prompt_length", 0, ">= 1 or None"),
        ("max_completion_length", 0, ">= 1 or None"),
        ("temperature", 0.0, "> 0"),
        ("top_p", 0.0, r"in \(0, 1\]"),
        ("learning_rate", -3e-6, ">= 0"),
    ],
)  # fmt: skip
def test_every_numeric_field_is_range_checked_naming_field_value_and_range(field, value, allowed):
    with pytest.raises(ValueError, match=rf"PPOConfig\.{field} must be {allowed}.*, got {value!r}"):
        config(**{field: value})


@pytest.mark.parametrize(
    "overrides",
    [dict(cliprange_value=None), dict(vf_coef=0.0, kl_coef=0.0, ent_coef=0.0), dict(gamma=0.0, lam=1.0),
     dict(missing_eos_penalty=0.0), dict(value_learning_rate=0.0), dict(reward_weights=[1.0, -0.5])],
)  # fmt: skip
def test_boundary_values_are_accepted(overrides):
    c = config(**overrides)
    assert all(getattr(c, name) == value for name, value in overrides.items())


@pytest.mark.parametrize("weights", [[1.0, NAN], [INF]])
def test_non_finite_reward_weight_is_refused(weights):
    with pytest.raises(ValueError, match=r"reward_weights\[\d\] must be a finite number"):
        config(reward_weights=weights)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(entropy_coef=0.01), "entropy_coef=0.01 is a GRPO option that PPO does not use .*ent_coef"),
        (dict(epsilon_high=0.28), "epsilon_high=0.28 is a GRPO option"),
        (dict(top_entropy_quantile=0.2), "top_entropy_quantile=0.2 is a GRPO option"),
        (dict(epsilon=0.1), r"Set cliprange \(0.2\), not GRPO's epsilon \(0.1\)"),
    ],
)
def test_grpo_options_ppo_ignores_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_warmup_longer_than_the_run_warns_naming_both(caplog):
    with caplog.at_level("WARNING"):
        config(max_steps=10, warmup_steps=20)
    assert "warmup_steps=20 is not shorter than max_steps=10" in caplog.text
    assert "ends at 45% of it" in caplog.text  # the last step runs at (10 - 1) / 20 of the learning rate
    caplog.clear()
    with caplog.at_level("WARNING"):
        config(max_steps=10, warmup_steps=5)
        config(max_steps=10, warmup_steps=0.5)  # a ratio of the run
    assert "warmup_steps" not in caplog.text


def test_value_warmup_as_long_as_the_run_warns_that_the_policy_never_trains(caplog):
    with caplog.at_level("WARNING"):
        config(max_steps=3, value_warmup_steps=3)
    assert "value_warmup_steps=3 is not shorter than max_steps=3" in caplog.text
