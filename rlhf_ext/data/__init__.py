"""Ranked-preference data: the record schema and its validation, tokenization, and the K-way collator."""

from .collator import DataCollatorForRankedPreference, list_mask, split_into_lists
from .loading import load_dataset_or_file
from .prepare import StreamCounts, prepare_ranked_dataset, tokenize_ranked, truncate_ranked
from .ranked import TIE_POLICIES, normalize_record

__all__ = [
    "DataCollatorForRankedPreference",
    "StreamCounts",
    "TIE_POLICIES",
    "list_mask",
    "load_dataset_or_file",
    "normalize_record",
    "prepare_ranked_dataset",
    "split_into_lists",
    "tokenize_ranked",
    "truncate_ranked",
]
