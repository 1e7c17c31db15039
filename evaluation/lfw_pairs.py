"""LFW's pairs file (``pairs.txt``, ``pairsDevTest.txt``): parse it into :class:`Pair` s,
check that every image it names exists, and group the pairs into the file's folds.

The format: a header ``<folds>\t<n>`` (or just ``<n>``: one set), then per fold n
same-person lines ``name i j`` followed by n different-person lines ``name1 i name2 j``;
image ``i`` of ``name`` is ``name/name_000i.jpg`` under the LFW root. A file that deviates
(binary or compressed content, a header promising more or fewer pairs than the file holds, a
line with the wrong number of fields) is a :class:`PairsFileError` naming the file and line;
a missing file, LFW folder or image a :class:`MissingInputError`. A file saved with a
byte-order mark (UTF-8, UTF-16 or UTF-32, as Windows editors write) reads as plain text.
How the folds are scored is lfw_eval.py's business (``lfw_eval.pairs_file_folds``).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils import MissingInputError, ToolkitError, first_few

__all__ = [
    "Pair", "PairsFileError", "MissingInputError", "parse_pairs", "check_pairs_exist",
    "pair_folds",
]

MAX_NAMED = 5  # missing or unreadable files named in a one-line error (the count is complete)
GZIP_MAGIC = b"\x1f\x8b"  # a pairs.txt.gz saved under the .txt name: said as such
# Byte-order marks editors write (Windows Notepad: UTF-8 or UTF-16 "Unicode"); UTF-32's come
# first, as UTF-32-LE's begins with UTF-16-LE's.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
         (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
         (codecs.BOM_UTF16_BE, "utf-16-be"))


class PairsFileError(ToolkitError, ValueError):
    """A pairs file that does not follow LFW's format; the message names file and line."""


@dataclass(frozen=True)
class Pair:
    """One LFW pair: image paths relative to the LFW root (``name/name_0001.jpg``)."""

    path1: str
    path2: str
    same: bool
    fold: int = 0  # index of the fold (block of the file) this pair belongs to


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit also accepts '\u00b2', which int() refuses."""
    return text.isascii() and text.isdigit()


def _lfw_image(name: str, number: str, path: Path, lineno: int) -> str:
    if not _is_number(number) or int(number) < 1:
        raise PairsFileError(f"{path}:{lineno}: image number {number!r} is not a positive "
                             "integer")
    return f"{name}/{name}_{int(number):04d}.jpg"


def _without_bom(data: bytes, path: Path) -> bytes:
    """``data`` without a leading byte-order mark, as UTF-8 (a UTF-16/32 file transcoded);
    PairsFileError when the rest is not in the encoding the mark announces."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(encoding).encode("utf-8")
            except UnicodeError as e:
                raise PairsFileError(f"{path}: starts with a {encoding.upper()} byte-order "
                                     f"mark but is not {encoding.upper()} text ({e.reason} at "
                                     f"byte {len(bom) + e.start})") from None
    return data


