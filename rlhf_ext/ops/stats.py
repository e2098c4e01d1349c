"""Masked statistics over real tokens, and whitening of rewards and advantages.

Whitening is not in the seed; it is the standard PPO-for-LLMs variance reduction (TRL, OpenAI's
lm-human-preferences) that keeps the advantage scale fixed while rewards drift.
"""

from __future__ import annotations

import torch

from ._checks import check_same_shape


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x over positions where mask is True."""
    check_same_shape(x=x, mask=mask)
    selected = torch.where(mask.bool(), x, torch.zeros_like(x))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over all positions or along `dim`.

    A row with no real position has no mean; it gives 0 rather than NaN so it cannot poison a loss.
    """
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over real positions: mean((x - mean)^2), times n / (n - 1) when unbiased."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum()
        if n < 2:
            raise ValueError(f"an unbiased variance needs at least 2 real values, mask has {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over real positions; with shift_mean=False the mean is kept.

    Padding positions come back as 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))
