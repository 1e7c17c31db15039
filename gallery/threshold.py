"""The decision threshold at a false-accept rate (1:1) or at a false positive identification
rate (1:N), from a gallery's own scores.

The impostor pairs are every pair of enrolled images of different identities: N = n(n-1)/2
less each identity's m(m-1)/2. At FAR f the threshold T is the (floor(f N) + 1)-th highest
impostor score, so that floor(f N) pairs score above it (fewer where scores tie at T) and a
search accepts a match scoring strictly above T. A FAR below 1/N rests on no pair and is
refused. The scores are computed exactly, block by block, keeping only the highest; past
FAR_MAX_IMAGES images (n^2/2 products of 512-D vectors) a seeded sample of that many images
stands for the gallery, and the result says so.

FAR counts pairs, not searches: an unknown face is named when ANY of the gallery's images
scores above T, so at FAR f a search of n images names it about 1 - (1 - f)^n of the time
(random 128-D vectors, 2 images an identity, FAR 1e-3: 17% of 5,000 unknown faces named with
100 identities, 87% with 1,000). The false positive identification rate (FPIR: NIST FRVT
1:N, IJB-C 1:N) is that fraction itself, the rate to set for "how often is an unknown face
wrongly named". It is estimated by leaving one identity out: each enrolled image is a probe
of a person not in the gallery, scored as search scores it against the gallery less its own
identity (its best score over the other identities' images); at FPIR f, T is the
(floor(f P) + 1)-th highest of the P probes' best scores, so that floor(f P) probes score
above it (fewer where they tie at T). An FPIR below 1/P is refused. Past FAR_MAX_IMAGES
images a seeded sample of that many probes is taken, each still searched against the whole
gallery: a smaller gallery has fewer identities to be mistaken for, and would understate
the rate. The cost is P x n products of d-D vectors, block by block with progress: 50,000
probes of a 1M-image gallery are 2.6e13 multiply-adds at 512-D, about 5 minutes at the 78e9
a second measured on 2 shared cores (20,000 images, 2.6 s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from tqdm import tqdm

from utils import ToolkitError

# 50,000 images: 1.25e9 pairs, ~6e11 multiply-adds at 512-D (about half a minute on 2 cores)
FAR_MAX_IMAGES = 50_000
SAMPLE_SEED = 0  # the images a sampled threshold rests on
BLOCK_ELEMENTS = 1 << 24  # scores computed at once (64 MiB of float32)
KEPT_SLACK = 2  # scores kept, as a multiple of those needed, before the lowest are dropped
# probes scored together against a block of the gallery: BLOCK_ELEMENTS / 4096 = 4096 images a
# block, both sides wide enough for an efficient matrix product
PROBE_BLOCK_ROWS = 4096


class FarError(ToolkitError, ValueError):
    """A false-accept or false positive identification rate the gallery cannot measure;
    the message says why."""


@dataclass
class FarThreshold:
    threshold: float
    far: float
    pairs: int  # impostor pairs the threshold rests on
    above: int  # of them scoring above the threshold
    images: int  # images those pairs are made of
    sampled: bool  # the images are a sample of the gallery


@dataclass
class FpirThreshold:
    threshold: float
    fpir: float
    probes: int  # enrolled images searched as unknown faces (against the other identities)
    above: int  # of them whose best score is above the threshold
    images: int  # images of the gallery they were searched against
    sampled: bool  # the probes are a sample of the gallery's images


def impostor_pair_count(labels: np.ndarray) -> int:
    """Pairs of images with different labels: n(n-1)/2 less each label's m(m-1)/2."""
    counts = np.unique(np.asarray(labels), return_counts=True)[1].astype(object)
    n = int(counts.sum())
    return n * (n - 1) // 2 - int(sum(m * (m - 1) // 2 for m in counts))


def far_threshold(embeddings: np.ndarray, labels: np.ndarray, far: float, source: str = "--far",
                  max_images: int = FAR_MAX_IMAGES, progress: bool = True) -> FarThreshold:
    """The threshold at false-accept rate ``far`` over the impostor pairs of unit
    ``embeddings`` (n, d) with identity ``labels`` (n,); see the module docstring."""
    labels = np.asarray(labels)
    sampled = len(labels) > max_images
    if sampled:
        keep = np.sort(np.random.default_rng(SAMPLE_SEED).permutation(len(labels))[:max_images])
        embeddings, labels = embeddings[keep], labels[keep]
    pairs = impostor_pair_count(labels)
    if not (math.isfinite(far) and 0 < far < 1):
        raise FarError(f"{source} {far}: a false-accept rate is in (0, 1)")
    if pairs == 0:
        raise FarError(f"{source}: the gallery holds no impostor pair (images of two "
                       "identities or more are needed)")
    # the rate as written (0.29, not its binary 0.28999...): 0.29 x 100 pairs is 29, where
    # the float product 28.999999999999996 would floor to 28
    above = math.floor(Fraction(str(far)) * pairs)
    if above < 1:
        raise FarError(f"{source} {far:g}: the gallery's {pairs:,} impostor pairs measure no "
                       f"FAR below 1/{pairs:,} = {1 / pairs:.3g}")
    top = _highest_impostor_scores(embeddings, labels, above + 1, progress)
    threshold = float(np.partition(top, len(top) - above - 1)[len(top) - above - 1])
    return FarThreshold(threshold, far, pairs, int((top > threshold).sum()), len(labels),
                        sampled)


