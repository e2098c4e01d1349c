"""The ranked-preference record: one prompt, K >= 2 completions ordered best first.

Accepted input records (plain text or conversational, i.e. lists of `{"role", "content"}` messages):

    {"prompt": x, "completions": [y_1, ..., y_K]}                     # already best first
    {"prompt": x, "completions": [...], "ranking": [r_1, ..., r_K]}   # r_k = rank of y_k, 0 = best (ints)
    {"prompt": x, "completions": [...], "scores": [s_1, ..., s_K]}    # higher = better
    {"prompt": x, "chosen": y_w, "rejected": y_l}                     # TRL's pairwise format, K = 2
    {"chosen": x + y_w, "rejected": x + y_l}                          # TRL's implicit-prompt format

and, with a field mapping, records whose completions are dicts (UltraFeedback's layout):

    {"instruction": x, "completions": [{"response": y_1, "overall_score": s_1, ...}, ...]}
    # prompt_key="instruction", completion_text_key="response", completion_score_key="overall_score"

`normalize_record` turns each of these into the canonical record

    {"prompt": x, "completions": [y_(1), ..., y_(K)] (best first), "num_ranked": m}

where `m` is the number of leading positions whose Plackett-Luce term carries a known preference: K - 1 for
a strict ranking, fewer when tied scores end the known order (see `TIE_POLICIES`).

Every check runs on the record as given, before any tokenization, and raises a ValueError that names the
record index and the field, for wrong types as well as wrong values: a string where a list belongs would
otherwise be read as a list of characters, and a dict completion would only fail later, inside the tokenizer.
"""

from __future__ import annotations

import json
import math
from typing import Any

from trl.data_utils import extract_prompt

# How tied scores are handled. Plackett-Luce has no ties: the k-th term says "y_(k) beats every item below it".
#   "truncate": keep the ranking only up to the first tie. For scores [5, 3, 3, 1] the loss keeps the term
#               "y_1 beats the other three" (m = 1); all K items still compete in its denominator. This is the
#               exact log-likelihood of the part of the order that the scores determine.
#   "error":    raise a ValueError naming the record and field.
TIE_POLICIES = ("truncate", "error")

# Keys that name a completion's text or score in the dict layouts people have (UltraFeedback: "response" and
# "overall_score"); the error for an unmapped dict completion suggests the first one present.
_TEXT_KEY_GUESSES = ("response", "text", "content", "completion", "output", "answer")
_SCORE_KEY_GUESSES = ("overall_score", "score", "rating", "reward")

# Roles chat templates know. Any other role is a message the template renders wrongly or drops (ShareGPT's
# "human"/"gpt" become a literal "human:" turn in some templates and an exception in others).
KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")
# Roles of other chat formats, and the role to use instead.
_ROLE_FIXES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
               "chatgpt": "assistant", "prompter": "user"}

TEXT, MESSAGES = "plain text", "a list of messages"


def _where(index: int, field: str) -> str:
    return f"record {index}, field {field!r}"


def _describe(value: Any) -> str:
    """A short description of a value for error messages: its type and (the start of) its repr."""
    if isinstance(value, dict):
        return f"a dict with keys {sorted(value)}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_message(message: Any, where: str) -> None:
    """A chat message is a dict with a known string 'role' and a string 'content' (None only beside 'tool_calls')."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError(f"{where}: a message must be a dict with a 'role' and a 'content', got {_describe(message)}")
    problem = role_problem(message["role"])
    if problem:
        raise ValueError(f"{where}['role']: {problem}")
    content = message.get("content")
    if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
        raise ValueError(f"{where}['content']: must be a string, got {_describe(content)}")


def role_problem(role: str) -> str | None:
    """What is wrong with a chat message's role, with the role to use when one fits; None for a known role."""
    if role in KNOWN_ROLES:
        return None
    fix = _ROLE_FIXES.get(role.strip().lower(), role.strip().lower())
    hint = f"; use {fix!r}" if fix in KNOWN_ROLES else ""
    return f"unknown role {role!r} (chat templates know {list(KNOWN_ROLES)}){hint}"


