"""Benchmarks: ``python -m benchmarks.<name>`` from the repository root (see README.md here)."""
