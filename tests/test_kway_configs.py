"""The K-way configs refuse numeric settings with the wrong sign or range, naming the field, the value and the range
(issue 18 item 3): offline DPO, reward, their shared RankedDataArguments, and online K-way DPO."""

import pytest

from rlhf_ext.trainers import PlackettLuceDPOConfig, PlackettLuceRewardConfig
from rlhf_ext.trainers.kway.online import OnlinePlackettLuceConfig

NAN, INF = float("nan"), float("inf")
COMMON = dict(use_cpu=True, bf16=False, report_to=[], gradient_checkpointing=False)


def dpo(tmp_path, **overrides):
    return PlackettLuceDPOConfig(str(tmp_path), **COMMON, **overrides)


def reward(tmp_path, **overrides):
    return PlackettLuceRewardConfig(str(tmp_path), **COMMON, **overrides)


def online(tmp_path, **overrides):
    kwargs = dict(per_device_train_batch_size=4, num_generations=4, **COMMON)
    return OnlinePlackettLuceConfig(str(tmp_path), **{**kwargs, **overrides})


BUILDERS = {"dpo": dpo, "reward": reward, "online": online}
CLASS_NAMES = {
    "dpo": "PlackettLuceDPOConfig", "reward": "PlackettLuceRewardConfig", "online": "OnlinePlackettLuceConfig"
}  # fmt: skip


@pytest.mark.parametrize(
    ("config", "field", "value", "allowed"),
    [
        ("dpo", "beta", -0.1, "> 0"), ("dpo", "beta", 0.0, "> 0"), ("dpo", "beta", NAN, "> 0"),
        ("dpo", "beta", INF, "> 0"),
        ("dpo", "ref_model_mixup_alpha", 1.5, r"in \[0, 1\]"), ("dpo", "ref_model_sync_steps", 0, ">= 1"),
        ("dpo", "precompute_ref_batch_size", 0, ">= 1 or None"),
        ("dpo", "top_m", 1.5, ">= 1 or None"), ("dpo", "max_length", 0, ">= 1 or None"),
        ("dpo", "learning_rate", -1e-6, ">= 0"),
        ("reward", "center_rewards_coefficient", -0.01, ">= 0 or None"),
        ("reward", "center_rewards_coefficient", NAN, ">= 0 or None"),
        ("reward", "top_m", 2.5, ">= 1 or None"), ("reward", "max_length", -1, ">= 1 or None"),
        ("reward", "learning_rate", NAN, ">= 0"),
        ("online", "dpo_beta", NAN, "> 0"), ("online", "dpo_beta", INF, "> 0"),
        ("online", "top_m", 0.5, ">= 1 or None"), ("online", "temperature", 0.0, "> 0"),
        ("online", "top_p", 1.5, r"in \(0, 1\]"), ("online", "max_completion_length", 0, ">= 1 or None"),
        ("online", "learning_rate", -1e-6, ">= 0"),
    ],
)  # fmt: skip
def test_numeric_fields_out_of_range_are_refused_naming_field_value_and_range(tmp_path, config, field, value, allowed):
    pattern = rf"{CLASS_NAMES[config]}\.{field} must be {allowed}.*, got {value!r}"
    with pytest.raises(ValueError, match=pattern):
        BUILDERS[config](tmp_path, **{field: value})


def test_dpo_beta_error_says_what_a_wrong_sign_does(tmp_path):
    with pytest.raises(ValueError, match="negative beta trains the reverse ranking"):
        dpo(tmp_path, beta=-0.1)


@pytest.mark.parametrize(("field", "value"), [("label_smoothing", 0.1), ("loss_weights", [1.0])])
def test_dpo_options_the_plackett_luce_loss_ignores_are_refused(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"{field}=.* is a DPO option that Plackett-Luce DPO does not use"):
        dpo(tmp_path, **{field: value})


def test_online_reward_weight_must_be_finite(tmp_path):
    with pytest.raises(ValueError, match=r"OnlinePlackettLuceConfig.reward_weights\[0\] must be a finite number"):
        online(tmp_path, reward_weights=[NAN])


@pytest.mark.parametrize("config", ["dpo", "reward", "online"])
def test_valid_boundaries_are_accepted(tmp_path, config):
    extra = {"dpo": dict(beta=1e-3, ref_model_mixup_alpha=1.0), "reward": dict(center_rewards_coefficient=0.0),
             "online": dict(dpo_beta=1e-3, top_p=1.0)}[config]  # fmt: skip
    built = BUILDERS[config](tmp_path, top_m=1, learning_rate=0.0, **extra)
    assert built.top_m == 1 and all(getattr(built, k) == v for k, v in extra.items())


@pytest.mark.parametrize("config", ["dpo", "reward", "online"])
def test_warmup_longer_than_the_run_warns_naming_both(tmp_path, config, caplog):
    with caplog.at_level("WARNING"):
        BUILDERS[config](tmp_path, max_steps=4, warmup_steps=8)
    assert f"{CLASS_NAMES[config]}: warmup_steps=8 is not shorter than max_steps=4" in caplog.text
