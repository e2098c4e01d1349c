"""TrainerCallbacks for the PPO trainer: an adaptive KL controller and a completions table."""

from .adaptive_kl import AdaptiveKLCallback, adaptive_kl_coef
from .completions_table import CompletionsTableCallback

__all__ = ["AdaptiveKLCallback", "CompletionsTableCallback", "adaptive_kl_coef"]
