"""The index of a RecordIO training set: which records are usable images, their byte offsets
and labels, and what the file lost. ``pre_process.py --rec`` builds and saves it;
``data_gen.FaceRecordDataset`` loads it (or builds it in memory).

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

Beside a ``.rec`` in a folder that cannot be written (a read-only mount, another user's
data), the index goes to ``~/.cache/arcface-toolkit/<folder name>-<hash of its path>/``
(``$XDG_CACHE_HOME`` if set; :func:`utils.cache_folder`), where training finds it too.

A set that lost records (a truncated download, garbage bytes, a ``.idx`` that does not match
the ``.rec``) is an error (:func:`require_complete`), naming the file, the count and the first
byte offsets, unless ``allow_lost_records`` accepts what remains (then a warning).
"""

from __future__ import annotations

import io
import zipfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from records import recordio
from utils import (
    DatasetError,  # in utils (low) so identity_folders need not import this module
    ImageReadError,
    atomic_write_bytes,
    cache_folder,
    decode_image,
    get_logger,
)

INDEX_SUFFIX = ".index.npz"
INDEX_VERSION = 2  # 2: lost / unlisted_offsets / expected_images / unreadable_bytes
HEADER_LABELS = 2  # the header record's label array: [id_start, id_end)
MAX_LISTED = 10  # problems listed by name in a summary; the rest are counted
SAVE_INDEX_TIP_IMAGES = 100_000  # an in-memory index this large suggests saving it
LOST_OFFSETS_SHOWN = 5  # byte offsets of lost records an error message lists
# How the formats decode_image reads begin (JPEG, PNG, BMP, GIF, TIFF both byte orders,
# RIFF for WebP): a payload starting so is taken for an image without decoding it; only the
# first payload that starts otherwise is decoded, so indexing stays a read of the file.
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF8", b"II*\x00",
                    b"MM\x00*", b"RIFF")
SIGNATURE_SHOWN = 8  # bytes of a payload that is no image an error message shows
# A set without a header numbers its identities 0..max label. More empty classes than used
# ones is no numbering of identities (a label of 16,000,000 among 6 would make training
# allocate a classifier of 16 million rows): refused, naming the record.
MAX_EMPTY_PER_USED_CLASS = 1

log = get_logger("face.record_index")


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
    # identity names in label order, as pre_process --pack numbered them; None where
    # unknown (InsightFace's own sets; an index rebuilt from the .rec alone)
    identities: list[str] | None = None

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


def default_index_path(rec_path: str | Path) -> Path:
    """Where the index of ``rec_path`` is saved: :func:`index_path_for`, or where the
    ``.rec``'s folder cannot be written, the same name in a user cache folder."""
    rec_path = Path(rec_path)
    return cache_folder(rec_path.parent) / index_path_for(rec_path).name


def _file_stamp(path: Path | None) -> tuple[int, int]:
    if path is None or not path.is_file():
        return -1, -1
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def save_index(index: RecordIndex, path: str | Path | None = None) -> Path:
    """Write ``index`` as ``.npz`` (atomically; default :func:`default_index_path`);
    returns the path."""
    path = Path(path) if path else default_index_path(index.rec_path)
    rec_size, rec_mtime = _file_stamp(index.rec_path)
    idx_size, idx_mtime = _file_stamp(index.idx_path)
    buf = io.BytesIO()
    np.savez(buf, version=INDEX_VERSION, keys=index.keys, offsets=index.offsets,
             labels=index.labels, class_counts=index.class_counts,
             num_classes=index.num_classes, has_header=index.has_header,
             corrupt_offsets=index.corrupt_offsets,
             non_image_records=index.non_image_records,
             identity_mismatches=index.identity_mismatches,
             lost=index.lost, unlisted_offsets=index.unlisted_offsets,
             expected_images=index.expected_images, unreadable_bytes=index.unreadable_bytes,
             rec_size=rec_size, rec_mtime_ns=rec_mtime,
             idx_size=idx_size, idx_mtime_ns=idx_mtime,
             **({} if index.identities is None else {"identities": np.array(index.identities,
                                                                          dtype=str)}))
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_index(rec_path: str | Path, idx_path: str | Path | None = None,
               index_path: str | Path | None = None) -> RecordIndex | None:
    """The saved index of ``rec_path`` if it exists and still matches the ``.rec`` and
    ``.idx`` on disk (size and mtime), else None. Without ``index_path``, the one beside the
    ``.rec``, else the one in the user cache folder (:func:`default_index_path`)."""
    rec_path = Path(rec_path)
    if index_path is not None:
        return _load_index_file(rec_path, idx_path, Path(index_path))
    # a read-only folder may hold a stale index beside the .rec and a fresh one in the cache
    for candidate in dict.fromkeys([index_path_for(rec_path), default_index_path(rec_path)]):
        index = _load_index_file(rec_path, idx_path, candidate)
        if index is not None:
            return index
    return None


