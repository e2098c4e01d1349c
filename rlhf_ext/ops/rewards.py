"""Per-token PPO rewards: the sequence score at the last real token, a KL penalty on every token.

The seed (4.1) treats each token as an action with the reward model scoring the finished
response; the KL-to-reference penalty keeping the policy near pi_ref is the RLHF objective of
Ziegler et al. 2019 and Stiennon et al. 2020 (InstructGPT, eq. 2) spread over the tokens:

    r_t = -kl_coef * KL_t + [t == last real token] * score
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_finite_where, check_ndim, check_prefix_mask, check_same_shape

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi (Schulman 2020).

        k1 = log r,   k2 = (log r)^2 / 2,   k3 = (r^-1 - 1) + log r,   where log r = logp - ref_logp

    k1 is unbiased, k2 and k3 are lower-variance; k3 is unbiased and never negative.
    """
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {kind!r}")


@dataclass
class TokenRewards:
    """Output of `token_rewards`. Shapes: rewards, kl [B, T]; scores, non_score_reward [B]."""

    rewards: torch.Tensor
    kl: torch.Tensor
    scores: torch.Tensor
    non_score_reward: torch.Tensor


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """t*_b = max{t : mask[b, t]}, the last real token of each row; mask [B, T] (left or right padded) -> [B] long.

    The one rule for "the last token" in rlhf_ext: the PPO reward lands there and a reward head reads there
    (rlhf_ext.models.scoring). Raises ValueError for a row with no real token (it has nothing to score or reward).
    """
    empty = (mask.sum(dim=-1) == 0).nonzero()
    if len(empty):
        raise ValueError(f"row {int(empty[0])} has no real token (its mask row is all 0)")
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (mask.long() * positions).argmax(dim=-1)


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
    missing_eos_penalty: float | None = None,
    has_eos: torch.Tensor | None = None,
) -> TokenRewards:
    """Per-token rewards of right-padded responses.

        score'_b = score_b - missing_eos_penalty * [response b has no EOS]
        r_{b,t}  = -kl_coef * KL_{b,t} + [t == last real token of b] * score'_b     (0 on padding)

    Args:
        scores: [B] sequence scores from the reward model or reward functions.
        logprobs, ref_logprobs: [B, T] log-probs of the sampled tokens under the policy and the reference.
        mask: [B, T] bool, True on real response tokens, right-padded.
        kl_coef: weight of the KL penalty (beta in the seed).
        kl_estimator: "k1", "k2" or "k3" (see `kl_penalty`).
        missing_eos_penalty: subtracted from the score of responses that never emitted EOS.
        has_eos: [B] bool, required with missing_eos_penalty.

    Returns:
        TokenRewards(rewards [B, T], kl [B, T], scores [B] after the EOS penalty,
        non_score_reward [B] = -kl_coef * sum_t KL_t).
    """
    check_ndim("scores", scores, 1)
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    mask = check_prefix_mask(mask)
    if scores.shape[0] != mask.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} entries but the batch has {mask.shape[0]} responses")
    check_finite_where("scores", scores, torch.ones_like(scores, dtype=torch.bool))
    if missing_eos_penalty is not None:
        if has_eos is None:
            raise ValueError("missing_eos_penalty needs has_eos, a [B] bool tensor")
        scores = scores - missing_eos_penalty * (~has_eos.bool()).to(scores.dtype)
    # where, not multiply: padded log-probs may be -inf, and -inf * 0 is NaN.
    kl = torch.where(mask, kl_penalty(logprobs, ref_logprobs, kl_estimator), 0.0)
    rewards = -kl_coef * kl
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return TokenRewards(rewards=rewards, kl=kl, scores=scores, non_score_reward=-kl_coef * kl.sum(dim=1))
