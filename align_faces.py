"""Face detection (MTCNN) and 5-point similarity alignment to ArcFace's 112x112 template.

Usage as a script mirrors a tree of photos ``SRC_DIR/identity/image.jpg`` into aligned
112x112 crops ``DST_DIR/identity/image.jpg``::

    python align_faces.py data/casia_raw data/casia_aligned [--skip-missing]
                          [--detect-size 512] [--workers 2]

MTCNN searches each photo on a copy whose longer side is at most ``--detect-size`` pixels
(0: full size; DEFAULT_DETECT_SIZE says what that costs and saves). A JPEG at least twice
that size is decoded at 1/2-1/8 (reduced_photo) and its crop warped from that decode unless
the face is too small there (MIN_REDUCED_EYE_RATIO). Photos are read upright by EXIF.

As a library::

    aligner = FaceAligner()                      # MTCNN, CUDA when present
    face = aligner.align(rgb_image)              # AlignedFace or None
    crop = face_warp.warp_face(rgb_image, five_points)  # when the landmarks are known

Detection uses facenet-pytorch's MTCNN, whose weights ship inside its wheel (nothing is
downloaded). Every image in and out is RGB uint8 HxWx3 (the repo's colour contract).
Landmarks are (5, 2) float arrays of (x, y) pixel coordinates in the order left eye, right
eye, nose tip, left mouth corner, right mouth corner, where "left" means the image's left
(InsightFace's and MTCNN's convention).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# MTCNN is many small ops: with OpenMP's default spin-waiting, a core shared with other work
# made 2 threads 3-10x slower (and burn 4-6x the CPU); sleeping waits do not. OpenMP reads
# this when torch loads, so it is set before the imports below, which load torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from faces.aligner import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DETECT_SIZE,
    DEFAULT_MIN_FACE_SIZE,
    DEFAULT_REFINE_STEPS,
    FaceAligner,
)
from faces.face_warp import TEMPLATE_SIZE
from faces.file_alignment import DEFAULT_WORKERS, align_files
from utils import (
    IMAGE_EXTENSIONS,
    DeviceError,
    OutputKind,
    ToolkitError,
    add_debug_flag,
    atomic_write_text,
    claim_output,
    describe_error,
    get_device,
    get_logger,
    int_at_least,
    list_images,
    run_cli,
    write_image,
)

REPORT_NAME = "align_report.tsv"  # default report file, inside DST_DIR
STATUS_NO_FACE = "no_face"
STATUS_UNREADABLE = "unreadable"
STATUS_NOT_WRITTEN = "not_written"  # the crop's file could not be made (the others were)
# errors of the whole destination, not of one file's name: the run stops at the first
WHOLE_DESTINATION_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
STATUS_ALIGNED = "aligned"  # only written to clear an earlier entry of the same file
REPORT_SNIFF_BYTES = 1 << 16  # the head of an existing --report read to tell it is one

log = get_logger("align")


class AlignInputError(ToolkitError, ValueError):
    """A source or destination folder align_tree cannot use; the message names it."""

    exit_code = 2


# ----------------------------------------------------------------------------- geometry


# ----------------------------------------------------------------------------- detector


# ----------------------------------------------------------------------------- tree

# Characters a file name may hold that would split a report line (a tab ends a field; str.
# splitlines breaks at the others): written as escapes, so each file keeps one line.
_REPORT_BREAKS = "\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_REPORT_ESCAPES = {ord(c): f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
                   for c in _REPORT_BREAKS}


def _report_text(text: str) -> str:
    """``text`` (a path relative to the source, or an error naming a file) as the report's
    UTF-8 holds it: the bytes of a file name that is not UTF-8 are written ``\\xNN``, as
    Python shows them (the report would otherwise be cut at that name), and so are a tab
    and line breaks (``\\x09``, ``\\x0a``, ``\\u2028``, ...: see _REPORT_BREAKS)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") \
        .translate(_REPORT_ESCAPES)


