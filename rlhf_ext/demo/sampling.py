"""Stage 1: sample K completions per prompt from the base model and rank them by VADER.

Writes a JSON-lines file in the DESIGN.md ranked format, conversational:
`{"prompt": [{"role": "user", ...}], "completions": [[{"role": "assistant", ...}], ...], "scores": [...]}`
with completions best first. Lists whose K completions all score the same state no preference;
they are dropped and counted (`n_all_tied`), never silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm
from transformers import set_seed

from .generation import SamplingConfig, sample_batch
from .prompts import as_conversation
from .sentiment import is_all_tied, ranked_record

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankedDatasetStats:
    """What a ranked file holds: how many lists were written and how many all-tied lists were dropped."""

    n_prompts: int
    n_written: int
    n_all_tied: int
    mean_score: float  # mean VADER compound over every sampled completion, tied lists included


def ranked_completions(
    model, tokenizer, prompts: list[str], k: int, sampling: SamplingConfig, batch_size: int, desc: str
) -> list[dict]:
    """One ranked record per prompt: K sampled completions ordered best first by VADER."""
    records = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        chunk = prompts[start : start + batch_size]
        batch = sample_batch(model, tokenizer, chunk, num_samples=k, sampling=sampling)
        for i, prompt in enumerate(chunk):
            completions = [[{"role": "assistant", "content": t}] for t in batch.texts[i * k : (i + 1) * k]]
            records.append(ranked_record(as_conversation(prompt), completions))
    return records


def write_ranked_dataset(records: list[dict], path: Path, drop_all_tied: bool = True) -> RankedDatasetStats:
    """Write `records` as JSON lines (dropping all-tied lists if asked) and return what was written."""
    scores = [s for r in records for s in r["scores"]]
    kept = [r for r in records if not (drop_all_tied and is_all_tied(r))]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in kept:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    stats = RankedDatasetStats(
        n_prompts=len(records),
        n_written=len(kept),
        n_all_tied=len(records) - len(kept),
        mean_score=sum(scores) / max(len(scores), 1),
    )
    logger.info("%s: %d ranked lists written, %d all-tied lists dropped", path, stats.n_written, stats.n_all_tied)
    return stats


def build_ranked_dataset(
    model,
    tokenizer,
    prompts: list[str],
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
    records = ranked_completions(model, tokenizer, prompts, k, sampling, batch_size, desc=f"sampling {path.stem}")
    return write_ranked_dataset(records, path, drop_all_tied)


def read_ranked_dataset(path: str | Path) -> list[dict]:
    """The records of a ranked JSON-lines file."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
