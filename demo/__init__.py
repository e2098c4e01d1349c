"""Pieces only the offline demo needs: SmolLM2 from its GGUF, the project's prompts, VADER ranking,
sampling, evaluation, plots and the report. `recipes/demo.py` wires them to the other recipes."""
