"""data_split slices: disjoint, covering, proportional, deterministic and independent of global RNG state."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.data.rows import DataError
from common.data.splits import parse_data_split, slice_bounds, stage_indices, train_eval_indices


@pytest.mark.parametrize("n", [0, 1, 7, 10, 1001])
@pytest.mark.parametrize("split", ["2,4,4", "1,1,1", "10,0,0", "0.2,0.3,0.5"])
def test_stage_slices_are_disjoint_and_cover_every_row(n, split):
    slices = [stage_indices(n, split, stage, seed=1234) for stage in (1, 2, 3)]
    flat = [i for s in slices for i in s]
    assert sorted(flat) == list(range(n))  # cover, and no index twice -> disjoint


def test_stage_slice_sizes_follow_the_proportions():
    sizes = [len(stage_indices(1000, "2,4,4", stage, seed=1)) for stage in (1, 2, 3)]
    assert sizes == [200, 400, 400]
    assert slice_bounds(10, parse_data_split("1,1,1")) == [0, 3, 6, 10]
    assert slice_bounds(5, parse_data_split("10,0,0")) == [0, 5, 5, 5]


def test_slices_are_shuffled_and_depend_on_the_seed():
    a = stage_indices(100, "2,4,4", 1, seed=1)
    assert a != sorted(a)
    assert a != stage_indices(100, "2,4,4", 1, seed=2)


def test_split_is_independent_of_global_rng_state():
    first = [stage_indices(50, "2,4,4", s, seed=7) for s in (1, 2, 3)]
    tr_ev = train_eval_indices(50, seed=7)
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    np.random.rand(5), torch.rand(5), random.random()
    assert [stage_indices(50, "2,4,4", s, seed=7) for s in (1, 2, 3)] == first
    assert train_eval_indices(50, seed=7) == tr_ev


@pytest.mark.slow
def test_split_is_identical_in_another_process():
    # A fresh interpreter stands in for another rank: same seed -> same slice.
    code = "from common.data.splits import stage_indices; print(stage_indices(30, '2,4,4', 2, seed=5))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(stage_indices(30, "2,4,4", 2, seed=5))


def test_train_eval_split_is_nine_to_one_and_disjoint():
    train, evals = train_eval_indices(100, seed=3)
    assert len(train) == 90 and len(evals) == 10
    assert sorted(train + evals) == list(range(100))


@pytest.mark.parametrize("bad", ["2,4", "1,2,3,4", "a,b,c", "-1,1,1", "0,0,0"])
def test_bad_data_split_is_a_clear_error(bad):
    with pytest.raises(DataError, match="data_split"):
        parse_data_split(bad)
