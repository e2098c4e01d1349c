import logging
import math
import re
from pathlib import Path

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
        ({"prompt": "p", "chosen": "a", "rejected": ""}, r"field 'rejected': empty completion"),
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


MESSAGE_WITH_NUMBER = [{"role": "assistant", "content": 5}]


@pytest.mark.parametrize(
    "record, message",
    [
        # a string is a sequence too: unchecked, "good answer" trained as 11 one-character completions
        ({"prompt": "p", "completions": "good answer"}, r"field 'completions': must be a list of completions, "
                                                         r"got str 'good answer'"),
        ({"prompt": "p", "completions": [1, 2]}, r"field 'completions'\[0\]: a completion must be a string or a "
                                                 r"list of \{'role', 'content'\} messages, got int 1"),
        ({"prompt": "p", "completions": ["a", ["b", "c"]]}, r"field 'completions'\[1\]: .*got list \['b', 'c'\]"),
        ({"prompt": "p", "completions": [REPLY[0], REPLY[0]]}, r"field 'completions'\[0\]: .*one message.*\[message\]"),
        ({"prompt": CHAT_PROMPT, "completions": [REPLY, MESSAGE_WITH_NUMBER]},
         r"field 'completions'\[1\]\[0\]\['content'\]: must be a string, got int 5"),
        ({"prompt": 3, "completions": ["a", "b"]}, r"field 'prompt': a prompt must be a string .*got int 3"),
        ({"prompt": "p", "completions": ["a", "b"], "ranking": "0 1"}, r"field 'ranking': .*list of ints.*got str"),
        ({"prompt": "p", "completions": ["a", "b"], "scores": [True, False]}, r"field 'scores'\[0\]: True is not a "
                                                                               r"finite number"),
        ({"prompt": "p", "completions": ["a", "b"], "scores": 2.0}, r"field 'scores': .*list of numbers.*got float"),
        ({"prompt": "p", "completions": ["a", "b"], "scores": ["1", "2"]}, r"field 'scores'\[0\]: '1' is not"),
        ({"chosen": 1, "rejected": "b"}, r"field 'chosen': a conversation must be a string .*got int 1"),
        ({"prompt": "p", "chosen": {"text": "a"}, "rejected": "b"}, r"field 'chosen': .*a dict with keys \['text'\]"),
        # the chat template renders prompt + completion as one conversation: both text or both messages
        ({"prompt": "p", "completions": [REPLY, REPLY]}, r"field 'completions'\[0\]: the completion is a list of "
                                                         r"messages but the prompt is plain text"),
        ({"prompt": CHAT_PROMPT, "completions": ["a", "b"]}, r"field 'completions'\[0\]: the completion is plain "
                                                              r"text but the prompt is a list of messages"),
    ],
)
def test_wrong_types_raise_naming_index_and_field(record, message):
    with pytest.raises(ValueError, match=r"record 7, " + message):
        normalize_record(record, 7)


def test_dict_completions_name_the_mapping_to_set():
    record = {"prompt": "p", "completions": [{"response": "a", "overall_score": 7.5, "model": "m"}] * 2}
    with pytest.raises(ValueError) as raised:
        normalize_record(record, 4)
    message = str(raised.value)
    assert message.startswith("record 4, field 'completions'[0]: a completion must be a string or a list of")
    assert "completion_text_key='response'" in message and "completion_score_key='overall_score'" in message


def test_float_rankings_are_refused_with_a_pointer_to_scores():
    # [1.0, 0.0] read as scores would order the completions the other way round, so floats are not rounded
    with pytest.raises(ValueError, match=r"record 7, field 'ranking'\[0\]: ranking must be a list of ints "
                                         r"\(0 = best\), got float 1.0; for scores .* use a 'scores' field"):
        normalize_record({"prompt": "p", "completions": ["a", "b"], "ranking": [1.0, 0.0]}, 7)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "p", "completions": ["a", " \n\t"]}, r"field 'completions'\[1\]: empty completion"),
        ({"prompt": CHAT_PROMPT, "completions": [REPLY, [{"role": "assistant", "content": "  "}]]},
         r"field 'completions'\[1\]: empty completion"),
        ({"prompt": "", "completions": ["a", "b"]}, r"field 'prompt': empty prompt"),
        ({"prompt": "   ", "completions": ["a", "b"]}, r"field 'prompt': empty prompt"),
        ({"prompt": [], "completions": [REPLY, REPLY]}, r"field 'prompt': empty prompt"),
        ({"prompt": [{"role": "user", "content": " "}], "completions": [REPLY, REPLY]}, r"field 'prompt': empty"),
        ({"prompt": " ", "chosen": "a", "rejected": "b"}, r"field 'prompt': empty prompt"),
        ({"chosen": "abc", "rejected": "xyz"}, r"fields 'chosen'/'rejected': they share no prompt"),
    ],
)
def test_blank_prompts_and_completions_raise_naming_index_and_field(record, message):
    with pytest.raises(ValueError, match=r"record 7, " + message):
        normalize_record(record, 7)


