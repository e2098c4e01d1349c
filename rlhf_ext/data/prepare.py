"""Dataset preparation for K-way preference trainers: validate, order best first, tokenize, truncate.

One pipeline serves both the K-way DPO and the K-way reward trainer, and it tokenizes exactly as TRL's
DPOTrainer does (`_tokenize`, EOS appended to plain-text completions, the completion starting where the
tokenized prompt and prompt+completion diverge), so a pairwise dataset gives TRL's token ids at K=2. Every
sequence prompt_ids + completion_ids[k] equals the tokenization of prompt + completion_k, which is also what
TRL's RewardTrainer scores.

Output columns: `prompt_ids` (list[int]), `completion_ids` (list of K list[int], best first), `num_ranked`
(int, see `rlhf_ext.data.ranked`) and, with a `max_length`, `num_truncated` (int, completions cut).

An empty dataset, or one whose every list is dropped for length, raises a ValueError here, before training:
a trainer would otherwise fail later with an error about a missing sample or column.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase
from trl.data_utils import _tokenize, common_prefix_length

from .ranked import (
    PAIR_ID_FIELDS,
    TIE_POLICIES,
    check_field_mapping,
    normalize_record,
    normalize_tokenized_record,
    tokenized_layout,
)

logger = logging.getLogger(__name__)

TOKENIZED_COLUMNS = ("prompt_ids", "completion_ids", "num_ranked")
_INPUT_COLUMNS = ("prompt", "completions", "chosen", "rejected", "ranking", "scores")
# What an earlier preparation (maybe with another tokenizer) left: dropped when the text is there to re-tokenize.
_DERIVED_COLUMNS = (*TOKENIZED_COLUMNS, "num_truncated", "ref_logps", *(f for pair in PAIR_ID_FIELDS for f in pair))


def _is_conversational(example: dict[str, Any]) -> bool:
    first = example["completions"][0]
    return isinstance(first, list) and len(first) > 0 and isinstance(first[0], dict)


def _chat_template_kwargs(example: dict[str, Any]) -> dict[str, Any]:
    """TRL's per-record chat-template options: a `tools` column (JSON or list) and `chat_template_kwargs`."""
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools, **(example.get("chat_template_kwargs") or {})}


def tokenize_ranked(example: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, list]:
    """Token ids of the shared prompt and of each completion (best first), as TRL's DPOTrainer tokenizes a pair.

    The prompt length is the shortest common prefix of the tokenized prompt with every tokenized
    prompt+completion, so prompt_ids + completion_ids[k] is exactly tokenize(prompt + completion_k).
    """
    prompt, completions = example["prompt"], example["completions"]
    if _is_conversational(example):
        kwargs = _chat_template_kwargs(example)
        prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True, **kwargs)["input_ids"]
        full_ids = [_tokenize(tokenizer, prompt + completion, **kwargs)["input_ids"] for completion in completions]
    else:
        eos = tokenizer.eos_token
        # TRL appends EOS to plain-text completions so the model learns where an answer ends.
        completions = [c if c.endswith(eos) else c + eos for c in completions]
        prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
        full_ids = [_tokenize(tokenizer, prompt + completion)["input_ids"] for completion in completions]
    prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full_ids)
    return {"prompt_ids": prompt_ids[:prompt_len], "completion_ids": [ids[prompt_len:] for ids in full_ids]}


def _tokenize_record(example: dict[str, Any], index: int, tokenizer: PreTrainedTokenizerBase) -> dict[str, list]:
    """`tokenize_ranked`, after checking that the tokenizer has what the record needs: an EOS token to end
    plain-text completions, a chat template for messages. Either missing would crash inside the tokenizer (or,
    for EOS, as `None + str`) without saying which record or setting."""
    if _is_conversational(example):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"record {index}: the record is a list of chat messages, but the tokenizer has no chat template; set "
                "tokenizer.chat_template (or use the model's chat/instruct tokenizer), or give plain-text records"
            )
    elif tokenizer.eos_token is None:
        raise ValueError(
            f"record {index}: plain-text completions get the tokenizer's eos_token appended (as TRL does, so the "
            "model learns where an answer ends), but this tokenizer has none; set tokenizer.eos_token to the token "
            "that ends your model's answers"
        )
    return tokenize_ranked(example, tokenizer)


