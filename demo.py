"""`make demo`: the whole pipeline on a laptop CPU, from nothing to a verification report.

    python demo.py                      # what `make demo` runs
    python demo.py --train-identities 20 --max-steps 50 \\
        --data-dir data/demo_small --run-dir runs/demo_small   # a quicker, weaker run

Stages, each reusing what an earlier run finished (folders made with other sizes or seed
are refused: their images, set and run would be reused as this demo's):
  1. generate  synthetic identities (synthetic_faces.py): a training tree and a held-out
               LFW-style tree with pairs.txt, 250x250 in-the-wild images
  2. align     the training tree with MTCNN to 112x112 (align_faces.py)
  3. pack      the aligned tree into RecordIO (pre_process.py --pack)
  4. baseline  the same network, untrained, evaluated on the held-out pairs (lfw_eval.py)
  5. train     ArcFace on the narrow IR net, config preset "demo" (train.py)
  6. evaluate  the trained backbone on the held-out pairs: 10-fold accuracy, TAR@FAR, PNGs
It ends by writing runs/demo/report.json and printing where every output is.

The identities are made from a few public photographs, so the accuracy says the pipeline
works end to end, not how good a face model is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Before torch loads: idle OpenMP threads sleep instead of spinning, which on 2 shared cores
# made MTCNN alignment several times slower (measured with align_faces.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import align_faces
import lfw_eval
import train as train_script
from config import COMMAND_LINE, make_config
from models import build_model
from pre_process import pack_folder
from synthetic import synthetic_faces
from synthetic.synthetic_faces import is_synthetic_name
from utils import (
    CONFIG_FILE,
    OutputConflictError,
    ToolkitError,
    add_debug_flag,
    atomic_write_text,
    claim_output,
    get_logger,
    int_at_least,
    list_images,
    positive_int,
    run_cli,
    save_checkpoint,
    seed_everything,
)

log = get_logger("demo")

DEFAULT_DATA_DIR = "data/demo"
DEFAULT_RUN_DIR = "runs/demo"
REC_NAME = "train.rec"  # the packed training set, inside the data folder
TREE_NAMES = ("train", "lfw")  # the generated identity trees, inside the data folder
RUN_MODEL_NAMES = ("backbone.pt", "checkpoint.pt")  # what a trained run folder holds
# The data set's parameters, in the data folder and the run folder: the demo keeps what a
# folder holds (the generator adds images, never removes), so a rerun must ask for the same
DATA_STAMP = "demo_data.json"

# The demo data set, sized so that the whole demo fits ~10 minutes on 2 CPU cores
# (see README): 200 training identities x 15 images, 100 held-out identities x 10.
TRAIN_IDENTITIES = 200
TRAIN_IMAGES = 15
EVAL_IDENTITIES = 100
EVAL_IMAGES = 10
PRESET = "demo"


@contextmanager
def _stage(title: str, name: str, timings: dict[str, float]) -> Iterator[None]:
    """Announce a stage by its ``title``; once it finishes, its wall time (in seconds) is
    ``timings[name]``."""
    print(f"\n=== {title}", flush=True)
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 1)


def _count_images(root: Path) -> int:
    return len(list_images(root)) if root.is_dir() else 0


def pack_if_needed(aligned_dir: Path, rec_path: Path) -> dict[str, Any]:
    """Pack the aligned tree unless the .rec already holds exactly its images."""
    stamp = rec_path.with_suffix(".pack.json")
    n_images = _count_images(aligned_dir)
    if rec_path.is_file() and stamp.is_file():
        done = json.loads(stamp.read_text())
        if done.get("images") == n_images:
            print(f"reusing {rec_path} ({n_images} images)")
            return done
    summary = pack_folder(aligned_dir, rec_path)
    print(summary.format_summary())
    result = {"images": n_images, "rec": str(rec_path), "packed": summary.images}
    atomic_write_text(stamp, json.dumps(result) + "\n")
    return result


def evaluate(checkpoint: Path, lfw_dir: Path, out_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """Run the LFW evaluation CLI on ``checkpoint``; return its results JSON."""
    status = lfw_eval.main(["--checkpoint", str(checkpoint), "--lfw-dir", str(lfw_dir),
                            "--pairs", str(lfw_dir / "pairs.txt"), "--out", str(out_dir),
                            "--cache-dir", str(cache_dir), "--device", "cpu"])
    if status != 0:
        raise RuntimeError(f"lfw_eval failed on {checkpoint} (exit status {status})")
    return json.loads(lfw_eval.lfw_results_path(out_dir, lfw_dir, lfw_dir / "pairs.txt")
                      .read_text())


def save_untrained(cfg: Any, out_dir: Path) -> Path:
    """The demo network at its initialisation (same seed as training), as backbone.pt."""
    path = out_dir / "backbone.pt"
    if path.is_file():
        return path
    seed_everything(cfg.seed)
    model = build_model(cfg.network, cfg.embedding_size, cfg.dropout)
    cfg.save(out_dir / CONFIG_FILE)
    save_checkpoint(model.state_dict(), path)
    return path


def check_demo_folders(data_dir: Path, run_dir: Path) -> None:
    """Refuse folders the demo did not make, whose files it would replace: a data folder is
    the demo's when every identity folder of its trees has a synthetic name (a real LFW tree
    has others, and its pairs.txt would be rewritten); a run folder is the demo's when it
    holds no model, or one whose config.json names the demo's training set."""
    for tree in (data_dir / name for name in TREE_NAMES):
        found = sorted(p for p in tree.iterdir() if p.is_dir()) if tree.is_dir() else []
        foreign = [p for p in found if not is_synthetic_name(p.name)]
        if foreign:
            raise OutputConflictError(
                f"--data-dir {data_dir}: {foreign[0]} is not one of the demo's synthetic "
                f"identities ({len(foreign)} such folder(s) in {tree}); the demo would add to "
                f"that tree and replace its pairs.txt; give the demo a --data-dir of its own")
    rec = data_dir / REC_NAME
    models = [run_dir / name for name in RUN_MODEL_NAMES if (run_dir / name).exists()]
    if not models:
        return
    config = run_dir / CONFIG_FILE
    try:
        trained_on = json.loads(config.read_text()).get("rec")
    except (OSError, ValueError, AttributeError):
        trained_on = None
    if trained_on is None or Path(trained_on).resolve() != rec.resolve():
        what = f"a model trained on {trained_on}" if trained_on else \
            f"{models[0].name} without a readable {config.name}"
        raise OutputConflictError(f"--run-dir {run_dir}: holds {what}, not on the demo's "
                                  f"{rec}; the demo would replace it; give the demo a "
                                  "--run-dir of its own")