def _has_text(value: str | list[dict]) -> bool:
    """True when a text, or some message of a message list, holds a non-whitespace character (or a tool call)."""
    if isinstance(value, str):
        return bool(value.strip())
    return any((message.get("content") or "").strip() or message.get("tool_calls") for message in value)


def _dict_completion_hint(completion: dict) -> str:
    """How to map a dict completion: wrap a lone message, or name the keys that hold the text and the score."""
    if "role" in completion and "content" in completion:
        return "it looks like one message: a conversational completion is a list of messages, [message]"
    text_keys = [k for k in _TEXT_KEY_GUESSES if isinstance(completion.get(k), str)]
    text_keys += sorted(k for k, v in completion.items() if isinstance(v, str) and k not in text_keys)
    score_keys = [k for k in _SCORE_KEY_GUESSES if _is_real_number(completion.get(k))]
    score_keys += sorted(k for k, v in completion.items() if _is_real_number(v) and k not in score_keys)
    hint = f"set completion_text_key={text_keys[0]!r}" if text_keys else "set completion_text_key to its text key"
    if score_keys:
        hint += f" (and completion_score_key={score_keys[0]!r} to rank by that score)"
    return hint + " in the K-way config or prepare_ranked_dataset; see docs/kway.md, 'Other layouts'"


def check_text_or_messages(value: Any, where: str, what: str) -> str:
    """Validate a prompt or a completion: a non-blank string, or a list of messages with some non-blank content.

    Returns TEXT or MESSAGES, the kind of `value`; raises a ValueError starting with `where` otherwise.
    """
    if isinstance(value, str):
        kind = TEXT
    elif isinstance(value, list) and all(isinstance(message, dict) for message in value):
        for i, message in enumerate(value):
            _check_message(message, f"{where}[{i}]")
        if what == "completion" and value and value[0]["role"] != "assistant":
            # a completion is the model's reply; a 'user' message here would train the model to write the user's turn
            raise ValueError(
                f"{where}[0]['role']: a completion must start with an 'assistant' message (the model's reply), got "
                f"{value[0]['role']!r}; put the conversation before the reply in the prompt"
            )
        kind = MESSAGES
    else:
        hint = f"; {_dict_completion_hint(value)}" if isinstance(value, dict) and what == "completion" else ""
        raise ValueError(
            f"{where}: a {what} must be a string or a list of {{'role', 'content'}} messages, got {_describe(value)}"
            f"{hint}"
        )
    if not _has_text(value):
        raise ValueError(f"{where}: empty {what} (nothing but whitespace)")
    return kind


def _check_same_kind(prompt_kind: str, completion_kinds: list[str], wheres: list[str]) -> None:
    """The chat template renders prompt + completion as one conversation, so both must be messages or both text."""
    fixes = {
        TEXT: "give the prompt as plain text too, or each completion as [{'role': 'assistant', 'content': text}]",
        MESSAGES: "give the prompt as messages too, e.g. [{'role': 'user', 'content': prompt}]",
    }
    for kind, where in zip(completion_kinds, wheres):
        if kind != prompt_kind:
            raise ValueError(f"{where}: the completion is {kind} but the prompt is {prompt_kind}; {fixes[kind]}")


def _pairwise_fields(example: dict[str, Any], index: int, prompt_key: str) -> tuple[Any, list, list[str]]:
    """Prompt, [chosen, rejected] and their locations, from TRL's explicit- or implicit-prompt pairwise record."""
    wheres = [_where(index, "chosen"), _where(index, "rejected")]
    pair = [example["chosen"], example["rejected"]]
    prompt = example.get(prompt_key)
    if prompt is None:
        # The implicit-prompt format stores whole conversations; check them before TRL splits off their
        # shared start, so a wrong type is reported here rather than inside `extract_prompt`.
        kinds = [check_text_or_messages(value, where, "conversation") for value, where in zip(pair, wheres)]
        if kinds[0] != kinds[1]:
            raise ValueError(f"record {index}, fields 'chosen'/'rejected': one is {kinds[0]}, the other {kinds[1]}")
        split = extract_prompt({"chosen": pair[0], "rejected": pair[1]})
        prompt, pair = split["prompt"], [split["chosen"], split["rejected"]]
        if not prompt:
            raise ValueError(
                f"record {index}, fields 'chosen'/'rejected': they share no prompt (they differ from the start); "
                f"give the prompt in a {prompt_key!r} field"
            )
    return prompt, pair, wheres