def has_text_records(column_names: list[str]) -> bool:
    """Whether a dataset holds the text of its lists (completions, or a chosen/rejected pair) beside a prompt."""
    columns = set(column_names)
    return "completions" in columns or {"chosen", "rejected"} <= columns


def truncate_ranked(example: dict[str, Any], max_length: int) -> dict[str, Any]:
    """Cut each prompt+completion to its first `max_length` tokens (TRL's "keep_start"); count the cut completions."""
    room = max_length - len(example["prompt_ids"])
    completion_ids = [ids[:room] for ids in example["completion_ids"]]
    num_truncated = sum(len(ids) > room for ids in example["completion_ids"])
    return {"completion_ids": completion_ids, "num_truncated": num_truncated}


def check_not_empty(dataset: Any, name: str) -> None:
    """Raise a ValueError for a dataset with no records; a stream (`IterableDataset`) is asked for its first record,
    as TRL's trainers do, and other datasets of unknown length pass."""
    if isinstance(dataset, IterableDataset):
        empty = next(iter(dataset), None) is None
    else:
        empty = hasattr(dataset, "__len__") and len(dataset) == 0
    if empty:
        raise ValueError(
            f"{name} dataset is empty: the K-way trainers need at least one record with a prompt and 2 or more "
            "completions"
        )


def count_ties(dataset: Dataset) -> tuple[int, int]:
    """(lists tied at the top, lists cut at a later tie) of a validated dataset, from `num_ranked` and K.

    A list tied at the top has num_ranked = 0: it contributes 0 to the loss. A later tie keeps 0 < m < K - 1.
    """
    column = "completions" if "completions" in dataset.column_names else "completion_ids"  # text or pre-tokenized
    sizes = pc.list_value_length(dataset.with_format("arrow")[column]).to_pylist()
    tied_at_top = cut_at_tie = 0
    for num_ranked, size in zip(dataset["num_ranked"], sizes):
        tied_at_top += num_ranked == 0
        cut_at_tie += 0 < num_ranked < size - 1
    return tied_at_top, cut_at_tie


def _log_ties(dataset: Dataset, name: str) -> None:
    """Log the lists that tied scores cut short: unlogged, a list tied at the top would add 0 to the loss unseen."""
    tied_at_top, cut_at_tie = count_ties(dataset)
    if tied_at_top or cut_at_tie:
        logger.warning(
            "%s dataset: tied scores: %d of %d lists are tied at the top and add nothing to the loss; %d more keep "
            "their ranking only up to the first tie",
            name, tied_at_top, len(dataset), cut_at_tie,
        )


def longest_sequences(dataset: Dataset) -> np.ndarray:
    """Tokens of each tokenized list's longest prompt + completion [num_lists], read from the Arrow columns."""
    table = dataset.with_format("arrow")
    prompt_lengths = pc.list_value_length(table["prompt_ids"]).to_numpy(zero_copy_only=False)
    completions = table["completion_ids"].combine_chunks()
    completion_lengths = pc.list_value_length(completions.flatten()).to_numpy(zero_copy_only=False)
    offsets = completions.offsets.to_numpy()
    # every list holds >= 2 completions, so no segment of reduceat is empty
    return prompt_lengths + np.maximum.reduceat(completion_lengths, offsets[:-1] - offsets[0])


