"""The benchmark suite (benchmarks/bench.py); a package so tests can import its parts."""
