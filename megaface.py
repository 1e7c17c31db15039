"""MegaFace Challenge 1: FaceScrub probes against up to 1M MegaFace distractors.

Actions (``--action``), each resumable or side-effect free, in pipeline order:
  crop_megaface  align MegaFace distractors and FaceScrub probes with MTCNN into a mirrored tree
                 (where the devkit's per-image ``<image>.json`` gives a bounding box, the
                 detection overlapping it most); faceless images get a centre crop and are listed
  gen_features   one devkit-format feature file ``<image file name><suffix>`` per aligned image
  remove_noises  apply InsightFace's noise lists (every feature gains one extra dimension),
                 writing a new tree (--clean-features-dir, default data/megaface_features_clean)
                 with a record of what was done, remove_noises.json
  evaluate       our own evaluator (megaface_eval.py): CMC and TAR@FAR, JSON and PNG curves
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

Layout: ``<aligned-dir>/{megaface,facescrub}/<relative image path>`` and
``<features-dir>/{megaface,facescrub}/<relative image path><suffix>``, the paths the devkit's
template lists (``megaface_features_list.json_<N>_1``, ``facescrub_features_list.json``) name.
"""

from __future__ import annotations

import json
import os
import shlex
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megaface_eval import DEFAULT_FARS, DEFAULT_MAX_RANK, DEFAULT_SIZES, MegaFaceError
from utils import (
    FACE_CROP_SIZE,
    IMAGE_EXTENSIONS,
    ToolkitError,
    atomic_write_text,
    get_logger,
    list_images,
    run_cli,
    write_image,
)

log = get_logger("megaface")

# The devkit's feature file (OpenCV matrix): int32 rows, cols, element size, type; then data.
FEATURE_HEADER = struct.Struct("<4i")
FEATURE_COLS = 1
FEATURE_ELEMENT_BYTES = 4
CV_32F = 5
DEFAULT_SUFFIX = "_0.bin"
MEGAFACE, FACESCRUB = "megaface", "facescrub"
DISTRACTOR_NOISE_FLAG = 100.0  # InsightFace's value in the extra dimension of a noisy distractor
PROBE_NOISE_AMPLITUDE = 1e-3  # uniform noise added to a noisy probe's identity mean
MEGAFACE_NOISE_PATH_PARTS = 3  # noise entries are "<a>/<flickr user>/<image>"
NOISE_REMOVAL_RECORD = "remove_noises.json"  # written into the clean tree: what was done to it
MAX_LISTED_PROBLEMS = 10  # files named in the log and the results file; the count is complete
MAX_PROBLEMS_IN_ERROR = 3  # files named in a one-line error
# The devkit's largest sets, to tell "this noise list names nothing here" (wrong list or paths)
# from "a small tree that happens to hold none of the listed images"
MEGAFACE_DISTRACTORS = 1_000_000
FACESCRUB_PROBES = 3530


class FeatureFormatError(MegaFaceError):
    """A feature file that is not a devkit float32 column vector of finite values; the
    message names it."""


class MissingFeatureError(FeatureFormatError):
    """A feature file that does not exist (e.g. an image the devkit lists was never aligned)."""


class MissingInputError(ToolkitError, FileNotFoundError):
    """An input folder or file that does not exist or holds nothing to work on."""


# ----------------------------------------------------------------------------- feature files

