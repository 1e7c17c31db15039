"""Reading the IJB-B / IJB-C release as InsightFace packs it (``IJB_release/IJBC``).

    <ijb-dir>/meta/ijbc_face_tid_mid.txt          image_name template_id media_id
    <ijb-dir>/meta/ijbc_template_pair_label.txt   template1 template2 label (1 = same)
    <ijb-dir>/meta/ijbc_name_5pts_score.txt       image_name x1 y1 ... x5 y5 faceness_score
    <ijb-dir>/meta/ijbc_1N_probe_mixed.csv        TEMPLATE_ID,SUBJECT_ID,... (header, per image)
    <ijb-dir>/meta/ijbc_1N_gallery_G1.csv, _G2    (IJB-B: ijbb_1N_gallery_S1.csv, _S2)
    <ijb-dir>/loose_crop/<image_name>

Every malformed line is an :class:`IJBFormatError` naming the file and its line number, as
are five landmarks that are one point and a negative faceness score; a faceness of 0 is
legal but drops the face from the D1 modes, so those images are named in a warning.
The 15.7M-line pair file is parsed by NumPy's C reader (2-3 s); only when that fails is the
file walked line by line to name the first bad line.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from utils import ToolkitError, first_few, get_logger

NUM_LANDMARKS = 5
LANDMARK_FIELDS = 2 * NUM_LANDMARKS + 1  # x1 y1 ... x5 y5 faceness_score
PAIR_FIELDS = 3
TID_MID_FIELDS = 3
INT32 = np.iinfo(np.int32)
CSV_MIN_FIELDS = 2  # TEMPLATE_ID, SUBJECT_ID (the rest, FILENAME etc., is not needed)
MAX_NAMED = 5  # images or templates named in a one-line message (the count is complete)
# target -> (file prefix, names of its two 1:N galleries)
TARGETS: dict[str, tuple[str, tuple[str, str]]] = {
    "IJBB": ("ijbb", ("S1", "S2")),
    "IJBC": ("ijbc", ("G1", "G2")),
}


log = get_logger("ijb_release")


class IJBFormatError(ToolkitError, ValueError):
    """A release file that is missing, malformed or inconsistent; the message names the file
    (and the line, for a malformed line)."""


@dataclass
class Release:
    """The meta files of one IJB target, image rows in the order of ``face_tid_mid``."""

    target: str
    root: Path
    names: list[str]  # image file names under loose_crop/
    templates: np.ndarray  # (N,) int64 template id of each image
    medias: np.ndarray  # (N,) int64 media id of each image
    landmarks: np.ndarray  # (N, 5, 2) float32, (x, y) in the loose crop
    faceness: np.ndarray  # (N,) float32 detector score
    pairs_t1: np.ndarray  # (P,) int64
    pairs_t2: np.ndarray  # (P,) int64
    pairs_label: np.ndarray  # (P,) bool, True = same subject
    # 1:N: name ("probe", "G1", "G2") -> (template ids in file order, subject of each)
    search: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # images whose faceness is 0: the D1 modes give them no weight (load_release warns)
    zero_faceness: list[str] = field(default_factory=list)

    @property
    def crop_dir(self) -> Path:
        return self.root / "loose_crop"


def meta_path(root: str | Path, target: str, what: str) -> Path:
    """``<root>/meta/<prefix>_<what>``, e.g. what = ``face_tid_mid.txt``."""
    prefix = TARGETS[target][0]
    return Path(root) / "meta" / f"{prefix}_{what}"


def search_files(root: str | Path, target: str) -> dict[str, Path]:
    """The 1:N files: {"probe": mixed probes, <gallery 1>: ..., <gallery 2>: ...}."""
    galleries = TARGETS[target][1]
    files = {"probe": meta_path(root, target, "1N_probe_mixed.csv")}
    files.update({g: meta_path(root, target, f"1N_gallery_{g}.csv") for g in galleries})
    return files


@contextmanager
def _text_file(path: Path, newline: str | None = None) -> Iterator[TextIO]:
    """``path`` opened as text; a byte that is not UTF-8 (a Latin-1 name, a UTF-16 or binary
    file) read from it is an IJBFormatError naming the file."""
    try:
        with path.open(newline=newline) as f:
            yield f
    except UnicodeDecodeError as e:
        raise IJBFormatError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); the "
                             "release's meta files are plain text") from None


def _tokens(path: Path, nfields: int, expected: str) -> tuple[list[str], list[int]]:
    """All fields of the non-blank lines, flat, and each line's number; a line with another
    number of fields is an error. The caller converts columns in bulk (fast in C)."""
    if not path.is_file():
        raise IJBFormatError(f"{path}: file not found")
    tokens: list[str] = []
    linenos: list[int] = []
    with _text_file(path) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != nfields:
                raise IJBFormatError(f"{path}:{lineno}: expected '{expected}' ({nfields} "
                                     f"fields), got {len(fields)}: {line.rstrip()!r}")
            tokens.extend(fields)
            linenos.append(lineno)
    if not linenos:
        raise IJBFormatError(f"{path}: no entries listed")
    return tokens, linenos


def _column(values: list[str], dtype: type, path: Path, linenos: list[int], what: str
            ) -> np.ndarray:
    """``values`` as an array of ``dtype`` (int64 or float32); the first value that is not
    a number of that kind is an error naming its line."""
    try:
        return np.array(values, dtype=dtype)
    except ValueError:
        parse = int if dtype is np.int64 else float
        for value, lineno in zip(values, linenos, strict=True):
            try:
                parse(value)
            except ValueError:
                kind = "an integer" if parse is int else "a number"
                raise IJBFormatError(f"{path}:{lineno}: {what} {value!r} is not "
                                     f"{kind}") from None
        raise


def read_face_tid_mid(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image names, template ids, media ids) from ``*_face_tid_mid.txt``."""
    path = Path(path)
    tokens, linenos = _tokens(path, TID_MID_FIELDS, "image_name template_id media_id")
    step = TID_MID_FIELDS
    return (tokens[0::step], _column(tokens[1::step], np.int64, path, linenos, "template id"),
            _column(tokens[2::step], np.int64, path, linenos, "media id"))


