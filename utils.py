"""Helpers every script needs: logging, seeding, device choice, atomic checkpoints, images.

Colour contract: every in-memory image in this repo is RGB, uint8, HxWx3. OpenCV's BGR
order never leaves :func:`decode_image` / :func:`encode_image`.

torch is imported inside the functions that use it: every module imports this one, and the
scripts and actions that never touch a tensor (extract, pre_process, most scripts' --help)
start ~2 s sooner without it.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import fcntl
import glob
import hashlib
import logging
import math
import os
import pickle
import random
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:  # OpenCV's thread pool must not start before a DataLoader forks its workers
    import cv2

    cv2.setNumThreads(1)
except ImportError:  # pragma: no cover - opencv is in requirements.txt
    cv2 = None

FACE_CROP_SIZE = 112  # side of the aligned face crops (ArcFace's 112x112 template) everywhere
PIXEL_CENTRE = 127.5  # model input is (x - 127.5) / 127.5: uint8 pixels mapped to [-1, 1]
CONFIG_FILE = "config.json"  # a run's config, written by train.py beside its checkpoints
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


class DatasetError(ToolkitError, ValueError):
    """A training set that cannot be used as it is; the message names the file or folder."""


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


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (and <= ``high`` when given); argparse's
    refusal names the flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            rule = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)  # counts and sizes: a batch, a rank, a dimension, workers


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (a tolerance, a scale)."""
    value = _finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1] (a rate such as a false accept rate)."""
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def describe_error(e: BaseException) -> str:
    """One line for the user: OSErrors as ``path: reason`` (disk full said plainly)."""
    if isinstance(e, OSError) and not isinstance(e, ToolkitError):
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
    # a file name that is not UTF-8 (its bytes kept as surrogates) is printed as its bytes,
    # as ls prints it, instead of ending the run in a UnicodeEncodeError (stderr already
    # writes them as \udcNN)
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
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
    import torch  # torch on first use: see module docstring

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


DEVICE_NAMES = "auto, cpu, cuda or cuda:N"  # every --device value this toolkit runs on
# torch knows more devices (mps, xla, meta, ...); the toolkit is written and tested for these
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def unsupported_device(name: str) -> str | None:
    """Why ``name`` is not a device this toolkit runs on, or None. The spelling only: a
    config file may name a device of the machine it was written on."""
    if _DEVICE_NAME.fullmatch(name):
        return None
    return f"not a device this toolkit runs on; use {DEVICE_NAMES}"


def _device_problem(name: str) -> str | None:
    """Why ``--device name`` cannot be used on this machine, or None. Behind
    :func:`get_device`, which every script with a --device calls right after parsing its
    flags (config.parse_config does for the scripts built on it)."""
    problem = unsupported_device(name)
    if problem or name in ("auto", "cpu"):
        return problem
    import torch  # torch on first use: see module docstring

    if not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    index = torch.device(name).index
    if index is not None and index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def device_name(text: str) -> str:
    """An argparse type for a ``--device`` that :func:`get_device` would refuse later (the
    bench scripts, which parse no Config): argparse's refusal names the flag."""
    problem = _device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def get_device(name: str = "auto") -> "torch.device":  # noqa: F821 - lazy torch import
    """``auto`` picks CUDA when present, else the CPU; ``cpu``, ``cuda`` or ``cuda:N`` when
    this machine has it; anything else is a DeviceError naming what is accepted."""
    import torch  # torch on first use: see module docstring

    problem = _device_problem(name)
    if problem:
        raise DeviceError(f"--device {name}: {problem}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
TEMP_RANDOM_CHARS = 8  # the random part tempfile.mkstemp / mkdtemp put in a name
DEFAULT_NAME_MAX = 255  # bytes in one file name (NAME_MAX) where pathconf cannot say
SHORT_NAME_HASH_CHARS = 12  # hex digits of sha1 that tell shortened long names apart


def name_max(folder: str | Path) -> int:
    """The longest file name (bytes) that ``folder``'s filesystem accepts."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such folder yet, or no pathconf
        return DEFAULT_NAME_MAX
    # -1: no limit (POSIX); 0: a FUSE filesystem's statfs that leaves f_namelen unset
    return limit if limit > 0 else DEFAULT_NAME_MAX


def fit_name(name: str, room: int) -> str:
    """``name`` when its bytes fit in ``room``, else its start cut to fit and told apart
    from other long names by a hash of the whole: ``<start>~<hash>``."""
    raw = os.fsencode(name)
    if len(raw) <= room:
        return name
    tail = os.fsencode(f"~{hashlib.sha1(raw).hexdigest()[:SHORT_NAME_HASH_CHARS]}")
    # a cut inside a multi-byte character leaves bytes that os.fsdecode keeps as they are
    return os.fsdecode(raw[:room - len(tail)] + tail)


def temp_prefix(path: str | Path, suffix: str = TEMP_SUFFIX) -> str:
    """``.<name>.``: how the temporaries of ``path`` begin. A name so long that a temporary
    would pass the filesystem's name limit (a 246-character photo name) is cut to fit and
    told apart from other long names by a hash of the whole name: ``.<start>~<hash>.``."""
    path = Path(path)
    room = name_max(path.parent) - TEMP_RANDOM_CHARS - len(os.fsencode(suffix))
    return f".{fit_name(path.name, room - len('..'))}."


def _new_temp(path: Path) -> tuple[int, str]:
    """A new temporary ``<temp_prefix><random>.tmp`` beside ``path`` (what
    :func:`remove_stale_temporaries` finds) with the umask's mode: its open descriptor and
    its path."""
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
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


def remove_stale_temporaries(folder: str | Path, name: str, suffix: str = TEMP_SUFFIX,
                             name_is_pattern: bool = False) -> list[Path]:
    """Delete temporaries that a killed writer left for the file ``name`` in ``folder``
    (``<temp_prefix>*<suffix>``: files, or staging folders with their contents). Call it only
    where no other writer of that file can be running. ``name`` is taken as it is spelled
    (``model[v2].onnx``'s brackets are no glob class) unless ``name_is_pattern`` (a glob of
    several files: train_checkpoints' head files)."""
    removed = []
    prefix = temp_prefix(Path(folder) / name, suffix)
    pattern = f"{prefix if name_is_pattern else glob.escape(prefix)}*{glob.escape(suffix)}"
    for p in Path(folder).glob(pattern):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


CACHE_DIR_NAME = "arcface-toolkit"  # our folder in the user cache dir (XDG's ~/.cache)
CACHE_NAME_CHARS = 64  # of an input folder's name kept in its cache's (the hash tells apart)


def user_cache_dir() -> Path:
    """Where caches of read-only inputs go: ``$XDG_CACHE_HOME/arcface-toolkit``, by default
    ``~/.cache/arcface-toolkit``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / CACHE_DIR_NAME


def can_write_in(folder: str | Path) -> bool:
    """Whether files can be made in ``folder``, or, where it does not exist yet, in the
    nearest folder above it (which would make it). Asks the OS (access(2)): a read-only mount
    or a folder without write permission says no."""
    folder = Path(folder).absolute()
    for existing in (folder, *folder.parents):
        if existing.exists():
            return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)
    return False


def cache_folder(preferred: str | Path) -> Path:
    """``preferred`` (a cache or index folder beside an input) when it can be written, else
    a folder of :func:`user_cache_dir` named by a hash of ``preferred``'s absolute path, so
    a read-only input still gets its cache, found again on the next run."""
    preferred = Path(preferred)
    if can_write_in(preferred):
        return preferred
    key = hashlib.sha1(os.fsencode(preferred.absolute())).hexdigest()[:SHORT_NAME_HASH_CHARS]
    return user_cache_dir() / f"{preferred.name[:CACHE_NAME_CHARS]}-{key}"


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
    import torch  # torch on first use: see module docstring

    _atomic_write(path, lambda f: torch.save(dict(state), f))


# ----------------------------------------------------------------------------- claimed outputs
# One rule for every script that writes: an output may not be one of its inputs (symlinks
# followed), lie inside an input tree, or replace an existing file of another kind; and one
# process at a time writes it (an flock the OS drops when the process dies).

LOCK_SUFFIX = ".lock"  # ".<output name>.lock" beside the output holds the writer's pid


class OutputConflictError(ToolkitError, ValueError):
    """An output that would destroy an input or a file of another kind; names both."""


class OutputBusyError(ToolkitError, RuntimeError):
    """An output another process is writing now; names it and that process's pid."""


class OutputUnwritableError(ToolkitError, OSError):
    """An output whose folder cannot be written (read-only, no permission): found when its
    lock is taken, before any work."""


@dataclass(frozen=True)
class OutputKind:
    """What an output holds, to tell it from an existing file it must not replace:
    ``matches(path)`` says whether the existing ``path`` already holds this kind."""

    name: str
    matches: Callable[[Path], bool]


def starts_with(*signatures: bytes) -> Callable[[Path], bool]:
    """A sniffer: an empty file, or one whose first bytes are one of ``signatures``."""
    def matches(path: Path) -> bool:
        if not path.is_file():
            return False
        with path.open("rb") as f:
            head = f.read(max(map(len, signatures)))
        return not head or any(head.startswith(s) for s in signatures)
    return matches


FOLDER = OutputKind("a folder", Path.is_dir)


def _as_paths(value: Any) -> list[Path]:
    if value is None or value == "":
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value if v is not None and v != ""]


def check_output(output: str | Path, flag: str, inputs: Mapping[str, Any] | None = None,
                 kind: OutputKind | None = None) -> None:
    """Refuse (OutputConflictError, one line naming both paths) an ``output`` that resolves,
    symlinks followed, to an input file or lies inside an input folder (``inputs``: flag
    -> a path, paths or None), or that exists and is not ``kind`` (:class:`OutputKind`).
    Reads only; inputs that do not exist are the readers' business."""
    out = Path(output)
    target = out.resolve()
    existing = [(name, path) for name, value in (inputs or {}).items()
                for path in _as_paths(value) if path.exists()]
    for name, path in existing:  # the same file first: the more telling of the two
        if target == path.resolve() or (out.exists() and os.path.samefile(out, path)):
            raise OutputConflictError(f"{flag} {out}: is {name} {path}, an input of this "
                                      "command; refusing to write over it")
    for name, path in existing:
        if path.is_dir() and target.is_relative_to(path.resolve()):
            raise OutputConflictError(f"{flag} {out}: lies inside {name} {path}, an input "
                                      "folder this command reads; write it somewhere else")
    if kind is not None and (out.exists() or out.is_symlink()) and not kind.matches(out):
        raise OutputConflictError(f"{flag} {out}: exists and is not {kind.name}; refusing "
                                  "to replace it (move it away or choose another path)")


def lock_path_for(output: str | Path) -> Path:
    """The lock file of ``output`` (resolved, so every name of it shares one lock):
    ``.<name>.lock`` beside it, the name shortened with a hash when too long for one."""
    target = Path(output).resolve()
    room = name_max(target.parent) - len(os.fsencode(f".{LOCK_SUFFIX}"))
    return target.parent / f".{fit_name(target.name, room)}{LOCK_SUFFIX}"


@dataclass
class _Held:
    """A lock this process holds: its descriptor, how many claims share it, and the folders
    made for it (removed again when empty, so a refused command leaves no trace)."""

    fd: int
    made: list[Path]
    depth: int = 1


# lock file -> what holds it: a process that holds a claim may claim it again (demo.py claims
# the run folder that train.train then claims): flock would refuse its own second open file
# description
_HELD: dict[Path, _Held] = {}


def _lock(lock: Path, output: Path, flag: str) -> _Held:
    """Take the exclusive flock on ``lock`` without waiting (its folders made as needed);
    an OutputBusyError naming the holder's pid when another process holds it."""
    made = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return _Held(_lock_file(lock, output, flag), made)
    except BaseException as e:
        _remove_empty(made)
        if isinstance(e, OSError) and not isinstance(e, ToolkitError):
            raise OutputUnwritableError(f"{flag} {output}: cannot write in {lock.parent} "
                                        f"({describe_error(e)})") from None
        raise


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:  # something else was written there since: keep it
            return


def _lock_file(lock: Path, output: Path, flag: str) -> int:
    """The descriptor holding the flock on ``lock``, with our pid written in it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, new_file_mode())
        try:
            if _locked_here(fd, lock, output, flag):
                return fd
        except BaseException:  # a failed pid write (disk full), Ctrl-C: the flock goes too
            os.close(fd)
            raise
        os.close(fd)


def _locked_here(fd: int, lock: Path, output: Path, flag: str) -> bool:
    """Take the flock on ``fd`` (open on ``lock``) and write our pid: True, or False when a
    releasing holder unlinked the file meanwhile (retry with a fresh one); OutputBusyError
    when another process holds it. The caller closes ``fd`` unless True."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        raise OutputBusyError(f"{flag} {output}: another process (pid {holder}) is "
                              f"writing it now (lock {lock}); wait for it to end or "
                              "write elsewhere") from None
    try:  # a releasing holder unlinks the file: ours must still be the one at `lock`
        same = os.path.samestat(os.fstat(fd), os.stat(lock))
    except FileNotFoundError:
        same = False
    if same:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return same


