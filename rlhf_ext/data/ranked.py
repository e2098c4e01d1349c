"""The ranked-preference record: one prompt, K >= 2 completions ordered best first.

Accepted input records (plain text or conversational, i.e. lists of `{"role", "content"}` messages):

    {"prompt": x, "completions": [y_1, ..., y_K]}                     # already best first
    {"prompt": x, "completions": [...], "ranking": [r_1, ..., r_K]}   # r_k = rank of y_k, 0 = best
    {"prompt": x, "completions": [...], "scores": [s_1, ..., s_K]}    # higher = better
    {"prompt": x, "chosen": y_w, "rejected": y_l}                     # TRL's pairwise format, K = 2
    {"chosen": x + y_w, "rejected": x + y_l}                          # TRL's implicit-prompt format

`normalize_record` turns each of these into the canonical record

    {"prompt": x, "completions": [y_(1), ..., y_(K)] (best first), "num_ranked": m}

where `m` is the number of leading positions whose Plackett-Luce term carries a known preference: K - 1 for
a strict ranking, fewer when tied scores end the known order (see `TIE_POLICIES`).
"""

from __future__ import annotations

import math
from typing import Any

from trl.data_utils import extract_prompt

# How tied scores are handled. Plackett-Luce has no ties: the k-th term says "y_(k) beats every item below it".
#   "truncate": keep the ranking only up to the first tie. For scores [5, 3, 3, 1] the loss keeps the term
#               "y_1 beats the other three" (m = 1); all K items still compete in its denominator. This is the
#               exact log-likelihood of the part of the order that the scores determine.
#   "error":    raise a ValueError naming the record and field.
TIE_POLICIES = ("truncate", "error")


def _where(index: int, field: str) -> str:
    return f"record {index}, field {field!r}"


def _is_empty(completion: Any) -> bool:
    """True for "", a message list with no messages, or messages whose contents are all empty."""
    if isinstance(completion, str):
        return completion == ""
    if isinstance(completion, list):
        return all(not (message.get("content") or "") for message in completion)
    return completion is None


def _pairwise_as_ranked(example: dict[str, Any]) -> dict[str, Any]:
    """TRL's prompt/chosen/rejected (or implicit-prompt chosen/rejected) record as a K=2 list, best first."""
    if example.get("prompt") is None:
        example = extract_prompt({"chosen": example["chosen"], "rejected": example["rejected"]})
    return {"prompt": example["prompt"], "completions": [example["chosen"], example["rejected"]]}


def _check_permutation(ranking: list, index: int) -> None:
    k = len(ranking)
    if any(not isinstance(r, int) or isinstance(r, bool) for r in ranking) or sorted(ranking) != list(range(k)):
        raise ValueError(f"{_where(index, 'ranking')}: {ranking} is not a permutation of 0..{k - 1} (0 = best)")


def _check_scores(scores: list, index: int) -> None:
    for k, score in enumerate(scores):
        if score is None or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"{_where(index, 'scores')}[{k}]: {score!r} is not a finite number")


def _leading_strict_positions(sorted_scores: list[float]) -> int:
    """Number of positions k < K-1 before the first tie s_(k) == s_(k+1) in descending-sorted scores."""
    for k in range(len(sorted_scores) - 1):
        if sorted_scores[k] == sorted_scores[k + 1]:
            return k
    return len(sorted_scores) - 1


def _order_by_scores(completions: list, scores: list, index: int, tie_policy: str) -> tuple[list, int]:
    """Completions sorted by descending score (stable) and the number of ranked positions under `tie_policy`."""
    order = sorted(range(len(scores)), key=lambda k: -scores[k])
    num_ranked = _leading_strict_positions([scores[k] for k in order])
    if tie_policy == "error" and num_ranked < len(scores) - 1:
        raise ValueError(f"{_where(index, 'scores')}: tied scores {scores} (tie_policy='error')")
    return [completions[k] for k in order], num_ranked


def normalize_record(example: dict[str, Any], index: int, tie_policy: str = "truncate") -> dict[str, Any]:
    """Validate one record and return it as `{"prompt", "completions" (best first), "num_ranked"}`.

    Raises a ValueError naming `index` and the field for: no completions field, fewer than 2 completions, an
    empty completion, a ranking/scores list whose length differs from the completions, a ranking that is not a
    permutation of 0..K-1, a score that is NaN or infinite, and (with `tie_policy="error"`) tied scores.
    """
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    if example.get("completions") is None:
        if example.get("chosen") is None or example.get("rejected") is None:
            raise ValueError(
                f"record {index}: needs a 'completions' field (ranked format) or 'chosen' and 'rejected' fields "
                f"(pairwise format); got fields {sorted(k for k, v in example.items() if v is not None)}"
            )
        example = _pairwise_as_ranked(example)
        field = "chosen/rejected"
    elif example.get("prompt") is None:
        raise ValueError(f"{_where(index, 'prompt')}: missing (the ranked format needs an explicit prompt)")
    else:
        field = "completions"
    completions = list(example["completions"])
    if len(completions) < 2:
        raise ValueError(f"{_where(index, field)}: needs at least 2 completions, got {len(completions)}")
    for k, completion in enumerate(completions):
        if _is_empty(completion):
            raise ValueError(f"{_where(index, field)}[{k}]: empty completion")

    ranking, scores = example.get("ranking"), example.get("scores")
    if ranking is not None and scores is not None:
        raise ValueError(f"record {index}: give 'ranking' or 'scores', not both")
    for name, values in (("ranking", ranking), ("scores", scores)):
        if values is not None and len(values) != len(completions):
            raise ValueError(
                f"{_where(index, name)}: has {len(values)} entries but 'completions' has {len(completions)}"
            )

    num_ranked = len(completions) - 1
    if ranking is not None:
        _check_permutation(list(ranking), index)
        completions = [completions[k] for k in sorted(range(len(ranking)), key=lambda k: ranking[k])]
    elif scores is not None:
        _check_scores(list(scores), index)
        completions, num_ranked = _order_by_scores(completions, list(scores), index, tie_policy)
    return {"prompt": example.get("prompt"), "completions": completions, "num_ranked": num_ranked}
