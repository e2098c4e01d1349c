import logging
import math

import pytest
import torch
from datasets import Dataset

from rlhf_ext.data import (
    DataCollatorForRankedPreference,
    normalize_record,
    prepare_ranked_dataset,
    split_into_lists,
)

# --- formats -> one canonical record -------------------------------------------------------------------------------


def test_ranking_and_scores_order_completions_best_first():
    best_first = normalize_record({"prompt": "p", "completions": ["a", "b", "c"]}, 0)
    by_ranking = normalize_record({"prompt": "p", "completions": ["c", "a", "b"], "ranking": [2, 0, 1]}, 0)
    by_scores = normalize_record({"prompt": "p", "completions": ["b", "c", "a"], "scores": [0.5, -1.0, 3.0]}, 0)
    for record in (best_first, by_ranking, by_scores):
        assert record == {"prompt": "p", "completions": ["a", "b", "c"], "num_ranked": 2}


def test_pairwise_record_is_a_two_item_list():
    record = normalize_record({"prompt": "p", "chosen": "good", "rejected": "bad"}, 0)
    assert record == {"prompt": "p", "completions": ["good", "bad"], "num_ranked": 1}


def test_implicit_prompt_pairwise_record_is_split_like_trl():
    chosen = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rejected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]
    record = normalize_record({"chosen": chosen, "rejected": rejected}, 0)
    assert record["prompt"] == chosen[:1]
    assert record["completions"] == [chosen[1:], rejected[1:]]


def test_tied_scores_truncate_the_ranking_at_the_first_tie():
    # order: a (5) > {b, c} (3, tied) > d (1): only "a beats the rest" is known
    record = normalize_record({"prompt": "p", "completions": ["d", "b", "a", "c"], "scores": [1, 3, 5, 3]}, 0)
    assert record["completions"][0] == "a" and record["completions"][-1] == "d"
    assert record["num_ranked"] == 1
    tied_at_top = normalize_record({"prompt": "p", "completions": ["a", "b"], "scores": [2.0, 2.0]}, 0)
    assert tied_at_top["num_ranked"] == 0


# --- validation errors name the record and the field ---------------------------------------------------------------


CHAT_PROMPT = [{"role": "user", "content": "q"}]
EMPTY_REPLY, REPLY = [{"role": "assistant", "content": ""}], [{"role": "assistant", "content": "x"}]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 0, 2]}, r"field 'ranking'.*permutation"),
        ({"prompt": "p", "completions": ["a", "b"], "ranking": [1, 2]}, r"field 'ranking'.*permutation"),
        ({"prompt": "p", "completions": ["a", "b"], "scores": [1.0, math.nan]}, r"field 'scores'\[1\].*finite"),
        ({"prompt": "p", "completions": ["a"]}, r"field 'completions'.*at least 2 completions, got 1"),
        ({"prompt": "p", "completions": ["a", ""]}, r"field 'completions'\[1\]: empty completion"),
        ({"prompt": CHAT_PROMPT, "completions": [EMPTY_REPLY, REPLY]}, r"field 'completions'\[0\]: empty completion"),
        ({"prompt": "p", "chosen": "a", "rejected": ""}, r"field 'chosen/rejected'\[1\]: empty completion"),
        ({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 1]}, r"field 'ranking'.*2 entries.*3"),
        ({"prompt": "p", "completions": ["a", "b"], "scores": [1.0, 2.0, 3.0]}, r"field 'scores'.*3 entries.*2"),
        ({"completions": ["a", "b"]}, r"field 'prompt': missing"),
        ({"prompt": "p", "answer": "a"}, r"needs a 'completions' field"),
    ],
)
def test_bad_records_raise_naming_index_and_field(record, message):
    with pytest.raises(ValueError, match=r"record 7(, |: )" + message):
        normalize_record(record, 7)


def test_tie_policy_error_rejects_ties():
    with pytest.raises(ValueError, match=r"record 3, field 'scores': tied scores"):
        normalize_record({"prompt": "p", "completions": ["a", "b", "c"], "scores": [1, 2, 2]}, 3, tie_policy="error")


