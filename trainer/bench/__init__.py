"""Benchmarks: `python -m trainer bench` and its sections."""
