"""MegaFace's devkit feature files and loading them: one file per image
(``<features-dir>/{megaface,facescrub}/<relative image path><suffix>``), each an OpenCV
float32 column-vector matrix; the devkit's JSON template lists; and loading whole trees.

Nothing is lost silently: a feature that is missing, unreadable, not a float32 column vector,
non-finite or of another dimension is left out of :func:`load_features`' array, counted and
named (:class:`LoadedFeatures`); a probe is never left out for being broken
(:func:`load_probes` refuses it: its genuine pairs are the protocol), only when the devkit's
list names a file that does not exist, and then counted and named too.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from evaluation.megaface_eval import MegaFaceError
from utils import (
    CHECKPOINT_HASH_KEY,
    TEMP_SUFFIX,
    MissingInputError,
    ProvenanceError,
    atomic_write_text,
    first_few,
    get_logger,
    temp_prefix,
)

log = get_logger("megaface")  # megaface.py's logger: these messages are part of its run

# The devkit's feature file (OpenCV matrix): int32 rows, cols, element size, type; then data.
FEATURE_HEADER = struct.Struct("<4i")
FEATURE_COLS = 1
FEATURE_ELEMENT_BYTES = 4
CV_32F = 5
DEFAULT_SUFFIX = "_0.bin"
MEGAFACE, FACESCRUB = "megaface", "facescrub"  # the two trees: distractors, probes
MAX_LISTED_PROBLEMS = 10  # files named in the log and the results file; the count is complete
MAX_PROBLEMS_IN_ERROR = 3  # files named in a one-line error
# in each feature tree that gen_features writes: the checkpoint (by content) and the aligned
# image tree its features came from, so two models' features are never scored together
FEATURE_SOURCE_NAME = "features_source.json"


class FeatureFormatError(MegaFaceError):
    """A feature file that is not a devkit float32 column vector of finite values; the
    message names it."""


class MissingFeatureError(FeatureFormatError):
    """A feature file that does not exist (e.g. an image the devkit lists was never aligned)."""


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
    tmp = path.with_name(temp_prefix(path) + TEMP_SUFFIX.lstrip("."))  # ".<name>.tmp"
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


def read_feature_source(root: str | Path) -> dict | None:
    """The record of what a feature tree came from (see FEATURE_SOURCE_NAME), or None when
    it has none (made elsewhere, or before these records); ProvenanceError if unreadable."""
    path = Path(root) / FEATURE_SOURCE_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError: ValueErrors
        raise ProvenanceError(f"{path}: unreadable record of what these features came from "
                              f"({e})") from None
    if not isinstance(record, dict):
        raise ProvenanceError(f"{path}: not a record of what these features came from")
    return record


def write_feature_source(root: str | Path, record: dict) -> None:
    """Record (atomically) what the features in ``root`` come from."""
    atomic_write_text(Path(root) / FEATURE_SOURCE_NAME, json.dumps(record, indent=2) + "\n")


def require_one_source(probe_root: Path, distractor_root: Path) -> dict | None:
    """What both feature trees came from. ProvenanceError, naming both trees and their
    checkpoints, when they came from two checkpoints, or when only one records its own (the
    other's model is unknown). None, with a warning, when neither records it (features made
    by other tools): nothing can be checked then."""
    probe, distractor = read_feature_source(probe_root), read_feature_source(distractor_root)
    if probe is None and distractor is None:
        log.warning("%s and %s do not record the checkpoint they came from (no %s); make sure "
                    "both were made by one model", probe_root, distractor_root,
                    FEATURE_SOURCE_NAME)
        return None
    known = [r.get(CHECKPOINT_HASH_KEY) if r else None for r in (probe, distractor)]
    if known[0] != known[1] or None in known:
        named = [f"{root} ({r.get('checkpoint', '?') if r else 'no ' + FEATURE_SOURCE_NAME})"
                 for root, r in ((probe_root, probe), (distractor_root, distractor))]
        raise ProvenanceError(f"probe and distractor features come from different or unknown "
                              f"checkpoints: {named[0]} vs {named[1]}; make both with one "
                              f"checkpoint (--action gen_features)")
    return probe


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


def report_problems(problems: list[str], what: str) -> None:
    """A warning counting ``problems`` (``what`` says which) and naming the first few."""
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
            "skipped; regenerate them): " + first_few(loaded.bad, MAX_PROBLEMS_IN_ERROR, "; "))


def load_probes(root: Path, paths: Sequence[str], suffix: str, progress: bool = True
                ) -> LoadedFeatures:
    """The probe features: any broken one is an error (:func:`_refuse_bad_probes`); files the
    devkit's list names but that do not exist are skipped, counted and named, since FaceScrub
    is downloaded from URLs and many copies lack some images."""
    loaded = load_features(root, paths, suffix, FACESCRUB, progress)
    _refuse_bad_probes(loaded, root)
    report_problems(loaded.missing, "probe features (listed but missing)")
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
