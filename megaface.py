"""MegaFace Challenge 1: FaceScrub probes against up to 1M MegaFace distractors.

Actions (``--action``), each resumable or side-effect free, in pipeline order:
  crop_megaface  align MegaFace distractors and FaceScrub probes with MTCNN into a mirrored tree
                 (where the devkit's per-image ``<image>.json`` gives a bounding box, the
                 detection overlapping it most); faceless images get a centre crop and are listed
  gen_features   one devkit-format feature file ``<image file name><suffix>`` per aligned image
  remove_noises  apply InsightFace's noise lists (every feature gains one extra dimension),
                 writing a new tree (--clean-features-dir, default data/megaface_features_clean)
                 with a record of what was done, remove_noises.json
  evaluate       our evaluator (evaluation/megaface_eval.py): CMC and TAR@FAR, JSON and PNG curves
  devkit         print (``--run``: run) the official devkit's run_experiment.py command
evaluate and devkit read --features-dir: pass the cleaned tree for the published protocol
(both warn when it has no remove_noises.json).

Nothing is lost silently: distractor features that are missing, unreadable, not float32
column vectors, non-finite or of another dimension than the probes are skipped, counted and
named (log, printout, results JSON); a probe is never skipped for being broken (an error: its
genuine pairs are the protocol), only when the devkit's list names a file that does not
exist (FaceScrub downloads are often incomplete), and then counted and named too. A missing
or image-less input folder, an empty noise list, or one that names none of a tree large
enough to expect matches, is an error naming the file or folder.

Provenance: crop_megaface records in each aligned tree the raw tree and the aligner
settings its crops came from (``crops_source.json``) and refuses to add to crops of another
source or crops that do not say; gen_features records in each feature tree the checkpoint
(by content), the aligned tree and its crops' record (``features_source.json``) and refuses
a tree holding another checkpoint's features, features of crops since re-made from another
source, or features that do not say; evaluate and remove_noises refuse
probes and distractors of two checkpoints (features made by other tools, recording
neither, are used with a warning).

Layout: ``<aligned-dir>/{megaface,facescrub}/<relative image path>`` and
``<features-dir>/{megaface,facescrub}/<relative image path><suffix>``, the paths the devkit's
template lists (``megaface_features_list.json_<N>_1``, ``facescrub_features_list.json``) name.

This module holds the pipeline and its command line: cropping, gen_features, the evaluate
action's loading and report, the devkit command. The feature-file format and loading trees
of them are ``evaluation/megaface_features.py``, noise removal
``evaluation/megaface_noise.py``, the scoring ``evaluation/megaface_eval.py``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from config import build_parser, parse_config
from evaluation import megaface_eval
from evaluation.lfw_images import ALIGNER_SETTINGS
from evaluation.megaface_eval import DEFAULT_FARS, DEFAULT_MAX_RANK, DEFAULT_SIZES, MegaFaceError
from evaluation.megaface_features import (
    DEFAULT_SUFFIX,
    FACESCRUB,
    MAX_LISTED_PROBLEMS,
    MEGAFACE,
    list_feature_files,
    load_features,
    load_probes,
    probe_paths_and_labels,
    read_devkit_list,
    read_feature,
    read_feature_source,
    report_problems,
    require_one_source,
    write_feature,
    write_feature_source,
)
from evaluation.megaface_noise import remove_noises, warn_unless_cleaned
from evaluation.verification import embed
from faces.file_alignment import align_files, read_image_or_error
from utils import (
    FACE_CROP_SIZE,
    FOLDER,
    IMAGE_EXTENSIONS,
    MissingInputError,
    ProvenanceError,
    atomic_write_text,
    checkpoint_record,
    claim_output,
    first_few,
    fraction,
    get_logger,
    iter_images,
    list_images,
    positive_int,
    require_same_checkpoint,
    run_cli,
    write_image,
)

log = get_logger("megaface")


# ----------------------------------------------------------------------------- cropping

# the public API (README): the devkit's feature files, and each action as a function
__all__ = ["read_feature", "write_feature", "crop_tree", "gen_features", "run_evaluate",
           "devkit_command", "main"]

def require_images(root: str | Path, what: str) -> None:
    """MissingInputError unless ``root`` is a folder holding at least one image (found
    lazily: the first one ends the search, not a walk over a million files)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError(f"{root}: {what} folder " + ("is a file, not a folder"
                                                            if root.exists() else "not found"))
    if next(iter_images(root), None) is None:
        raise MissingInputError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this "
                                f"{what} folder")


