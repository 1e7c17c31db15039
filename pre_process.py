"""Validate and index RecordIO training sets, or pack an aligned image tree into one.

Two modes::

    python pre_process.py --rec data/faces_emore/train.rec     # validate + write the index
    python pre_process.py --pack data/mine_aligned --out data/mine/train.rec

The index format and the lost-record rules are in ``record_index.py``. The index goes beside
the ``.rec``, or where that folder cannot be written, under ``~/.cache/arcface-toolkit/``
(training looks there too). A file that is no set of faces is refused before any index is
written: no RecordIO magic at its start (a ``.lst``), payloads none of which is an image, or
(without a header record) labels far past the identities they number.

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
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from config import build_parser, parse_config
from records import recordio
from records.identity_folders import list_identity_images
from records.record_index import (
    INDEX_SUFFIX,
    MAX_LISTED,
    DatasetError,
    RecordIndex,
    default_index_path,
    index_path_for,
    index_record_file,
    load_index,
    require_complete,
    save_index,
)
from utils import (
    FACE_CROP_SIZE,
    ImageReadError,
    OutputKind,
    atomic_write_text,
    can_write_in,
    claim_output,
    decode_image,
    encode_image,
    get_logger,
    int_at_least,
    positive_int,
    remove_stale_temporaries,
    run_cli,
    starts_with,
    temp_path_for,
)

JPEG_QUALITY = 95
JPEG_QUALITY_MAX = 100  # OpenCV's JPEG quality runs 0..100 (libjpeg's scale)
JPEG_SIGNATURE = b"\xff\xd8\xff"

log = get_logger("face.pre_process")

# What an existing --out / --index-out must already be for this command to replace it: a
# RecordIO file starts with the record magic; an index is np.savez's zip (local file header,
# or the end record of an empty archive)
RECORDIO_KIND = OutputKind("a RecordIO file", starts_with(recordio.MAGIC_BYTES))
INDEX_KIND = OutputKind(f"a saved index ({INDEX_SUFFIX})", starts_with(b"PK\x03\x04",
                                                                      b"PK\x05\x06"))
# the text files --pack writes beside the .rec: a .idx's first line is "key<TAB>offset", a
# property file's "classes,size,size" (InsightFace's); an empty file is a killed writer's
IDX_KIND = OutputKind("a RecordIO .idx (key<TAB>offset lines)",
                      lambda p: _first_line_matches(p, r"\d+\t\d+"))
PROPERTY_KIND = OutputKind("a set's property file (classes,size,size)",
                           lambda p: _first_line_matches(p, r"\d+,\d+,\d+"))
SNIFF_BYTES = 64  # enough of a file for its first line of two or three integers


def _first_line_matches(path: Path, pattern: str) -> bool:
    """Whether ``path`` is a file, empty or with a first line fully matching ``pattern``."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES).decode("ascii", "replace")
    return not head or re.fullmatch(pattern, head.splitlines()[0].strip()) is not None


# ----------------------------------------------------------------------------- packing


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
    """:func:`_pack_folder` as the one writer of ``out_rec`` and its index, neither of them
    an input nor a file of another kind (:func:`utils.claim_output`)."""
    check_pack_paths(src_dir, out_rec)
    index_path = Path(index_path) if index_path else index_path_for(out_rec)
    idx = Path(idx_path) if idx_path else recordio.default_idx_path(out_rec)
    inputs = {"--pack": src_dir}
    # the .idx and property beside --out are outputs too: two packs into one folder would
    # both write its property file, and a user's file of that name must not be replaced
    with claim_output(out_rec, "--out", inputs, RECORDIO_KIND), \
            claim_output(index_path, "--index-out", inputs, INDEX_KIND), \
            claim_output(idx, "the .idx of --out", inputs, IDX_KIND), \
            claim_output(Path(out_rec).parent / PROPERTY_NAME, "the property file of --out",
                         inputs, PROPERTY_KIND):
        return _pack_folder(src_dir, out_rec, idx_path, image_size, quality, progress,
                            index_path)


