"""Scoring face-verification pairs from their similarities: LFW's 10-fold protocol and ROC.

Pure NumPy (float64), vectorised: 6,000 pairs score in milliseconds. The decision rule
throughout is "same iff cosine similarity > threshold". Folds are LFW's contiguous blocks by
default, or any assignment of pairs to folds (``folds=``, e.g. a pairs file's own or
:func:`stratified_folds` for a single set of pairs); every fold must hold both kinds of pair,
and its threshold is always tuned on the other folds only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from utils import ToolkitError

FARS = (1e-3, 1e-4)  # TAR is reported at these false accept rates when there are enough pairs
DEFAULT_FOLDS = 10  # LFW's view 2 and InsightFace's .bin sets: 10-fold cross-validation
THRESHOLD_RULE = "same iff cosine similarity > threshold"
FAR_EPS = 1e-9  # guards floor(far * n) against 1e-6 * 1e6 = 0.99999...


class VerificationError(ToolkitError, ValueError):
    """Similarities and labels that cannot be scored as asked (NaN scores, a fold or a set
    without both kinds of pair); the message says which."""


def pair_similarities(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity of consecutive rows (2i, 2i+1) of L2-normalised embeddings."""
    return np.einsum("ij,ij->i", embeddings[0::2].astype(np.float64),
                     embeddings[1::2].astype(np.float64))


# ----------------------------------------------------------------------------- 10-fold protocol

def _best_threshold(sims: np.ndarray, same: np.ndarray) -> float:
    """The threshold with the highest accuracy on (sims, same) under "same iff sim > t",
    over every distinct decision: below the lowest value (all same), midway between each two
    consecutive distinct values, and the highest value (all different). Ties in accuracy go
    to the lowest threshold."""
    order = np.argsort(sims, kind="stable")
    s, y = sims[order], same[order]
    n = s.size
    # A decision is "the k lowest scores are called different"; only k at the end of a run
    # of equal scores is realisable with a threshold.
    cuts = np.concatenate(([0], np.flatnonzero(np.diff(s) > 0) + 1, [n]))
    diff_below = np.concatenate(([0], np.cumsum(~y)))
    same_below = np.concatenate(([0], np.cumsum(y)))
    correct = diff_below[cuts] + (same_below[-1] - same_below[cuts])
    k = int(cuts[int(np.argmax(correct))])
    if k == 0:
        return float(np.nextafter(s[0], -np.inf))
    if k == n:
        return float(s[-1])
    low, high = float(s[k - 1]), float(s[k])
    mid = (low + high) / 2
    return mid if low <= mid < high else low  # adjacent floats: the midpoint rounds to one end


def stratified_folds(issame: np.ndarray, nfolds: int = DEFAULT_FOLDS) -> np.ndarray:
    """Fold index per pair for a single set of pairs (no folds of its own): the i-th same
    pair and the i-th different pair go to fold ``i mod nfolds``, so every fold holds both
    kinds in the set's proportions, in file order (deterministic, no shuffling)."""
    same = np.asarray(issame, dtype=bool).reshape(-1)
    n_same, n_diff = int(same.sum()), int((~same).sum())
    if min(n_same, n_diff) < nfolds:
        raise VerificationError(f"{nfolds} stratified folds need at least {nfolds} pairs of "
                                f"each kind; there are {n_same} same and {n_diff} different")
    folds = np.empty(same.size, dtype=np.int64)
    folds[same] = np.arange(n_same) % nfolds
    folds[~same] = np.arange(n_diff) % nfolds
    return folds


def _check_folds(same: np.ndarray, folds: np.ndarray) -> list[np.ndarray]:
    """The pairs of each fold, refusing a fold without both kinds: its accuracy would not
    measure a threshold, and a one-kind training set cannot place one."""
    members = [np.flatnonzero(folds == f) for f in np.unique(folds)]
    if len(members) < 2:
        raise VerificationError(f"need at least 2 folds, got {len(members)}")
    for k, m in enumerate(members):
        n_same = int(same[m].sum())
        if n_same in (0, m.size):
            kind = "same" if n_same else "different"
            raise VerificationError(f"fold {k + 1} holds only {kind}-person pairs ({m.size}): "
                                    "each fold needs both kinds (a single set of pairs needs "
                                    "stratified folds)")
    return members


