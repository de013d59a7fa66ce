"""The paired bootstrap behind every "vs SFT" interval of eval.py's table, on inputs whose answer is known."""
import numpy as np
import pytest

from eval import diff_text, paired_bootstrap


def test_identical_agents_differ_by_exactly_zero():
    a = np.random.default_rng(0).integers(0, 2, (5, 100)).tolist()
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)


def test_a_constant_gain_has_a_degenerate_interval():
    a = [[0.0] * 50 + [1.0] * 50] * 5
    b = [[1.0] * 60 + [1.0] * 40] * 5            # +0.5 on every seed and every ... task mix
    m, lo, hi = paired_bootstrap(a, b)
    assert m == pytest.approx(0.5) and lo < m < hi and hi - lo < 0.25


def test_a_gain_in_one_seed_only_is_not_significant():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, (5, 100)).astype(float)
    b = a.copy()
    b[0] = 1.0                                   # one lucky seed
    m, lo, hi = paired_bootstrap(a.tolist(), b.tolist())
    assert m > 0 and lo <= 0 < hi, "seed resampling must see that 4 of 5 seeds show nothing"


def test_pairing_by_task_removes_task_difficulty_noise():
    rng = np.random.default_rng(2)
    hard = rng.random((5, 200)) < 0.5             # the same tasks are easy or hard for both agents
    a = hard.astype(float)
    b = a.copy()
    b[:, :20] = 1.0                               # b also solves 20 tasks a fails on some of
    m, lo, hi = paired_bootstrap(a.tolist(), b.tolist())
    assert lo > 0, "a consistent gain on the same tasks is significant when paired"


def test_shapes_must_pair_and_text_reads_the_per_task_lists():
    with pytest.raises(ValueError, match="paired_bootstrap"):
        paired_bootstrap([[1, 0]], [[1, 0, 1]])
    base = [{"per_task": [0, 0, 1, 1]}] * 3
    assert diff_text(base, base) == "+0.0 [+0.0, +0.0]"
    assert diff_text([{"success": 0.5}], [{"success": 0.5}]) == "-"
