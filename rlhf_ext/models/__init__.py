"""One base model, four PPO roles (policy, value, reward, reference); LoRA and 4-bit presets.

See `shared_base` for a usage example and docs/shared-base.md for the layout.
"""

from .checkpointing import adapter_state_checkpointing
from .heads import ScalarHead
from .hub import model_card, push_folder_to_hub
from .presets import (
    LORA_TARGET_MODULES,
    SharedBaseArguments,
    lora_config,
    lora_target_modules_for,
    quantization_config,
)
from .quantization import disable_cpu_4bit_repacking
from .role_folder import (
    check_adapter_fits,
    load_head,
    save_adapter,
    save_adapter_with_head,
)
from .shared_base import ROLES, SharedBase, load_base_model

__all__ = [
    "LORA_TARGET_MODULES",
    "ROLES",
    "ScalarHead",
    "adapter_state_checkpointing",
    "SharedBase",
    "SharedBaseArguments",
    "check_adapter_fits",
    "disable_cpu_4bit_repacking",
    "load_base_model",
    "load_head",
    "lora_config",
    "lora_target_modules_for",
    "model_card",
    "push_folder_to_hub",
    "quantization_config",
    "save_adapter",
    "save_adapter_with_head",
]
