"""Benchmarks: what admission control costs, and how close it gets to E2B's limits.

Run them all with `python -m benchmarks` (see benchmarks/README.md). Each figure is
printed as a ratio between things measured side by side in the same run; none is a test.
"""
