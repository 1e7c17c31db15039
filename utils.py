"""Helpers every script needs: logging, seeding, device choice, atomic checkpoints, images.

Colour contract: every in-memory image in this repo is RGB, uint8, HxWx3. OpenCV's BGR
order never leaves :func:`decode_image` / :func:`encode_image`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:  # OpenCV's thread pool must not start before a DataLoader forks its workers
    import cv2

    cv2.setNumThreads(1)
except ImportError:  # pragma: no cover - opencv is in requirements.txt
    cv2 = None

FACE_CROP_SIZE = 112  # side of the aligned face crops (ArcFace's 112x112 template) everywhere
CORRUPT_REASON_CHARS = 120  # enough of torch's reason for a corrupt file to keep one line
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ToolkitError(Exception):
    """A problem with the user's input or environment, not a bug: the message names the file
    and what is wrong. Every script prints it as one line ``error: ...`` and exits non-zero
    (:func:`run_cli`); ``--debug`` shows the traceback instead. The project's own error types
    derive from it (and from the builtin they used to be, so ``except ValueError`` still works).
    ``exit_code`` lets a script tell kinds of failure apart (train.py: 2 = non-finite loss)."""

    exit_code = 1


class DeviceError(ToolkitError, RuntimeError):
    """A ``--device`` that this machine does not have."""


class ImageReadError(ToolkitError, ValueError):
    """An image file or buffer that cannot be decoded; the message names the source."""


class MissingInputError(ToolkitError, FileNotFoundError):
    """An input file or folder that does not exist or holds nothing to work on; the message
    names it."""


def first_few(items: Sequence[str], limit: int, sep: str = ", ") -> str:
    """The first ``limit`` of ``items`` joined by ``sep``, ending ``<sep>...`` when there are
    more: how a one-line error names a few of a list whose full count it gives."""
    return sep.join(items[:limit]) + (f"{sep}..." if len(items) > limit else "")


# ----------------------------------------------------------------------------- command line

DEBUG_FLAG = "--debug"


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Every script's parser accepts ``--debug`` (read by :func:`run_cli`)."""
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="on an error, show the full traceback instead of one line")


def describe_error(e: BaseException) -> str:
    """One line for the user: OSErrors as ``path: reason`` (disk full said plainly)."""
    if isinstance(e, OSError) and not isinstance(e, ToolkitError):
        import errno

        reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return f"{where}: {reason}" if where else reason
    return str(e) or type(e).__name__


