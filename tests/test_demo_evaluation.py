import json

import pytest

from demo.evaluation import (
    PolicySamples,
    PolicySpec,
    evaluate_policies,
    policy_metrics,
    win_rate,
)
from demo.generation import SamplingConfig, load_model_and_tokenizer
from demo.prompts import as_conversation
from demo.sampling import (
    build_ranked_dataset,
    read_ranked_dataset,
    write_ranked_dataset,
)
from demo.tiny import save_tiny_word_model

PROMPTS = ["How was your weekend?", "Describe a rainy afternoon.", "What is your favourite fruit?", "Hi."]


def test_win_rate_counts_ties_as_half():
    policy = [[1.0, 0.0], [0.0], [0.5]]  # prompt means 0.5, 0.0, 0.5
    base = [[0.0], [0.0], [1.0]]
    assert win_rate(policy, base) == pytest.approx((1 + 0.5 + 0) / 3)


def test_policy_metrics_by_hand():
    base = PolicySamples("base", [["x"], ["y"]], [[0.0], [0.5]], [[0.0], [0.0]], [[4], [6]])
    ppo = PolicySamples("ppo", [["x"], ["y"]], [[0.4], [0.5]], [[1.0], [3.0]], [[5], [7]])
    m = policy_metrics(ppo, base)
    assert m.mean_vader == pytest.approx(0.45)
    assert m.win_rate_vs_base == pytest.approx(0.75)
    assert m.kl_to_base == pytest.approx(2.0)
    assert m.mean_length_tokens == pytest.approx(6.0)


def test_write_ranked_dataset_drops_empty_completions_and_lists_without_preference(tmp_path):
    def rec(texts, scores):
        return {"prompt": "p", "completions": texts, "scores": scores}

    records = [
        rec(["good", "", "bad"], [0.4, 0.0, -0.5]),  # kept, without its empty completion
        rec(["", "", "fine"], [0.0, 0.0, 0.2]),  # one completion left: dropped
        rec(["a", "b", "c"], [0.0, 0.0, 0.0]),  # all tied: dropped
    ]
    stats = write_ranked_dataset(records, tmp_path / "train.jsonl")
    written = read_ranked_dataset(tmp_path / "train.jsonl")
    assert written == [rec(["good", "bad"], [0.4, -0.5])]
    assert (stats.n_prompts, stats.n_written, stats.n_empty_completions, stats.n_lists_dropped) == (3, 1, 3, 2)


def test_stage1_on_tiny_model_writes_reproducible_ranked_lists(tmp_path):
    model, tokenizer = load_model_and_tokenizer(save_tiny_word_model(tmp_path / "tiny"))
    conversations = [as_conversation(p, "") for p in PROMPTS]
    kwargs = dict(k=3, sampling=SamplingConfig(max_new_tokens=10), batch_size=2, seed=0)
    stats = build_ranked_dataset(model, tokenizer, conversations, tmp_path / "a.jsonl", **kwargs)
    build_ranked_dataset(model, tokenizer, conversations, tmp_path / "b.jsonl", **kwargs)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    records = read_ranked_dataset(tmp_path / "a.jsonl")
    assert len(records) == stats.n_written and stats.n_written + stats.n_lists_dropped == len(PROMPTS)
    for record in records:
        assert record["prompt"][0] == {"role": "system", "content": ""}
        assert 2 <= len(record["completions"]) <= 3
        assert record["scores"] == sorted(record["scores"], reverse=True)
        assert json.dumps(record)  # plain JSON types only


def test_base_against_itself_wins_half_with_zero_kl(tmp_path):
    base = save_tiny_word_model(tmp_path / "tiny")
    other = save_tiny_word_model(tmp_path / "other", seed=1)
    specs = [PolicySpec("base", base), PolicySpec("same", base), PolicySpec("other", other)]
    conversations = [as_conversation(p) for p in PROMPTS]
    metrics, samples = evaluate_policies(
        specs, conversations, n_samples=2, sampling=SamplingConfig(max_new_tokens=8), batch_size=3, seed=0
    )
    assert samples["same"].texts == samples["base"].texts  # same seed, same model: same samples
    assert metrics["same"].win_rate_vs_base == 0.5
    assert metrics["same"].kl_to_base == pytest.approx(0.0, abs=1e-5)
    assert metrics["other"].kl_to_base != pytest.approx(0.0, abs=1e-3)  # a different model is measured
    assert len(samples["other"].texts) == len(PROMPTS) and all(len(t) == 2 for t in samples["other"].texts)


def test_first_policy_must_be_the_base(tmp_path):
    with pytest.raises(ValueError, match="first policy must be the base"):
        evaluate_policies([PolicySpec("ppo", "m", "adapter")], [], n_samples=1, sampling=SamplingConfig(),
                          batch_size=1, seed=0)  # fmt: skip