def _read_text_lines(path: Path) -> list[str]:
    """The file's lines, a byte-order mark (UTF-8, UTF-16, UTF-32) dropped; PairsFileError
    naming the file and the line of the first byte that is not text (a gzip file, a binary
    download saved under the name)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingInputError(f"{path}: pairs file not found") from None
    data = _without_bom(data, path)
    if data.startswith(GZIP_MAGIC):
        raise PairsFileError(f"{path}:1: this is a gzip-compressed file, not LFW's text pairs "
                             "file: decompress it first (gunzip)")
    nul = data.find(b"\0")  # valid UTF-8, but never text
    try:
        text = data.decode("utf-8")
        bad = None
    except UnicodeDecodeError as e:
        bad = e.start
    if nul >= 0 and (bad is None or nul < bad):  # whichever comes first is reported
        lineno = data.count(b"\n", 0, nul) + 1
        raise PairsFileError(f"{path}:{lineno}: NUL byte at offset {nul}: a binary file, not "
                             "LFW's text pairs file")
    if bad is not None:
        lineno = data.count(b"\n", 0, bad) + 1
        raise PairsFileError(f"{path}:{lineno}: not UTF-8 text (byte 0x{data[bad]:02x} at "
                             f"offset {bad}): is this LFW's pairs.txt?")
    return text.splitlines()


def parse_pairs(path: str | Path) -> list[Pair]:
    """Parse LFW's ``pairs.txt``: a header ``<folds>\\t<n>`` (or just ``<n>``: one set), then
    per fold n same-person lines ``name i j`` followed by n different-person lines
    ``name1 i name2 j``. Any deviation (binary content, a header promising more or fewer
    pairs than the file holds, a wrong field count) is a PairsFileError naming the file and
    the line."""
    path = Path(path)
    lines = _read_text_lines(path)
    while lines and not lines[-1].strip():  # trailing blank lines are harmless
        lines.pop()
    if not lines:
        raise PairsFileError(f"{path}: empty pairs file")
    header = lines[0].split()
    if not header or len(header) > 2 or not all(_is_number(h) for h in header):
        raise PairsFileError(f"{path}:1: header must be '<folds>\\t<pairs per kind>' or "
                             f"'<pairs per kind>', got {lines[0][:80]!r}")
    nfolds, per_kind = (int(header[0]), int(header[1])) if len(header) == 2 \
        else (1, int(header[0]))
    expected = nfolds * 2 * per_kind
    promise = (f"its header (line 1) promises {nfolds} fold(s) x 2 x {per_kind} = {expected} "
               "pairs")
    if expected == 0:
        raise PairsFileError(f"{path}:1: {promise}")
    if len(lines) - 1 < expected:
        raise PairsFileError(f"{path}:{len(lines) + 1}: the file ends after {len(lines) - 1} "
                             f"pair lines, but {promise}")
    if len(lines) - 1 > expected:
        raise PairsFileError(f"{path}:{expected + 2}: {len(lines) - 1 - expected} line(s) more "
                             f"than {promise}")
    pairs = []
    for offset, line in enumerate(lines[1:]):
        lineno = offset + 2
        fold, position = divmod(offset, 2 * per_kind)
        same = position < per_kind
        fields = line.split()
        if same:
            if len(fields) != 3:
                raise PairsFileError(f"{path}:{lineno}: expected a same-person line 'name i j' "
                                     f"(fold {fold + 1}), got {line[:80]!r}")
            name, i, j = fields
            pairs.append(Pair(_lfw_image(name, i, path, lineno),
                              _lfw_image(name, j, path, lineno), True, fold))
        else:
            if len(fields) != 4:
                raise PairsFileError(f"{path}:{lineno}: expected a different-person line "
                                     f"'name1 i name2 j' (fold {fold + 1}), got {line[:80]!r}")
            name1, i, name2, j = fields
            pairs.append(Pair(_lfw_image(name1, i, path, lineno),
                              _lfw_image(name2, j, path, lineno), False, fold))
    return pairs


def check_pairs_exist(pairs: Sequence[Pair], lfw_dir: str | Path) -> None:
    """MissingInputError counting every missing image and naming the first few (before
    any work)."""
    lfw_dir = Path(lfw_dir)
    if not lfw_dir.is_dir():
        raise MissingInputError(f"{lfw_dir}: LFW directory not found")
    wanted = dict.fromkeys(p for pair in pairs for p in (pair.path1, pair.path2))
    missing = [p for p in wanted if not (lfw_dir / p).is_file()]
    if missing:
        raise MissingInputError(f"{len(missing)} of {len(wanted)} pair images missing under "
                                 f"{lfw_dir}: {first_few(missing, MAX_NAMED)}")


def pair_folds(pairs: Sequence[Pair]) -> list[np.ndarray]:
    """Indices of the pairs of each fold; folds must be contiguous blocks, as in pairs.txt."""
    folds = np.array([p.fold for p in pairs], dtype=np.int64)
    if folds.size and np.any(np.diff(folds) < 0):
        raise PairsFileError("pair folds are not contiguous blocks in increasing order")
    return [np.flatnonzero(folds == f) for f in np.unique(folds)]
