"""Reward functions for tests/test_frontier.py, importable as module:function (`--gold frontier_rewards:...`)."""

NOT_A_FUNCTION = 3  # for the error a non-callable --gold gets


def share_of_letters(prompts, completions, letters, **kwargs) -> list[float]:
    """The share of each completion's characters that are among its record's `letters` (a column of the prompts
    file, which reaches reward functions as a keyword list, as in TRL)."""
    return [sum(c in wanted for c in text) / max(len(text), 1) for text, wanted in zip(completions, letters)]