def _input_images(root: Path, what: str) -> list[Path]:
    images = list_images(root)
    if not images:  # a typo'd or empty folder must not "succeed" with nothing done
        require_images(root, what)
    return images


def read_bbox_json(image_path: str | Path) -> tuple[float, float, float, float] | None:
    """The face box (x1, y1, x2, y2) from the devkit's per-image JSON (``<image>.json``, or
    ``<stem>.json``): ``{"bounding_box": {"x", "y", "width", "height"}, ...}``; None if absent."""
    image_path = Path(image_path)
    for candidate in (image_path.with_name(image_path.name + ".json"),
                      image_path.with_suffix(".json")):
        if not candidate.is_file():
            continue
        try:
            box = json.loads(candidate.read_text())["bounding_box"]
            x, y, w, h = (float(box[k]) for k in ("x", "y", "width", "height"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: no usable bounding_box (%s); aligning without it", candidate, e)
            return None
        return (x, y, x + w, y + h) if w > 0 and h > 0 else None
    return None


CROPS_SOURCE_NAME = "crops_source.json"  # in an aligned tree: what its crops came from
RECROP = "crop into another --aligned-dir, or delete that one"  # the remedy for a mismatch


def crop_source_record(src_root: str | Path, aligner: Any) -> dict[str, Any]:
    """What an aligned tree records about its crops: the raw tree (resolved) and the
    aligner's settings (those lfw_images keys its crop cache on)."""
    return {"source": str(Path(src_root).resolve()), "aligner": type(aligner).__name__,
            "settings": {name: repr(getattr(aligner, name, None)) for name in ALIGNER_SETTINGS}}


def read_crop_source(root: str | Path) -> dict[str, Any] | None:
    """The record of ``root``'s crops (:data:`CROPS_SOURCE_NAME`), or None when it has none;
    ProvenanceError for one that cannot be read."""
    path = Path(root) / CROPS_SOURCE_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ProvenanceError(f"{path}: not a readable record of the crops ({e})") from None
    if not isinstance(record, dict):
        raise ProvenanceError(f"{path}: not a readable record of the crops")
    return record


def check_crop_source(dst_root: Path, record: dict[str, Any]) -> None:
    """ProvenanceError, naming both, when ``dst_root`` holds crops of another raw tree or
    aligner settings than ``record``, or crops that do not say (a resumed crop keeps the
    crops there: two sources would be mixed in one tree)."""
    saved = read_crop_source(dst_root)
    if saved is None:
        if dst_root.is_dir() and next(iter_images(dst_root), None) is not None:
            raise ProvenanceError(f"{dst_root}: holds crops that do not record what they came "
                                  f"from, so they cannot be completed with crops of "
                                  f"{record['source']}; {RECROP}")
        return
    if saved.get("source") != record["source"]:
        raise ProvenanceError(f"{dst_root}: holds crops of {saved.get('source')}, not of "
                              f"{record['source']}; {RECROP}")
    if saved != record:
        raise ProvenanceError(f"{dst_root}: holds crops made with other aligner settings "
                              f"({saved.get('settings')}) than now ({record['settings']}); "
                              f"{RECROP}")


def crop_tree(aligner, src_root: str | Path, dst_root: str | Path, num_workers: int = 2,
              progress: bool = True) -> dict[str, int]:
    """Align every image under ``src_root`` into the same relative path under ``dst_root``,
    which records what its crops came from (:func:`check_crop_source`: a tree of another
    source's crops is refused).

    Images already done are skipped (resumable). No face: the centre crop is written and the
    image listed in ``dst_root/faceless.txt``; undecodable ones go to ``unreadable.txt``."""
    src_root, dst_root = Path(src_root), Path(dst_root)
    images = _input_images(src_root, "image")
    record = crop_source_record(src_root, aligner)
    check_crop_source(dst_root, record)
    dst_root.mkdir(parents=True, exist_ok=True)  # recorded before the first crop
    atomic_write_text(dst_root / CROPS_SOURCE_NAME, json.dumps(record, indent=2) + "\n")
    summary = {"images": len(images), "skipped_existing": 0, "aligned": 0, "faceless": 0,
               "unreadable": 0, "with_box": 0}
    todo = [p for p in images if not (dst_root / p.relative_to(src_root)).exists()]
    summary["skipped_existing"] = len(images) - len(todo)
    listed = {name: _ListFile(dst_root / f"{name}.txt") for name in ("faceless", "unreadable")}
    unread: list[str] = []
    for done in align_files(aligner, todo, getattr(aligner, "batch_size", 1),
                            hint_for=read_bbox_json, num_workers=num_workers,
                            desc=f"crop {src_root.name}", progress=progress, leave=False):
        rel = done.path.relative_to(src_root)
        if done.error is not None:
            summary["unreadable"] += 1
            listed["unreadable"].add(str(rel), str(done.error))
            unread.append(str(rel))
            continue
        summary["with_box"] += done.hint is not None
        if done.face is None:
            summary["faceless"] += 1
            listed["faceless"].add(str(rel))
        else:
            summary["aligned"] += 1
        write_image(dst_root / rel, done.crop)
    if summary["unreadable"]:  # the count alone would not say which, nor where they are listed
        log.warning("%d of %d images under %s cannot be read (the others are cropped), listed "
                    "in %s: %s", summary["unreadable"], len(todo), src_root,
                    listed["unreadable"].path, first_few(unread, MAX_LISTED_PROBLEMS))
    return summary


class _ListFile:
    """An append-only list of relative paths that a resumed run does not repeat."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen = {line.split("\t")[0] for line in path.read_text().splitlines()} \
            if path.is_file() else set()

    def add(self, rel: str, note: str = "") -> None:
        if rel in self.seen:
            return
        self.seen.add(rel)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(f"{rel}\t{note}\n" if note else f"{rel}\n")


# ----------------------------------------------------------------------------- features

def check_feature_source(feature_root: Path, image_root: Path, checkpoint: str | Path,
                         suffix: str = DEFAULT_SUFFIX) -> dict[str, str]:
    """What ``feature_root`` will record it came from (``checkpoint`` by content, the
    aligned ``image_root``); ProvenanceError, naming both, when the features already there
    came from another checkpoint or image tree, or do not say (their files are kept, so
    two models' features would be scored together)."""
    record = {**checkpoint_record(checkpoint), "images": str(image_root.resolve()),
              "crops": read_crop_source(image_root)}
    saved = read_feature_source(feature_root)
    remedy = "write into another --features-dir, or delete that one"
    if saved is None:
        if feature_root.is_dir() and next(feature_root.rglob(f"*{suffix}"), None):
            raise ProvenanceError(f"{feature_root}: holds features that do not record the "
                                  f"checkpoint they came from, so they cannot be completed "
                                  f"with {checkpoint}'s; {remedy}")
        return record
    require_same_checkpoint(saved, feature_root, checkpoint, remedy)
    if saved.get("images") != record["images"]:
        raise ProvenanceError(f"{feature_root}: holds features of the images in "
                              f"{saved.get('images')}, not {record['images']}; {remedy}")
    # the same folder re-cropped from another source since: the old features would stay
    # (records before the crops were recorded say nothing of them: not checked)
    if "crops" in saved and saved["crops"] != record["crops"]:
        made = (saved["crops"] or {}).get("source", "crops that did not record their source")
        now = (record["crops"] or {}).get("source", "crops that do not record their source")
        raise ProvenanceError(f"{feature_root}: holds features of the crops in "
                              f"{record['images']} as made from {made}; they are now "
                              f"crops of {now} (re-cropped); {remedy}")
    return record


def gen_features(model, image_root: str | Path, feature_root: str | Path,
                 suffix: str = DEFAULT_SUFFIX, batch_size: int = 128, device=None,
                 num_workers: int = 2, progress: bool = True,
                 checkpoint: str | Path | None = None) -> dict[str, int]:
    """One devkit feature file ``<image file name><suffix>`` per aligned image (L2-normalised,
    flip-augmented, see lfw_eval.embed) in the mirrored tree; existing files are kept. With
    ``checkpoint`` (the file ``model`` was loaded from), the tree records it and the images
    (:func:`check_feature_source`, refused when features of another source are there)."""
    image_root, feature_root = Path(image_root), Path(feature_root)
    images = _input_images(image_root, "aligned image")
    if checkpoint is not None:  # recorded before the first feature: a killed run stays known
        write_feature_source(feature_root, check_feature_source(feature_root, image_root,
                                                                checkpoint, suffix))
    todo = [p for p in images
            if not (feature_root / (str(p.relative_to(image_root)) + suffix)).exists()]
    summary = {"images": len(images), "skipped_existing": len(images) - len(todo),
               "written": 0, "unreadable": 0, "resized": 0}
    with ThreadPoolExecutor(max(1, num_workers)) as pool, \
            tqdm(total=len(todo), desc=f"features {image_root.name}", unit="img",
                 disable=not progress, leave=False) as bar:
        for start in range(0, len(todo), batch_size):
            paths = todo[start:start + batch_size]
            crops, kept = [], []
            for p, im in zip(paths, pool.map(read_image_or_error, paths), strict=True):
                if not isinstance(im, np.ndarray):
                    summary["unreadable"] += 1
                    log.warning("skipped: %s", im)
                    continue
                if im.shape[:2] != (FACE_CROP_SIZE, FACE_CROP_SIZE):  # not one of our aligned crops
                    im = cv2.resize(im, (FACE_CROP_SIZE, FACE_CROP_SIZE),
                                    interpolation=cv2.INTER_AREA)
                    summary["resized"] += 1
                crops.append(im)
                kept.append(p)
            if crops:
                feats = embed(model, np.stack(crops), batch_size=batch_size, device=device,
                              flip=True, progress=False)
                broken = np.flatnonzero(~np.isfinite(feats).all(axis=1))
                if broken.size:  # every later score would be NaN: stop before writing any
                    raise MegaFaceError(
                        f"{kept[broken[0]]}: the model gives a non-finite (NaN/inf) embedding "
                        f"for {broken.size} of {len(kept)} images in this batch; is the "
                        "checkpoint diverged?")
                for p, vec in zip(kept, feats, strict=True):
                    write_feature(feature_root / (str(p.relative_to(image_root)) + suffix), vec)
                summary["written"] += len(kept)
            bar.update(len(paths))
    return summary


# ----------------------------------------------------------------------------- evaluation

SIZE_LIST = "megaface_features_list.json_{}_1"  # the devkit's distractor list of size N


def _megaface_size_lists(templatelists: Path, sizes: Iterable[int]) -> dict[int, list[str]]:
    """The devkit's distractor subsets ``megaface_features_list.json_<N>_1`` that exist."""
    found = {}
    for n in sizes:
        path = templatelists / SIZE_LIST.format(n)
        if path.is_file():
            found[n] = [str(p) for p in read_devkit_list(path)["path"]]
    return found


def run_evaluate(args, cfg) -> dict[str, Any]:
    """The ``evaluate`` action: load the feature trees, score, write JSON and PNGs."""
    probe_root, distractor_root, source = _feature_roots(args)
    facescrub_list, size_lists, subset = _lists_and_subset(args)

    paths, labels = probe_paths_and_labels(probe_root, facescrub_list, args.suffix)
    loaded_probes = load_probes(probe_root, paths, args.suffix)
    probes = loaded_probes.feats
    labels = [labels[i] for i in loaded_probes.kept]
    distractor_paths = _distractor_paths(args, subset, size_lists, distractor_root)
    # the probes fix the dimension: a distractor of another one is skipped, never the reverse
    loaded = load_features(distractor_root, distractor_paths, args.suffix, MEGAFACE,
                           dim=probes.shape[1], dim_from=" (the probe features')")
    distractors = loaded.feats
    distractor_problems = loaded.skipped
    report_problems(distractor_problems, "distractor features")
    kept_paths = [distractor_paths[j] for j in loaded.kept]
    results = _rank(args, cfg, probes, labels, distractors, kept_paths, subset, size_lists)

    out = Path(args.results_dir)
    report = {
        "protocol": {"score": "1 - |a-b|^2/2 (cosine for unit features)",
                     "ties": "a distractor scoring exactly the genuine score does not count "
                             "against the probe (strict >)",
                     "subset": subset, "seed": cfg.seed if subset == "random" else None,
                     "far_threshold": "(floor(FAR*#impostors)+1)-th largest impostor score, "
                                      "accept strictly above"},
        "probe_features": str(probe_root), "distractor_features": str(distractor_root),
        "features_source": source,
        "num_probes": len(labels), "num_identities": len(set(labels)),
        "num_distractors_loaded": len(distractors),
        "skipped": {"probes": len(loaded_probes.missing),
                    "distractors": len(distractor_problems),
                    "probe_files": loaded_probes.missing[:MAX_LISTED_PROBLEMS],
                    "distractor_files": distractor_problems[:MAX_LISTED_PROBLEMS],
                    "rule": "distractor features that are missing, unreadable, not float32 "
                            "column vectors, non-finite or of another dimension than the "
                            "probes are skipped; probes only when listed but missing (any "
                            "other bad probe is an error)"},
        "sizes": {str(n): {**r, "verification": {f"{f:g}": v for f, v in
                                                 r.get("verification", {}).items()}}
                  for n, r in sorted(results.items())},
    }
    atomic_write_text(out / "megaface_results.json", json.dumps(report, indent=2) + "\n")
    megaface_eval.plot_cmc(results, out / "cmc.png")
    megaface_eval.plot_rank1_vs_distractors(results, out / "rank1_vs_distractors.png")
    if args.fars:
        megaface_eval.plot_roc_curves(results, out / "roc.png")
    else:  # an earlier run's curve must not pass for this run's
        (out / "roc.png").unlink(missing_ok=True)
    print(megaface_eval.format_results(results, args.fars))
    for what, problems in (("probe", loaded_probes.missing), ("distractor", distractor_problems)):
        if problems:  # the table holds fewer features than the user has: say so beside it
            print(f"{len(problems)} {what} features skipped (first {MAX_LISTED_PROBLEMS} "
                  f"named in the log and in {out / 'megaface_results.json'})")
    log.info("results in %s", out)
    return report


def _feature_roots(args) -> tuple[Path, Path, str]:
    """The probe and distractor feature trees the ``evaluate`` action reads, and which model
    and images made them (:func:`require_one_source`)."""
    features_dir = Path(args.features_dir)
    if not (args.probe_features and args.distractor_features):
        if not features_dir.is_dir():
            raise MissingInputError(f"{features_dir}: --features-dir not found")
        warn_unless_cleaned(features_dir)
    probe_root = Path(args.probe_features or features_dir / FACESCRUB)
    distractor_root = Path(args.distractor_features or features_dir / MEGAFACE)
    return probe_root, distractor_root, require_one_source(probe_root, distractor_root)


def _lists_and_subset(args) -> tuple[Path | None, dict[int, list[str]], str]:
    """The FaceScrub list (None: every probe feature), the devkit's distractor lists by size
    (empty without --templatelists) and the subset rule --subset resolves to."""
    templatelists = Path(args.templatelists) if args.templatelists else None
    facescrub_list = args.facescrub_list or (
        templatelists / "facescrub_features_list.json"
        if templatelists and (templatelists / "facescrub_features_list.json").is_file() else None)
    size_lists = _megaface_size_lists(templatelists, args.sizes) if templatelists else {}
    subset = args.subset if args.subset != "auto" else ("devkit" if size_lists else "first")
    if subset == "devkit" and not size_lists:
        raise MegaFaceError("--subset devkit needs --templatelists with megaface_features_list"
                            ".json_<N>_1 files for the requested --sizes")
    if subset != "devkit":  # the first N of a sorted tree are a few Flickr folders' photos
        log.warning("distractor sets of each size are the %s, not the devkit's "
                    "megaface_features_list.json_<N>_1: the numbers are not comparable with "
                    "published ones (pass --templatelists)",
                    "first N of a --seed permutation" if subset == "random"
                    else "first N of --megaface-list" if args.megaface_list
                    else "first N of the tree (sorted)")
    return facescrub_list, size_lists, subset


def _distractor_paths(args, subset: str, size_lists: dict[int, list[str]],
                      distractor_root: Path) -> list[str]:
    """The distractor feature files to load, in the order the subset rule reads them."""
    if subset == "devkit":  # every listed path, the largest list first
        return list(dict.fromkeys(p for n in sorted(size_lists, reverse=True)
                                  for p in size_lists[n]))
    if args.megaface_list:
        return [str(p) for p in read_devkit_list(args.megaface_list)["path"]]
    return list_feature_files(distractor_root, args.suffix)


def _rank(args, cfg, probes: np.ndarray, labels: list[Any], distractors: np.ndarray,
          kept_paths: list[str], subset: str,
          size_lists: dict[int, list[str]]) -> dict[int, dict[str, Any]]:
    """Identification (and verification) results by distractor-set size: each devkit list's
    distractors that loaded (``kept_paths`` names each row of ``distractors``), or the first
    (or, with --subset random, a seeded random draw of) N distractors for every --sizes N."""
    common = dict(max_rank=args.max_rank, fars=tuple(args.fars), chunk_size=args.chunk_size,
                  device=cfg.device if cfg.device != "auto" else None)
    if subset == "devkit":
        position = {path: row for row, path in enumerate(kept_paths)}
        results = {}
        for n, listed in sorted(size_lists.items()):
            order = [position[p] for p in listed if p in position]
            if not order:  # the others' distractors loaded: this list names other files
                raise MegaFaceError(f"{Path(args.templatelists) / SIZE_LIST.format(n)}: none "
                                    f"of its {len(listed)} distractors has a usable feature "
                                    "file (do the features keep the devkit's paths?)")
            (results[n],) = megaface_eval.megaface_evaluate(
                probes, labels, distractors, sizes=[len(order)], order=order, **common).values()
        return results
    order = np.random.default_rng(cfg.seed).permutation(len(distractors)) \
        if subset == "random" else None
    return megaface_eval.megaface_evaluate(probes, labels, distractors, sizes=args.sizes,
                                           order=order, **common)


# ----------------------------------------------------------------------------- devkit

def devkit_command(devkit_dir: str | Path, features_dir: str | Path, suffix: str,
                   results_dir: str | Path, sizes: Sequence[int], probe_list: str | Path | None
                   = None, python: str = sys.executable) -> tuple[list[str], Path]:
    """The devkit's run_experiment.py command line and the directory to run it in
    (``<devkit>/experiments``: the script finds its binaries and lists relative to it)."""
    devkit_dir, features_dir = Path(devkit_dir).resolve(), Path(features_dir).resolve()
    cwd = devkit_dir / "experiments"
    probe_list = Path(probe_list).resolve() if probe_list else \
        devkit_dir / "templatelists" / "facescrub_features_list.json"
    cmd = [python, "run_experiment.py", str(features_dir / MEGAFACE),
           str(features_dir / FACESCRUB), suffix, str(Path(results_dir).resolve()),
           "-s", *[str(n) for n in sizes], "-p", str(probe_list)]
    return cmd, cwd


# ----------------------------------------------------------------------------- CLI

def build_arg_parser():
    parser = build_parser(__doc__.split("\n")[0],
                          only=["batch_size", "device", "num_workers", "seed", "network",
                                "embedding_size"])
    me = parser.add_argument_group("megaface")
    me.add_argument("--action", required=True, choices=["crop_megaface", "gen_features",
                                                         "remove_noises", "evaluate", "devkit"])
    me.add_argument("--megaface-images", help="raw MegaFace distractor images (crop_megaface)")
    me.add_argument("--facescrub-images", help="raw FaceScrub probe images (crop_megaface)")
    me.add_argument("--aligned-dir", default="data/megaface_aligned",
                    help="aligned crops: <dir>/megaface, <dir>/facescrub")
    me.add_argument("--features-dir", default="data/megaface_features",
                    help="feature trees: <dir>/megaface, <dir>/facescrub")
    me.add_argument("--clean-features-dir", default="data/megaface_features_clean",
                    help="remove_noises output")
    me.add_argument("--suffix", default=DEFAULT_SUFFIX, help="feature file = image name + this")
    me.add_argument("--checkpoint", help="backbone weights (gen_features)")
    me.add_argument("--megaface-noises", help="InsightFace megaface_noises.txt")
    me.add_argument("--facescrub-noises", help="InsightFace facescrub_noises.txt")
    me.add_argument("--templatelists", help="the devkit's templatelists directory (optional)")
    me.add_argument("--facescrub-list", help="facescrub_features_list.json (paths and ids)")
    me.add_argument("--megaface-list", help="one megaface_features_list.json_<N>_1 to load")
    me.add_argument("--probe-features", help="override <features-dir>/facescrub")
    me.add_argument("--distractor-features", help="override <features-dir>/megaface")
    me.add_argument("--sizes", type=positive_int, nargs="+", default=list(DEFAULT_SIZES),
                    help="distractor counts N (those up to the number available)")
    me.add_argument("--max-rank", type=positive_int, default=DEFAULT_MAX_RANK,
                    help="CMC ranks 1..this")
    me.add_argument("--fars", type=fraction, nargs="*", default=list(DEFAULT_FARS),
                    help="TAR at these FARs (none: identification only)")
    me.add_argument("--subset", default="auto", choices=["auto", "first", "random", "devkit"],
                    help="distractors of size N: the devkit's lists (auto when --templatelists "
                         "has them), the first N, or a --seed permutation's first N")
    me.add_argument("--chunk-size", type=positive_int, default=None,
                    help="distractors per score block")
    me.add_argument("--results-dir", default="runs/megaface", help="JSON and PNGs (evaluate)")
    me.add_argument("--devkit-dir", help="the MegaFace devkit (devkit action)")
    me.add_argument("--devkit-python", default=sys.executable, help="python for the devkit")
    me.add_argument("--run", action="store_true", help="devkit: run the command, not just print")
    return parser


def _require(args, *names: str) -> None:
    missing = [n for n in names if not getattr(args, n)]
    if missing:
        raise MegaFaceError(f"--action {args.action} needs " + ", ".join(
            "--" + n.replace("_", "-") for n in missing))


def _print_summary(title: str, summary: dict[str, int]) -> None:
    print(f"{title}: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


# The folder each action writes (flag, args attribute) and the flags of what it reads
ACTION_OUTPUTS = {
    "crop_megaface": ("--aligned-dir", ("megaface_images", "facescrub_images")),
    "gen_features": ("--features-dir", ("aligned_dir", "checkpoint")),
    "remove_noises": ("--clean-features-dir", ("features_dir", "megaface_noises",
                                               "facescrub_noises", "facescrub_list")),
    "evaluate": ("--results-dir", ("features_dir", "probe_features", "distractor_features",
                                   "templatelists", "facescrub_list", "megaface_list")),
}


def claim_action_output(args: argparse.Namespace) -> AbstractContextManager:
    """The folder ``args.action`` writes, claimed before any work (:func:`utils.claim_output`:
    none of its inputs, one writer); the devkit action writes nothing itself."""
    if args.action not in ACTION_OUTPUTS:
        return nullcontext()
    flag, reads = ACTION_OUTPUTS[args.action]
    output = getattr(args, flag[2:].replace("-", "_"))
    inputs = {"--" + name.replace("_", "-"): getattr(args, name) for name in reads}
    return claim_output(output, flag, inputs, FOLDER)


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_config(argv, parser=build_arg_parser())
    with claim_action_output(args):
        return run_action(cfg, args)


def run_action(cfg: Any, args: argparse.Namespace) -> int:
    """Run ``args.action``; returns the exit status."""
    device = None if cfg.device == "auto" else cfg.device
    sets = [(MEGAFACE, args.megaface_images), (FACESCRUB, args.facescrub_images)]
    if args.action == "crop_megaface":
        if not any(src for _, src in sets):
            raise MegaFaceError("--action crop_megaface needs --megaface-images and/or "
                                "--facescrub-images")
        for name, src in sets:  # every input checked before hours of work on the first
            if src:
                require_images(src, f"--{name}-images")
        from faces.aligner import FaceAligner  # torch (MTCNN) only for the align action

        aligner = FaceAligner(device=device)
        for name, src in sets:  # every destination checked before any image is cropped
            if src:
                check_crop_source(Path(args.aligned_dir) / name, crop_source_record(src, aligner))
        for name, src in sets:
            if src:
                _print_summary(f"crop {name}", crop_tree(aligner, src, Path(args.aligned_dir)
                                                         / name, cfg.num_workers))
    elif args.action == "gen_features":
        _require(args, "checkpoint")
        from models import load_backbone  # torch only for gen_features

        sources = [Path(args.aligned_dir) / name for name in (MEGAFACE, FACESCRUB)]
        present = [src for src in sources if src.is_dir()]
        if not present:
            raise MissingInputError(f"{args.aligned_dir}: neither {MEGAFACE}/ nor {FACESCRUB}/ "
                                    "found in this --aligned-dir (run --action crop_megaface)")
        for src in sources:
            if src in present:
                require_images(src, "aligned image")
            else:  # one set may be made on its own; say which one is not
                log.warning("%s: not found; no %s features made", src, src.name)
        model = load_backbone(args.checkpoint, network=args.network,
                              embedding_size=args.embedding_size)
        for src in present:  # every destination checked before any image is embedded
            check_feature_source(Path(args.features_dir) / src.name, src, args.checkpoint,
                                 args.suffix)
        for src in present:
            _print_summary(f"features {src.name}", gen_features(
                model, src, Path(args.features_dir) / src.name, args.suffix, cfg.batch_size,
                device, cfg.num_workers, checkpoint=args.checkpoint))
    elif args.action == "remove_noises":
        _require(args, "megaface_noises", "facescrub_noises")
        _print_summary("remove_noises", remove_noises(
            args.features_dir, args.clean_features_dir, args.megaface_noises,
            args.facescrub_noises, args.suffix, cfg.seed, args.facescrub_list))
    elif args.action == "evaluate":
        run_evaluate(args, cfg)
    else:
        _require(args, "devkit_dir")
        for name in (MEGAFACE, FACESCRUB):
            if not (Path(args.features_dir) / name).is_dir():
                raise MissingInputError(f"{Path(args.features_dir) / name}: feature directory "
                                        "not found (--features-dir: the cleaned features, "
                                        "see --action remove_noises)")
        warn_unless_cleaned(args.features_dir)
        cmd, cwd = devkit_command(args.devkit_dir, args.features_dir, args.suffix,
                                  args.results_dir, args.sizes, args.facescrub_list,
                                  args.devkit_python)
        if not (cwd / "run_experiment.py").is_file():
            log.warning("%s: no run_experiment.py there; is --devkit-dir the devkit root?", cwd)
        print(f"cd {shlex.quote(str(cwd))} && {shlex.join(cmd)}")
        if args.run:
            return subprocess.run(cmd, cwd=cwd, check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
