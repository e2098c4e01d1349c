"""Dataset preparation for K-way preference trainers: validate, order best first, tokenize, truncate.

One pipeline serves both the K-way DPO and the K-way reward trainer, and it tokenizes exactly as TRL's
DPOTrainer does (`_tokenize`, EOS appended to plain-text completions, the completion starting where the
tokenized prompt and prompt+completion diverge), so a pairwise dataset gives TRL's token ids at K=2. Every
sequence prompt_ids + completion_ids[k] equals the tokenization of prompt + completion_k, which is also what
TRL's RewardTrainer scores.

Output columns: `prompt_ids` (list[int]), `completion_ids` (list of K list[int], best first), `num_ranked`
(int, see `rlhf_ext.data.ranked`) and, with a `max_length`, `num_truncated` (int, completions cut).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl.data_utils import _tokenize, common_prefix_length

from .ranked import normalize_record

logger = logging.getLogger(__name__)

TOKENIZED_COLUMNS = ("prompt_ids", "completion_ids", "num_ranked")
_INPUT_COLUMNS = ("prompt", "completions", "chosen", "rejected", "ranking", "scores")


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


def truncate_ranked(example: dict[str, Any], max_length: int) -> dict[str, Any]:
    """Cut each prompt+completion to its first `max_length` tokens (TRL's "keep_start"); count the cut completions."""
    room = max_length - len(example["prompt_ids"])
    completion_ids = [ids[:room] for ids in example["completion_ids"]]
    num_truncated = sum(len(ids) > room for ids in example["completion_ids"])
    return {"completion_ids": completion_ids, "num_truncated": num_truncated}


def prepare_ranked_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None,
    tie_policy: str = "truncate",
    num_proc: int | None = None,
    name: str = "train",
) -> Dataset:
    """Validate, order, tokenize and truncate a ranked or pairwise dataset; log what was dropped or cut.

    Records whose prompt alone fills `max_length` are dropped (no completion token would be left, as in TRL's
    DPOTrainer); completions longer than the room left are truncated. Both counts go to the log. Already
    tokenized datasets (with `prompt_ids` and `completion_ids`) are returned unchanged.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"K-way trainers need a map-style `datasets.Dataset`, got {type(dataset).__name__}")
    if {"prompt_ids", "completion_ids"} <= set(dataset.column_names):
        return dataset
    replaced = [c for c in _INPUT_COLUMNS if c in dataset.column_names]
    dataset = dataset.map(
        normalize_record, with_indices=True, fn_kwargs={"tie_policy": tie_policy}, num_proc=num_proc,
        remove_columns=replaced, desc=f"Validating {name} dataset",
    )
    dataset = dataset.map(
        tokenize_ranked, fn_kwargs={"tokenizer": tokenizer}, remove_columns=["prompt", "completions"],
        num_proc=num_proc, desc=f"Tokenizing {name} dataset",
    )
    if max_length is None:
        return dataset
    num_lists = len(dataset)
    dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < max_length, num_proc=num_proc)
    if len(dataset) < num_lists:
        logger.warning(
            "%s dataset: dropped %d of %d lists whose prompt alone fills max_length=%d",
            name, num_lists - len(dataset), num_lists, max_length,
        )
    dataset = dataset.map(truncate_ranked, fn_kwargs={"max_length": max_length}, num_proc=num_proc)
    num_cut = sum(dataset["num_truncated"])
    if num_cut:
        num_cut_lists = sum(n > 0 for n in dataset["num_truncated"])
        logger.warning(
            "%s dataset: truncated %d completions in %d of %d lists to max_length=%d tokens",
            name, num_cut, num_cut_lists, len(dataset), max_length,
        )
    return dataset
