"""The decision threshold at a false-accept rate, from a gallery's own impostor scores.

The impostor pairs are every pair of enrolled images of different identities: N = n(n-1)/2
less each identity's m(m-1)/2. At FAR f the threshold T is the (floor(f N) + 1)-th highest
impostor score, so that floor(f N) pairs score above it (fewer where scores tie at T) and a
search accepts a match scoring strictly above T. A FAR below 1/N rests on no pair and is
refused. The scores are computed exactly, block by block, keeping only the highest; past
FAR_MAX_IMAGES images (n^2/2 products of 512-D vectors) a seeded sample of that many images
stands for the gallery, and the result says so.
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


class FarError(ToolkitError, ValueError):
    """A false-accept rate the gallery cannot measure; the message says why."""


@dataclass
class FarThreshold:
    threshold: float
    far: float
    pairs: int  # impostor pairs the threshold rests on
    above: int  # of them scoring above the threshold
    images: int  # images those pairs are made of
    sampled: bool  # the images are a sample of the gallery


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