def _pack_folder(src_dir: str | Path, out_rec: str | Path, idx_path: str | Path | None,
                 image_size: int, quality: int, progress: bool,
                 index_path: Path) -> PackSummary:
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
    paths, labels, names = list_identity_images(src_dir)
    out_rec = Path(out_rec)
    idx_path = Path(idx_path) if idx_path else recordio.default_idx_path(out_rec)
    property_path = out_rec.parent / PROPERTY_NAME
    targets = [out_rec, idx_path, index_path, property_path]
    out_rec.parent.mkdir(parents=True, exist_ok=True)
    for target in targets:  # left by a killed pack; one pack writes a set at a time
        remove_stale_temporaries(target.parent, target.name)
    temps = {target: temp_path_for(target) for target in targets}
    try:
        summary = _write_records(paths, labels, names, temps[out_rec], temps[idx_path],
                                 image_size, quality, progress)
        if not summary.images:  # refused before the renames: the set at --out stays
            first = f" (first: {summary.unreadable[0]})" if summary.unreadable else ""
            raise DatasetError(f"--pack {src_dir}: no readable image, {len(summary.unreadable)}"
                               f" unreadable{first}; {out_rec} is left as it was")
        index = index_record_file(temps[out_rec], temps[idx_path], progress=progress)
        if index.lost or len(index) != summary.images:
            raise DatasetError(f"{temps[out_rec]}: the packed set does not read back "
                               f"({len(index)} of {summary.images} images, {index.lost} "
                               f"lost); {out_rec} is left as it was")
        index.identities = names  # label k is names[k]: resume checks this list
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

def _index_destination(rec: Path, index_out: str | None) -> Path:
    """Where ``--rec``'s index is saved: ``--index-out``, else beside the ``.rec`` or, where
    its folder cannot be written, in the user cache folder (said; training looks there too).
    Refused, naming the folder, when that cannot be written either."""
    out = Path(index_out) if index_out else default_index_path(rec)
    if not can_write_in(out.parent):
        what = f"--index-out {out}" if index_out else f"the index of {rec} ({out})"
        raise DatasetError(f"{what}: cannot write in {out.parent}; name a writable place "
                           f"with --index-out")
    if out != index_path_for(rec) and not index_out:
        log.info("%s cannot be written: the index goes to %s", rec.parent, out)
    return out


def build_arg_parser() -> argparse.ArgumentParser:
    parser = build_parser(__doc__.split("\n\n")[0],
                          only=["rec", "allow_lost_records"])
    group = parser.add_argument_group("pre_process.py")
    group.add_argument("--pack", metavar="SRC_DIR", default=None,
                       help="pack an aligned tree SRC_DIR/identity/image into --out")
    group.add_argument("--out", default=None, help="output .rec for --pack")
    group.add_argument("--idx", default=None,
                       help="the .idx to use; None: the one beside the .rec, or scan the file")
    group.add_argument("--index-out", default=None,
                       help=f"where to write the index; None: <rec stem>{INDEX_SUFFIX} beside "
                            f"it, or in ~/.cache/arcface-toolkit/ where its folder is "
                            f"read-only")
    group.add_argument("--check-images", action="store_true",
                       help="also decode every image (slow; finds corrupt JPEGs)")
    group.add_argument("--quality", type=int_at_least(0, JPEG_QUALITY_MAX), default=JPEG_QUALITY,
                       help="JPEG quality for images --pack must re-encode")
    group.add_argument("--image-size", type=positive_int, default=FACE_CROP_SIZE,
                       help="side of the square images --pack writes")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def check_mode_flags(args: argparse.Namespace) -> None:
    """Flags of the other mode are refused, not ignored: --idx and --check-images index an
    existing --rec; --out is where --pack writes."""
    if args.pack:
        for flag, given in (("--idx", args.idx is not None),
                            ("--check-images", args.check_images)):
            if given:
                raise DatasetError(f"{flag} applies to indexing an existing --rec, not to "
                                   "--pack (which indexes the set it writes)")
    elif args.out is not None:
        raise DatasetError("--out is where --pack writes its set; without --pack it does "
                           "nothing (the index goes to --index-out)")


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_config(argv, parser=build_arg_parser())
    check_mode_flags(args)
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
        recordio.RecordReader(rec).close()  # a missing or foreign file is named first
        out = _index_destination(rec, args.index_out)  # checked before the work
        with claim_output(out, "--index-out", {"--rec": rec, "--idx": args.idx}, INDEX_KIND):
            kept = load_index(rec, args.idx)  # a fresh index of this very .rec
            index = index_record_file(rec, args.idx, check_images=args.check_images,
                                      progress=progress)
            index.identities = kept.identities if kept else None  # the .rec holds no names
            out = save_index(index, out)
    print(f"index of {rec} -> {out}\n{index.format_summary()}")
    # after the summary, so the damage is listed; the saved index lets training start fast
    # when the user then accepts the loss
    require_complete(index, cfg.allow_lost_records)
    return 0

if __name__ == "__main__":
    sys.exit(run_cli(main))
