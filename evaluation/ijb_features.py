"""Image features of an IJB release: each loose crop aligned by its own five landmarks, then
embedded with its mirror, cached on disk in chunks.

The cache holds both raw (unnormalised) embeddings of every image, the image's and its
mirror's, so every InsightFace mode (N0/N1, D0/D1, F0/F1) is computed from it: ``F0`` needs
the image's embedding alone and ``N0`` the raw magnitudes. For IJB-C at 512-D that is
469,375 x 2 x 512 float32 = 1.9 GB, in chunk files of CHUNK_IMAGES images under
``<cache-dir>/<key>/``; the key hashes the checkpoint (its content), the network and
the image list with its landmarks, so another model or release never reads stale features.
Each chunk is written to a temporary beside it and renamed when whole: a killed run resumes
at the first missing chunk. The manifest records the checkpoint (path and sha256); a cache
of the same checkpoint path and release under another key (the checkpoint since retrained
or replaced: its old features can never be read again) is deleted
(:func:`prune_stale_caches`); one whose manifest predates that record is named, not deleted.
Reading and aligning (OpenCV, which releases the GIL) runs in a thread pool one chunk ahead
of the network.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from evaluation.ijb_release import IJBFormatError, Release
from evaluation.verification import embed
from faces.face_warp import warp_face
from utils import (
    CONFIG_FILE,
    FACE_CROP_SIZE,
    ImageReadError,
    ToolkitError,
    atomic_write_bytes,
    atomic_write_text,
    file_sha256,
    first_few,
    get_logger,
    read_image,
    remove_stale_temporaries,
)

CHUNK_IMAGES = 8192  # images per cache file (at 512-D: 32 MB)
CACHE_FORMAT = 1  # bump when the cached arrays change meaning
KEY_CHARS = 20
MANIFEST = "manifest.json"
_KEY_NAME = re.compile(f"[0-9a-f]{{{KEY_CHARS}}}")  # a cache folder's name: its key
# what a cache folder of ours holds: chunks, the manifest, a killed writer's temporaries
_CACHE_ENTRY = re.compile(r"chunk_\d{6}\.npy|manifest\.json|\.(chunk_\d{6}\.npy|"
                          r"manifest\.json)\..*\.tmp")
DEFAULT_WORKERS = 4  # threads reading and aligning crops
MAX_LISTED = 5  # missing images named in the error

log = get_logger("ijb_features")


def cache_key(release: Release, checkpoint: str | Path, network: str | None,
              embedding_size: int | None) -> str:
    """A hash of everything the cached features depend on: the checkpoint's content (its
    sha256: another model copied over it with the old time stamp is told apart) and the
    run's config.json beside it (which names the network), the flags that override it, and
    the images with their landmarks. Known without loading the model, so a run whose cache
    is complete never builds one."""
    checkpoint = Path(checkpoint)
    digest = hashlib.sha1(f"{CACHE_FORMAT}\n{file_sha256(checkpoint)}\n{network}\n"
                          f"{embedding_size}\n{release.crop_dir.resolve()}\n".encode())
    run_config = checkpoint.parent / CONFIG_FILE
    if run_config.is_file():
        digest.update(run_config.read_bytes())
    digest.update("\n".join(release.names).encode())
    digest.update(np.ascontiguousarray(release.landmarks, np.float32).tobytes())
    return digest.hexdigest()[:KEY_CHARS]


def _chunk_ok(path: Path, rows: int) -> bool:
    """Whether ``path`` holds a (rows, 2, E) float32 array (its header alone is read)."""
    try:
        chunk = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return chunk.dtype == np.float32 and chunk.ndim == 3 and chunk.shape[:2] == (rows, 2)


def missing_chunks(release: Release, folder: Path) -> list[int]:
    """Indices of the chunks not yet in ``folder``; a file of another shape (another chunk
    size, a damaged file) counts as missing and is made again."""
    total = len(release.names)
    return [i for i, s in enumerate(range(0, total, CHUNK_IMAGES))
            if not _chunk_ok(chunk_path(folder, i), min(CHUNK_IMAGES, total - s))]


def check_crops_exist(release: Release, chunks: list[int]) -> None:
    """Every loose crop of ``chunks`` must exist (checked before any work)."""
    missing = [n for i in chunks for n in release.names[i * CHUNK_IMAGES:(i + 1) * CHUNK_IMAGES]
               if not (release.crop_dir / n).is_file()]
    if missing:
        shown = ", ".join(missing[:MAX_LISTED])
        raise IJBFormatError(f"{release.crop_dir}: {len(missing)} images listed in "
                             f"face_tid_mid are missing: {shown}"
                             + (", ..." if len(missing) > MAX_LISTED else ""))


def chunk_path(folder: Path, index: int) -> Path:
    return folder / f"chunk_{index:06d}.npy"


def aligned_crop(path: Path, landmarks: np.ndarray) -> np.ndarray:
    """The 112x112 crop of the face whose five landmarks are given (no detection)."""
    return warp_face(read_image(path), landmarks, FACE_CROP_SIZE)


def _crop_or_error(path: Path, landmarks: np.ndarray) -> np.ndarray | ImageReadError:
    try:
        return aligned_crop(path, landmarks)
    except ImageReadError as e:
        return e


def load_crops(release: Release, start: int, stop: int, pool: ThreadPoolExecutor,
               unreadable: list[str] | None = None) -> np.ndarray:
    """Aligned crops of images [start, stop) (N, 112, 112, 3) uint8, read by ``pool``. A
    crop that cannot be read is its ImageReadError, unless ``unreadable`` is given: the
    error's message is appended to it and the crop left black."""
    paths = [release.crop_dir / n for n in release.names[start:stop]]
    crops = np.zeros((len(paths), FACE_CROP_SIZE, FACE_CROP_SIZE, 3), np.uint8)
    for i, crop in enumerate(pool.map(_crop_or_error, paths, release.landmarks[start:stop])):
        if isinstance(crop, ImageReadError):
            if unreadable is None:
                raise crop
            unreadable.append(str(crop))
        else:
            crops[i] = crop
    return crops