def _highest_impostor_scores(x: np.ndarray, labels: np.ndarray, count: int,
                             progress: bool) -> np.ndarray:
    """The ``count`` highest scores of pairs i < j with different labels (float32)."""
    n = len(labels)
    x = np.asarray(x, dtype=np.float32)
    rows = max(1, BLOCK_ELEMENTS // max(n, 1))
    kept = np.zeros(0, np.float32)
    floor = -np.inf  # every score kept from here on is above the count-th highest so far
    for a in tqdm(range(0, n, rows), desc="impostor scores", unit="block", disable=not progress,
                  leave=False):
        b = min(n, a + rows)
        scores = x[a:b] @ x[a:].T
        later = np.arange(a, n)[None, :] > np.arange(a, b)[:, None]
        mask = later & (labels[a:b, None] != labels[None, a:])
        values = scores[mask]
        values = values[values >= floor]
        kept = np.concatenate([kept, values])
        if len(kept) > KEPT_SLACK * count:
            kept = np.partition(kept, len(kept) - count)[len(kept) - count:]
            floor = kept.min()
    return kept


def fpir_threshold(embeddings: np.ndarray, labels: np.ndarray, fpir: float,
                   source: str = "--fpir", max_probes: int = FAR_MAX_IMAGES,
                   progress: bool = True) -> FpirThreshold:
    """The threshold at false positive identification rate ``fpir``: searched with each of
    the unit ``embeddings`` (n, d) as a face of an unknown person against the gallery less
    its own identity (``labels`` (n,)), that fraction of them scores above it; see the
    module docstring."""
    labels = np.asarray(labels)
    n = len(labels)
    if not (math.isfinite(fpir) and 0 < fpir < 1):
        raise FarError(f"{source} {fpir}: a false positive identification rate is in (0, 1)")
    if len(np.unique(labels)) < 2:
        raise FarError(f"{source}: an unknown face is searched against the identities other "
                       f"than the probe's own, and the gallery holds {len(np.unique(labels))} "
                       "(two or more are needed)")
    sampled = n > max_probes
    probe = np.sort(np.random.default_rng(SAMPLE_SEED).permutation(n)[:max_probes]) \
        if sampled else np.arange(n)
    # the rate as written, as far_threshold counts it
    above = math.floor(Fraction(str(fpir)) * len(probe))
    if above < 1:
        raise FarError(f"{source} {fpir:g}: the gallery's {len(probe):,} images searched as "
                       f"unknown faces measure no FPIR below 1/{len(probe):,} = "
                       f"{1 / len(probe):.3g}")
    best = _best_other_identity_scores(embeddings, labels, probe, progress)
    threshold = float(np.partition(best, len(best) - above - 1)[len(best) - above - 1])
    return FpirThreshold(threshold, fpir, len(probe), int((best > threshold).sum()), n,
                         sampled)


def _best_other_identity_scores(x: np.ndarray, labels: np.ndarray, probe: np.ndarray,
                                progress: bool) -> np.ndarray:
    """For each row ``probe`` of ``x``, its highest score with a row of another label
    (float32), a block of the gallery (converted to float32 once) at a time."""
    queries = np.asarray(x[probe], dtype=np.float32)
    query_labels = labels[probe]
    best = np.full(len(probe), -np.inf, np.float32)
    rows = min(len(probe), PROBE_BLOCK_ROWS)
    cols = max(1, BLOCK_ELEMENTS // rows)
    for a in tqdm(range(0, len(labels), cols), desc="unknown-face scores", unit="block",
                  disable=not progress, leave=False):
        block = np.asarray(x[a:a + cols], dtype=np.float32)
        for r in range(0, len(probe), rows):
            scores = queries[r:r + rows] @ block.T
            scores[query_labels[r:r + rows, None] == labels[None, a:a + cols]] = -np.inf
            np.maximum(best[r:r + rows], scores.max(axis=1), out=best[r:r + rows])
    return best
