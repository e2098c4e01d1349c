"""Benchmarks: scripts outside the wheel. Each runs as `python benchmarks/<name>.py`; the demo studies, which import the
demo package (demo/) of the checkout, run from the repository root as `python -m benchmarks.<name>`."""
