"""Stage 1: sample K completions per prompt from the base model and rank them by VADER.

Writes a JSON-lines file in the ranked format (docs/kway.md), conversational:
`{"prompt": [{"role": "user", ...}], "completions": [[{"role": "assistant", ...}], ...], "scores": [...]}`
with completions best first. Two kinds of samples cannot be trained on, and are dropped and counted,
never silently: empty completions (the model ended its turn at once; the ranked-data validator
rejects them), and lists left with fewer than two completions or whose completions all score the
same, which state no preference.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm
from transformers import set_seed

from .generation import SamplingConfig, sample_batch
from .sentiment import completion_text, is_all_tied, ranked_record

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankedDatasetStats:
    """What a ranked file holds, and what was dropped on the way."""

    n_prompts: int
    n_written: int
    n_empty_completions: int  # dropped from their lists
    n_lists_dropped: int  # fewer than two completions left, or (with drop_all_tied) all scores equal
    mean_score: float  # mean VADER compound over every sampled completion, dropped ones included


def ranked_completions(
    model, tokenizer, conversations: list[list[dict]], k: int, sampling: SamplingConfig, batch_size: int, desc: str
) -> list[dict]:
    """One ranked record per conversation: K sampled completions ordered best first by VADER."""
    records = []
    for start in tqdm(range(0, len(conversations), batch_size), desc=desc, unit="batch"):
        chunk = conversations[start : start + batch_size]
        batch = sample_batch(model, tokenizer, chunk, num_samples=k, sampling=sampling)
        for i, conversation in enumerate(chunk):
            completions = [[{"role": "assistant", "content": t}] for t in batch.texts[i * k : (i + 1) * k]]
            records.append(ranked_record(conversation, completions))
    return records


def without_empty_completions(record: dict) -> dict:
    """The record with its empty completions removed (order and scores of the rest unchanged)."""
    keep = [i for i, c in enumerate(record["completions"]) if completion_text(c).strip()]
    completions, scores = record["completions"], record["scores"]
    return {**record, "completions": [completions[i] for i in keep], "scores": [scores[i] for i in keep]}


def write_ranked_dataset(records: list[dict], path: Path, drop_all_tied: bool = True) -> RankedDatasetStats:
    """Write `records` as JSON lines, without empty completions (and without lists that state no
    preference, if asked), and return what was written and dropped."""
    scores = [s for r in records for s in r["scores"]]
    cleaned = [without_empty_completions(r) for r in records]
    n_empty = sum(len(r["completions"]) for r in records) - sum(len(r["completions"]) for r in cleaned)
    kept = [r for r in cleaned if len(r["completions"]) >= 2 and not (drop_all_tied and is_all_tied(r))]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in kept:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    stats = RankedDatasetStats(
        n_prompts=len(records),
        n_written=len(kept),
        n_empty_completions=n_empty,
        n_lists_dropped=len(records) - len(kept),
        mean_score=sum(scores) / max(len(scores), 1),
    )
    logger.info("%s: %d ranked lists written; dropped %d empty completions and %d lists that state no preference",
                path, stats.n_written, stats.n_empty_completions, stats.n_lists_dropped)  # fmt: skip
    return stats


def build_ranked_dataset(
    model,
    tokenizer,
    conversations: list[list[dict]],
    path: Path,
    *,
    k: int,
    sampling: SamplingConfig,
    batch_size: int,
    seed: int,
    drop_all_tied: bool = True,
) -> RankedDatasetStats:
    """Sample, rank and write one ranked dataset file; seeded, so a rerun reproduces it on the same machine."""
    if k < 2:
        raise ValueError(f"a ranking needs at least 2 completions per prompt, got k={k}")
    set_seed(seed)
    records = ranked_completions(model, tokenizer, conversations, k, sampling, batch_size, desc=f"sampling {path.stem}")
    return write_ranked_dataset(records, path, drop_all_tied)


def read_ranked_dataset(path: str | Path) -> list[dict]:
    """The records of a ranked JSON-lines file."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
