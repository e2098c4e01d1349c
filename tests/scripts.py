"""Load the recipes (modules of rlhf_ext.scripts) and the demo's driver (demo/__main__.py) in tests, by name."""

import importlib
from types import ModuleType


def load_recipe(name: str) -> ModuleType:
    """The recipe module `rlhf_ext.scripts.<name>` (ppo, online_kway, dpo, reward), or the demo's driver (`demo`)."""
    return importlib.import_module("demo.__main__" if name == "demo" else f"rlhf_ext.scripts.{name}")
