"""Benchmarks, run as scripts (`python -m condensa.eval.bench <name> ...`), never as timed tests."""
