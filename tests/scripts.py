"""Load a script of the repository (recipes/ and benchmarks/ are folders of scripts, not packages) as a module."""

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
    """recipes/<name>.py as the module `recipe_<name>`."""
    return load_script(f"recipes/{name}.py", f"recipe_{name}")