def check_fits_positions(dataset: Dataset, max_length: int | None, max_positions: int | None, name: str) -> None:
    """ValueError naming the first list whose prompt + longest completion, after truncation to `max_length`, is
    longer than the model's `max_positions` (learned positions would fail with an IndexError steps into training,
    rotary ones silently run past their trained range). Lists whose prompt alone fills max_length are dropped later
    and not counted. Nothing to check when max_length already keeps every sequence within the positions."""
    if max_positions is None or (max_length is not None and max_length <= max_positions):
        return
    lengths = longest_sequences(dataset)
    if max_length is not None:
        prompt_lengths = pc.list_value_length(dataset.with_format("arrow")["prompt_ids"]).to_numpy()
        lengths = np.where(prompt_lengths < max_length, np.minimum(lengths, max_length), 0)
    index = int(np.argmax(lengths))
    if lengths[index] > max_positions:
        raise _too_long_error(name, index, int(lengths[index]), max_length, max_positions)


def _too_long_error(name: str, index: int, length: int, max_length: int | None, max_positions: int) -> ValueError:
    """The error for a list whose prompt + longest completion (after truncation) passes the model's positions."""
    setting = "max_length is None (nothing is truncated)" if max_length is None else (
        f"max_length={max_length} is above that limit"
    )
    return ValueError(
        f"{name} dataset, record {index}: its prompt and longest completion are {length} tokens, more "
        f"than the model's max_position_embeddings={max_positions} (learned positions fail with an IndexError during "
        f"training, rotary ones run past what the model was trained on), and {setting}; set max_length to "
        f"{max_positions} or less (it truncates each prompt + completion, keeping the start)"
    )


def check_record_fits_positions(example: dict[str, Any], index: int, max_length: int | None, max_positions: int,
                                name: str) -> dict:
    """`check_fits_positions` for one record of a stream (a map function that changes nothing)."""
    prompt_length = len(example["prompt_ids"])
    length = prompt_length + max(len(ids) for ids in example["completion_ids"])
    if max_length is not None:
        length = min(length, max_length) if prompt_length < max_length else 0
    if length > max_positions:
        raise _too_long_error(name, index, length, max_length, max_positions)
    return {}


def _drop_derived_columns(dataset: Dataset | IterableDataset, columns: list[str], name: str):
    """`dataset` without the token-id columns an earlier preparation left beside the text (logged): the text is
    re-tokenized with this tokenizer, which the old ids may not come from."""
    stale = [c for c in _DERIVED_COLUMNS if c in columns]
    if not stale:
        return dataset
    logger.warning(
        "%s dataset: has text columns and token-id columns %s; re-tokenizing from the text with this tokenizer and "
        "ignoring those columns (they may come from another tokenizer)", name, stale,
    )
    return dataset.remove_columns(stale)


def _log_duplicates(dataset: Dataset, name: str) -> None:
    """Log the copies of completions (equal text, equal score) that validation dropped from their lists."""
    counts = dataset["num_duplicates"]
    dropped = sum(counts)
    if dropped:
        logger.warning(
            "%s dataset: dropped %d duplicated completion(s) (the same text with the same score) from %d of %d lists",
            name, dropped, sum(n > 0 for n in counts), len(dataset),
        )


def _drop_lists_without_room(dataset: Dataset, max_length: int, num_proc: int | None, name: str) -> Dataset:
    """Drop the lists whose prompt alone fills `max_length` (logged); raise if no list is left."""
    num_lists = len(dataset)
    kept = dataset.filter(lambda ex: len(ex["prompt_ids"]) < max_length, num_proc=num_proc)
    if len(kept) == 0:
        shortest = min(len(ids) for ids in dataset["prompt_ids"])
        raise ValueError(
            f"{name} dataset: every one of the {num_lists} lists has a prompt that alone fills max_length="
            f"{max_length} tokens (the shortest prompt has {shortest}), so no completion token is left to train on; "
            "raise max_length or shorten the prompts"
        )
    if len(kept) < num_lists:
        logger.warning(
            "%s dataset: dropped %d of %d lists whose prompt alone fills max_length=%d",
            name, num_lists - len(kept), num_lists, max_length,
        )
    return kept


