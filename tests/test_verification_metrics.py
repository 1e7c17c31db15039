"""verification_metrics.tar_at_far_from_top, the TAR@FAR both lfw_eval (all impostor scores) and
megaface_eval (only the top ones) use, against a brute-force search in exact arithmetic."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

import megaface_eval
import verification_metrics as vm


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