def write_feature(path: str | Path, vec: Sequence[float] | np.ndarray) -> None:
    """Write a 1-D feature as the devkit's matrix file: rows=D, cols=1, 4, CV_32F, D floats.

    Written to a temp file and renamed (no fsync: a million of them would take hours)."""
    vec = np.asarray(vec, dtype=np.float32)
    if vec.ndim != 1 or vec.size == 0:
        raise FeatureFormatError(f"{path}: expected a non-empty 1-D feature, got shape "
                                 f"{vec.shape}")
    if not np.all(np.isfinite(vec)):  # the model or the noise arithmetic broke: never write it
        raise FeatureFormatError(f"{path}: refusing to write a feature with non-finite values "
                                 "(NaN or inf)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = FEATURE_HEADER.pack(vec.size, FEATURE_COLS, FEATURE_ELEMENT_BYTES, CV_32F) \
        + vec.astype("<f4").tobytes()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_feature(path: str | Path) -> np.ndarray:
    """Read a devkit feature file as float32 (D,); FeatureFormatError naming the file when it
    is missing, unreadable, not a float32 column vector, or holds NaN or inf."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise MissingFeatureError(f"{path}: feature file not found") from None
    except OSError as e:
        raise FeatureFormatError(f"{path}: cannot read feature file ({e.strerror or e})") from None
    if len(data) < FEATURE_HEADER.size:
        raise FeatureFormatError(f"{path}: {len(data)} bytes, shorter than the 16-byte header")
    rows, cols, elem, cv_type = FEATURE_HEADER.unpack_from(data)
    if cols != FEATURE_COLS or elem != FEATURE_ELEMENT_BYTES or cv_type != CV_32F or rows < 1:
        raise FeatureFormatError(f"{path}: header (rows={rows}, cols={cols}, stride={elem}, "
                                 f"type={cv_type}) is not a float32 column vector (D, 1, 4, 5)")
    if len(data) != FEATURE_HEADER.size + rows * FEATURE_ELEMENT_BYTES:
        raise FeatureFormatError(f"{path}: header says {rows} floats but the file holds "
                                 f"{len(data) - FEATURE_HEADER.size} bytes of data")
    vec = np.frombuffer(data, dtype="<f4", offset=FEATURE_HEADER.size).astype(np.float32)
    if not np.all(np.isfinite(vec)):  # scores NaN against everything: no rank means anything
        raise FeatureFormatError(f"{path}: {int(np.count_nonzero(~np.isfinite(vec)))} of "
                                 f"{vec.size} values are non-finite (NaN or inf)")
    return vec


def list_feature_files(root: str | Path, suffix: str = DEFAULT_SUFFIX) -> list[str]:
    """Relative image paths (``a/b.jpg``) of every ``<image><suffix>`` under ``root``, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError(f"{root}: feature directory not found")
    out = []
    for dirpath, _, files in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in files:
            if name.endswith(suffix) and not name.startswith("."):
                rel = name[:-len(suffix)] if rel_dir == "." else f"{rel_dir}/{name[:-len(suffix)]}"
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def read_devkit_list(path: str | Path, need_ids: bool = False) -> dict[str, list]:
    """A devkit template list: JSON with "path" (relative image paths) and, for probes, "id"."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MissingInputError(f"{path}: devkit list not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MegaFaceError(f"{path}: cannot read devkit list ({e})") from None
    keys = ("path", "id") if need_ids else ("path",)
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in keys):
        raise MegaFaceError(f"{path}: expected a JSON object with list(s) {keys}")
    if need_ids and len(data["id"]) != len(data["path"]):
        raise MegaFaceError(f"{path}: {len(data['id'])} ids for {len(data['path'])} paths")
    return data


@dataclass
class LoadedFeatures:
    """What :func:`load_features` read: the usable features and, by name, what it could not
    use (each message names the file and the reason)."""

    feats: np.ndarray  # (len(kept), D) float32
    kept: np.ndarray  # indices into the requested paths of the rows of ``feats``
    missing: list[str]  # files that do not exist
    bad: list[str]  # unreadable, not the devkit format, non-finite, or of another dimension

    @property
    def skipped(self) -> list[str]:
        return self.missing + self.bad


def load_features(root: str | Path, rel_paths: Sequence[str], suffix: str = DEFAULT_SUFFIX,
                  desc: str = "features", progress: bool = True, dim: int | None = None,
                  dim_from: str = "") -> LoadedFeatures:
    """Features of ``root/<rel><suffix>``. Files that are missing, unreadable, not float32
    column vectors, hold NaN/inf, or whose dimension is not ``dim`` (default: the most common
    one among them; ``dim_from`` says where ``dim`` comes from) are left out and named.
    MegaFaceError when none is usable."""
    from tqdm import tqdm

    root = Path(root)
    if not rel_paths:
        raise MissingInputError(f"{root}: no feature files (*{suffix}) to load")
    # with a known dimension the array is filled in place (a million distractors: no copy)
    feats = None if dim is None else np.empty((len(rel_paths), dim), dtype=np.float32)
    vectors: list[np.ndarray] = []
    kept: list[int] = []
    missing: list[str] = []
    bad: list[str] = []
    for i, rel in enumerate(tqdm(rel_paths, desc=desc, unit="file", disable=not progress,
                                 leave=False)):
        try:
            vec = read_feature(root / (rel + suffix))
        except MissingFeatureError as e:
            missing.append(str(e))
            continue
        except FeatureFormatError as e:
            bad.append(str(e))
            continue
        if feats is None:
            vectors.append(vec)
        elif vec.size != dim:
            bad.append(f"{root / (rel + suffix)}: {vec.size} dims, expected {dim}{dim_from}")
            continue
        else:
            feats[len(kept)] = vec
        kept.append(i)
    if feats is None:
        if vectors:
            dim = Counter(v.size for v in vectors).most_common(1)[0][0]
        right = [j for j, v in enumerate(vectors) if v.size == dim]
        bad += [f"{root / (rel_paths[kept[j]] + suffix)}: {v.size} dims, expected {dim} "
                "(the dimension of most of them)" for j, v in enumerate(vectors) if v.size != dim]
        feats = np.stack([vectors[j] for j in right]) if right \
            else np.empty((0, 0), dtype=np.float32)
        kept = [kept[j] for j in right]
    if not kept:
        problems = missing + bad
        raise MegaFaceError(f"{root}: none of {len(rel_paths)} feature files could be used"
                            + (f" (first: {problems[0]})" if problems else ""))
    return LoadedFeatures(feats[:len(kept)], np.asarray(kept, dtype=np.int64), missing, bad)


def _report_problems(problems: list[str], what: str) -> None:
    if problems:
        log.warning("%d %s skipped, e.g.:\n  %s", len(problems), what,
                    "\n  ".join(problems[:MAX_LISTED_PROBLEMS]))


def _refuse_bad_probes(loaded: LoadedFeatures, root: Path) -> None:
    """A probe is never dropped for being broken: its genuine pairs are the protocol (the
    devkit scores every listed probe), and a NaN or odd-sized probe means the features were
    made wrongly. Missing files are another matter (see :func:`load_probes`)."""
    if loaded.bad:
        raise MegaFaceError(
            f"{root}: {len(loaded.bad)} probe feature file(s) cannot be used (probes are never "
            "skipped; regenerate them): " + "; ".join(loaded.bad[:MAX_PROBLEMS_IN_ERROR])
            + ("; ..." if len(loaded.bad) > MAX_PROBLEMS_IN_ERROR else ""))


def load_probes(root: Path, paths: Sequence[str], suffix: str, progress: bool = True
                ) -> LoadedFeatures:
    """The probe features: any broken one is an error (:func:`_refuse_bad_probes`); files the
    devkit's list names but that do not exist are skipped, counted and named, since FaceScrub
    is downloaded from URLs and many copies lack some images."""
    loaded = load_features(root, paths, suffix, FACESCRUB, progress)
    _refuse_bad_probes(loaded, root)
    _report_problems(loaded.missing, "probe features (listed but missing)")
    return loaded


def probe_paths_and_labels(root: str | Path, list_path: str | Path | None = None,
                           suffix: str = DEFAULT_SUFFIX) -> tuple[list[str], list[str]]:
    """FaceScrub relative paths and identities: from the devkit list ("path", "id") when
    given, else every feature file under ``root`` with its top directory as identity."""
    if list_path:
        data = read_devkit_list(list_path, need_ids=True)
        return [str(p) for p in data["path"]], [str(i) for i in data["id"]]
    paths = list_feature_files(root, suffix)
    if any("/" not in p for p in paths):
        raise MegaFaceError(f"{root}: probe features must lie in one directory per identity")
    return paths, [p.split("/", 1)[0] for p in paths]


# ----------------------------------------------------------------------------- noise removal

def _probe_key(name: str) -> str:
    """FaceScrub file names as matched against the noise list (spaces and underscores alike)."""
    return os.path.basename(name.strip()).replace(" ", "_")


def _distractor_key(path: str) -> str:
    return "/".join(path.strip().replace("\\", "/").split("/")[-MEGAFACE_NOISE_PATH_PARTS:])


def parse_noise_list(path: str | Path, kind: str) -> set[str]:
    """InsightFace's noise list: ``#`` comment lines, then one entry a line; facescrub_noises.txt
    holds file names (``Aaron_Eckhart_136.png``), megaface_noises.txt relative paths
    (``375/37531198@N00/4174611825_0.jpg``, possibly after a tab). Keys as matched."""
    if kind not in (MEGAFACE, FACESCRUB):
        raise ValueError(f"kind must be {MEGAFACE!r} or {FACESCRUB!r}, got {kind!r}")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MissingInputError(f"{path}: noise list not found") from None
    except UnicodeDecodeError as e:
        raise MegaFaceError(f"{path}: not a text noise list (byte {e.start} is not UTF-8)") \
            from None
    keys = set()
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entry = line.split("\t")[-1]
        keys.add(_probe_key(entry) if kind == FACESCRUB else _distractor_key(entry))
    if not keys:
        raise MegaFaceError(f"{path}: the {kind} noise list holds no entries (only comments "
                            "or blank lines)")
    return keys


def check_noise_list_matches(list_path: str | Path, noise: set[str], tree_keys: Iterable[str],
                             tree_root: str | Path, full_size: int) -> int:
    """How many of ``tree_keys`` the noise list names. None at all, in a tree big enough that
    some should be (the list's share of the devkit's ``full_size`` images), means the list or
    the tree's relative paths are not the expected ones: an error naming both, with a sample,
    instead of a "cleaned" tree that is not. Smaller trees only get a warning."""
    tree_keys = list(tree_keys)
    matched = sum(k in noise for k in tree_keys)
    expected = len(noise) * len(tree_keys) / full_size
    if matched == 0 and tree_keys:
        message = (f"{list_path}: none of its {len(noise)} entries (e.g. {min(noise)!r}) names a "
                   f"feature under {tree_root} (e.g. {tree_keys[0]!r}); about {expected:.0f} "
                   "should: is it the right list, and do the features keep the devkit's "
                   "relative paths?")
        if expected >= 1:
            raise MegaFaceError(message)
        log.warning("%s (with %d features here, none may be expected)", message, len(tree_keys))
    return matched


def remove_noises(features_dir: str | Path, out_dir: str | Path, megaface_noises: str | Path,
                  facescrub_noises: str | Path, suffix: str = DEFAULT_SUFFIX, seed: int = 0,
                  facescrub_list: str | Path | None = None, progress: bool = True
                  ) -> dict[str, int]:
    """Write every feature of ``features_dir/{megaface,facescrub}`` to ``out_dir`` with one
    extra dimension: 0 when clean; 100 for a listed distractor (pushed out of reach); a listed
    probe becomes its identity's mean clean feature plus uniform noise of amplitude 1e-3,
    re-normalised, extra dimension 0. Nothing is deleted. Returns counts."""
    from tqdm import tqdm

    features_dir, out_dir = Path(features_dir), Path(out_dir)
    if out_dir.resolve() == features_dir.resolve():
        raise MegaFaceError("remove_noises writes a new tree: --clean-features-dir must differ "
                            f"from --features-dir ({features_dir})")
    rng = np.random.default_rng(seed)
    fs_noise = parse_noise_list(facescrub_noises, FACESCRUB)
    mf_noise = parse_noise_list(megaface_noises, MEGAFACE)
    summary = {"probes": 0, "probes_replaced": 0, "probes_kept_no_clean_mate": 0,
               "probes_missing": 0, "distractors": 0, "distractors_flagged": 0,
               "distractors_skipped": 0}

    probe_root, distractor_root = features_dir / FACESCRUB, features_dir / MEGAFACE
    paths, labels = probe_paths_and_labels(probe_root, facescrub_list, suffix)
    probes = load_probes(probe_root, paths, suffix, progress)
    feats, kept = probes.feats, probes.kept
    summary["probes_missing"] = len(probes.missing)
    distractor_paths = list_feature_files(distractor_root, suffix)
    if not distractor_paths:
        raise MissingInputError(f"{distractor_root}: no feature files (*{suffix})")
    # both lists are checked before anything is written (a million files take hours)
    check_noise_list_matches(facescrub_noises, fs_noise, (_probe_key(paths[i]) for i in kept),
                             probe_root, FACESCRUB_PROBES)
    check_noise_list_matches(megaface_noises, mf_noise, map(_distractor_key, distractor_paths),
                             distractor_root, MEGAFACE_DISTRACTORS)
    noisy = np.array([_probe_key(paths[i]) in fs_noise for i in kept], dtype=bool)
    kept_labels = np.asarray([labels[i] for i in kept])
    clean_means: dict[Any, np.ndarray | None] = {}  # per identity, computed once

    def clean_mean(label) -> np.ndarray | None:
        if label not in clean_means:
            clean = feats[(kept_labels == label) & ~noisy]
            clean_means[label] = clean.mean(0) if len(clean) else None
        return clean_means[label]

    for row, i in enumerate(kept):
        vec = feats[row]
        if noisy[row]:
            mean = clean_mean(kept_labels[row])
            if mean is not None:
                vec = mean + rng.uniform(-PROBE_NOISE_AMPLITUDE, PROBE_NOISE_AMPLITUDE,
                                                  vec.size)
                vec = vec / np.linalg.norm(vec)
                summary["probes_replaced"] += 1
            else:  # nothing clean to stand in for it: keep it, and say so
                summary["probes_kept_no_clean_mate"] += 1
        write_feature(out_dir / FACESCRUB / (paths[i] + suffix), np.append(vec, 0.0))
        summary["probes"] += 1

    dim = feats.shape[1]
    skipped: list[str] = []
    for rel in tqdm(distractor_paths, desc="megaface", unit="file", disable=not progress,
                    leave=False):
        path = distractor_root / (rel + suffix)
        try:
            vec = read_feature(path)
            if vec.size != dim:
                raise FeatureFormatError(f"{path}: {vec.size} dims, expected {dim} (the probe "
                                         "features')")
        except FeatureFormatError as e:  # left out of the clean tree, named and counted
            skipped.append(str(e))
            continue
        flagged = _distractor_key(rel) in mf_noise
        extra = DISTRACTOR_NOISE_FLAG if flagged else 0.0
        write_feature(out_dir / MEGAFACE / (rel + suffix), np.append(vec, extra))
        summary["distractors"] += 1
        summary["distractors_flagged"] += int(flagged)
    summary["distractors_skipped"] = len(skipped)
    _report_problems(skipped, "distractor features (not written to the clean tree)")
    record = {"source": str(features_dir), "megaface_noises": str(megaface_noises),
              "facescrub_noises": str(facescrub_noises), "seed": seed, "summary": summary,
              "skipped_distractor_files": skipped[:MAX_LISTED_PROBLEMS],
              "missing_probe_files": probes.missing[:MAX_LISTED_PROBLEMS]}
    atomic_write_text(out_dir / NOISE_REMOVAL_RECORD, json.dumps(record, indent=2) + "\n")
    return summary


def warn_unless_cleaned(features_dir: str | Path) -> bool:
    """Whether ``features_dir`` is a tree remove_noises wrote; a warning when not, since the
    published MegaFace numbers (and the devkit comparison) use the cleaned features."""
    cleaned = (Path(features_dir) / NOISE_REMOVAL_RECORD).is_file()
    if not cleaned:
        log.warning("%s has no %s: these are not the noise-removed features (run --action "
                    "remove_noises and pass its --clean-features-dir), so the numbers are not "
                    "comparable with published ones", features_dir, NOISE_REMOVAL_RECORD)
    return cleaned


# ----------------------------------------------------------------------------- cropping

def require_images(root: str | Path, what: str) -> None:
    """MissingInputError unless ``root`` is a folder holding at least one image (found
    lazily: the first one ends the search, not a walk over a million files)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError(f"{root}: {what} folder " + ("is a file, not a folder"
                                                            if root.exists() else "not found"))
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in root.rglob("*")):
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


