"""Benchmarks: modules outside the wheel, each run from the repository root as `python -m benchmarks.<name>`.
benchmarks/harness.py holds what they share: the model shapes, the clock, the child runs and the result files."""
