"""The configs use transformers' new name `activation_checkpointing` with TRL's default (on) and no deprecation
warning, and the old name `gradient_checkpointing` still means what it meant (issue 20 item 4)."""

import warnings

import pytest

from rlhf_ext.trainers import (
    OnlinePlackettLuceConfig,
    PlackettLuceDPOConfig,
    PlackettLuceRewardConfig,
    PPOConfig,
)

CONFIGS = [PPOConfig, OnlinePlackettLuceConfig, PlackettLuceDPOConfig, PlackettLuceRewardConfig]
BASICS = dict(output_dir="out", use_cpu=True, bf16=False)


def build(config_class, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = config_class(**BASICS, **kwargs)
    deprecations = [w for w in caught if "checkpointing" in str(w.message) and w.category is FutureWarning]
    return config, deprecations


@pytest.mark.parametrize("config_class", CONFIGS)
def test_default_is_trls_on_without_a_deprecation_warning(config_class):
    config, deprecations = build(config_class)
    assert config.activation_checkpointing is True and config.gradient_checkpointing is True
    assert deprecations == []


@pytest.mark.parametrize("config_class", CONFIGS)
@pytest.mark.parametrize("value", [True, False])
def test_new_name_sets_both_silently(config_class, value):
    config, deprecations = build(config_class, activation_checkpointing=value)
    assert config.activation_checkpointing is value and config.gradient_checkpointing is value
    assert deprecations == []


@pytest.mark.parametrize("config_class", CONFIGS)
def test_old_name_still_turns_it_off_with_transformers_warning(config_class):
    config, deprecations = build(config_class, gradient_checkpointing=False)
    assert config.activation_checkpointing is False and config.gradient_checkpointing is False
    assert len(deprecations) == 1


def test_shipped_yaml_configs_use_the_new_name():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "recipes" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert "gradient_checkpointing:" not in path.read_text(), path.name
