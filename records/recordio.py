"""MXNet/dmlc RecordIO, read and written natively (no mxnet).

File layout. Every record is::

    uint32 magic 0xced7230a | uint32 (cflag << 29 | length) | payload | zero pad to 4 bytes

all little-endian. The dmlc writer never lets the magic appear 4-byte aligned inside a
payload: it cuts the payload at each aligned occurrence and drops the 4 magic bytes, writing
the pieces as parts with cflag 1 (first), 2 (middle), 3 (last); cflag 0 is a whole record.
A reader rejoins the parts with the magic bytes between them. Because of that rule a reader
that lost its place can resynchronise on the next aligned magic (see :meth:`RecordReader.scan`).

The ``.idx`` file beside a ``.rec`` holds one ``key<TAB>byte offset`` line per record.

An image payload starts with an IRHeader ``<IfQQ`` (flag, label, id, id2). When flag > 0,
``flag`` float32 labels follow the header (and the header's own label field is unused); then
the encoded image bytes.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils import ToolkitError, add_debug_flag, atomic_write_text, positive_int, run_cli

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_RECORD_HEAD = struct.Struct("<II")  # magic, cflag << 29 | length
RECORD_HEAD_SIZE = _RECORD_HEAD.size
CFLAG_SHIFT = 29
LENGTH_MASK = (1 << CFLAG_SHIFT) - 1
MAX_RECORD_LENGTH = LENGTH_MASK  # a payload part is at most 2**29 - 1 bytes
CFLAG_WHOLE, CFLAG_FIRST, CFLAG_MIDDLE, CFLAG_LAST = 0, 1, 2, 3
ALIGN = 4

_IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
IR_HEADER_SIZE = _IR_HEADER.size
LABEL_DTYPE = np.dtype("<f4")
INT64_END = 2**63  # .idx keys and offsets are kept as int64: each must lie below this

_SCAN_CHUNK = 1 << 20  # bytes read at a time while searching for the next magic
# files of a set that are easily given instead of its .rec
_NOT_RECORDIO_HINTS = {".lst": "; a .lst lists images for im2rec: give the .rec made from it",
                       ".idx": "; a .idx holds the offsets of a .rec: give the .rec itself"}


class RecordIOError(ToolkitError, ValueError):
    """A malformed RecordIO file; the message names the file and the byte offset."""


def _padded(length: int) -> int:
    return (length + ALIGN - 1) // ALIGN * ALIGN


# ----------------------------------------------------------------------------- IRHeader

@dataclass(frozen=True)
class IRHeader:
    """The image record header. ``label`` is a float, or a float32 array when flag > 0."""

    flag: int
    label: float | np.ndarray
    id: int = 0
    id2: int = 0


def pack_payload(label: float | Sequence[float] | np.ndarray, image: bytes = b"",
                 id: int = 0, id2: int = 0) -> bytes:
    """IRHeader + (label array) + image bytes. A scalar label goes into the header itself
    (flag 0); a sequence is written as ``flag = len`` float32 values after the header."""
    if np.ndim(label) == 0:
        return _IR_HEADER.pack(0, float(label), id, id2) + bytes(image)
    labels = np.asarray(label, dtype=LABEL_DTYPE).reshape(-1)
    return _IR_HEADER.pack(labels.size, 0.0, id, id2) + labels.tobytes() + bytes(image)


def unpack_payload(payload: bytes, source: str = "<record>") -> tuple[IRHeader, bytes]:
    """Split a payload into its IRHeader and the image bytes; RecordIOError naming ``source``
    when it is too short for the header or for the labels the header announces."""
    if len(payload) < IR_HEADER_SIZE:
        raise RecordIOError(f"{source}: payload of {len(payload)} bytes is shorter than the "
                            f"{IR_HEADER_SIZE}-byte image header")
    flag, label, id_, id2 = _IR_HEADER.unpack_from(payload)
    start = IR_HEADER_SIZE
    if flag > 0:
        end = start + flag * LABEL_DTYPE.itemsize
        if end > len(payload):
            raise RecordIOError(f"{source}: header announces {flag} labels but the payload "
                                f"has only {len(payload)} bytes")
        label = np.frombuffer(payload, dtype=LABEL_DTYPE, count=flag, offset=start).copy()
        start = end
    return IRHeader(flag, label, id_, id2), payload[start:]


def first_label(header: IRHeader) -> float:
    """The class label of an image record: the scalar, or the first of an array."""
    if isinstance(header.label, np.ndarray):
        return float(header.label[0]) if header.label.size else float("nan")
    return float(header.label)


# ----------------------------------------------------------------------------- .idx

def read_idx(idx_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, offsets)`` as int64 arrays from a ``.idx`` file, in file order."""
    idx_path = Path(idx_path)
    keys: list[int] = []
    offsets: list[int] = []
    with open(idx_path, encoding="ascii", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                key, offset = int(parts[0]), int(parts[1])
            except (IndexError, ValueError):
                raise RecordIOError(f"{idx_path}:{line_no}: expected 'key<TAB>offset', "
                                    f"got {line.rstrip()!r}") from None
            if not (-INT64_END <= key < INT64_END and 0 <= offset < INT64_END):
                where = "negative" if offset < 0 else "past the int64 range"
                raise RecordIOError(f"{idx_path}:{line_no}: key or byte offset {where} in "
                                    f"{line.rstrip()!r}")
            keys.append(key)
            offsets.append(offset)
    keys_arr = np.asarray(keys, dtype=np.int64)
    # the usual .idx lists its keys in increasing order: no key twice, no sort needed
    if not (keys_arr[1:] > keys_arr[:-1]).all() and np.unique(keys_arr).size != keys_arr.size:
        _refuse_repeated_key(idx_path)
    return keys_arr, np.asarray(offsets, dtype=np.int64)


def _refuse_repeated_key(idx_path: Path) -> None:
    """RecordIOError naming the first line of ``idx_path`` that lists a key again (a reader
    would take one of the two records, or one twice); read again only on this rare path."""
    line_of: dict[str, int] = {}
    with open(idx_path, encoding="ascii", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            key = str(int(line.split()[0]))
            if key in line_of:
                raise RecordIOError(f"{idx_path}:{line_no}: key {key} is listed again (first "
                                    f"on line {line_of[key]}); fix the .idx, or delete it and "
                                    f"the .rec is scanned")
            line_of[key] = line_no


def default_idx_path(rec_path: str | Path) -> Path:
    return Path(rec_path).with_suffix(".idx")


# ----------------------------------------------------------------------------- reader

class RecordReader:
    """Random and sequential access to a ``.rec`` file.

    The OS file handle is opened lazily and reopened whenever the process id changes, so one
    reader (inside a Dataset) can be handed to forked or spawned DataLoader workers: each
    process gets its own descriptor. Reads use ``os.pread``, which has no shared file
    position, so threads may share a reader too.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(f"{self.path}: is a directory, expected a .rec file")
        if not self.path.is_file():
            raise FileNotFoundError(f"record file not found: {self.path}")
        if self.path.stat().st_size == 0:
            raise RecordIOError(f"{self.path}: empty file (0 bytes), not a RecordIO file")
        with open(self.path, "rb") as f:
            start = f.read(len(MAGIC_BYTES))
        if start != MAGIC_BYTES:  # every RecordIO file starts with a record
            raise RecordIOError(f"{self.path}: not a RecordIO file (it starts with {start!r}, "
                                f"not the record magic 0x{MAGIC:08x})"
                                + _NOT_RECORDIO_HINTS.get(self.path.suffix.lower(), ""))
        self._fd: int | None = None
        self._pid: int | None = None

    # pickling (spawned workers) carries the path only
    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._fd = None
        self._pid = None

    def _handle(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            # after a fork the inherited descriptor belongs to the parent: leave it alone
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = pid
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        self._pid = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def size(self) -> int:
        return os.fstat(self._handle()).st_size

    def _pread(self, n: int, offset: int) -> bytes:
        return os.pread(self._handle(), n, offset)

    def read_part(self, offset: int) -> tuple[int, bytes, int]:
        """One physical part at ``offset``: ``(cflag, data, offset of the next part)``."""
        head = self._pread(RECORD_HEAD_SIZE, offset)
        if len(head) < RECORD_HEAD_SIZE:
            raise RecordIOError(f"{self.path}: truncated record header at byte offset {offset}")
        magic, lrec = _RECORD_HEAD.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(f"{self.path}: bad magic 0x{magic:08x} at byte offset {offset} "
                                f"(expected 0x{MAGIC:08x}); wrong offset or not a RecordIO file")
        cflag, length = lrec >> CFLAG_SHIFT, lrec & LENGTH_MASK
        data = self._pread(length, offset + RECORD_HEAD_SIZE) if length else b""
        if len(data) < length:
            raise RecordIOError(f"{self.path}: record at byte offset {offset} announces "
                                f"{length} bytes but the file ends after {len(data)}")
        return cflag, data, offset + RECORD_HEAD_SIZE + _padded(length)

    def read_with_next(self, offset: int) -> tuple[bytes, int]:
        """The logical record starting at ``offset`` (split parts rejoined) and the offset
        just past it."""
        cflag, data, nxt = self.read_part(offset)
        if cflag == CFLAG_WHOLE:
            return data, nxt
        if cflag != CFLAG_FIRST:
            raise RecordIOError(f"{self.path}: record at byte offset {offset} starts with a "
                                f"continuation part (cflag {cflag})")
        parts = [data]
        while True:
            part_offset = nxt
            cflag, data, nxt = self.read_part(part_offset)
            if cflag not in (CFLAG_MIDDLE, CFLAG_LAST):
                raise RecordIOError(f"{self.path}: split record from byte offset {offset} "
                                    f"broken at byte offset {part_offset} (cflag {cflag})")
            parts.append(data)
            if cflag == CFLAG_LAST:
                return MAGIC_BYTES.join(parts), nxt

    def read_at(self, offset: int) -> bytes:
        """The logical record (payload) starting at byte ``offset``."""
        return self.read_with_next(offset)[0]

    def find_magic(self, start: int) -> int | None:
        """Offset of the next 4-byte-aligned magic at or after ``start``, or None at EOF."""
        pos = _padded(start)
        while True:
            chunk = self._pread(_SCAN_CHUNK, pos)
            if len(chunk) < ALIGN:
                return None
            hit = chunk.find(MAGIC_BYTES)
            while hit >= 0 and hit % ALIGN:
                hit = chunk.find(MAGIC_BYTES, hit + 1)
            if hit >= 0:
                return pos + hit
            # keep the aligned tail so a magic straddling chunks is still seen
            pos += max(ALIGN, (len(chunk) - len(MAGIC_BYTES) + 1) // ALIGN * ALIGN)

    def _resync(self, start: int) -> int | None:
        """The next aligned magic at or after ``start`` that begins a record, skipping the
        continuation parts of a record whose first part was lost."""
        while True:
            offset = self.find_magic(start)
            if offset is None:
                return None
            head = self._pread(RECORD_HEAD_SIZE, offset)
            if len(head) < RECORD_HEAD_SIZE:
                return None
            lrec = _RECORD_HEAD.unpack(head)[1]
            if lrec >> CFLAG_SHIFT in (CFLAG_WHOLE, CFLAG_FIRST):
                return offset
            start = offset + ALIGN

    def scan(self, start: int = 0) -> Iterator[tuple[int, bytes | None, str | None]]:
        """Walk the file record by record: yields ``(offset, payload, None)`` for each good
        record and ``(offset, None, error)`` for a damaged stretch, after which it resumes at
        the next aligned magic (dmlc writers never leave one inside a payload)."""
        size = self.size
        offset = start
        while offset < size:
            try:
                payload, nxt = self.read_with_next(offset)
            except RecordIOError as e:
                yield offset, None, str(e)
                offset = self._resync(offset + ALIGN)
                if offset is None:
                    return
                continue
            yield offset, payload, None
            offset = nxt


# ----------------------------------------------------------------------------- writer

def _aligned_magics(payload: bytes) -> list[int]:
    """Positions where the magic occurs 4-byte aligned in ``payload`` (where dmlc cuts)."""
    cuts = []
    hit = payload.find(MAGIC_BYTES)
    while hit >= 0:
        if hit % ALIGN == 0:
            cuts.append(hit)
            hit = payload.find(MAGIC_BYTES, hit + len(MAGIC_BYTES))
        else:
            hit = payload.find(MAGIC_BYTES, hit + 1)
    return cuts


class RecordWriter:
    """Write records in the dmlc layout (splitting at aligned magics) plus a ``.idx``.

    Use as a context manager; the ``.idx`` is written when the writer closes."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else default_idx_path(self.rec_path)
        self.rec_path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.rec_path, "w+b")
        self._index: list[tuple[int, int]] = []
        self._keys: set[int] = set()
        self.split_records = 0  # records that contained an aligned magic

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close()

    def _write_part(self, cflag: int, data: bytes | memoryview) -> None:
        self._f.write(_RECORD_HEAD.pack(MAGIC, cflag << CFLAG_SHIFT | len(data)))
        self._f.write(data)

    def write(self, payload: bytes, key: int | None = None) -> int:
        """Append one record; returns its byte offset. ``key`` defaults to the count so far."""
        if len(payload) > MAX_RECORD_LENGTH:
            raise ValueError(f"{self.rec_path}: record of {len(payload)} bytes exceeds the "
                             f"RecordIO limit of {MAX_RECORD_LENGTH}")
        key = len(self._index) if key is None else int(key)
        if key in self._keys:
            raise ValueError(f"{self.rec_path}: duplicate record key {key}")
        offset = self._f.tell()
        view = memoryview(payload)
        cuts = _aligned_magics(payload)
        start = 0
        for i, cut in enumerate(cuts):
            self._write_part(CFLAG_FIRST if i == 0 else CFLAG_MIDDLE, view[start:cut])
            start = cut + len(MAGIC_BYTES)
        self._write_part(CFLAG_LAST if cuts else CFLAG_WHOLE, view[start:])
        pad = _padded(len(payload) - start) - (len(payload) - start)
        self._f.write(b"\0" * pad)
        self.split_records += bool(cuts)
        self._index.append((key, offset))
        self._keys.add(key)
        return offset

    def overwrite(self, offset: int, payload: bytes) -> None:
        """Replace the whole (unsplit) record at ``offset`` by ``payload`` of the same length,
        e.g. a header whose values are known only at the end."""
        end = self._f.tell()
        self._f.seek(offset)
        head = self._f.read(RECORD_HEAD_SIZE)
        magic, lrec = _RECORD_HEAD.unpack(head)
        if magic != MAGIC or lrec != len(payload) or _aligned_magics(payload):
            self._f.seek(end)
            raise ValueError(f"{self.rec_path}: cannot overwrite the record at byte offset "
                             f"{offset} with a {len(payload)}-byte payload")
        self._f.write(payload)
        self._f.seek(end)

    def close(self) -> None:
        if self._f.closed:
            return
        # on disk before anyone renames it into place (pre_process.pack_folder does)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        atomic_write_text(self.idx_path, "".join(f"{k}\t{o}\n" for k, o in self._index))


# ----------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    """List the first records of a .rec file: offset, payload size, IRHeader, image bytes."""
    parser = argparse.ArgumentParser(description="List the records of a RecordIO file.")
    add_debug_flag(parser)
    parser.add_argument("rec", help="the .rec file")
    parser.add_argument("--limit", type=positive_int, default=10, help="records to list")
    args = parser.parse_args(argv)
    reader = RecordReader(args.rec)
    for n, (offset, payload, error) in enumerate(reader.scan()):
        if n >= args.limit:
            break
        if error is not None:
            print(f"{offset:>12}  damaged: {error}")
            continue
        try:
            header, image = unpack_payload(payload, f"{args.rec}@{offset}")
            label = np.round(header.label, 4).tolist() if header.flag else header.label
            print(f"{offset:>12}  {len(payload):>8} B  flag={header.flag} label={label} "
                  f"id={header.id} image={len(image)} B")
        except RecordIOError:
            print(f"{offset:>12}  {len(payload):>8} B  (no image header)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
