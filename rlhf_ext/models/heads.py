"""The scalar head that turns a last hidden state into a value or a reward."""

from __future__ import annotations

import torch
from torch import nn


class ScalarHead(nn.Module):
    """A linear map hidden state -> one scalar, kept in float32 whatever the base's dtype.

    hidden [..., H] (any float dtype) -> scores [...] float32.
    Stored on disk as "weight" [1, H] and "bias" [1] (see docs/architecture.md).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        # A small initial output keeps the first values/rewards near 0, as TRL's value head does.
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # float32: values and rewards feed GAE and whitening, where bf16 rounding is visible.
        return self.linear(hidden.to(torch.float32)).squeeze(-1)
