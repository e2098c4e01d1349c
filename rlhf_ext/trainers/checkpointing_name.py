"""TRL's default (activation checkpointing on) under transformers' new name, without a warning on every run.

transformers 5 renamed `gradient_checkpointing` to `activation_checkpointing` (the old name goes in v6) and warns
whenever the old one is set; TRL's configs set it to True by default, so every run printed the warning. The configs
here default the old name to None and, when neither name is given, set `activation_checkpointing=True` (TRL's
default). A value given under the old name still wins, with transformers' deprecation warning, so nothing a user
wrote changes meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ActivationCheckpointingByDefault:
    """Config mixin (listed before the TRL config among the bases): see the module docstring."""

    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of `activation_checkpointing` (removed in transformers v6)."},
    )

    def __post_init__(self):
        if getattr(self, "activation_checkpointing", None) is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        super().__post_init__()
