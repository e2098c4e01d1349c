"""Data at the edges (issue 18, item 6 and section 4): stale token ids beside text, ids outside the vocabulary,
file encodings and suffixes, chat roles, duplicated completions, tokenizers without EOS or a chat template, and
malformed auxiliary columns. Each must fail loudly before training, naming the record, field or setting."""

import json
import logging

import pytest
from datasets import Dataset

from rlhf_ext.data import load_dataset_or_file, normalize_record, prepare_ranked_dataset
from rlhf_ext.testing import tiny_tokenizer

PLAIN = {"prompt": "Q", "completions": ["a", "b"]}
CHAT_PROMPT = [{"role": "user", "content": "Q"}]
CHAT = {"prompt": CHAT_PROMPT, "completions": [[{"role": "assistant", "content": "a"}],
                                              [{"role": "assistant", "content": "b"}]]}


def prepare(records, tokenizer=None, **kwargs):
    return prepare_ranked_dataset(Dataset.from_list(records), tokenizer or tiny_tokenizer(), max_length=None, **kwargs)


# --- item 6: text and token ids -----------------------------------------------------------------------------------


def test_text_columns_win_over_stale_token_ids_and_the_log_says_so(caplog):
    tokenizer = tiny_tokenizer()
    stale = {**PLAIN, "prompt_ids": [7, 7, 7], "completion_ids": [[8], [9]], "num_ranked": 1}
    with caplog.at_level(logging.WARNING, logger="rlhf_ext.data.prepare"):
        prepared = prepare([stale], tokenizer)
    fresh = prepare([PLAIN], tokenizer)
    assert prepared[0]["prompt_ids"] == fresh[0]["prompt_ids"] != [7, 7, 7]
    assert prepared[0]["completion_ids"] == fresh[0]["completion_ids"]
    assert "re-tokeniz" in caplog.text and "prompt_ids" in caplog.text


def test_ids_only_dataset_with_an_id_outside_the_vocabulary_names_record_field_and_id():
    records = [{"prompt_ids": [5, 6], "completion_ids": [[7], [8]], "num_ranked": 1},
               {"prompt_ids": [5], "completion_ids": [[7], [50000]], "num_ranked": 1}]
    with pytest.raises(ValueError, match=r"record 1.*'completion_ids'\[1\].*50000.*101"):
        prepare(records)
    records[1]["completion_ids"] = [[7], [8]]
    records[0]["prompt_ids"] = [-3]
    with pytest.raises(ValueError, match=r"record 0.*'prompt_ids'.*-3"):
        prepare(records)


def test_ids_only_dataset_within_the_vocabulary_is_used_as_it_is():
    records = [{"prompt_ids": [5, 6], "completion_ids": [[7], [100]], "num_ranked": 1}]
    assert prepare(records)[0]["completion_ids"] == [[7], [100]]


# --- section 4: files ---------------------------------------------------------------------------------------------


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\xef\xbb\xbf" + jsonl([PLAIN]).encode(), r"bom\.jsonl.*UTF-8 byte-order mark.*without"),
        (jsonl([PLAIN]).encode("utf-16"), r"bom\.jsonl.*UTF-16.*UTF-8"),
        ('{"prompt": "caf\u00e9", "completions": ["a", "b"]}\n'.encode("latin-1"), r"bom\.jsonl.*not UTF-8.*line 1"),
    ],
)
def test_files_not_in_plain_utf8_are_named_with_the_fix(tmp_path, data, message):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message):
        load_dataset_or_file(str(path))


def test_upper_case_suffix_and_a_json_file_holding_json_lines_load(tmp_path):
    for name in ("upper.JSONL", "lines.json"):
        (tmp_path / name).write_text(jsonl([PLAIN, PLAIN]))
        assert len(load_dataset_or_file(str(tmp_path / name))["train"]) == 2


