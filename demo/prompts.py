"""The demo's prompts: short conversational requests written for this project, one per line in
`prompts.txt`, and a fixed train / held-out split.

The split does not depend on file order: the held-out prompts are the `n_heldout` prompts with the
smallest SHA-256 digest of their text. It is the same on every machine and every run, and editing
one line moves at most that prompt (and the one it displaces) across the boundary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("prompts.txt")
N_HELDOUT = 60


@dataclass(frozen=True)
class PromptSplit:
    """Prompts for training (sampling, reward, PPO, DPO) and held-out prompts for evaluation only."""

    train: list[str]
    heldout: list[str]


def load_prompts(path: str | Path = PROMPTS_FILE) -> list[str]:
    """All prompts in file order, blank lines skipped; raises on a duplicate so the split stays clean."""
    prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    seen: set[str] = set()
    for line_number, prompt in enumerate(prompts, start=1):
        if prompt in seen:
            raise ValueError(f"{path}: prompt {line_number} is a duplicate: {prompt!r}")
        seen.add(prompt)
    return prompts


def _digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def split_prompts(prompts: list[str], n_heldout: int = N_HELDOUT) -> PromptSplit:
    """Held-out = the `n_heldout` prompts with the smallest SHA-256; train = the rest, in file order."""
    if not 0 < n_heldout < len(prompts):
        raise ValueError(f"n_heldout must be between 1 and {len(prompts) - 1}, got {n_heldout}")
    heldout = sorted(prompts, key=_digest)[:n_heldout]
    heldout_set = set(heldout)
    return PromptSplit(train=[p for p in prompts if p not in heldout_set], heldout=heldout)


def demo_split(n_train: int | None = None, n_heldout: int = N_HELDOUT) -> PromptSplit:
    """The demo's split of `prompts.txt`, optionally keeping only the first `n_train` training prompts.

    Shrinking `n_train` (for a faster run, or the CI variant) never changes the held-out set.
    """
    split = split_prompts(load_prompts(), n_heldout)
    train = split.train if n_train is None else split.train[:n_train]
    return PromptSplit(train=train, heldout=split.heldout)


def as_conversation(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """A prompt as a one-turn conversation, the form the ranked dataset and the chat template use.

    With `system_prompt=None` the chat template supplies its own default system turn, if it has one
    (SmolLM2's adds 16 tokens to every prompt; the demo passes "" to keep sequences short).
    """
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return system + [{"role": "user", "content": prompt}]
