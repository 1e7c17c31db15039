"""InsightFace verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin, ...), loaded safely.

Each file is a pickle of ``(bins, issame_list)``: ``bins`` holds 2N encoded images (JPEG or
PNG bytes; pair i is images 2i and 2i+1) and ``issame_list`` N booleans. A pickle can run
arbitrary code while it is loaded, so these files are read through :class:`SafeUnpickler`,
which resolves only the few globals such a file needs and refuses every other one.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import cv2
import numpy as np

try:  # numpy >= 2 (numpy.core still imports there, with a DeprecationWarning)
    from numpy._core import multiarray, numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray, numeric
from tqdm import tqdm

from utils import FACE_CROP_SIZE, ImageReadError, ToolkitError, decode_image, first_few

LATIN1_NAMES = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"})
MAX_LISTED_IMAGES = 3  # undecodable images named in the one-line error (the count is complete)


class UnsafePickleError(ToolkitError, pickle.UnpicklingError):
    """The pickle references a global that a verification set never needs."""


class BinFormatError(ToolkitError, ValueError):
    """A file that is not a readable verification set (truncated, not a pickle, another
    structure, undecodable images); the message names it."""


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` restricted to latin-1: how Python 3 writes ``bytes`` in a
    protocol-2 pickle (and nothing else: other codecs are refused)."""
    if encoding.lower() not in LATIN1_NAMES:
        raise UnsafePickleError(f"_codecs.encode with codec {encoding!r} is not allowed")
    return codecs.encode(text, "latin-1", errors)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {("_codecs", "encode"): _latin1_encode}
    for module in ("builtins", "__builtin__"):  # __builtin__: Python 2 pickles
        for obj in (list, tuple, dict, set, frozenset, bytes, bytearray, str, int, float,
                    complex, bool):
            allowed[(module, obj.__name__)] = obj
    # numpy arrays and scalars; files pickled before numpy 2 name numpy.core, later ones
    # numpy._core (protocol 5 uses _frombuffer)
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("numpy", "bool_")] = np.bool_
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler whose ``find_class`` admits only containers, scalars and numpy arrays."""

    def __init__(self, file, source: str = "<pickle>", **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refusing to load global '{module}.{name}': a verification "
                "set holds only images and booleans, so this file is not one (or was "
                "tampered with)") from None


def safe_load_pickle(data: bytes, source: str = "<pickle>") -> Any:
    """Unpickle ``data`` with :class:`SafeUnpickler`; Python 2 pickles (whose ``str`` holds
    binary data) are retried with ``encoding='bytes'``."""
    try:
        return SafeUnpickler(io.BytesIO(data), source).load()
    except UnicodeDecodeError:
        return SafeUnpickler(io.BytesIO(data), source, encoding="bytes").load()


def _as_bytes(item: Any, source: str, index: int) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    if isinstance(item, str):  # a Python 2 str read as latin-1 text
        return item.encode("latin-1")
    raise BinFormatError(f"{source}: image {index} is a {type(item).__name__}, not encoded "
                         "bytes")


def _as_issame(issame: Any, source: str) -> np.ndarray:
    if not isinstance(issame, (list, tuple, np.ndarray)):
        raise BinFormatError(f"{source}: issame_list must be a sequence of booleans, got a "
                             f"{type(issame).__name__}")
    values = np.asarray(issame).reshape(-1)
    if values.dtype == bool:
        return values
    if values.dtype.kind in "iu" and np.isin(values, (0, 1)).all():
        return values.astype(bool)
    raise BinFormatError(f"{source}: issame_list must hold booleans, got dtype {values.dtype}")


def load_bin(path: str | Path, image_size: int = FACE_CROP_SIZE,
             progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images (2N, 112, 112, 3) RGB uint8 and labels (N,) bool of an InsightFace .bin set.

    Pairs are consecutive images. Images of another size are resized. A file that is not a
    ``(bins, issame_list)`` pickle, references any other global, or holds undecodable
    images is refused with an error naming the file (undecodable images are listed, not
    skipped: dropping one would shift every later pair and break the fold structure)."""
    path = Path(path)
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"cannot read verification set {path}: {e.strerror or e}") \
            from None
    try:
        obj = safe_load_pickle(data, source)
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated, compressed, or not a pickle at all
        detail = f"{type(e).__name__}: {e}".splitlines()[0]
        raise BinFormatError(f"{source}: not a readable pickle ({len(data)} bytes; {detail}); "
                             "truncated or not an InsightFace .bin set") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BinFormatError(f"{source}: expected a pickled (bins, issame_list) pair, got "
                             f"{type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise BinFormatError(f"{source}: the images must be a list of encoded images, got a "
                             f"{type(bins).__name__}")
    issame = _as_issame(issame, source)
    if len(bins) != 2 * issame.size:
        raise BinFormatError(f"{source}: {len(bins)} images for {issame.size} pairs "
                             f"(need exactly two per pair)")
    images = np.empty((len(bins), image_size, image_size, 3), dtype=np.uint8)
    bad = []
    for i, item in enumerate(tqdm(bins, desc=f"decode {path.name}", unit="img",
                                  disable=not progress, leave=False)):
        try:
            image = decode_image(_as_bytes(item, source, i), source=f"{source}[{i}]")
        except ImageReadError as e:
            bad.append(str(e))
            continue
        if image.shape[:2] != (image_size, image_size):
            image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_LINEAR)
        images[i] = image
    if bad:  # one line: the count and the first few
        raise BinFormatError(f"{source}: {len(bad)} undecodable images (first: "
                             + first_few(bad, MAX_LISTED_IMAGES, "; ") + ")")
    return images, issame
