"""Plackett-Luce ranking losses (seed section 5.2, "PT model").

For a prompt x and K completions ranked best first, y_1 > y_2 > ... > y_K, with scores s_k,

    P(tau | y_1..y_K, x) = prod_{k=1}^{K} exp(s_k) / sum_{j=k}^{K} exp(s_j)

and the loss is its negative log:

    L = - sum_{k=1}^{K} [ s_k - logsumexp_{j>=k} s_j ].

With reward-model scores s_k = r(x, y_k) this is the K-way reward loss (Bradley-Terry at K=2);
with implicit rewards s_k = beta * (log pi_theta(y_k|x) - log pi_ref(y_k|x)) it is the K-way DPO
loss (Rafailov et al. 2023, appendix A.3), equal to TRL's sigmoid DPO loss at K=2.
"""

from __future__ import annotations

import torch

from ._checks import check_finite_where, check_ndim, check_prefix_mask, check_same_shape

# Padding is filled this far below the row's smallest real score, so exp() of the gap underflows
# to exactly 0 in float32 and float64: padded items take no probability mass and get no gradient.
_PAD_GAP = 1e4


def _checked_mask(scores: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    check_ndim(name, scores, 2)
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    check_same_shape(**{name: scores, "mask": mask})
    mask = check_prefix_mask(mask)
    lengths = mask.sum(dim=1)
    short = (lengths < 2).nonzero()
    if len(short):
        row = int(short[0])
        raise ValueError(f"list {row} has {int(lengths[row])} real item(s); a ranking needs at least 2")
    check_finite_where(name, scores, mask)
    return mask


def _checked_top_m(top_m: int | torch.Tensor | None, batch: int) -> int | torch.Tensor | None:
    if top_m is None:
        return None
    if isinstance(top_m, torch.Tensor):
        if top_m.shape != (batch,) or top_m.is_floating_point():
            raise ValueError(
                f"top_m as a tensor must be integer with shape ({batch},), got {top_m.dtype} {tuple(top_m.shape)}"
            )
        if (top_m < 0).any():
            raise ValueError(f"top_m must be >= 0, list {int((top_m < 0).nonzero()[0])} has {int(top_m.min())}")
        return top_m
    if top_m < 1:
        raise ValueError(f"top_m must be >= 1, got {top_m}")
    return int(top_m)


def reverse_logcumsumexp(x: torch.Tensor) -> torch.Tensor:
    """out[..., k] = log sum_{j>=k} exp(x[..., j]), computed stably along the last dimension."""
    return torch.logcumsumexp(x.flip(-1), dim=-1).flip(-1)


def plackett_luce_loss(
    scores: torch.Tensor, mask: torch.Tensor | None = None, top_m: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Negative log Plackett-Luce likelihood of the given order, one value per list.

        loss_b = - sum_{k < m_b} [ s_{b,k} - logsumexp_{k <= j < n_b} s_{b,j} ]

    Args:
        scores: [B, K] scores, each row ordered best first.
        mask: optional [B, K] bool, True on real items; a prefix of each row (lists shorter than K
            are padded at the end). Every list needs at least 2 real items.
        top_m: optional partial ranking: only the first top_m places are modelled (the order among
            the rest is unknown), m_b = min(top_m, n_b). An int applies to every list; a [B] integer
            tensor gives each list its own depth (0: nothing known, the list adds 0, e.g. a tie at
            the top). None models the full ranking.

    Returns:
        [B] loss per list. Finite for |scores| up to 1e4 and beyond (reverse log-cumsum-exp).
    """
    mask = _checked_mask(scores, mask, "scores")
    top_m = _checked_top_m(top_m, scores.shape[0])
    row_min = scores.detach().masked_fill(~mask, float("inf")).amin(dim=1, keepdim=True)
    filled = torch.where(mask, scores, row_min - _PAD_GAP)
    terms = reverse_logcumsumexp(filled) - filled
    modelled = mask
    if top_m is not None:
        positions = torch.arange(scores.shape[1], device=scores.device)
        depth = top_m if isinstance(top_m, int) else top_m.to(scores.device)[:, None]
        modelled = mask & (positions < depth)
    return torch.where(modelled, terms, torch.zeros_like(terms)).sum(dim=1)


def dpo_plackett_luce_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float = 0.1,
    mask: torch.Tensor | None = None,
    top_m: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """K-way DPO loss: Plackett-Luce on implicit rewards (seed 5.2, the final L_DPO for K > 2).

        s_k = beta * (log pi_theta(y_k|x) - log pi_ref(y_k|x)),   loss = plackett_luce_loss(s)

    At K=2 this is -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), TRL's sigmoid DPO loss.

    Args:
        policy_logps, ref_logps: [B, K] summed completion log-probs, each row ordered best first.
        beta: inverse temperature of the implicit reward.
        mask, top_m: as in `plackett_luce_loss`.

    Returns:
        [B] loss per list.
    """
    check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps)
    return plackett_luce_loss(beta * (policy_logps - ref_logps), mask=mask, top_m=top_m)
