"""Masked statistics over real tokens, and whitening of rewards and advantages.

Whitening is not in the seed; it is the standard PPO-for-LLMs variance reduction (TRL, OpenAI's
lm-human-preferences) that keeps the advantage scale fixed while rewards drift.
"""

from __future__ import annotations

from collections.abc import Callable

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


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over real positions; with shift_mean=False the mean is kept.

    Padding positions come back as 0. `reduce` sums a tensor over processes (e.g.
    `functools.partial(accelerator.reduce, reduction="sum")`): mean and variance are then those of the real
    positions of every process together, so N processes whiten their shares of a batch exactly as one process
    whitens the whole batch. Every process must call it (it is a collective), even one without a real position.
    With fewer than 2 real positions (over all processes) there is no spread to divide by: `x` comes back
    unchanged at the real positions, on one process as on several.
    """
    if reduce is None:
        if mask.bool().sum() < 2:
            return torch.where(mask.bool(), x, torch.zeros_like(x))
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        mean, var = masked_mean_var_over_processes(x, mask, reduce)
        if var is None:  # fewer than 2 real positions over all processes: no spread to divide by
            return torch.where(mask.bool(), x, torch.zeros_like(x))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def masked_mean_var_over_processes(
    x: torch.Tensor, mask: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean and unbiased variance of x over the real positions of all processes (`reduce` sums over processes).

    Two passes, as `masked_var` does on one process: the global mean first, then the global sum of squared
    deviations from it, n / (n - 1) included. The variance is None when there are fewer than 2 real positions.
    """
    real = mask.bool()
    count_and_sum = reduce(torch.stack([real.sum().to(x.dtype), masked_sum(x, real)]))
    count, total = count_and_sum[0], count_and_sum[1]
    mean = total / count.clamp(min=1)
    squares = reduce(masked_sum((x - mean) ** 2, real))
    if count < 2:
        return mean, None
    return mean, squares / (count - 1)