def embed_raw(model, crops: np.ndarray, batch_size: int, device) -> np.ndarray:
    """(N, 2, E) float32 raw embeddings of the crops and of their mirrors
    (``lfw_eval.embed`` with ``raw_pairs``: the same preprocessing and memory format)."""
    return embed(model, crops, batch_size=batch_size, device=device, progress=False,
                 raw_pairs=True)


def _save_chunk(path: Path, array: np.ndarray) -> None:
    """``array`` as a .npy file, written atomically (a killed run leaves no partial chunk)."""
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getbuffer())


class NonFiniteEmbeddingError(ToolkitError, ValueError):
    """A model whose embedding of an image holds NaN or inf (finite weights can overflow)."""


def _refuse_non_finite(feats: np.ndarray, release: Release, start: int) -> None:
    """NonFiniteEmbeddingError naming the first image (from ``start``) whose embedding or its
    mirror's holds NaN or inf: it would be cached and pool its templates into NaN scores."""
    broken = np.flatnonzero(~np.isfinite(feats.reshape(len(feats), -1)).all(axis=1))
    if broken.size:
        raise NonFiniteEmbeddingError(
            f"{release.crop_dir / release.names[start + int(broken[0])]}: the model gives a "
            f"non-finite (NaN/inf) embedding ({broken.size} of {len(feats)} images of this "
            "chunk); the model diverged or overflows; nothing of the chunk was cached")


def _our_cache_manifest(folder: Path, keep: Path) -> dict | None:
    """The manifest of ``folder`` when it is a cache of ours (key name, a manifest of our
    format, only our files) other than ``keep``; None for anything else."""
    if folder == keep or not folder.is_dir() or folder.is_symlink() \
            or not _KEY_NAME.fullmatch(folder.name):
        return None
    manifest = _read_manifest(folder / MANIFEST)
    try:
        entries = [p.name for p in folder.iterdir()]
    except OSError:
        return None
    ours = "format" in manifest and all(_CACHE_ENTRY.fullmatch(name) for name in entries)
    return manifest if ours else None


