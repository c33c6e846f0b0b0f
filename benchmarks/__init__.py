"""bnext benchmark harness: ``python -m benchmarks.bench --help``."""
