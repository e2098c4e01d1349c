"""Load the recipes (modules of rlhf_ext.scripts), the demo's driver (demo/__main__.py) and the scripts of benchmarks/
(files, not a package) in tests."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str, module_name: str) -> ModuleType:
    """Execute `REPO / relative_path` as the module `module_name`, registered in sys.modules (dataclasses with
    string annotations, and pickling, look their module up there)."""
    spec = importlib.util.spec_from_file_location(module_name, REPO / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_recipe(name: str) -> ModuleType:
    """The recipe module `rlhf_ext.scripts.<name>` (ppo, online_kway, dpo, reward), or the demo's driver (`demo`)."""
    return importlib.import_module("demo.__main__" if name == "demo" else f"rlhf_ext.scripts.{name}")