def test_tied_lists_are_counted_in_the_log(tokenizer, caplog):
    records = [
        {"prompt": "p", "completions": ["a", "b", "c"], "scores": [2.0, 2.0, 1.0]},  # tied at the top: adds 0
        {"prompt": "p", "completions": ["a", "b", "c"], "scores": [3.0, 1.0, 1.0]},  # cut at the second place
        {"prompt": "p", "completions": ["a", "b"], "scores": [5, 5]},  # all tied: adds 0
        {"prompt": "p", "completions": ["a", "b", "c"], "scores": [3.0, 2.0, 1.0]},  # strict
    ]
    with caplog.at_level(logging.WARNING, logger="rlhf_ext.data.prepare"):
        out = prepare_ranked_dataset(Dataset.from_list(records), tokenizer, max_length=None, name="train")
    assert out["num_ranked"] == [0, 1, 0, 2]
    assert ("train dataset: tied scores: 2 of 4 lists are tied at the top and add nothing to the loss; "
            "1 more keep their ranking only up to the first tie") in caplog.text


def test_strict_rankings_log_no_ties(tokenizer, caplog):
    records = [{"prompt": "p", "completions": ["a", "b"], "scores": [1.0, 2.0]}]
    with caplog.at_level(logging.WARNING, logger="rlhf_ext.data.prepare"):
        prepare_ranked_dataset(Dataset.from_list(records), tokenizer, max_length=None)
    assert "tied" not in caplog.text


# --- empty datasets fail up front ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", [Dataset.from_list([]), Dataset.from_dict({"prompt": [], "completions": []})])
def test_empty_dataset_raises_a_clear_error(tokenizer, dataset):
    with pytest.raises(ValueError, match=r"eval dataset is empty: the K-way trainers need at least one record"):
        prepare_ranked_dataset(dataset, tokenizer, max_length=None, name="eval")


def test_dataset_with_every_list_dropped_for_length_raises(tokenizer):
    records = [{"prompt": "a" * 10, "completions": ["x", "y"]}] * 8
    with pytest.raises(ValueError, match=r"train dataset: every one of the 8 lists has a prompt that alone fills "
                                         r"max_length=8 tokens \(the shortest prompt has 10\).*raise max_length"):
        prepare_ranked_dataset(Dataset.from_list(records), tokenizer, max_length=8)


# --- other layouts: UltraFeedback-style dict completions -----------------------------------------------------------


def ultrafeedback_record(instruction: str, responses: list[str], scores: list[float]) -> dict:
    """A record laid out as openbmb/UltraFeedback's: completions are dicts with the text, ratings and more."""
    aspects = ("helpfulness", "honesty", "instruction_following", "truthfulness")
    return {
        "source": "evol_instruct",
        "instruction": instruction,
        "models": [f"model-{k}" for k in range(len(responses))],
        "completions": [
            {
                "annotations": {aspect: {"Rating": "4", "Rationale": "ok"} for aspect in aspects},
                "critique": "Clear and correct.",
                "custom_system_prompt": "You are a helpful assistant.",
                "fine-grained_score": score / 2,
                "model": f"model-{k}",
                "overall_score": score,
                "principle": "helpfulness",
                "response": response,
            }
            for k, (response, score) in enumerate(zip(responses, scores))
        ],
        "correct_answers": ["None"],
        "incorrect_answers": ["None"],
    }


ULTRAFEEDBACK_KEYS = {"prompt_key": "instruction", "completion_text_key": "response",
                      "completion_score_key": "overall_score"}