def contiguous_folds(n_pairs: int, nfolds: int = DEFAULT_FOLDS) -> np.ndarray:
    """Fold index per pair for ``nfolds`` contiguous blocks (LFW's and the .bin sets' order)."""
    if nfolds < 2 or n_pairs < nfolds:
        raise VerificationError(f"need at least 2 folds and one pair per fold: {n_pairs} pairs, "
                                f"{nfolds} folds")
    return np.repeat(np.arange(nfolds), [len(b) for b in np.array_split(np.arange(n_pairs),
                                                                         nfolds)])


def folds_have_both_kinds(issame: np.ndarray, folds: np.ndarray) -> bool:
    """Whether every fold holds at least one same and one different pair."""
    same = np.asarray(issame, dtype=bool).reshape(-1)
    return all(0 < same[folds == f].sum() < (folds == f).sum() for f in np.unique(folds))


def ten_fold_details(similarities: np.ndarray, issame: np.ndarray,
                     nfolds: int = DEFAULT_FOLDS,
                     folds: np.ndarray | None = None) -> dict[str, Any]:
    """Per-fold thresholds (tuned on the other folds) and accuracies; see ten_fold_accuracy.
    ``folds`` (fold index per pair) replaces the ``nfolds`` contiguous blocks."""
    sims = np.asarray(similarities, dtype=np.float64).reshape(-1)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    if sims.shape != same.shape:
        raise VerificationError(f"{sims.size} similarities but {same.size} labels")
    if not np.all(np.isfinite(sims)):
        raise VerificationError(f"{int((~np.isfinite(sims)).sum())} similarities are NaN or "
                                "infinite (non-finite embeddings: is the checkpoint diverged?)")
    fold_of = contiguous_folds(sims.size, nfolds) if folds is None \
        else np.asarray(folds).reshape(-1)
    if fold_of.shape != sims.shape:
        raise VerificationError(f"{fold_of.size} fold indices for {sims.size} pairs")
    accuracies, thresholds = [], []
    for test in _check_folds(same, fold_of):
        train = np.ones(sims.size, dtype=bool)
        train[test] = False  # never tune on the fold being scored
        t = _best_threshold(sims[train], same[train])
        accuracies.append(float(np.mean((sims[test] > t) == same[test])))
        thresholds.append(t)
    return {"nfolds": len(accuracies), "fold_accuracies": accuracies,
            "fold_thresholds": thresholds, "accuracy": float(np.mean(accuracies)),
            "accuracy_std": float(np.std(accuracies)), "threshold": float(np.mean(thresholds))}


def ten_fold_accuracy(similarities: np.ndarray, issame: np.ndarray,
                      nfolds: int = DEFAULT_FOLDS) -> tuple[float, float, float]:
    """LFW's protocol: (mean accuracy, std over folds (population), mean threshold).

    Folds are ``nfolds`` contiguous blocks of the pair list. Each is scored with the
    threshold maximising accuracy on the other folds, searched over every distinct decision
    point (midpoints between consecutive distinct scores, plus both ends; accuracy ties go
    to the lowest threshold). A pair is predicted "same" when its similarity is > threshold."""
    d = ten_fold_details(similarities, issame, nfolds)
    return d["accuracy"], d["accuracy_std"], d["threshold"]


# ----------------------------------------------------------------------------- ROC

def tar_key(far: float, what: str = "tar") -> str:
    """The results key of ``what`` (TAR, or its threshold) at ``far``: ``tar@far=1e-03``."""
    return f"{what}@far={far:.0e}"


def far_measurable(far: float, num_impostors: int) -> bool:
    """Whether ``num_impostors`` back a TAR at FAR ``far``: at least 1 / far of them (fewer
    allow no false accept at all, so the TAR would be that of FAR 0). Every script's rule."""
    return num_impostors * far >= 1 - FAR_EPS  # the same float guard as floor(far * n)


def impostors_needed(far: float) -> int:
    """The fewest impostor pairs that measure FAR ``far`` (:func:`far_measurable`)."""
    return math.ceil((1 - FAR_EPS) / far)


def not_measured(far: float, impostors: str = "impostor pairs") -> str:
    """What the results JSON and every printed table say in place of an unmeasurable TAR
    (or TPIR: ``impostors`` names what the rate is over, e.g. "non-mated probes")."""
    return f"n/a (needs >= {impostors_needed(far):,} {impostors})"


