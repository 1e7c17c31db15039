"""Raw LFW for evaluation: every distinct image the pairs name is aligned once (MTCNN,
``align_faces``) to a 112x112 crop, a faceless one centre-cropped and reported, and the crops
are cached on disk (keyed by the file list, sizes and mtimes, and the aligner's settings: a
replaced image or another alignment realigns), written by one run at a time (its lock).
Images that cannot be read are named (the count is complete): an error, or, when the caller
asks (``load_lfw_crops(unreadable=...)``, as lfw_eval does), the pairs using them are left out
and the rest are scored.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Container, Sequence
from pathlib import Path

import cv2
import numpy as np

from evaluation.lfw_pairs import MAX_NAMED, Pair, check_pairs_exist
from faces.file_alignment import align_files
from utils import (
    FACE_CROP_SIZE,
    ImageReadError,
    atomic_write_bytes,
    cache_folder,
    claim_output,
    first_few,
    get_logger,
    remove_stale_temporaries,
)

__all__ = ["align_images", "as_crop", "default_cache_dir", "load_lfw_crops",
           "load_lfw_pairs_images", "readable_pairs"]

ALIGN_CHUNK = 32  # images read and aligned at a time (MTCNN batch)
CACHE_FLAG = "--cache-dir"  # lfw_eval's flag, named when another run is writing a cache

log = get_logger("lfw_eval")  # lfw_eval's logger: these messages are part of its run


# The aligner attributes its crops depend on besides the images (FaceAligner's; others have
# what they have): crops made with other settings are not another run's to reuse.
ALIGNER_SETTINGS = ("cascade", "detect_size", "min_face_size", "thresholds", "refine_steps",
                    "landmark_rule", "size")


def _cache_key(lfw_dir: Path, paths: Sequence[str], aligner: object) -> str:
    digest = hashlib.sha1(str(lfw_dir.resolve()).encode())
    digest.update(type(aligner).__name__.encode())
    for name in ALIGNER_SETTINGS:
        digest.update(f"\n{name}={getattr(aligner, name, None)!r}".encode())
    for p in paths:  # size and mtime too: a replaced image invalidates the cache
        st = (lfw_dir / p).stat()
        digest.update(f"\n{p}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def align_images(lfw_dir: Path, paths: Sequence[str], aligner=None
                 ) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """Align each image once: (crops (M,112,112,3), paths of faceless images centre-cropped,
    {path: why} of the images that cannot be read (their crops stay black))."""
    if aligner is None:
        # faces.aligner loads torch (~2 s), which lfw_eval.py --help does without
        from faces.aligner import FaceAligner

        aligner = FaceAligner()
    crops = np.zeros((len(paths), FACE_CROP_SIZE, FACE_CROP_SIZE, 3), dtype=np.uint8)
    faceless, unreadable = [], {}
    files = align_files(aligner, [lfw_dir / p for p in paths], ALIGN_CHUNK)
    for i, (path, done) in enumerate(zip(paths, files, strict=True)):
        if done.error is not None:
            unreadable[path] = str(done.error)
            continue
        if done.face is None:
            faceless.append(path)
        crops[i] = as_crop(done.crop, path)  # the centre crop is already 112x112
    return crops, faceless, unreadable


def as_crop(crop: np.ndarray, source: str) -> np.ndarray:
    """An aligner's crop as RGB uint8 112x112 (resized when it is another size); ValueError
    naming ``source`` when it is not an HxWx3 image."""
    crop = np.asarray(crop)
    if crop.shape == (FACE_CROP_SIZE, FACE_CROP_SIZE, 3) and crop.dtype == np.uint8:
        return crop
    if crop.ndim == 3 and crop.shape[2] == 3:
        return cv2.resize(crop.astype(np.uint8), (FACE_CROP_SIZE, FACE_CROP_SIZE))
    raise ValueError(f"{source}: aligner returned a crop of shape {crop.shape}")


def _read_cache(cache: Path, paths: list[str]) -> tuple[np.ndarray, list[str]] | None:
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as data:
            crops, faceless = data["crops"], [str(p) for p in data["faceless"]]
            cached_paths = [str(p) for p in data["paths"]]
    # truncated (EOFError, BadZipFile) or foreign file: realign
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("ignoring unreadable alignment cache %s (%s)", cache, e)
        return None
    if cached_paths != paths or crops.shape[0] != len(paths):
        return None
    log.info("aligned crops of %d images from cache %s", len(paths), cache)
    return crops, faceless


def default_cache_dir(lfw_dir: str | Path) -> Path:
    """The crop cache of ``lfw_dir``: ``<lfw_dir>_aligned_cache`` beside it, or where that
    folder cannot be written (a read-only LFW), one in the user cache dir
    (:func:`utils.cache_folder`)."""
    lfw_dir = Path(lfw_dir)
    return cache_folder(lfw_dir.parent / f"{lfw_dir.name}_aligned_cache")


def _write_cache(cache: Path, paths: list[str], crops: np.ndarray, faceless: list[str]) -> None:
    buf = io.BytesIO()
    np.savez(buf, crops=crops, paths=np.array(paths, dtype=str),
             faceless=np.array(faceless, dtype=str))
    atomic_write_bytes(cache, buf.getvalue())


def _align_and_cache(lfw_dir: Path, paths: list[str], aligner, cache: Path | None,
                     seen: bool) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """align_images, the crops then kept in ``cache`` (None: not kept) by one writer at a
    time: its lock is held from before the aligning until it is renamed into place, so a
    second run on the same tree and alignment is refused naming the first's pid instead of
    aligning again beside it. A whole cache is only read, without the lock (it is renamed
    into place whole). ``seen``: a cache file was there (and unusable) before the lock."""
    if cache is None:
        return align_images(lfw_dir, paths, aligner)
    with claim_output(cache, CACHE_FLAG):
        cached = None if seen else _read_cache(cache, paths)  # a writer ended since we looked
        if cached is not None:
            return (*cached, {})
        remove_stale_temporaries(cache.parent, cache.name)  # a killed writer's: we hold it
        crops, faceless, bad = align_images(lfw_dir, paths, aligner)
        if not bad:  # a file made readable (chmod) keeps its mtime
            _write_cache(cache, paths, crops, faceless)
    return crops, faceless, bad


def load_lfw_crops(lfw_dir: str | Path, pairs: Sequence[Pair], aligner=None,
                   cache_dir: str | Path | None = None, checked: bool = False,
                   unreadable: dict[str, str] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(distinct crops (M,112,112,3), pair_index (2N,), issame (N,), faceless paths): each
    image once, pair i being crops ``pair_index[2i]`` and ``pair_index[2i+1]``;
    ``checked``: the caller already ran check_pairs_exist. Images that cannot be read are an
    ImageReadError naming them, unless ``unreadable`` is given: they are added to it ({path:
    why}) and the pairs using them left out (N counts the others: :func:`readable_pairs`)."""
    lfw_dir = Path(lfw_dir)
    if not checked:
        check_pairs_exist(pairs, lfw_dir)
    paths = distinct_images(pairs)
    if aligner is None:
        # faces.aligner loads torch (~2 s), which lfw_eval.py --help does without
        from faces.aligner import FaceAligner

        aligner = FaceAligner()
    cache = None if cache_dir is None else \
        Path(cache_dir) / f"aligned_{_cache_key(lfw_dir, paths, aligner)}.npz"
    seen = cache is not None and cache.is_file()
    cached = _read_cache(cache, paths) if seen else None
    if cached is not None:
        (crops, faceless), bad = cached, {}
    else:
        crops, faceless, bad = _align_and_cache(lfw_dir, paths, aligner, cache, seen)
    if bad:
        named = first_few(list(bad.values()), MAX_NAMED, "; ")
        if unreadable is None:
            raise ImageReadError(f"{len(bad)} of {len(paths)} pair images cannot be read: "
                                 + named)
        unreadable.update(bad)
        pairs = readable_pairs(pairs, bad)
        log.warning("%d of %d pair images cannot be read; the pairs using them are left out: "
                    "%s", len(bad), len(paths), named)
    if faceless:
        shown = ", ".join(faceless[:10]) + (" ..." if len(faceless) > 10 else "")
        log.warning("no face found in %d of %d images (centre-cropped instead): %s",
                    len(faceless), len(paths), shown)
    position = {p: i for i, p in enumerate(paths)}
    index = np.array([position[p] for pair in pairs for p in (pair.path1, pair.path2)],
                     dtype=np.int64)
    issame = np.array([pair.same for pair in pairs], dtype=bool)
    return crops, index, issame, faceless


def distinct_images(pairs: Sequence[Pair]) -> list[str]:
    """Each image the pairs name, once, sorted: the order of load_lfw_crops' crops."""
    return sorted({p for pair in pairs for p in (pair.path1, pair.path2)})


def readable_pairs(pairs: Sequence[Pair], unreadable: Container[str]) -> list[Pair]:
    """The pairs neither of whose images is in ``unreadable``, in order."""
    return [p for p in pairs if p.path1 not in unreadable and p.path2 not in unreadable]


def load_lfw_pairs_images(lfw_dir: str | Path, pairs: Sequence[Pair], aligner=None,
                          cache_dir: str | Path | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Aligned crops (2N, 112, 112, 3) for ``pairs`` and their labels (N,). Every distinct
    image is aligned once (``align_faces.FaceAligner`` unless ``aligner`` is given) and the
    crops are cached in ``cache_dir`` (keyed by the file list, sizes, mtimes and the aligner's
    settings); images without a detected face are centre-cropped and reported."""
    crops, index, issame, _ = load_lfw_crops(lfw_dir, pairs, aligner, cache_dir)
    return crops[index], issame
