"""rlhf_ext: RLHF extensions for Hugging Face TRL.

The ops (pure tensor math) load eagerly; trainers, models and data load on first use, so
`import rlhf_ext; rlhf_ext.gae(...)` never imports TRL.
"""

import logging
from importlib import import_module

from .ops import *  # noqa: F401,F403
from .ops import __all__ as _ops_all


class _DropKernelDownloadNotices(logging.Filter):
    """Drop the lines bitsandbytes logs at import on a CPU with AVX512-BF16 about its optional Hub kernel.

    It tries to fetch a faster 4-bit CPU kernel (kernels-community/quantization-bitsandbytes) from the Hub; offline,
    or without trusting that repository, it prints "Skipping publisher trust check ..." and "Failed to load CPU
    gemm_4bit_forward ..." before every command, `--help` included, then falls back to its built-in kernel. Only
    records about that kernel go; anything else these loggers say still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "kernels-community" not in message and "gemm_4bit_forward" not in message


for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).addFilter(_DropKernelDownloadNotices())

__version__ = "0.1.0"

# public name -> module that defines it, imported on first attribute access
_LAZY = {
    "PPOConfig": ".trainers.ppo.config",
    "PPOTrainer": ".trainers.ppo.trainer",
    "AdaptiveKLCallback": ".callbacks",
    "CompletionsTableCallback": ".callbacks",
    "PlackettLuceDPOConfig": ".trainers.kway.dpo",
    "PlackettLuceDPOTrainer": ".trainers.kway.dpo",
    "PlackettLuceRewardConfig": ".trainers.kway.reward",
    "PlackettLuceRewardTrainer": ".trainers.kway.reward",
    "OnlinePlackettLuceConfig": ".trainers.kway.online",
    "OnlinePlackettLuceTrainer": ".trainers.kway.online",
    "DataCollatorForRankedPreference": ".data",
    "load_dataset_or_file": ".data",
    "SharedBase": ".models",
    "SharedBaseArguments": ".models",
    "ScalarHead": ".models",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rlhf_ext' has no attribute {name!r}")


__all__ = [*_ops_all, *_LAZY]
