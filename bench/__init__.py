"""Benchmarks for pelab (`python -m bench.bench`)."""
