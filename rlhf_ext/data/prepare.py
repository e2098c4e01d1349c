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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl.data_utils import _tokenize, common_prefix_length

from .ranked import check_field_mapping, normalize_record

logger = logging.getLogger(__name__)

TOKENIZED_COLUMNS = ("prompt_ids", "completion_ids", "num_ranked")
_INPUT_COLUMNS = ("prompt", "completions", "chosen", "rejected", "ranking", "scores")
# What an earlier preparation (maybe with another tokenizer) left: dropped when the text is there to re-tokenize.
_DERIVED_COLUMNS = (*TOKENIZED_COLUMNS, "num_truncated", "ref_logps")


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


def check_token_ids(dataset: Dataset, vocab_size: int, name: str) -> None:
    """Every `prompt_ids` / `completion_ids` id lies in [0, vocab_size); else a ValueError naming the record, field
    and id. Ids made by another tokenizer would otherwise index past the embedding (a crash at some step) or, when
    in range, train on other tokens than the text meant."""
    table = dataset.with_format("arrow")
    for column, depth in (("prompt_ids", 1), ("completion_ids", 2)):
        values = table[column]
        for _ in range(depth):
            if not pa.types.is_list(values.type) and not pa.types.is_large_list(values.type):
                raise ValueError(f"{name} dataset, field {column!r}: must hold lists of token ids, got {values.type}")
            values = pc.list_flatten(values)
        if not pa.types.is_integer(values.type):
            raise ValueError(f"{name} dataset, field {column!r}: token ids must be integers, got {values.type}")
        bounds = pc.min_max(values).as_py()
        if bounds["min"] is not None and (bounds["min"] < 0 or bounds["max"] >= vocab_size):
            raise _bad_token_id_error(dataset, column, vocab_size, name)


def _bad_token_id_error(dataset: Dataset, column: str, vocab_size: int, name: str) -> ValueError:
    """The error for the first id outside [0, vocab_size) in `column` (found record by record, only on failure)."""
    for index, row in enumerate(dataset[column]):
        sequences = [("", row)] if column == "prompt_ids" else [(f"[{k}]", ids) for k, ids in enumerate(row)]
        for suffix, ids in sequences:
            bad = next((i for i in ids if not 0 <= i < vocab_size), None)
            if bad is not None:
                return ValueError(
                    f"{name} dataset, record {index}, field {column!r}{suffix}: token id {bad} is outside the "
                    f"tokenizer's vocabulary [0, {vocab_size}); the ids were made by another tokenizer? Give the text "
                    "('prompt' and 'completions') to tokenize here, or tokenize with this model's tokenizer"
                )
    return ValueError(f"{name} dataset, field {column!r}: a token id is outside [0, {vocab_size})")


def truncate_ranked(example: dict[str, Any], max_length: int) -> dict[str, Any]:
    """Cut each prompt+completion to its first `max_length` tokens (TRL's "keep_start"); count the cut completions."""
    room = max_length - len(example["prompt_ids"])
    completion_ids = [ids[:room] for ids in example["completion_ids"]]
    num_truncated = sum(len(ids) > room for ids in example["completion_ids"])
    return {"completion_ids": completion_ids, "num_truncated": num_truncated}


def check_not_empty(dataset: Any, name: str) -> None:
    """Raise a ValueError for a dataset with no records (datasets of unknown length pass)."""
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(
            f"{name} dataset is empty: the K-way trainers need at least one record with a prompt and 2 or more "
            "completions"
        )


