"""Streamed data (issue 21, item 1): a `datasets.IterableDataset` is validated and tokenized on the fly, gives the
map-style losses step by step, fails on a bad record with the map-style error text, and has what it dropped,
truncated, de-duplicated or found tied counted in the log."""

import logging

import pytest
from datasets import Dataset, IterableDataset
from kway_records import LISTS, PAIRS

from rlhf_ext.data import StreamCounts, prepare_ranked_dataset
from rlhf_ext.testing import tiny_causal_lm, tiny_tokenizer
from rlhf_ext.trainers import (
    PlackettLuceDPOConfig,
    PlackettLuceDPOTrainer,
    PlackettLuceRewardConfig,
    PlackettLuceRewardTrainer,
)

FIELDS = ("prompt", "chosen", "rejected", "completions", "ranking", "scores")


def with_all_fields(records: list[dict]) -> list[dict]:
    """Records with every field (None where absent): `Dataset.from_list` takes its columns from the first record."""
    return [{field: record.get(field) for field in FIELDS} for record in records]


# pairs, lists of K = 3, 4, 2, 4 and a tied list: every record layout the stream must handle
RECORDS = with_all_fields(
    [*PAIRS[:3], *LISTS, {"prompt": "q5 ", "completions": ["n", "oo", "p"], "scores": [1.0, 3.0, 1.0]}]
)
BAD = {"prompt": "q ", "completions": ["good answer", " "]}


def common_args(tmp_path, **overrides):
    args = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=2, report_to="none",
        bf16=False, use_cpu=True, gradient_checkpointing=False, disable_tqdm=True, max_length=64, seed=0,
        max_steps=3, logging_steps=1, learning_rate=1e-2, train_sampling_strategy="sequential",
    )
    return {**args, **overrides}


def build(kind, model_path, tmp_path, train, evaluation=None, **overrides):
    """A K-way trainer of `kind` ('dpo' or 'reward') on the given datasets."""
    if kind == "dpo":
        return PlackettLuceDPOTrainer(
            model=model_path, ref_model=tiny_causal_lm(seed=1),
            args=PlackettLuceDPOConfig(**common_args(tmp_path, beta=0.5, **overrides)),
            train_dataset=train, eval_dataset=evaluation, processing_class=tiny_tokenizer(),
        )
    return PlackettLuceRewardTrainer(
        model=model_path, args=PlackettLuceRewardConfig(**common_args(tmp_path, **overrides)),
        train_dataset=train, eval_dataset=evaluation, processing_class=tiny_tokenizer(),
    )


def step_losses(trainer) -> list[float]:
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("kind, checkpointing", [("dpo", False), ("reward", True)])
def test_a_stream_gives_the_map_style_loss_at_every_step(model_path, tmp_path, kind, checkpointing):
    records = Dataset.from_list(RECORDS)
    expected = step_losses(build(kind, model_path, tmp_path / "map", records, gradient_checkpointing=checkpointing))
    streamed = build(kind, model_path, tmp_path / "stream", records.to_iterable_dataset(),
                     gradient_checkpointing=checkpointing)
    got = step_losses(streamed)
    assert len(got) == len(expected) == 3
    assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("kind", ["dpo", "reward"])
def test_streamed_eval_sets_alone_and_in_a_dict_give_the_map_style_metrics(model_path, tmp_path, kind):
    records = Dataset.from_list(RECORDS)
    expected = build(kind, model_path, tmp_path, records, records).evaluate()["eval_loss"]
    stream = records.to_iterable_dataset()
    trainer = build(kind, model_path, tmp_path, stream, {"a": stream, "b": records})
    metrics = trainer.evaluate()
    assert metrics["eval_a_loss"] == pytest.approx(expected, abs=1e-6)
    assert metrics["eval_b_loss"] == pytest.approx(expected, abs=1e-6)
    assert trainer.evaluate(eval_dataset=stream)["eval_loss"] == pytest.approx(expected, abs=1e-6)


def map_style_error(records) -> str:
    with pytest.raises(ValueError) as error:
        prepare_ranked_dataset(Dataset.from_list(with_all_fields(records)), tiny_tokenizer(), max_length=64)
    return str(error.value)


@pytest.mark.parametrize("bad", [BAD, {"prompt": "q ", "completions": ["a", "b"], "ranking": [0, 0]},
                                 {"prompt": "q ", "chosen": "same", "rejected": "same"}])
def test_a_bad_record_in_a_stream_raises_the_map_style_error_naming_its_place_in_the_stream(bad):
    records = [*RECORDS, bad]
    message = map_style_error(records)
    assert f"record {len(RECORDS)}" in message
    stream = prepare_ranked_dataset(Dataset.from_list(with_all_fields(records)).to_iterable_dataset(),
                                    tiny_tokenizer(), max_length=64)
    with pytest.raises(ValueError) as error:
        list(stream)
    assert str(error.value) == message


def test_training_on_a_stream_stops_at_the_bad_record_with_its_message(model_path, tmp_path):
    records = with_all_fields([*RECORDS[:3], BAD])
    stream = Dataset.from_list(records).to_iterable_dataset()
    trainer = build("reward", model_path, tmp_path, stream)  # nothing is read before training
    with pytest.raises(ValueError, match=r"^record 3, field 'completions'\[1\]: empty completion"):
        trainer.train()


