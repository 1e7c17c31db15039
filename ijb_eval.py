"""IJB-B and IJB-C, the benchmark face papers headline: 1:1 verification (TAR at FAR 1e-6 ..
1e-1) and 1:N open-set identification, from the official release files as InsightFace packs
them (ijb_release.py lists the layout).

    python ijb_eval.py --checkpoint runs/x/backbone.pt --ijb-dir data/IJB_release/IJBC \\
        --target IJBC --out runs/x/ijbc

Protocol (InsightFace's, which the published numbers use):
1. Each loose crop is aligned with its own five landmarks (no detection) to 112x112 and
   embedded with its mirror. Both raw embeddings are cached on disk in chunks (resumable,
   atomic), so a second run, or another mode, starts from the cache.
2. Template features: an image's feature is the raw embedding plus its mirror's (F1; F0: the
   image's alone), kept unnormalised so its norm weighs it (N1, use_norm_score of ijb_11.py
   and arcface_torch's eval_ijbc.py; N0 L2-normalises it; InsightFace's later ijb_evals.py
   names N the other way round, its default N0D1F1 is this N1D1F1), times its faceness score
   (D1); features are averaged within each media of a template, summed over the template's
   media, then L2-normalised.
3. 1:1: a pair scores the cosine of its two templates. TAR@FAR=f is the fraction of genuine
   pairs scoring above t, t the smallest threshold with at most floor(f x impostors) impostors
   above it (verification_metrics.tar_at_far_from_top). InsightFace's convention, the TPR of
   the point of sklearn's ROC whose FPR is nearest to f (the last one of equally near points),
   is reported beside it.
4. 1:N (NIST's open-set search): each gallery (IJB-C G1, G2; IJB-B S1, S2) is searched by all
   mixed probes; a probe is mated when its subject is in that gallery. Rank of a mated probe =
   1 + the non-mate templates scoring strictly above its best mate; rank-k rates are over the
   mated probes. TPIR@FPIR=f: t is the smallest threshold with at most floor(f x non-mated
   probes) non-mated top scores above it; TPIR is the fraction of mated probes whose mate is
   rank 1 and scores above t. InsightFace's merged-gallery ranks are reported for comparison.

``--quality`` writes ``<target>_quality.csv`` (image, norm) beside the results: each image's
quality, the L2 norm of its own raw embedding in the cache (not its mirror's; MagFace trains
it), so no image is embedded again; the results get its summary.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from config import build_parser, parse_config
from evaluation import ijb_features
from evaluation.ijb_features import mode_features
from evaluation.ijb_release import TARGETS, IJBFormatError, Release, load_release
from evaluation.ijb_report import MERGED, format_table, plot_cmc
from evaluation.verification import quality_summary
from evaluation.verification_metrics import (
    FAR_EPS,
    far_measurable,
    not_measured,
    tar_at_far_from_top,
)
from evaluation.verification_plots import plot_roc_curves
from utils import (
    FOLDER,
    atomic_write_text,
    checkpoint_record,
    claim_output,
    get_device,
    get_logger,
    positive_int,
    run_cli,
)

__all__ = [
    "IJBFormatError", "parse_mode", "template_features", "verification_scores",
    "tar_at_far", "tar_at_far_nearest", "verification_report", "identification",
    "search_report", "release_templates", "evaluate_templates", "evaluate_features", "main",
]

VERIFICATION_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
IDENTIFICATION_RANKS = (1, 5, 10)
IDENTIFICATION_FPIRS = (0.01, 0.1)
CMC_MAX_RANK = 50  # the CMC curve (JSON and PNG) goes to this rank
DEFAULT_MODE = "N1D1F1"  # InsightFace's best mode, the one papers quote
# What the N letter means, written into every results file: results written before it was
# recorded (2026-12-05) meant the opposite by N (their N1 normalised the image features)
MODE_LETTERS = "N1 = ijb_11.py's use_norm_score: image features not normalised"
MODE_PATTERN = re.compile(r"^N([01])D([01])F([01])$")
ALL_MODES = tuple(f"N{n}D{d}F{f}" for n in (0, 1) for d in (0, 1) for f in (0, 1))
# The 1:1 scores come from blocks of the template Gram matrix of at most this many entries
# (float32: 320 MB); IJB-C's 3,531 x 19,593 used templates (69M) fit in one block.
SCORE_BLOCK_ENTRIES = 80 * 2**20
LOOKUP_MAX_SPAN = 1 << 26  # template ids spanning less use a lookup table (int32: 256 MB max)
NORM_CHUNK_ROWS = 8192  # rows per chunk when row norms are computed (bounds the temporary)
SEARCH_CHUNK_PROBES = 4096  # probes scored against a gallery at a time
NONMATED = "non-mated probes"  # what a TPIR@FPIR is measured over
ROC_PLOT_POINTS = 200  # the ROC figure: TAR@FAR at this many log-spaced FARs
NEAREST_WINDOW = 64  # impostor counts first searched either side of FAR x n (then doubled)
QUALITY_PRINTED = 3  # the lowest-quality images the printout names (the CSV has them all)
ZERO_FACENESS_LISTED = 100  # images with faceness 0 named in the results (the count is whole)

log = get_logger("ijb_eval")


# ----------------------------------------------------------------------------- template features

def parse_mode(mode: str) -> tuple[bool, bool, bool]:
    """``N1D1F1`` -> (keep each image's norm as its weight, weight by faceness, add the
    mirror's). N1 is InsightFace's use_norm_score: its images are NOT normalised (N0 does)."""
    m = MODE_PATTERN.match(mode)
    if m is None:
        raise IJBFormatError(f"mode {mode!r} is not N<0|1>D<0|1>F<0|1> (e.g. {DEFAULT_MODE})")
    return m.group(1) == "1", m.group(2) == "1", m.group(3) == "1"


def _row_norms(feats: np.ndarray) -> np.ndarray:
    """L2 norms of the rows, chunk by chunk (no full-size temporary). Accumulated in the
    features' own float32, as InsightFace does: a relative error near 1e-7, and a third of
    the time of float64 (70 against 190 ms for IJB-C)."""
    norms = np.empty(len(feats), np.float64)
    for s in range(0, len(feats), NORM_CHUNK_ROWS):
        chunk = feats[s:s + NORM_CHUNK_ROWS]
        norms[s:s + len(chunk)] = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))
    return norms


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit rows; a zero row stays zero (as sklearn's normalize, which InsightFace uses)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def template_features(image_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      faceness: np.ndarray | None = None, normalize: bool = True
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(template ids sorted ascending, (T, D) float32 unit rows).

    Each image's feature is L2-normalised (``normalize``, mode N0) and multiplied by its
    ``faceness`` (given: mode D1); the features of one media of a template are averaged and
    the media means summed, then normalised. Done as one sparse (T x N) pooling matrix times
    ``image_feats``, which is only read, never copied (IJB-C's is 1 GB)."""
    feats = np.asarray(image_feats)
    if feats.ndim != 2:
        raise ValueError(f"image features must be (N, D), got shape {feats.shape}")
    n = feats.shape[0]
    templates = np.asarray(templates, np.int64).reshape(-1)
    medias = np.asarray(medias, np.int64).reshape(-1)
    if templates.size != n or medias.size != n:
        raise ValueError(f"{n} image features but {templates.size} templates and "
                         f"{medias.size} medias")
    template_ids, t_row = np.unique(templates, return_inverse=True)
    _, m_row = np.unique(medias, return_inverse=True)
    # One group per (template, media); every image weighs 1 / (images in its group).
    _, group, group_size = np.unique(t_row * (int(m_row.max(initial=0)) + 1) + m_row,
                                     return_inverse=True, return_counts=True)
    weight = 1.0 / group_size[group]
    if normalize:
        norms = _row_norms(feats)
        weight = np.divide(weight, norms, out=np.zeros(n), where=norms > 0)
    if faceness is not None:
        weight = weight * np.asarray(faceness, np.float64).reshape(-1)
    pool = sp.csr_matrix((weight.astype(np.float32), (t_row, np.arange(n))),
                         shape=(template_ids.size, n))
    if feats.dtype != np.float32:
        feats = feats.astype(np.float32)
    pooled = np.asarray(pool @ feats, np.float64)  # float32 operands: no upcast copy of feats
    return template_ids, _normalize_rows(pooled).astype(np.float32)


# ----------------------------------------------------------------------------- 1:1 verification

def _rows_of(template_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(N,) int32 row of each id in the ascending ``template_ids``; ValueError naming the
    first id that has none. A lookup table over the id range when that is small (IJB-C's
    ids span 200k), else a binary search (15.7M searches cost ~1 s, the table ~0.1 s)."""
    lo, hi = int(template_ids[0]), int(template_ids[-1])
    if hi - lo < LOOKUP_MAX_SPAN:
        table = np.full(hi - lo + 1, -1, np.int32)
        table[template_ids - lo] = np.arange(template_ids.size, dtype=np.int32)
        offset = ids - lo
        np.clip(offset, 0, hi - lo, out=offset)  # out of range: any row; caught below
        rows = table[offset]
        del offset
    else:
        rows = np.searchsorted(template_ids, ids).astype(np.int32)
        np.minimum(rows, template_ids.size - 1, out=rows)
    missing = np.flatnonzero(template_ids[rows] != ids)  # row -1 reads hi, never equal
    if missing.size:
        raise ValueError(f"{missing.size} pair templates have no feature, e.g. "
                         f"{ids[missing[0]]} (pair {missing[0] + 1})")
    return rows


def _compress(rows: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows used, ascending; each entry's int32 position among them), in O(N)."""
    used = np.zeros(size, bool)
    used[rows] = True
    position = (np.cumsum(used) - 1).astype(np.int32)
    return np.flatnonzero(used), position[rows]


def verification_scores(template_ids: np.ndarray, template_feats: np.ndarray,
                        t1: np.ndarray, t2: np.ndarray) -> np.ndarray:
    """(P,) float32 cosine of each pair's template features (unit rows of ``template_feats``,
    ordered as the ascending ``template_ids``).

    Pairs are read from blocks of the Gram matrix of the templates they use (a matrix
    product, not P row gathers): IJB-C's 15.7M pairs use 3,531 x 19,593 templates, one
    block of 277 MB."""
    ids = np.asarray(template_ids, np.int64)
    feats = np.asarray(template_feats, np.float32)
    t1, t2 = np.asarray(t1).reshape(-1), np.asarray(t2).reshape(-1)  # int32 ids stay int32
    if t1.size != t2.size:
        raise ValueError(f"{t1.size} first templates but {t2.size} second templates")
    u1, c1 = _compress(_rows_of(ids, t1), ids.size)
    u2, c2 = _compress(_rows_of(ids, t2), ids.size)
    if u1.size > u2.size:  # the cosine is symmetric: block over the smaller side
        u1, c1, u2, c2 = u2, c2, u1, c1
    right = feats[u2].T.copy()  # (D, U2)
    scores = np.empty(c1.size, np.float32)
    block = max(1, SCORE_BLOCK_ENTRIES // max(u2.size, 1))
    if u1.size <= block:
        _gather(feats[u1] @ right, c1, c2, scores)
        return scores
    # Pairs grouped by block: a stable sort of small integer keys (radix sort, O(P)).
    keys = c1 // block
    keys = keys.astype(np.uint16 if keys.max() < np.iinfo(np.uint16).max else np.int64)
    order = np.argsort(keys, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(np.bincount(keys, minlength=-(-u1.size // block)))))
    for b, start in enumerate(range(0, u1.size, block)):
        idx = order[bounds[b]:bounds[b + 1]]
        scores[idx] = _gather(feats[u1[start:start + block]] @ right, c1[idx] - start, c2[idx])
    return scores


def _gather(gram: np.ndarray, rows: np.ndarray, cols: np.ndarray,
            out: np.ndarray | None = None) -> np.ndarray:
    """gram[rows, cols] through one flat index (np.take: twice as fast as 2-D indexing)."""
    flat = rows.astype(np.int64)
    flat *= gram.shape[1]
    flat += cols
    return np.take(gram.ravel(), flat, out=out)


def _split_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores).reshape(-1)
    same = np.asarray(labels, bool).reshape(-1)
    if scores.shape != same.shape:
        raise ValueError(f"{scores.size} scores but {same.size} labels")
    genuine, impostor = scores[same], scores[~same]
    if genuine.size == 0 or impostor.size == 0:
        raise ValueError(f"need genuine and impostor pairs ({genuine.size} and "
                         f"{impostor.size} given)")
    return genuine, impostor


def _top_descending(values: np.ndarray, k: int) -> np.ndarray:
    """The k largest values, largest first (a partition, then a sort of k values)."""
    k = min(k, values.size)
    if k == 0:
        return values[:0]
    top = np.partition(values, values.size - k)[values.size - k:]
    return np.sort(top)[::-1]


def tar_at_far(scores: np.ndarray, labels: np.ndarray,
               fars: Sequence[float] = VERIFICATION_FARS) -> dict[float, float]:
    """{far: TAR}: the fraction of genuine pairs scoring above the smallest threshold that at
    most floor(far x impostors) impostor pairs score above (verification_metrics'
    definition, shared with LFW's TAR@FAR). Only the top impostor scores are sorted."""
    genuine, impostor = _split_scores(scores, labels)
    need = int(math.floor(max(fars) * impostor.size + FAR_EPS)) + 1
    top = _top_descending(impostor, need)
    return {far: tar_at_far_from_top(genuine, top, impostor.size, far)[0] for far in fars}


def _sorted_split(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) scores, each sorted ascending (impostors sorted in place in their
    own copy: 62 MB for IJB-C, where an argsort of all scores would need ten times that)."""
    genuine, impostor = _split_scores(scores, labels)
    genuine.sort()
    impostor.sort()
    return genuine, impostor


def _kept_counts(genuine: np.ndarray, impostor: np.ndarray, ks: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """For impostor counts ``ks`` (0 .. n; sorted scores): (whether sklearn's roc_curve keeps a
    point with that FAR count, the genuine count of the last such point).

    The points with count k >= 1 sit at the k-th largest impostor score and at each distinct
    genuine score between it and the (k+1)-th; the last has #(genuine > the (k+1)-th). With
    two or more the last is a corner, kept; a lone one is dropped (drop_intermediate) when
    both count steps into it equal those out of it, unless it is the curve's first or last.
    Count 0 is always there (the origin sklearn prepends)."""
    n, g = impostor.size, genuine.size
    desc = impostor[::-1]
    above = np.where(ks >= 1, desc[np.clip(ks - 1, 0, n - 1)], np.inf)  # the k-th largest
    below = np.where(ks < n, desc[np.clip(ks, 0, n - 1)], -np.inf)  # the (k+1)-th
    tps_last = g - np.searchsorted(genuine, below, side="right")
    distinct = np.unique(genuine)
    between = np.searchsorted(distinct, above, "left") - np.searchsorted(distinct, below, "right")
    fps_prev = n - np.searchsorted(impostor, above, "right")  # the point just above: > above
    tps_prev = g - np.searchsorted(genuine, above, "right")
    tps_lone = g - np.searchsorted(genuine, above, "left")
    fps_next = n - np.searchsorted(impostor, below, "left")  # the point at ``below``
    tps_next = g - np.searchsorted(genuine, below, "left")
    collinear = ((ks - fps_prev == fps_next - ks) & (tps_lone - tps_prev == tps_next - tps_lone)
                 & (fps_prev + tps_prev > 0) & (ks < n))  # first and last points are kept
    kept = (ks == 0) | ((above > below) & ((between > 0) | ~collinear))
    return kept, tps_last


def _nearest_tar(genuine: np.ndarray, impostor: np.ndarray, far: float) -> float:
    """ijb_11.py's TAR at ``far`` from the sorted scores, without building the curve: the TPR
    of the point of sklearn's roc_curve (default drop_intermediate, origin prepended) whose
    FPR is nearest to ``far``, of equally near points the last (it reads the flipped curve:
    "select largest tpr at same fpr"). The kept counts are searched in a window around
    far x n, widened until no count outside it can be as near."""
    n = impostor.size
    target = far * n
    width = NEAREST_WINDOW
    while True:
        lo, hi = max(0, math.floor(target) - width), min(n, math.ceil(target) + width)
        ks = np.arange(lo, hi + 1)
        kept, tps = _kept_counts(genuine, impostor, ks)
        distance = np.abs(ks / n - far)
        best = distance[kept].min(initial=math.inf)  # a window inside a run may keep none
        outside = [abs(k / n - far) for k in (lo - 1, hi + 1) if 0 <= k <= n]
        if all(d > best for d in outside):  # counts 0 and n are kept: this ends
            k = int(np.flatnonzero(kept & (distance == best))[-1])  # the last of the nearest
            return int(tps[k]) / genuine.size
        width *= 2


def tar_at_far_nearest(scores: np.ndarray, labels: np.ndarray,
                       fars: Sequence[float] = VERIFICATION_FARS) -> dict[float, float]:
    """{far: TAR} by InsightFace's convention (ijb_11.py's table): the TPR of the point of
    sklearn's roc_curve whose FPR is nearest to far; the last such point on a tie."""
    genuine, impostor = _sorted_split(scores, labels)
    return {far: _nearest_tar(genuine, impostor, far) for far in fars}


def _auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """The area under the ROC with ties as diagonal steps (the trapezoidal area of
    verification_metrics.roc_curve) = P(genuine > impostor) + P(equal) / 2."""
    below = np.searchsorted(impostor, genuine, side="left").astype(np.float64)
    equal = np.searchsorted(impostor, genuine, side="right") - below
    return float((below.sum() + equal.sum() / 2) / (genuine.size * impostor.size))


def verification_report(scores: np.ndarray, labels: np.ndarray,
                        fars: Sequence[float] = VERIFICATION_FARS
                        ) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """(the JSON "verification" block, the TAR@FAR curve (FARs, TARs) at ROC_PLOT_POINTS
    log-spaced FARs for the figure). A FAR with fewer than 1/FAR impostor pairs is reported
    as null (it cannot be measured), its reason in ``not_measured``. One sort of the impostor
    scores serves all of it."""
    genuine, impostor = _sorted_split(scores, labels)
    n_imp = impostor.size
    desc = impostor[::-1]
    measurable = [f for f in fars if far_measurable(f, n_imp)]
    report = {
        "num_genuine": int(genuine.size), "num_impostor": int(n_imp),
        "tar_at_far": {_far_key(f): (tar_at_far_from_top(genuine, desc, n_imp, f)[0]
                                     if f in measurable else None) for f in fars},
        "tar_at_far_nearest": {_far_key(f): (_nearest_tar(genuine, impostor, f)
                                             if f in measurable else None) for f in fars},
        "not_measured": {_far_key(f): not_measured(f) for f in fars if f not in measurable},
        "auc": _auc(genuine, impostor),
    }
    grid = np.logspace(math.log10(1 / n_imp), 0, ROC_PLOT_POINTS)
    curve = np.array([tar_at_far_from_top(genuine, desc, n_imp, f)[0] for f in grid])
    return report, (grid, curve)


def _far_key(far: float) -> str:
    return f"{far:.0e}"


# ----------------------------------------------------------------------------- 1:N identification

def _search(probe_feats: np.ndarray, probe_subjects: np.ndarray, gallery_feats: np.ndarray,
            gallery_subjects: np.ndarray, groups: Sequence[slice]
            ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each group of gallery columns searched by every probe, from one matrix product:
    per group and probe (rank of the best mate, 0 when unmated; best mate score; top
    score). Float32 throughout: the definitions apply to the scores as computed."""
    probes = np.asarray(probe_feats, np.float32)
    gallery = np.asarray(gallery_feats, np.float32)
    p_subj = np.asarray(probe_subjects).reshape(-1)
    g_subj = np.asarray(gallery_subjects).reshape(-1)
    if probes.shape[0] != p_subj.size or gallery.shape[0] != g_subj.size:
        raise ValueError("one subject per probe and per gallery template is needed")
    out = [(np.zeros(p_subj.size, np.int64), np.full(p_subj.size, -np.inf, np.float32),
            np.full(p_subj.size, -np.inf, np.float32)) for _ in groups]
    for s in range(0, p_subj.size, SEARCH_CHUNK_PROBES):
        rows = slice(s, s + SEARCH_CHUNK_PROBES)
        all_sims = probes[rows] @ gallery.T
        all_mates = p_subj[rows, None] == g_subj[None, :]
        for (rank, mate, top), cols in zip(out, groups, strict=True):
            sims, is_mate = all_sims[:, cols], all_mates[:, cols]
            best = np.where(is_mate, sims, -np.inf).max(axis=1, initial=-np.inf)
            above = np.count_nonzero((sims > best[:, None]) & ~is_mate, axis=1)
            rank[rows] = np.where(is_mate.any(axis=1), above + 1, 0)
            mate[rows] = best
            top[rows] = sims.max(axis=1, initial=-np.inf)
    return out


def _rates_from_search(rank: np.ndarray, mate: np.ndarray, top: np.ndarray, gallery_size: int,
                       ranks: Sequence[int], fpirs: Sequence[float]) -> dict[str, Any]:
    mated = rank > 0
    if not mated.any():
        raise ValueError("no probe has a mate in the gallery")
    mated_rank = rank[mated]
    out: dict[str, Any] = {
        "rank": {r: float(np.mean(mated_rank <= r)) for r in ranks},
        "tpir": {}, "threshold": {},
        "num_mated": int(mated.sum()), "num_nonmated": int((~mated).sum()),
    }
    max_rank = min(CMC_MAX_RANK, gallery_size)
    counts = np.bincount(np.minimum(mated_rank, max_rank + 1), minlength=max_rank + 2)
    out["cmc"] = (np.cumsum(counts)[1:max_rank + 1] / mated_rank.size).tolist()
    nonmated_top = top[~mated]
    if nonmated_top.size and fpirs:
        # A mated probe is a true positive when its mate is rank 1 and above t.
        hits = np.where(mated_rank == 1, mate[mated], -np.inf)
        need = int(math.floor(max(fpirs) * nonmated_top.size + FAR_EPS)) + 1
        desc = _top_descending(nonmated_top, need)
        for f in fpirs:
            tpir, threshold = tar_at_far_from_top(hits, desc, nonmated_top.size, f)
            out["tpir"][f] = tpir
            out["threshold"][f] = threshold
    return out


def identification(probe_feats: np.ndarray, probe_subjects: np.ndarray,
                   gallery_feats: np.ndarray, gallery_subjects: np.ndarray,
                   ranks: Sequence[int] = IDENTIFICATION_RANKS,
                   fpirs: Sequence[float] = IDENTIFICATION_FPIRS) -> dict[str, Any]:
    """Open-set search of unit probe features against unit gallery features (NIST's rules,
    see the module docstring): {"rank": {r: rate over mated probes}, "tpir": {fpir: TPIR}
    (empty without non-mated probes), "threshold": {fpir: t}, "num_mated",
    "num_nonmated", "cmc": rates at ranks 1 .. min(CMC_MAX_RANK, gallery size)}."""
    size = len(np.asarray(gallery_subjects).reshape(-1))
    (found,) = _search(probe_feats, probe_subjects, gallery_feats, gallery_subjects,
                       [slice(0, size)])
    return _rates_from_search(*found, size, ranks, fpirs)


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def _rates(d: dict) -> dict[str, Any]:
    """JSON keys: ranks and FPIRs as strings ("1", "0.01")."""
    return {str(k): v for k, v in d.items()}


def search_report(template_ids: np.ndarray, template_feats: np.ndarray,
                  search: dict[str, tuple[np.ndarray, np.ndarray]], galleries: Sequence[str]
                  ) -> dict[str, Any]:
    """The JSON "identification" block: each gallery searched by the mixed probes, their
    mean, and InsightFace's merged-gallery ranks."""
    def feats_of(ids: np.ndarray) -> np.ndarray:
        return template_feats[_rows_of(template_ids, ids)]

    probe_ids, probe_subjects = search["probe"]
    merged_ids = np.concatenate([search[g][0] for g in galleries])
    merged_subjects = np.concatenate([search[g][1] for g in galleries])
    # one probe x merged-gallery product serves each gallery (its columns) and the merge
    bounds = np.cumsum([0] + [search[g][0].size for g in galleries]).tolist()
    groups = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    found = _search(feats_of(probe_ids), probe_subjects, feats_of(merged_ids),
                    merged_subjects, [*groups, slice(0, bounds[-1])])
    out: dict[str, Any] = {}
    for g, cols, result in zip(galleries, groups, found, strict=False):
        r = _rates_from_search(*result, cols.stop - cols.start, IDENTIFICATION_RANKS,
                               IDENTIFICATION_FPIRS)
        # as for TAR@FAR: an FPIR with fewer than 1/FPIR non-mated probes is not measurable
        tpir = {f: (r["tpir"].get(f) if far_measurable(f, r["num_nonmated"]) else None)
                for f in IDENTIFICATION_FPIRS}
        out[g] = {"rank": _rates(r["rank"]), "tpir_at_fpir": _rates(tpir),
                  "not_measured": _rates({f: not_measured(f, NONMATED) for f, v in tpir.items()
                                          if v is None}),
                  # null where the FPIR is not measurable, as its TPIR
                  "threshold_at_fpir": _rates({f: (t if tpir.get(f) is not None else None)
                                               for f, t in r["threshold"].items()}),
                  "num_gallery": cols.stop - cols.start,
                  "num_mated": r["num_mated"], "num_nonmated": r["num_nonmated"],
                  "cmc": r["cmc"]}
    out["mean"] = {kind: {k: _mean([out[g][kind][k] for g in galleries])
                          for k in out[galleries[0]][kind]}
                   for kind in ("rank", "tpir_at_fpir")}
    merged = _rates_from_search(*found[-1], bounds[-1], IDENTIFICATION_RANKS, ())
    out[MERGED] = {"rank": _rates(merged["rank"]), "num_mated": merged["num_mated"]}
    return out


def release_templates(image_feats: np.ndarray, release: Release, mode: str = DEFAULT_MODE
                      ) -> tuple[np.ndarray, np.ndarray]:
    """template_features of every template of ``release`` in ``mode`` (N and D; the F part
    is already in ``image_feats``: ijb_features.mode_features)."""
    use_norm, detector, _ = parse_mode(mode)
    return template_features(image_feats, release.templates, release.medias,
                             release.faceness if detector else None, normalize=not use_norm)


def evaluate_templates(template_ids: np.ndarray, template_feats: np.ndarray, release: Release,
                       mode: str = DEFAULT_MODE
                       ) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """1:1 and 1:N from the template features: (results of ``mode``, the ROC (FAR, TAR))."""
    scores = verification_scores(template_ids, template_feats, release.pairs_t1,
                                 release.pairs_t2)
    verification, roc = verification_report(scores, release.pairs_label)
    del scores
    results: dict[str, Any] = {"mode": mode, "templates": int(template_ids.size),
                               "verification": verification}
    if release.search:
        results["identification"] = search_report(template_ids, template_feats, release.search,
                                                  TARGETS[release.target][1])
    return results, roc


def evaluate_features(image_feats: np.ndarray, release: Release, mode: str = DEFAULT_MODE
                      ) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """The protocol from per-image features: release_templates, then evaluate_templates."""
    ids, feats = release_templates(image_feats, release, mode)
    return evaluate_templates(ids, feats, release, mode)


# ----------------------------------------------------------------------------- CLI

def build_arg_parser() -> argparse.ArgumentParser:
    parser = build_parser(__doc__.split("\n\n")[0],
                          only=["batch_size", "device", "network", "embedding_size"])
    group = parser.add_argument_group("ijb_eval")
    group.add_argument("--checkpoint", required=True,
                       help="backbone.pt or a training checkpoint (config.json beside it "
                            "names the network unless --network is given)")
    group.add_argument("--ijb-dir", required=True,
                       help="the release folder of one target, e.g. data/IJB_release/IJBC")
    group.add_argument("--target", choices=sorted(TARGETS), default=None,
                       help="IJBB or IJBC; if omitted, the name of --ijb-dir")
    group.add_argument("--out", default=None,
                       help="output folder; if omitted, <checkpoint folder>/<target>")
    group.add_argument("--modes", nargs="+", default=[DEFAULT_MODE], metavar="MODE",
                       help=f"InsightFace's modes N<0|1>D<0|1>F<0|1> (image features "
                            f"weighted by their norm (N0: normalised), by faceness, plus the "
                            f"mirror's), or 'all'; "
                            f"the first is the headline (default {DEFAULT_MODE})")
    group.add_argument("--cache-dir", default=None,
                       help="image-feature cache; if omitted, <out>/features")
    group.add_argument("--quality", action="store_true",
                       help="also write <target>_quality.csv: each image's quality, the norm "
                            "of its own unnormalised embedding (MagFace trains it)")
    group.add_argument("--workers", type=positive_int, default=None,
                       help="threads reading and aligning the crops (default 4)")
    return parser


def _target_of(args: argparse.Namespace) -> str:
    if args.target:
        return args.target
    name = Path(args.ijb_dir).name.upper()
    if name not in TARGETS:
        raise IJBFormatError(f"{args.ijb_dir}: cannot tell the target from the folder name; "
                             f"pass --target {' or '.join(TARGETS)}")
    return name


def _modes_of(args: argparse.Namespace) -> list[str]:
    modes = list(ALL_MODES) if args.modes == ["all"] else list(dict.fromkeys(args.modes))
    for m in modes:
        parse_mode(m)
    return modes


def image_feature_chunks(cfg, args: argparse.Namespace, release: Release,
                         out_dir: Path) -> list[Path]:
    """The cache's chunk files, embedding whatever is missing (the model is only loaded
    then)."""
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    cache_root = Path(args.cache_dir) if args.cache_dir else out_dir / "features"
    folder = cache_root / ijb_features.cache_key(release, checkpoint, args.network,
                                                 args.embedding_size)
    missing = ijb_features.missing_chunks(release, folder)
    embed = None
    if missing:
        ijb_features.check_crops_exist(release, missing)  # before the model is built
        from models import load_backbone  # torch loads only when some features are not cached

        device = get_device(cfg.device)
        # an unknown network or weights that do not fit: load_backbone's one-line error
        model = load_backbone(checkpoint, network=args.network,
                              embedding_size=args.embedding_size).to(device).eval()

        def embed(crops: np.ndarray) -> np.ndarray:
            return ijb_features.embed_raw(model, crops, cfg.batch_size, device)
    else:
        log.info("image features from the cache %s", folder)
    workers = args.workers if args.workers is not None else ijb_features.DEFAULT_WORKERS
    return ijb_features.cached_features(release, folder, embed, workers=workers,
                                        checkpoint=checkpoint)


def image_qualities(chunks: list[Path], total: int) -> np.ndarray:
    """(N,) float64 L2 norm of each image's own raw embedding, read chunk by chunk from the
    feature cache (its [:, 0]; [:, 1] is the mirror's)."""
    norms = [np.linalg.norm(chunk[:, 0].astype(np.float64), axis=1)
             for chunk in ijb_features.iter_chunks(chunks)]
    norms = np.concatenate(norms) if norms else np.zeros(0)
    if norms.size != total:
        raise ValueError(f"feature cache holds {norms.size} images, expected {total}")
    return norms


def write_quality(chunks: list[Path], release: Release, path: Path) -> dict[str, Any]:
    """``path``: a CSV of (image, norm) per image of ``release``; returns the quality_summary
    (mean, min, max, the lowest images by name)."""
    norms = image_qualities(chunks, len(release.names))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "norm"])
    writer.writerows((name, f"{norm:.9g}") for name, norm in zip(release.names, norms,
                                                                  strict=True))
    atomic_write_text(path, buf.getvalue())
    return quality_summary(norms, release.names)


def _quality_line(q: dict[str, Any], path: str) -> str:
    lowest = ", ".join(f"{e['image']} ({e['norm']:.3f})" for e in q["lowest"][:QUALITY_PRINTED])
    return (f"quality (embedding norm) of {q['images']} images: mean {q['mean']:.3f}, min "
            f"{q['min']:.3f}, max {q['max']:.3f}; lowest: {lowest}; per image: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: prints the table, writes <out>/<target>_results.json and figures."""
    cfg, args = parse_config(argv, parser=build_arg_parser())
    target = _target_of(args)
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).parent / target.lower()
    inputs = {"--ijb-dir": args.ijb_dir, "--checkpoint": args.checkpoint}
    # before any work, one writer of each: the results and the features' cache
    with claim_output(out_dir, "--out", inputs, FOLDER), \
            claim_output(args.cache_dir or out_dir / "features", "--cache-dir", inputs, FOLDER):
        return run_evaluation(cfg, args, target, out_dir)


def run_evaluation(cfg: Any, args: argparse.Namespace, target: str, out_dir: Path) -> int:
    """What :func:`main` does once its output folder is claimed."""
    modes = _modes_of(args)
    release = load_release(args.ijb_dir, target)
    chunks = image_feature_chunks(cfg, args, release, out_dir)
    runs, curves = [], {}
    for mode in modes:
        feats = mode_features(chunks, parse_mode(mode)[2], len(release.names))
        ids, template_feats = release_templates(feats, release, mode)
        del feats  # 1 GB for IJB-C: gone before the pairs are scored
        r, curves[mode] = evaluate_templates(ids, template_feats, release, mode)
        runs.append({"target": target, "images": len(release.names), **r})
    prefix = TARGETS[target][0]
    files = {"roc": str(plot_roc_curves(curves, out_dir / f"{prefix}_roc.png",
                                        f"{target} 1:1 verification"))}
    if "identification" in runs[0]:
        files["cmc"] = str(plot_cmc(runs[0]["identification"], TARGETS[target][1],
                                    out_dir / f"{prefix}_cmc.png",
                                    f"{target} 1:N identification ({modes[0]})"))
    results = dict(runs[0])
    if args.quality:
        files["quality"] = str(out_dir / f"{prefix}_quality.csv")
        results["quality"] = write_quality(chunks, release, Path(files["quality"]))
    results.update({**checkpoint_record(args.checkpoint), "ijb_dir": str(args.ijb_dir),
                    "files": files, "mode_letters": MODE_LETTERS})
    # faceness 0 gives an image no weight in the D1 modes: how many the result stands without
    results["zero_faceness"] = {"images": len(release.zero_faceness),
                                "first": release.zero_faceness[:ZERO_FACENESS_LISTED]}
    if len(runs) > 1:
        results["modes"] = {r["mode"]: {k: r[k] for k in ("verification", "identification")
                                        if k in r} for r in runs}
    results_path = out_dir / f"{prefix}_results.json"
    atomic_write_text(results_path, json.dumps(results, indent=2) + "\n")
    print(format_table(target, runs))
    if args.quality:
        print(_quality_line(results["quality"], files["quality"]))
    print(f"results: {results_path}")
    print("figures: " + ", ".join(v for k, v in files.items() if k != "quality"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