def test_csv_prompts_load_and_a_list_written_as_text_is_named(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text('prompt,completions\nQ,"[""a"", ""b""]"\n')
    dataset = load_dataset_or_file(str(path))["train"]
    assert dataset[0]["prompt"] == "Q"
    with pytest.raises(ValueError, match=r"record 0, field 'completions'.*list written as text.*JSON Lines"):
        prepare_ranked_dataset(dataset, tiny_tokenizer(), max_length=None)


@pytest.mark.parametrize("name", ["data.txt", "data.tsv", "data.jsonl.gz"])
def test_unsupported_suffix_of_an_existing_file_is_named(tmp_path, name):
    (tmp_path / name).write_text(jsonl([PLAIN]))
    with pytest.raises(ValueError, match=rf"{name}.*suffix.*\.jsonl.*\.parquet"):
        load_dataset_or_file(str(tmp_path / name))


# --- section 4: records -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": [{"role": "human", "content": "Q"}], "completions": CHAT["completions"]},
         r"record 3, field 'prompt'\[0\]\['role'\].*'human'.*'user'"),
        ({"prompt": CHAT_PROMPT, "completions": [[{"role": "gpt", "content": "a"}], CHAT["completions"][1]]},
         r"record 3, field 'completions'\[0\]\[0\]\['role'\].*'gpt'.*'assistant'"),
        ({"prompt": CHAT_PROMPT, "completions": [[{"role": "user", "content": "a"}], CHAT["completions"][1]]},
         r"record 3, field 'completions'\[0\]\[0\]\['role'\].*completion.*'assistant'"),
    ],
)
def test_chat_messages_with_unexpected_roles_are_named(record, message):
    with pytest.raises(ValueError, match=message):
        normalize_record(record, 3)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "Q", "completions": ["a", "b", "a"], "scores": [3, 2, 1]}, r"record 2.*completions 0 and 2.*3.*1"),
        ({"prompt": "Q", "completions": ["a", "b", "a"]}, r"record 2.*completions 0 and 2.*same"),
        ({"prompt": "Q", "completions": ["a", "b", "a"], "ranking": [0, 1, 2]}, r"record 2.*completions 0 and 2"),
        ({"prompt": "Q", "chosen": "a", "rejected": "a"}, r"record 2.*'chosen'.*'rejected'.*same"),
        ({"prompt": "Q", "completions": ["a", "a"], "scores": [1, 1]}, r"record 2.*fewer than 2 distinct"),
    ],
)
def test_duplicated_completions_that_contradict_are_refused(record, message):
    with pytest.raises(ValueError, match=message):
        normalize_record(record, 2)


def test_duplicates_with_equal_scores_are_dropped_and_counted_in_the_log(caplog):
    record = {"prompt": "Q", "completions": ["a", "b", "a", "c"], "scores": [3, 2, 3, 1]}
    with caplog.at_level(logging.WARNING, logger="rlhf_ext.data.prepare"):
        prepared = prepare([record, PLAIN])
    assert len(prepared[0]["completion_ids"]) == 3
    assert prepared[0]["num_ranked"] == 2  # a > b > c, no tie left at the top
    assert "1 duplicated completion" in caplog.text


def test_tokenizer_without_eos_is_refused_naming_the_setting():
    tokenizer = tiny_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match=r"eos_token.*tokenizer\.eos_token"):
        prepare([PLAIN], tokenizer)


def test_chat_records_with_a_tokenizer_without_chat_template_are_refused_naming_the_record():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"record 0.*chat template.*chat_template"):
        prepare([CHAT], tokenizer)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"tools": "[{not json"}, r"record 0, field 'tools'.*JSON"),
        ({"tools": '{"name": "f"}'}, r"record 0, field 'tools'.*list"),
        ({"chat_template_kwargs": "enable_thinking"}, r"record 0, field 'chat_template_kwargs'.*dict"),
    ],
)
def test_malformed_auxiliary_columns_are_named(extra, message):
    with pytest.raises(ValueError, match=message):
        prepare([{**CHAT, **extra}])


def test_the_filter_a_same_chosen_and_rejected_error_suggests_works():
    records = Dataset.from_list([{"prompt": "p ", "chosen": "a", "rejected": "b"},
                                 {"prompt": "q ", "chosen": "same", "rejected": "same"}])
    with pytest.raises(ValueError, match=r"record 1, .*both chosen and rejected") as error:
        prepare_ranked_dataset(records, tiny_tokenizer(), max_length=64)
    suggestion = str(error.value).rsplit("drop them before training: ", 1)[1]
    kept = eval(suggestion, {"dataset": records})  # the message's own code, as a user would paste it
    assert len(prepare_ranked_dataset(kept, tiny_tokenizer(), max_length=64)) == 1