def _texts_and_scores_from_dicts(
    completions: list, index: int, text_key: str, score_key: str | None
) -> tuple[list, list[str], list | None]:
    """Each dict completion's text (and score) under the mapped keys, with the location of each text."""
    base = _where(index, "completions")
    texts, wheres, scores = [], [], []
    for k, completion in enumerate(completions):
        if not isinstance(completion, dict) or completion.get(text_key) is None:
            raise ValueError(
                f"{base}[{k}]: completion_text_key={text_key!r} is set, so each completion must be a dict with a "
                f"{text_key!r} key; got {_describe(completion)}"
            )
        texts.append(completion[text_key])
        wheres.append(f"{base}[{k}][{text_key!r}]")
        if score_key is not None:
            scores.append(completion.get(score_key))
    if score_key is not None:
        _check_scores(scores, [f"{base}[{k}][{score_key!r}]" for k in range(len(scores))])
    return texts, wheres, scores if score_key is not None else None


def _ranked_fields(
    example: dict[str, Any], index: int, prompt_key: str, text_key: str | None, score_key: str | None
) -> tuple[Any, list, list[str], list | None]:
    """Prompt, completions, their locations and the per-completion scores (with `score_key`) of a ranked record."""
    prompt = example.get(prompt_key)
    if prompt is None:
        present = sorted(k for k, v in example.items() if v is not None)
        raise ValueError(
            f"{_where(index, prompt_key)}: missing (the ranked format needs an explicit prompt; set prompt_key to "
            f"the field that holds it, this record has fields {present})"
        )
    completions = example["completions"]
    if not isinstance(completions, (list, tuple)):
        hint = ""
        if isinstance(completions, str) and completions.strip().startswith("["):
            hint = ("; it looks like a list written as text (a CSV cell?): store the dataset as JSON Lines or "
                    "Parquet, where a list stays a list")
        raise ValueError(
            f"{_where(index, 'completions')}: must be a list of completions, got {_describe(completions)}{hint}"
        )
    if len(completions) < 2:
        raise ValueError(f"{_where(index, 'completions')}: needs at least 2 completions, got {len(completions)}")
    if text_key is not None:
        return (prompt, *_texts_and_scores_from_dicts(list(completions), index, text_key, score_key))
    wheres = [f"{_where(index, 'completions')}[{k}]" for k in range(len(completions))]
    return prompt, list(completions), wheres, None


def _check_ranking(ranking: Any, index: int, num_completions: int) -> list[int]:
    """A ranking is a list of K ints, a permutation of 0..K-1 (0 = best). Floats are refused rather than
    rounded: [1.0, 0.0] may as well be scores (higher = better), which order the completions the other way."""
    where = _where(index, "ranking")
    if not isinstance(ranking, (list, tuple)):
        raise ValueError(f"{where}: ranking must be a list of ints (0 = best), got {_describe(ranking)}")
    for position, rank in enumerate(ranking):
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise ValueError(
                f"{where}[{position}]: ranking must be a list of ints (0 = best), got {_describe(rank)}; "
                "for scores (higher = better) use a 'scores' field"
            )
    _check_length(ranking, "ranking", index, num_completions)
    if sorted(ranking) != list(range(num_completions)):
        raise ValueError(f"{where}: {list(ranking)} is not a permutation of 0..{num_completions - 1} (0 = best)")
    return list(ranking)


def _check_scores(scores: list, wheres: list[str]) -> None:
    """Scores are finite real numbers (bools, strings and None are refused, not coerced)."""
    for score, where in zip(scores, wheres):
        if not _is_real_number(score) or not math.isfinite(score):
            raise ValueError(f"{where}: {score!r} is not a finite number")


def _check_scores_field(scores: Any, index: int, num_completions: int) -> list:
    where = _where(index, "scores")
    if not isinstance(scores, (list, tuple)):
        raise ValueError(f"{where}: scores must be a list of numbers (higher = better), got {_describe(scores)}")
    _check_length(scores, "scores", index, num_completions)
    _check_scores(list(scores), [f"{where}[{k}]" for k in range(len(scores))])
    return list(scores)