def roc_curve(similarities: np.ndarray, issame: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FAR, TAR, thresholds) at every distinct score, from (0, 0): accepting scores >= t."""
    sims = np.asarray(similarities, dtype=np.float64).reshape(-1)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    n_gen, n_imp = int(same.sum()), int((~same).sum())
    if n_gen == 0 or n_imp == 0:
        raise VerificationError(f"ROC needs genuine and impostor pairs ({n_gen} and {n_imp} given)")
    order = np.argsort(-sims, kind="stable")
    s, y = sims[order], same[order]
    ends = np.concatenate((np.flatnonzero(np.diff(s) < 0), [s.size - 1]))  # last of each run
    tar = np.concatenate(([0.0], np.cumsum(y)[ends] / n_gen))
    far = np.concatenate(([0.0], np.cumsum(~y)[ends] / n_imp))
    thresholds = np.concatenate(([np.inf], s[ends]))
    return far, tar, thresholds


def tar_at_far_from_top(genuine: np.ndarray, impostor_desc: np.ndarray, num_impostors: int,
                        far: float) -> tuple[float | None, float]:
    """(TAR, threshold) at FAR ``far`` from the genuine scores and the largest impostor scores
    in descending order (at least floor(far * num_impostors) + 1 of them, or all).

    Threshold = the (a+1)-th largest impostor score with a = floor(far * num_impostors); a pair
    is accepted when its score is strictly above it, so at most a impostors are accepted
    (exactly a without ties). -inf when a >= num_impostors: every pair is accepted. TAR is
    None without genuine scores."""
    allowed = int(math.floor(far * num_impostors + FAR_EPS))  # false accepts allowed
    if allowed >= num_impostors:
        threshold = -math.inf
    elif allowed >= len(impostor_desc):
        raise ValueError(f"need the top {allowed + 1} impostor scores, got {len(impostor_desc)}")
    else:
        threshold = float(impostor_desc[allowed])
    genuine = np.asarray(genuine)
    tar = float(np.count_nonzero(genuine > threshold) / genuine.size) if genuine.size else None
    return tar, threshold


def tar_at_far(similarities: np.ndarray, issame: np.ndarray, far: float) -> tuple[float, float]:
    """(TAR, threshold) at the lowest threshold whose FAR (impostors > threshold) <= ``far``;
    when ``far`` allows every impostor, the threshold stays finite: just below the lowest."""
    sims = np.asarray(similarities, dtype=np.float64).reshape(-1)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    genuine, impostors = sims[same], np.sort(sims[~same])[::-1]
    tar, threshold = tar_at_far_from_top(genuine, impostors, impostors.size, far)
    if threshold == -math.inf:
        threshold = float(np.nextafter(impostors[-1], -np.inf))
        tar = float(np.mean(genuine > threshold))
    return (math.nan if tar is None else tar), threshold


def roc_metrics(similarities: np.ndarray, issame: np.ndarray,
                fars: Sequence[float] = FARS) -> dict[str, Any]:
    """AUC and TAR@FAR for each FAR with at least 1/FAR impostor pairs (:func:`far_measurable`).

    Keys: ``auc``, ``tar@far=1e-03`` and ``threshold@far=1e-03`` (etc.), ``n_genuine``,
    ``n_impostor``; ``not_measured``: {``tar@far=1e-04``: :func:`not_measured`'s text} for
    each FAR too few impostors back (its TAR keys are absent). AUC counts score ties as half
    (the trapezoidal ROC area)."""
    sims = np.asarray(similarities, dtype=np.float64).reshape(-1)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    far_curve, tar_curve, _ = roc_curve(sims, same)
    n_imp = int((~same).sum())
    out: dict[str, Any] = {"auc": float(np.trapezoid(tar_curve, far_curve)),
                           "n_genuine": int(same.sum()), "n_impostor": n_imp}
    out["not_measured"] = {}
    for far in fars:
        if far_measurable(far, n_imp):
            tar, threshold = tar_at_far(sims, same, far)
            out[tar_key(far)] = tar
            out[tar_key(far, "threshold")] = threshold
        else:
            out["not_measured"][tar_key(far)] = not_measured(far)
    return out