def read_landmarks(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image names, (N, 5, 2) landmarks, (N,) faceness) from ``*_name_5pts_score.txt``."""
    path = Path(path)
    step = 1 + LANDMARK_FIELDS
    tokens, linenos = _tokens(path, step, "image_name x1 y1 ... x5 y5 score")
    columns = [_column(tokens[k::step], np.float32, path, linenos,
                       "score" if k == LANDMARK_FIELDS else "landmark coordinate")
               for k in range(1, step)]
    table = np.stack(columns, axis=1)
    bad = np.flatnonzero(~np.isfinite(table).all(axis=1))
    if bad.size:
        raise IJBFormatError(f"{path}:{linenos[bad[0]]}: a landmark or score is not finite")
    landmarks, faceness = table[:, :-1].reshape(-1, NUM_LANDMARKS, 2), table[:, -1].copy()
    _check_faces(path, linenos, landmarks, faceness)
    return tokens[0::step], landmarks, faceness


def _check_faces(path: Path, linenos: list[int], landmarks: np.ndarray,
                 faceness: np.ndarray) -> None:
    """Refuse, naming the line, five landmarks that are one point (no similarity maps them
    onto the template) and a negative faceness (a negative weight in the D1 modes)."""
    same = np.flatnonzero((landmarks == landmarks[:, :1]).all(axis=(1, 2)))
    if same.size:
        x, y = landmarks[same[0], 0]
        raise IJBFormatError(f"{path}:{linenos[same[0]]}: the five landmarks are one point "
                             f"({x:g}, {y:g}): no face to align ({same.size} such lines)")
    negative = np.flatnonzero(faceness < 0)
    if negative.size:
        raise IJBFormatError(f"{path}:{linenos[negative[0]]}: faceness score "
                             f"{faceness[negative[0]]:g} is negative: the protocol weighs "
                             f"each face by it ({negative.size} such lines)")


def _first_bad_pair_line(path: Path) -> str:
    with _text_file(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            fields = line.split()
            if not fields:
                continue
            if len(fields) != PAIR_FIELDS:
                return f"{path}:{lineno}: expected 'template1 template2 label', got {line!r}"
            for token, what in zip(fields, ("template1", "template2", "label"), strict=True):
                _column([token], np.int64, path, [lineno], what)
            if fields[2] not in ("0", "1"):
                return f"{path}:{lineno}: label must be 0 or 1, got {fields[2]!r}"
    return f"{path}: cannot be parsed as 'template1 template2 label' lines"


def read_pairs(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(template1, template2, same) from ``*_template_pair_label.txt``."""
    path = Path(path)
    if not path.is_file():
        raise IJBFormatError(f"{path}: file not found")
    try:  # NumPy's C reader; its own row numbers skip blank lines, so they are not used
        table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError:
        raise IJBFormatError(_first_bad_pair_line(path)) from None
    if table.shape[0] == 0:
        raise IJBFormatError(f"{path}: no pairs listed")
    if table.shape[1] != PAIR_FIELDS:
        raise IJBFormatError(_first_bad_pair_line(path))
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if bad.size:
        raise IJBFormatError(_first_bad_pair_line(path))
    # int32 ids where they fit: half the memory of 15.7M-pair columns
    small = table[:, :2].min(initial=0) >= INT32.min and table[:, :2].max(initial=0) <= INT32.max
    dtype = np.int32 if small else np.int64
    return table[:, 0].astype(dtype), table[:, 1].astype(dtype), table[:, 2] == 1