def _check_length(values: list, name: str, index: int, num_completions: int) -> None:
    if len(values) != num_completions:
        raise ValueError(f"{_where(index, name)}: has {len(values)} entries but 'completions' has {num_completions}")


def _leading_strict_positions(sorted_scores: list[float]) -> int:
    """Number of positions k < K-1 before the first tie s_(k) == s_(k+1) in descending-sorted scores."""
    for k in range(len(sorted_scores) - 1):
        if sorted_scores[k] == sorted_scores[k + 1]:
            return k
    return len(sorted_scores) - 1


def _order_by_scores(completions: list, scores: list, where: str, tie_policy: str) -> tuple[list, int]:
    """Completions sorted by descending score (stable) and the number of ranked positions under `tie_policy`."""
    order = sorted(range(len(scores)), key=lambda k: -scores[k])
    num_ranked = _leading_strict_positions([scores[k] for k in order])
    if tie_policy == "error" and num_ranked < len(scores) - 1:
        raise ValueError(f"{where}: tied scores {scores} (tie_policy='error')")
    return [completions[k] for k in order], num_ranked


def _completion_key(completion: Any) -> str:
    """A completion as one string, so that identical texts (or identical message lists) compare equal."""
    return completion if isinstance(completion, str) else json.dumps(completion, sort_keys=True, default=str)


def _duplicate_groups(completions: list) -> list[list[int]]:
    """Positions of the completions that occur more than once in a list, one group per repeated completion."""
    positions: dict[str, list[int]] = {}
    for k, completion in enumerate(completions):
        positions.setdefault(_completion_key(completion), []).append(k)
    return [group for group in positions.values() if len(group) > 1]


def _drop_equal_duplicates(
    completions: list, scores: list | None, index: int, order_source: str | None
) -> tuple[list, list | None, int]:
    """(completions, scores, copies dropped): copies of a completion that carry the same score are dropped (they
    only add a tie that can cut the ranking short); copies ranked differently contradict each other and raise.

    `order_source` names what orders a list without scores ("'ranking'", the list order, or None for a pair).
    """
    groups = _duplicate_groups(completions)
    if not groups:
        return completions, scores, 0
    group = groups[0]
    text = _describe(completions[group[0]])
    if order_source is None:
        raise ValueError(
            f"record {index}, fields 'chosen'/'rejected': the same completion ({text}) is both chosen and rejected; "
            "a pair needs two different completions. Public pairwise sets hold some such records (HH-RLHF does); "
            "drop them before training: dataset.filter(lambda r: r['chosen'] != r['rejected'])"
        )
    where = _where(index, "completions")
    if scores is None:
        raise ValueError(
            f"{where}: completions {group[0]} and {group[1]} are the same ({text}), but {order_source} ranks one above "
            "the other; remove the copy (or give 'scores', equal for the copies)"
        )
    for group in groups:
        if len({scores[k] for k in group}) > 1:
            same = _describe(completions[group[0]])
            raise ValueError(
                f"{where}: completions {' and '.join(map(str, group))} are the same ({same}) "
                f"with different scores {[scores[k] for k in group]}, a contradiction; keep one copy with its score"
            )
    copies = {k for group in groups for k in group[1:]}
    keep = [k for k in range(len(completions)) if k not in copies]
    if len(keep) < 2:
        raise ValueError(f"{where}: fewer than 2 distinct completions once the copies of {text} are dropped")
    return [completions[k] for k in keep], [scores[k] for k in keep], len(copies)


def _check_auxiliary(example: dict[str, Any], index: int) -> None:
    """The per-record chat-template options TRL reads: 'tools' (a list, or its JSON text) and
    'chat_template_kwargs' (a dict). Checked here, where the record is known, not inside the tokenizer."""
    tools = example.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise ValueError(f"{_where(index, 'tools')}: not valid JSON ({err.msg}): {tools[:80]!r}") from err
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"{_where(index, 'tools')}: must be a list of tool schemas (or its JSON text), got "
                         f"{_describe(tools)}")
    kwargs = example.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"{_where(index, 'chat_template_kwargs')}: must be a dict of chat-template options, got "
                         f"{_describe(kwargs)}")