@contextmanager
def claim_output(output: str | Path, flag: str, inputs: Mapping[str, Any] | None = None,
                 kind: OutputKind | None = None, lock: bool = True) -> Iterator[Path]:
    """The one rule for a script's output, called before any work: :func:`check_output`,
    then (``lock``) an exclusive lock held until the block ends, so a second writer of the
    same output (any path naming it) is refused with the holder's pid instead of mixing
    files with it. The OS drops the lock when the process dies: a crash leaves no stale
    lock. Yields ``output`` as a Path."""
    output = Path(output)
    check_output(output, flag, inputs, kind)
    if not lock:
        yield output
        return
    path = lock_path_for(output)
    held = _HELD.get(path)
    if held is not None:
        held.depth += 1
    else:
        _HELD[path] = held = _lock(path, output, flag)
    try:
        yield output
    finally:
        held.depth -= 1
        if held.depth == 0:
            del _HELD[path]
            try:  # unlinked while still locked: the next writer creates a fresh one
                path.unlink(missing_ok=True)
            finally:
                os.close(held.fd)
                _remove_empty(held.made)


class CheckpointError(ToolkitError, RuntimeError):
    """A checkpoint that cannot be loaded: missing, truncated, corrupt, or not trusted
    because it holds pickled Python objects. The message is one line naming the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at the checkpoint path (still a FileNotFoundError for existing callers)."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint holding arbitrary Python objects, which unpickling could run as code."""


