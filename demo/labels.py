"""The demo's policy names as readers see them, shared by the report's table and the plots."""

from __future__ import annotations

POLICY_LABELS = {"base": "base", "ppo": "PPO", "dpo": "K-way DPO", "online_kway": "online K-way"}


def policy_label(name: str) -> str:
    """The label of the policy the demo calls `name` (an unknown name is its own label)."""
    return POLICY_LABELS.get(name, name)