def test_dataset_error_names_the_bad_record_index(tokenizer):
    records = [{"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1]}] * 3
    records.append({"prompt": "p", "completions": ["a", "b"], "ranking": [1, 1]})
    with pytest.raises(ValueError, match="record 3, field 'ranking'"):
        prepare_ranked_dataset(Dataset.from_list(records), tokenizer, max_length=None)


# --- tokenization and truncation -----------------------------------------------------------------------------------


def test_prepared_sequences_are_the_tokenized_prompt_plus_completion(tokenizer):
    records = [{"prompt": "Q: ", "completions": ["bb", "a", "ccc"], "ranking": [1, 0, 2]}]
    out = prepare_ranked_dataset(Dataset.from_list(records), tokenizer, max_length=None)[0]
    eos = tokenizer.eos_token
    for ids, text in zip(out["completion_ids"], ["a", "bb", "ccc"]):
        assert out["prompt_ids"] + ids == tokenizer("Q: " + text + eos)["input_ids"]
    assert out["num_ranked"] == 2


def test_conversational_records_use_the_chat_template(tokenizer):
    prompt = [{"role": "user", "content": "hi"}]
    completions = [[{"role": "assistant", "content": "yo"}], [{"role": "assistant", "content": "no"}]]
    out = prepare_ranked_dataset(
        Dataset.from_list([{"prompt": prompt, "completions": completions}]), tokenizer, max_length=None
    )[0]
    # the generation prompt is part of the prompt, as in TRL's DPOTrainer
    assert tokenizer.decode(out["prompt_ids"]) == "<s>user: hi</s><s>assistant: "
    assert [tokenizer.decode(ids) for ids in out["completion_ids"]] == ["yo</s>", "no</s>"]


def test_truncation_keeps_the_start_and_is_counted_in_the_log(tokenizer, caplog):
    records = [
        {"prompt": "abc", "completions": ["x" * 10, "y"]},  # 1 completion cut
        {"prompt": "abc", "completions": ["z", "w"]},  # fits
        {"prompt": "a" * 8, "completions": ["z", "w"]},  # prompt fills max_length: dropped
    ]
    with caplog.at_level(logging.WARNING, logger="rlhf_ext.data.prepare"):
        out = prepare_ranked_dataset(Dataset.from_list(records), tokenizer, max_length=8, name="train")
    assert len(out) == 2
    assert [len(ids) for ids in out[0]["completion_ids"]] == [5, 2]
    assert out["num_truncated"] == [1, 0]
    assert "dropped 1 of 3 lists whose prompt alone fills max_length=8" in caplog.text
    assert "truncated 1 completions in 1 of 2 lists to max_length=8" in caplog.text


# --- collator ------------------------------------------------------------------------------------------------------


def test_collator_packs_lists_of_different_sizes_into_one_batch():
    examples = [
        {"prompt_ids": [1, 2], "completion_ids": [[3], [4, 5], [6]], "num_ranked": 2, "ref_logps": [-1.0, -2.0, -3.0]},
        {"prompt_ids": [7], "completion_ids": [[8, 9], [5]], "num_ranked": 1, "ref_logps": [-4.0, -5.0]},
    ]
    batch = DataCollatorForRankedPreference(pad_token_id=0)(examples)
    assert list(batch)[0] == "num_completions"  # Trainer sizes batches by the first tensor: lists, not sequences
    assert batch["num_completions"].tolist() == [3, 2]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [1, 2, 4, 5], [1, 2, 6, 0], [7, 8, 9, 0], [7, 5, 0, 0]]
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 4, 3, 3, 2]
    assert batch["completion_mask"].tolist()[3] == [0, 1, 1, 0]
    assert batch["num_ranked"].tolist() == [2, 1]
    assert batch["ref_logps"].tolist() == [[-1.0, -2.0, -3.0], [-4.0, -5.0, 0.0]]


def test_split_into_lists_regroups_sequences_by_list():
    table, mask = split_into_lists(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([3, 2]))
    assert table.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]
    assert mask.tolist() == [[True, True, True], [True, True, False]]
