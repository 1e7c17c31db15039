"""Unpack the archives a researcher downloads into ``data/``, safely and only once.

    python extract.py faces_emore.zip lfw.tgz pairs.txt [--dest data]

Where each archive goes (DEST is ``data`` unless ``--dest``):

* MegaFace and FaceScrub archives (name contains "megaface" or "facescrub") go under
  DEST/megaface; everything else (faces_emore / MS1M zips, lfw.tgz, lfw-funneled.tgz, ...)
  under DEST itself.
* Members keep their stored paths, and the usual archives hold one top-level folder:
  faces_emore.zip -> data/faces_emore/, lfw.tgz -> data/lfw/, lfw-funneled.tgz ->
  data/lfw_funneled/. A zip whose members are not all inside one folder gets a folder named
  after the archive (data/<name without extension>/), so nothing spills into DEST; tar
  archives are unpacked as they are (knowing their layout would take an extra pass).
* ``pairs.txt`` given on the command line is copied to DEST/lfw/pairs.txt (the config's
  default); a ``pairs.txt`` lying beside an LFW archive is copied into its extracted folder.

Idempotent: after a complete extraction a marker ``.extracted-<archive name>.json`` is written
in the destination (archive size and mtime, member count, top-level entries); a second run
with the same archive and its top-level entries still present does nothing. An interrupted
run leaves no marker, so the next run extracts again (overwriting).

Safety: a member with an absolute path, a ``..`` component, a link pointing outside the
destination, a path that resolves outside it through a symbolic link (one from the archive
or one already in the destination), or a device/FIFO entry is refused with an error naming
the archive and the member. Symbolic links inside zip archives are refused outright (a chain
of harmless-looking links can redirect later members anywhere); tar archives get tarfile's
``data`` filter, the same checks on resolved paths, and a final pass that removes any link a
later member made point outside. Zip archives are checked completely before anything is
written; tar archives are streamed (one pass over a possibly huge .tar.gz), so members
before a refused one have already been written, all inside the destination.

Damage: each file member is written to a temporary beside its final name, checked (a zip
member's CRC, every member's size against its header) and only then renamed over the final
name, so a damaged re-download, a full disk or an interrupted run leaves the file that was
there before (or none), never a truncated one; the error names the archive and the member.
A tar's links are made the same way (under a temporary name, renamed): a hard link must name
a file member before it (a copy where the filesystem has no hard links).
A killed run's hidden ``.<name>.<random>.tmp`` is deleted when the next run writes that
member (one extract writes a destination at a time: the CLI holds --dest's lock).
A .tar.gz is read to its end for its gzip CRC, the one check of bytes that decompress
without complaint; that check comes at the end of the stream, so files renamed before it
may hold the damage (the error says so, and no marker is written). Encrypted zip members
and compression methods Python cannot decompress (Deflate64, ...) are refused, naming the
member, before anything is written.

Size: an archive whose contents would exceed MAX_COMPRESSION_RATIO times its own size (past
the first RATIO_FREE_BYTES) or MAX_EXTRACTED_BYTES in all is refused as a likely zip bomb:
for a zip from its declared sizes before anything is written, and for every archive again
from the bytes actually written (headers can lie). ``--allow-large`` lifts the limits.
"""

from __future__ import annotations

import argparse
import errno
import filecmp
import gzip
import io
import json
import lzma
import os
import re
import secrets
import stat
import sys
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from tqdm import tqdm

from utils import (
    TEMP_SUFFIX,
    ToolkitError,
    add_debug_flag,
    atomic_write_bytes,
    atomic_write_text,
    claim_output,
    current_umask,
    get_logger,
    name_max,
    run_cli,
)

DEFAULT_DATA_ROOT = Path("data")
MEGAFACE_SUBDIR = "megaface"
MEGAFACE_KEYWORDS = ("megaface", "facescrub")
LFW_KEYWORD = "lfw"
PAIRS_NAME = "pairs.txt"
LFW_PAIRS_SUBDIR = "lfw"  # config.pairs defaults to data/lfw/pairs.txt
MARKER_PREFIX = ".extracted-"
MARKER_KEYS = frozenset({"archive", "files", "bytes", "top_level"})  # what a skip reads
ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip")
COPY_CHUNK = 1 << 20  # read-buffer size over an archive file
MEMBER_CHUNK = 1 << 16  # bytes per read of a member: 1 MiB reads from a tar stream took 2x as long
GZIP_MAGIC = b"\x1f\x8b"  # how every gzip stream begins (RFC 1952)
# Zip general-purpose flag bits (APPNOTE 4.4.4) that Python's zipfile cannot unpack: bit 0,
# encrypted (strong encryption, bit 6, sets it too), and bit 5, compressed patched data.
ZIP_FLAG_ENCRYPTED = 0x1
ZIP_FLAG_PATCHED = 0x20
# The compression methods this Python's zipfile decompresses (Zstandard from Python 3.14)
ZIP_METHODS_SUPPORTED = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
    | {getattr(zipfile, n) for n in ("ZIP_ZSTANDARD",) if hasattr(zipfile, n)})
