"""The README's commands connect: the shipped configs read the shipped example data, the reward recipe writes the
folder every PPO command reads, every output folder is git-ignored, and reward -> PPO -> push runs as written."""

import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from peft import AutoPeftModelForCausalLM
from scripts import load_recipe
from test_hub_push import FakeHub, assert_no_secret_or_local_path

from rlhf_ext.testing import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
RECIPE_CONFIGS = ["dpo", "reward", "ppo", "online_kway"]
# Only sizes and steps are made tiny; paths, data and every other setting come from the shipped YAML
TINY = {
    "reward": ["--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "48", "--lora_r", "4",
               "--lora_alpha", "8", "--use_cpu", "true", "--logging_steps", "1"],
    "ppo": ["--max_steps", "1", "--per_device_train_batch_size", "4", "--steps_per_generation", "1",
            "--num_ppo_epochs", "1", "--max_completion_length", "6", "--lora_r", "4", "--lora_alpha", "8",
            "--use_cpu", "true", "--logging_steps", "1", "--completions_every_n_steps", "0"],
}  # fmt: skip


def config(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def readme_chain() -> list[list[str]]:
    """The commands of the README's "From data to the Hub" block, continuation lines joined, comments dropped."""
    section = (ROOT / "README.md").read_text().split("## From data to the Hub", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("accelerate launch"):
            commands.append(shlex.split(line.replace("<your name>", "me")))
    return commands


def test_shipped_configs_read_the_example_data_the_repository_ships():
    for name in RECIPE_CONFIGS:
        data = config(name)["dataset_name"]
        assert (ROOT / data).is_file(), f"{name}.yaml: dataset_name {data} is not in the repository"
    lines = (ROOT / "recipes" / "data" / "ranked_example.jsonl").read_text().splitlines()
    assert 16 <= len(lines) <= 64


def test_the_reward_folder_is_one_path_everywhere():
    written = config("reward")["output_dir"]
    assert written == "out/reward"
    for doc in ["README.md", "docs/distributed.md", "docs/ppo.md", "docs/kway.md", "recipes/ppo.py",
                "recipes/online_kway.py", "recipes/configs/ppo.yaml", "recipes/configs/online_kway.yaml"]:
        read = set(re.findall(r"--reward_adapter_path ([\w.~-]+/[\w./-]+)", (ROOT / doc).read_text()))
        assert read <= {written}, f"{doc} reads {read}, the reward recipe writes {written}"


def test_every_output_folder_a_config_writes_is_git_ignored():
    # read .gitignore itself rather than ask git: the test also runs from an exported tree without .git
    patterns = {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()}
    for path in CONFIGS.glob("*.yaml"):
        output_dir = yaml.safe_load(path.read_text())["output_dir"]
        parents = {"/".join(Path(output_dir).parts[: i + 1]) for i in range(len(Path(output_dir).parts))}
        assert parents & patterns, f"{path.name}: output_dir {output_dir} is not covered by .gitignore"


@pytest.mark.parametrize("name", ["dpo", "reward"])
def test_a_missing_data_path_from_the_yaml_names_the_key_and_the_file(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the YAML's relative dataset path does not exist from here
    parser = load_recipe(name).make_parser()
    with pytest.raises(FileNotFoundError, match=rf"dataset_name.*recipes/data/ranked_example.jsonl.*{name}.yaml"):
        parser.parse_args_and_config(["--config", str(CONFIGS / f"{name}.yaml")])


def test_the_readme_chain_reward_ppo_push_runs_as_written(tmp_path, monkeypatch):
    commands = readme_chain()
    assert [c[2] for c in commands] == ["recipes/reward.py", "recipes/ppo.py"]
    save_tiny_model(tmp_path / "tiny", seed=0)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")  # a clone's layout; outputs land in tmp_path
    monkeypatch.chdir(tmp_path)
    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    for command in commands:
        name = Path(command[2]).stem
        recipe = load_recipe(name)
        argv = [*command[3:], "--model_name_or_path", str(tmp_path / "tiny"), *TINY[name]]
        recipe.main(*recipe.make_parser().parse_args_and_config(argv))
    assert (tmp_path / "out" / "reward" / "head.safetensors").is_file()
    assert (tmp_path / config("ppo")["output_dir"] / "policy" / "adapter_model.safetensors").is_file()
    assert len(hub.uploads) == 1
    repo_id, repo, _ = hub.uploads[0]
    assert repo_id.startswith("me/")
    assert_no_secret_or_local_path(repo, tmp_path)
    shutil.move(tmp_path / "tiny", tmp_path / "elsewhere")  # the stranger has the base by the name the repo gives
    (tmp_path / "sandbox").mkdir()
    shutil.move(tmp_path / "elsewhere", tmp_path / "sandbox" / "tiny")
    monkeypatch.chdir(tmp_path / "sandbox")
    AutoPeftModelForCausalLM.from_pretrained(str(repo))
    assert "ranked_example.jsonl" in ModelCard.load(repo / "README.md").text
