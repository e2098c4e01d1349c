"""One scoring rule: a reward head reads a sequence at its last real token.

    score(x, y) = w · h_L[t*] + b,    t* = max{t : attention_mask[t] = 1}

h_L is the decoder's last hidden state (after its final norm) and t* the last position the attention mask marks as
real. For plain text that is the EOS token appended to every completion (by the reward trainer's tokenization and by
the PPO reward role alike); for chat records it is the last token the chat template writes. The same t* is used by
the K-way reward trainer (training and evaluation), the shared base's reward role (PPO and online K-way) and a full
reward model the reward trainer saved when PPO scores it, whatever the tokenizer's pad token is. (The value head
needs no such choice: it reads every token.) Encoder classifiers (BERT, DeBERTa) keep their own first-token pooling.

Why not transformers' own pooling: a `...ForSequenceClassification` model reads at the last token that is *not the
pad token*. With a tokenizer that has no pad token, TRL sets pad = EOS, and that rule then skips the EOS and reads the
token before it, so the position moves with the pad setting. Reading by the attention mask does not depend on which
id pads, and the EOS is the one token that has seen the whole completion and that it ended.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..ops import last_token_index

# Written into the config of a full (non-LoRA) reward model the K-way reward trainer saves, so that PPO and online
# K-way score it by this module's rule rather than by transformers' pad-based pooling (see `reads_last_real_token`).
SCORE_TOKEN_FIELD = "rlhf_ext_score_token"
LAST_REAL_TOKEN = "last_real_token"


def gather_last_token(per_token: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """per_token [B, T, ...] read at each row's last real token -> [B, ...]; with no mask, at the last position."""
    if attention_mask is None:
        return per_token[:, -1]
    rows = torch.arange(per_token.shape[0], device=per_token.device)
    return per_token[rows, last_token_index(attention_mask).to(per_token.device)]


def score_module(model: nn.Module) -> nn.Module | None:
    """The per-token scoring layer (`score`) of a decoder sequence classifier, through peft and wrappers; None for a
    model without one (an encoder classifier such as BERT or DeBERTa, which pools at its first token).

    peft keeps a SEQ_CLS adapter's trainable head as a `ModulesToSaveWrapper` named `score`: that wrapper is what the
    forward calls, so its output is the trained head's.
    """
    for module in (model, getattr(model, "module", None)):  # DDP / DeepSpeed engines hold the model as `.module`
        if module is None:
            continue
        base = module.get_base_model() if hasattr(module, "get_base_model") else module
        if isinstance(getattr(base, "score", None), nn.Module):
            return base.score
    return None


@contextmanager
def capture_output(module: nn.Module):
    """Collect every output of `module` during the block (a forward hook, removed on exit)."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def sequence_classifier_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores [B, num_labels] of a decoder sequence classifier at each row's last real token (the rule above).

    The model runs its normal forward (so DDP, DeepSpeed and peft see the call); a hook on its `score` layer takes the
    per-token scores [B, T, num_labels] before transformers pools them by pad id. An encoder classifier (no `score`
    layer) keeps its own pooling: it reads its first token ([CLS]), which no pad setting moves.
    """
    score = score_module(model)
    if score is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    with capture_output(score) as outputs:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return gather_last_token(outputs[-1], attention_mask)


def reads_last_real_token(model: nn.Module) -> bool:
    """True for a sequence classifier the K-way reward trainer saved (its config carries SCORE_TOKEN_FIELD)."""
    config = getattr(model, "config", None)
    return getattr(config, SCORE_TOKEN_FIELD, None) == LAST_REAL_TOKEN


def mark_last_real_token_scoring(model: nn.Module) -> None:
    """Record in `model.config` that its scores are read by this module's rule (saved with the config)."""
    setattr(model.config, SCORE_TOKEN_FIELD, LAST_REAL_TOKEN)


def right_padded(sequences: list[list[int]], pad_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [N, T] long, each sequence right-padded to the longest.

    Any id can pad (0 when the tokenizer has none): the attention mask excludes it and scores are read by the mask.
    """
    width = max(len(ids) for ids in sequences)
    pad = 0 if pad_token_id is None else pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in sequences], dtype=torch.long)
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in sequences], dtype=torch.long)
    return input_ids, attention_mask