@dataclass
class StreamCounts:
    """What preparing a stream (`IterableDataset`) dropped, truncated, de-duplicated or found tied, counted as its
    records are read: a stream cannot be counted up front as a map-style dataset is (those counts are logged at
    once). The counts live in the process that reads the stream; `log` writes them."""

    name: str
    max_length: int | None = None
    lists: int = 0  # records read
    kept: int = 0  # lists that reached the batches
    dropped_for_length: int = 0  # prompt alone fills max_length
    truncated_completions: int = 0
    truncated_lists: int = 0
    duplicates: int = 0  # copies of a completion (equal score) dropped
    tied_at_top: int = 0  # add nothing to the loss
    cut_at_tie: int = 0  # ranking known only up to a later tie

    def count_validated(self, example: dict[str, Any]) -> dict:
        """Map function after validation: count the record, its dropped copies and its ties; changes nothing."""
        size = len(example["completions"] if "completions" in example else example["completion_ids"])
        self.lists += 1
        self.duplicates += example["num_duplicates"]
        self.tied_at_top += example["num_ranked"] == 0
        self.cut_at_tie += 0 < example["num_ranked"] < size - 1
        return {}

    def has_room(self, example: dict[str, Any]) -> bool:
        """Filter function: keep a list whose prompt leaves room for a completion token under max_length."""
        if len(example["prompt_ids"]) < self.max_length:
            return True
        self.dropped_for_length += 1
        return False

    def count_kept(self, example: dict[str, Any]) -> dict:
        """Map function at the end of preparation: count the list and its truncated completions."""
        self.kept += 1
        cut = example.get("num_truncated", 0)
        self.truncated_completions += cut
        self.truncated_lists += cut > 0
        return {}

    def reset(self) -> None:
        """Zero the counts in place (the stream's map functions are bound to this object), for a new pass."""
        for counter in ("lists", "kept", "dropped_for_length", "truncated_completions", "truncated_lists",
                        "duplicates", "tied_at_top", "cut_at_tie"):
            setattr(self, counter, 0)

    def summary(self) -> str | None:
        """One line of what was dropped, cut or tied so far; None when nothing was."""
        parts = []
        if self.dropped_for_length:
            parts.append(
                f"dropped {self.dropped_for_length} lists whose prompt alone fills max_length={self.max_length}"
            )
        if self.truncated_completions:
            parts.append(f"truncated {self.truncated_completions} completions in {self.truncated_lists} lists to "
                         f"max_length={self.max_length} tokens")
        if self.duplicates:
            parts.append(f"dropped {self.duplicates} duplicated completion(s) (the same text with the same score)")
        if self.tied_at_top or self.cut_at_tie:
            parts.append(f"tied scores: {self.tied_at_top} lists are tied at the top and add nothing to the loss, "
                         f"{self.cut_at_tie} more keep their ranking only up to the first tie")
        if not parts:
            return None
        return f"{self.name} dataset (streamed, {self.lists} records read so far): " + "; ".join(parts)

    def log(self) -> None:
        """Log the summary as a warning (nothing when nothing was dropped, cut or tied)."""
        line = self.summary()
        if line:
            logger.warning(line)


