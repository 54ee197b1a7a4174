"""Runnable examples: ``python -m examples.<name> --steps N`` from the repository root."""