def test_ultrafeedback_records_are_read_through_the_field_mapping():
    record = ultrafeedback_record("Name a fruit.", ["A fruit.", "Mango.", "Apple."], [3.0, 8.5, 7.0])
    got = normalize_record(record, 0, **ULTRAFEEDBACK_KEYS)
    assert got == {"prompt": "Name a fruit.", "completions": ["Mango.", "Apple.", "A fruit."], "num_ranked": 2}
    # text only: the completions stay in the given order (best first)
    got = normalize_record(record, 0, prompt_key="instruction", completion_text_key="response")
    assert got["completions"] == ["A fruit.", "Mango.", "Apple."]


def test_ultrafeedback_dataset_tokenizes_as_the_plain_scored_dataset(tokenizer):
    raw = [("Q1: ", ["bb", "a", "ccc"], [7.5, 9.0, 2.0]), ("Q2: ", ["dd", "e"], [1.0, 6.5])]
    mapped = prepare_ranked_dataset(
        Dataset.from_list([ultrafeedback_record(*row) for row in raw]), tokenizer, max_length=None,
        **ULTRAFEEDBACK_KEYS,
    )
    plain = prepare_ranked_dataset(
        Dataset.from_list([{"prompt": p, "completions": c, "scores": s} for p, c, s in raw]), tokenizer,
        max_length=None,
    )
    columns = ["prompt_ids", "completion_ids", "num_ranked"]
    assert mapped.select_columns(columns).to_list() == plain.select_columns(columns).to_list()
    assert "instruction" not in mapped.column_names  # its text is the prompt now


@pytest.mark.parametrize(
    "record, keys, message",
    [
        (ultrafeedback_record("q", ["a", "b"], [1.0, 2.0]), {"prompt_key": "instruction"},
         r"record 7, field 'completions'\[0\]: .*set completion_text_key='response'"),
        (ultrafeedback_record("q", ["a", "b"], [1.0, 2.0]), {"completion_text_key": "response"},
         r"record 7, field 'prompt': missing .*set prompt_key .*'instruction'"),
        ({"prompt": "q", "completions": ["a", "b"]}, {"completion_text_key": "response"},
         r"record 7, field 'completions'\[0\]: completion_text_key='response' is set, so each completion must be a "
         r"dict with a 'response' key; got str 'a'"),
        ({"prompt": "q", "completions": [{"response": "a", "overall_score": 1.0}, {"response": "b"}]},
         {"completion_text_key": "response", "completion_score_key": "overall_score"},
         r"record 7, field 'completions'\[1\]\['overall_score'\]: None is not a finite number"),
        ({"prompt": "q", "completions": [{"response": "a", "s": 1.0}, {"response": "b", "s": 2.0}], "scores": [1, 2]},
         {"completion_text_key": "response", "completion_score_key": "s"},
         r"record 7: give one order, not scores and completion_score_key='s'"),
        ({"prompt": "q", "completions": [{"response": "a"}, {"response": " "}]}, {"completion_text_key": "response"},
         r"record 7, field 'completions'\[1\]\['response'\]: empty completion"),
        ({"prompt": "q", "completions": ["a", "b"]}, {"completion_score_key": "overall_score"},
         r"completion_score_key='overall_score' .* needs completion_text_key"),
    ],
)
def test_mapping_errors_say_what_to_set(record, keys, message):
    with pytest.raises(ValueError, match=message):
        normalize_record(record, 7, **keys)


def test_chat_completions_with_a_chat_prompt_under_another_key(tokenizer):
    # conversational records in a mapped layout: prompt messages under "messages", completions as dicts
    record = {"messages": [{"role": "user", "content": "hi"}],
              "completions": [{"reply": [{"role": "assistant", "content": "no"}], "rating": 1},
                              {"reply": [{"role": "assistant", "content": "yo"}], "rating": 5}]}
    out = prepare_ranked_dataset(
        Dataset.from_list([record]), tokenizer, max_length=None, prompt_key="messages",
        completion_text_key="reply", completion_score_key="rating",
    )[0]
    assert tokenizer.decode(out["prompt_ids"]) == "<s>user: hi</s><s>assistant: "
    assert [tokenizer.decode(ids) for ids in out["completion_ids"]] == ["yo</s>", "no</s>"]


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


# --- docs ----------------------------------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "kway.md"


def test_other_layouts_snippets_in_the_docs_run_as_written(tmp_path, monkeypatch):
    section = DOCS.read_text().split("### Other layouts")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)  # the config snippet names an output folder
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), {})