def dataset_columns(dataset: Dataset | IterableDataset) -> list[str]:
    """Column names; a stream whose features are unknown is asked for its first record, as TRL does."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)).keys())


def _map_kwargs(dataset: Dataset | IterableDataset, num_proc: int | None, desc: str) -> dict[str, Any]:
    """`num_proc` and `desc` for a map-style dataset; `IterableDataset.map` takes neither."""
    return {} if isinstance(dataset, IterableDataset) else {"num_proc": num_proc, "desc": desc}


def _account_validated(dataset, name: str, counts: StreamCounts | None):
    """Log (map-style) or count as read (stream) the dropped copies and the ties; drop the `num_duplicates` column."""
    if counts is None:
        _log_duplicates(dataset, name)
        dataset = dataset.remove_columns("num_duplicates")
        _log_ties(dataset, name)
        return dataset
    return dataset.map(counts.count_validated).remove_columns("num_duplicates")


def _validate_text(dataset, columns: list[str], tokenizer, *, name: str, num_proc: int | None, mapping: dict,
                   normalize_kwargs: dict, counts: StreamCounts | None):
    """Validate and order the text records (`normalize_record`), then tokenize them (`tokenize_ranked`)."""
    dataset = _drop_derived_columns(dataset, columns, name)
    replaced = [c for c in dict.fromkeys((*_INPUT_COLUMNS, mapping["prompt_key"])) if c in columns]
    dataset = dataset.map(
        normalize_record, with_indices=True, remove_columns=replaced, fn_kwargs={**normalize_kwargs, **mapping},
        **_map_kwargs(dataset, num_proc, f"Validating {name} dataset"),
    )
    dataset = _account_validated(dataset, name, counts)
    return dataset.map(
        _tokenize_record, with_indices=True, fn_kwargs={"tokenizer": tokenizer},
        remove_columns=["prompt", "completions"], **_map_kwargs(dataset, num_proc, f"Tokenizing {name} dataset"),
    )


def _validate_tokenized(dataset, columns: list[str], layout: tuple[str, str], vocab_size: int, *, name: str,
                        num_proc: int | None, normalize_kwargs: dict, counts: StreamCounts | None):
    """Check and order pre-tokenized records (`normalize_tokenized_record`) into prompt_ids + completion_ids."""
    replaced = [c for c in (*layout, "ranking", "scores") if c in columns and c not in TOKENIZED_COLUMNS]
    dataset = dataset.map(
        normalize_tokenized_record, with_indices=True, remove_columns=replaced,
        fn_kwargs={**normalize_kwargs, "fields": layout, "vocab_size": vocab_size, "name": name},
        **_map_kwargs(dataset, num_proc, f"Checking the token ids of {name} dataset"),
    )
    return _account_validated(dataset, name, counts)


def _fit_to_length(dataset, max_length: int | None, max_positions: int | None, num_proc: int | None, name: str,
                   counts: StreamCounts | None):
    """Check the lists against the model's positions, drop those whose prompt fills max_length and truncate the
    rest; a map-style dataset is checked and counted here, a stream as it is read."""
    if max_positions is not None and (max_length is None or max_length > max_positions):
        if counts is None:
            check_fits_positions(dataset, max_length, max_positions, name)
        else:
            dataset = dataset.map(check_record_fits_positions, with_indices=True, fn_kwargs={
                "max_length": max_length, "max_positions": max_positions, "name": name})
    if max_length is not None:
        if counts is None:
            dataset = _drop_lists_without_room(dataset, max_length, num_proc, name)
        else:
            dataset = dataset.filter(counts.has_room)
        dataset = dataset.map(truncate_ranked, fn_kwargs={"max_length": max_length},
                              **_map_kwargs(dataset, num_proc, f"Truncating {name} dataset"))
        if counts is None:
            _log_truncation(dataset, max_length, name)
    return dataset if counts is None else dataset.map(counts.count_kept)


def _log_truncation(dataset: Dataset, max_length: int, name: str) -> None:
    """Log the completions that max_length cut."""
    num_cut = sum(dataset["num_truncated"])
    if num_cut:
        num_cut_lists = sum(n > 0 for n in dataset["num_truncated"])
        logger.warning(
            "%s dataset: truncated %d completions in %d of %d lists to max_length=%d tokens",
            name, num_cut, num_cut_lists, len(dataset), max_length,
        )


def check_preparation_settings(tie_policy, max_length) -> None:
    """ValueError naming the setting for a `tie_policy` outside TIE_POLICIES or a `max_length` that is not a positive
    integer (or None); the configs check both, this covers a direct call."""
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")


def warn_if_legacy_id_columns(layout: tuple[str, str], name: str) -> None:
    """FutureWarning for TRL's deprecated pre-tokenized column names, as TRL's RewardTrainer gives it."""
    if layout == PAIR_ID_FIELDS[1]:
        warnings.warn(
            f"{name} dataset: the columns 'chosen_input_ids'/'rejected_input_ids' are deprecated in TRL and will not "
            "be supported in v1; rename them 'chosen_ids'/'rejected_ids'.", FutureWarning, stacklevel=3,
        )  # fmt: skip


def prepare_ranked_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None,
    tie_policy: str = "truncate",
    num_proc: int | None = None,
    name: str = "train",
    prompt_key: str = "prompt",
    completion_text_key: str | None = None,
    completion_score_key: str | None = None,
    max_positions: int | None = None,
    margin: bool = False,
    stream_counts: StreamCounts | None = None,
) -> Dataset | IterableDataset:
    """Validate, order, tokenize and truncate a ranked or pairwise dataset; log what was dropped, cut or tied.

    `prompt_key`, `completion_text_key` and `completion_score_key` map other layouts (see `normalize_record`).
    Records whose prompt alone fills `max_length` are dropped (no completion token would be left, as in TRL's
    DPOTrainer); completions longer than the room left are truncated. Both counts go to the log, and so do the
    lists whose tied scores leave part (or all) of their ranking unknown. Pre-tokenized datasets (no text, and
    `prompt_ids` + `completion_ids`, or TRL's reward layout `chosen_ids` + `rejected_ids`) are checked record by
    record (every id in the tokenizer's vocabulary) and ordered (`normalize_tokenized_record`); a dataset with both
    text and ids is re-tokenized from the text (logged), since its ids may come from another tokenizer. Copies of a
    completion with equal scores are dropped (logged). With `margin`, a 'margin' column (TRL's reward margin) is
    read and checked (`check_margin`); without it the column is left as it is.

    A `datasets.IterableDataset` (a stream) is prepared lazily, record by record as it is read: the same checks
    raise the same errors, naming the record's place in the stream, when the record is read (in training, at the
    step that reads it); what was dropped, cut or tied is counted in `stream_counts` (a new `StreamCounts` when
    None) instead of logged, since the stream's end is not known here.

    Raises a ValueError for a bad record (naming its index and field), an empty dataset, a map-style dataset with
    no list left after dropping, or (given the model's `max_positions`) a list longer than the model's positions
    after truncation.
    """
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(f"K-way trainers need a `datasets.Dataset` or `datasets.IterableDataset`, got "
                        f"{type(dataset).__name__}")
    check_not_empty(dataset, name)
    check_field_mapping(prompt_key, completion_text_key, completion_score_key)
    check_preparation_settings(tie_policy, max_length)
    counts = None
    if isinstance(dataset, IterableDataset):
        counts = stream_counts if stream_counts is not None else StreamCounts(name)
        counts.max_length = max_length
    columns = dataset_columns(dataset)
    layout = tokenized_layout(columns)
    normalize_kwargs = {"tie_policy": tie_policy, "count_duplicates": True, "read_margin": margin}
    if has_text_records(columns) or layout is None:
        mapping = {"prompt_key": prompt_key, "completion_text_key": completion_text_key,
                   "completion_score_key": completion_score_key}
        dataset = _validate_text(dataset, columns, tokenizer, name=name, num_proc=num_proc, mapping=mapping,
                                 normalize_kwargs=normalize_kwargs, counts=counts)
    else:
        warn_if_legacy_id_columns(layout, name)
        dataset = _validate_tokenized(dataset, columns, layout, len(tokenizer), name=name, num_proc=num_proc,
                                      normalize_kwargs=normalize_kwargs, counts=counts)
    return _fit_to_length(dataset, max_length, max_positions, num_proc, name, counts)