def check_demo_parameters(folders: dict[str, Path], params: dict[str, Any]) -> None:
    """Refuse a folder a demo with other data parameters made (sizes, pairs, seed): its
    earlier images, packed set and trained run would be reused and reported as this demo's;
    then record ``params`` in each folder (one from before this record is taken as it is).
    ``folders``: each folder by the flag that names it."""
    for flag, folder in folders.items():
        stamp = folder / DATA_STAMP
        if not stamp.is_file():
            continue
        try:
            made = json.loads(stamp.read_text())
        except (OSError, ValueError):
            made = None
        made = made if isinstance(made, dict) else {}
        differ = [name for name in params if made.get(name) != params[name]]
        if differ:
            was = ", ".join(f"--{n.replace('_', '-')} {made.get(n)}" for n in differ)
            now = ", ".join(f"{params[n]}" for n in differ)
            raise OutputConflictError(
                f"{flag} {folder}: holds a demo made with {was} (asked: {now}); the demo "
                f"reuses what a folder holds: give it a {flag} of its own, or remove {folder}")
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / DATA_STAMP, json.dumps(params, sort_keys=True) + "\n")


def run_demo(data_dir: str | Path = DEFAULT_DATA_DIR, run_dir: str | Path = DEFAULT_RUN_DIR,
             train_identities: int = TRAIN_IDENTITIES, train_images: int = TRAIN_IMAGES,
             eval_identities: int = EVAL_IDENTITIES, eval_images: int = EVAL_IMAGES,
             pairs_per_fold: int | None = None, seed: int = 0,
             overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every stage; return (and write to ``run_dir/report.json``) the report. Folders the
    demo did not make are refused first (:func:`check_demo_folders`), and one demo at a time
    writes each folder."""
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    check_demo_folders(data_dir, run_dir)
    with claim_output(data_dir, "--data-dir"), claim_output(run_dir, "--run-dir"):
        check_demo_parameters({"--data-dir": data_dir, "--run-dir": run_dir},
                              {"train_identities": train_identities, "train_images": train_images,
                               "eval_identities": eval_identities, "eval_images": eval_images,
                               "pairs_per_fold": pairs_per_fold, "seed": seed})
        return _run_demo(data_dir, run_dir, train_identities, train_images, eval_identities,
                         eval_images, pairs_per_fold, seed, overrides)


def _run_demo(data_dir: Path, run_dir: Path, train_identities: int, train_images: int,
              eval_identities: int, eval_images: int, pairs_per_fold: int | None, seed: int,
              overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The stages of :func:`run_demo`, once its folders are claimed."""
    start = time.perf_counter()
    timings: dict[str, float] = {}
    data = _prepare_data(data_dir, train_identities, train_images, eval_identities,
                         eval_images, pairs_per_fold, seed, timings)
    lfw_dir = Path(data["lfw"])
    cfg = make_config({"rec": data["rec"], "output": str(run_dir), "seed": seed,
                       "device": "cpu", **(overrides or {})}, preset=PRESET)
    cache_dir = data_dir / "lfw_aligned_cache"

    with _stage("4/6 baseline: the untrained network on the held-out pairs", "baseline",
                timings):
        untrained = evaluate(save_untrained(cfg, run_dir / "untrained"), lfw_dir,
                             run_dir / "untrained" / "eval", cache_dir)

    with _stage(f"5/6 train {cfg.network} with ArcFace (preset {PRESET!r})", "train", timings):
        # the demo continues its own run; one killed before its first checkpoint left only logs
        resume = (run_dir / "checkpoint.pt").is_file()
        summary = train_script.train(cfg, resume=resume, overwrite=not resume)

    eval_dir = run_dir / "eval"
    with _stage("6/6 evaluate the trained backbone on the held-out pairs", "evaluate", timings):
        trained = evaluate(run_dir / "backbone.pt", lfw_dir, eval_dir, cache_dir)

    report = {
        "accuracy": trained["accuracy"],
        "accuracy_std": trained["accuracy_std"],
        "threshold": trained["threshold"],
        "auc": trained.get("auc"),
        "tar_at_far_1e-3": trained.get("tar@far=1e-03"),
        "untrained_accuracy": untrained["accuracy"],
        "untrained_accuracy_std": untrained["accuracy_std"],
        "pairs": trained.get("n_pairs"),
        "network": cfg.network,
        "train_steps": summary.get("steps"),
        "train_images_per_second": summary.get("images_per_second"),
        "seconds": round(time.perf_counter() - start, 1),
        "stage_seconds": timings,
        "data": data,
        "outputs": {"backbone": str(run_dir / "backbone.pt"), "eval": str(eval_dir),
                    "curves": str(run_dir / "training_curves.png"),
                    "tensorboard": str(run_dir)},
    }
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    print_summary(report, run_dir)
    return report


def _prepare_data(data_dir: Path, train_identities: int, train_images: int,
                  eval_identities: int, eval_images: int, pairs_per_fold: int | None,
                  seed: int, timings: dict[str, float]) -> dict[str, str]:
    """Stages 1 to 3: generate the synthetic trees, align the training tree, pack it; the
    paths of what they made (the report's "data")."""
    with _stage("1/6 generate synthetic identities", "generate", timings):
        generated = synthetic_faces.generate_dataset(
            data_dir, train_identities=train_identities, train_images=train_images,
            eval_identities=eval_identities, eval_images=eval_images,
            pairs_per_fold=pairs_per_fold, seed=seed)

    aligned_dir = data_dir / "train_aligned"
    with _stage("2/6 align the training identities (MTCNN, 112x112)", "align", timings):
        aligned = align_faces.align_tree(generated["train_dir"], aligned_dir)
        print(align_faces.format_summary(aligned))

    rec_path = data_dir / REC_NAME
    with _stage("3/6 pack into RecordIO", "pack", timings):
        pack_if_needed(aligned_dir, rec_path)
    return {"train": generated["train_dir"], "aligned": str(aligned_dir), "rec": str(rec_path),
            "lfw": str(Path(generated["lfw_dir"])), "pairs": generated["pairs"]}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def print_summary(report: dict[str, Any], run_dir: Path) -> None:
    out = report["outputs"]
    print("\n" + "=" * 72)
    print(f"held-out 10-fold accuracy : {_pct(report['accuracy'])} "
          f"+- {_pct(report['accuracy_std'])}  ({report['pairs']} pairs)")
    print(f"untrained, same pairs     : {_pct(report['untrained_accuracy'])}")
    print(f"TAR @ FAR=1e-3            : {_pct(report['tar_at_far_1e-3'])}")
    print(f"total time                : {report['seconds']:.0f} s  {report['stage_seconds']}")
    print(f"report                    : {run_dir / 'report.json'}")
    print(f"backbone                  : {out['backbone']}")
    print(f"ROC / histogram / errors  : {out['eval']}/lfw_*.png")
    print(f"training curves           : {out['curves']}")
    print(f"TensorBoard               : tensorboard --logdir {out['tensorboard']}")
    print(f"training data             : {report['data']['rec']}")
    print("=" * 72)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(parser)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR)
    parser.add_argument("--train-identities", type=positive_int, default=TRAIN_IDENTITIES)
    parser.add_argument("--train-images", type=positive_int, default=TRAIN_IMAGES)
    # pairs.txt needs a different pair (2 identities) and a same pair (2 images of one)
    parser.add_argument("--eval-identities", type=int_at_least(2), default=EVAL_IDENTITIES)
    parser.add_argument("--eval-images", type=int_at_least(2), default=EVAL_IMAGES)
    parser.add_argument("--pairs-per-fold", type=positive_int, default=None)
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override the preset")
    parser.add_argument("--max-steps", type=int, default=None, help="stop training early")
    parser.add_argument("--batch-size", type=int, default=None, help="override the preset")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("max_steps", args.max_steps),
                                   ("batch_size", args.batch_size)) if v is not None}
    # the training overrides meet Config's ranges now, not after minutes of data preparation
    make_config(overrides, preset=PRESET, overrides_source=COMMAND_LINE)
    try:
        run_demo(args.data_dir, args.run_dir, args.train_identities, args.train_images,
                 args.eval_identities, args.eval_images, args.pairs_per_fold, args.seed,
                 overrides)
    except ToolkitError:  # one line from run_cli
        raise
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        log.error("demo stopped: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
