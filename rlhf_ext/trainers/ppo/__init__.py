"""PPO with a learned critic on TRL's GRPOTrainer: its config (`config.py`) and trainer (`trainer.py`)."""

from .config import PPOConfig
from .trainer import PPOTrainer, SharedBaseCritic

__all__ = ["PPOConfig", "PPOTrainer", "SharedBaseCritic"]