def _load_index_file(rec_path: Path, idx_path: str | Path | None, index_path: Path
                     ) -> RecordIndex | None:
    """:func:`load_index` from the file ``index_path``."""
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
            corrupt_offsets = z["corrupt_offsets"].astype(np.int64)  # one per skipped record
            return RecordIndex(
                rec_path=rec_path, keys=z["keys"].astype(np.int64),
                offsets=z["offsets"].astype(np.int64), labels=z["labels"].astype(np.int64),
                num_classes=int(z["num_classes"]), has_header=bool(z["has_header"]),
                corrupt=[f"(from {index_path.name})"] * corrupt_offsets.size,
                corrupt_offsets=corrupt_offsets,
                non_image_records=int(z["non_image_records"]),
                identity_mismatches=int(z["identity_mismatches"]), idx_path=idx,
                lost=int(z["lost"]), unlisted_offsets=z["unlisted_offsets"].astype(np.int64),
                expected_images=int(z["expected_images"]),
                unreadable_bytes=int(z["unreadable_bytes"]),
                identities=[str(n) for n in z["identities"]] if "identities" in z.files
                else None)
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
    identity records of InsightFace sets), else None; None too when one is not finite (a
    damaged record: the callers turn them into ints)."""
    if payload is None:
        return None
    try:
        header, image = recordio.unpack_payload(payload)
    except recordio.RecordIOError:
        return None
    if header.flag < HEADER_LABELS or image or not np.isfinite(header.label[:2]).all():
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
        self.image_like = 0  # payloads that start as an image format does
        self.first_other: tuple[str, bytes] | None = None  # the first that does not

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
        if image.startswith(IMAGE_SIGNATURES):
            self.image_like += 1
        elif self.first_other is None:
            self.first_other = where, image
        if self.check_images:
            try:
                decode_image(image, where)
            except ImageReadError as e:
                self.bad(offset, str(e))
                return
        self.keys.append(key)
        self.offsets.append(offset)
        self.labels.append(int(label))


@dataclass
class _Walked:
    """What a walk over a .rec found besides its image records (the _Collector holds those)."""

    header_range: tuple[int, int] | None = None  # the header record's (id_start, id_end)
    identity_ranges: list[tuple[int, int, int]] = field(
        default_factory=list)  # (class, img_start, img_end)
    unlisted: list[int] = field(default_factory=list)  # offsets of records no .idx led to
    unreadable: int = 0  # bytes in no readable record: what a lost-record count cannot measure


def _walk_through_idx(reader: recordio.RecordReader, idx: Path, collector: _Collector,
                      progress: bool) -> _Walked:
    """Read the records ``idx`` lists (the images, then the identity records of a header
    set), then scan the bytes no listed record covers for records the .idx does not lead to."""
    rec_path = reader.path
    walked = _Walked()
    # [start, end) of every record read through the .idx; int64 arrays, not a list of
    # tuples: ~16 bytes a record instead of ~110 (MS1M has 5.8 million)
    span_starts, span_ends = array("q"), array("q")

    def read(offset: int) -> tuple[bytes | None, str | None]:
        try:
            payload, end = reader.read_with_next(offset)
        except recordio.RecordIOError as e:
            return None, str(e)
        span_starts.append(offset)
        span_ends.append(end)
        return payload, None

    keys, offsets = recordio.read_idx(idx)
    offset_of = dict(zip(keys.tolist(), offsets.tolist(), strict=True))
    first = 0 if 0 in offset_of else (int(keys[0]) if keys.size else None)
    header_range = _parse_header_record(read(offset_of[first])[0]) \
        if first is not None else None
    walked.header_range = header_range
    if header_range is None:
        image_keys = keys.tolist()
    else:
        image_keys = list(range(1, header_range[0]))
    for key in tqdm(image_keys, desc=f"indexing {rec_path.name}", unit="rec",
                    disable=not progress, mininterval=1.0):
        if key not in offset_of:
            collector.bad(-1, f"{idx}: image record {key} is missing from the index")
            continue
        offset = offset_of[key]
        payload, error = read(offset)
        collector.add(key, offset, payload, error, image_required=header_range is not None)
    if header_range is not None:
        for cls, key in enumerate(range(*header_range)):
            payload = read(offset_of[key])[0] if key in offset_of else None
            images = _parse_identity(payload)
            if images is None:
                collector.bad(offset_of.get(key, -1),
                              f"{rec_path}: identity record {key} is missing or malformed")
            else:
                walked.identity_ranges.append((cls, *images))
    # Records the .idx does not lead to are lost just the same (a .idx cut short, or one of
    # another file). Damaged bytes between the listed records hide none of them: only whole
    # records found there count.
    for start, end in _uncovered(np.frombuffer(span_starts, np.int64),
                                 np.frombuffer(span_ends, np.int64), reader.size):
        for offset, _, error, damaged in _scan_between(reader, start, end):
            if error is None:
                walked.unlisted.append(offset)
            walked.unreadable += damaged
    return walked


def _walk_by_scanning(reader: recordio.RecordReader, collector: _Collector,
                      progress: bool) -> _Walked:
    """Scan the whole file for records (no .idx): the first may be a header, then identity
    records are told apart from images by their content."""
    walked = _Walked()
    bar = tqdm(total=reader.size, desc=f"scanning {reader.path.name}", unit="B",
               unit_scale=True, disable=not progress, mininterval=1.0)
    for ordinal, (offset, payload, error, damaged) in enumerate(
            _scan_between(reader, 0, reader.size)):
        bar.update(offset - bar.n)
        walked.unreadable += damaged
        if ordinal == 0:
            walked.header_range = _parse_header_record(payload)
            if walked.header_range is not None:
                continue
        if walked.header_range is not None:
            # without keys, identity records are told apart by their content
            images = _parse_identity(payload)
            if images is not None:
                walked.identity_ranges.append((len(walked.identity_ranges), *images))
                continue
        collector.add(ordinal, offset, payload, error,
                      image_required=walked.header_range is not None)
    bar.update(bar.total - bar.n)
    bar.close()
    return walked


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
    collector = _Collector(reader, check_images)
    if idx is not None:
        walked = _walk_through_idx(reader, idx, collector, progress)
    else:
        log.info("%s: no .idx beside it; scanning the file", rec_path)
        walked = _walk_by_scanning(reader, collector, progress)
    reader.close()
    header_range, identity_ranges = walked.header_range, walked.identity_ranges

    keys_arr = np.asarray(collector.keys, dtype=np.int64)
    labels = np.asarray(collector.labels, dtype=np.int64)
    offsets_arr = np.asarray(collector.offsets, dtype=np.int64)
    mismatches = 0
    expected_images = -1
    if header_range is not None:
        expected_images = header_range[0] - 1
        num_classes = header_range[1] - header_range[0]
        in_range = labels < num_classes
        for pos in np.flatnonzero(~in_range):
            collector.bad(int(offsets_arr[pos]), f"{rec_path}: record {keys_arr[pos]} has "
                                                 f"label {labels[pos]} >= {num_classes} "
                                                 "identities")
        keys_arr, labels, offsets_arr = keys_arr[in_range], labels[in_range], \
            offsets_arr[in_range]
        mismatches = _count_identity_mismatches(keys_arr, labels, identity_ranges)
    else:
        num_classes = int(labels.max()) + 1 if labels.size else 0
        _check_dense_labels(rec_path, keys_arr, offsets_arr, labels)
    _check_payloads_are_images(rec_path, collector)
    # Each count below misses some losses and sees others twice (a damaged stretch may hide
    # several records; a shifted .idx entry and the record it missed are one loss), so the
    # largest is the number that is certainly lost. Header sets know what they should hold.
    lost = max(len(collector.corrupt), len(walked.unlisted))
    if header_range is not None:
        missing = (expected_images - labels.size) + (num_classes - len(identity_ranges))
        lost = max(lost, missing)
    return RecordIndex(rec_path=rec_path, keys=keys_arr, offsets=offsets_arr, labels=labels,
                       num_classes=num_classes, has_header=header_range is not None,
                       corrupt=collector.corrupt,
                       corrupt_offsets=np.asarray(collector.corrupt_offsets, dtype=np.int64),
                       non_image_records=collector.non_image, identity_mismatches=mismatches,
                       idx_path=idx, lost=lost,
                       unlisted_offsets=np.asarray(walked.unlisted, dtype=np.int64),
                       expected_images=expected_images,
                       unreadable_bytes=walked.unreadable)


def _check_dense_labels(rec_path: Path, keys: np.ndarray, offsets: np.ndarray,
                        labels: np.ndarray) -> None:
    """Refuse the labels of a set without a header when most of the classes 0..max label
    would hold no image (see MAX_EMPTY_PER_USED_CLASS), naming the record of the largest."""
    if not labels.size:
        return
    top = int(np.argmax(labels))
    classes, used = int(labels[top]) + 1, int(np.unique(labels).size)
    if classes - used > MAX_EMPTY_PER_USED_CLASS * used:
        raise DatasetError(
            f"{rec_path}: record {keys[top]} at byte offset {offsets[top]} has label "
            f"{labels[top]}, but the set's images carry {used} distinct labels: {classes - used}"
            f" of classes 0..{labels[top]} would be empty. A set without a header record "
            f"numbers its identities 0..C-1: renumber the labels or re-pack the set "
            f"(pre_process.py --pack)")


def _check_payloads_are_images(rec_path: Path, collector: _Collector) -> None:
    """Refuse a set none of whose records holds an image: when no payload starts as an image
    format does, the first one is decoded to be sure (an exotic format OpenCV reads)."""
    if collector.image_like or collector.first_other is None:
        return
    where, payload = collector.first_other
    try:
        decode_image(payload, where)
    except ImageReadError:
        raise DatasetError(
            f"{where}: its {len(payload)} payload bytes (starting {payload[:SIGNATURE_SHOWN]!r})"
            f" are not an image, and no record of {rec_path.name} starts as a JPEG, PNG, BMP, "
            f"GIF, TIFF or WebP does: not a set of face images") from None


def _scan_between(reader: recordio.RecordReader, start: int, end: int
                  ) -> Iterator[tuple[int, bytes | None, str | None, int]]:
    """What ``reader.scan(start)`` yields for the records that start before ``end``, with
    one more value: for a damaged stretch, its bytes up to the next record (or ``end``), which
    are in no readable record; 0 for a good record."""
    damaged = None  # a damaged stretch waits for the next record to tell where it ends
    for offset, payload, error in reader.scan(start):
        if damaged is not None:
            yield *damaged, min(offset, end) - damaged[0]
            damaged = None
        if offset >= end:
            return
        if error is None:
            yield offset, payload, None, 0
        else:
            damaged = offset, None, error
    if damaged is not None:
        yield *damaged, end - damaged[0]


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
    lost_offsets = index.lost_offsets  # a concatenation and sort of the offset arrays
    shown = lost_offsets[:LOST_OFFSETS_SHOWN].tolist()
    where = f"; first at byte offset(s) {', '.join(map(str, shown))}" if shown else ""
    if lost_offsets.size > len(shown):
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
