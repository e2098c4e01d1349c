"""Advantage estimators: GAE (seed 2.9, 3) and REINFORCE rewards-to-go with a baseline (seed 2.3-2.6).

Both take per-token rewards of right-padded responses and return (advantages, returns), zero on
padding. Neither loops over tokens: both reduce to the discounted reverse cumulative sum

    y_t = sum_{l >= 0} c^l x_{t+l},

computed as a two-level chunked scan of small matrix products (`discounted_reverse_cumsum`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ._checks import check_ndim, check_prefix_mask, check_same_shape


@functools.lru_cache(maxsize=64)
def _decay_matrix_t(n: int, c: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Transpose of the [n, n] upper-triangular Toeplitz matrix M[i, j] = c^(j - i) for j >= i, else 0.

    Cached: a training run calls GAE with the same few lengths and discounts over and over.
    """
    offsets = torch.arange(n, dtype=torch.float64, device=device)
    gaps = offsets[None, :] - offsets[:, None]
    # where, not multiply: c^(negative gap) is inf when c = 0, and inf * 0 would be NaN.
    m = torch.where(gaps >= 0, torch.tensor(c, dtype=torch.float64, device=device) ** gaps.clamp(min=0), 0.0)
    return m.T.contiguous().to(dtype)


@functools.lru_cache(maxsize=64)
def _tail_decay(chunk: int, c: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[chunk] vector c^(chunk - i): how much the next chunk's start value weighs at position i."""
    exponents = torch.arange(chunk, 0, -1, dtype=torch.float64, device=device)
    return (torch.tensor(c, dtype=torch.float64, device=device) ** exponents).to(dtype)


def discounted_reverse_cumsum(x: torch.Tensor, c: float) -> torch.Tensor:
    """y[:, t] = sum_{l >= 0} c^l x[:, t + l] for x of shape [B, T], without a loop over t.

    The sequence is cut into n chunks of L ~ sqrt(T) tokens. Inside a chunk, y is one product with
    the decay matrix; the value at each chunk start obeys the same recursion with factor c^L, so
    a second product over the n chunk starts gives the carry added to every chunk. Work is
    O(B * T * sqrt(T)); no powers c^-t appear, so nothing overflows for long sequences.
    """
    batch, length = x.shape
    if length == 0:
        return x.clone()
    chunk = max(1, math.isqrt(length - 1) + 1)
    n_chunks = -(-length // chunk)
    if n_chunks * chunk != length:
        x = F.pad(x, (0, n_chunks * chunk - length))
    local = x.view(batch, n_chunks, chunk) @ _decay_matrix_t(chunk, c, x.dtype, x.device)  # [B, n, L]
    chunk_starts = local[:, :, 0] @ _decay_matrix_t(n_chunks, c**chunk, x.dtype, x.device)  # [B, n]
    carry = chunk_starts[:, 1:, None] * _tail_decay(chunk, c, x.dtype, x.device)  # [B, n-1, L]
    y = torch.cat([local[:, :-1] + carry, local[:, -1:]], dim=1)
    return y.view(batch, -1)[:, :length]


def _checked_inputs(rewards: torch.Tensor, mask: torch.Tensor, **others) -> torch.Tensor:
    check_ndim("rewards", rewards, 2)
    check_same_shape(rewards=rewards, mask=mask, **others)
    return check_prefix_mask(mask)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (seed 2.9 and 3.1-3.2; Schulman et al. 2016).

        delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last real token is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}      = sum_l (gamma lam)^l delta_{t+l}
        R_t     = A_t + V_t                            (the value target)

    Args:
        rewards: [B, T] per-token rewards.
        values: [B, T] value estimates V_t.
        mask: [B, T] bool, True on real response tokens, right-padded.
        gamma: discount factor; lam: GAE lambda (0 gives the TD residual delta_t; 1 gives
            A_t = G_t - V_t, so the returns are the Monte Carlo returns G_t).

    Returns:
        (advantages, returns), both [B, T] and 0 where mask is False.
    """
    mask = _checked_inputs(rewards, mask, values=values)
    padding = ~mask
    # masked_fill, not multiply by the mask: NaN or inf on padding must not leak into real tokens.
    values = values.masked_fill(padding, 0.0)
    next_values = F.pad(values[:, 1:], (0, 1))
    deltas = (rewards + gamma * next_values - values).masked_fill(padding, 0.0)
    advantages = discounted_reverse_cumsum(deltas, gamma * lam)  # exactly 0 on padding: its deltas are 0
    return advantages, advantages + values


def rewards_to_go(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    baseline: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE advantages: discounted reward-to-go minus an optional baseline (seed 2.3, 2.5, 2.6).

        G_t = sum_{l >= 0} gamma^l r_{t+l}      (only the future counts, seed 2.5)
        A_t = G_t - b_t                         (a baseline reduces variance, seed 2.6)

    Args:
        rewards: [B, T] per-token rewards; mask: [B, T] bool, right-padded.
        gamma: discount factor.
        baseline: optional [B, T] (e.g. values) or [B] (one per sequence, e.g. a batch mean) baseline.

    Returns:
        (advantages, returns = G), both [B, T] and 0 where mask is False.
    """
    mask = _checked_inputs(rewards, mask)
    padding = ~mask
    returns = discounted_reverse_cumsum(rewards.masked_fill(padding, 0.0), gamma)
    if baseline is None:
        return returns, returns
    if baseline.dim() == 1:
        baseline = baseline[:, None].expand_as(rewards)
    check_same_shape(rewards=rewards, baseline=baseline)
    return (returns - baseline).masked_fill(padding, 0.0), returns
