"""gallery/threshold.py's FPIR threshold (--fpir) against a float64 brute force written here:
each enrolled image's best score over the images of the OTHER identities (what a search by
that person, were they not enrolled, would score), sorted; the threshold leaves floor(f P)
of the P probes above it. Ties, the counts of the rate as written, the refusals, probes
sampled against the whole gallery, and a statistical check on held-out identities: their
false positive identification rate at the --fpir threshold is f within a binomial bound,
where the --far threshold at the same f names most of them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gallery import threshold
from gallery.store import Gallery
from gallery.threshold import FarError, far_threshold, fpir_threshold

TIE_GAP = 1e-5  # ranked scores closer than this would make a float32 count ambiguous
SCORE_TOL = 1e-6  # float32 products of unit vectors against float64
SIGMAS = 4  # the statistical check's bound: a deterministic seed, a generous margin


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def best_other_identity(x: np.ndarray, names: list[str]) -> list[float]:
    """Per image, in float64: its highest cosine with an image of another identity."""
    x = np.asarray(x, np.float64)
    return [max(float(x[i] @ x[j]) for j in range(len(x)) if names[j] != names[i])
            for i in range(len(x))]


@pytest.mark.parametrize("blocks", [False, True])
def test_fpir_threshold_against_a_float64_brute_force(tmp_path, monkeypatch, blocks):
    """Two images that are each other's best match share a score: such ties at T are
    exact in float64, and float32 products summed in another order may split them by an
    ulp, so a tie at T may count 0 to (tied - 1) probes above it; elsewhere the count is
    the brute force's."""
    if blocks:  # many blocks of the gallery and of the probes, ragged at the ends
        monkeypatch.setattr(threshold, "BLOCK_ELEMENTS", 21)
        monkeypatch.setattr(threshold, "PROBE_BLOCK_ROWS", 3)
    rng = np.random.default_rng(3)
    n = 100
    x = unit(rng, n, 8)
    names = [f"n{i:02d}" for i in rng.integers(0, 25, n)]
    g = Gallery.create(tmp_path / "g", 8)
    g.add(x, names, [str(i) for i in range(n)])  # held sorted by name: another order
    best = best_other_identity(x, names)
    ranked = sorted(best, reverse=True)
    # 0.29 and 0.57 of 100 are 28.999999999999996 and 56.99999999999999 in floating point:
    # counted as written, 29 and 57 probes may score above
    counted = {}
    for fpir, above in ((0.5, 50), (0.29, 29), (0.57, 57), (0.1, 10), (0.01, 1)):
        found = g.fpir_threshold(fpir, progress=False)
        assert (found.probes, found.images, found.sampled, found.fpir) == (n, n, False, fpir)
        t = ranked[above]
        near = [s for s in best if abs(s - t) < TIE_GAP]
        assert set(near) == {t}  # no score near T but its exact ties
        assert found.threshold == pytest.approx(t, abs=SCORE_TOL)
        higher = sum(s > t for s in best)
        assert higher <= found.above <= min(above, higher + len(near) - 1)
        counted[fpir] = (higher, len(near))
    assert counted[0.29] == (29, 1) and counted[0.57] == (57, 1)  # as written, no tie
    assert counted[0.01] == (0, 2)  # the highest score: a pair, each the other's best


def test_probes_tied_at_the_threshold_are_not_above_it():
    """Four identities enrolled with one same image e_0 tie at 1, six others (e_1..e_6)
    at 0: one-hot products are exact in any order of summation."""
    x = np.eye(8)[[0, 0, 0, 0, 1, 2, 3, 4, 5, 6]]
    names = np.array(list("abcdefghij"))
    assert sorted(best_other_identity(x, list(names)), reverse=True) == [1.0] * 4 + [0.0] * 6
    for fpir, t, above in ((0.1, 1.0, 0), (0.2, 1.0, 0), (0.5, 0.0, 4), (0.9, 0.0, 4)):
        found = fpir_threshold(x, names, fpir, progress=False)  # floor(10 f) may be above
        assert (found.threshold, found.above) == (t, above), fpir


