"""Pure tensor math for RLHF (no TRL or transformers import). docs/algorithms.md maps each
function to its equation in the seed."""

from .advantages import discounted_reverse_cumsum, gae, rewards_to_go
from .logprobs import entropy_from_logits, selective_log_softmax
from .plackett_luce import (
    dpo_plackett_luce_loss,
    plackett_luce_loss,
    reverse_logcumsumexp,
    robust_plackett_luce_loss,
    worst_ranking,
)
from .ppo_loss import (
    PPOLossOutput,
    aggregate,
    clipped_policy_loss,
    clipped_value_loss,
    ppo_loss,
)
from .rewards import TokenRewards, kl_penalty, last_token_index, token_rewards
from .stats import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "gae",
    "rewards_to_go",
    "discounted_reverse_cumsum",
    "kl_penalty",
    "token_rewards",
    "TokenRewards",
    "last_token_index",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "selective_log_softmax",
    "entropy_from_logits",
    "ppo_loss",
    "PPOLossOutput",
    "aggregate",
    "clipped_policy_loss",
    "clipped_value_loss",
    "plackett_luce_loss",
    "dpo_plackett_luce_loss",
    "robust_plackett_luce_loss",
    "worst_ranking",
    "reverse_logcumsumexp",
]
