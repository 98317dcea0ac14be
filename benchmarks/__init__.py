"""Benchmarks: ``python -m benchmarks.run [w1 w2 ...] [--quick] [--json PATH]``."""