class NonFiniteCheckpointError(CheckpointError, ValueError):
    """A checkpoint holding a NaN or infinite value in a floating-point tensor: a diverged or
    damaged model, which would score nonsense (NaN compares false, so ranks come out
    arbitrary, even perfect)."""


_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # names the refused class in torch's message
_CORRUPT_PICKLE = "Unsupported operand"  # torch's safe unpickler on a byte it cannot parse


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint saved by :func:`save_checkpoint`; never unpickles arbitrary objects.

    Raises CheckpointNotFoundError (a FileNotFoundError), UntrustedCheckpointError for a file
    holding pickled Python objects, CheckpointError for an empty, truncated or corrupt one,
    NonFiniteCheckpointError for one holding NaN or inf in any tensor (weights, optimiser
    state), so no script loads, scores, exports or resumes a diverged model."""
    import torch  # torch on first use: see module docstring

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
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
    check_finite_state(state, path)
    return state


def _float_tensors(state: Any, name: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, tensor) of every floating-point tensor nested in dicts, lists, tuples."""
    import torch  # torch on first use: see module docstring

    if isinstance(state, torch.Tensor):
        if state.is_floating_point() or state.is_complex():
            yield name, state
    elif isinstance(state, Mapping):
        for key, value in state.items():
            yield from _float_tensors(value, f"{name}.{key}" if name else str(key))
    elif isinstance(state, list | tuple):
        for i, value in enumerate(state):
            yield from _float_tensors(value, f"{name}.{i}" if name else str(i))


