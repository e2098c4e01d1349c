"""Model cards and Hub upload of SharedBase roles, without network (HfApi is replaced by a recorder)."""

from pathlib import Path

import pytest
import yaml

from rlhf_ext.models import SharedBase, SharedBaseArguments, hub, model_card
from rlhf_ext.testing import save_tiny_model


def card_metadata(text: str) -> dict:
    """The YAML front matter of a README.md."""
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records calls and the files present at upload time."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, repo_id, folder_path, commit_message):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        readme = (Path(folder_path) / "README.md").read_text()
        self.calls.append(("upload_folder", repo_id, files, readme))
        return "commit-info"


@pytest.fixture
def shared(tmp_path):
    return SharedBase.from_pretrained(save_tiny_model(tmp_path / "tiny-base"), SharedBaseArguments(lora_r=4))


def test_adapter_card_names_base_method_and_tags():
    metadata = card_metadata(model_card("org/base", "value"))
    assert metadata["base_model"] == "org/base"
    assert metadata["library_name"] == "peft"
    assert {"rlhf_ext", "trl", "ppo", "lora", "value"} <= set(metadata["tags"])
    merged = card_metadata(model_card("org/base", "policy", merged=True))
    assert merged["library_name"] == "transformers" and merged["pipeline_tag"] == "text-generation"
    assert "lora" not in merged["tags"]
    with pytest.raises(ValueError, match="Only the policy"):
        model_card("org/base", "reward", merged=True)


def test_push_adapter_uploads_the_role_folder_with_its_card(shared, monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr(hub, "HfApi", RecordingHfApi)
    assert shared.push_to_hub("me/value", role="value", private=True) == "commit-info"

    (_, repo, kwargs), (_, upload_repo, files, readme) = RecordingHfApi.calls
    assert repo == upload_repo == "me/value" and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "base_fingerprint.json",
                     "head.safetensors", "head_config.json"]
    # a local base is never named by its path: left out of the metadata, its folder name in the text
    assert "base_model" not in card_metadata(readme) and "tiny-base" in readme
    assert str(shared.base_model_name_or_path) not in readme


def test_push_merged_policy_uploads_a_standalone_model(shared, monkeypatch, tokenizer):
    RecordingHfApi.calls = []
    monkeypatch.setattr(hub, "HfApi", RecordingHfApi)
    shared.push_to_hub("me/policy", merged=True, tokenizer=tokenizer)
    (_, _, files, readme) = RecordingHfApi.calls[1]
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert not any(name.startswith("adapter") for name in files)
    assert card_metadata(readme)["library_name"] == "transformers"


def test_save_for_hub_writes_what_push_uploads(shared, tmp_path):
    folder = shared.save_for_hub("policy", tmp_path / "upload")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "base_fingerprint.json",
    ]
    with pytest.raises(ValueError, match="reference"):
        shared.save_for_hub("reference", tmp_path / "nothing")
