"""The token-level clipped PPO loss with value loss and entropy bonus (seed 2.10 and 4.1;
Schulman et al. 2017; CleanRL's ppo.py).

    ratio_t     = exp(clip(log pi_theta(a_t|s_t) - log pi_old(a_t|s_t), -20, 20))
    pg_loss1    = -A_t * ratio_t
    pg_loss2    = -A_t * clip(ratio_t, 1 - eps, 1 + eps)
    policy_loss = agg(max(pg_loss1, pg_loss2))
    V_clipped   = clip(V, V_old - eps_v, V_old + eps_v)        (= V_old + clip(V - V_old, -eps_v, +eps_v))
    value_loss  = 0.5 * agg(max((V - R)^2, (V_clipped - R)^2))
    loss        = policy_loss + vf_coef * value_loss - ent_coef * agg(H)

Every input is set to 0 on padding before any arithmetic, so padding adds exactly 0 to the loss
and to every gradient whatever it holds (NaN, inf, -inf, -1e6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_prefix_mask, check_same_shape
from .stats import masked_sum

AGGREGATIONS = ("token", "sequence")

# |log ratio| above this is clamped before exp() (verl's compute_policy_loss does the same): e^20 is
# far outside any clip range, and a float32 ratio overflows to inf past a log ratio of ~88.7.
LOG_RATIO_LIMIT = 20.0


@dataclass
class PPOLossOutput:
    """`loss` carries the graph; every other field is detached, for logging."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    entropy: torch.Tensor
    clip_fraction: torch.Tensor
    value_clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, aggregation: str = "token", normalizer: float | None = None
) -> torch.Tensor:
    """Reduce a [B, T] per-token quantity to a scalar over real tokens.

    "token":    sum_{b,t} x m / N,                      N = normalizer or the number of real tokens
    "sequence": sum_b (sum_t x m / n_b) / N,            N = normalizer or B, n_b = real tokens of row b

    A normalizer fixed for the whole optimizer step (the global token or sequence count across
    gradient-accumulation steps and processes) makes each micro-batch's gradient add up to the
    gradient of one big batch, whatever the split.
    """
    if aggregation == "token":
        total, count = masked_sum(per_token, mask), mask.sum()
    elif aggregation == "sequence":
        lengths = mask.sum(dim=1).clamp(min=1)
        total, count = (masked_sum(per_token, mask, dim=1) / lengths).sum(), mask.shape[0]
    else:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if normalizer is None:
        # an all-padding micro-batch contributes 0, not 0/0
        denominator = torch.as_tensor(count, dtype=per_token.dtype, device=per_token.device).clamp(min=1)
    elif normalizer <= 0:
        raise ValueError(f"normalizer must be positive, got {normalizer}")
    else:
        denominator = torch.as_tensor(normalizer, dtype=per_token.dtype, device=per_token.device)
    return total / denominator