# Names of methods zippers write that zipfile cannot read, for the error (APPNOTE 4.4.5)
ZIP_METHOD_NAMES = {1: "Shrink", 6: "Implode", 9: "Deflate64", 93: "Zstandard", 95: "xz",
                    98: "PPMd", 99: "WinZip AES encryption"}
# Member temporaries: ".<name>.<random hex>.tmp" beside the final file, the name cut short to
# the filesystem's limit (utils.name_max)
TEMP_TOKEN_BYTES = 4  # 8 hex digits: a clash with a live temporary is 1 in 4 billion
TEMP_ATTEMPTS = 16  # fresh names tried before giving up (each clash retried)
NEW_FILE_PERMISSIONS = 0o666  # what open(path, "w") asks for; the umask takes its share
# a hard link member whose link(2) fails so is copied instead: no hard links on this
# filesystem (FAT, some FUSE), too many links to one file, a mount point between the two
LINK_FAILURES_COPIED = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV})
# Zip-bomb guard. Face data (JPEG crops, .rec records) barely compresses (ratio ~1); text
# lists compress ~10x; a run of zeros ~1000x. Below RATIO_FREE_BYTES of output the ratio is
# not checked (small archives of text), and nothing may expand past MAX_EXTRACTED_BYTES,
# several times the largest face dataset (MegaFace + FaceScrub, a few hundred GB).
MAX_COMPRESSION_RATIO = 100
RATIO_FREE_BYTES = 10 * 2**20
MAX_EXTRACTED_BYTES = 2 * 2**40
ALLOW_LARGE_FLAG = "--allow-large"

log = get_logger("extract")


class UnsafeArchiveError(ToolkitError, ValueError):
    """An archive member that would land outside the destination (or is a device file)."""


class ArchiveError(ToolkitError, ValueError):
    """An archive that cannot be read (unknown format, corrupt, truncated)."""


class ArchiveTooLargeError(ToolkitError, ValueError):
    """An archive that would expand past the size limits (a likely zip bomb)."""


class DestinationError(ToolkitError, NotADirectoryError):
    """A destination that is (or lies under) a file instead of a folder."""


class MemberWriteError(ToolkitError, OSError):
    """A member that could not be written (disk full, no permission, a folder in the way)."""


@dataclass(frozen=True)
class SizeLimits:
    """How much an archive may expand: at most ``max_ratio`` times its own size (the first
    ``ratio_free_bytes`` free) and never more than ``max_bytes``."""

    max_ratio: float = MAX_COMPRESSION_RATIO
    ratio_free_bytes: int = RATIO_FREE_BYTES
    max_bytes: int = MAX_EXTRACTED_BYTES

    def allowed(self, archive_size: int) -> int:
        """The most bytes an archive of ``archive_size`` bytes may extract to."""
        by_ratio = max(self.ratio_free_bytes, int(self.max_ratio * archive_size))
        return min(self.max_bytes, by_ratio)


def _too_large(archive: Path, what: str, size: int, allowed: int) -> ArchiveTooLargeError:
    return ArchiveTooLargeError(
        f"{archive}: refusing to extract: {what} would be {size:,} bytes from a "
        f"{archive.stat().st_size:,}-byte archive, past the limit of {allowed:,} bytes "
        f"(a zip bomb?); if you trust this archive, pass {ALLOW_LARGE_FLAG}")


class _Budget:
    """Counts the bytes actually written against the size limit (None: unlimited); holds
    the extraction's record of temporaries killed runs left (``stale``)."""

    def __init__(self, archive: Path, limits: SizeLimits | None) -> None:
        self.archive = archive
        self.allowed = None if limits is None else limits.allowed(archive.stat().st_size)
        self.used = 0
        self.stale = _StaleTemps()

    def take(self, n: int, member: str) -> None:
        self.used += n
        if self.allowed is not None and self.used > self.allowed:
            raise _too_large(self.archive, f"the output up to member {member!r}", self.used,
                             self.allowed)


# ----------------------------------------------------------------------------- naming

def archive_stem(archive: str | Path) -> str:
    """The archive's name without its archive extension (``lfw.tgz`` -> ``lfw``)."""
    name = Path(archive).name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def default_destination(archive: str | Path, data_root: str | Path = DEFAULT_DATA_ROOT) -> Path:
    """DEST/megaface for MegaFace and FaceScrub archives, DEST otherwise."""
    name = Path(archive).name.lower()
    if any(key in name for key in MEGAFACE_KEYWORDS):
        return Path(data_root) / MEGAFACE_SUBDIR
    return Path(data_root)


