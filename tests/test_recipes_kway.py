"""recipes/dpo.py and recipes/reward.py, run in-process through their YAML configs with a tiny model."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file
from scripts import load_recipe

from rlhf_ext.data import load_dataset_or_file
from rlhf_ext.models import load_head
from rlhf_ext.testing import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model and a ranked jsonl with lists of K = 2, 3 and 4 in the formats the recipes accept."""
    root = tmp_path_factory.mktemp("recipes")
    save_tiny_model(root / "model", seed=0)
    rows = []
    for i in range(12):
        k = 2 + i % 3
        completions = ["b" * (k - j) + "a" * j for j in range(k)]
        rows.append({"prompt": f"q{i} ", "completions": completions, "scores": [float(k - j) for j in range(k)]})
    (root / "ranked.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return root


def cli_args(workdir: Path, recipe: str, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "recipes" / "configs" / f"{recipe}.yaml"),
        "--model_name_or_path", str(workdir / "model"), "--dataset_name", str(workdir / "ranked.jsonl"),
        "--output_dir", str(workdir / f"out-{recipe}"), "--max_steps", "2", "--per_device_train_batch_size", "3",
        "--max_length", "64", "--lora_target_modules", "q_proj", "v_proj", "--use_cpu", "--logging_steps", "1",
        *extra,
    ]


def test_dpo_recipe_trains_a_lora_policy_from_the_yaml_config(workdir):
    recipe = load_recipe("dpo")
    script_args, training_args, model_args = recipe.make_parser().parse_args_and_config(
        cli_args(workdir, "dpo", "--per_device_train_batch_size", "12")  # every list in one batch
    )
    assert training_args.top_m is None and model_args.use_peft  # from recipes/configs/dpo.yaml
    trainer = recipe.main(script_args, training_args, model_args)
    out = workdir / "out-dpo"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # the LoRA starts at zero, so policy == reference and each list costs log K! (four lists each of K = 2, 3, 4)
    assert losses[0] == pytest.approx((math.log(2) + math.log(6) + math.log(24)) / 3, abs=1e-4)


def test_reward_recipe_saves_the_reward_role_folder(workdir):
    recipe = load_recipe("reward")
    script_args, training_args, model_args = recipe.make_parser().parse_args_and_config(
        cli_args(workdir, "reward", "--top_m", "2")
    )
    trainer = recipe.main(script_args, training_args, model_args)
    out = workdir / "out-reward"
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "head_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "head_config.json").read_text())["role"] == "reward"
    trained_head = trainer.model.get_base_model().score.modules_to_save["default"].weight
    torch.testing.assert_close(load_head(out).linear.weight, trained_head.float())


