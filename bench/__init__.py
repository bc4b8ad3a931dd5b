"""Benchmarks: ratios against baselines run side by side on the same machine (make bench)."""
