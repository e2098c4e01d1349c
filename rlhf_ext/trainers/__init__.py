"""Thin subclasses of TRL trainers: PPO with a critic and online K-way DPO (on GRPOTrainer), K-way (Plackett-Luce)
DPO and reward models."""

from .grpo_base import SharedBaseGRPOTrainer, SharedBaseReward
from .kway_dpo import PlackettLuceDPOConfig, PlackettLuceDPOTrainer
from .kway_reward import PlackettLuceRewardConfig, PlackettLuceRewardTrainer
from .online_kway import OnlinePlackettLuceConfig, OnlinePlackettLuceTrainer
from .ppo_config import PPOConfig
from .ppo_trainer import PPOTrainer, SharedBaseCritic

__all__ = [
    "PPOConfig",
    "PPOTrainer",
    "SharedBaseCritic",
    "SharedBaseGRPOTrainer",
    "SharedBaseReward",
    "PlackettLuceDPOConfig",
    "PlackettLuceDPOTrainer",
    "PlackettLuceRewardConfig",
    "PlackettLuceRewardTrainer",
    "OnlinePlackettLuceConfig",
    "OnlinePlackettLuceTrainer",
]
