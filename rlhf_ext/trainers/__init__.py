"""Thin subclasses of TRL trainers: PPO with a critic and online K-way DPO (on GRPOTrainer), K-way (Plackett-Luce)
DPO and reward models."""

from .grpo_base import SharedBaseGRPOTrainer, SharedBaseReward, scored_as_trained
from .kway import (
    OnlinePlackettLuceConfig,
    OnlinePlackettLuceTrainer,
    PlackettLuceDPOConfig,
    PlackettLuceDPOTrainer,
    PlackettLuceRewardConfig,
    PlackettLuceRewardTrainer,
)
from .ppo import PPOConfig, PPOTrainer, SharedBaseCritic

__all__ = [
    "PPOConfig",
    "PPOTrainer",
    "SharedBaseCritic",
    "SharedBaseGRPOTrainer",
    "SharedBaseReward",
    "scored_as_trained",
    "PlackettLuceDPOConfig",
    "PlackettLuceDPOTrainer",
    "PlackettLuceRewardConfig",
    "PlackettLuceRewardTrainer",
    "OnlinePlackettLuceConfig",
    "OnlinePlackettLuceTrainer",
]
