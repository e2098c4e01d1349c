"""What `--push_to_hub` uploads from each recipe, and the model cards they write, without network.

huggingface_hub's `HfApi.create_repo` / `HfApi.upload_folder` are replaced by a recorder that copies the folder it is
given; the copy is then loaded as a stranger would load the repository (the real upload is not exercised here).
"""

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.hf_api import RepoUrl
from peft import AutoPeftModelForCausalLM
from scripts import load_recipe
from transformers import AutoTokenizer

from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head
from rlhf_ext.testing import save_tiny_model, tiny_causal_lm

ROOT = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_FakeTokenThatMustNeverBeUploaded0123"
PROMPTS = ["abc", "hello", "xy", "qrs"]


class FakeHub:
    """Records create_repo and copies each uploaded folder; `fail` makes the upload raise like a network error."""

    def __init__(self, root: Path, fail: bool = False):
        self.root, self.fail = root, fail
        self.repos: list[str] = []
        self.uploads: list[tuple[str, Path, dict]] = []

    def install(self, monkeypatch) -> "FakeHub":
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.repos.append(repo_id)
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(api, *, repo_id, folder_path, **kwargs):
            if hub.fail:
                raise OSError("simulated: the Hub could not be reached")
            copy = hub.root / f"upload{len(hub.uploads)}"
            shutil.copytree(folder_path, copy)
            hub.uploads.append((repo_id, copy, kwargs))
            return "commit"

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
        return self


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny base in `model/`, a reward role folder for it, prompts, and ranked lists of K = 2, 3 and 4."""
    root = tmp_path_factory.mktemp("hub_push")
    save_tiny_model(root / "model", seed=0)
    donor = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    save_adapter_with_head(donor.peft_model, "value", donor.heads["value"], root / "reward", "reward")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 4))
    rows = []
    for i in range(12):
        k = 2 + i % 3
        rows.append({"prompt": f"q{i} ", "completions": ["b" * (k - j) + "a" * j for j in range(k)],
                     "scores": [float(k - j) for j in range(k)]})
    (root / "ranked.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def recipe_argv(name: str, workdir: Path, output_dir: Path, *extra: str) -> list[str]:
    """Tiny flags for `recipes/<name>.py` with its shipped YAML."""
    common = ["--config", str(ROOT / "recipes" / "configs" / f"{name}.yaml"), "--model_name_or_path",
              str(workdir / "model"), "--output_dir", str(output_dir), "--use_cpu", "true", "--logging_steps", "1",
              "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no"]
    if name in ("ppo", "online_kway"):
        k = "4" if name == "online_kway" else "1"
        return [*common, "--reward_adapter_path", str(workdir / "reward"), "--dataset_name",
                str(workdir / "prompts.jsonl"), "--lora_r", "4", "--lora_alpha", "8", "--per_device_train_batch_size",
                "4", "--num_generations", k, "--steps_per_generation", "1", "--max_completion_length", "6",
                "--max_steps", "1", "--learning_rate", "1e-2", *extra]  # fmt: skip
    return [*common, "--dataset_name", str(workdir / "ranked.jsonl"), "--max_steps", "2",
            "--per_device_train_batch_size", "3", "--max_length", "64", "--lora_target_modules", "q_proj", "v_proj",
            "--lora_r", "4", "--lora_alpha", "8", *extra]  # fmt: skip


def run(name: str, argv: list[str]):
    recipe = load_recipe(name)
    return recipe.main(*recipe.make_parser().parse_args_and_config(argv))


def assert_no_secret_or_local_path(folder: Path, *local_paths: Path) -> None:
    """No uploaded file holds the token or an absolute path of this machine."""
    needles = [FAKE_TOKEN, str(ROOT), *(str(p) for p in local_paths)]
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for needle in needles:
                assert needle.encode() not in data, f"{path.relative_to(folder)} contains {needle}"


def card_of(folder: Path):
    card = ModelCard.load(folder / "README.md")
    assert "[More Information Needed]" not in card.text and "huggingface.co/None" not in card.text
    return card


# ----------------------------------------------------------------------------- PPO and online K-way: the policy repo


@pytest.mark.parametrize("name", ["ppo", "online_kway"])
def test_pushed_policy_repo_loads_as_a_peft_model(name, workdir, tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    out = tmp_path / "out"
    run(name, recipe_argv(name, workdir, out, "--push_to_hub", "true", "--hub_model_id", f"me/{name}-tiny"))

    assert len(hub.uploads) == 1, "pushed once, after everything is written"
    repo_id, repo, _ = hub.uploads[0]
    assert repo_id == f"me/{name}-tiny"
    assert_no_secret_or_local_path(repo, workdir, tmp_path)
    assert not (repo / "training_args.bin").exists()  # a pickle of local paths: stays local

    monkeypatch.chdir(workdir)  # the adapter names its local base by folder name: `model`, found from here
    model = AutoPeftModelForCausalLM.from_pretrained(str(repo))
    tokenizer = AutoTokenizer.from_pretrained(str(repo))
    ids = tokenizer("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size

    card = card_of(repo)
    assert {"rlhf_ext", "trl"} <= set(card.data.tags)
    assert card.data.get("base_model") is None  # a local base: never its path
    assert card.data.eval_results, "model-index from the final metrics"
    method = "PPO with GAE" if name == "ppo" else "Online K-way"
    assert method in card.text and "prompts.jsonl" in card.text and "reward" in card.text
    assert "learning_rate" in card.text
    if name == "ppo":
        assert {"adapter_config.json", "head.safetensors", "head_config.json", "README.md"} <= {
            p.name for p in (repo / "value").iterdir()
        }
        value_card = card_of(repo / "value")
        assert "value" in value_card.data.tags and 'folder + "/value"' in value_card.text  # its place in the repo
    # the local output is the same as without a push: nothing staged is left behind
    assert not [p for p in out.iterdir() if p.name.startswith("_")]


def test_a_failed_upload_leaves_the_local_output_complete(workdir, tmp_path, monkeypatch):
    FakeHub(tmp_path / "hub", fail=True).install(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="simulated"):
        run("ppo", recipe_argv("ppo", workdir, out, "--push_to_hub", "true", "--hub_model_id", "me/ppo-tiny"))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= {
        p.name for p in (out / "policy").iterdir()
    }
    assert {"head.safetensors", "README.md"} <= {p.name for p in (out / "value").iterdir()}
    card_of(out / "policy")
    assert not [p for p in out.iterdir() if p.name.startswith("_")]


# ----------------------------------------------------------------------------- DPO and reward: cards and the repo


def test_dpo_push_uploads_a_loadable_adapter_with_a_card_saying_what_was_trained(workdir, tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    run("dpo", recipe_argv("dpo", workdir, tmp_path / "out", "--push_to_hub", "true", "--hub_model_id", "me/dpo"))
    assert len(hub.uploads) == 1
    repo = hub.uploads[0][1]
    assert_no_secret_or_local_path(repo, workdir, tmp_path)
    card = card_of(repo)
    assert "K-way Plackett-Luce DPO" in card.text and "K = 2 to 4" in card.text and "ranked.jsonl" in card.text
    assert "beta" in card.text and "loss" in card.text
    assert {"rlhf_ext", "trl", "dpo", "plackett-luce"} <= set(card.data.tags)
    assert card.data.eval_results
    monkeypatch.chdir(workdir)
    AutoPeftModelForCausalLM.from_pretrained(str(repo))
    AutoTokenizer.from_pretrained(str(repo))


def test_reward_role_folder_gets_a_card(workdir, tmp_path):
    run("reward", recipe_argv("reward", workdir, tmp_path / "out"))
    card = card_of(tmp_path / "out")
    assert "K-way Plackett-Luce reward model" in card.text and "K = 2 to 4" in card.text
    assert {"rlhf_ext", "trl", "reward-model", "reward"} <= set(card.data.tags)
    assert "accuracy" in card.text and card.data.eval_results
    assert str(workdir) not in (tmp_path / "out" / "README.md").read_text()
    assert 'SharedBase.from_pretrained("model", SharedBaseArguments(reward_adapter_path=folder))' in card.text


def test_card_names_a_hub_base_and_only_the_folder_name_of_a_local_one():
    from rlhf_ext.cards import CardInfo, render_card

    info = CardInfo(title="t", summary="s", method="m", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                    dataset="trl-lib/tldr", metrics={"reward": 0.5})
    card = ModelCard(render_card(info))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.datasets == ["trl-lib/tldr"]
    local = ModelCard(render_card(CardInfo(title="t", summary="s", method="m", base_model="/abs/path/my-base",
                                           dataset="/abs/data/ranked.jsonl")))
    assert local.data.get("base_model") is None and local.data.get("datasets") is None
    assert "/abs" not in local.content and "my-base" in local.text and "ranked.jsonl" in local.text
