"""A Hub token never reaches a written file (issue 18, item 11): transformers pickles TrainingArguments, hub_token
included, into every training_args.bin, and --push_to_hub uploads the top-level one. The configs refuse the field
wherever it is set; the token comes from HF_TOKEN or `hf auth login`, which nothing saves."""

import json
from pathlib import Path

import pytest
from scripts import load_recipe

from rlhf_ext.testing import save_tiny_model
from rlhf_ext.trainers import OnlinePlackettLuceConfig, PlackettLuceDPOConfig, PlackettLuceRewardConfig
from rlhf_ext.trainers.ppo.config import PPOConfig

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_NotARealTokenButSecret0123456789"
CONFIGS = [PlackettLuceDPOConfig, PlackettLuceRewardConfig, PPOConfig, OnlinePlackettLuceConfig]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-token")
    save_tiny_model(root / "model", seed=0)
    rows = [{"prompt": f"q{i} ", "completions": ["ab", "b"], "scores": [1.0, 0.0]} for i in range(4)]
    (root / "ranked.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def reward_args(workdir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "recipes" / "configs" / "reward.yaml"),
        "--model_name_or_path", str(workdir / "model"), "--dataset_name", str(workdir / "ranked.jsonl"),
        "--output_dir", str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--max_length", "32", "--lora_target_modules", "q_proj", "v_proj", "--use_cpu",
        "--save_strategy", "steps", "--save_steps", "1", "--report_to", "none", *extra,
    ]


def files_holding(folder: Path, text: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


@pytest.mark.parametrize("config_class", CONFIGS)
def test_configs_refuse_a_hub_token_pointing_to_hf_token_without_echoing_it(tmp_path, config_class):
    with pytest.raises(ValueError, match=r"hub_token.*training_args\.bin.*HF_TOKEN.*hf auth login") as raised:
        config_class(output_dir=str(tmp_path), hub_token=SECRET)
    assert SECRET not in str(raised.value)
    config = config_class(output_dir=str(tmp_path), use_cpu=True)
    with pytest.raises(ValueError, match="HF_TOKEN"):
        config.set_push_to_hub("me/model", token=SECRET)
    with pytest.raises(ValueError, match="HF_TOKEN"):
        config.hub_token = SECRET
    assert config.hub_token is None


def test_a_recipe_run_given_hub_token_writes_no_file_holding_it(workdir, tmp_path):
    output_dir = tmp_path / "out"
    recipe = load_recipe("reward")
    refused = None
    try:
        args = reward_args(workdir, output_dir, "--hub_token", SECRET)
        recipe.main(*recipe.make_parser().parse_args_and_config(args))
    except ValueError as err:
        refused = str(err)
    leaked = files_holding(output_dir, SECRET) if output_dir.exists() else []
    assert leaked == [], f"the token is in {[str(p.relative_to(output_dir)) for p in leaked]}"
    assert refused is not None and "HF_TOKEN" in refused and SECRET not in refused
    assert not output_dir.exists() or not any(output_dir.iterdir())  # refused before anything was written


def test_the_token_from_the_environment_is_used_and_never_written(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    output_dir = tmp_path / "out"
    recipe = load_recipe("reward")
    trainer = recipe.main(*recipe.make_parser().parse_args_and_config(reward_args(workdir, output_dir)))
    assert trainer.args.hub_token is None
    assert (output_dir / "checkpoint-1" / "training_args.bin").is_file()
    assert files_holding(output_dir, SECRET) == []