def check_finite_state(state: Any, path: str | Path) -> None:
    """NonFiniteCheckpointError naming ``path``, the first tensor holding NaN or inf (with
    how many of its values) and how many other tensors do; every loader of weights goes
    through :func:`load_checkpoint`, which calls this."""
    import torch  # torch on first use: see module docstring

    bad = [(name, t) for name, t in _float_tensors(state) if not bool(torch.isfinite(t).all())]
    if not bad:
        return
    name, tensor = bad[0]
    count = int((~torch.isfinite(tensor)).sum())
    more = f"; {len(bad) - 1} more tensor(s) too" if len(bad) > 1 else ""
    raise NonFiniteCheckpointError(
        f"{path}: not finite: tensor {name!r} holds {count} NaN/inf "
        f"value{'s' if count != 1 else ''} of its {tensor.numel()}{more} (a diverged or "
        "damaged model); refusing to use it")


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


_UINT16_TO_UINT8 = 257  # 65535 / 255: 16-bit white maps to 8-bit white, in equal steps
FLOAT_WHITE = 1.0  # float samples span [0, FLOAT_WHITE] (TIFF's float convention, OpenCV's)
_UINT8_MAX = 255


def _to_uint8(decoded: np.ndarray, source: str) -> np.ndarray:
    """Samples of any depth OpenCV decodes to uint8 (nearest value): 16-bit ones divided by
    257; floating-point ones scaled from [0, 1] (values outside are clipped to it), refused
    when one is NaN or infinite; signed integer samples (no agreed black and white) refused."""
    if decoded.dtype == np.uint8:
        return decoded
    if decoded.dtype == np.uint16:  # round(v / 257) in integers: v / 257 is never a tie
        return ((decoded.astype(np.uint32) + _UINT16_TO_UINT8 // 2)
                // _UINT16_TO_UINT8).astype(np.uint8)
    if decoded.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(decoded)))
        if bad:
            raise ImageReadError(f"{source}: {bad} floating-point samples are NaN or infinite")
        scaled = np.clip(decoded, 0.0, FLOAT_WHITE) * (_UINT8_MAX / FLOAT_WHITE)
        return np.rint(scaled).astype(np.uint8)
    raise ImageReadError(f"{source}: {decoded.dtype} samples are not supported (8- or 16-bit "
                         "unsigned integers, or floating point in [0, 1])")


