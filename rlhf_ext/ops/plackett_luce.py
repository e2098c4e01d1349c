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

import math

import torch

from ._checks import check_finite_where, check_ndim, check_prefix_mask, check_same_shape


def _checked_mask(scores: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """The mask as bool, or None when every item is real (no mask given): the loss then skips masking.

    That real scores are finite is checked later, by `plackett_luce_loss`, in the host sync that
    decides how it sums (a separate check would cost a second sync on every call).
    """
    check_ndim(name, scores, 2)
    if mask is None:
        if scores.shape[1] < 2:
            raise ValueError(f"list 0 has {scores.shape[1]} real item(s); a ranking needs at least 2")
        return None
    check_same_shape(**{name: scores, "mask": mask})
    mask = check_prefix_mask(mask)
    # a prefix mask has at least 2 real items in every row exactly when its second column is all True
    if not mask[:, 1].all():
        lengths = mask.sum(dim=1)
        row = int((lengths < 2).nonzero()[0])
        raise ValueError(f"list {row} has {int(lengths[row])} real item(s); a ranking needs at least 2")
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


def shifted_by_row_max(scores: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """x_{b,k} = s_{b,k} - max_{j real} s_{b,j} (the max detached), and 0 on padding.

    The loss is invariant to a common shift of a row, so this leaves it unchanged, and the gradient
    through the max is 0, hence detached. It keeps float32 exact under large offsets: at s ~ 1e4 the
    spacing of float32 is ~1e-3, and log-sum-exp of the raw scores minus s_k lost that much; the
    difference of two close floats is exact, and everything after it works on numbers near 0.
    Padding is replaced before any arithmetic (masked_fill sends it gradient 0), so NaN there cannot leak.
    """
    if padding is None:
        return scores - scores.detach().amax(dim=1, keepdim=True)
    row_max = scores.detach().masked_fill(padding, float("-inf")).amax(dim=1, keepdim=True)
    return (scores - row_max).masked_fill(padding, 0.0)


def _smallest_accurate_weight(dtype: torch.dtype) -> float:
    """e^8 times the smallest normal float: e^-79 in float32, e^-700 in float64.

    exp(x) at least this big is a normal float, with relative error about eps, so a cumulative sum
    of such terms (all positive: no cancellation) has relative error under about K * eps.
    """
    return math.exp(math.log(torch.finfo(dtype).tiny) + 8.0)


def fast_log_tails(x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor | None:
    """out_{b,i} = log sum_{j <= i, j real} exp(x_{b,j}) (0 on padding), or None where not exact.

    x holds `shifted_by_row_max` scores in reversed order (worst first), so the tails
    sum_{j >= k} of the likelihood are one forward cumulative sum. With the row max at 0 every
    exp(x) is in (0, 1] and cannot overflow: log(cumsum(exp(x))) as in allRank's listMLE, instead of
    torch.logcumsumexp, whose backward is several times slower. None when a real item sits more than
    ~79 (float32) or ~700 (float64) below its row max, or a real score is not finite (exp is then
    a denormal, 0 or NaN, and the sum loses precision or reaches log(0) = -inf).
    """
    weights = torch.exp(x)  # 1 on padding, where x is 0
    if not bool(weights.detach().amin() >= _smallest_accurate_weight(x.dtype)):  # NaN compares False
        return None
    if padding is None:
        return torch.log(weights.cumsum(dim=-1))
    tails = weights.masked_fill(padding, 0.0).cumsum(dim=-1)  # padding takes no probability mass
    # padding's tails are 0 (it comes first in this order); log(1) = 0 instead, as log(0) would make
    # the backward 0/0
    return torch.log(tails.masked_fill(padding, 1.0))


def exact_log_tails(x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """`fast_log_tails` by torch.logcumsumexp, exact at any score gap; 0 on padding."""
    if padding is None:
        return torch.logcumsumexp(x, dim=-1)
    return torch.logcumsumexp(x.masked_fill(padding, float("-inf")), dim=-1).masked_fill(padding, 0.0)


def _unmodelled_places(top_m: int | torch.Tensor, padding: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
    """Bool [B, K] in reversed order: True on real places k >= m_b, whose factor is not in the likelihood.

    Padding needs no masking: its terms are log(1) - 0 = 0 exactly.
    """
    K = scores.shape[1]
    places = torch.arange(K - 1, -1, -1, device=scores.device)  # place k of the list, column K-1-k here
    depth = top_m if isinstance(top_m, int) else top_m.to(scores.device)[:, None]
    beyond = places >= depth
    return beyond if padding is None else beyond & ~padding


def plackett_luce_loss(
    scores: torch.Tensor, mask: torch.Tensor | None = None, top_m: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Negative log Plackett-Luce likelihood of the given order, one value per list.

        loss_b = - sum_{k < m_b} [ s_{b,k} - logsumexp_{k <= j < n_b} s_{b,j} ]
               =   sum_{k < m_b} [ log sum_{k <= j < n_b} exp(x_{b,j}) - x_{b,k} ],   x_{b,k} = s_{b,k} - max_j s_{b,j}

    Args:
        scores: [B, K] scores, each row ordered best first.
        mask: optional [B, K] bool, True on real items; a prefix of each row (lists shorter than K
            are padded at the end). Every list needs at least 2 real items. Padding may hold
            anything (NaN included); it gets no probability mass and gradient 0.
        top_m: optional partial ranking: only the first top_m places are modelled (the order among
            the rest is unknown), m_b = min(top_m, n_b). An int applies to every list; a [B] integer
            tensor gives each list its own depth (0: nothing known, the list adds 0, e.g. a tie at
            the top). None models the full ranking.

    Returns:
        [B] loss per list, in the dtype of scores (computed in float32 at least). Exact under any
        common offset of a row (see `shifted_by_row_max`) and finite for any finite scores.
    """
    mask = _checked_mask(scores, mask, "scores")
    top_m = _checked_top_m(top_m, scores.shape[0])
    # float16's range is too short for exp of score gaps, and bfloat16 loses up to 2^-8 at every addition
    work = scores.to(torch.promote_types(scores.dtype, torch.float32))
    padding = None if mask is None else ~mask
    # The loss sums over places, so the terms may come in any order: in reversed order (worst first)
    # the tails sum_{j>=k} are a plain cumulative sum, and one flip serves the whole computation.
    x = shifted_by_row_max(work, padding).flip(-1)
    padding = None if padding is None else padding.flip(-1)
    log_tails = fast_log_tails(x, padding)
    if log_tails is None:
        check_finite_where("scores", scores, mask)  # a non-finite real score is an error, not a wide gap
        log_tails = exact_log_tails(x, padding)
    terms = log_tails - x
    if top_m is not None:
        terms = terms.masked_fill(_unmodelled_places(top_m, padding, scores), 0.0)
    return terms.sum(dim=1).to(scores.dtype)


def worst_ranking(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, K] indices that order each row's real items by ascending score (worst first for the model), padding last.

    Under the current scores this is the ranking with the largest Plackett-Luce loss (Wu et al. 2026, arXiv
    2607.01715, Theorem 1): each factor exp(s_k) / sum_{j>=k} exp(s_j) is smallest when the lowest remaining score
    is placed first. The sort is on detached scores: a ranking is a label, not a function to differentiate.
    """
    key = scores.detach().to(torch.promote_types(scores.dtype, torch.float32))
    if mask is not None:
        key = key.masked_fill(~mask.bool(), float("inf"))  # padding sorts after every real item
    return key.argsort(dim=1, stable=True)


def robust_plackett_luce_loss(
    scores: torch.Tensor,
    rho: float,
    mask: torch.Tensor | None = None,
    top_m: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Total-variation robust Plackett-Luce loss (Wu et al. 2026, arXiv 2607.01715, Lemma 1), one value per list.

        loss_b = (1 - rho) * PL(s_b in the observed order) + rho * PL(s_b in its worst order)

    with the worst order = ascending current scores (`worst_ranking`). It is the loss of the worst ranking label
    within total-variation distance rho of the observed one, so a ranking the model already agrees with costs
    little while confidently separated scores are pulled back together: a guard against a noisy ranker (a reward
    model's near-ties, label noise) being fitted with ever-larger implicit reward gaps. rho = 0 is
    `plackett_luce_loss`.

    Args:
        scores, mask, top_m: as in `plackett_luce_loss` (the worst order is modelled to the same depth).
        rho: the radius of the ambiguity set, in [0, 1).
    """
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho must be in [0, 1), got {rho}")
    nominal = plackett_luce_loss(scores, mask=mask, top_m=top_m)
    if rho == 0.0:
        return nominal
    worst = scores.gather(1, worst_ranking(scores, mask))
    return (1.0 - rho) * nominal + rho * plackett_luce_loss(worst, mask=mask, top_m=top_m)


def dpo_plackett_luce_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float = 0.1,
    mask: torch.Tensor | None = None,
    top_m: int | torch.Tensor | None = None,
    robust_rho: float = 0.0,
) -> torch.Tensor:
    """K-way DPO loss: Plackett-Luce on implicit rewards (seed 5.2, the final L_DPO for K > 2).

        s_k = beta * (log pi_theta(y_k|x) - log pi_ref(y_k|x)),   loss = plackett_luce_loss(s)

    At K=2 this is -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), TRL's sigmoid DPO loss.

    Args:
        policy_logps, ref_logps: [B, K] summed completion log-probs, each row ordered best first.
        beta: inverse temperature of the implicit reward.
        mask, top_m: as in `plackett_luce_loss`.
        robust_rho: 0 (default) for the plain loss; in (0, 1) for `robust_plackett_luce_loss` of the implicit
            rewards.

    Returns:
        [B] loss per list.
    """
    check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps)
    return robust_plackett_luce_loss(beta * (policy_logps - ref_logps), robust_rho, mask=mask, top_m=top_m)
