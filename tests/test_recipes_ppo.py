"""recipes/ppo.py in-process with a tiny model: what it writes, seeding, --help, and clear errors for bad input."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scripts import load_recipe

from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head
from rlhf_ext.testing import save_tiny_model, tiny_causal_lm

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["abc", "hello", "xy", "qrs"]


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("ppo")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny base, a reward role folder with random weights for it, and 16 short prompts."""
    root = tmp_path_factory.mktemp("ppo_recipe")
    save_tiny_model(root / "model", seed=0)
    donor = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in donor.peft_model.named_parameters():
            if ".value." in name and ".lora_B" in name:
                param.normal_(0, 0.2)  # lora_B starts at 0: make the reward adapter differ from the base
    save_adapter_with_head(donor.peft_model, "value", donor.heads["value"], root / "reward", "reward")
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 4])
    return root


def cli_args(workdir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "recipes" / "configs" / "ppo.yaml"), "--model_name_or_path", str(workdir / "model"),
        "--reward_adapter_path", str(workdir / "reward"), "--dataset_name", str(workdir / "prompts.jsonl"),
        "--output_dir", str(output_dir), "--lora_r", "4", "--lora_alpha", "8", "--per_device_train_batch_size", "4",
        "--steps_per_generation", "1", "--max_completion_length", "6", "--max_prompt_length", "32",
        "--max_steps", "1", "--num_ppo_epochs", "1", "--learning_rate", "1e-2", "--use_cpu", "true",
        "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1", *extra,
    ]  # fmt: skip


def run(recipe, args: list[str]):
    return recipe.main(*recipe.make_parser().parse_args_and_config(args))


def adapter_files(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(folder.glob("*.safetensors"))}


# ----------------------------------------------------------------------------- what it writes, seeding


def test_recipe_writes_policy_and_value_roles_and_no_headless_reward_folder(recipe, workdir, tmp_path):
    run(recipe, cli_args(workdir, tmp_path / "out"))
    out = tmp_path / "out"
    assert (out / "policy" / "adapter_model.safetensors").is_file()
    assert {"adapter_model.safetensors", "head.safetensors", "head_config.json"} <= {
        p.name for p in (out / "value").iterdir()
    }
    # peft would save the frozen reward adapter (without its head) as <output_dir>/reward: not a loadable role folder
    assert not (out / "reward").exists()


def test_two_runs_with_the_same_seed_give_identical_adapters(recipe, workdir, tmp_path):
    torch.manual_seed(123)  # the global RNG state the recipe finds must not matter
    run(recipe, cli_args(workdir, tmp_path / "first", "--seed", "7"))
    run(recipe, cli_args(workdir, tmp_path / "second", "--seed", "7"))
    for role in ("policy", "value"):
        first, second = adapter_files(tmp_path / "first" / role), adapter_files(tmp_path / "second" / role)
        assert first and first.keys() == second.keys()
        for file in first:
            for key in first[file]:
                torch.testing.assert_close(second[file][key], first[file][key], atol=0, rtol=0, msg=f"{role} {key}")


# ----------------------------------------------------------------------------- --help and flags


def test_help_starts_with_a_short_usage_block_naming_config(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe.make_parser().parse_args_and_config(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    head = out[: out.index("options:")]
    assert out.startswith("usage: ppo.py --config") and len(head.splitlines()) < 30
    for flag in ("--config", "--reward_adapter_path", "--dataset_name", "--long_prompts", "--kl_target"):
        assert flag in head
    # every flag the block names is a real one
    for flag in set(re.findall(r"--[a-z0-9_]+", head)) - {"--config"}:
        assert f"\n  {flag} " in out or f"\n  {flag}," in out, flag


def test_use_peft_is_accepted_and_false_is_refused(recipe, workdir, tmp_path):
    script_args, _, _ = recipe.make_parser().parse_args_and_config(cli_args(workdir, tmp_path, "--use_peft"))
    assert script_args.use_peft
    with pytest.raises(ValueError, match="always trains LoRA adapters"):
        run(recipe, cli_args(workdir, tmp_path, "--use_peft", "false"))


def test_both_reward_flags_are_refused(recipe, workdir, tmp_path):
    with pytest.raises(ValueError, match="Both --reward_adapter_path .* and --reward_model_name_or_path"):
        run(recipe, cli_args(workdir, tmp_path, "--reward_model_name_or_path", str(workdir / "model")))


# ----------------------------------------------------------------------------- bad input, before training


def test_missing_local_model_folder_is_named(recipe, workdir, tmp_path):
    args = cli_args(workdir, tmp_path)
    args[args.index("--model_name_or_path") + 1] = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(FileNotFoundError, match="--model_name_or_path .*: no such folder"):
        run(recipe, args)


def test_missing_reward_folder_is_named(recipe, workdir, tmp_path):
    args = cli_args(workdir, tmp_path)
    args[args.index("--reward_adapter_path") + 1] = str(tmp_path / "reward")
    with pytest.raises(FileNotFoundError, match="--reward_adapter_path .*: no such folder"):
        run(recipe, args)


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_jsonl_is_a_clear_error(recipe, workdir, tmp_path, content):
    (tmp_path / "empty.jsonl").write_text(content)
    with pytest.raises(ValueError, match="empty.jsonl holds no records"):
        run(recipe, cli_args(workdir, tmp_path, "--dataset_name", str(tmp_path / "empty.jsonl")))


def test_malformed_jsonl_line_is_named(recipe, workdir, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n{"prompt": "d"}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl, line 3: not valid JSON"):
        run(recipe, cli_args(workdir, tmp_path, "--dataset_name", str(path)))


def test_long_prompt_is_named_by_its_record_before_training(recipe, workdir, tmp_path):
    rows = [{"prompt": p} for p in PROMPTS * 4]
    rows[13] = {"prompt": "x" * 40}
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    args = cli_args(workdir, tmp_path / "out", "--dataset_name", str(path), "--max_steps", "4")
    with pytest.raises(ValueError, match=r"record 13 \(0-based\): field 'prompt' has 40 tokens"):
        run(recipe, args)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # failed before any step


def test_long_prompts_drop_trains_on_the_rest(recipe, workdir, tmp_path, caplog):
    rows = [{"prompt": p} for p in PROMPTS * 4]
    rows[13] = {"prompt": "x" * 40}
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    trainer = run(recipe, cli_args(workdir, tmp_path / "out", "--dataset_name", str(path), "--long_prompts", "drop"))
    assert "dropped 1 of 16 prompts longer than 32 tokens" in caplog.text
    assert len(trainer.train_dataset) == 15 and "x" * 40 not in trainer.train_dataset["prompt"]


def test_eval_strategy_with_a_single_file_names_the_missing_split(recipe, workdir, tmp_path):
    with pytest.raises(ValueError, match=r"evaluates on split 'test' .* has only \['train'\]"):
        run(recipe, cli_args(workdir, tmp_path, "--eval_strategy", "steps", "--eval_steps", "1"))


def test_ppo_yaml_points_at_the_folder_the_reward_recipe_writes():
    # the reward recipe writes the role folder as its --output_dir itself (no value/ or reward/ below it)
    header = (ROOT / "recipes" / "configs" / "ppo.yaml").read_text()
    reward_path = re.search(r"--reward_adapter_path (\S+)", header).group(1)
    reward_yaml = (ROOT / "recipes" / "configs" / "reward.yaml").read_text()
    assert reward_path == re.search(r"^output_dir: (\S+)", reward_yaml, re.M).group(1) == "out/reward"