def check_field_mapping(prompt_key: str, completion_text_key: str | None, completion_score_key: str | None) -> None:
    """The mapping options are consistent: a prompt key, and a score key only beside a text key."""
    if not isinstance(prompt_key, str) or not prompt_key:
        raise ValueError(f"prompt_key must be a field name, got {prompt_key!r}")
    if completion_score_key is not None and completion_text_key is None:
        raise ValueError(
            f"completion_score_key={completion_score_key!r} reads a score from each dict completion, so it needs "
            "completion_text_key (the key of the text in those dicts) too"
        )


def normalize_record(
    example: dict[str, Any],
    index: int,
    tie_policy: str = "truncate",
    *,
    prompt_key: str = "prompt",
    completion_text_key: str | None = None,
    completion_score_key: str | None = None,
    count_duplicates: bool = False,
    read_margin: bool = False,
) -> dict[str, Any]:
    """Validate one record and return it as `{"prompt", "completions" (best first), "num_ranked"}`.

    `prompt_key` names the prompt field; with `completion_text_key` each completion is a dict whose text is
    under that key, and with `completion_score_key` also its score (higher = better), as in UltraFeedback.

    Raises a ValueError naming `index` and the field for: no completions field, a completions field that is not
    a list, fewer than 2 completions, a prompt or completion that is neither a string nor a list of messages,
    an empty or whitespace-only prompt or completion, a text prompt with message completions (or the reverse),
    a ranking/scores list whose length differs from the completions, a ranking that is not a permutation of
    ints 0..K-1, a score that is not a finite number, more than one source of order, and (with
    `tie_policy="error"`) tied scores; a chat message with a role templates do not know, or a completion that does
    not start with an 'assistant' message; the same completion twice with different scores or places (chosen equal
    to rejected, too); a 'tools' field that is not a list (or its JSON) and a 'chat_template_kwargs' that is not a dict.

    Copies of a completion with equal scores are dropped; with `count_duplicates` the record also gets
    `num_duplicates`, the number dropped (for the log). With `read_margin` a 'margin' field (TRL's reward margin,
    see `check_margin`) is checked and returned as a float, 0.0 where it is None.
    """
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    check_field_mapping(prompt_key, completion_text_key, completion_score_key)
    mapped_scores = None
    _check_auxiliary(example, index)
    pairwise = example.get("completions") is None
    if pairwise:
        if example.get("chosen") is None or example.get("rejected") is None:
            raise ValueError(
                f"record {index}: needs a 'completions' field (ranked format) or 'chosen' and 'rejected' fields "
                f"(pairwise format); got fields {sorted(k for k, v in example.items() if v is not None)}"
            )
        prompt, completions, wheres = _pairwise_fields(example, index, prompt_key)
    else:
        prompt, completions, wheres, mapped_scores = _ranked_fields(
            example, index, prompt_key, completion_text_key, completion_score_key
        )
    margin = check_margin(example.get("margin"), index, len(completions)) if read_margin else None
    prompt_kind = check_text_or_messages(prompt, _where(index, prompt_key), "prompt")
    kinds = [check_text_or_messages(c, where, "completion") for c, where in zip(completions, wheres)]
    _check_same_kind(prompt_kind, kinds, wheres)

    ranking, scores = example.get("ranking"), example.get("scores")
    sources = [name for name, value in (("ranking", ranking), ("scores", scores)) if value is not None]
    if mapped_scores is not None:
        sources.append(f"completion_score_key={completion_score_key!r}")
    if len(sources) > 1:
        raise ValueError(f"record {index}: give one order, not {' and '.join(sources)}")

    if ranking is not None:
        ranking = _check_ranking(ranking, index, len(completions))
    elif scores is not None:
        scores = _check_scores_field(scores, index, len(completions))
    order_source = None if pairwise else "'ranking'" if ranking is not None else "the list order (best first)"
    completions, scores, num_duplicates = _drop_equal_duplicates(
        completions, scores if mapped_scores is None else mapped_scores, index, order_source
    )
    num_ranked = len(completions) - 1
    if ranking is not None:
        completions = [completions[k] for k in sorted(range(len(ranking)), key=lambda k: ranking[k])]
    elif scores is not None:
        where = _where(index, "scores") if mapped_scores is None else (
            f"{_where(index, 'completions')}[*][{completion_score_key!r}]"
        )
        completions, num_ranked = _order_by_scores(completions, scores, where, tie_policy)
    record = {"prompt": prompt, "completions": completions, "num_ranked": num_ranked}
    return _with_extras(record, num_duplicates if count_duplicates else None, margin)


