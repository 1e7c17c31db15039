"""Held-out accuracy of each margin head on the demo data, with `make demo`'s recipe.

Every head trains the `demo` preset (ir_narrow, 128-D, s=32, m=0.3 ramped, 8 epochs, batch
64, cosine lr) on `make demo`'s training set for each seed, then is scored on its held-out
LFW-style pairs (10-fold accuracy, TAR@FAR=1e-3) by `lfw_eval.py`, as the demo scores ArcFace.
Only the head changes (MagFace has no m: its margin function keeps its paper's range). The
data is what `make demo` made: run it first.

    make demo && python bench/head_accuracy.py                 # 6 heads x 3 seeds
    python bench/head_accuracy.py --heads arcface adaface --seeds 0

The demo's identities all come from two photos: the table compares heads on one small, odd
data set, not on faces at large.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import demo  # noqa: E402
import train  # noqa: E402
from config import HEAD_NAMES, make_config  # noqa: E402

DEFAULT_HEADS = ("arcface", "cosface", "adaface", "curricularface", "magface",
                 "elasticface-arc")
DEFAULT_SEEDS = (0, 1, 2)


def run_one(head: str, seed: int, data_dir: Path, runs: Path) -> dict[str, float]:
    """Train the demo recipe with ``head`` and ``seed``; its held-out scores and train time."""
    out = runs / head / f"seed{seed}"
    cfg = make_config({"rec": str(data_dir / "train.rec"), "output": str(out), "seed": seed,
                       "device": "cpu", "head": head}, preset=demo.PRESET)
    start = time.perf_counter()
    train.train(cfg, overwrite=True)
    seconds = time.perf_counter() - start
    lfw_dir = data_dir / "lfw"
    result = demo.evaluate(out / "backbone.pt", lfw_dir, out / "eval",
                           data_dir / "lfw_aligned_cache")
    return {"accuracy": result["accuracy"], "tar": result.get("tar@far=1e-03") or float("nan"),
            "seconds": seconds}


def print_table(rows: dict[str, list[dict[str, float]]]) -> None:
    print(f"\n{'head':<16} {'seeds':>5} {'accuracy (mean +- sd)':>24} {'TAR@1e-3':>9} "
          f"{'train s':>8}")
    for head, runs in rows.items():
        acc = [100 * r["accuracy"] for r in runs]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        tar = statistics.mean(100 * r["tar"] for r in runs)
        secs = statistics.mean(r["seconds"] for r in runs)
        print(f"{head:<16} {len(runs):>5} {statistics.mean(acc):>15.2f}% +- {spread:4.2f}% "
              f"{tar:>8.2f}% {secs:>8.0f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(demo.DEFAULT_DATA_DIR),
                        help="what `make demo` made (train.rec, lfw/)")
    parser.add_argument("--runs", type=Path, default=Path("runs/head_accuracy"))
    parser.add_argument("--heads", nargs="+", choices=HEAD_NAMES, default=list(DEFAULT_HEADS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    args = parser.parse_args(argv)
    if not (args.data_dir / "train.rec").is_file():
        parser.error(f"{args.data_dir}/train.rec not found: run `make demo` first")
    rows: dict[str, list[dict[str, float]]] = {}
    for head in args.heads:
        for seed in args.seeds:
            rows.setdefault(head, []).append(run_one(head, seed, args.data_dir, args.runs))
            print_table(rows)  # the table so far, after every run
    return 0


if __name__ == "__main__":
    sys.exit(main())
