"""A recipe's Hub push: once, after everything (weights, tokenizer, cards) is written locally, from a staged copy.

Why not TRL's push: with `push_to_hub` the Trainer creates the repository when it is built, uploads `output_dir` at
every checkpoint, again in `save_model` and again in `push_to_hub`, the first time before the recipe has written the
tokenizer into `policy/`; and it uploads `output_dir` as the repository root, where the PPO and online K-way recipes
keep no model (the policy adapter is in `policy/`). So the recipes take the push away from the Trainer
(`hold_back_push`), write everything, then upload one staged folder:

- PPO and online K-way: the repository root is `<output_dir>/policy` (peft adapter + tokenizer + card), which
  `AutoPeftModelForCausalLM.from_pretrained(repo)` loads; PPO's critic goes to `value/`.
- DPO and reward: the root is `<output_dir>` itself (adapter or model, tokenizer, card).
- Every repository gets `training/hyperparameters.json` and `training/log_history.json`.

Checkpoints and `training_args.bin` (a pickle of local paths) stay local. In the uploaded copy, any absolute local
path in a JSON file (the base model an adapter names, for one) is replaced by its last component: a stranger's load
then finds a Hub base by its id, and a local base by its folder name. The staged copy is a temporary folder inside
`output_dir` (hard links, so nothing large is copied), removed whatever happens: a failed upload leaves the local
output as complete as without a push. The token comes from HF_TOKEN or `hf auth login`, through huggingface_hub.
Tested offline only (the upload call is intercepted): the real upload is not exercised by the test suite.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .models.hub import push_folder_to_hub

NOT_UPLOADED = {"training_args.bin"}


def hold_back_push(training_args) -> bool:
    """Whether the run asked for a push; turns off the Trainer's own pushes so that the recipe pushes once, at the
    end (call it before the Trainer is built: it creates the repository in its constructor)."""
    requested = bool(training_args.push_to_hub)
    training_args.push_to_hub = False
    return requested


def repo_id_for(training_args) -> str:
    """--hub_model_id, or the output folder's name (as the Trainer would name the repository)."""
    return training_args.hub_model_id or Path(training_args.output_dir).absolute().name


def public_json(value):
    """`value` (parsed JSON) with every absolute local path replaced by its last component."""
    if isinstance(value, dict):
        return {key: public_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [public_json(item) for item in value]
    if isinstance(value, str) and os.path.isabs(value) and "\n" not in value:
        return Path(value.rstrip("/")).name
    return value


def _stage_file(source: Path, target: Path) -> None:
    """JSON rewritten without local paths; anything else hard-linked (copied across file systems)."""
    if source.suffix == ".json":
        content = json.loads(source.read_text(encoding="utf-8"))
        public = public_json(content)
        if public != content:  # rewrite only what names a local path; keep every other file byte for byte
            target.write_text(json.dumps(public, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def stage(layout: dict[str, Path], staging: Path, training: dict) -> Path:
    """Fill `staging` with the top-level files of each folder of `layout` ({path in repo: local folder}, "" is the
    root) and `training/` (hyperparameters, log history); returns `staging`."""
    for subfolder, folder in layout.items():
        target = staging / subfolder
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(Path(folder).iterdir()):
            if source.is_file() and source.name not in NOT_UPLOADED and not source.name.startswith(("_", ".")):
                _stage_file(source, target / source.name)
    (staging / "training").mkdir(exist_ok=True)
    for name, content in training.items():
        text = json.dumps(public_json(content), indent=2, default=str)
        (staging / "training" / f"{name}.json").write_text(text + "\n", encoding="utf-8")
    return staging


def push_layout(layout: dict[str, Path], training_args, training: dict):
    """Stage `layout` inside the output folder and upload it as one commit; returns huggingface_hub's CommitInfo."""
    with tempfile.TemporaryDirectory(prefix="_hub_upload_", dir=training_args.output_dir) as staging:
        stage(layout, Path(staging), training)
        return push_folder_to_hub(
            staging, repo_id_for(training_args), private=bool(training_args.hub_private_repo),
            commit_message="Upload with rlhf_ext (recipe output)",
        )  # fmt: skip


def training_record(hyperparameters: dict, log_history: list) -> dict:
    """What goes to `training/`: the card's hyperparameters and the Trainer's log history."""
    return {"hyperparameters": hyperparameters, "log_history": list(log_history)}