def test_a_list_too_long_for_the_positions_is_named_in_a_stream(tokenizer):
    records = [*RECORDS[:2], {"prompt": "q ", "completions": ["x" * 40, "y"]}]
    kwargs = dict(max_length=None, max_positions=32)
    with pytest.raises(ValueError) as error:
        prepare_ranked_dataset(Dataset.from_list(records), tokenizer, **kwargs)
    stream = prepare_ranked_dataset(Dataset.from_list(records).to_iterable_dataset(), tokenizer, **kwargs)
    with pytest.raises(ValueError) as streamed:
        list(stream)
    assert str(streamed.value) == str(error.value) and "record 2" in str(error.value)


def test_drops_truncations_duplicates_and_ties_of_a_stream_are_counted_and_logged(tokenizer, caplog):
    records = with_all_fields([
        {"prompt": "abc", "completions": ["x" * 10, "y"]},  # 1 completion cut
        {"prompt": "abc", "completions": ["z", "w", "z"], "scores": [1.0, 0.0, 1.0]},  # a copy dropped
        {"prompt": "a" * 8, "completions": ["z", "w"]},  # prompt fills max_length: dropped
        {"prompt": "abc", "completions": ["a", "b"], "scores": [2.0, 2.0]},  # tied at the top
    ])
    map_style = prepare_ranked_dataset(Dataset.from_list(records), tokenizer, max_length=8)
    counts = StreamCounts("train")
    stream = prepare_ranked_dataset(Dataset.from_list(records).to_iterable_dataset(), tokenizer, max_length=8,
                                    stream_counts=counts)
    streamed = list(stream)
    assert [r["completion_ids"] for r in streamed] == map_style["completion_ids"]
    got = (counts.lists, counts.kept, counts.dropped_for_length, counts.truncated_completions,
           counts.truncated_lists, counts.duplicates, counts.tied_at_top, counts.cut_at_tie)
    assert got == (4, 3, 1, 1, 1, 1, 1, 0)
    with caplog.at_level(logging.WARNING, logger="rlhf_ext.data.prepare"):
        counts.log()
    assert "train dataset (streamed, 4 records read so far)" in caplog.text
    assert "dropped 1 lists whose prompt alone fills max_length=8" in caplog.text
    assert "truncated 1 completions in 1 lists" in caplog.text


def test_the_trainer_logs_the_counts_of_its_streams_after_training(model_path, tmp_path, caplog):
    records = with_all_fields([*RECORDS[:4], {"prompt": "x" * 70, "completions": ["a", "b"]}])
    trainer = build("reward", model_path, tmp_path, Dataset.from_list(records).to_iterable_dataset(), max_steps=2)
    with caplog.at_level(logging.WARNING, logger="rlhf_ext.data.prepare"):
        trainer.train()
    assert "train dataset (streamed" in caplog.text and "dropped 1 lists whose prompt alone fills" in caplog.text


def test_precomputed_reference_logps_are_refused_for_a_stream_given_to_evaluate(model_path, tmp_path):
    trainer = build("dpo", model_path, tmp_path, Dataset.from_list(RECORDS), precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match=r"eval dataset is a stream.*precompute_ref_log_probs=True"):
        trainer.evaluate(eval_dataset=Dataset.from_list(RECORDS).to_iterable_dataset())


def test_precomputed_reference_logps_are_refused_for_a_stream_before_the_model_loads(tmp_path):
    stream = Dataset.from_list(RECORDS).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"train dataset is a stream.*precompute_ref_log_probs=True needs a map-style"):
        build("dpo", "no/such-model", tmp_path, stream, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match=r"s dataset is a stream.*precompute_ref_log_probs=True"):
        build("dpo", "no/such-model", tmp_path, Dataset.from_list(RECORDS), {"s": stream},
              precompute_ref_log_probs=True)


def test_an_empty_stream_is_refused_before_training(tokenizer):
    with pytest.raises(ValueError, match="train dataset is empty"):
        prepare_ranked_dataset(IterableDataset.from_generator(no_records), tokenizer, max_length=None)


def no_records():
    yield from ()


@pytest.mark.parametrize("kind", ["dpo", "reward"])
def test_a_stream_whose_last_batch_is_short_evaluates(model_path, tmp_path, kind):
    # 7 lists in batches of 2. With accelerate's batch dispatching the last batch's sequences were cut to its number
    # of lists (a crash in split_with_sizes). Now each batch is whole, and the Trainer, which cannot size a stream,
    # averages its batch losses with equal weights: (3 * mean loss of lists 0-5 + loss of list 6 alone) / 4.
    records = Dataset.from_list(RECORDS[:7])
    trainer = build(kind, model_path, tmp_path, records)
    first_six = trainer.evaluate(eval_dataset=records.select(range(6)))["eval_loss"]
    last_alone = trainer.evaluate(eval_dataset=records.select([6]))["eval_loss"]
    got = trainer.evaluate(eval_dataset=records.to_iterable_dataset())["eval_loss"]
    assert got == pytest.approx((3 * first_six + last_alone) / 4, abs=1e-6)


def test_dispatching_k_way_batches_is_refused_naming_the_setting(model_path, tmp_path):
    with pytest.raises(ValueError, match=r"accelerator_config.dispatch_batches=True cannot split a K-way batch"):
        build("reward", model_path, tmp_path, Dataset.from_list(RECORDS), accelerator_config={"dispatch_batches": True})
