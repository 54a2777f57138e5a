"""fetchpool's benchmark harness (issue 4): ``python -m benchmarks --help``."""
