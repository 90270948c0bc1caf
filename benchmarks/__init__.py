"""The benchmarks: each module is a script (python benchmarks/NAME.py) and importable as benchmarks.NAME."""
