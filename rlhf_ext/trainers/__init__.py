"""Thin subclasses of TRL trainers: K-way (Plackett-Luce) DPO and reward models."""

from .kway_dpo import PlackettLuceDPOConfig, PlackettLuceDPOTrainer
from .kway_reward import PlackettLuceRewardConfig, PlackettLuceRewardTrainer

__all__ = [
    "PlackettLuceDPOConfig",
    "PlackettLuceDPOTrainer",
    "PlackettLuceRewardConfig",
    "PlackettLuceRewardTrainer",
]