def crop_tree(aligner, src_root: str | Path, dst_root: str | Path, num_workers: int = 2,
              progress: bool = True) -> dict[str, int]:
    """Align every image under ``src_root`` into the same relative path under ``dst_root``.

    Images already done are skipped (resumable). No face: the centre crop is written and the
    image listed in ``dst_root/faceless.txt``; undecodable ones go to ``unreadable.txt``."""
    from align_faces import align_files

    src_root, dst_root = Path(src_root), Path(dst_root)
    images = _input_images(src_root, "image")
    summary = {"images": len(images), "skipped_existing": 0, "aligned": 0, "faceless": 0,
               "unreadable": 0, "with_box": 0}
    todo = [p for p in images if not (dst_root / p.relative_to(src_root)).exists()]
    summary["skipped_existing"] = len(images) - len(todo)
    listed = {name: _ListFile(dst_root / f"{name}.txt") for name in ("faceless", "unreadable")}
    for done in align_files(aligner, todo, getattr(aligner, "batch_size", 1),
                            hint_for=read_bbox_json, num_workers=num_workers,
                            desc=f"crop {src_root.name}", progress=progress, leave=False):
        rel = done.path.relative_to(src_root)
        if done.error is not None:
            summary["unreadable"] += 1
            listed["unreadable"].add(str(rel), str(done.error))
            continue
        summary["with_box"] += done.hint is not None
        if done.face is None:
            summary["faceless"] += 1
            listed["faceless"].add(str(rel))
        else:
            summary["aligned"] += 1
        write_image(dst_root / rel, done.crop)
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

