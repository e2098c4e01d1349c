"""Load a dataset (preferences or prompts) by Hub name or from a local json / jsonl / parquet file."""

from __future__ import annotations

from pathlib import Path

from datasets import DatasetDict, load_dataset

# file suffix -> the `datasets` builder that reads it
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_dataset_or_file(name_or_path: str, config: str | None = None) -> DatasetDict:
    """A DatasetDict from a local .json/.jsonl/.parquet file (one "train" split) or a dataset name / folder."""
    suffix = Path(name_or_path).suffix.lower()
    if suffix in LOCAL_FORMATS:
        if not Path(name_or_path).is_file():
            raise FileNotFoundError(f"dataset file {name_or_path} does not exist")
        return load_dataset(LOCAL_FORMATS[suffix], data_files={"train": name_or_path})
    return load_dataset(name_or_path, name=config)
