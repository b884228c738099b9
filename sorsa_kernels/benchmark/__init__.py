"""Benchmark suites behind ``sorsa-kernels bench``: each suite times our ops side by side with
their baselines in one run and returns rows that :func:`common.write_results` stores as JSON
(with device, versions and date) under ``bench/results/``; ``bench/report.py`` turns those
files into the README's tables and plots."""