# ----------------------------------------------------------------------------- safety

def _is_absolute(clean: str) -> bool:
    """A POSIX-style path (backslashes already turned into slashes) that is absolute on
    POSIX or carries a Windows drive letter."""
    return clean.startswith("/") or (len(clean) > 1 and clean[1] == ":")


def _safe_relative(name: str, archive: Path) -> PurePosixPath:
    """The member path as a relative POSIX path, or UnsafeArchiveError."""
    clean = name.replace("\\", "/")
    path = PurePosixPath(clean)
    if _is_absolute(clean):
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: absolute path")
    if ".." in path.parts:
        raise UnsafeArchiveError(
            f"{archive}: refusing member {name!r}: '..' would leave the destination")
    return path


def _check_link(name: str, target: str, archive: Path, hard: bool) -> None:
    """A link member's target must stay inside the destination."""
    clean = target.replace("\\", "/")
    if _is_absolute(clean):
        raise UnsafeArchiveError(
            f"{archive}: refusing member {name!r}: link to absolute path {target!r}")
    # symlink targets are relative to the link's folder, hard link targets to the root
    base = [] if hard else list(PurePosixPath(name.replace("\\", "/")).parent.parts)
    depth = 0
    for part in base + list(PurePosixPath(clean).parts):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise UnsafeArchiveError(
                    f"{archive}: refusing member {name!r}: link to {target!r} points "
                    "outside the destination")
        elif part not in (".", ""):
            depth += 1


def _is_inside(root_real: str, path: str) -> bool:
    return os.path.commonpath([root_real, path]) == root_real


def _check_resolved(root: str, dest: Path, rel: PurePosixPath, name: str,
                    archive: Path) -> None:
    """The zip member's path with every symbolic link on disk followed (links already in
    the destination: a zip's own are refused) must stay inside the destination (``root``,
    its real path): checking the names as text misses a chain of links. Tar members get the
    same check from tarfile's 'data' filter."""
    resolved = os.path.realpath(os.path.join(root, *rel.parts))
    if not _is_inside(root, resolved):
        raise UnsafeArchiveError(
            f"{archive}: refusing member {name!r}: through a symbolic link it would be "
            f"written to {resolved}, outside the destination {dest}")


def _remove_escaping_links(dest: Path, links: list[tuple[str, Path]]) -> list[str]:
    """Delete the links extracted from a tar that now resolve outside ``dest`` (a link can be
    made to escape by a later one changing a folder on its path); their member names."""
    root = os.path.realpath(dest)
    escaped = []
    for name, path in links:
        if path.is_symlink() and not _is_inside(root, os.path.realpath(path)):
            path.unlink()
            escaped.append(name)
    return escaped


def _check_tar_member(member: tarfile.TarInfo, archive: Path) -> PurePosixPath:
    rel = _safe_relative(member.name, archive)
    if member.issym() or member.islnk():
        _check_link(member.name, member.linkname, archive, hard=member.islnk())
    elif not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(
            f"{archive}: refusing member {member.name!r}: device, FIFO or other special file")
    return rel


def _is_zip_symlink(info: zipfile.ZipInfo) -> bool:
    """Info-ZIP keeps the Unix mode in external_attr's high 16 bits; S_IFLNK is a link."""
    return stat.S_ISLNK(info.external_attr >> 16)


def _check_zip_method(info: zipfile.ZipInfo, archive: Path) -> None:
    """A zip member that zipfile cannot unpack (encrypted, patched, or compressed with a
    method it lacks) is refused before anything is written, not found halfway."""
    if info.flag_bits & ZIP_FLAG_ENCRYPTED:
        raise ArchiveError(
            f"{archive}: member {info.filename!r} is encrypted (password-protected), which "
            "this tool does not unpack; extract the archive with a tool that asks for the "
            "password (7z x, unzip)")
    method = info.compress_type
    if method not in ZIP_METHODS_SUPPORTED or info.flag_bits & ZIP_FLAG_PATCHED:
        what = ("compressed patched data" if info.flag_bits & ZIP_FLAG_PATCHED else
                f"compression method {method} ({ZIP_METHOD_NAMES.get(method, 'unknown')})")
        raise ArchiveError(
            f"{archive}: member {info.filename!r} uses {what}, which Python's zipfile cannot "
            "decompress; extract the archive with another tool (7z x)")


def _declared_size(info: zipfile.ZipInfo) -> int:
    """The uncompressed size a zip member's header claims (not to be trusted alone)."""
    return info.file_size


# ----------------------------------------------------------------------------- progress

class _CountingReader(io.RawIOBase):
    """A file wrapper that advances a tqdm bar by the bytes read (compressed bytes)."""

    def __init__(self, raw, bar) -> None:
        self._raw, self._bar = raw, bar

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._raw.readinto(buffer)
        if n:
            self._bar.update(n)
        return n