def read_search_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(template ids in order of first appearance, subject id of each) from a 1:N CSV (a
    header row, then one row per image: TEMPLATE_ID, SUBJECT_ID, ...). A template listed
    with two subjects is an error."""
    path = Path(path)
    if not path.is_file():
        raise IJBFormatError(f"{path}: file not found")
    templates: list[str] = []
    subjects: list[str] = []
    linenos: list[int] = []
    with _text_file(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if lineno == 1 or not any(cell.strip() for cell in row):
                continue  # the header, blank lines
            if len(row) < CSV_MIN_FIELDS:
                raise IJBFormatError(f"{path}:{lineno}: expected TEMPLATE_ID,SUBJECT_ID,..., "
                                     f"got {','.join(row)!r}")
            templates.append(row[0])
            subjects.append(row[1])
            linenos.append(lineno)
    if not linenos:
        raise IJBFormatError(f"{path}: no templates listed")
    t = _column(templates, np.int64, path, linenos, "TEMPLATE_ID")
    s = _column(subjects, np.int64, path, linenos, "SUBJECT_ID")
    _, first, inverse = np.unique(t, return_index=True, return_inverse=True)
    first_subject = s[first][inverse]
    bad = np.flatnonzero(s != first_subject)
    if bad.size:
        i = bad[0]
        raise IJBFormatError(f"{path}:{linenos[i]}: template {t[i]} has subject {s[i]} here "
                             f"but {first_subject[i]} above")
    order = np.sort(first)
    return t[order], s[order]


def _unknown(ids: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Positions of the ids of ``ids`` that are not in sorted ``known``."""
    return np.flatnonzero(~np.isin(ids, known))  # a lookup table over the id range


