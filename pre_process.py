"""Validate and index RecordIO training sets, or pack an aligned image tree into one.

Two modes::

    python pre_process.py --rec data/faces_emore/train.rec     # validate + write the index
    python pre_process.py --pack data/mine_aligned --out data/mine/train.rec

Supported files. InsightFace sets (faces_emore / MS1MV2, MS1MV3, Glint360K): record 0 is a
header whose label is ``[id_start, id_end)``; records ``1 .. id_start-1`` are images (label =
class, or the first value of a label array); records ``id_start .. id_end-1`` describe the
identities with label ``[img_start, img_end)``. Plain im2rec files have no header record: every
record is an image. Without a ``.idx`` the file is scanned record by record (keys are then the
record's position in the file).

The compact index (``train.index.npz`` beside ``train.rec``; NumPy ``.npz``) holds, for the
usable image records only:

* ``keys``, ``offsets``, ``labels``: int64 arrays, one entry per image (byte offset of its
  record in the ``.rec``; label in ``0 .. num_classes-1``);
* ``class_counts``: int64 images per class; ``num_classes``; ``has_header``;
* ``corrupt_offsets``: byte offsets of the records that were skipped;
* ``lost``: records of the file that cannot be used (damaged, cut off, or not listed in the
  ``.idx``), ``unlisted_offsets``, ``expected_images`` (header sets: what the header
  announces, else -1), ``unreadable_bytes`` (bytes in no readable record);
* ``rec_size`` / ``rec_mtime_ns`` (and the same for the ``.idx``): the index is used only
  while these still match, so a replaced ``.rec`` is never read through a stale index.

``data_gen.FaceRecordDataset`` loads this index when it is fresh and otherwise builds the same
index in memory (slower for MS1M-sized sets: run this script once).

A set that lost records (a truncated download, garbage bytes, a ``.idx`` that does not match
the ``.rec``) is an error here and in training, naming the file, the count and the first
byte offsets, unless ``--allow-lost-records`` accepts what remains (then a warning).

``--pack`` takes ``SRC/<identity>/<image>`` exactly (images at other depths are refused: they
would merge people into one label or belong to none), writes the ``.rec``, ``.idx``, index and
``property`` to temporaries and renames them into place at the end, so an interrupted pack
leaves the previous set readable. ``--out`` may not lie inside ``SRC``, and a folder holds one
set (InsightFace's ``property`` file describes the folder's set).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

import recordio
from utils import (
    FACE_CROP_SIZE,
    IMAGE_EXTENSIONS,
    ImageReadError,
    ToolkitError,
    atomic_write_bytes,
    atomic_write_text,
    decode_image,
    encode_image,
    get_logger,
    list_images,
    remove_stale_temporaries,
    run_cli,
    temp_path_for,
)

INDEX_SUFFIX = ".index.npz"
INDEX_VERSION = 2  # 2: lost / unlisted_offsets / expected_images / unreadable_bytes
HEADER_LABELS = 2  # the header record's label array: [id_start, id_end)
JPEG_QUALITY = 95
JPEG_SIGNATURE = b"\xff\xd8\xff"
MAX_LISTED = 10  # problems listed by name in a summary; the rest are counted
SAVE_INDEX_TIP_IMAGES = 100_000  # an in-memory index this large suggests saving it
LOST_OFFSETS_SHOWN = 5  # byte offsets of lost records an error message lists

log = get_logger("face.pre_process")


class DatasetError(ToolkitError, ValueError):
    """A training set that cannot be used as it is; the message names the file or folder."""


class LostRecordsError(DatasetError):
    """A RecordIO set that lost records (see :func:`require_complete`)."""


# ----------------------------------------------------------------------------- the index

@dataclass
class RecordIndex:
    """The usable image records of a ``.rec`` file and what was wrong with the others."""

    rec_path: Path
    keys: np.ndarray  # int64, record key of each image
    offsets: np.ndarray  # int64, byte offset of each image record
    labels: np.ndarray  # int64, class of each image, 0 .. num_classes-1
    num_classes: int
    has_header: bool = False
    corrupt: list[str] = field(default_factory=list)  # one message per skipped record
    corrupt_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    non_image_records: int = 0  # headerless files: records with no image bytes
    identity_mismatches: int = 0  # header sets: image label != the identity listing it
    idx_path: Path | None = None
    # records of the file that cannot be used: damaged, cut off, or not in the .idx
    lost: int = 0
    unlisted_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    expected_images: int = -1  # what a header record announces; -1 without one
    # bytes of the .rec in no readable record (a damaged stretch may hide several records)
    unreadable_bytes: int = 0

    def __len__(self) -> int:
        return int(self.labels.size)

    @property
    def corrupt_count(self) -> int:
        return len(self.corrupt)

    @property
    def lost_offsets(self) -> np.ndarray:
        """Byte offsets of the lost records and damaged stretches that are known, sorted."""
        both = np.concatenate([self.corrupt_offsets, self.unlisted_offsets])
        return np.unique(both[both >= 0])

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def summary(self) -> dict:
        counts = self.class_counts
        return {
            "file": str(self.rec_path),
            "format": "InsightFace (header record)" if self.has_header else "im2rec (no header)",
            "images": len(self),
            "identities": self.num_classes,
            "empty identities": int((counts == 0).sum()),
            "images per identity min": int(counts.min()) if counts.size else 0,
            "images per identity median": float(np.median(counts)) if counts.size else 0.0,
            "images per identity max": int(counts.max()) if counts.size else 0,
            "corrupt records": self.corrupt_count,
            "records not in the .idx": int(self.unlisted_offsets.size),
            "records lost or damaged": self.lost,
            "bytes in no readable record": self.unreadable_bytes,
            "records without image": self.non_image_records,
            "identity/label disagreements": self.identity_mismatches,
        }

    def format_summary(self) -> str:
        items = self.summary()
        width = max(map(len, items))
        lines = [f"  {k:<{width}} : {v}" for k, v in items.items()]
        lines += [f"  corrupt: {msg}" for msg in self.corrupt[:MAX_LISTED]]
        if self.corrupt_count > MAX_LISTED:
            lines.append(f"  ... and {self.corrupt_count - MAX_LISTED} more corrupt records")
        return "\n".join(lines)


def index_path_for(rec_path: str | Path) -> Path:
    """``data/x/train.rec`` -> ``data/x/train.index.npz``."""
    rec_path = Path(rec_path)
    return rec_path.with_name(rec_path.stem + INDEX_SUFFIX)


def _file_stamp(path: Path | None) -> tuple[int, int]:
    if path is None or not path.is_file():
        return -1, -1
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def save_index(index: RecordIndex, path: str | Path | None = None) -> Path:
    """Write ``index`` as ``.npz`` (atomically); returns the path."""
    path = Path(path) if path else index_path_for(index.rec_path)
    rec_size, rec_mtime = _file_stamp(index.rec_path)
    idx_size, idx_mtime = _file_stamp(index.idx_path)
    buf = io.BytesIO()
    np.savez(buf, version=INDEX_VERSION, keys=index.keys, offsets=index.offsets,
             labels=index.labels, class_counts=index.class_counts,
             num_classes=index.num_classes, has_header=index.has_header,
             corrupt_offsets=index.corrupt_offsets, corrupt_count=index.corrupt_count,
             non_image_records=index.non_image_records,
             identity_mismatches=index.identity_mismatches,
             lost=index.lost, unlisted_offsets=index.unlisted_offsets,
             expected_images=index.expected_images, unreadable_bytes=index.unreadable_bytes,
             rec_size=rec_size, rec_mtime_ns=rec_mtime,
             idx_size=idx_size, idx_mtime_ns=idx_mtime)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_index(rec_path: str | Path, idx_path: str | Path | None = None,
               index_path: str | Path | None = None) -> RecordIndex | None:
    """The saved index of ``rec_path`` if it exists and still matches the ``.rec`` and
    ``.idx`` on disk (size and mtime), else None."""
    rec_path = Path(rec_path)
    index_path = Path(index_path) if index_path else index_path_for(rec_path)
    idx = _resolve_idx(rec_path, idx_path)
    if not index_path.is_file():
        return None
    try:
        with np.load(index_path, allow_pickle=False) as z:
            if int(z["version"]) != INDEX_VERSION:
                log.warning("%s was written by another version; rebuilding it", index_path)
                return None
            fresh = ((int(z["rec_size"]), int(z["rec_mtime_ns"])) == _file_stamp(rec_path)
                     and (int(z["idx_size"]), int(z["idx_mtime_ns"])) == _file_stamp(idx))
            if not fresh:
                log.warning("%s is stale (the .rec or .idx changed); ignoring it", index_path)
                return None
            corrupt_count = int(z["corrupt_count"])
            return RecordIndex(
                rec_path=rec_path, keys=z["keys"].astype(np.int64),
                offsets=z["offsets"].astype(np.int64), labels=z["labels"].astype(np.int64),
                num_classes=int(z["num_classes"]), has_header=bool(z["has_header"]),
                corrupt=[f"(from {index_path.name})"] * corrupt_count,
                corrupt_offsets=z["corrupt_offsets"].astype(np.int64),
                non_image_records=int(z["non_image_records"]),
                identity_mismatches=int(z["identity_mismatches"]), idx_path=idx,
                lost=int(z["lost"]), unlisted_offsets=z["unlisted_offsets"].astype(np.int64),
                expected_images=int(z["expected_images"]),
                unreadable_bytes=int(z["unreadable_bytes"]))
    # a cut-off or overwritten .npz fails in zipfile, in NumPy's header parser or at EOF: it
    # is only a cache, so it is rebuilt from the .rec
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        log.warning("cannot use index %s (%s); rebuilding it from %s", index_path, e,
                    rec_path)
        return None


def _resolve_idx(rec_path: Path, idx_path: str | Path | None) -> Path | None:
    if idx_path is not None:
        idx_path = Path(idx_path)
        if not idx_path.is_file():
            raise FileNotFoundError(f"index file not found: {idx_path}")
        return idx_path
    default = recordio.default_idx_path(rec_path)
    return default if default.is_file() else None


def _label_pair(payload: bytes | None) -> tuple[float, float] | None:
    """The first two labels of a record with a label array and no image (the header and
    identity records of InsightFace sets), else None."""
    if payload is None:
        return None
    try:
        header, image = recordio.unpack_payload(payload)
    except recordio.RecordIOError:
        return None
    if header.flag < HEADER_LABELS or image:
        return None
    return float(header.label[0]), float(header.label[1])


def _parse_header_record(payload: bytes | None) -> tuple[int, int] | None:
    """``(id_start, id_end)`` when ``payload`` is an InsightFace header record, else None."""
    pair = _label_pair(payload)
    if pair is None:
        return None
    id_start, id_end = pair
    if not (1 <= id_start <= id_end) or id_start != int(id_start) or id_end != int(id_end):
        return None
    return int(id_start), int(id_end)


class _Collector:
    """Accumulates image records while walking a file."""

    def __init__(self, reader: recordio.RecordReader, check_images: bool):
        self.reader = reader
        self.check_images = check_images
        self.keys: list[int] = []
        self.offsets: list[int] = []
        self.labels: list[int] = []
        self.corrupt: list[str] = []
        self.corrupt_offsets: list[int] = []
        self.non_image = 0

    def bad(self, offset: int, message: str) -> None:
        self.corrupt.append(message)
        self.corrupt_offsets.append(offset)

    def add(self, key: int, offset: int, payload: bytes | None, error: str | None,
            image_required: bool) -> None:
        where = f"{self.reader.path}: record {key} at byte offset {offset}"
        if error is not None:
            self.bad(offset, error)
            return
        try:
            header, image = recordio.unpack_payload(payload, where)
        except recordio.RecordIOError as e:
            self.bad(offset, str(e))
            return
        if not image:
            if image_required:
                self.bad(offset, f"{where}: no image bytes")
            else:
                self.non_image += 1
            return
        label = recordio.first_label(header)
        if not np.isfinite(label) or label < 0 or label != int(label):
            self.bad(offset, f"{where}: invalid class label {label!r}")
            return
        if self.check_images:
            try:
                decode_image(image, where)
            except ImageReadError as e:
                self.bad(offset, str(e))
                return
        self.keys.append(key)
        self.offsets.append(offset)
        self.labels.append(int(label))


def index_record_file(rec_path: str | Path, idx_path: str | Path | None = None,
                      check_images: bool = False, progress: bool = True) -> RecordIndex:
    """Read every record of ``rec_path`` and index the usable images.

    Uses ``idx_path`` (default: the ``.idx`` beside the ``.rec``, when present) or else scans
    the file. Damaged records (bad magic, truncated, malformed header, invalid label, and with
    ``check_images`` undecodable image bytes) are skipped and listed in ``.corrupt``. Bytes
    of the ``.rec`` that no ``.idx`` entry led to are scanned: records found there are
    ``unlisted_offsets``. ``lost`` counts what cannot be used (see :func:`require_complete`)."""
    rec_path = Path(rec_path)
    idx = _resolve_idx(rec_path, idx_path)
    reader = recordio.RecordReader(rec_path)
    col = _Collector(reader, check_images)
    header_range: tuple[int, int] | None = None
    identity_ranges: list[tuple[int, int, int]] = []  # (class, img_start, img_end)
    # [start, end) of every record read through the .idx; int64 arrays, not a list of
    # tuples: ~16 bytes a record instead of ~110 (MS1M has 5.8 million)
    span_starts, span_ends = array("q"), array("q")
    unlisted: list[int] = []
    unreadable = 0  # bytes in no readable record: what a lost-record count cannot measure

    def read(offset: int) -> tuple[bytes | None, str | None]:
        try:
            payload, end = reader.read_with_next(offset)
        except recordio.RecordIOError as e:
            return None, str(e)
        span_starts.append(offset)
        span_ends.append(end)
        return payload, None

    if idx is not None:
        keys, offsets = recordio.read_idx(idx)
        offset_of = dict(zip(keys.tolist(), offsets.tolist(), strict=True))
        first = 0 if 0 in offset_of else (int(keys[0]) if keys.size else None)
        header_range = _parse_header_record(read(offset_of[first])[0]) \
            if first is not None else None
        if header_range is None:
            image_keys = keys.tolist()
        else:
            image_keys = list(range(1, header_range[0]))
        for key in tqdm(image_keys, desc=f"indexing {rec_path.name}", unit="rec",
                        disable=not progress, mininterval=1.0):
            if key not in offset_of:
                col.bad(-1, f"{idx}: image record {key} is missing from the index")
                continue
            offset = offset_of[key]
            payload, error = read(offset)
            col.add(key, offset, payload, error, image_required=header_range is not None)
        if header_range is not None:
            for cls, key in enumerate(range(*header_range)):
                payload = read(offset_of[key])[0] if key in offset_of else None
                rng = _parse_identity(payload)
                if rng is None:
                    col.bad(offset_of.get(key, -1),
                            f"{rec_path}: identity record {key} is missing or malformed")
                else:
                    identity_ranges.append((cls, *rng))
        # Records the .idx does not lead to are lost just the same (a .idx cut short, or
        # one of another file). Damaged bytes between the listed records hide none of them:
        # only whole records found there count.
        for start, end in _uncovered(np.frombuffer(span_starts, np.int64),
                                     np.frombuffer(span_ends, np.int64), reader.size):
            error_at = None
            for offset, _, error in reader.scan(start):
                if error_at is not None:
                    unreadable += min(offset, end) - error_at
                    error_at = None
                if offset >= end:
                    break
                if error is None:
                    unlisted.append(offset)
                else:
                    error_at = offset
            if error_at is not None:
                unreadable += end - error_at
    else:
        log.info("%s: no .idx beside it; scanning the file", rec_path)
        bar = tqdm(total=reader.size, desc=f"scanning {rec_path.name}", unit="B",
                   unit_scale=True, disable=not progress, mininterval=1.0)
        position = 0
        error_at = None
        for ordinal, (offset, payload, error) in enumerate(reader.scan()):
            bar.update(offset - position)
            position = offset
            if error_at is not None:  # a damaged stretch reaches up to the next record
                unreadable += offset - error_at
            error_at = offset if error is not None else None
            if ordinal == 0:
                header_range = _parse_header_record(payload)
                if header_range is not None:
                    continue
            if header_range is not None:
                # without keys, identity records are told apart by their content
                rng = _parse_identity(payload)
                if rng is not None:
                    identity_ranges.append((len(identity_ranges), *rng))
                    continue
            col.add(ordinal, offset, payload, error, image_required=header_range is not None)
        if error_at is not None:
            unreadable += reader.size - error_at
        bar.update(reader.size - position)
        bar.close()
    reader.close()

    keys_arr = np.asarray(col.keys, dtype=np.int64)
    labels = np.asarray(col.labels, dtype=np.int64)
    offsets_arr = np.asarray(col.offsets, dtype=np.int64)
    mismatches = 0
    expected_images = -1
    if header_range is not None:
        expected_images = header_range[0] - 1
        num_classes = header_range[1] - header_range[0]
        in_range = labels < num_classes
        for pos in np.flatnonzero(~in_range):
            col.bad(int(offsets_arr[pos]), f"{rec_path}: record {keys_arr[pos]} has label "
                                           f"{labels[pos]} >= {num_classes} identities")
        keys_arr, labels, offsets_arr = keys_arr[in_range], labels[in_range], \
            offsets_arr[in_range]
        mismatches = _count_identity_mismatches(keys_arr, labels, identity_ranges)
    else:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    # Each count below misses some losses and sees others twice (a damaged stretch may hide
    # several records; a shifted .idx entry and the record it missed are one loss), so the
    # largest is the number that is certainly lost. Header sets know what they should hold.
    lost = max(len(col.corrupt), len(unlisted))
    if header_range is not None:
        missing = (expected_images - labels.size) + (num_classes - len(identity_ranges))
        lost = max(lost, missing)
    return RecordIndex(rec_path=rec_path, keys=keys_arr, offsets=offsets_arr, labels=labels,
                       num_classes=num_classes, has_header=header_range is not None,
                       corrupt=col.corrupt,
                       corrupt_offsets=np.asarray(col.corrupt_offsets, dtype=np.int64),
                       non_image_records=col.non_image, identity_mismatches=mismatches,
                       idx_path=idx, lost=lost,
                       unlisted_offsets=np.asarray(unlisted, dtype=np.int64),
                       expected_images=expected_images, unreadable_bytes=unreadable)


def _uncovered(starts: np.ndarray, ends: np.ndarray, size: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` stretches of a ``size``-byte file that no span
    ``[starts[i], ends[i])`` covers."""
    if not starts.size:
        return [(0, size)] if size else []
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], np.maximum.accumulate(ends[order])
    reached = np.concatenate([[0], ends[:-1]])  # how far the spans before each one reach
    gaps = [(int(a), int(b)) for a, b in zip(reached[starts > reached],
                                             starts[starts > reached], strict=True)]
    if ends[-1] < size:
        gaps.append((int(ends[-1]), size))
    return gaps