# ----------------------------------------------------------------------------- extraction

def _temp_stem(final: Path) -> str:
    """The part of ``final``'s name its temporaries carry: all of it, or as much as the
    filesystem's name limit leaves room for."""
    room = name_max(final.parent) - len(f"..{'0' * 2 * TEMP_TOKEN_BYTES}{TEMP_SUFFIX}")
    stem = final.name
    while len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    return stem


# a member temporary's name (_member_temp): the stem, then the random hex
_MEMBER_TEMP = re.compile(rf"\.(?P<stem>.+)\.[0-9a-f]{{{2 * TEMP_TOKEN_BYTES}}}"
                          + re.escape(TEMP_SUFFIX), re.S)


class _StaleTemps:
    """The member temporaries that killed runs left, found with one listing per folder, and
    deleted when this run writes their member (so only ours, of a member being replaced)."""

    def __init__(self) -> None:
        self._by_folder: dict[Path, dict[str, list[Path]]] = {}

    def remove_for(self, final: Path) -> None:
        folder = final.parent
        if folder not in self._by_folder:
            found: dict[str, list[Path]] = {}
            with os.scandir(folder) as entries:
                for entry in entries:
                    match = _MEMBER_TEMP.fullmatch(entry.name)
                    if match and (entry.is_file(follow_symlinks=False)
                                  or entry.is_symlink()):  # a link member's temporary
                        found.setdefault(match["stem"], []).append(Path(entry.path))
            self._by_folder[folder] = found
        for tmp in self._by_folder[folder].pop(_temp_stem(final), []):
            tmp.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted extraction", tmp)


def _member_temp(final: Path) -> tuple[int, Path]:
    """A new temporary ``.<name>.<random>.tmp`` beside ``final``, opened exclusively for
    writing with a new file's mode (0o666 less the umask): its descriptor and path. The name
    is cut short where a long member name would pass the filesystem's name limit."""
    fd = -1

    def create(tmp: Path) -> None:
        nonlocal fd
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_PERMISSIONS)
    tmp = _new_member_temp(final, create)
    return fd, tmp


def _new_member_temp(final: Path, create: Callable[[Path], None]) -> Path:
    """The first fresh temporary name beside ``final`` that ``create(name)`` makes without a
    FileExistsError (an exclusive open, a hard link)."""
    stem = _temp_stem(final)
    for _ in range(TEMP_ATTEMPTS):
        tmp = final.parent / f".{stem}.{secrets.token_hex(TEMP_TOKEN_BYTES)}{TEMP_SUFFIX}"
        try:
            create(tmp)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{final.parent}: no free temporary name for {final.name}")


# what reading a member raises when the archive is damaged (bad CRC, truncated, corrupt
# compressed data; BadGzipFile is an OSError) or the disk under it fails
_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
                OSError)


def _kept(final: Path) -> str:
    return f"{final} left as it was" if os.path.lexists(final) else f"no {final} written"


def _write_member(archive: Path, name: str, final: Path, src: IO[bytes], budget: _Budget,
                  size: int, bar: Any = None, mode: int | None = None,
                  mtime: float | None = None) -> None:
    """Copy member ``name`` from ``src`` to a temporary beside ``final``, check it (the
    reader's own checks: a zip's CRC, a gzip's stream; then ``size``, its header's), give it
    ``mode`` and ``mtime``, and only then rename it over ``final``. On any failure the
    temporary is removed and ``final`` stays as it was: ArchiveError for a damaged member,
    MemberWriteError for a failed write (disk full), both naming archive and member."""
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        budget.stale.remove_for(final)  # a killed run's temporary of this member
        fd, tmp = _member_temp(final)
        written = 0
        with open(fd, "wb") as dst:
            while True:
                try:
                    chunk = src.read(MEMBER_CHUNK)
                except _READ_ERRORS as e:
                    raise ArchiveError(f"{archive}: member {name!r} is damaged ({e}); "
                                       f"{_kept(final)}") from None
                if not chunk:
                    break
                budget.take(len(chunk), name)  # headers can lie
                dst.write(chunk)
                written += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        if written != size:
            raise ArchiveError(f"{archive}: member {name!r} is damaged: {written:,} bytes where "
                               f"its header says {size:,}; {_kept(final)}")
        if mode is not None:
            os.chmod(tmp, mode)
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        os.replace(tmp, final)  # whole and checked: only now under its name
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, ToolkitError):  # a failed write
            raise _write_failed(archive, name, final, e) from None
        raise


def _write_failed(archive: Path, name: str, final: Path, e: OSError) -> MemberWriteError:
    """The one-line error for member ``name`` that could not be written at ``final`` (disk
    full, a file where its folder goes, a folder where its link goes)."""
    error = MemberWriteError(f"{archive}: cannot write member {name!r} to {final}: "
                             f"{e.strerror or e}; {_kept(final)}")
    error.errno = e.errno
    return error


