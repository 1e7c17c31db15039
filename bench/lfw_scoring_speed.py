"""Seconds to score LFW-sized verification pairs from their similarities.

    python bench/lfw_scoring_speed.py [--pairs 6000] [--repeats 20]

Synthetic similarities (genuine ~ N(0.55, 0.15), impostor ~ N(0.05, 0.12), float32 as
embeddings give them), scored by the exact 10-fold protocol (every decision point) and the
ROC metrics, next to one np.sort of the same array as a baseline in the same run, and to the
coarse 400-threshold grid search InsightFace's verification code uses (for context: it is
what the exact search replaces). Median of the repeats; a table, never an assert.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's modules, not us

from evaluation.verification_metrics import roc_metrics, ten_fold_accuracy  # noqa: E402
from utils import int_at_least, positive_int  # noqa: E402

GENUINE = (0.55, 0.15)
IMPOSTOR = (0.05, 0.12)
GRID_STEPS = 400  # InsightFace: thresholds np.arange(0, 4, 0.01) on squared distance
NFOLDS = 10
MIN_PAIRS = 2 * NFOLDS  # every fold needs a same and a different pair (they alternate)


def grid_ten_fold(sims: np.ndarray, same: np.ndarray, nfolds: int = NFOLDS) -> float:
    """The coarse-grid 10-fold accuracy (threshold on a fixed grid), vectorised."""
    thresholds = np.linspace(-1.0, 1.0, GRID_STEPS)
    folds = np.array_split(np.arange(sims.size), nfolds)
    predictions = sims[None, :] > thresholds[:, None]  # (grid, pairs)
    correct = predictions == same[None, :]
    accs = []
    for test in folds:
        train = np.ones(sims.size, bool)
        train[test] = False
        best = int(np.argmax(correct[:, train].sum(1)))
        accs.append(correct[best, test].mean())
    return float(np.mean(accs))


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int_at_least(MIN_PAIRS), default=6000)
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    same = np.arange(args.pairs) % 2 == 0
    sims = np.where(same, rng.normal(*GENUINE, args.pairs),
                    rng.normal(*IMPOSTOR, args.pairs)).astype(np.float32)
    rows = [
        ("np.sort (baseline)", lambda: np.sort(sims)),
        ("ten_fold_accuracy (exact)", lambda: ten_fold_accuracy(sims, same)),
        ("roc_metrics", lambda: roc_metrics(sims, same)),
        ("ten_fold + roc", lambda: (ten_fold_accuracy(sims, same), roc_metrics(sims, same))),
        (f"grid search ({GRID_STEPS} thr.)", lambda: grid_ten_fold(sims, same)),
    ]
    results = [(name, _median_seconds(fn, args.repeats)) for name, fn in rows]
    base = results[0][1]
    acc, std, thr = ten_fold_accuracy(sims, same)
    print(f"{args.pairs} pairs, median of {args.repeats} runs")
    print(f"{'step':<28} {'seconds':>10} {'x np.sort':>10}")
    for name, seconds in results:
        print(f"{name:<28} {seconds:>10.5f} {seconds / base:>10.1f}")
    print(f"exact 10-fold accuracy {100 * acc:.2f} +- {100 * std:.2f}% (threshold {thr:.4f}); "
          f"grid {100 * grid_ten_fold(sims, same):.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
