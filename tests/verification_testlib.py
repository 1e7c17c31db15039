"""An independent reference for the k-fold verification protocol (plain loops, nothing shared
with verification_metrics.py), used by the tests of verification_metrics and lfw_eval."""

from __future__ import annotations

import math


def brute_force_folds(sims, same, fold_of):
    """The k-fold protocol written out: for each fold (in increasing order), every candidate
    threshold (below the lowest training score, each midpoint of consecutive distinct
    training scores, the highest) is tried on the OTHER folds only; the first best one
    (lowest) scores the fold. Returns (per-fold accuracies, per-fold thresholds)."""
    accs, thresholds = [], []
    for f in sorted(set(fold_of)):
        train = [i for i in range(len(sims)) if fold_of[i] != f]
        test = [i for i in range(len(sims)) if fold_of[i] == f]
        values = sorted({float(sims[i]) for i in train})
        candidates = [math.nextafter(values[0], -math.inf)]
        candidates += [(a + b) / 2 for a, b in zip(values, values[1:], strict=False)]
        candidates.append(values[-1])
        best_t, best = None, -1
        for t in candidates:
            correct = sum((float(sims[i]) > t) == bool(same[i]) for i in train)
            if correct > best:
                best_t, best = t, correct
        # no decision is missed: trying every score value too never does better
        for t in values:
            assert sum((float(sims[i]) > t) == bool(same[i]) for i in train) <= best
        accs.append(sum((float(sims[i]) > best_t) == bool(same[i]) for i in test) / len(test))
        thresholds.append(best_t)
    return accs, thresholds
