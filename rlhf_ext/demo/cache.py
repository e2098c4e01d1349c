"""Reuse a stage's outputs on a rerun when the stage's configuration has not changed.

Each stage writes `stage.json` into its output folder last, holding the configuration it ran
with. A rerun skips the stage when that file exists and its configuration equals the new one; any
change (more prompts, another seed, another base model) reruns the stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STAGE_FILE = "stage.json"


def _canonical(config: dict[str, Any]) -> str:
    # default=str so paths and other simple objects compare by their text form.
    return json.dumps(config, sort_keys=True, default=str)


def is_done(out_dir: str | Path, config: dict[str, Any]) -> bool:
    """True when `out_dir` holds a finished run of a stage with exactly this configuration."""
    marker = Path(out_dir) / STAGE_FILE
    if not marker.is_file():
        return False
    return _canonical(json.loads(marker.read_text())["config"]) == _canonical(config)


def mark_done(out_dir: str | Path, config: dict[str, Any], summary: dict[str, Any] | None = None) -> None:
    """Record that the stage in `out_dir` finished with `config`; `summary` holds its headline numbers."""
    marker = Path(out_dir) / STAGE_FILE
    marker.write_text(json.dumps({"config": json.loads(_canonical(config)), "summary": summary or {}}, indent=2))


def read_summary(out_dir: str | Path) -> dict[str, Any]:
    """The summary a finished stage recorded, e.g. to report it again when the stage is skipped."""
    return json.loads((Path(out_dir) / STAGE_FILE).read_text())["summary"]
