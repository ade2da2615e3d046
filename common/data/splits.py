"""Seeded, deterministic splits: train/eval 9:1 for sources without an eval split, and the per-stage slices.

All permutations come from numpy's legacy `RandomState(seed)`, whose stream numpy has frozen (NEP 19), so a
split is identical on every rank, every node and every numpy version, and never depends on the global
torch/numpy/random state. Each use gets its own seed derived from the user's seed and a purpose string.

`data_split` "2,4,4": the permuted train rows of each dataset are cut into three disjoint contiguous slices
with proportions 2:4:4 (boundaries floor(n * cumulative / total), computed exactly with fractions); stage k
takes slice k. Stages only get disjoint data if all three runs use the same seed and data_split.
"""

from __future__ import annotations

import hashlib
from fractions import Fraction

import numpy as np

from common.data.rows import DataError

EVAL_FRACTION = Fraction(1, 10)


def derive_seed(seed: int, purpose: str) -> int:
    """A 32-bit seed for one use of the user's seed, stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seeded_permutation(n: int, seed: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (n, seed)."""
    return np.random.RandomState(seed).permutation(n)


def parse_data_split(data_split: str) -> list[Fraction]:
    """ "2,4,4" -> [2, 4, 4] as exact fractions; exactly three non-negative weights with a positive sum."""
    try:
        weights = [Fraction(part.strip()) for part in data_split.split(",")]
    except (ValueError, ZeroDivisionError):
        raise DataError(
            f"data_split {data_split!r}: expected three comma-separated numbers like '2,4,4'"
        ) from None
    if len(weights) != 3 or any(w < 0 for w in weights) or sum(weights) == 0:
        raise DataError(
            f"data_split {data_split!r}: expected three non-negative weights (SFT, reward, PPO) with a positive sum"
        )
    return weights


def slice_bounds(n: int, weights: list[Fraction]) -> list[int]:
    """Boundaries [0, b1, ..., n] of contiguous slices of n items with the given proportions."""
    total = sum(weights)
    bounds, cumulative = [0], Fraction(0)
    for w in weights:
        cumulative += w
        bounds.append(int(n * cumulative / total))  # floor; the last one is exactly n
    return bounds


def stage_indices(n: int, data_split: str, stage: int, seed: int) -> list[int]:
    """Indices into n train rows that stage `stage` (1, 2 or 3) trains on."""
    bounds = slice_bounds(n, parse_data_split(data_split))
    permutation = seeded_permutation(n, derive_seed(seed, "stage_split"))
    return permutation[bounds[stage - 1] : bounds[stage]].tolist()


def train_eval_indices(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Split n rows 9:1 into (train, eval) indices, for sources that have no eval split of their own."""
    permutation = seeded_permutation(n, derive_seed(seed, "train_eval"))
    n_train = int(n * (1 - EVAL_FRACTION))
    return permutation[:n_train].tolist(), permutation[n_train:].tolist()
