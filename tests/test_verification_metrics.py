"""verification_metrics.tar_at_far_from_top, the TAR@FAR both lfw_eval (all impostor scores) and
megaface_eval (only the top ones) use, against a brute-force search in exact arithmetic."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from verification_testlib import brute_force_folds

from evaluation import megaface_eval
from evaluation import verification_metrics as vm


def brute_force(genuine, impostors, far):
    """The lowest threshold t (among -inf and every impostor score) with at most
    floor(far * n) impostors strictly above it, counted with exact fractions; TAR at t."""
    allowed = math.floor(Fraction(str(far)) * len(impostors))
    candidates = [-math.inf] + sorted(set(impostors))
    t = min(c for c in candidates if sum(s > c for s in impostors) <= allowed)
    return sum(g > t for g in genuine) / len(genuine), t


@pytest.mark.parametrize("far", [0.005, 0.01, 0.1, 0.25, 0.5, 0.995])
def test_matches_brute_force_with_ties_and_only_the_top_scores(far):
    rng = np.random.default_rng(1)
    genuine = np.round(rng.normal(0.5, 0.2, 50), 2)  # rounding makes ties
    impostors = np.round(rng.normal(0.0, 0.2, 200), 2)
    desc = np.sort(impostors)[::-1]
    want_tar, want_t = brute_force(genuine.tolist(), impostors.tolist(), far)
    top = int(math.floor(Fraction(str(far)) * 200)) + 1  # just enough of the largest scores
    tar, t = vm.tar_at_far_from_top(genuine, desc[:top], 200, far)
    assert t == want_t and tar == pytest.approx(want_tar, abs=1e-15)
    with pytest.raises(ValueError, match="need the top"):
        vm.tar_at_far_from_top(genuine, desc[:top - 1], 200, far)
    # lfw_eval's form: every score with its label
    sims = np.concatenate([genuine, impostors])
    issame = np.r_[np.ones(50, bool), np.zeros(200, bool)]
    assert vm.tar_at_far(sims, issame, far) == (pytest.approx(want_tar, abs=1e-15), want_t)
    got = megaface_eval.tar_at_far(genuine, desc[:top], 200, far)
    assert got["threshold"] == want_t and got["tar"] == pytest.approx(want_tar, abs=1e-15)
    assert got["far_achieved"] == sum(s > want_t for s in impostors) / 200 <= far


def test_far_allowing_every_impostor():
    genuine = np.array([0.9, 0.3, -0.5])  # -0.5 lies below every impostor
    impostors = np.array([0.4, -0.2, 0.1, -0.4])
    tar, t = vm.tar_at_far_from_top(genuine, np.sort(impostors)[::-1], 4, 1.0)
    assert t == -math.inf and tar == 1.0  # every pair accepted
    got = megaface_eval.tar_at_far(genuine, np.sort(impostors)[::-1], 4, 1.0)
    assert got["threshold"] is None and got["tar"] == 1.0 and got["far_achieved"] == 1.0
    # lfw_eval keeps a finite threshold just below the lowest impostor: -0.5 stays rejected
    tar, t = vm.tar_at_far(np.r_[genuine, impostors], np.r_[[True] * 3, [False] * 4], 1.0)
    assert -0.4 - 1e-12 < t < -0.4 and tar == pytest.approx(2 / 3)


def test_no_genuine_scores_gives_no_tar():
    assert vm.tar_at_far_from_top(np.zeros(0), np.array([0.3, 0.1]), 2, 0.5) == (None, 0.1)


# ----------------------------------------------------------------------------- folds

def test_explicit_folds_match_brute_force():
    rng = np.random.default_rng(5)
    same = rng.random(90) < 0.5
    sims = np.round(np.where(same, rng.normal(0.4, 0.3, 90), rng.normal(0.1, 0.3, 90)), 1)
    fold_of = rng.integers(0, 4, 90)  # interleaved, uneven folds
    got = vm.ten_fold_details(sims, same, folds=fold_of)
    accs, thresholds = brute_force_folds(sims, same, fold_of.tolist())
    assert got["fold_accuracies"] == pytest.approx(accs, abs=1e-12)
    assert got["fold_thresholds"] == pytest.approx(thresholds, abs=1e-12)
    assert got["nfolds"] == 4 and got["accuracy"] == pytest.approx(np.mean(accs), abs=1e-12)


def test_stratified_folds_put_both_kinds_in_every_fold():
    same = np.array([True] * 23 + [False] * 17)  # a single-set file: all same, then all different
    fold_of = vm.stratified_folds(same, 10)
    for f in range(10):
        members = fold_of == f
        # the i-th same pair and the i-th different pair go to fold i mod 10
        assert same[members].sum() == len(range(f, 23, 10))
        assert (~same[members]).sum() == len(range(f, 17, 10))
    assert [fold_of[i] for i in range(23)] == [i % 10 for i in range(23)]
    assert [fold_of[23 + i] for i in range(17)] == [i % 10 for i in range(17)]
    with pytest.raises(vm.VerificationError, match="1 different"):
        vm.stratified_folds(np.array([True] * 5 + [False]), 10)


def test_data_errors_are_toolkit_errors():
    from utils import ToolkitError

    with pytest.raises(ToolkitError, match="NaN"):
        vm.ten_fold_details(np.array([np.nan] + [0.1] * 19), np.arange(20) % 2 == 0)
    with pytest.raises(ToolkitError, match="genuine and impostor"):
        vm.roc_metrics(np.zeros(4), np.ones(4, bool))
    with pytest.raises(ToolkitError, match="fold 1 holds only"):  # contiguous one-kind folds
        vm.ten_fold_details(np.zeros(20), np.arange(20) < 10, nfolds=2)


@pytest.mark.parametrize("far, need", [
    (1e-6, 1_000_000), (1e-4, 10_000), (1e-3, 1_000), (0.3, 4), (1 / 317, 317), (0.1, 10),
])
def test_a_far_needs_one_over_far_impostors_and_says_so(far, need):
    assert vm.impostors_needed(far) == need
    assert vm.far_measurable(far, need) and not vm.far_measurable(far, need - 1)
    assert vm.not_measured(far) == f"n/a (needs >= {need:,} impostor pairs)"
    impostors = min(need - 1, 5000)  # any count below the need is not measured
    same = np.r_[np.ones(5, bool), np.zeros(impostors, bool)]
    out = vm.roc_metrics(np.linspace(0, 1, same.size), same, fars=(far,))
    assert vm.tar_key(far) not in out
    assert out["not_measured"] == {vm.tar_key(far): f"n/a (needs >= {need:,} impostor pairs)"}
