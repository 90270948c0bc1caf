"""The related systems' benchmarks: scripts (python related/benchmarks/NAME.py), importable too."""
