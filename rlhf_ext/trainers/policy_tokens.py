"""The policy's own tokens of multi-turn completions, side by side, for PPO's per-token ops.

With tools, environments or a rollout function (GRPOTrainer's multi-turn rollouts) a completion holds the policy's
tokens and, between them, tool or environment output (TRL's `tool_mask` is 0 there). The tool output is the
environment's move, not the policy's: it gets no policy gradient, no KL term and no reward, and GAE runs over the
policy's tokens only, so that the value after a tool output bootstraps the token before it,

    delta_t = r_t + gamma * V(s_{next policy token}) - V(s_t).

`rlhf_ext.ops` (token rewards, GAE, the PPO loss) work on right-padded rows, a prefix of real tokens. So each row's
policy tokens are moved to its front, in order (`compact`), the ops run there, and what they return per token is put
back in place (`expand`), 0 on tool output and padding. Gathering keeps the autograd graph, so the loss's gradient
reaches exactly the policy tokens' log-probs and values.
"""

from __future__ import annotations

import torch


def policy_token_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [B, T] long, prefix [B, T] bool) for a [B, T] mask of the policy's tokens (any pattern of holes).

    `x.gather(1, order)` puts each row's masked tokens first, in their order; `prefix` marks them there (True on the
    first mask.sum(row) positions), the right-padded mask the ops expect.
    """
    mask = mask.bool()
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    positions = torch.arange(mask.shape[1], device=mask.device)
    return order, positions[None, :] < mask.sum(dim=1, keepdim=True)


def compact(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x [B, T] with each row's policy tokens first (`policy_token_order`); differentiable."""
    return x.gather(1, order)


def expand(x: torch.Tensor, order: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """The inverse of `compact` on the policy's tokens: x [B, T] (policy tokens first) back in place, 0 elsewhere."""
    return torch.zeros_like(x).scatter(1, order, x.masked_fill(~prefix, 0))