def run_cli(main: Callable[[Sequence[str]], int | None],
            argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main(argv)``: the project's errors (:class:`ToolkitError`) and OS
    errors (missing file, permission, disk full) become ``error: <message>`` on stderr and a
    non-zero exit code, without a traceback unless ``--debug`` is given. Anything else is a
    bug and keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(main(argv) or 0)
    except (ToolkitError, OSError) as e:
        if DEBUG_FLAG in argv:
            raise
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- logging

def get_logger(name: str = "face", level: int = logging.INFO) -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                               "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    return logger


# ----------------------------------------------------------------------------- runtime

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_device(name: str = "auto") -> "torch.device":  # noqa: F821 - lazy torch import
    """``auto`` picks CUDA when present, else the CPU; anything else is passed to torch."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N"
                          ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                          "CUDA device(s)")
    return device


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_NEVER_TRIM = -1  # M_TRIM_THRESHOLD -1: never give the heap's free top back (mallopt(3))


def reuse_freed_memory() -> bool:
    """Linux/glibc only: serve large allocations from the process heap and keep freed
    memory for reuse instead of handing it back to the kernel. Returns whether it applied.

    Why: glibc gives every block over 32 MB its own mmap and unmaps it on free, so a CPU
    training step that allocates the head's gradient (85k x 512 floats = 175 MB) afresh
    page-faults through it every step. Measured on 2 cores: the ArcFace head's
    forward+backward+SGD drops from ~580 ms to ~290 ms. The cost is that the process keeps
    its peak heap (what jemalloc/tcmalloc, which PyTorch's CPU tuning guide suggests, do too).
    Process-wide, so only on request: train.py calls it when the config's keep_freed_memory
    is set, bench/train_throughput.py with --keep-freed-memory."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


# ----------------------------------------------------------------------------- atomic files

def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by the
    classic set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0o666 less the umask. Temporaries
    from ``tempfile.mkstemp`` are 0o600; files renamed from them get this mode instead, so a
    group can read what a tool writes, as with any other tool's output."""
    return 0o666 & ~current_umask()


TEMP_SUFFIX = ".tmp"  # temporaries are ".<name>.<random>.tmp" beside their final file


def _new_temp(path: Path) -> tuple[int, str]:
    """A new temporary ``.<name>.<random>.tmp`` beside ``path`` (what
    :func:`remove_stale_temporaries` finds) with the umask's mode: its open descriptor and
    its path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def temp_path_for(path: str | Path) -> Path:
    """A fresh, empty temporary file beside ``path`` with the umask's mode, for a writer that
    opens files by name (np.save, the RecordIO writer); rename it over ``path`` when it is whole."""
    fd, tmp = _new_temp(Path(path))
    os.close(fd)
    return Path(tmp)


def remove_stale_temporaries(folder: str | Path, name: str,
                             suffix: str = TEMP_SUFFIX) -> list[Path]:
    """Delete temporaries that a killed writer left for the file ``name`` in ``folder``
    (``.<name>.*<suffix>``: files, or staging folders with their contents). Call it only
    where no other writer of that file can be running."""
    removed = []
    for p in Path(folder).glob(f".{name}.*{suffix}"):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def _atomic_write(path: str | Path, write) -> None:
    """Write through ``write(file_object)`` into a temp file beside ``path``, fsync, rename.

    A crash at any point leaves either the old file or the new one, never half of one. The
    new file gets the umask's mode (:func:`new_file_mode`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, RuntimeError) and isinstance(e.__cause__ or e.__context__, OSError):
            # torch's zip writer reports a failed write (ENOSPC: disk full) as
            # RuntimeError('unexpected pos ...'), the OSError only as its context
            failed = e.__cause__ or e.__context__
        elif isinstance(e, OSError) and e.filename is None:  # a failed write() names no file
            failed = e
        else:
            raise
        raise OSError(failed.errno, failed.strerror or str(failed), str(path)) from e


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Atomically save a dict of state dicts / tensors / plain values with ``torch.save``."""
    import torch

    _atomic_write(path, lambda f: torch.save(dict(state), f))


class CheckpointError(ToolkitError, RuntimeError):
    """A checkpoint that cannot be loaded: missing, truncated, corrupt, or not trusted
    because it holds pickled Python objects. The message is one line naming the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at the checkpoint path (still a FileNotFoundError for existing callers)."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint holding arbitrary Python objects, which unpickling could run as code."""


_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # names the refused class in torch's message
_CORRUPT_PICKLE = "Unsupported operand"  # torch's safe unpickler on a byte it cannot parse


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint saved by :func:`save_checkpoint`; never unpickles arbitrary objects.

    Raises CheckpointNotFoundError (a FileNotFoundError), UntrustedCheckpointError for a file
    holding pickled Python objects, CheckpointError for an empty, truncated or corrupt one."""
    import pickle

    import torch

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False, i.e. running the file's code: never
        # repeat that; name the offending class instead
        if _CORRUPT_PICKLE in str(e):  # a damaged pickle stream, not a foreign object
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt: "
                                  "invalid pickle data)") from None
        found = _UNSAFE_GLOBAL.search(str(e))
        what = f" (e.g. {found.group(1)})" if found else ""
        raise UntrustedCheckpointError(
            f"{path}: not trusted: it holds arbitrary Python objects{what}, not only tensors "
            "and plain values, and loading those could run code; refusing to load it. "
            "Use a checkpoint written by this toolkit (train.py) or re-save the weights as a "
            "plain state dict") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError) as e:
        # torch's first sentence says what broke; the rest is generic advice
        reason = " ".join(str(e).split()).split(". ")[0].rstrip(".") or type(e).__name__
        if len(reason) > CORRUPT_REASON_CHARS:
            reason = reason[:CORRUPT_REASON_CHARS - 3] + "..."
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or "
                              f"corrupt: {reason})") from None


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) key prefixes."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:  # the wrappers nest in either order (DDP of compiled, or reverse)
            stripped = False
            for prefix in ("module.", "_orig_mod."):
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def load_backbone_state(path: str | Path) -> dict[str, Any]:
    """The backbone weights from either ``backbone.pt`` (a bare state dict) or a full
    training checkpoint (key ``backbone``), prefixes stripped."""
    state = load_checkpoint(path)
    if isinstance(state, dict) and "backbone" in state and isinstance(state["backbone"], dict):
        state = state["backbone"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of "
                              "backbone weights")
    return strip_module_prefix(state)


# ----------------------------------------------------------------------------- provenance
# Every derived file (eval results and thresholds, feature trees) records the checkpoint it
# came from by content, so a checkpoint replaced under the same name (train.py --overwrite)
# is told apart; consumers compare before they use it.

HASH_CHUNK_BYTES = 1 << 20  # streamed in 1 MiB reads: a multi-GB checkpoint is never in memory
SHORT_HASH_CHARS = 12  # hex digits shown in names and messages: 48 bits, no clash in practice
CHECKPOINT_HASH_KEY = "checkpoint_sha256"  # the field derived files record it under
# (resolved path, inode, size, mtime_ns, ctime_ns) -> hash. The ctime too: a file rewritten
# with its old mtime put back (cp -p, rsync -t, os.utime) still gets a new ctime
_FILE_HASHES: dict[tuple[str, int, int, int, int], str] = {}


class ProvenanceError(ToolkitError, ValueError):
    """A derived file made from another checkpoint or input set than the one in use, or one
    that does not record what it came from; the message names both."""


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's content, streamed; computed once per process while the
    file keeps its inode, size, mtime and ctime."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def short_hash(text: str) -> str:
    """A short hex digest of ``text`` (e.g. a path) for file names that must not collide."""
    return hashlib.sha256(os.fsencode(text)).hexdigest()[:SHORT_HASH_CHARS]


def checkpoint_record(checkpoint: str | Path) -> dict[str, str]:
    """What a derived file records about the checkpoint it came from: path and content."""
    return {"checkpoint": str(checkpoint), CHECKPOINT_HASH_KEY: file_sha256(checkpoint)}


def require_same_checkpoint(record: Mapping[str, Any], source: str | Path,
                            checkpoint: str | Path, remedy: str) -> None:
    """ProvenanceError, naming ``source`` (the derived file) and ``checkpoint``, unless
    ``record`` was made from ``checkpoint``'s content. A record without the field (written
    before provenance was recorded) is of unknown origin and refused alike."""
    recorded = record.get(CHECKPOINT_HASH_KEY)
    if not isinstance(recorded, str):
        raise ProvenanceError(f"{source}: does not record the checkpoint it came from (made "
                              f"by an older version), so it cannot be used with {checkpoint}; "
                              f"{remedy}")
    current = file_sha256(checkpoint)
    if recorded != current:
        raise ProvenanceError(
            f"{source}: made from another checkpoint ({record.get('checkpoint', '?')}, sha256 "
            f"{recorded[:SHORT_HASH_CHARS]}) than {checkpoint} (sha256 "
            f"{current[:SHORT_HASH_CHARS]}); {remedy}")


# ----------------------------------------------------------------------------- images

# EXIF orientation (TIFF/EXIF 2.3 tag 274): how the stored pixels must be turned for display.
# Phones store photos sideways and set this tag; OpenCV's IMREAD_UNCHANGED ignores it.
EXIF_ORIENTATION_TAG = 0x0112
ORIENTATION_UPRIGHT = 1
_TIFF_SHORT = 3  # the TIFF field type of the orientation value
_EXIF_PREFIX = b"Exif\x00\x00"  # starts a JPEG APP1 EXIF segment (and some WebP EXIF chunks)
_JPEG_SOI, _JPEG_APP1, _JPEG_SOS, _JPEG_EOI = 0xD8, 0xE1, 0xDA, 0xD9
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers
# JPEGs decode at 1/2, 1/4 or 1/8 of their size with libjpeg's DCT scaling: each 8x8 block
# becomes 4x4, 2x2 or 1x1 pixels (each side ceil(side / reduce)), skipping most of the inverse
# DCT and colour conversion and any separate downscale. Progressive JPEGs gain less: their
# entropy decoding, the same at every scale, is most of their cost.
JPEG_REDUCTIONS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                   8: cv2.IMREAD_REDUCED_COLOR_8} if cv2 is not None else {}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tiff_orientation(tiff: memoryview) -> int:
    """The orientation tag in IFD0 of an EXIF payload (a TIFF structure)."""
    if len(tiff) < 8 or bytes(tiff[:2]) not in (b"II", b"MM"):
        return ORIENTATION_UPRIGHT
    order = "<" if bytes(tiff[:2]) == b"II" else ">"
    ifd = struct.unpack_from(order + "I", tiff, 4)[0]
    if ifd + 2 > len(tiff):
        return ORIENTATION_UPRIGHT
    count = struct.unpack_from(order + "H", tiff, ifd)[0]
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind = struct.unpack_from(order + "HH", tiff, entry)
        if tag == EXIF_ORIENTATION_TAG:
            value = struct.unpack_from(order + "H", tiff, entry + 8)[0]
            return value if kind == _TIFF_SHORT and 1 <= value <= 8 else ORIENTATION_UPRIGHT
    return ORIENTATION_UPRIGHT


def _jpeg_segments(buf: memoryview) -> Iterator[tuple[int, memoryview]]:
    """(marker, payload) of a JPEG's marker segments before the scan data. Walks the header
    only (a handful of segments for a JPEG without EXIF: microseconds); stops at anything
    that is not a marker (a malformed header is left to the decoder)."""
    pos = 2
    while pos + 4 <= len(buf):
        if buf[pos] != 0xFF:
            return
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (_JPEG_SOS, _JPEG_EOI):
            return
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        yield marker, buf[pos + 4:pos + 2 + length]
        pos += 2 + length


def _jpeg_exif(buf: memoryview) -> memoryview | None:
    """The TIFF payload of a JPEG's APP1 EXIF segment."""
    for marker, payload in _jpeg_segments(buf):
        if marker == _JPEG_APP1 and bytes(payload[:6]) == _EXIF_PREFIX:
            return payload[6:]
    return None


def _png_exif(buf: memoryview) -> memoryview | None:
    """The payload of a PNG's eXIf chunk (PNG 1.5 extension), searched up to IEND."""
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(buf):
        length = struct.unpack_from(">I", buf, pos)[0]
        kind = bytes(buf[pos + 4:pos + 8])
        if kind == b"eXIf":
            return buf[pos + 8:pos + 8 + length]
        if kind == b"IEND":
            return None
        pos += 12 + length
    return None


def _webp_exif(buf: memoryview) -> memoryview | None:
    """The payload of a WebP's EXIF chunk (RIFF), less the EXIF header some writers put first."""
    pos = 12
    while pos + 8 <= len(buf):
        kind = bytes(buf[pos:pos + 4])
        length = struct.unpack_from("<I", buf, pos + 4)[0]
        if kind == b"EXIF":
            payload = buf[pos + 8:pos + 8 + length]
            return payload[6:] if bytes(payload[:6]) == _EXIF_PREFIX else payload
        pos += 8 + length + (length & 1)  # chunks are padded to an even size
    return None


def exif_orientation(data: bytes | memoryview | np.ndarray) -> int:
    """The EXIF orientation (1-8, 1 = upright) of an encoded JPEG, PNG or WebP image; 1 when
    it has none, the metadata is unreadable (the pixels are still usable) or the format is
    another (OpenCV already turns TIFFs upright)."""
    buf = memoryview(data).cast("B") if not isinstance(data, np.ndarray) \
        else memoryview(np.ascontiguousarray(data, dtype=np.uint8).reshape(-1))
    try:
        if len(buf) >= 4 and buf[0] == 0xFF and buf[1] == _JPEG_SOI:
            payload = _jpeg_exif(buf)
        elif bytes(buf[:8]) == _PNG_SIGNATURE:
            payload = _png_exif(buf)
        elif bytes(buf[:4]) == b"RIFF" and bytes(buf[8:12]) == b"WEBP":
            payload = _webp_exif(buf)
        else:  # TIFF too: OpenCV's TIFF decoder turns it upright itself
            payload = None
        return ORIENTATION_UPRIGHT if payload is None else _tiff_orientation(payload)
    except struct.error:  # a truncated or corrupt header
        return ORIENTATION_UPRIGHT


def jpeg_shape(data: bytes | memoryview | np.ndarray) -> tuple[int, int] | None:
    """The (height, width) :func:`decode_image` gives a JPEG (upright as its EXIF orientation
    says), read from its header without decoding; None for another format or a JPEG whose
    header has no readable frame size."""
    buf = memoryview(data).cast("B") if not isinstance(data, np.ndarray) \
        else memoryview(np.ascontiguousarray(data, dtype=np.uint8).reshape(-1))
    if len(buf) < 4 or buf[0] != 0xFF or buf[1] != _JPEG_SOI:
        return None
    for marker, payload in _jpeg_segments(buf):
        if marker in _JPEG_SOF and len(payload) >= 5:
            height, width = struct.unpack_from(">HH", payload, 1)  # after the sample precision
            if height == 0 or width == 0:
                return None  # height 0: given later in a DNL segment (rare)
            sideways = exif_orientation(buf) >= 5  # orientations 5-8 swap the axes
            return (width, height) if sideways else (height, width)
    return None


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels upright as EXIF ``orientation`` (1-8) says: what a photo viewer
    (and PIL's ImageOps.exif_transpose) shows. Any number of channels and any dtype."""
    if orientation == 2:
        return cv2.flip(image, 1)  # mirrored left-right
    if orientation == 3:
        return cv2.rotate(image, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(image, 0)  # mirrored top-bottom
    if orientation == 5:
        return np.ascontiguousarray(image.swapaxes(0, 1))  # transposed
    if orientation == 6:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:  # transversed: transposed about the anti-diagonal
        return np.ascontiguousarray(image.swapaxes(0, 1)[::-1, ::-1])
    if orientation == 8:
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return image


def _to_rgb(decoded: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """OpenCV's decoded array (gray, BGR or BGRA; 8 or 16 bit) to RGB uint8 HxWx3, written
    into ``out`` when that is a uint8 array of the result's shape (a hot path's buffer)."""
    if out is not None and decoded.dtype == np.uint8 and decoded.shape == out.shape:
        rgb = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB, dst=out)
        if rgb is not out:
            out[...] = rgb
        return out
    if decoded.dtype == np.uint16:
        decoded = (decoded >> 8).astype(np.uint8)
    if decoded.ndim == 2:
        return cv2.cvtColor(decoded, cv2.COLOR_GRAY2RGB)
    if decoded.shape[2] == 4:
        return cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def decode_image(data: bytes | np.ndarray, source: str = "<buffer>",
                 out: np.ndarray | None = None, reduce: int = 1) -> np.ndarray:
    """Encoded bytes (JPEG, PNG, ...) to RGB uint8 HxWx3, upright as the EXIF orientation
    says (:func:`exif_orientation`); ImageReadError naming ``source``.
    With ``out`` (uint8 HxWx3), a colour image of exactly that (upright) shape is decoded
    into it and ``out`` is returned; anything else comes back as a new array.
    ``reduce`` 2, 4 or 8 (JPEGs only, see JPEG_REDUCTIONS): decoded at that fraction of the
    size, each side ceil(side / reduce) (of :func:`jpeg_shape`'s); pixel u covers the
    full-size pixels [u * reduce, (u + 1) * reduce) of the stored image."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) \
        else np.asarray(data, dtype=np.uint8).reshape(-1)
    if buf.size == 0:
        raise ImageReadError(f"{source}: empty image data")
    if reduce == 1:
        flags = cv2.IMREAD_UNCHANGED
    elif reduce not in JPEG_REDUCTIONS:
        raise ValueError(f"reduce must be 1, 2, 4 or 8, got {reduce}")
    elif buf.size < 2 or buf[0] != 0xFF or buf[1] != _JPEG_SOI:
        raise ValueError(f"{source}: reduce={reduce} needs a JPEG (DCT scaling)")
    else:  # OpenCV would apply the EXIF orientation itself here: ours below is the one rule
        flags = JPEG_REDUCTIONS[reduce] | cv2.IMREAD_IGNORE_ORIENTATION
    decoded = cv2.imdecode(buf, flags)
    if decoded is None:
        raise ImageReadError(f"{source}: not a decodable image ({buf.size} bytes)")
    # IMREAD_UNCHANGED keeps alpha and 16 bits but ignores EXIF; IMREAD_COLOR would apply the
    # orientation but only for some formats: the tag is read here instead.
    orientation = exif_orientation(buf)
    if orientation != ORIENTATION_UPRIGHT:
        decoded = apply_orientation(decoded, orientation)
    return _to_rgb(decoded, out)


def read_image_bytes(path: str | Path) -> bytes:
    """The encoded bytes of an image file; ImageReadError naming it when it cannot be read."""
    path = Path(path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read file ({e.strerror or e})") from None


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 HxWx3 (the repo's colour contract)."""
    path = Path(path)
    return decode_image(read_image_bytes(path), source=str(path))


def encode_image(image: np.ndarray, ext: str = ".jpg", quality: int = 95) -> bytes:
    """RGB uint8 HxWx3 to encoded bytes in the format named by ``ext``."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected RGB uint8 HxWx3, got {image.dtype} {image.shape}")
    ext = ext if ext.startswith(".") else "." + ext
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"cannot encode image as {ext}")
    return buf.tobytes()


def write_image(path: str | Path, image: np.ndarray, quality: int = 95) -> None:
    """Write RGB uint8 HxWx3 to ``path`` (format from its suffix), atomically."""
    atomic_write_bytes(path, encode_image(image, Path(path).suffix or ".jpg", quality))


def iter_images(root: str | Path) -> Iterator[Path]:
    """Image files under ``root`` (recursive), by extension, lazily and in walk order."""
    return (p for p in Path(root).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive), sorted, by extension."""
    return sorted(iter_images(root))