def test_an_fpir_the_gallery_cannot_measure_is_refused_by_its_counts():
    x = unit(np.random.default_rng(5), 40, 6)
    names = [f"n{i % 9}" for i in range(40)]
    with pytest.raises(FarError, match=r"--fpir 0\.02: the gallery's 40 images searched as "
                                       r"unknown faces measure no FPIR below 1/40 = 0\.025"):
        fpir_threshold(x, np.array(names), 0.02, progress=False)
    ranked = sorted(best_other_identity(x, names), reverse=True)
    found = fpir_threshold(x, np.array(names), 0.025, progress=False)  # 1/40: accepted
    assert found.threshold == pytest.approx(ranked[1], abs=SCORE_TOL)
    with pytest.raises(FarError, match="the gallery holds 1 "):
        fpir_threshold(x, np.array(["a"] * 40), 0.5, progress=False)
    for rate in (1.0, 0.0, math.nan):
        with pytest.raises(FarError, match="a false positive identification rate is in"):
            fpir_threshold(x, np.array(names), rate, progress=False)


def test_sampled_probes_are_searched_against_the_whole_gallery():
    """40 images, at most 20 probes: the seeded sample (threshold.SAMPLE_SEED, as
    far_threshold samples) of 20 images, each scored against all 40, not against the 20."""
    rng = np.random.default_rng(6)
    x = unit(rng, 40, 6)
    names = [f"n{i % 9}" for i in range(40)]
    keep = np.sort(np.random.default_rng(threshold.SAMPLE_SEED).permutation(40)[:20])
    best = best_other_identity(x, names)  # against all 40 images
    whole = sorted((best[i] for i in keep), reverse=True)
    within = sorted(best_other_identity(x[keep], [names[i] for i in keep]), reverse=True)
    found = fpir_threshold(x, np.array(names), 0.1, max_probes=20, progress=False)
    assert found.sampled and (found.probes, found.images) == (20, 40)
    assert abs(whole[2] - within[2]) > TIE_GAP  # the two readings differ here
    assert found.threshold == pytest.approx(whole[2], abs=SCORE_TOL)
    assert found.above == sum(s > whole[2] + TIE_GAP for s in whole) == 2


def clustered(rng: np.random.Generator, identities: int, images: int, dim: int,
              spread: float) -> np.ndarray:
    """``images`` unit vectors per identity (identity-major): a random unit centre plus
    Gaussian noise of norm about ``spread``, normalised."""
    x = np.repeat(unit(rng, identities, dim), images, axis=0)
    x += spread * rng.standard_normal(x.shape) / math.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_held_out_identities_are_named_at_the_fpir_and_far_more_at_the_far():
    """A gallery of 500 identities x 3 images, and 4,000 faces of other people searched in
    it: the fraction named (best score above T) at --fpir f is f within SIGMAS binomial
    standard deviations (the threshold's own rests on 500 identities, counted as 500
    observations: their 3 images are correlated); at --far f it is most of them."""
    rng = np.random.default_rng(7)
    dim, people, images = 32, 500, 3
    x = clustered(rng, people, images, dim, spread=0.8)
    labels = np.repeat(np.arange(people), images)
    unknown = clustered(rng, 4000, 1, dim, spread=0.8)
    top = (np.asarray(unknown, np.float64) @ np.asarray(x, np.float64).T).max(axis=1)
    for fpir in (0.01, 0.05):
        found = fpir_threshold(x, labels, fpir, progress=False)
        named = float((top > found.threshold).mean())
        sigma = math.sqrt(fpir * (1 - fpir) * (1 / people + 1 / len(unknown)))
        print(f"fpir {fpir}: {named:.4f} of unknown faces named (bound {SIGMAS * sigma:.4f})")
        assert abs(named - fpir) < SIGMAS * sigma, (fpir, named)
        at_far = float((top > far_threshold(x, labels, fpir, progress=False).threshold).mean())
        print(f"far {fpir}: {at_far:.4f} of unknown faces named")
        assert at_far > 0.5 > fpir + 2 * SIGMAS * sigma, (fpir, at_far)