def _to_rgb(decoded: np.ndarray, out: np.ndarray | None = None,
            source: str = "<buffer>") -> np.ndarray:
    """OpenCV's decoded array (gray, BGR or BGRA; any depth, see :func:`_to_uint8`) to RGB
    uint8 HxWx3, written into ``out`` when that is a uint8 array of the result's shape (a hot
    path's buffer)."""
    decoded = _to_uint8(decoded, source)
    if out is not None and decoded.shape == out.shape:
        rgb = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB, dst=out)
        if rgb is not out:
            out[...] = rgb
        return out
    if decoded.ndim == 2:
        return cv2.cvtColor(decoded, cv2.COLOR_GRAY2RGB)
    if decoded.shape[2] == 4:
        return cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def decode_image(data: bytes | np.ndarray, source: str = "<buffer>",
                 out: np.ndarray | None = None, reduce: int = 1) -> np.ndarray:
    """Encoded bytes (JPEG, PNG, TIFF, ...) to RGB uint8 HxWx3, upright as the EXIF
    orientation says (:func:`exif_orientation`); ImageReadError naming ``source``. 16-bit
    and floating-point samples become 8-bit as :func:`_to_uint8` says (float: [0, 1]).
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
    return _to_rgb(decoded, out, source)


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
    """Image files under ``root`` (recursive), by extension, lazily and in walk order.

    Symlinked folders are followed, at any depth (a set is often built from links to
    identity folders kept elsewhere): ``pre_process --pack``, alignment and MegaFace's crop
    all see the same files. A link back to a folder above it (a loop) is skipped with a
    warning; a folder that cannot be listed is skipped with a warning naming it."""
    root = Path(root)
    try:
        st = root.stat()
    except OSError:
        return iter(())
    return _walk_images(root, frozenset({(st.st_dev, st.st_ino)}))


def _walk_images(folder: Path, ancestors: frozenset[tuple[int, int]]) -> Iterator[Path]:
    """:func:`iter_images` below ``folder``, whose real folders and those above it (device,
    inode) are ``ancestors``."""
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as e:
        get_logger("face.utils").warning("%s: cannot list this folder (%s); its images are "
                                         "left out", folder, e.strerror or e)
        return
    for entry in entries:
        try:
            if entry.is_dir():  # follows a link
                st = entry.stat()
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    get_logger("face.utils").warning(
                        "%s: a link to a folder above it (a loop); not followed", entry.path)
                    continue
                yield from _walk_images(Path(entry.path), ancestors | {key})
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in \
                    IMAGE_EXTENSIONS:
                yield Path(entry.path)
        except OSError:  # vanished while walking, or a dangling link: not an image
            continue


def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive), sorted, by extension."""
    return sorted(iter_images(root))
