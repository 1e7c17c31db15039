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

Size: an archive whose contents would exceed MAX_COMPRESSION_RATIO times its own size (past
the first RATIO_FREE_BYTES) or MAX_EXTRACTED_BYTES in all is refused as a likely zip bomb:
for a zip from its declared sizes before anything is written, and for every archive again
from the bytes actually written (headers can lie). ``--allow-large`` lifts the limits.
"""

from __future__ import annotations

import argparse
import filecmp
import gzip
import io
import json
import lzma
import os
import shutil
import stat
import sys
import tarfile
import time
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from utils import ToolkitError, add_debug_flag, atomic_write_text, claim_output, get_logger, run_cli

DEFAULT_DATA_ROOT = Path("data")
MEGAFACE_SUBDIR = "megaface"
MEGAFACE_KEYWORDS = ("megaface", "facescrub")
LFW_KEYWORD = "lfw"
PAIRS_NAME = "pairs.txt"
LFW_PAIRS_SUBDIR = "lfw"  # config.pairs defaults to data/lfw/pairs.txt
MARKER_PREFIX = ".extracted-"
ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip")
COPY_CHUNK = 1 << 20  # bytes per read when copying a member out of a zip
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
    """Counts the bytes actually written against the size limit (None: unlimited)."""

    def __init__(self, archive: Path, limits: SizeLimits | None) -> None:
        self.archive = archive
        self.allowed = None if limits is None else limits.allowed(archive.stat().st_size)
        self.used = 0

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
    if info.get("archive") != _archive_identity(archive):
        return None
    if not all((dest / top).exists() for top in info.get("top_level", [])):
        return None
    return info


def already_extracted(archive: str | Path, dest: str | Path) -> bool:
    """True when a complete extraction of this very archive (same size and mtime) into
    ``dest`` left its marker and its top-level entries are still there."""
    return _completed_marker(Path(archive), Path(dest)) is not None


def _extract_zip(archive: Path, dest: Path, progress: bool,
                 limits: SizeLimits | None) -> tuple[int, int, list[str]]:
    from tqdm import tqdm

    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        raise ArchiveError(f"{archive}: not a readable zip file ({e})") from None
    with zf:
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
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(out, "wb") as dst:
                        while chunk := src.read(COPY_CHUNK):
                            budget.take(len(chunk), info.filename)  # headers can lie
                            dst.write(chunk)
                            bar.update(len(chunk))
                except ArchiveTooLargeError:
                    out.unlink(missing_ok=True)  # the bomb's partial output
                    raise
                except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                    raise ArchiveError(
                        f"{archive}: member {info.filename!r} is corrupt ({e})") from None
                files += 1
    return files, budget.used, _top_level(rels)


def _extract_tar(archive: Path, dest: Path, progress: bool,
                 limits: SizeLimits | None) -> tuple[int, int, list[str]]:
    from tqdm import tqdm

    rels: list[PurePosixPath] = []
    links: list[tuple[str, Path]] = []
    files = 0
    budget = _Budget(archive, limits)
    with open(archive, "rb", buffering=0) as raw, tqdm(
            total=archive.stat().st_size, unit="B", unit_scale=True, desc=archive.name,
            disable=not progress) as bar:
        reader = io.BufferedReader(_CountingReader(raw, bar), buffer_size=COPY_CHUNK)
        try:
            # stream mode: one sequential pass, whatever the compression
            with tarfile.open(fileobj=reader, mode="r|*") as tar:
                for member in tar:
                    rel = _check_tar_member(member, archive)
                    if member.isfile():  # tarfile writes exactly member.size bytes
                        budget.take(member.size, member.name)
                    rels.append(rel)
                    # the 'data' filter re-checks paths and links, resolving every symbolic
                    # link on disk (os.path.realpath: what _check_resolved does for a zip),
                    # and drops odd permissions
                    tar.extract(member, dest, filter="data")
                    if member.issym():
                        links.append((member.name, dest.joinpath(*rel.parts)))
                    if member.isfile():
                        files += 1
        except tarfile.FilterError as e:
            raise UnsafeArchiveError(f"{archive}: refusing member: {e}") from None
        except (tarfile.ReadError, tarfile.CompressionError, EOFError, gzip.BadGzipFile,
                zlib.error, lzma.LZMAError) as e:
            raise ArchiveError(f"{archive}: not a readable tar archive ({e})") from None
        finally:  # also after a refusal: no link may be left pointing outside
            escaped = _remove_escaping_links(dest, links)
    if escaped:
        raise UnsafeArchiveError(
            f"{archive}: refusing member {escaped[0]!r}: a later member made its link point "
            f"outside the destination (removed {len(escaped)} such link(s))")
    return files, budget.used, _top_level(rels)


def _archive_kind(archive: Path) -> str:
    if zipfile.is_zipfile(archive):
        return "zip"
    try:
        if tarfile.is_tarfile(archive):
            return "tar"
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:  # damaged compression
        raise ArchiveError(f"{archive}: not a readable archive ({e})") from None
    raise ArchiveError(f"{archive}: not a zip or tar archive")


def _members_share_one_folder(archive: Path, kind: str) -> bool | None:
    """For a zip: whether every member sits inside one top-level folder. None for a tar
    (unknown without a full pass over it, so tar archives are unpacked as they are)."""
    if kind != "zip":
        return None
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
    parts = [i.filename.replace("\\", "/").strip("/").split("/") for i in infos]
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
    """Copy ``src`` to ``dst`` unless an identical file is there; True when copied."""
    if dst.is_file() and filecmp.cmp(src, dst, shallow=False):  # sizes first, then chunks
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
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
