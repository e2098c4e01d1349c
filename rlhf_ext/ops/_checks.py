"""Input checks shared by the ops: each raises a ValueError that says what is wrong and where."""

from __future__ import annotations

import torch


def check_same_shape(**tensors: torch.Tensor | None) -> None:
    """All given (non-None) tensors must have the same shape as the first one."""
    given = {name: t for name, t in tensors.items() if t is not None}
    (first_name, first), *rest = given.items()
    for name, t in rest:
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first_name} has shape {tuple(first.shape)}")


def check_ndim(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_prefix_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """A [B, N] mask must be boolean-like and right-padded: True on a prefix of each row.

    Returns the mask as bool.
    """
    check_ndim(name, mask, 2)
    m = mask.bool()
    # A row is a prefix when no False is followed by a True, i.e. the row never increases.
    rises = m[:, 1:] & ~m[:, :-1]
    if rises.any():
        row = int(rises.any(dim=1).nonzero()[0])
        raise ValueError(
            f"{name} row {row} is not a prefix (padding must be at the end): {m[row].int().tolist()}"
        )
    return m


def check_finite_where(name: str, t: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Real entries (mask True; all of them without a mask) of t must be finite."""
    bad = ~torch.isfinite(t) if mask is None else ~torch.isfinite(t) & mask
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} has a non-finite value {t[idx].item()} at index {idx}")