def _top_level(names: Sequence[PurePosixPath]) -> list[str]:
    return sorted({p.parts[0] for p in names if p.parts})


def _marker_path(archive: Path, dest: Path) -> Path:
    return dest / f"{MARKER_PREFIX}{archive.name}.json"


def _archive_identity(archive: Path) -> dict[str, int]:
    st = archive.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _completed_marker(archive: Path, dest: Path) -> dict[str, Any] | None:
    """The marker of a complete extraction of this very archive (same size and mtime) into
    ``dest`` whose top-level entries are still there, else None."""
    marker = _marker_path(archive, dest)
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # another program's file of that name, or one edited by hand, is no record of ours
    if not isinstance(info, dict) or not MARKER_KEYS <= info.keys():
        return None
    if info.get("archive") != _archive_identity(archive):
        return None
    if not all((dest / top).exists() for top in info.get("top_level", [])):
        return None
    return info


def already_extracted(archive: str | Path, dest: str | Path) -> bool:
    """True when a complete extraction of this very archive (same size and mtime) into
    ``dest`` left its marker and its top-level entries are still there."""
    return _completed_marker(Path(archive), Path(dest)) is not None


def _open_zip(archive: Path) -> zipfile.ZipFile:
    """The zip's directory read, or ArchiveError: a damaged one, or a member name flagged
    UTF-8 (bit 11) whose bytes are not (zipfile raises UnicodeDecodeError at the open)."""
    try:
        return zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        raise ArchiveError(f"{archive}: not a readable zip file ({e})") from None
    except UnicodeDecodeError as e:
        raise ArchiveError(f"{archive}: a member name marked as UTF-8 is not valid UTF-8 "
                           f"({e.object[max(e.start - 20, 0):e.end]!r}); not a readable zip "
                           "file") from None


def _extract_zip(archive: Path, dest: Path, progress: bool,
                 limits: SizeLimits | None) -> tuple[int, int, list[str]]:
    with _open_zip(archive) as zf:
        infos = zf.infolist()
        rels = []
        root = os.path.realpath(dest)
        for info in infos:  # check every member before writing anything
            rel = _safe_relative(info.filename, archive)
            if _is_zip_symlink(info):
                raise UnsafeArchiveError(
                    f"{archive}: refusing member {info.filename!r}: symbolic links in zip "
                    "archives are not extracted (a chain of them can redirect later members "
                    "outside the destination)")
            _check_resolved(root, dest, rel, info.filename, archive)
            if not info.is_dir():
                _check_zip_method(info, archive)
            rels.append(rel)
        total = sum(_declared_size(i) for i in infos)
        budget = _Budget(archive, limits)
        if budget.allowed is not None and total > budget.allowed:
            raise _too_large(archive, "its declared contents", total, budget.allowed)
        files = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=archive.name,
                  disable=not progress) as bar:
            for info, rel in zip(infos, rels, strict=True):
                out = dest.joinpath(*rel.parts) if rel.parts else dest
                if info.is_dir():
                    try:
                        out.mkdir(parents=True, exist_ok=True)
                    except OSError as e:  # a file of this archive (or an earlier) there
                        raise _write_failed(archive, info.filename, out, e) from None
                    continue
                try:
                    src = zf.open(info)
                except (*_READ_ERRORS, NotImplementedError, RuntimeError) as e:
                    raise ArchiveError(
                        f"{archive}: member {info.filename!r} cannot be read ({e})") from None
                with src:  # the CRC is checked as the last bytes are read
                    _write_member(archive, info.filename, out, src, budget, info.file_size, bar)
                files += 1
    return files, budget.used, _top_level(rels)