def _read_report(path: Path) -> dict[str, tuple[str, str]]:
    """relative path -> (status, detail); later lines win (the file is appended to).

    A run killed while appending can cut a line inside a multi-byte UTF-8 name: such bytes
    are replaced (with a warning naming the file), and the garbled entry, whose path is in
    no source, is dropped when align_tree rewrites the report."""
    entries: dict[str, tuple[str, str]] = {}
    if path.is_file():
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            log.warning("%s: not valid UTF-8 at byte %d (cut by a killed run?); the "
                        "unreadable entry is dropped", path, e.start)
            text = raw.decode("utf-8", errors="replace")
        for line in text.splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            if parts[0] == STATUS_ALIGNED:
                entries.pop(parts[1], None)
            elif parts[0] in (STATUS_NO_FACE, STATUS_UNREADABLE, STATUS_NOT_WRITTEN):
                entries[parts[1]] = (parts[0], parts[2] if len(parts) > 2 else "")
    return entries


def _write_crop(path: Path, crop: np.ndarray) -> str | None:
    """Write one crop; None, or why this file could not be written (a name or character
    the destination's filesystem refuses, a file where its folder should be). A full or
    read-only disk concerns every file: raised."""
    try:
        write_image(path, crop)
    except OSError as e:
        if e.errno in WHOLE_DESTINATION_ERRORS:
            raise
        return describe_error(e)
    return None


