"""An independent, minimal RecordIO writer and reader for the tests (struct written out here,
nothing shared with recordio.py), and a builder of small InsightFace-style test sets."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np

MAGIC = 0xCED7230A
MAGIC_LE = struct.pack("<I", MAGIC)
SIDE = 112


def ir_payload(label, image: bytes = b"", id_: int = 0, id2: int = 0) -> bytes:
    """IRHeader <IfQQ; a list label becomes flag=len(label) float32 values after it."""
    if isinstance(label, (list, tuple)):
        return (struct.pack("<IfQQ", len(label), 0.0, id_, id2)
                + struct.pack(f"<{len(label)}f", *label) + image)
    return struct.pack("<IfQQ", 0, float(label), id_, id2) + image


def encode_record(payload: bytes) -> bytes:
    """One record as dmlc writes it: cut at every 4-aligned magic (dropping it), parts with
    cflag 0 (whole) or 1/2/3 (first/middle/last), each padded with zeros to 4 bytes."""
    pieces, start = [], 0
    for pos in range(0, len(payload) - 3, 4):
        if payload[pos:pos + 4] == MAGIC_LE and pos >= start:
            pieces.append(payload[start:pos])
            start = pos + 4
    pieces.append(payload[start:])
    out = b""
    for n, piece in enumerate(pieces):
        if len(pieces) == 1:
            cflag = 0
        elif n == 0:
            cflag = 1
        elif n == len(pieces) - 1:
            cflag = 3
        else:
            cflag = 2
        out += struct.pack("<II", MAGIC, (cflag << 29) | len(piece)) + piece
        out += b"\x00" * (-len(piece) % 4)
    return out


def write_rec(rec_path: Path, records: list[tuple[int, bytes]], idx: bool = True,
              garbage_after: dict[int, bytes] | None = None) -> dict[int, int]:
    """Write ``(key, payload)`` records (+ ``.idx``); returns key -> byte offset.
    ``garbage_after[key]`` bytes are written right after that record (damage)."""
    offsets = {}
    with open(rec_path, "wb") as f:
        for key, payload in records:
            offsets[key] = f.tell()
            f.write(encode_record(payload))
            if garbage_after and key in garbage_after:
                f.write(garbage_after[key])
    if idx:
        Path(rec_path).with_suffix(".idx").write_text(
            "".join(f"{k}\t{o}\n" for k, o in offsets.items()))
    return offsets


def read_all_records(rec_path: Path) -> list[tuple[int, list[int], bytes]]:
    """Minimal independent reader: ``(offset, [cflags of its parts], joined payload)``."""
    data = Path(rec_path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        start, flags, parts = pos, [], []
        while True:
            magic, lrec = struct.unpack_from("<II", data, pos)
            assert magic == MAGIC, f"bad magic at {pos}"
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            parts.append(data[pos + 8:pos + 8 + length])
            flags.append(cflag)
            pos += 8 + length + (-length % 4)
            if cflag in (0, 3):
                break
        out.append((start, flags, MAGIC_LE.join(parts)))
    return out


def parse_payload(payload: bytes) -> tuple[int, object, bytes]:
    """``(flag, label or list of labels, image bytes)``."""
    flag, label, _, _ = struct.unpack_from("<IfQQ", payload)
    rest = payload[24:]
    if flag > 0:
        label = list(struct.unpack_from(f"<{flag}f", rest))
        rest = rest[4 * flag:]
    return flag, label, rest


# ----------------------------------------------------------------------------- images

def textured_image(seed: int, side: int = SIDE) -> np.ndarray:
    """A smooth random RGB uint8 image (compresses like a photo, differs per seed)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(side // 8, side // 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC)
    noise = rng.integers(-12, 13, size=img.shape)
    return np.clip(img.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    assert ok
    return buf.tobytes()


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def rgb_of(encoded: bytes) -> np.ndarray:
    """Decode with OpenCV and flip BGR to RGB here (independently of utils)."""
    bgr = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None
    return np.ascontiguousarray(bgr[:, :, ::-1])


def with_magic_comment(jpeg: bytes, payload_offset: int) -> bytes:
    """Insert a JPEG COM segment holding the RecordIO magic twice at 4-aligned payload
    positions (forcing a first/middle/last split) and once unaligned (no split). Decoders
    ignore COM segments, so the pixels stay those of ``jpeg``. ``payload_offset`` is where
    the JPEG starts inside the record payload."""
    body_start = payload_offset + 2 + 4  # after SOI, COM marker and its length field
    lead = b"a" * (-body_start % 4)
    comment = lead + MAGIC_LE + MAGIC_LE + b"c" + MAGIC_LE + b"xyz"
    segment = b"\xff\xfe" + struct.pack(">H", 2 + len(comment)) + comment
    return jpeg[:2] + segment + jpeg[2:]


def build_insightface_set(root: Path, counts=(3, 5, 2, 6), idx: bool = True,
                          corrupt_jpeg_at: int | None = None):
    """Header record 0, images 1..N, identity records; class c has counts[c] images.
    Even images are PNG (flag 0 label), odd JPEG, every third uses a label array
    [class, 7.5]; image 2 carries magic bytes (split record). Returns (rec path, offsets,
    list of (key, label, expected RGB or None if corrupt))."""
    root.mkdir(parents=True, exist_ok=True)
    records, expected = [], []
    key = 1
    ranges = []
    for cls, n in enumerate(counts):
        start = key
        for _ in range(n):
            rgb = textured_image(1000 + key)
            if key % 2 == 0:
                enc = png_bytes(rgb)
                want = rgb
            else:
                enc = jpeg_bytes(rgb)
                want = rgb_of(enc)
            label = [float(cls), 7.5] if key % 3 == 0 else float(cls)
            header_len = 24 + (8 if isinstance(label, list) else 0)
            if key == 2:
                enc = with_magic_comment(jpeg_bytes(rgb), header_len)
                want = rgb_of(enc)
            if key == corrupt_jpeg_at:
                enc = b"\x00garbage, not an image" * 4
                want = None
            records.append((key, ir_payload(label, enc, id_=key)))
            expected.append((key, cls, want))
            key += 1
        ranges.append((start, key))
    id_start = key
    for start, end in ranges:
        records.append((key, ir_payload([float(start), float(end)])))
        key += 1
    records.insert(0, (0, ir_payload([float(id_start), float(key)])))
    rec = root / "train.rec"
    offsets = write_rec(rec, records, idx=idx)
    return rec, offsets, expected


# ----------------------------------------------------------------------------- odd trees

def make_odd_tree(root: Path) -> dict[str, bool]:
    """An identity tree with odd but legal names and links: a non-UTF-8 file name (one good
    photo, one broken), a 246-character name, a symlinked identity folder kept elsewhere
    and a link back to its own folder (a loop). Returns {path below root that must be
    aligned: whether it is readable}."""
    rng = np.random.default_rng(3)

    def photo(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(rng.integers(1, 255, (90, 80, 3), np.uint8)))

    src = root / "src"
    elsewhere = root / "kept_elsewhere" / "cid"
    want = {}
    files = {("amy", os.fsdecode(b"caf\xe9.jpg")): True,
             ("amy", os.fsdecode(b"d\xe9j\xe0.jpg")): False,
             ("bob", "x" * 242 + ".jpg"): True}
    for (identity, name), readable in files.items():
        (src / identity).mkdir(parents=True, exist_ok=True)
        if readable:
            photo(src / identity / name)
        else:
            (src / identity / name).write_bytes(b"not an image")
        want[f"{identity}/{name}"] = readable
    photo(elsewhere / "0.jpg")
    (src / "cid").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "again").symlink_to(elsewhere, target_is_directory=True)  # a loop
    want["cid/0.jpg"] = True
    return want



BIG_LABEL = 16_000_000  # one identity's label in a set of ODD_IDENTITIES
ODD_IDENTITIES = 6
ODD_PER_IDENTITY = 4


def odd_record_sets(root: Path) -> dict[str, tuple[Path, str]]:
    """Files given as ``--rec`` that must be refused before any work, each with what the
    one-line error must say (computed here from the bytes written): an im2rec ``.lst``; a
    headerless set of 6 identities whose last is labelled 16,000,000; a set whose payloads
    are all text, not images."""
    root.mkdir(parents=True, exist_ok=True)
    lst = root / "train.lst"
    lst.write_text("".join(f"{n}\t{n % 3}.000000\tamy/{n}.jpg\n" for n in range(4)))
    labels = [c if c < ODD_IDENTITIES - 1 else BIG_LABEL
              for c in range(ODD_IDENTITIES) for _ in range(ODD_PER_IDENTITY)]
    big = root / "big_label" / "train.rec"
    big.parent.mkdir()
    offsets = write_rec(big, [(n, ir_payload(float(label), jpeg_bytes(textured_image(n))))
                              for n, label in enumerate(labels)])
    first = labels.index(BIG_LABEL)
    text = root / "text" / "train.rec"
    text.parent.mkdir()
    text_offsets = write_rec(text, [(n, ir_payload(float(n % 3), f"photo {n} of a person".encode()))
                                    for n in range(len(labels))])
    return {"lst": (lst, f"{lst}: not a RecordIO file"),
            "big label": (big, f"{big}: record {first} at byte offset {offsets[first]} has "
                               f"label {BIG_LABEL}"),
            "not images": (text, f"{text}: record 0 at byte offset {text_offsets[0]}: its ")}


# ----------------------------------------------------------------------------- damage

DAMAGE_KEY = 9  # the first record a damaged set loses (an image of class 1 with COUNTS below)
GARBAGE = b"junk" * 3  # 4-aligned: a scan without .idx resynchronises on the next record
DAMAGES = ("truncated", "garbage", "idx lines dropped")
DROPPED_IDX_KEYS = (9, 10, 11, 12)
TRUNCATE_AFTER = 10  # bytes of record DAMAGE_KEY that a truncated set keeps


def damaged_insightface_set(root: Path, how: str, counts=(3, 5, 2, 6), idx: bool = True):
    """An InsightFace set damaged after writing: ``truncated`` in the middle of record
    DAMAGE_KEY, ``garbage`` bytes inserted before it, or its ``.idx`` missing the lines of
    DROPPED_IDX_KEYS. Returns (rec, byte offset of the damage, lost record count, surviving
    (byte offset in the damaged file, class) image pairs), all computed here from the bytes
    written."""
    rec, offsets, expected = build_insightface_set(root, counts, idx=idx)
    data = rec.read_bytes()
    at = offsets[DAMAGE_KEY]
    starts = sorted(offsets.values())
    end_of = dict(zip(starts, starts[1:] + [len(data)], strict=True))
    if how == "truncated":
        cut = at + TRUNCATE_AFTER
        rec.write_bytes(data[:cut])
        lost = {k for k, o in offsets.items() if end_of[o] > cut}
        count = len(lost)
    elif how == "garbage":
        rec.write_bytes(data[:at] + GARBAGE + data[at:])
        # through the .idx every later offset is off; a scan loses no record, but the
        # garbage itself is one damaged stretch
        lost = {k for k, o in offsets.items() if o >= at} if idx else set()
        count = len(lost) or 1
    elif how == "idx lines dropped":
        assert idx
        idx_path = rec.with_suffix(".idx")
        lines = [ln for ln in idx_path.read_text().splitlines()
                 if int(ln.split("\t")[0]) not in DROPPED_IDX_KEYS]
        idx_path.write_text("".join(ln + "\n" for ln in lines))
        lost = set(DROPPED_IDX_KEYS)
        count = len(lost)
    else:
        raise ValueError(how)
    shift = len(GARBAGE) if how == "garbage" else 0
    surviving = [(offsets[k] + (shift if offsets[k] >= at else 0), c)
                 for k, c, _ in expected if k not in lost]
    return rec, at, count, surviving