def _extract_tar(archive: Path, dest: Path, progress: bool,
                 limits: SizeLimits | None) -> tuple[int, int, list[str]]:
    rels: list[PurePosixPath] = []
    links: list[tuple[str, Path]] = []
    files = 0
    budget = _Budget(archive, limits)
    names: list[str] = []
    extracted: set[PurePosixPath] = set()  # the file members written so far, for hard links
    with open(archive, "rb", buffering=0) as raw, tqdm(
            total=archive.stat().st_size, unit="B", unit_scale=True, desc=archive.name,
            disable=not progress) as bar:
        reader = io.BufferedReader(_CountingReader(raw, bar), buffer_size=COPY_CHUNK)
        # gzip's own reader checks the stream's CRC (tarfile's does not); others: tarfile's
        gz = gzip.GzipFile(fileobj=reader) if reader.peek(2)[:2] == GZIP_MAGIC else None
        try:
            # stream mode: one sequential pass, whatever the compression
            with tarfile.open(fileobj=gz or reader, mode="r|" if gz else "r|*") as tar:
                for member in tar:
                    rel = _check_tar_member(member, archive)
                    rels.append(rel)
                    names.append(member.name)
                    # the 'data' filter re-checks paths and links, resolving every symbolic
                    # link on disk (os.path.realpath: what _check_resolved does for a zip),
                    # and drops odd permissions
                    if member.isfile():
                        _extract_tar_file(tar, member, dest.joinpath(*rel.parts), dest,
                                          archive, budget)
                        files += 1
                        extracted.add(rel)
                        continue
                    if member.islnk():  # tarfile's own would seek back in the stream
                        _extract_tar_hard_link(member, rel, dest, archive, budget, extracted)
                        files += 1
                        extracted.add(rel)
                        continue
                    if member.issym():
                        links.append((member.name, _extract_tar_symlink(
                            member, rel, dest, archive, budget)))
                        extracted.discard(rel)  # no file a hard link may name now
                        continue
                    try:  # a folder: tarfile's, with the data filter's checks
                        tar.extract(member, dest, filter="data")
                    except OSError as e:
                        raise _write_failed(archive, member.name, dest.joinpath(*rel.parts),
                                            e) from None
                while gz is not None and gz.read(COPY_CHUNK):
                    pass  # to the stream's end, where its CRC is checked
        except tarfile.FilterError as e:
            raise UnsafeArchiveError(f"{archive}: refusing member: {e}") from None
        except (tarfile.ReadError, tarfile.CompressionError, EOFError, gzip.BadGzipFile,
                zlib.error, lzma.LZMAError) as e:
            raise _unreadable_tar(archive, names, e) from None
        finally:  # also after a refusal: no link may be left pointing outside
            escaped = _remove_escaping_links(dest, links)
    if escaped:
        raise UnsafeArchiveError(
            f"{archive}: refusing member {escaped[0]!r}: a later member made its link point "
            f"outside the destination (removed {len(escaped)} such link(s))")
    return files, budget.used, _top_level(rels)


def _extract_tar_file(tar: tarfile.TarFile, member: tarfile.TarInfo, final: Path, dest: Path,
                      archive: Path, budget: _Budget) -> None:
    """A regular file member, through a checked temporary (:func:`_write_member`) with the
    path checks and permissions of tarfile's 'data' filter, less the umask."""
    filtered = tarfile.data_filter(member, str(dest))
    src = tar.extractfile(member)
    if src is None:  # cannot happen for a regular file; tarfile's type says None is possible
        raise ArchiveError(f"{archive}: member {member.name!r} has no data")
    # the archive's mode less the umask, as tar gives a user who is not root: a private
    # umask (077) keeps the set private whatever modes its packer had
    mode = None if filtered.mode is None else filtered.mode & ~current_umask()
    with src:
        _write_member(archive, member.name, final, src, budget, member.size,
                      mode=mode, mtime=filtered.mtime)


def _extract_tar_hard_link(member: tarfile.TarInfo, rel: PurePosixPath, dest: Path,
                           archive: Path, budget: _Budget,
                           extracted: set[PurePosixPath]) -> None:
    """A hard link member: a link to the file an earlier member wrote (a tar's hard link
    names an earlier member), placed as :func:`_place_link` does; a copy of that file where
    the filesystem has no hard links. tarfile's own would fail on a stream (it seeks back for
    the target when the link's name exists already, as on every re-extraction, or the target
    is not on disk)."""
    tarfile.data_filter(member, str(dest))  # the link's path and target stay inside dest
    target_rel = _safe_relative(member.linkname, archive)
    if target_rel not in extracted:
        raise ArchiveError(f"{archive}: member {member.name!r} is a hard link to "
                           f"{member.linkname!r}, which is not a file member before it")
    final, target = dest.joinpath(*rel.parts), dest.joinpath(*target_rel.parts)
    try:
        _place_link(archive, member.name, final, budget, lambda t: os.link(target, t))
    except MemberWriteError as e:
        if e.errno not in LINK_FAILURES_COPIED:
            raise
        with open(target, "rb") as src:
            _write_member(archive, member.name, final, src, budget, target.stat().st_size,
                          mode=stat.S_IMODE(target.stat().st_mode))


def _extract_tar_symlink(member: tarfile.TarInfo, rel: PurePosixPath, dest: Path,
                         archive: Path, budget: _Budget) -> Path:
    """A symbolic link member, checked by tarfile's 'data' filter and placed as
    :func:`_place_link` does; its path. tarfile's own, failing (a folder where the link
    goes), looked for the target in the archive: on a stream that read the rest of it, so
    later members were missed or reported damaged."""
    filtered = tarfile.data_filter(member, str(dest))
    final = dest.joinpath(*rel.parts)
    _place_link(archive, member.name, final, budget,
                lambda t: os.symlink(filtered.linkname, t))
    return final