def _parse_identity(payload: bytes | None) -> tuple[int, int] | None:
    """``(img_start, img_end)`` of an identity record (label pair, no image), else None."""
    pair = _label_pair(payload)
    if pair is None:
        return None
    start, end = pair
    if not 0 <= start <= end:
        return None
    return int(start), int(end)


def _count_identity_mismatches(keys: np.ndarray, labels: np.ndarray,
                               ranges: list[tuple[int, int, int]]) -> int:
    """Images whose label differs from the identity record whose key range lists them."""
    if not ranges or not keys.size:
        return 0
    expected = np.full(int(keys.max()) + 1, -1, dtype=np.int64)
    for cls, start, end in ranges:
        expected[max(start, 0):min(end, expected.size)] = cls
    listed = expected[keys]
    return int(((listed >= 0) & (listed != labels)).sum())


def require_complete(index: RecordIndex, allow_lost_records: bool = False) -> None:
    """Refuse a set with no usable image, and one that lost records unless
    ``allow_lost_records`` (then a warning with the count): training on half a set without
    a word would be silently wrong."""
    rec = index.rec_path
    if len(index) == 0:
        raise DatasetError(f"{rec}: no usable image records"
                           + (f" ({index.lost} record(s) lost or damaged)" if index.lost else ""))
    if index.lost == 0:
        if index.unreadable_bytes:  # garbage between records the .idx lists correctly
            log.warning("%s: %d byte(s) between records belong to no record; every record "
                        "is readable", rec, index.unreadable_bytes)
        return
    shown = index.lost_offsets[:LOST_OFFSETS_SHOWN].tolist()
    where = f"; first at byte offset(s) {', '.join(map(str, shown))}" if shown else ""
    if index.lost_offsets.size > len(shown):
        where += ", ..."
    alive = int((index.class_counts > 0).sum())
    if index.has_header:
        remain = (f"{len(index)} of {index.expected_images} images and {alive} of "
                  f"{index.num_classes} identities remain")
    else:
        remain = f"{len(index)} images of {alive} identities remain"
    unlisted = ""
    if index.unlisted_offsets.size:
        unlisted = (f"; {index.unlisted_offsets.size} record(s) are not listed in "
                    f"{index.idx_path} (a .idx of another file? without it the .rec is "
                    f"scanned)")
    unreadable = f", {index.unreadable_bytes} byte(s) unreadable" \
        if index.unreadable_bytes else ""
    summary = (f"{rec}: {index.lost} record(s) lost or damaged{unreadable}{where}; {remain}"
               f"{unlisted}")
    if allow_lost_records:
        log.warning("%s; using what remains (--allow-lost-records)", summary)
        return
    raise LostRecordsError(f"{summary}. Re-download or re-pack the set, or pass "
                           f"--allow-lost-records to use what remains")


