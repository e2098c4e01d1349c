"""Reuse a stage's outputs on a rerun when the stage's configuration has not changed.

Each stage writes a marker file (`<output_dir>/.stages/<stage>.json`) after its outputs, holding the
configuration it ran with and a summary of its results. A rerun skips the stage when the marker
exists and its configuration equals the new one; any change (more prompts, another seed, another
base model, a changed upstream stage) reruns it. An interrupted stage has no marker, so it reruns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _canonical(config: dict[str, Any]) -> str:
    # default=str so paths and other simple objects compare by their text form.
    return json.dumps(config, sort_keys=True, default=str)


def is_done(marker: str | Path, config: dict[str, Any]) -> bool:
    """True when `marker` records a finished run of a stage with exactly this configuration."""
    marker = Path(marker)
    if not marker.is_file():
        return False
    return _canonical(json.loads(marker.read_text())["config"]) == _canonical(config)


def mark_done(marker: str | Path, config: dict[str, Any], summary: dict[str, Any]) -> None:
    """Record that a stage finished with `config`; `summary` holds what later stages and the report need."""
    marker = Path(marker)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"config": json.loads(_canonical(config)), "summary": summary}, indent=2))


def read_summary(marker: str | Path) -> dict[str, Any]:
    """The summary a finished stage recorded, so a skipped stage still feeds the report."""
    return json.loads(Path(marker).read_text())["summary"]