def _read_manifest(path: Path) -> dict:
    """The manifest at ``path``; {} when it is missing, unreadable or not a JSON object."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _same_release(manifest: dict, ijb_dir: str) -> bool:
    """Whether ``manifest`` was made for ``ijb_dir`` (resolved): caches made before the
    checkpoint was recorded hold the --ijb-dir as given, perhaps relative (to the cwd)."""
    recorded = manifest.get("ijb_dir")
    return isinstance(recorded, str) and (recorded == ijb_dir
                                          or str(Path(recorded).resolve()) == ijb_dir)


def prune_stale_caches(keep: Path, release: Release, checkpoint: str | Path) -> list[Path]:
    """Delete the caches beside ``keep`` made for the same checkpoint path and release under
    another key: that checkpoint's earlier content (retrained with --overwrite, replaced) or
    config, whose features are never read again. Only folders of ours (named by a key, a
    manifest recording that checkpoint, nothing but chunks) are touched; the caller holds the
    cache folder's lock. Caches of ours of this release whose manifest predates the recorded
    checkpoint may be another model's, still read: kept, and named in one line with how to
    delete them. Returns what was deleted (said in one line)."""
    if not keep.parent.is_dir():
        return []
    checkpoint, ijb_dir = str(Path(checkpoint).resolve()), str(release.root.resolve())
    ours = [(f, m) for f in sorted(keep.parent.iterdir())
            if (m := _our_cache_manifest(f, keep)) is not None]
    stale = [f for f, m in ours
             if m.get("checkpoint") == checkpoint and m.get("ijb_dir") == ijb_dir]
    for folder in stale:
        shutil.rmtree(folder)
    if stale:
        log.info("deleted %d stale feature cache(s) of %s (its earlier content or config): %s",
                 len(stale), checkpoint, ", ".join(f.name for f in stale))
    unknown = [str(f) for f, m in ours if "checkpoint" not in m and _same_release(m, ijb_dir)]
    if unknown:
        log.warning("kept %d feature cache(s) of %s made before caches recorded their "
                    "checkpoint (another model's, or stale: a cache records it when next read): "
                    "%s; delete them (rm -r) if no model of theirs is evaluated again",
                    len(unknown), ijb_dir, ", ".join(unknown))
    return stale


def cached_features(release: Release, folder: Path,
                    embed: Callable[[np.ndarray], np.ndarray] | None,
                    workers: int = DEFAULT_WORKERS, progress: bool = True,
                    checkpoint: str | Path | None = None) -> list[Path]:
    """Make every missing chunk of ``folder`` (``embed``: crops -> (n, 2, E); None when
    nothing is missing); return all chunk paths in image order. A loose crop that cannot be
    read leaves its chunk unmade; the other chunks are made, then an ImageReadError names
    every such crop (a rerun makes only those chunks). ``checkpoint``: recorded in the
    manifest (path and sha256), and the stale caches of it beside ``folder`` deleted."""
    folder.mkdir(parents=True, exist_ok=True)
    total = len(release.names)
    starts = list(range(0, total, CHUNK_IMAGES))
    paths = [chunk_path(folder, i) for i in range(len(starts))]
    missing = missing_chunks(release, folder)
    for p in paths:
        remove_stale_temporaries(folder, p.name)
    manifest = folder / MANIFEST
    source = {} if checkpoint is None else {
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_sha256": file_sha256(checkpoint)}
    # a manifest made before the checkpoint was recorded gets it: the key is its content
    if not manifest.is_file() or (source and "checkpoint" not in _read_manifest(manifest)):
        atomic_write_text(manifest, json.dumps({"format": CACHE_FORMAT, "images": total,
                                                "chunk_images": CHUNK_IMAGES,
                                                "ijb_dir": str(release.root.resolve()),
                                                **source}, indent=2) + "\n")
    if checkpoint is not None:
        prune_stale_caches(folder, release, checkpoint)
    if missing:
        log.info("embedding %d of %d chunks into %s", len(missing), len(paths), folder)
    # One thread prepares the next chunk (with ``workers`` threads reading and aligning its
    # images) while this one embeds the current chunk.
    with ThreadPoolExecutor(1) as ahead, ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(missing), unit="chunk", disable=not progress, leave=False) as bar:
        failed: dict[int, list[str]] = {}  # chunk -> its crops that cannot be read

        def submit(i: int) -> Future:
            s = starts[i]
            failed[i] = []
            return ahead.submit(load_crops, release, s, min(s + CHUNK_IMAGES, total), pool,
                                failed[i])

        pending = submit(missing[0]) if missing else None
        for k, i in enumerate(missing):
            crops = pending.result()
            pending = submit(missing[k + 1]) if k + 1 < len(missing) else None
            if not failed[i]:
                feats = embed(crops)
                _refuse_non_finite(feats, release, starts[i])
                _save_chunk(paths[i], feats)
            bar.update(1)
    unreadable = [e for i in missing for e in failed[i]]
    if unreadable:
        raise ImageReadError(f"{release.crop_dir}: {len(unreadable)} loose crops cannot be "
                             "read (the features of the others are cached): "
                             + first_few(unreadable, MAX_LISTED, "; "))
    return paths


def iter_chunks(paths: list[Path]) -> Iterator[np.ndarray]:
    for p in paths:
        yield np.load(p, mmap_mode="r")


def mode_features(paths: list[Path], flip: bool, total: int) -> np.ndarray:
    """(N, E) float32 per-image input features: raw + mirror (``flip``) or raw alone, read
    chunk by chunk into one array (the whole cache is never in memory at once). A non-finite
    feature (a cache made before such embeddings were refused) is a
    NonFiniteEmbeddingError naming its chunk and image."""
    out = None
    s = 0
    for path, chunk in zip(paths, iter_chunks(paths), strict=True):
        if out is None:
            out = np.empty((total, chunk.shape[2]), np.float32)
        n = chunk.shape[0]
        if flip:
            np.add(chunk[:, 0], chunk[:, 1], out=out[s:s + n])
        else:
            out[s:s + n] = chunk[:, 0]
        broken = np.flatnonzero(~np.isfinite(out[s:s + n]).all(axis=1))
        if broken.size:
            raise NonFiniteEmbeddingError(
                f"{path}: image {s + int(broken[0]) + 1} of the release (and {broken.size - 1} "
                "more in this chunk) has a non-finite (NaN/inf) cached feature, from before "
                f"such embeddings were refused; delete {path.parent} and run again")
        s += n
    if out is None or s != total:
        raise ValueError(f"feature cache holds {s} images, expected {total}")
    return out
