"""The small data set every example trains on: scikit-learn's 8x8 digits (bundled, no download)."""

from __future__ import annotations

import numpy as np


def digits_split(seed: int = 0, test_fraction: float = 0.25):
    """``(x_train, y_train, x_test, y_test)``: features in [0, 1] as float32, labels int32, stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return x_train, y_train, x_test, y_test


def batch_indices(num_examples: int, steps: int, batch_size: int, seed: int = 0) -> np.ndarray:
    """``(steps, batch_size)`` indices: one shuffled permutation per epoch, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    batch_size = min(batch_size, num_examples)
    per_epoch = num_examples // batch_size
    rows: list[np.ndarray] = []
    while len(rows) < steps:
        perm = rng.permutation(num_examples)
        rows.extend(perm[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch))
    return np.stack(rows[:steps]).astype(np.int32)