def zero_padding(x: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """x with every padding entry replaced by 0 (None stays None).

    masked_fill's backward sends exactly 0 to the replaced entries, so junk there (NaN, +-inf) can
    reach neither the forward values nor the gradient; selecting with torch.where after the
    arithmetic only hides the forward: its backward still multiplies the zero gradient by inf.
    """
    return None if x is None else x.masked_fill(~mask, 0.0)


def clamped_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """clip(log pi_theta - log pi_old, -20, 20), the exponent of the probability ratio.

    It only changes tokens whose ratio is beyond e^(+-20), and gives them gradient 0. Where the clip
    of the PPO objective is the larger term (ratio > e^20 with A > 0, ratio < e^-20 with A < 0) the
    gradient is 0 anyway; on the other side the unclamped gradient is |A| * ratio, under 2.1e-9 |A|
    for ratio < e^-20 and over 4.8e8 |A| (inf in float32 past e^88.7) for ratio > e^20, which would
    only blow the update up. The loss of such a token stays finite, at most |A| e^20.
    """
    return torch.clamp(logprobs - old_logprobs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)) and where the clipped term won.

        ratio = exp(clip(log pi_theta - log pi_old, -20, 20))      (see `clamped_log_ratio`)
    """
    ratio = torch.exp(clamped_log_ratio(logprobs, old_logprobs))
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(pg_loss1, pg_loss2), (pg_loss2 > pg_loss1)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_range_value: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 0.5 * max((V - R)^2, (V_clipped - R)^2) and where the clipped term won.

        V_clipped = clip(V, V_old - eps_v, V_old + eps_v)

    This is V_old + clip(V - V_old, -eps_v, eps_v) without its rounding: within the range V_clipped
    is V bit for bit, so an unclipped token never counts as clipped (in float32 the round trip
    V_old + (V - V_old) is often a unit in the last place off V, and its loss term then "won").
    TRL's and verl's value losses clip the same way.
    """
    v_loss_unclipped = (values - returns) ** 2
    if clip_range_value is None:
        return 0.5 * v_loss_unclipped, torch.zeros_like(values, dtype=torch.bool)
    v_clipped = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    v_loss_clipped = (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(v_loss_unclipped, v_loss_clipped), (v_loss_clipped > v_loss_unclipped)


def _check_value_inputs(values, old_values, returns, clip_range_value) -> None:
    given = {"values": values, "old_values": old_values, "returns": returns}
    if values is None:
        extra = [name for name, t in given.items() if t is not None]
        if extra:
            raise ValueError(f"{', '.join(extra)} given without values")
        return
    if returns is None:
        raise ValueError("values given without returns: the value loss needs its targets")
    if clip_range_value is not None and old_values is None:
        raise ValueError("clip_range_value needs old_values (the values at rollout time)")


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    clip_range: float = 0.2,
    clip_range_value: float | None = None,
    vf_coef: float = 0.1,
    ent_coef: float = 0.0,
    aggregation: str = "token",
    normalizer: float | None = None,
) -> PPOLossOutput:
    """loss = policy_loss + vf_coef * value_loss - ent_coef * entropy (see the module docstring).

    Args:
        logprobs: [B, T] log pi_theta of the sampled tokens (with grad).
        old_logprobs: [B, T] log pi_old at rollout time.
        advantages: [B, T] (e.g. from `gae`).
        mask: [B, T] bool, True on real response tokens, right-padded.
        values, old_values, returns: optional [B, T] current values (with grad), rollout values,
            and value targets; without values the value loss is 0.
        entropy: optional [B, T] policy entropy (with grad); a positive ent_coef raises it.
        clip_range: eps of the policy clip; clip_range_value: eps_v of the value clip (None: no clip).
        vf_coef, ent_coef: weights of the value loss and the entropy bonus.
        aggregation: "token" (mean over all real tokens) or "sequence" (mean over each row's real
            tokens, then over rows); see `aggregate`, also for `normalizer`.

    Returns:
        PPOLossOutput with the loss and detached policy_loss, value_loss, entropy, clip_fraction
        (share of real tokens where the policy clip was active), value_clip_fraction and
        approx_kl = mean of (log pi_theta - log pi_old)^2 / 2 (of the unclamped log ratio).

    Padding never matters: every input is 0 there before any arithmetic (`zero_padding`), so loss,
    diagnostics and gradients equal those of the batch without its padding columns.
    """
    check_same_shape(
        logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
        values=values, old_values=old_values, returns=returns, entropy=entropy,
    )
    mask = check_prefix_mask(mask)
    if clip_range <= 0 or (clip_range_value is not None and clip_range_value <= 0):
        raise ValueError(
            f"clip ranges must be positive, got clip_range={clip_range}, clip_range_value={clip_range_value}"
        )
    _check_value_inputs(values, old_values, returns, clip_range_value)
    logprobs, old_logprobs, advantages, values, old_values, returns, entropy = (
        zero_padding(t, mask) for t in (logprobs, old_logprobs, advantages, values, old_values, returns, entropy)
    )

    def agg(x):
        return aggregate(x, mask, aggregation, normalizer)

    def mean_over_tokens(x):
        return aggregate(x.to(logprobs.dtype), mask, "token").detach()

    pg_losses, pg_clipped = clipped_policy_loss(logprobs, old_logprobs, advantages, clip_range)
    policy_loss = agg(pg_losses)
    loss = policy_loss
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    value_loss, value_clip_fraction = zero, zero
    if values is not None:
        v_losses, v_clipped = clipped_value_loss(values, old_values, returns, clip_range_value)
        value_loss = agg(v_losses)
        value_clip_fraction = mean_over_tokens(v_clipped)
        loss = loss + vf_coef * value_loss
    entropy_avg = zero
    if entropy is not None:
        entropy_avg = agg(entropy)
        loss = loss - ent_coef * entropy_avg
    return PPOLossOutput(
        loss=loss,
        policy_loss=policy_loss.detach(),
        value_loss=value_loss.detach(),
        entropy=entropy_avg.detach(),
        clip_fraction=mean_over_tokens(pg_clipped),
        value_clip_fraction=value_clip_fraction,
        approx_kl=mean_over_tokens(0.5 * (logprobs - old_logprobs).detach() ** 2),
    )
