"""MegaFace noise removal, InsightFace's way: their lists of mislabelled FaceScrub probes
(``facescrub_noises.txt``) and MegaFace distractors that are really FaceScrub people
(``megaface_noises.txt``) are applied to a feature tree, writing a new one
(:func:`remove_noises`) with a record of what was done (``remove_noises.json``), which
:func:`warn_unless_cleaned` looks for. Every feature gains one extra dimension: 0 when clean,
100 for a listed distractor (out of reach of every probe); a listed probe is replaced by its
identity's clean features summed plus tiny noise. Nothing is deleted. A noise list that is empty,
or names none of a tree large enough to expect matches, is an error naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from evaluation.megaface_eval import DEFAULT_SIZES, MegaFaceError
from evaluation.megaface_features import (
    DEFAULT_SUFFIX,
    FACESCRUB,
    FEATURE_SOURCE_NAME,
    MAX_LISTED_PROBLEMS,
    MEGAFACE,
    FeatureFormatError,
    LoadedFeatures,
    list_feature_files,
    load_probes,
    probe_paths_and_labels,
    read_feature,
    read_feature_source,
    report_problems,
    require_one_source,
    write_feature,
    write_feature_source,
)
from utils import MissingInputError, ProvenanceError, atomic_write_text, get_logger

log = get_logger("megaface")  # megaface.py's logger: these messages are part of its run

DISTRACTOR_NOISE_FLAG = 100.0  # InsightFace's value in the extra dimension of a noisy distractor
PROBE_NOISE_AMPLITUDE = 1e-3  # uniform noise added to the sum of a noisy probe's mates
MEGAFACE_NOISE_PATH_PARTS = 3  # noise entries are "<a>/<flickr user>/<image>"
NOISE_REMOVAL_RECORD = "remove_noises.json"  # written into the clean tree: what was done to it
# The devkit's largest sets, to tell "this noise list names nothing here" (wrong list or paths)
# from "a small tree that happens to hold none of the listed images"
MEGAFACE_DISTRACTORS = max(DEFAULT_SIZES)  # the 1M distractor set megaface_eval scores
FACESCRUB_PROBES = 3530


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
    probe becomes the sum of its identity's clean features plus uniform noise of amplitude
    1e-3, normalised (the sum, as InsightFace: the noise barely moves it off the centre),
    extra dimension 0. Nothing is deleted. Returns counts."""
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    if out_dir.resolve() == features_dir.resolve():
        raise MegaFaceError("remove_noises writes a new tree: --clean-features-dir must differ "
                            f"from --features-dir ({features_dir})")
    rng = np.random.default_rng(seed)
    noisy_probes = parse_noise_list(facescrub_noises, FACESCRUB)
    noisy_distractors = parse_noise_list(megaface_noises, MEGAFACE)
    summary = {"probes": 0, "probes_replaced": 0, "probes_kept_no_clean_mate": 0,
               "probes_missing": 0, "distractors": 0, "distractors_flagged": 0,
               "distractors_skipped": 0}

    probe_root, distractor_root = features_dir / FACESCRUB, features_dir / MEGAFACE
    source = require_one_source(probe_root, distractor_root)  # one model's, or refused
    for tree in (FACESCRUB, MEGAFACE):  # features are overwritten, never deleted: no mixing
        _check_clean_tree(out_dir / tree, source, features_dir, suffix)
    paths, labels = probe_paths_and_labels(probe_root, facescrub_list, suffix)
    probes = load_probes(probe_root, paths, suffix, progress)
    summary["probes_missing"] = len(probes.missing)
    distractor_paths = list_feature_files(distractor_root, suffix)
    if not distractor_paths:
        raise MissingInputError(f"{distractor_root}: no feature files (*{suffix})")
    # both lists are checked before anything is written (a million files take hours)
    check_noise_list_matches(facescrub_noises, noisy_probes,
                             (_probe_key(paths[i]) for i in probes.kept), probe_root,
                             FACESCRUB_PROBES)
    check_noise_list_matches(megaface_noises, noisy_distractors,
                             map(_distractor_key, distractor_paths), distractor_root,
                             MEGAFACE_DISTRACTORS)
    if source is not None:  # the same model's features; recorded first: a killed run resumes
        for tree in (FACESCRUB, MEGAFACE):
            write_feature_source(out_dir / tree, source)
    _write_clean_probes(probes, paths, labels, noisy_probes, out_dir / FACESCRUB, suffix,
                        rng, summary)
    skipped = _write_clean_distractors(distractor_root, distractor_paths, noisy_distractors,
                                       probes.feats.shape[1], out_dir / MEGAFACE, suffix,
                                       progress, summary)
    summary["distractors_skipped"] = len(skipped)
    report_problems(skipped, "distractor features (not written to the clean tree)")
    record = {"source": str(features_dir), "megaface_noises": str(megaface_noises),
              "facescrub_noises": str(facescrub_noises), "seed": seed, "summary": summary,
              "skipped_distractor_files": skipped[:MAX_LISTED_PROBLEMS],
              "missing_probe_files": probes.missing[:MAX_LISTED_PROBLEMS]}
    atomic_write_text(out_dir / NOISE_REMOVAL_RECORD, json.dumps(record, indent=2) + "\n")
    return summary