def load_or_build_index(rec_path: str | Path, idx_path: str | Path | None = None,
                        progress: bool = False) -> RecordIndex:
    """The saved index when fresh, else :func:`index_record_file` (kept in memory only)."""
    index = load_index(rec_path, idx_path)
    if index is not None:
        return index
    index = index_record_file(rec_path, idx_path, progress=progress)
    if len(index) > SAVE_INDEX_TIP_IMAGES:
        log.info("tip: `python pre_process.py --rec %s` saves this index for next time",
                 rec_path)
    return index


# ----------------------------------------------------------------------------- packing

IDENTITY_DEPTH = 2  # images are root/<identity>/<image>: two path parts below the root


def list_identity_images(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """``(image paths, labels, identity names)`` for a tree ``root/identity/image``.

    Identities are the immediate subfolders holding at least one image file, sorted by name;
    their position in that order is the label (0 .. C-1). Folders without images are ignored
    (with a warning). Images at any other depth are refused (DatasetError saying what was
    found): an image directly in ``root`` belongs to no identity, and images in sub-folders
    would be merged into their top folder's identity, which packs several people as one
    label when ``root`` is one level too high."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder (expected {root}/<identity>/<image>)")
    by_depth: dict[int, list[Path]] = {}
    per_identity: dict[str, list[Path]] = {}
    empty = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.is_dir():  # iterdir + is_dir: a symlinked identity folder counts
            images = list_images(entry)
            if not images:
                empty.append(entry.name)
                continue
            per_identity[entry.name] = images
            for path in images:
                by_depth.setdefault(1 + len(path.relative_to(entry).parts), []).append(path)
        elif entry.suffix.lower() in IMAGE_EXTENSIONS:
            by_depth.setdefault(1, []).append(entry)
    if not by_depth:
        raise DatasetError(f"{root}: no images found in identity subfolders "
                           f"(expected {root}/<identity>/<image>)")
    if set(by_depth) != {IDENTITY_DEPTH}:
        raise DatasetError(_depth_problem(root, by_depth))
    if empty:
        log.warning("%s: %d folder(s) without images ignored, e.g. %s", root, len(empty),
                    empty[:3])
    paths: list[Path] = []
    labels: list[int] = []
    names = list(per_identity)
    for label, name in enumerate(names):
        paths.extend(per_identity[name])
        labels.extend([label] * len(per_identity[name]))
    return paths, np.asarray(labels, dtype=np.int64), names


def _depth_problem(root: Path, by_depth: dict[int, list[Path]]) -> str:
    """What was found instead of ``root/identity/image`` everywhere, and what to do."""
    found = "; ".join(f"{len(paths)} image(s) at depth {depth} (e.g. {paths[0]})"
                      for depth, paths in sorted(by_depth.items()))
    depths = set(by_depth)
    if depths == {1}:
        hint = (f"is {root} itself one identity's folder? Pack the folder above it, which "
                f"holds one folder per identity")
    elif 1 in depths:
        hint = f"images directly in {root} belong to no identity: move them into one"
    elif len(depths) == 1:  # all deeper: root is one level (or more) too high
        example = by_depth[min(depths)][0]
        top = root / example.relative_to(root).parts[0]
        hint = (f"each folder under {root} would merge the people of its sub-folders into "
                f"one identity: pack {top} instead?")
    else:
        deep = by_depth[max(depths)][0]
        identity = deep.relative_to(root).parts[0]
        hint = (f"images in sub-folders such as {deep.parent} would be merged into identity "
                f"{identity!r}: move them up into {root / identity}, or into folders of "
                f"their own if they are other people")
    return (f"{root}: images must be at depth {IDENTITY_DEPTH} ({root}/<identity>/<image>); "
            f"found {found}. {hint}")


@dataclass
class PackSummary:
    """What :func:`pack_folder` wrote."""

    rec_path: Path
    idx_path: Path
    images: int = 0
    identities: int = 0
    passed_through: int = 0  # JPEG bytes copied unchanged
    reencoded: int = 0
    wrong_size: list[str] = field(default_factory=list)  # resized to image_size
    unreadable: list[str] = field(default_factory=list)  # skipped
    index: RecordIndex | None = None  # the packed set's index, saved at index_path
    index_path: Path | None = None

    def format_summary(self) -> str:
        lines = [f"  written          : {self.rec_path} (+ {self.idx_path.name})",
                 f"  images           : {self.images}",
                 f"  identities       : {self.identities}",
                 f"  JPEG kept as-is  : {self.passed_through}",
                 f"  re-encoded       : {self.reencoded}",
                 f"  wrong size       : {len(self.wrong_size)} (resized; align them first)",
                 f"  unreadable       : {len(self.unreadable)} (skipped)"]
        for what, items in (("wrong size", self.wrong_size), ("unreadable", self.unreadable)):
            lines += [f"  {what}: {item}" for item in items[:MAX_LISTED]]
            if len(items) > MAX_LISTED:
                lines.append(f"  ... and {len(items) - MAX_LISTED} more {what}")
        return "\n".join(lines)


def _header_payload(id_start: int, id_end: int) -> bytes:
    return recordio.pack_payload([float(id_start), float(id_end)])


PROPERTY_NAME = "property"  # InsightFace's per-folder "classes,size,size" file


def check_pack_paths(src_dir: str | Path, out_rec: str | Path) -> None:
    """Refuse an ``--out`` that --pack must not write: not a ``.rec`` name, an existing
    folder, a path inside the source tree (it could overwrite a source image, and a re-pack
    would read its own output), or a folder that already holds another set (its
    ``property`` file would then describe only one of them)."""
    src, out = Path(src_dir), Path(out_rec)
    if out.is_dir():
        raise DatasetError(f"--out {out}: is a directory; name the .rec file to write, e.g. "
                           f"{out / 'train.rec'}")
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise DatasetError(f"--out {out} is inside the folder being packed ({src}); write the "
                           f"set somewhere else")
    if out.suffix != ".rec":
        raise DatasetError(f"--out {out}: expected a .rec file name, e.g. "
                           f"{out.with_suffix('.rec')}")
    # InsightFace's layout: a set's folder holds train.rec, train.idx and one property file
    others = sorted(p.name for p in out.parent.glob("*.rec") if p.name != out.name) \
        if out.parent.is_dir() else []
    if others:
        raise DatasetError(f"--out {out}: {out.parent} already holds another set "
                           f"({', '.join(others)}); its {PROPERTY_NAME} file would be "
                           f"overwritten. Pack into a folder of its own")


def pack_folder(src_dir: str | Path, out_rec: str | Path, idx_path: str | Path | None = None,
                image_size: int = FACE_CROP_SIZE, quality: int = JPEG_QUALITY,
                progress: bool = True, index_path: str | Path | None = None) -> PackSummary:
    """Pack ``src_dir/identity/image`` into an InsightFace-layout ``.rec`` + ``.idx``, its
    index (``index_path``, default ``<stem>.index.npz``) and ``property``.

    Record 0 is the header ``[id_start, id_end)``, then one record per image (label = the
    identity's position in sorted order), then one record per identity ``[img_start,
    img_end)``. JPEGs already ``image_size`` square are copied byte for byte; anything else is
    decoded, resized if needed (reported) and re-encoded as JPEG. Unreadable files are skipped
    and listed. A ``property`` file (``classes,size,size``) is written beside the ``.rec``.

    Every file is written to a temporary beside it and renamed into place only once the new
    set reads back whole (:func:`_replace_set` for the order), so a failure or a kill at any
    point leaves a complete, readable set: the old one or the new one."""
    check_pack_paths(src_dir, out_rec)
    paths, labels, names = list_identity_images(src_dir)
    out_rec = Path(out_rec)
    idx_path = Path(idx_path) if idx_path else recordio.default_idx_path(out_rec)
    index_path = Path(index_path) if index_path else index_path_for(out_rec)
    property_path = out_rec.parent / PROPERTY_NAME
    targets = [out_rec, idx_path, index_path, property_path]
    out_rec.parent.mkdir(parents=True, exist_ok=True)
    for target in targets:  # left by a killed pack; one pack writes a set at a time
        remove_stale_temporaries(target.parent, target.name)
    temps = {target: temp_path_for(target) for target in targets}
    try:
        summary = _write_records(paths, labels, names, temps[out_rec], temps[idx_path],
                                 image_size, quality, progress)
        index = index_record_file(temps[out_rec], temps[idx_path], progress=progress)
        if index.lost or len(index) != summary.images:
            raise DatasetError(f"{temps[out_rec]}: the packed set does not read back "
                               f"({len(index)} of {summary.images} images, {index.lost} "
                               f"lost); {out_rec} is left as it was")
        save_index(index, temps[index_path])  # stamps the temporaries: renames keep them
        atomic_write_text(temps[property_path],
                          f"{len(names)},{image_size},{image_size}\n")
        _replace_set(temps, out_rec, idx_path, index_path, property_path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)  # renamed ones are gone already
    summary.rec_path, summary.idx_path = out_rec, idx_path
    index.rec_path, index.idx_path = out_rec, idx_path
    summary.index, summary.index_path = index, index_path
    return summary


def _replace_set(temps: dict[Path, Path], rec: Path, idx: Path, index_path: Path,
                 property_path: Path) -> None:
    """Rename the new set's files over the old ones in an order that leaves a readable,
    consistent set after a crash between any two steps: the old ``.idx`` goes first, so
    until the new one arrives, last, the ``.rec`` on disk (old or new) is read by scanning
    it rather than through the other set's offsets; the ``.index.npz`` records the sizes and
    mtimes of the new ``.rec`` and ``.idx`` and is ignored (rebuilt) next to anything else."""
    idx.unlink(missing_ok=True)
    os.replace(temps[index_path], index_path)
    os.replace(temps[rec], rec)
    os.replace(temps[property_path], property_path)
    os.replace(temps[idx], idx)
    _fsync_folder(rec.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable (where the platform allows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _write_records(paths: list[Path], labels: np.ndarray, names: list[str], rec: Path,
                   idx: Path, image_size: int, quality: int, progress: bool) -> PackSummary:
    """The records of :func:`pack_folder`, written to ``rec`` and ``idx``."""
    import cv2

    summary = PackSummary(rec_path=rec, idx_path=idx, identities=len(names))
    firsts: dict[int, int] = {}  # class -> key of its first image
    lasts: dict[int, int] = {}
    with recordio.RecordWriter(rec, idx) as writer:
        # the header's values are known only at the end; a same-size placeholder keeps it
        # physically first so a reader scanning without the .idx sees it first
        header_offset = writer.write(_header_payload(1, 1), key=0)
        key = 1
        for path, label in tqdm(list(zip(paths, labels.tolist(), strict=True)),
                                desc=f"packing {len(paths)} images", unit="img",
                                disable=not progress, mininterval=1.0):
            try:
                data = path.read_bytes()
                rgb = decode_image(data, str(path))
            except (OSError, ImageReadError) as e:
                summary.unreadable.append(str(e))
                continue
            if rgb.shape[:2] != (image_size, image_size):
                summary.wrong_size.append(f"{path} ({rgb.shape[1]}x{rgb.shape[0]})")
                shrink = rgb.shape[0] > image_size or rgb.shape[1] > image_size
                rgb = cv2.resize(rgb, (image_size, image_size),
                                 interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
                data = encode_image(rgb, ".jpg", quality)
                summary.reencoded += 1
            elif data.startswith(JPEG_SIGNATURE):
                summary.passed_through += 1
            else:
                data = encode_image(rgb, ".jpg", quality)
                summary.reencoded += 1
            writer.write(recordio.pack_payload(float(label), data, id=key), key=key)
            firsts.setdefault(label, key)
            lasts[label] = key
            key += 1
        summary.images = key - 1
        id_start = key
        for cls in range(len(names)):
            # an identity whose images were all unreadable gets an empty range
            start = firsts.get(cls, key)
            end = lasts[cls] + 1 if cls in lasts else start
            writer.write(recordio.pack_payload([float(start), float(end)], id=key), key=key)
            key += 1
        writer.overwrite(header_offset, _header_payload(id_start, key))
    return summary


# ----------------------------------------------------------------------------- CLI

def build_arg_parser() -> argparse.ArgumentParser:
    from config import build_parser

    parser = build_parser(__doc__.split("\n\n")[0])
    group = parser.add_argument_group("pre_process.py")
    group.add_argument("--pack", metavar="SRC_DIR", default=None,
                       help="pack an aligned tree SRC_DIR/identity/image into --out")
    group.add_argument("--out", default=None, help="output .rec for --pack")
    group.add_argument("--idx", default=None,
                       help="the .idx to use; None: the one beside the .rec, or scan the file")
    group.add_argument("--index-out", default=None,
                       help=f"where to write the index; None: <rec stem>{INDEX_SUFFIX}")
    group.add_argument("--check-images", action="store_true",
                       help="also decode every image (slow; finds corrupt JPEGs)")
    group.add_argument("--quality", type=int, default=JPEG_QUALITY,
                       help="JPEG quality for images --pack must re-encode")
    group.add_argument("--image-size", type=int, default=FACE_CROP_SIZE,
                       help="side of the square images --pack writes")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from config import parse_config

    cfg, args = parse_config(argv, parser=build_arg_parser())
    progress = not args.no_progress
    if args.pack:
        if not args.out:
            raise DatasetError("--pack needs --out path/to/train.rec")
        packed = pack_folder(args.pack, args.out, quality=args.quality,
                             image_size=args.image_size, progress=progress,
                             index_path=args.index_out)
        print(f"packed {args.pack}:\n{packed.format_summary()}")
        rec, index, out = Path(args.out), packed.index, packed.index_path
    else:
        rec = Path(cfg.rec)
        index = index_record_file(rec, args.idx, check_images=args.check_images,
                                  progress=progress)
        out = save_index(index, args.index_out)
    print(f"index of {rec} -> {out}\n{index.format_summary()}")
    # after the summary, so the damage is listed; the saved index lets training start fast
    # when the user then accepts the loss
    require_complete(index, cfg.allow_lost_records)
    return 0

if __name__ == "__main__":
    sys.exit(run_cli(main))
