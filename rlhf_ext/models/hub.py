"""Model cards and Hub upload for the roles of a SharedBase.

Uploading is split in two so the files can be tested without network: `SharedBase.save_for_hub`
writes exactly what will be uploaded (role folder or merged policy, plus README.md), and
`push_folder_to_hub` uploads a folder as it is. The token comes from the argument or the
environment (HF_TOKEN) through huggingface_hub, and is never logged.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

from ..names import hub_id, public_name

LIBRARY_TAGS = ["rlhf_ext", "trl", "rlhf", "ppo"]
ROLE_DESCRIPTIONS = {
    "policy": "the PPO policy (actor): a LoRA adapter whose logits come from the base model's LM head",
    "value": "the PPO value model (critic): a LoRA adapter plus a scalar head on the last hidden state",
    "reward": "a reward model: a LoRA adapter plus a scalar head scoring the last real token",
}


def model_card(base_model: str | None, role: str, merged: bool = False) -> str:
    """README.md text (YAML metadata + description) for a role uploaded as an adapter or a merged model."""
    if role not in ROLE_DESCRIPTIONS:
        raise ValueError(f"No model card for role {role!r}; roles with weights are {sorted(ROLE_DESCRIPTIONS)}.")
    if merged and role != "policy":
        raise ValueError("Only the policy is exported merged; value and reward need their head folder.")
    data = ModelCardData(
        base_model=hub_id(base_model),  # a local base: never its path (the Hub links this field)
        library_name="transformers" if merged else "peft",
        tags=[*LIBRARY_TAGS, role, *([] if merged else ["lora"])],
        pipeline_tag="text-generation" if role == "policy" else None,
    )
    form = "merged into the base weights (a standalone model)" if merged else "as a LoRA adapter folder"
    loading = (
        "AutoModelForCausalLM.from_pretrained(repo_id)"
        if merged
        else "SharedBase.load_role(role, folder) from rlhf_ext, or peft's PeftModel.from_pretrained(base, repo_id)"
    )
    body = (
        f"# {role.capitalize()} trained with rlhf_ext\n\n"
        f"This repository holds {ROLE_DESCRIPTIONS[role]}, {form}.\n\n"
        f"- **Base model:** {public_name(base_model) or 'unknown'}\n"
        "- **Method:** PPO with one shared base: policy and value are LoRA adapters of the same base, the reward "
        "model is a frozen LoRA adapter with a score head, the reference is the base with adapters disabled.\n"
        f"- **Load with:** `{loading}`\n"
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").content


def write_model_card(directory: str | os.PathLike, base_model: str | None, role: str, merged: bool = False) -> Path:
    """Write README.md for `role` into `directory`; returns its path."""
    path = Path(directory) / "README.md"
    path.write_text(model_card(base_model, role, merged))
    return path


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload with rlhf_ext",
):
    """Create `repo_id` if needed and upload every file of `folder`; returns huggingface_hub's CommitInfo."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