def _with_extras(record: dict[str, Any], num_duplicates: int | None, margin: float | None) -> dict[str, Any]:
    """`record` plus the optional `num_duplicates` (for the log) and `margin` (for the reward loss) fields."""
    if num_duplicates is not None:
        record["num_duplicates"] = num_duplicates
    if margin is not None:
        record["margin"] = margin
    return record


def check_margin(margin: Any, index: int, num_completions: int) -> float:
    """TRL's reward `margin` (loss -log sigmoid(r_chosen - r_rejected - margin)) as a float, 0.0 for None.

    Refused on a list of more than 2 completions: one number says how far the chosen reward must exceed the
    rejected one, and a ranking of K > 2 has K(K-1)/2 pairs (or, in the Plackett-Luce loss, K-1 choices) that it
    could apply to, with different losses for each reading; per-pair margins would need K(K-1)/2 numbers.
    """
    if margin is None:
        return 0.0
    where = _where(index, "margin")
    if not _is_real_number(margin) or not math.isfinite(margin):
        raise ValueError(f"{where}: {margin!r} is not a finite number (TRL's reward margin: how much higher the "
                         "chosen reward must be than the rejected one)")
    if num_completions != 2:
        raise ValueError(
            f"{where}: a margin applies to one pair (chosen, rejected), but this list has {num_completions} "
            "completions, whose ranking holds several pairs (and Plackett-Luce choices) a single margin could apply "
            "to; remove the margin, or give the list as pairs with one margin each"
        )
    return float(margin)


# Pre-tokenized layouts: TRL's RewardTrainer takes whole sequences (prompt included) as `chosen_ids`/`rejected_ids`
# (and the deprecated `chosen_input_ids`/`rejected_input_ids`); K-way lists are `prompt_ids` + `completion_ids`.
PAIR_ID_FIELDS = (("chosen_ids", "rejected_ids"), ("chosen_input_ids", "rejected_input_ids"))


def tokenized_layout(column_names) -> tuple[str, str] | None:
    """The id fields of a pre-tokenized dataset: ("prompt_ids", "completion_ids"), a pair of PAIR_ID_FIELDS, or
    None for a dataset without token ids."""
    columns = set(column_names)
    for fields in (("prompt_ids", "completion_ids"), *PAIR_ID_FIELDS):
        if set(fields) <= columns:
            return fields
    return None


def check_token_ids(ids: Any, where: str, vocab_size: int) -> list[int]:
    """A list of ints in [0, vocab_size), else a ValueError starting with `where`. Ids made by another tokenizer
    would index past the embedding (a crash at some step) or, when in range, train on other tokens than meant."""
    if not isinstance(ids, (list, tuple)) or not all(type(i) is int for i in ids):
        raise ValueError(f"{where}: must be a list of token ids (ints), got {_describe(ids)}")
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise ValueError(
            f"{where}: token id {bad} is outside the tokenizer's vocabulary [0, {vocab_size}); the ids were made by "
            "another tokenizer? Give the text ('prompt' and 'completions') to tokenize here, or tokenize with this "
            "model's tokenizer"
        )
    return list(ids)


def _split_pair_ids(chosen: list[int], rejected: list[int], index: int, fields: tuple[str, str]) -> tuple[list, list]:
    """(prompt_ids, [chosen, rejected] completion ids) of two whole sequences: the prompt is their common start,
    short enough to leave each completion one token. Only where the sequences are cut changes, not what a reward
    model scores (prompt_ids + completion_ids is each sequence as given)."""
    if chosen == rejected:
        raise ValueError(f"record {index}, fields {fields[0]!r}/{fields[1]!r}: the same sequence is both chosen and "
                         "rejected; a pair needs two different completions")
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    shared = min(shared, len(chosen) - 1, len(rejected) - 1)
    return chosen[:shared], [chosen[shared:], rejected[shared:]]