def count_ties(dataset: Dataset) -> tuple[int, int]:
    """(lists tied at the top, lists cut at a later tie) of a validated dataset, from `num_ranked` and K.

    A list tied at the top has num_ranked = 0: it contributes 0 to the loss. A later tie keeps 0 < m < K - 1.
    """
    sizes = pc.list_value_length(dataset.with_format("arrow")["completions"]).to_pylist()
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
    if lengths[index] <= max_positions:
        return
    setting = "max_length is None (nothing is truncated)" if max_length is None else (
        f"max_length={max_length} is above that limit"
    )
    raise ValueError(
        f"{name} dataset, record {index}: its prompt and longest completion are {int(lengths[index])} tokens, more "
        f"than the model's max_position_embeddings={max_positions} (learned positions fail with an IndexError during "
        f"training, rotary ones run past what the model was trained on), and {setting}; set max_length to "
        f"{max_positions} or less (it truncates each prompt + completion, keeping the start)"
    )


def _drop_derived_columns(dataset: Dataset, name: str) -> Dataset:
    """`dataset` without the token-id columns an earlier preparation left beside the text (logged): the text is
    re-tokenized with this tokenizer, which the old ids may not come from."""
    stale = [c for c in _DERIVED_COLUMNS if c in dataset.column_names]
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


def prepare_ranked_dataset(
    dataset: Dataset,
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
) -> Dataset:
    """Validate, order, tokenize and truncate a ranked or pairwise dataset; log what was dropped, cut or tied.

    `prompt_key`, `completion_text_key` and `completion_score_key` map other layouts (see `normalize_record`).
    Records whose prompt alone fills `max_length` are dropped (no completion token would be left, as in TRL's
    DPOTrainer); completions longer than the room left are truncated. Both counts go to the log, and so do the
    lists whose tied scores leave part (or all) of their ranking unknown. Already tokenized datasets (with
    `prompt_ids` and `completion_ids` and no text) are returned unchanged once every id is checked to lie in the
    tokenizer's vocabulary; a dataset with both text and ids is re-tokenized from the text (logged), since its ids
    may come from another tokenizer. Copies of a completion with equal scores are dropped (logged). Raises a
    ValueError for a bad record (naming its index and field), an empty dataset, one with no list left after
    dropping, or (given the model's `max_positions`) a list longer than the model's positions after truncation.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"K-way trainers need a map-style `datasets.Dataset`, got {type(dataset).__name__}")
    check_not_empty(dataset, name)
    if not has_text_records(dataset.column_names) and {"prompt_ids", "completion_ids"} <= set(
        dataset.column_names
    ):
        check_token_ids(dataset, len(tokenizer), name)
        return dataset
    dataset = _drop_derived_columns(dataset, name)
    check_field_mapping(prompt_key, completion_text_key, completion_score_key)
    replaced = [c for c in dict.fromkeys((*_INPUT_COLUMNS, prompt_key)) if c in dataset.column_names]
    mapping = {"prompt_key": prompt_key, "completion_text_key": completion_text_key,
               "completion_score_key": completion_score_key}
    dataset = dataset.map(
        normalize_record, with_indices=True, num_proc=num_proc, remove_columns=replaced,
        fn_kwargs={"tie_policy": tie_policy, "count_duplicates": True, **mapping}, desc=f"Validating {name} dataset",
    )
    _log_duplicates(dataset, name)
    dataset = dataset.remove_columns("num_duplicates")
    _log_ties(dataset, name)
    dataset = dataset.map(
        _tokenize_record, with_indices=True, fn_kwargs={"tokenizer": tokenizer},
        remove_columns=["prompt", "completions"], num_proc=num_proc, desc=f"Tokenizing {name} dataset",
    )
    check_fits_positions(dataset, max_length, max_positions, name)
    if max_length is None:
        return dataset
    dataset = _drop_lists_without_room(dataset, max_length, num_proc, name)
    dataset = dataset.map(truncate_ranked, fn_kwargs={"max_length": max_length}, num_proc=num_proc)
    num_cut = sum(dataset["num_truncated"])
    if num_cut:
        num_cut_lists = sum(n > 0 for n in dataset["num_truncated"])
        logger.warning(
            "%s dataset: truncated %d completions in %d of %d lists to max_length=%d tokens",
            name, num_cut, num_cut_lists, len(dataset), max_length,
        )
    return dataset