def _line_of_entry(path: Path, entry: int) -> int:
    """The line number of the ``entry``-th (0-based) non-blank line."""
    seen = -1
    with _text_file(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                seen += 1
                if seen == entry:
                    return lineno
    return 0


def _check_pair_templates(path: Path, t1: np.ndarray, t2: np.ndarray, known: np.ndarray) -> None:
    bad1, bad2 = _unknown(t1, known), _unknown(t2, known)
    if bad1.size or bad2.size:
        k = int(min(bad1.min(initial=t1.size), bad2.min(initial=t2.size)))
        template = t1[k] if bad1.size and bad1[0] == k else t2[k]
        bad = bad1.size + bad2.size
        raise IJBFormatError(f"{path}:{_line_of_entry(path, k)}: template {template} is not "
                             f"in face_tid_mid ({bad} such entries)")


def _check_search_templates(path: Path, ids: np.ndarray, known: np.ndarray) -> None:
    bad = _unknown(ids, known)
    if bad.size:
        template = int(ids[bad[0]])
        with _text_file(path, newline="") as f:
            lineno = next((n for n, row in enumerate(csv.reader(f), 1)
                           if n > 1 and row and row[0].strip() == str(template)), 0)
        raise IJBFormatError(f"{path}:{lineno}: template {template} is not in face_tid_mid "
                             f"({bad.size} such templates)")


def _zero_faceness(path: Path, names: list[str], templates: np.ndarray,
                   faceness: np.ndarray) -> list[str]:
    """The images whose faceness is 0, warned about by name: a legal score, but the D1 modes
    weigh each face by it, so these faces drop out, and a template of only such faces has a
    zero feature (it scores 0 against everything)."""
    zero = faceness == 0
    if not zero.any():
        return []
    named = [names[i] for i in np.flatnonzero(zero)]
    emptied = np.setdiff1d(templates[zero], templates[~zero])
    log.warning("%s: %d images have faceness 0 and no weight in the D1 modes (%s); %d "
                "template(s) have no other image (%s)", path, len(named),
                first_few(named, MAX_NAMED), emptied.size,
                first_few([str(t) for t in emptied], MAX_NAMED))
    return named


def load_release(root: str | Path, target: str, with_search: bool = True) -> Release:
    """Read and cross-check the meta files of ``target`` (IJBB or IJBC) under ``root``. The
    landmark file's images must be those of face_tid_mid (any order). 1:N files are read
    when all of them exist (and ``with_search``)."""
    root = Path(root)
    if target not in TARGETS:
        raise IJBFormatError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    if not root.is_dir():
        raise IJBFormatError(f"{root}: IJB directory not found")
    tid_path = meta_path(root, target, "face_tid_mid.txt")
    names, templates, medias = read_face_tid_mid(tid_path)
    lmk_path = meta_path(root, target, "name_5pts_score.txt")
    lmk_names, landmarks, faceness = read_landmarks(lmk_path)
    if len(set(names)) != len(names):
        raise IJBFormatError(f"{tid_path}: an image name is listed twice")
    if lmk_names != names:  # the release keeps one order; accept any, matched by name
        row_of = {n: i for i, n in enumerate(lmk_names)}
        missing = [n for n in names if n not in row_of]
        if missing or len(row_of) != len(lmk_names):
            detail = f"no landmarks for {missing[0]}" if missing else "an image is listed twice"
            raise IJBFormatError(f"{lmk_path}: does not match {tid_path.name}: {detail}")
        order = np.array([row_of[n] for n in names])
        landmarks, faceness = landmarks[order], faceness[order]
    zero = _zero_faceness(lmk_path, names, templates, faceness)
    pair_path = meta_path(root, target, "template_pair_label.txt")
    t1, t2, same = read_pairs(pair_path)
    known = np.unique(templates)
    _check_pair_templates(pair_path, t1, t2, known)
    release = Release(target, root, names, templates, medias, landmarks, faceness, t1, t2, same,
                      zero_faceness=zero)
    files = search_files(root, target)
    if with_search and all(p.is_file() for p in files.values()):
        for name, path in files.items():
            ids, subjects = read_search_csv(path)
            _check_search_templates(path, ids, known)
            release.search[name] = (ids, subjects)
    return release