def _tokenized_fields(example: dict[str, Any], index: int, fields: tuple[str, str], vocab_size: int, name: str):
    """Checked prompt ids and the list of completion ids of a pre-tokenized record in layout `fields`."""
    where = f"{name} dataset, record {index}, field"
    if fields == ("prompt_ids", "completion_ids"):
        prompt = check_token_ids(example["prompt_ids"], f"{where} 'prompt_ids'", vocab_size)
        completions = example["completion_ids"]
        if not isinstance(completions, (list, tuple)) or len(completions) < 2:
            raise ValueError(f"{where} 'completion_ids': must be a list of 2 or more lists of token ids, got "
                             f"{_describe(completions)}")
        completions = [check_token_ids(ids, f"{where} 'completion_ids'[{k}]", vocab_size)
                       for k, ids in enumerate(completions)]
    else:
        chosen, rejected = (check_token_ids(example[f], f"{where} {f!r}", vocab_size) for f in fields)
        if example.get("prompt_ids") is not None:  # TRL's DPO collator layout: the pair holds completions only
            prompt, completions = check_token_ids(example["prompt_ids"], f"{where} 'prompt_ids'", vocab_size), [
                chosen, rejected]
        else:
            prompt, completions = _split_pair_ids(chosen, rejected, index, fields)
    for k, ids in enumerate(completions):
        if not ids:
            raise ValueError(f"{where} {fields[1]!r}[{k}]: empty completion (no token ids)")
    return prompt, completions


def _given_num_ranked(num_ranked: Any, index: int, num_completions: int, num_duplicates: int) -> int:
    """The `num_ranked` of an earlier preparation when it is there (an int in 0..K-1), else K - 1 (a strict order)."""
    if num_ranked is None or num_duplicates:
        return num_completions - 1
    if type(num_ranked) is not int or not 0 <= num_ranked < num_completions:
        raise ValueError(f"{_where(index, 'num_ranked')}: must be an int in 0..{num_completions - 1} (the number of "
                         f"known places of the ranking), got {_describe(num_ranked)}")
    return num_ranked


def normalize_tokenized_record(
    example: dict[str, Any], index: int, tie_policy: str = "truncate", *, fields: tuple[str, str], vocab_size: int,
    name: str = "train", count_duplicates: bool = False, read_margin: bool = False,
) -> dict[str, Any]:
    """Validate one pre-tokenized record and return it as `{"prompt_ids", "completion_ids" (best first),
    "num_ranked"}` (plus `num_duplicates` and `margin` as in `normalize_record`).

    `fields` is its layout (`tokenized_layout`). Lists are best first, or ordered by a 'ranking' or 'scores' field
    as text records are; a `num_ranked` an earlier preparation wrote is kept. Pairs are whole sequences (TRL's
    RewardTrainer layout) split at their common start. Every id must lie in [0, vocab_size).
    """
    prompt_ids, completions = _tokenized_fields(example, index, fields, vocab_size, name)
    margin = check_margin(example.get("margin"), index, len(completions)) if read_margin else None
    ranking, scores = example.get("ranking"), example.get("scores")
    if ranking is not None and scores is not None:
        raise ValueError(f"record {index}: give one order, not ranking and scores")
    if ranking is not None:
        ranking = _check_ranking(ranking, index, len(completions))
    elif scores is not None:
        scores = _check_scores_field(scores, index, len(completions))
    order_source = "'ranking'" if ranking is not None else "the list order (best first)"
    if fields != ("prompt_ids", "completion_ids"):
        order_source = None
    completions, scores, num_duplicates = _drop_equal_duplicates(completions, scores, index, order_source)
    num_ranked = _given_num_ranked(example.get("num_ranked"), index, len(completions), num_duplicates)
    if ranking is not None:
        completions = [completions[k] for k in sorted(range(len(ranking)), key=lambda k: ranking[k])]
    elif scores is not None:
        completions, num_ranked = _order_by_scores(completions, scores, _where(index, "scores"), tie_policy)
    record = {"prompt_ids": prompt_ids, "completion_ids": completions, "num_ranked": num_ranked}
    return _with_extras(record, num_duplicates if count_duplicates else None, margin)