def gen_features(model, image_root: str | Path, feature_root: str | Path,
                 suffix: str = DEFAULT_SUFFIX, batch_size: int = 128, device=None,
                 num_workers: int = 2, progress: bool = True) -> dict[str, int]:
    """One devkit feature file ``<image file name><suffix>`` per aligned image (L2-normalised,
    flip-augmented, see lfw_eval.embed) in the mirrored tree; existing files are kept."""
    import cv2
    from tqdm import tqdm

    from align_faces import read_image_or_error
    from lfw_eval import embed

    image_root, feature_root = Path(image_root), Path(feature_root)
    images = _input_images(image_root, "aligned image")
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

def _megaface_size_lists(templatelists: Path, sizes: Iterable[int]) -> dict[int, list[str]]:
    """The devkit's distractor subsets ``megaface_features_list.json_<N>_1`` that exist."""
    found = {}
    for n in sizes:
        path = templatelists / f"megaface_features_list.json_{n}_1"
        if path.is_file():
            found[n] = [str(p) for p in read_devkit_list(path)["path"]]
    return found


def run_evaluate(args, cfg) -> dict[str, Any]:
    """The ``evaluate`` action: load the feature trees, score, write JSON and PNGs."""
    import megaface_eval as me

    features_dir = Path(args.features_dir)
    if not (args.probe_features and args.distractor_features):
        if not features_dir.is_dir():
            raise MissingInputError(f"{features_dir}: --features-dir not found")
        warn_unless_cleaned(features_dir)
    probe_root = Path(args.probe_features or features_dir / FACESCRUB)
    distractor_root = Path(args.distractor_features or features_dir / MEGAFACE)
    templatelists = Path(args.templatelists) if args.templatelists else None
    facescrub_list = args.facescrub_list or (
        templatelists / "facescrub_features_list.json"
        if templatelists and (templatelists / "facescrub_features_list.json").is_file() else None)
    size_lists = _megaface_size_lists(templatelists, args.sizes) if templatelists else {}
    subset = args.subset if args.subset != "auto" else ("devkit" if size_lists else "first")
    if subset == "devkit" and not size_lists:
        raise MegaFaceError("--subset devkit needs --templatelists with megaface_features_list"
                            ".json_<N>_1 files for the requested --sizes")

    paths, labels = probe_paths_and_labels(probe_root, facescrub_list, args.suffix)
    loaded_probes = load_probes(probe_root, paths, args.suffix)
    probes = loaded_probes.feats
    labels = [labels[i] for i in loaded_probes.kept]
    if subset == "devkit":  # every listed path, the largest list first
        distractor_paths = list(dict.fromkeys(p for n in sorted(size_lists, reverse=True)
                                              for p in size_lists[n]))
    elif args.megaface_list:
        distractor_paths = [str(p) for p in read_devkit_list(args.megaface_list)["path"]]
    else:
        distractor_paths = list_feature_files(distractor_root, args.suffix)
    # the probes fix the dimension: a distractor of another one is skipped, never the reverse
    loaded = load_features(distractor_root, distractor_paths, args.suffix, MEGAFACE,
                           dim=probes.shape[1], dim_from=" (the probe features')")
    distractors, dkept = loaded.feats, loaded.kept
    distractor_problems = loaded.skipped
    _report_problems(distractor_problems, "distractor features")

    common = dict(max_rank=args.max_rank, fars=tuple(args.fars), chunk_size=args.chunk_size,
                  device=cfg.device if cfg.device != "auto" else None)
    if subset == "devkit":
        position = {distractor_paths[j]: row for row, j in enumerate(dkept)}
        results = {}
        for n, listed in sorted(size_lists.items()):
            order = [position[p] for p in listed if p in position]
            (results[n],) = me.megaface_evaluate(probes, labels, distractors, sizes=[len(order)],
                                                 order=order, **common).values()
    else:
        order = np.random.default_rng(cfg.seed).permutation(len(distractors)) \
            if subset == "random" else None
        results = me.megaface_evaluate(probes, labels, distractors, sizes=args.sizes,
                                       order=order, **common)

    out = Path(args.results_dir)
    report = {
        "protocol": {"score": "1 - |a-b|^2/2 (cosine for unit features)",
                     "ties": "a distractor scoring exactly the genuine score does not count "
                             "against the probe (strict >)",
                     "subset": subset, "seed": cfg.seed if subset == "random" else None,
                     "far_threshold": "(floor(FAR*#impostors)+1)-th largest impostor score, "
                                      "accept strictly above"},
        "probe_features": str(probe_root), "distractor_features": str(distractor_root),
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
    me.plot_cmc(results, out / "cmc.png")
    me.plot_rank1_vs_distractors(results, out / "rank1_vs_distractors.png")
    if args.fars:
        me.plot_roc_curves(results, out / "roc.png")
    print(me.format_results(results, args.fars))
    for what, problems in (("probe", loaded_probes.missing), ("distractor", distractor_problems)):
        if problems:  # the table holds fewer features than the user has: say so beside it
            print(f"{len(problems)} {what} features skipped (first {MAX_LISTED_PROBLEMS} "
                  f"named in the log and in {out / 'megaface_results.json'})")
    log.info("results in %s", out)
    return report


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
    from config import build_parser

    parser = build_parser(__doc__.split("\n")[0])
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
    me.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                    help="distractor counts N (those up to the number available)")
    me.add_argument("--max-rank", type=int, default=DEFAULT_MAX_RANK, help="CMC ranks 1..this")
    me.add_argument("--fars", type=float, nargs="*", default=list(DEFAULT_FARS),
                    help="TAR at these FARs (none: identification only)")
    me.add_argument("--subset", default="auto", choices=["auto", "first", "random", "devkit"],
                    help="distractors of size N: the devkit's lists (auto when --templatelists "
                         "has them), the first N, or a --seed permutation's first N")
    me.add_argument("--chunk-size", type=int, default=None, help="distractors per score block")
    me.add_argument("--results-dir", default="runs/megaface", help="JSON and PNGs (evaluate)")
    me.add_argument("--devkit-dir", help="the MegaFace devkit (devkit action)")
    me.add_argument("--devkit-python", default=sys.executable, help="python for the devkit")
    me.add_argument("--run", action="store_true", help="devkit: run the command, not just print")
    return parser