def _place_link(archive: Path, name: str, final: Path, budget: _Budget,
                make: Callable[[Path], None]) -> None:
    """Make link member ``name`` under a fresh temporary beside ``final`` (``make(tmp)``) and
    rename it over ``final``, as a file member is: a failure (MemberWriteError naming archive
    and member, with the errno) leaves ``final`` as it was."""
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        budget.stale.remove_for(final)  # a killed run's temporary of this member
        tmp = _new_member_temp(final, make)
        os.replace(tmp, final)
        if os.path.lexists(tmp):  # a hard link onto its own target: rename(2) does nothing
            tmp.unlink()
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, ToolkitError):
            raise _write_failed(archive, name, final, e) from None
        raise


def _unreadable_tar(archive: Path, names: list[str], e: BaseException) -> ArchiveError:
    """The error for a tar stream that fails outside a member's bytes: before any member
    (not a tar), or after some (a damaged header, or a gzip stream failing its end check:
    then the bytes already extracted may be wrong, as the CRC covers the whole stream)."""
    if not names:
        return ArchiveError(f"{archive}: not a readable tar archive ({e})")
    if isinstance(e, gzip.BadGzipFile):
        return ArchiveError(
            f"{archive}: its gzip stream fails the check at its end ({e}), reached after "
            f"member {names[-1]!r}: bytes somewhere in it are damaged, so files extracted "
            "from it may be wrong; download it again")
    return ArchiveError(f"{archive}: damaged after member {names[-1]!r} ({e})")


def _archive_kind(archive: Path) -> str:
    """Whether ``archive`` is a "tar" or a "zip". A tar is told by its first header, so it is
    asked first: zipfile.is_zipfile looks for a zip directory in the last 64 KiB, which a
    plain tar whose last member is a zip has, and that inner zip was unpacked instead."""
    try:
        if tarfile.is_tarfile(archive):
            return "tar"
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:  # damaged compression
        raise ArchiveError(f"{archive}: not a readable archive ({e})") from None
    if zipfile.is_zipfile(archive):
        return "zip"
    raise ArchiveError(f"{archive}: not a zip or tar archive")


def _members_share_one_folder(archive: Path, kind: str) -> bool | None:
    """For a zip: whether every member sits inside one top-level folder. None for a tar
    (unknown without a full pass over it, so tar archives are unpacked as they are)."""
    if kind != "zip":
        return None
    with _open_zip(archive) as zf:
        infos = zf.infolist()
    # as the members are written: './a.txt' is 'a.txt' (PurePosixPath drops '.' and '')
    parts = [PurePosixPath(i.filename.replace("\\", "/").strip("/")).parts or ("",)
             for i in infos]
    tops = {p[0] for p in parts if p[0]}
    loose = any(len(p) == 1 and not i.is_dir() for p, i in zip(parts, infos, strict=True))
    return len(tops) == 1 and not loose


def _check_destination(dest: Path, archive: Path | None = None) -> None:
    """``dest`` and every existing folder above it must be folders, not files."""
    for path in (dest, *dest.parents):
        if path.exists():
            if not path.is_dir():
                where = f"{archive}: " if archive is not None else ""
                raise DestinationError(f"{where}destination {path} is a file, not a folder")
            return


def extract_archive(archive: str | Path, dest: str | Path, progress: bool = True,
                    force: bool = False,
                    limits: SizeLimits | None = SizeLimits()) -> dict[str, Any]:
    """Unpack ``archive`` (zip, tar, tar.gz/bz2/xz) into ``dest``, members at their stored
    relative paths. Does nothing when :func:`already_extracted` (unless ``force``).

    The writer holds ``dest``'s lock (:func:`utils.claim_output`): a second writer of it, in
    another process, is refused (OutputBusyError naming the first's pid); a skip takes none.
    Raises UnsafeArchiveError for a member that would land outside ``dest``,
    ArchiveTooLargeError past ``limits`` (None: no limit), ArchiveError for an unreadable
    archive, all naming the archive (and member); DestinationError when ``dest`` is a file.
    Returns a summary: archive, dest, skipped, files, bytes, top_level, seconds.
    """
    archive, dest = Path(archive), Path(dest)
    if archive.is_dir():
        raise ArchiveError(f"{archive}: is a folder, not an archive file")
    if not archive.is_file():
        raise FileNotFoundError(f"archive not found: {archive}")
    if archive.stat().st_size == 0:
        raise ArchiveError(f"{archive}: empty file (0 bytes), not an archive")
    _check_destination(dest, archive)
    start = time.perf_counter()
    summary: dict[str, Any] = {"archive": str(archive), "dest": str(dest), "skipped": False}
    info = None if force else _completed_marker(archive, dest)
    if info is not None:
        summary.update(skipped=True, files=info["files"], bytes=info["bytes"],
                       top_level=info["top_level"], seconds=0.0)
        return summary
    # one writer: it deletes the member temporaries of killed runs, which a second writer's
    # would look like (the CLI's --dest lock is this one again when dest is --dest)
    with claim_output(dest, "destination", {"archive": archive}):
        kind = _archive_kind(archive)
        dest.mkdir(parents=True, exist_ok=True)
        extract = _extract_zip if kind == "zip" else _extract_tar
        files, size, top = extract(archive, dest, progress, limits)
        record = {"archive": _archive_identity(archive), "files": files, "bytes": size,
                  "top_level": top, "format": kind}
        atomic_write_text(_marker_path(archive, dest), json.dumps(record, indent=1))
    summary.update(files=files, bytes=size, top_level=top,
                   seconds=round(time.perf_counter() - start, 2))
    return summary


