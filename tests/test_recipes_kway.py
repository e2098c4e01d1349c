"""recipes/dpo.py and recipes/reward.py, run in-process through their YAML configs with a tiny model."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_ext.models import load_head
from rlhf_ext.testing import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