def _require(args, *names: str) -> None:
    missing = [n for n in names if not getattr(args, n)]
    if missing:
        raise SystemExit(f"--action {args.action} needs " + ", ".join(
            "--" + n.replace("_", "-") for n in missing))


def _print_summary(title: str, summary: dict[str, int]) -> None:
    print(f"{title}: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


def main(argv: Sequence[str] | None = None) -> int:
    from config import parse_config

    cfg, args = parse_config(argv, parser=build_arg_parser())
    device = None if cfg.device == "auto" else cfg.device
    sets = [(MEGAFACE, args.megaface_images), (FACESCRUB, args.facescrub_images)]
    if args.action == "crop_megaface":
        if not any(src for _, src in sets):
            raise SystemExit("crop_megaface needs --megaface-images and/or --facescrub-images")
        for name, src in sets:  # every input checked before hours of work on the first
            if src:
                require_images(src, f"--{name}-images")
        from align_faces import FaceAligner

        aligner = FaceAligner(device=device)
        for name, src in sets:
            if src:
                _print_summary(f"crop {name}", crop_tree(aligner, src, Path(args.aligned_dir)
                                                         / name, cfg.num_workers))
    elif args.action == "gen_features":
        _require(args, "checkpoint")
        from models import load_backbone

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
        for src in present:
            _print_summary(f"features {src.name}", gen_features(
                model, src, Path(args.features_dir) / src.name, args.suffix, cfg.batch_size,
                device, cfg.num_workers))
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
