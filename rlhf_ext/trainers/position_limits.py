"""Sequences must fit the model's positions, checked when a trainer is built rather than steps into the run.

A prompt and its completion longer than `max_position_embeddings` (GPT-2's `n_positions`) fail with an IndexError
inside the position embedding of a learned-position model, at whatever step first samples that long, and run
silently past the trained range of a rotary (RoPE) model. The sampling trainers (PPO, online K-way) check the
longest prompt plus `max_completion_length`; the K-way trainers check each tokenized list (`rlhf_ext.data.prepare`).
"""

from __future__ import annotations

from transformers import AutoConfig

WHY = (
    "learned positions fail with an IndexError during training, rotary ones run past what the model was trained on"
)


def max_positions(config) -> int | None:
    """The longest sequence a model config allows: `max_position_embeddings` (GPT-2's `n_positions` answers to that
    name too), of the text config for a multimodal model; None when the config sets no such limit."""
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def model_max_positions(model, trust_remote_code: bool = False, revision: str | None = None) -> int | None:
    """`max_positions` of a model given as a Hub id or folder (only its config is read) or as a loaded model."""
    if isinstance(model, str):
        return max_positions(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code, revision=revision))
    return max_positions(getattr(model, "config", None))


def check_prompts_leave_room(
    prompt_lengths: list[tuple[int, int]], max_completion_length: int, positions: int | None, split: str, fix: str
) -> None:
    """ValueError naming the longest prompt when it plus `max_completion_length` tokens exceeds `positions`.

    `prompt_lengths` are (record index, token count) of the prompts training will use; `fix` names the settings to
    change beside max_completion_length (it may use {prompt_room}, the longest prompt that fits).
    """
    if positions is None or not prompt_lengths:
        return
    index, longest = max(prompt_lengths, key=lambda pair: pair[1])  # the first of the longest
    if longest + max_completion_length <= positions:
        return
    room = positions - longest
    lower = f"Lower max_completion_length to {room} or less, or" if room >= 1 else "Either"
    raise ValueError(
        f"{split} dataset, record {index} (0-based): field 'prompt' has {longest} tokens; with max_completion_length="
        f"{max_completion_length} a prompt and its completion reach {longest + max_completion_length} tokens, more "
        f"than the model's max_position_embeddings={positions} ({WHY}). {lower} "
        f"{fix.format(prompt_room=positions - max_completion_length)}"
    )
