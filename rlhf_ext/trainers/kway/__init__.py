"""The Plackett-Luce K-way family: what the offline trainers share (`common.py`), K-way DPO (`dpo.py`), K-way reward
models (`reward.py`) and online K-way DPO on TRL's GRPOTrainer (`online.py`)."""

from .dpo import PlackettLuceDPOConfig, PlackettLuceDPOTrainer
from .online import OnlinePlackettLuceConfig, OnlinePlackettLuceTrainer
from .reward import PlackettLuceRewardConfig, PlackettLuceRewardTrainer

__all__ = [
    "PlackettLuceDPOConfig",
    "PlackettLuceDPOTrainer",
    "PlackettLuceRewardConfig",
    "PlackettLuceRewardTrainer",
    "OnlinePlackettLuceConfig",
    "OnlinePlackettLuceTrainer",
]