def destination_for(archive: str | Path, data_root: str | Path = DEFAULT_DATA_ROOT) -> Path:
    """Where the CLI unpacks ``archive``: :func:`default_destination`, plus a folder named
    after the archive when a zip's members are not all inside one top-level folder."""
    archive = Path(archive)
    dest = default_destination(archive, data_root)
    try:
        shared = _members_share_one_folder(archive, _archive_kind(archive))
    except (ArchiveError, zipfile.BadZipFile, OSError):
        return dest  # extract_archive reports the problem
    if shared is False:
        return dest / archive_stem(archive)
    return dest


def copy_if_changed(src: Path, dst: Path) -> bool:
    """Copy ``src`` (a small text file: pairs.txt) to ``dst`` unless an identical file is
    there, atomically (a copy cut short by a full disk or Ctrl-C leaves the old file, and a
    reader of the old file keeps reading it); True when copied."""
    if dst.is_file() and filecmp.cmp(src, dst, shallow=False):  # sizes first, then chunks
        return False
    atomic_write_bytes(dst, src.read_bytes())
    return True


# ----------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Unpack downloaded face datasets (faces_emore zip, lfw / lfw-funneled tgz, "
                    "MegaFace and FaceScrub tars) into DEST, once, refusing unsafe members. "
                    "pairs.txt arguments are copied to DEST/lfw/pairs.txt.")
    add_debug_flag(parser)
    parser.add_argument("archives", nargs="+", type=Path, metavar="ARCHIVE")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DATA_ROOT,
                        help="data root (default: data)")
    parser.add_argument("--force", action="store_true", help="extract even if done before")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        ALLOW_LARGE_FLAG, action="store_true",
        help=f"extract archives that expand more than {MAX_COMPRESSION_RATIO}x their size "
             f"(past the first {RATIO_FREE_BYTES // 2**20} MiB) or past "
             f"{MAX_EXTRACTED_BYTES // 2**40} TiB in all; without it such archives are "
             "refused as likely zip bombs")
    args = parser.parse_args(argv)
    _check_destination(args.dest)  # one error, not one per archive
    with claim_output(args.dest, "--dest", {"ARCHIVE": args.archives}):  # one writer
        return extract_all(args)


def extract_all(args: argparse.Namespace) -> int:
    """What :func:`main` does once --dest is claimed: each archive, then one summary."""
    limits = None if args.allow_large else SizeLimits()

    failures = []  # one "error: ..." line each, on stderr after the summary of the rest
    lines = []
    for archive in args.archives:
        if archive.name.lower() == PAIRS_NAME:
            target = args.dest / LFW_PAIRS_SUBDIR / PAIRS_NAME
            if not archive.is_file():
                failures.append(f"{archive}: file not found")
                continue
            copied = copy_if_changed(archive, target)
            lines.append(f"{'copied ' if copied else 'present'}  {archive} -> {target}")
            continue
        dest = destination_for(archive, args.dest)
        try:
            s = extract_archive(archive, dest, progress=not args.no_progress, force=args.force,
                                limits=limits)
        except (FileNotFoundError, ToolkitError) as e:  # this archive fails, the rest go on
            failures.append(str(e))
            continue
        where = ", ".join(str(dest / t) for t in s["top_level"]) or str(dest)
        state = "done   " if s["skipped"] else "unpacked"
        lines.append(f"{state} {archive.name}: {s['files']} files, "
                     f"{s['bytes'] / 1e6:.1f} MB -> {where}"
                     + (" (already extracted)" if s["skipped"] else f" in {s['seconds']} s"))
        beside = archive.parent / PAIRS_NAME
        if LFW_KEYWORD in archive.name.lower() and beside.is_file() and len(s["top_level"]) == 1:
            target = dest / s["top_level"][0] / PAIRS_NAME
            if copy_if_changed(beside, target):
                lines.append(f"copied   {beside} -> {target}")
    if lines:
        print("\n".join(lines))
    for failure in failures:  # as every script's errors read (utils.run_cli)
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