def _check_clean_tree(root: Path, source: dict | None, features_dir: Path, suffix: str) -> None:
    """ProvenanceError, naming both checkpoints, when ``root`` already holds noise-removed
    features of another source than ``source`` (or that do not say while ``source`` does):
    the files this run does not overwrite would be scored with its own."""
    if not (root.is_dir() and next(root.rglob(f"*{suffix}"), None)):
        return
    saved = read_feature_source(root)
    if saved != source:
        was, now = ((r or {}).get("checkpoint", f"no {FEATURE_SOURCE_NAME}")
                    for r in (saved, source))
        raise ProvenanceError(f"{root}: holds noise-removed features of another source ({was}) "
                              f"than {features_dir} ({now}); write into another "
                              "--clean-features-dir, or delete that one")


def _write_clean_probes(probes: LoadedFeatures, paths: list[str], labels: list[Any],
                        noisy_keys: set[str], out_root: Path, suffix: str,
                        rng: np.random.Generator, summary: dict[str, int]) -> None:
    """Write each loaded probe under ``out_root`` with a 0 appended; a listed (noisy) probe
    is first replaced by its identity's clean features summed plus uniform noise, normalised,
    or kept when its identity has no clean probe. ``summary`` counts what happened."""
    feats, kept = probes.feats, probes.kept
    noisy = np.array([_probe_key(paths[i]) in noisy_keys for i in kept], dtype=bool)
    kept_labels = np.asarray([labels[i] for i in kept])
    clean_sums: dict[Any, np.ndarray | None] = {}  # per identity, computed once

    def clean_sum(label) -> np.ndarray | None:
        if label not in clean_sums:
            clean = feats[(kept_labels == label) & ~noisy]
            clean_sums[label] = clean.sum(0, dtype=np.float64) if len(clean) else None
        return clean_sums[label]

    for row, i in enumerate(kept):
        vec = feats[row]
        if noisy[row]:
            centre = clean_sum(kept_labels[row])
            if centre is not None:
                vec = centre + rng.uniform(-PROBE_NOISE_AMPLITUDE, PROBE_NOISE_AMPLITUDE,
                                         vec.size)
                vec = vec / np.linalg.norm(vec)
                summary["probes_replaced"] += 1
            else:  # nothing clean to stand in for it: keep it, and say so
                summary["probes_kept_no_clean_mate"] += 1
        write_feature(out_root / (paths[i] + suffix), np.append(vec, 0.0))
        summary["probes"] += 1


def _write_clean_distractors(distractor_root: Path, distractor_paths: list[str],
                             noisy_keys: set[str], dim: int, out_root: Path, suffix: str,
                             progress: bool, summary: dict[str, int]) -> list[str]:
    """Write each readable distractor of dimension ``dim`` under ``out_root`` with its extra
    dimension: DISTRACTOR_NOISE_FLAG when listed, else 0. Returns the problems of those left
    out; ``summary`` counts the rest."""
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
        flagged = _distractor_key(rel) in noisy_keys
        extra = DISTRACTOR_NOISE_FLAG if flagged else 0.0
        write_feature(out_root / (rel + suffix), np.append(vec, extra))
        summary["distractors"] += 1
        summary["distractors_flagged"] += int(flagged)
    return skipped


def warn_unless_cleaned(features_dir: str | Path) -> bool:
    """Whether ``features_dir`` is a tree remove_noises wrote; a warning when not, since the
    published MegaFace numbers (and the devkit comparison) use the cleaned features."""
    cleaned = (Path(features_dir) / NOISE_REMOVAL_RECORD).is_file()
    if not cleaned:
        log.warning("%s has no %s: these are not the noise-removed features (run --action "
                    "remove_noises and pass its --clean-features-dir), so the numbers are not "
                    "comparable with published ones", features_dir, NOISE_REMOVAL_RECORD)
    return cleaned
