"""Pieces only the offline demo needs: SmolLM2 from its GGUF, the project's prompts, VADER ranking,
sampling, evaluation, plots and the report. `demo/__main__.py` (`python -m demo`) wires them to the recipes."""

import rlhf_ext  # noqa: F401, E402  (imported first, so its filter drops bitsandbytes' kernel-download notices)
