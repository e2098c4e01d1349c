"""The demo's ranking signal: VADER sentiment (Hutto & Gilbert, 2014), and K-way ranked records.

VADER scores text with a lexicon of ~7,500 words whose valence was rated by people, plus rules for
negation, intensifiers, punctuation and capitals. Its `compound` score lies in [-1, 1]; higher is
warmer. The package ships its lexicon, so scoring needs no network. These are preferences from a
lexicon, not from people judging whole replies: a reply full of "great" and "love" wins even when
it is not a good answer.

Ranking rule: completions are ordered by compound score, highest first. Ties (equal scores, common
at 0.0 for neutral text) keep the order in which the completions were sampled. Sampling is seeded,
so that order is reproducible, and it carries no information about the text; a tie-break by length
or alphabetical order would teach the models a preference the lexicon never expressed. Records keep
their scores, so the trainers see the ties: `rlhf_ext.data`'s default `tie_policy="truncate"` trains
only on the part of each ranking that the scores determine.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _analyzer():
    """One VADER analyzer per process: building it parses the lexicon file (~0.1 s)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER compound score of `text`, in [-1, 1] (rounded to 4 decimals by VADER itself)."""
    return _analyzer().polarity_scores(text)["compound"]


def completion_text(completion: str | list[dict[str, str]]) -> str:
    """The text of a completion, plain or conversational (the content of its messages, joined)."""
    if isinstance(completion, str):
        return completion
    return "\n".join(message["content"] for message in completion)


def rank_best_first(completions: list[Any], scores: list[float]) -> tuple[list[Any], list[float]]:
    """Completions and scores reordered by score, highest first; ties keep their original order."""
    if len(completions) != len(scores):
        raise ValueError(f"got {len(completions)} completions but {len(scores)} scores")
    # sorted() is stable, so sorting on -score alone leaves tied completions in sampling order.
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return [completions[i] for i in order], [scores[i] for i in order]


def ranked_record(prompt: Any, completions: list[Any]) -> dict[str, Any]:
    """A record in the ranked format (docs/kway.md), completions best first, with their VADER scores.

    `prompt` and each completion may be plain text or conversational (a list of messages); the
    scores are kept so a reader can see (and a trainer can re-derive) the ranking.
    """
    scores = [vader_compound(completion_text(c)) for c in completions]
    ranked, ranked_scores = rank_best_first(completions, scores)
    return {"prompt": prompt, "completions": ranked, "scores": ranked_scores}


def is_all_tied(record: dict[str, Any]) -> bool:
    """True when every completion of the record has the same score, so it states no preference."""
    return len(set(record["scores"])) == 1