def _is_report(path: Path) -> bool:
    """Whether ``path`` is empty or a report: every line ``status<TAB>...`` (the last one may
    be cut short, by a killed run or by the bytes read here)."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(REPORT_SNIFF_BYTES)
    *lines, last = head.split(b"\n")
    starts = [f"{status}\t".encode() for status in
              (STATUS_NO_FACE, STATUS_UNREADABLE, STATUS_ALIGNED,
               STATUS_NOT_WRITTEN)]
    return all(line.startswith(tuple(starts)) for line in lines) and \
        any(last.startswith(s) or s.startswith(last) for s in starts)


REPORT_KIND = OutputKind("an alignment report", _is_report)


def align_tree(src_dir: str | Path, dst_dir: str | Path, **options: Any) -> dict[str, Any]:
    """:func:`_align_tree` (its options by name) as the one writer of ``dst_dir`` and of its
    report, which is an alignment report (or new) and none of the source's files.
    Refused before any work (:func:`utils.claim_output`)."""
    report_path = options.get("report_path")
    report = Path(report_path) if report_path is not None else Path(dst_dir) / REPORT_NAME
    # DST_DIR (and so the default report) inside the source is _align_tree's first check
    inputs = {"the source": src_dir} if report_path is not None else {}
    # The report is locked too: another run naming it as its --report would rewrite it. Not
    # the default one of a DST_DIR not yet a folder (its lock would make DST_DIR before
    # _align_tree's checks; a new DST_DIR's report has nothing to lose).
    lock_report = report_path is not None or Path(dst_dir).is_dir()
    with claim_output(dst_dir, "DST_DIR"), \
            claim_output(report, "--report", inputs, REPORT_KIND, lock=lock_report):
        return _align_tree(src_dir, dst_dir, **options)


def _align_tree(src_dir: str | Path, dst_dir: str | Path, skip_missing: bool = False,
               batch_size: int = DEFAULT_BATCH_SIZE,
               min_face_size: int = DEFAULT_MIN_FACE_SIZE,
               report_path: str | Path | None = None, progress: bool = True,
               device: Any = None, aligner: FaceAligner | None = None,
               detect_size: int = DEFAULT_DETECT_SIZE, num_workers: int = DEFAULT_WORKERS,
               refine_steps: int = DEFAULT_REFINE_STEPS) -> dict[str, Any]:
    """Align every image under ``src_dir`` into the same relative path under ``dst_dir``.

    Resumable: an output that exists is skipped. A faceless image is centre-cropped
    (:func:`center_crop`) or, with ``skip_missing``, not written; either way it is listed in
    the report (``DST_DIR/align_report.tsv`` unless ``report_path``), one line
    ``status<TAB>relative path<TAB>detail``, as is every unreadable file. The report keeps
    what earlier runs found. Returns the summary printed at the end.
    """

    src, dst = Path(src_dir).resolve(), Path(dst_dir).resolve()
    files = _source_images(src, dst)
    report = Path(report_path) if report_path is not None else dst / REPORT_NAME
    dst.mkdir(parents=True, exist_ok=True)
    entries = _read_report(report)
    todo = [p for p in files if not (dst / p.relative_to(src)).exists()]
    start = time.perf_counter()
    if todo and aligner is None:
        aligner = FaceAligner(device=device, min_face_size=min_face_size, batch_size=batch_size,
                              detect_size=detect_size, refine_steps=refine_steps)
    report.parent.mkdir(parents=True, exist_ok=True)
    items = align_files(aligner, todo, batch_size,
                        size=aligner.size if aligner is not None else TEMPLATE_SIZE,
                        progress=progress, num_workers=num_workers)
    counts = _write_and_report(items, src, dst, report, entries, skip_missing)
    report_entries = _compact_report(report, entries, files, src)
    seconds = time.perf_counter() - start
    processed = len(todo) - counts["unreadable"]
    summary = {
        "images": len(files),
        "skipped_existing": len(files) - len(todo),
        **counts,
        "report": str(report),
        "report_entries": report_entries,
        "seconds": round(seconds, 2),
        "images_per_s": round(processed / seconds, 1) if processed and seconds > 0 else 0.0,
    }
    return summary


def _source_images(src: Path, dst: Path) -> list[Path]:
    """The images under ``src``, once ``src`` and ``dst`` are known to be usable folders."""
    if not src.exists():
        raise AlignInputError(f"source folder not found: {src}")
    if not src.is_dir():
        raise AlignInputError(f"source is a file, not a folder: {src}")
    if dst.exists() and not dst.is_dir():
        raise AlignInputError(f"destination is a file, not a folder: {dst}")
    if dst == src or src in dst.parents:
        raise AlignInputError(f"destination {dst} must not be inside the source {src}")
    files = list_images(src)
    if not files:  # a wrong folder, not a finished job: say so before creating DST_DIR
        raise AlignInputError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) under {src}")
    return files


def _write_and_report(items: Iterable[Any], src: Path, dst: Path, report: Path,
                      entries: dict[str, tuple[str, str]], skip_missing: bool) -> dict[str, int]:
    """Write each aligned (or centre-cropped) item's crop under ``dst`` and note in the report
    every file that is not simply aligned; ``entries`` (the report's lines by file) follows
    along. Returns how many items ended each way."""
    counts = {"aligned": 0, "no_face": 0, "centre_cropped": 0, "unreadable": 0,
              "not_written": 0}
    # Report lines are appended as they happen so a crash loses none of them.
    with report.open("a", encoding="utf-8") as report_file:
        def note(rel: str, status: str, detail: str) -> None:
            detail = _report_text(detail)
            entries[rel] = (status, detail)
            report_file.write(f"{status}\t{rel}\t{detail}\n")
            report_file.flush()

        for item in items:
            rel = item.path.relative_to(src).as_posix()
            key = _report_text(rel)  # the file's name in the report
            failed = None if item.crop is None or (item.face is None and skip_missing) \
                else _write_crop(dst / rel, item.crop)
            if item.error is not None:
                counts["unreadable"] += 1
                note(key, STATUS_UNREADABLE, str(item.error).replace("\t", " "))
            elif failed is not None:
                counts["not_written"] += 1
                note(key, STATUS_NOT_WRITTEN, failed.replace("\t", " "))
            elif item.face is not None:
                counts["aligned"] += 1
                if entries.pop(key, None) is not None:  # listed by an earlier run
                    report_file.write(f"{STATUS_ALIGNED}\t{key}\t\n")
            else:
                counts["no_face"] += 1
                if skip_missing:
                    note(key, STATUS_NO_FACE, "skipped")
                else:  # align_files' centre crop, written above
                    counts["centre_cropped"] += 1
                    note(key, STATUS_NO_FACE, "centre-cropped")
    return counts


def _compact_report(report: Path, entries: dict[str, tuple[str, str]], files: list[Path],
                    src: Path) -> int:
    """Rewrite the appended report as one line per file, only files still in the source;
    returns how many lines it keeps."""
    present = {_report_text(p.relative_to(src).as_posix()) for p in files}
    lines = [f"{s}\t{rel}\t{d}\n" for rel, (s, d) in sorted(entries.items()) if rel in present]
    atomic_write_text(report, "".join(lines))
    return len(lines)


def format_summary(summary: dict[str, Any]) -> str:
    return "\n".join([
        f"images found      {summary['images']}",
        f"already done      {summary['skipped_existing']} (skipped)",
        f"aligned           {summary['aligned']}",
        f"no face found     {summary['no_face']} "
        f"({summary['centre_cropped']} centre-cropped, the rest skipped)",
        f"unreadable        {summary['unreadable']}",
        f"not written       {summary['not_written']} (listed in the report)",
        f"speed             {summary['images_per_s']} images/s "
        f"({summary['seconds']} s)",
        f"report            {summary['report']} ({summary['report_entries']} entries)",
    ])


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Align a tree SRC_DIR/identity/image.jpg into 112x112 ArcFace crops "
                    "mirrored under DST_DIR (MTCNN + 5-point similarity). Resumable.")
    add_debug_flag(p)
    p.add_argument("src_dir", type=Path, help="folder of identity sub-folders of photos")
    p.add_argument("dst_dir", type=Path, help="output folder (same relative paths)")
    p.add_argument("--skip-missing", action="store_true",
                   help="do not write images without a detected face (default: centre-crop "
                        "them); both ways they are listed in the report")
    p.add_argument("--batch-size", type=int_at_least(1), default=DEFAULT_BATCH_SIZE,
                   help="equal-size images per MTCNN batch")
    p.add_argument("--min-face-size", type=int_at_least(1), default=DEFAULT_MIN_FACE_SIZE,
                   help="smallest face searched, in pixels of the image MTCNN sees (larger "
                        "is faster)")
    p.add_argument("--detect-size", type=int_at_least(0), default=DEFAULT_DETECT_SIZE,
                   help="MTCNN searches a copy whose longer side is at most this many pixels "
                        "(big JPEGs are decoded reduced); a photo scaled down by "
                        "s finds faces from min-face-size / s pixels up. 0: full size (slow "
                        "on big photos; for small faces in big group photos)")
    p.add_argument("--refine-steps", type=int_at_least(0), default=DEFAULT_REFINE_STEPS,
                   help="O-net passes that re-estimate each face's landmarks from its own "
                        "box (each on the crop and its mirror); the landmarks are the mean "
                        "of MTCNN's and every pass's (0: MTCNN's landmarks as published)")
    p.add_argument("--workers", type=int_at_least(1), default=DEFAULT_WORKERS,
                   help="threads, each reading and aligning a batch of files at a time")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--report", type=Path, default=None,
                   help=f"report file (default DST_DIR/{REPORT_NAME})")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    # The workers' searches run side by side: each gets its share of torch's threads (on 2
    # cores, 2 workers of 1 thread did 50 photos/s at 512 px, of 2 threads 44: bench README).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // args.workers))
    try:  # folder errors are AlignInputErrors: run_cli prints them
        get_device(args.device)  # one the toolkit runs on and this machine has: before any work
        summary = align_tree(args.src_dir, args.dst_dir, skip_missing=args.skip_missing,
                             batch_size=args.batch_size, min_face_size=args.min_face_size,
                             report_path=args.report, progress=not args.no_progress,
                             device=None if args.device == "auto" else args.device,
                             detect_size=args.detect_size, num_workers=args.workers,
                             refine_steps=args.refine_steps)
    except DeviceError as e:  # --device mps, or cuda without CUDA (other errors: run_cli's)
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:  # main() is also called in-process (tests, notebooks)
        torch.set_num_threads(threads)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
