"""Face verification the way the papers report it: LFW's 10-fold protocol, InsightFace's .bin
verification sets, and a two-photo comparison.

    python lfw_eval.py --checkpoint runs/x/backbone.pt --lfw-dir data/lfw --pairs data/lfw/pairs.txt
    python lfw_eval.py --checkpoint runs/x/backbone.pt --bin data/faces_emore/lfw.bin --bin ...
    python lfw_eval.py --checkpoint runs/x/backbone.pt --compare a.jpg b.jpg

This module loads, embeds, scores and reports: flip-TTA embeddings, the folds and the
protocol's numbers, the results JSON and figures, ``--compare``, the command line. The pairs
file format is ``lfw_pairs.py``; aligning the raw LFW images it names (with an on-disk crop
cache) is ``lfw_images.py``.

Protocol (``ten_fold_accuracy``): every fold is scored with the threshold that maximises
accuracy on the OTHER folds (never on the pairs being scored), searched over every distinct
decision point; a pair is called "same" when its cosine similarity is strictly greater than
the threshold. The reported threshold is the mean of the folds'. Embeddings use flip
test-time augmentation (image + mirror, then L2-normalised). The folds:

* ``pairs.txt`` with a header ``<folds> <n>`` (LFW's view 2: ``10 300``): the file's own
  folds, each n same + n different pairs; the printout and results say how many
  (a ``2 300`` file is scored and reported as 2-fold).
* a single set of pairs, header ``<n>`` (LFW's view 1 ``pairsDevTrain.txt`` /
  ``pairsDevTest.txt``: n same then n different pairs) or ``1 <n>``: it has no folds, and
  cutting it into blocks would give all-same and all-different folds. It is scored by
  stratified 10-fold cross-validation (the i-th same and the i-th different pair go to fold
  i mod 10, so every fold holds both kinds; fewer folds when a kind has fewer than 10 pairs),
  labelled as such; ROC AUC and TAR@FAR need no threshold at all.
* ``.bin`` sets: 10 contiguous blocks (InsightFace's layout, each block holding both kinds);
  a set whose blocks do not hold both kinds gets stratified folds instead, with a warning.

Provenance: every results file records the checkpoint by content (``checkpoint_sha256``)
and the set (``pairs`` with ``pairs_sha256``, or ``bin`` with ``bin_sha256``). Raw LFW's
results are ``<out>/lfw_<hash of its image folder and pairs file paths>_results.json``
(:func:`lfw_results_path`), a ``.bin`` set's ``<stem>_<hash of its path>_results.json``, so
no set overwrites or mixes with another's. ``--compare`` uses the threshold of the LFW
results made from the same checkpoint content (not from a model since replaced under that
name): those of ``--lfw-dir`` / ``--pairs`` when they exist, else the only such results in
the folder (several sets: it names them and asks for ``--pairs``).

``--quality``: the results also hold each evaluated image's quality (``quality``), the L2
norm of the unnormalised embedding of the image itself, not its mirror (MagFace trains it):
mean, min, max, the lowest (raw LFW's by path, a ``.bin`` set's by index) and every image's;
the printout gives one line of it.

Bad input (a missing or binary pairs file, a header that promises more or fewer pairs than
the file holds, a line with the wrong number of fields, a truncated or foreign ``.bin``, a
non-finite ``--threshold`` or one outside cosine's [-1, 1]) is a one-line ``error: ...``
naming the file (and line) with a non-zero exit. A raw LFW image that cannot be decoded is
refused the same way (the count and the first files named): a score on fewer pairs is not
the protocol's number. ``--skip-unreadable`` scores the other pairs instead, and the
printout and results (``unreadable_images``, ``pairs_left_out``) name what was left out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from config import build_parser, parse_config
from evaluation.bin_loader import load_bin
from evaluation.lfw_images import (
    as_crop,
    default_cache_dir,
    distinct_images,
    load_lfw_crops,
    readable_pairs,
)
from evaluation.lfw_pairs import MAX_NAMED, check_pairs_exist, parse_pairs
from evaluation.verification import (
    LfwEvalError,
    embed,
    evaluate_bin,
    evaluate_verification,
    pairs_file_folds,
)
from evaluation.verification_metrics import (
    FARS,
    pair_similarities,
    roc_curve,
    roc_metrics,
    tar_at_far,
    tar_key,
    ten_fold_accuracy,
    ten_fold_details,
)
from utils import (
    CHECKPOINT_HASH_KEY,
    FOLDER,
    ImageReadError,
    ToolkitError,
    can_write_in,
    check_output,
    checkpoint_record,
    claim_output,
    file_sha256,
    first_few,
    get_device,
    get_logger,
    read_image,
    require_same_checkpoint,
    run_cli,
    short_hash,
)

__all__ = [
    "embed", "ten_fold_accuracy", "ten_fold_details", "roc_curve", "roc_metrics",
    "evaluate_verification", "load_bin", "evaluate_bin", "compare_images", "pair_similarities",
    "tar_at_far", "lfw_results_path", "main",
]

LFW_RESULTS_NAME = "lfw"  # raw LFW's results are lfw_<set hash>_results.json (lfw_results_path)
RESULTS_SUFFIX = "_results.json"
# --compare's remedy when the saved threshold is not this checkpoint's
RERUN_LFW = "run the LFW evaluation of this checkpoint first, or pass --threshold"
EXIT_NO_FACE = 3  # --compare: a photo without a face (1 is bad input, run_cli's)
EXIT_NO_THRESHOLD = 4  # --compare: no LFW results to take a threshold from
SUMMARY_FAR = 1e-3  # the FAR of the --bin summary table's TAR column (LFW-sized sets back it)
COSINE_RANGE = (-1.0, 1.0)  # a threshold outside it gives the same verdict for every pair
QUALITY_PRINTED = 3  # the lowest-quality images the printout names (the results hold more)

log = get_logger("lfw_eval")


# ----------------------------------------------------------------------------- embeddings


# ----------------------------------------------------------------------------- evaluation


# ----------------------------------------------------------------------------- compare

def compare_images(model, image_a: np.ndarray, image_b: np.ndarray, aligner=None,
                   device=None) -> tuple[float | None, list[int]]:
    """Cosine similarity of the faces in two RGB photos (flip TTA), or (None, indices of the
    photos without a face)."""
    if aligner is None:
        # faces.aligner loads torch (~2 s), which lfw_eval.py --help does without
        from faces.aligner import FaceAligner

        aligner = FaceAligner(device=device)
    faces = [aligner.align(image_a), aligner.align(image_b)]
    faceless = [i for i, face in enumerate(faces) if face is None]
    if faceless:
        return None, faceless
    crops = np.stack([as_crop(f.crop, f"photo {i + 1}") for i, f in enumerate(faces)])
    feats = embed(model, crops, device=device, progress=False)
    return float(pair_similarities(feats)[0]), []


def check_threshold(value: float, source: str) -> float:
    """A cosine-similarity threshold: LfwEvalError unless finite and within [-1, 1] (NaN
    would call every pair "different", anything outside the range every pair one way)."""
    low, high = COSINE_RANGE
    if not (math.isfinite(value) and low <= value <= high):
        raise LfwEvalError(f"{source}: threshold {value} is not a cosine similarity: give a "
                           f"finite number in [{low:g}, {high:g}]")
    return value


def lfw_results_stem(lfw_dir: str | Path, pairs: str | Path) -> str:
    """The file names of raw LFW's results: ``lfw_`` and a short hash of the resolved image
    folder and pairs file, so another pairs file (view 1, a subset) or another image tree
    never overwrites this set's results, while the same set evaluated again replaces its
    own."""
    key = f"{Path(lfw_dir).resolve()}\n{Path(pairs).resolve()}"
    return f"{LFW_RESULTS_NAME}_{short_hash(key)}"


def lfw_results_path(out_dir: str | Path, lfw_dir: str | Path, pairs: str | Path) -> Path:
    """Where ``lfw_eval.py --out out_dir`` writes the results of raw LFW ``lfw_dir`` scored
    on ``pairs`` (the demo reads them there)."""
    return Path(out_dir) / f"{lfw_results_stem(lfw_dir, pairs)}{RESULTS_SUFFIX}"


def _read_results(path: Path) -> dict[str, Any]:
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise TypeError(f"holds a {type(saved).__name__}, not an object")
        saved["threshold"] = float(saved["threshold"])
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise LfwEvalError(f"{path}: no usable 'threshold' in this results file ({e})") \
            from None
    check_threshold(saved["threshold"], str(path))
    return saved


def _lfw_results_in(out_dir: Path) -> list[Path]:
    """Raw LFW's results files in ``out_dir`` (a ``.bin`` set named lfw's are not: they
    record ``bin``), including the ``lfw_results.json`` of versions before the set hash."""
    found = sorted(out_dir.glob(f"{LFW_RESULTS_NAME}*{RESULTS_SUFFIX}"))
    return [p for p in found if "bin" not in _read_results(p)]


def _saved_threshold(out_dir: Path, checkpoint: Path, lfw_dir: str | Path,
                     pairs: str | Path) -> tuple[float, Path] | None:
    """The threshold of the LFW results in ``out_dir`` made from ``checkpoint``'s content:
    those of ``lfw_dir`` + ``pairs`` if they exist, else the only ones there. None when
    there are none; ProvenanceError when they were not made from ``checkpoint`` (a run
    retrained with --overwrite keeps the old model's eval/) or do not say what they were
    made from; LfwEvalError when several sets' results fit and none is ``pairs``."""
    own = lfw_results_path(out_dir, lfw_dir, pairs)
    found = [own] if own.is_file() else _lfw_results_in(out_dir)
    if not found:
        return None
    if len(found) > 1:
        current = file_sha256(checkpoint)
        found = [p for p in found
                 if _read_results(p).get(CHECKPOINT_HASH_KEY) == current] or found[:1]
    if len(found) > 1:
        sets = "; ".join(f"{p.name} ({_read_results(p).get('pairs', '?')})" for p in found)
        raise LfwEvalError(f"{out_dir}: holds the LFW results of {len(found)} pairs files "
                           f"for {checkpoint}: {sets}; name the one to use with --lfw-dir "
                           "and --pairs, or pass --threshold")
    saved = _read_results(found[0])
    require_same_checkpoint(saved, found[0], checkpoint, RERUN_LFW)
    return saved["threshold"], found[0]


# ----------------------------------------------------------------------------- CLI

def build_arg_parser() -> argparse.ArgumentParser:
    parser = build_parser(__doc__.split("\n\n")[0],
                          only=["batch_size", "device", "lfw_dir", "pairs", "network",
                                "embedding_size"])
    parser.epilog = (
        "Folds: a pairs.txt with header '<folds> <n>' (LFW's '10 300') is scored on its own "
        "folds and reported as <folds>-fold; a single set (header '<n>', e.g. "
        "pairsDevTest.txt) by stratified 10-fold cross-validation (each fold holds both "
        "kinds; thresholds are always tuned on the other folds, never on the pairs scored), "
        "said in the printout and in the results' 'folds' field; .bin sets: 10 contiguous "
        "blocks.")
    group = parser.add_argument_group("lfw_eval")
    group.add_argument("--checkpoint", required=True,
                       help="backbone.pt or a training checkpoint (config.json beside it "
                            "names the network unless --network is given)")
    group.add_argument("--bin", action="append", default=[], metavar="PATH",
                       help="InsightFace verification .bin set; repeat for several")
    group.add_argument("--compare", nargs=2, metavar=("A", "B"),
                       help="compare the faces in two photos")
    group.add_argument("--threshold", type=float, default=None,
                       help="decision threshold for --compare, a cosine similarity in "
                            "[-1, 1]; if omitted, the one saved by the last LFW evaluation "
                            "in the output folder")
    group.add_argument("--out", default=None,
                       help="output folder; if omitted, <checkpoint folder>/eval")
    group.add_argument("--quality", action="store_true",
                       help="also record each evaluated image's quality, the norm of its "
                            "unnormalised embedding (MagFace trains it), in the results: "
                            "mean, min, max, the lowest by name (.bin: by index), per image")
    group.add_argument("--skip-unreadable", action="store_true",
                       help="score the pairs whose raw LFW images all decode, leaving out "
                            "those with an unreadable image (recorded in the results: "
                            "unreadable_images, pairs_left_out); without it they are refused")
    group.add_argument("--cache-dir", default=None,
                       help="aligned-crop cache for raw LFW; if omitted, <lfw-dir>_aligned_cache, "
                            "or under ~/.cache/arcface-toolkit/ where LFW is read-only")
    return parser


def _load_model(args, device):
    # torch loads with the model: --help and argument errors stay quick
    from models import load_backbone

    model = load_backbone(args.checkpoint, network=args.network,
                          embedding_size=args.embedding_size)
    return model.to(device).eval()


def _print_results(r: dict[str, Any]) -> None:
    print(f"{r['name']}: {r['nfolds']}-fold accuracy {100 * r['accuracy']:.2f} +- "
          f"{100 * r['accuracy_std']:.2f}%  (threshold {r['threshold']:.4f}, "
          f"{r['n_pairs']} pairs, AUC {r['auc']:.4f})")
    print(f"  folds: {r['folds']}")
    for far in FARS:
        print(f"  TAR@FAR={far:.0e}: {_tar_text(r, far)}")
    if "quality" in r:
        q = r["quality"]
        lowest = ", ".join(f"{_image_label(e['image'])} ({e['norm']:.3f})"
                           for e in q["lowest"][:QUALITY_PRINTED])
        print(f"  quality (embedding norm) of {q['images']} images: mean {q['mean']:.3f}, "
              f"min {q['min']:.3f}, max {q['max']:.3f}; lowest: {lowest}")


def _image_label(image: str | int) -> str:
    """An image as the quality line names it: raw LFW's by path, a .bin set's by #index."""
    return image if isinstance(image, str) else f"#{image}"


def _tar_text(r: dict[str, Any], far: float) -> str:
    """The TAR at ``far`` as the results JSON has it: a percentage, or its not-measured text
    with the impostor count."""
    if tar_key(far) in r:
        return f"{100 * r[tar_key(far)]:.2f}%"
    return f"{r['not_measured'][tar_key(far)]}, {r['n_impostor']:,} here"


def _run_compare(cfg, args, model, device, out_dir: Path) -> int:
    photos, errors = [], []
    for p in args.compare:
        try:
            photos.append(read_image(p))
        except ToolkitError as e:  # ImageReadError
            errors.append(str(e))
    if errors:  # both named at once, on one line
        raise LfwEvalError("; ".join(errors))
    sim, faceless = compare_images(model, photos[0], photos[1], device=device)
    if faceless:
        for i in faceless:
            print(f"no face found in {args.compare[i]} (photo {i + 1})", file=sys.stderr)
        return EXIT_NO_FACE
    if not math.isfinite(sim):  # NaN > threshold is False: it would read "different people"
        raise LfwEvalError(f"{args.checkpoint}: the model gives non-finite (NaN/inf) embeddings "
                           "for these photos; is the checkpoint diverged?")
    print(f"cosine similarity: {sim:.4f}")
    if args.threshold is not None:
        threshold, source = args.threshold, "--threshold"
    else:
        saved = _saved_threshold(out_dir, Path(args.checkpoint), cfg.lfw_dir, cfg.pairs)
        if saved is None:
            print(f"no threshold: {out_dir} holds no LFW results; run the LFW evaluation "
                  "first or pass --threshold", file=sys.stderr)
            return EXIT_NO_THRESHOLD
        threshold, source = saved[0], str(saved[1])
    verdict = "same person" if sim > threshold else "different people"
    print(f"threshold: {threshold:.4f} (from {source})")
    print(f"verdict: {verdict}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 3 no face, 4 no threshold for
    --compare). Bad input raises (ToolkitError, OSError): run_cli prints it as one line and
    exits 1."""
    parser = build_arg_parser()
    cfg, args = parse_config(argv, parser=parser)
    return _run(cfg, args)


def _run(cfg, args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if args.bin and args.compare:
        raise LfwEvalError("--bin and --compare are separate commands; give one of them")
    if args.threshold is not None:  # checked before any model is loaded
        if not args.compare:
            raise LfwEvalError("--threshold is the decision threshold of --compare; the LFW "
                               "and .bin evaluations choose theirs by cross-validation")
        check_threshold(args.threshold, "--threshold")
    if args.quality and args.compare:
        raise LfwEvalError("--quality records the qualities of an evaluated set's images; "
                           "--compare evaluates no set")
    out_dir = Path(args.out) if args.out else checkpoint.parent / "eval"
    device = get_device(cfg.device)
    if args.compare:
        return _run_compare(cfg, args, _load_model(args, device), device, out_dir)
    inputs = {"--checkpoint": checkpoint, **({"--bin": args.bin} if args.bin else
                                             {"--lfw-dir": cfg.lfw_dir, "--pairs": cfg.pairs})}
    with claim_output(out_dir, "--out", inputs, FOLDER):  # before any work, one writer
        if args.bin:
            return _run_bins(cfg, args, device, out_dir)
        return _run_lfw(cfg, args, device, out_dir)


def _run_bins(cfg, args: argparse.Namespace, device, out_dir: Path) -> int:
    missing = [b for b in args.bin if not Path(b).is_file()]
    if missing:
        raise FileNotFoundError("verification set(s) not found: " + ", ".join(missing))
    model = _load_model(args, device)
    rows = []
    for path in args.bin:
        r = evaluate_bin(model, path, batch_size=cfg.batch_size, device=device, out_dir=out_dir,
                         extra=checkpoint_record(args.checkpoint), quality=args.quality)
        _print_results(r)
        rows.append(r)
    width = max(len("set"), *(len(r["name"]) for r in rows))
    print(f"\n{'set':<{width}}  {'pairs':>6}  {'accuracy':>16}  "
          f"{f'TAR@FAR={SUMMARY_FAR:.0e}':>12}")
    for r in rows:
        acc = f"{100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f}%"
        print(f"{r['name']:<{width}}  {r['n_pairs']:>6}  {acc:>16}  "
              f"{_tar_text(r, SUMMARY_FAR):>12}")
    print(f"results and figures in {out_dir}")
    return 0


def _run_lfw(cfg, args: argparse.Namespace, device, out_dir: Path) -> int:
    pairs = parse_pairs(cfg.pairs)
    folds, fold_rule = pairs_file_folds(pairs, cfg.pairs)  # before any work, as below
    lfw_dir = Path(cfg.lfw_dir)
    check_pairs_exist(pairs, lfw_dir)  # before any work
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir(lfw_dir)
    check_output(cache_dir, "--cache-dir", {"--lfw-dir": lfw_dir, "--pairs": cfg.pairs,
                                            "--checkpoint": args.checkpoint}, FOLDER)
    if not can_write_in(cache_dir):  # before the work whose crops it would keep
        raise LfwEvalError(f"--cache-dir {cache_dir}: cannot write in it; name a writable "
                           f"folder")
    model = _load_model(args, device)
    unreadable: dict[str, str] = {}  # --skip-unreadable: their pairs left out, and named
    try:
        crops, index, issame, faceless = load_lfw_crops(
            lfw_dir, pairs, cache_dir=cache_dir, checked=True,
            unreadable=unreadable if args.skip_unreadable else None)
    except ImageReadError as e:  # the protocol scores every pair of the file, or nothing
        raise LfwEvalError(f"--lfw-dir {lfw_dir}: {e}; the protocol scores every pair of "
                           f"{cfg.pairs}: replace the files, or pass --skip-unreadable to "
                           "score the other pairs (recorded in the results)") from None
    names = distinct_images(pairs)  # the crops' order, before unreadable pairs are left out
    left_out = 0
    if unreadable:
        readable = [p.path1 not in unreadable and p.path2 not in unreadable for p in pairs]
        folds = folds[readable]  # per line: a file may list one pair twice (a set would not)
        left_out, pairs = readable.count(False), readable_pairs(pairs, unreadable)
    labels = [f"{Path(p.path1).stem} / {Path(p.path2).stem}" for p in pairs]
    # the set is recorded by folder and pairs file content: the pairs decide every score,
    # and hashing the images would cost a pass over them (the crop cache checks their stamps)
    meta = {**checkpoint_record(args.checkpoint), "lfw_dir": str(lfw_dir),
            "pairs": str(cfg.pairs), "pairs_sha256": file_sha256(cfg.pairs),
            "faceless_images": faceless, "unreadable_images": unreadable,
            "pairs_left_out": left_out}
    r = evaluate_verification(model, crops, issame, batch_size=cfg.batch_size,
                              device=device, out_dir=out_dir, name=LFW_RESULTS_NAME,
                              file_stem=lfw_results_stem(lfw_dir, cfg.pairs), folds=folds,
                              fold_rule=fold_rule, pair_labels=labels, extra=meta,
                              pair_index=index, quality=args.quality, image_names=names)
    _print_results(r)
    if faceless:
        print(f"  {len(faceless)} of {len(crops)} images had no detected face and were "
              "centre-cropped")
    if unreadable:
        print(f"  {left_out} pairs left out: {len(unreadable)} of their images cannot be read "
              f"({first_few(list(unreadable), MAX_NAMED)})")
    print(f"results: {r['files']['results']}")
    print("figures: " + ", ".join(r["files"][k] for k in ("roc", "histogram", "errors")))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