@pytest.mark.parametrize("recipe, option", [("dpo", "--length_normalization"), ("reward", "--tie_policy")])
def test_help_lists_the_kway_options(recipe, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_recipe(recipe).make_parser().parse_args_and_config(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert option in out and "--top_m" in out and "--use_peft" in out and "--push_to_hub" in out


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["dpo", "reward"])
def test_recipe_runs_in_two_cpu_processes(workdir, recipe):
    # accelerate's --cpu launcher starts one process without an MPI hostfile; torchrun's launcher plus
    # --use_cpu gives two gloo processes
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               str(ROOT / "recipes" / f"{recipe}.py"), *cli_args(workdir, recipe, "--output_dir",
                                                               str(workdir / f"ddp-{recipe}"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Model saved" in result.stdout


def run(recipe_name: str, args: list[str]):
    recipe = load_recipe(recipe_name)
    return recipe.main(*recipe.make_parser().parse_args_and_config(args))


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with the value of `flag` replaced."""
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


# ----------------------------------------------------------------------------- seeding, LoRA default, --help


@pytest.mark.parametrize("recipe", ["dpo", "reward"])
def test_two_runs_with_the_same_seed_give_identical_adapters(workdir, tmp_path, recipe):
    torch.manual_seed(123)  # the global RNG state the recipe finds must not matter
    for name in ("first", "second"):
        run(recipe, with_flag(cli_args(workdir, recipe, "--max_steps", "1", "--seed", "7"), "--output_dir",
                              str(tmp_path / name)))  # fmt: skip
    files = sorted(p.name for p in (tmp_path / "first").glob("*.safetensors"))
    assert "adapter_model.safetensors" in files
    for file in files:
        first, second = load_file(tmp_path / "first" / file), load_file(tmp_path / "second" / file)
        for key in first:
            torch.testing.assert_close(second[key], first[key], atol=0, rtol=0, msg=f"{file} {key}")


@pytest.mark.parametrize("recipe", ["dpo", "reward"])
def test_lora_is_on_by_default(recipe):
    parser = load_recipe(recipe).make_parser()
    assert parser.parse_args_and_config(["--use_cpu"])[2].use_peft
    assert parser.parse_dict({"use_cpu": True})[2].use_peft  # also in-process (the demo parses dicts)
    assert not parser.parse_args_and_config(["--use_cpu", "--use_peft", "false"])[2].use_peft


@pytest.mark.parametrize("recipe", ["dpo", "reward"])
def test_help_starts_with_a_short_usage_block_naming_config(recipe, capsys):
    with pytest.raises(SystemExit):
        load_recipe(recipe).make_parser().parse_args_and_config(["--help"])
    out = capsys.readouterr().out
    head = out[: out.index("options:")]
    assert out.startswith(f"usage: {recipe}.py --config") and len(head.splitlines()) < 30
    assert "--config" in head and "--model_name_or_path" in head and "--use_peft" in head
    for flag in set(re.findall(r"--[a-z0-9_]+", head)) - {"--config"}:
        assert f"\n  {flag} " in out or f"\n  {flag}," in out, flag  # every flag the block names is a real one


# ----------------------------------------------------------------------------- a quantized base


@pytest.fixture(scope="module")
def model_64(tmp_path_factory):
    """A tiny base whose hidden size (64) is a multiple of bitsandbytes' 4-bit block size."""
    return save_tiny_model(tmp_path_factory.mktemp("model_64"), seed=0, hidden_size=64)


@pytest.mark.parametrize("quantization", ["--load_in_4bit", "--load_in_8bit"])
def test_reward_recipe_trains_on_a_quantized_base_with_the_default_dtype(workdir, model_64, tmp_path, quantization):
    # TRL casts every trainable weight of a quantized model to bfloat16, the score head included, which then met
    # float32 hidden states: "expected m1 and m2 to have the same dtype" at step 1 unless --dtype bfloat16
    args = with_flag(cli_args(workdir, "reward", quantization, "--max_steps", "1"), "--model_name_or_path", model_64)
    trainer = run("reward", with_flag(args, "--output_dir", str(tmp_path / "out")))
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    assert (tmp_path / "out" / "head.safetensors").is_file()


# ----------------------------------------------------------------------------- bad input, before training


@pytest.mark.parametrize("recipe", ["dpo", "reward"])
def test_empty_jsonl_is_a_clear_error(workdir, tmp_path, recipe):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl holds no records"):
        run(recipe, with_flag(cli_args(workdir, recipe), "--dataset_name", str(tmp_path / "empty.jsonl")))


@pytest.mark.parametrize("recipe", ["dpo", "reward"])
def test_empty_parquet_is_a_clear_error(workdir, tmp_path, recipe):
    Dataset.from_dict({"prompt": [], "completions": []}).to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match="empty.parquet holds no records"):
        run(recipe, with_flag(cli_args(workdir, recipe), "--dataset_name", str(tmp_path / "empty.parquet")))


def test_empty_or_missing_split_is_a_clear_error():
    from rlhf_ext.recipe_utils import eval_split, train_split

    dataset = DatasetDict({"train": Dataset.from_dict({"prompt": []}), "test": Dataset.from_dict({"prompt": ["a"]})})
    with pytest.raises(ValueError, match="hub/name: split 'train' has no records to train on"):
        train_split(dataset, "train", "hub/name")
    with pytest.raises(ValueError, match=r"hub/name has no split 'validation' .* its splits are \['test', 'train'\]"):
        train_split(dataset, "validation", "hub/name")
    assert eval_split(dataset, "test", "hub/name", "steps")["prompt"] == ["a"]
    assert eval_split(dataset, "missing", "hub/name", "no") is None


@pytest.mark.parametrize("recipe", ["dpo", "reward"])
def test_malformed_jsonl_line_is_named_with_its_file(workdir, tmp_path, recipe):
    lines = (workdir / "ranked.jsonl").read_text().splitlines()
    lines[4] = lines[4][:-1]  # drop the closing brace of line 5
    (tmp_path / "broken.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"broken.jsonl, line 5: not valid JSON"):
        run(recipe, with_flag(cli_args(workdir, recipe), "--dataset_name", str(tmp_path / "broken.jsonl")))


@pytest.mark.parametrize("recipe", ["dpo", "reward"])
def test_missing_local_model_folder_is_named(workdir, tmp_path, recipe):
    args = with_flag(cli_args(workdir, recipe), "--model_name_or_path", str(tmp_path / "no_such_model"))
    with pytest.raises(FileNotFoundError, match="--model_name_or_path .*no_such_model: no such folder"):
        run(recipe, args)


@pytest.mark.parametrize("recipe", ["dpo", "reward"])
def test_eval_strategy_with_a_single_file_names_the_missing_split(workdir, recipe):
    with pytest.raises(ValueError, match=r"evaluates on split 'test' \(--dataset_test_split\), but .* has only"):
        run(recipe, cli_args(workdir, recipe, "--eval_strategy", "steps", "--eval_steps", "1"))


def test_json_array_files_and_blank_lines_still_load(tmp_path):
    rows = [{"prompt": "a", "completions": ["x", "y"]}, {"prompt": "b", "completions": ["z", "w"]}]
    (tmp_path / "array.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "lines.jsonl").write_text("\n" + json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    for name in ("array.json", "lines.jsonl"):
        assert load_dataset_or_file(str(tmp_path / name))["train"]["prompt"] == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"prompt": "a"},\n {"prompt": "b"\n]', r"array.json, line 3: not valid JSON"),
        ('[{"prompt": "a"}, 3]', r"item 1 of the array is int"),
        ('{"prompt": "a"}\n["b"]\n', r"line 2: expected a JSON object"),
    ],
)
def test_malformed_json_files_are_named(tmp_path, content, message):
    (tmp_path / "array.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_dataset_or_file(str(tmp_path / "array.json"))
