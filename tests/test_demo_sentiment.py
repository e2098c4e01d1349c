import math

import pytest

from demo.sentiment import (
    completion_text,
    is_all_tied,
    rank_best_first,
    ranked_record,
    vader_compound,
)
from rlhf_ext.data import normalize_record


def test_vader_compound_of_one_rated_word_is_its_normalised_valence():
    # "good" has valence 1.9 in VADER's lexicon; compound = s / sqrt(s^2 + 15), rounded to 4 decimals.
    assert vader_compound("good") == pytest.approx(round(1.9 / math.sqrt(1.9**2 + 15), 4))
    assert vader_compound("good") == pytest.approx(0.4404)


def test_vader_compound_signs_and_neutral_text():
    assert vader_compound("I love this wonderful morning!") > 0.5
    assert vader_compound("I hate this awful, miserable morning.") < -0.5
    assert vader_compound("The table is in the kitchen.") == 0.0


def test_rank_best_first_orders_by_score_and_keeps_sampling_order_on_ties():
    completions, scores = rank_best_first(["a", "b", "c", "d"], [0.5, 0.0, 0.5, -0.2])
    assert completions == ["a", "c", "b", "d"]  # a and c tie: a was sampled first
    assert scores == [0.5, 0.5, 0.0, -0.2]


def test_rank_best_first_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="3 completions but 2 scores"):
        rank_best_first(["a", "b", "c"], [0.1, 0.2])


def test_ranked_record_on_conversations_is_best_first_with_scores():
    prompt = [{"role": "user", "content": "How was your day?"}]
    replies = ["It was terrible.", "It was a day.", "It was wonderful, thank you!"]
    record = ranked_record(prompt, [[{"role": "assistant", "content": r}] for r in replies])
    assert record["prompt"] == prompt
    assert [completion_text(c) for c in record["completions"]] == [replies[2], replies[1], replies[0]]
    assert record["scores"] == sorted(record["scores"], reverse=True)
    assert record["scores"][0] > 0 > record["scores"][2] and record["scores"][1] == 0.0


def test_ranked_record_is_accepted_by_the_ranked_data_schema():
    prompt = [{"role": "user", "content": "Describe the weather today."}]
    replies = ["Lovely and sunny!", "Grey.", "Horrible, cold rain."]
    record = ranked_record(prompt, [[{"role": "assistant", "content": r}] for r in replies])
    normalized = normalize_record(record, index=0)
    assert normalized["completions"] == record["completions"]  # already best first
    assert normalized["num_ranked"] == 2  # strict order: all K-1 positions known


def test_is_all_tied():
    assert is_all_tied({"scores": [0.0, 0.0, 0.0]})
    assert not is_all_tied({"scores": [0.0, 0.1, 0.0]})
