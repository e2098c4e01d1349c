"""Log-probs of sampled tokens and policy entropy from logits, chunked over the sequence so that
at most one extra vocabulary-sized chunk is alive at a time (the logits themselves can be huge:
B x T x V with V ~ 150k)."""

from __future__ import annotations

import torch

from ._checks import check_ndim


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunks(length: int, chunk_size: int):
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return range(0, length, chunk_size)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """log softmax(logits)[..., index]: the log-prob of each chosen token (seed 4.1, log pi(a_t | s_t)).

        log p_t = logits_t[index_t] - logsumexp_v logits_t[v]

    Args:
        logits: [B, T, V]; index: [B, T] token ids.
        chunk_size: tokens per chunk along T.

    Returns:
        [B, T] log-probs, in float32 at least (bf16 logsumexp loses too much for PPO ratios).
    """
    check_ndim("logits", logits, 3)
    if index.shape != logits.shape[:2]:
        raise ValueError(f"index has shape {tuple(index.shape)}, expected {tuple(logits.shape[:2])}")
    out = []
    for start in _chunks(logits.shape[1], chunk_size):
        chunk = _at_least_float32(logits[:, start : start + chunk_size])
        picked = chunk.gather(-1, index[:, start : start + chunk_size, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out, dim=1)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """Entropy of the next-token distribution at every position.

        H_t = logsumexp(z_t) - sum_v softmax(z_t)_v z_{t,v}

    Args:
        logits: [B, T, V]. Returns [B, T] (float32 at least).
    """
    check_ndim("logits", logits, 3)
    out = []
    for start in _chunks(logits.shape[1], chunk_size):
        chunk = _at_least_float32(logits[:, start : start + chunk_size])
        probs = torch.softmax(chunk, dim=-1)
        # where: a masked-out logit of -inf has probability 0 and must add 0, not 0 * -inf = NaN.
        expected_logit = torch.where(probs > 0, probs * chunk, 0.0).sum(dim=-1)
        out.append(torch.logsumexp(chunk, dim=-1) - expected_logit)
    return torch.cat(out, dim=1)
