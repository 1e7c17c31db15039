"""Many image files read and aligned by worker threads: :func:`align_files`, one
:class:`FileCrop` per path, in order.

Each worker reads a chunk of files (big JPEGs decoded reduced for the aligner's search,
reduced_photo) and aligns it (align_faces.FaceAligner, or anything with ``align_batch``);
decoding and MTCNN release the GIL, so on a CPU the workers' chunks run side by side
(figures: DEFAULT_WORKERS). align_faces.align_tree, lfw_eval and megaface use it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from faces.face_warp import TEMPLATE_SIZE, center_crop, center_square_side
from faces.reduced_photo import Photo, read_photo
from utils import ImageReadError, read_image

# align_files' threads, each reading and aligning its own chunk of files: with two, one chunk
# is decoded while another is searched, and on a CPU two MTCNN searches run at once (torch
# and OpenCV release the GIL): on 2 cores at 512 px, 49 photos/s against 30 with one worker
# (bench README). Each worker's torch ops use torch's own thread count (align_faces.main
# shares it out).
DEFAULT_WORKERS = 2


def read_image_or_error(path: Path) -> np.ndarray | ImageReadError:
    """The RGB image at ``path``, or the ImageReadError saying why it cannot be read."""
    try:
        return read_image(path)
    except ImageReadError as e:
        return e


@dataclass
class FileCrop:
    """One image file as :func:`align_files` leaves it."""

    path: Path
    crop: np.ndarray | None  # the aligned face, its centre crop when faceless; None: unreadable
    face: Any  # align_faces.AlignedFace; None when no face was found or the file is unreadable
    hint: Sequence[float] | None = None  # the face box hint_for gave
    error: ImageReadError | None = None  # why the file could not be read


def _faceless_crop(photo: Photo, size: int) -> np.ndarray:
    """center_crop of a photo without a face: from the reduced decode it was searched on when
    the square there is at least ``size`` (no second decode, pixels already block averages),
    else from the full size."""
    if center_square_side(photo.image.shape) >= size:
        return center_crop(photo.image, size)
    return center_crop(photo.full_image(), size)


def _in_order(pool: ThreadPoolExecutor, work: Callable[[Any], Any], items: Sequence[Any],
              ahead: int) -> Iterator[Any]:
    """``work(item)`` for each of ``items`` on ``pool``, results in order, at most ``ahead``
    items submitted beyond the one being waited for (what bounds the memory held)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(work, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def align_files(aligner: Any, paths: Sequence[Path], batch_size: int,
                hint_for: Callable[[Path], Sequence[float] | None] | None = None,
                size: int = TEMPLATE_SIZE, num_workers: int = DEFAULT_WORKERS,
                desc: str = "align", progress: bool = True,
                leave: bool = True) -> Iterator[FileCrop]:
    """Read and align image files ``batch_size`` at a time: one FileCrop per path, in order.

    A faceless image gets its :func:`center_crop`; an unreadable file is no error here (its
    FileCrop carries the ImageReadError). ``hint_for(path)``, asked for readable files only,
    gives ``align_batch``'s per-image ``hint_box``. ``num_workers`` threads each read and
    align a chunk of ``batch_size`` files at a time (see DEFAULT_WORKERS); a tqdm bar counts
    the files. An aligner with ``align_photos`` (FaceAligner) gets big JPEGs decoded reduced
    for its ``detect_size`` (:func:`read_photo`); others get full-size images through
    ``align_batch``."""
    takes_photos = hasattr(aligner, "align_photos")
    read = partial(read_photo, detect_size=aligner.detect_size if takes_photos else 0)

    def align_chunk(chunk: Sequence[Path]) -> list[FileCrop]:
        loaded = [read(p) for p in chunk]
        photos = [im for im in loaded if isinstance(im, Photo)]
        hints = [None] * len(photos) if hint_for is None else \
            [hint_for(p) for p, im in zip(chunk, loaded, strict=True) if isinstance(im, Photo)]
        given = {} if hint_for is None else {"hint_box": hints}  # hints only when any
        if not photos:
            faces = []
        elif takes_photos:
            faces = aligner.align_photos(photos, **given)
        else:
            faces = aligner.align_batch([p.image for p in photos], **given)
        done = iter(zip(faces, hints, strict=True))
        out = []
        for path, photo in zip(chunk, loaded, strict=True):
            if not isinstance(photo, Photo):
                out.append(FileCrop(path, None, None, error=photo))
                continue
            face, hint = next(done)
            crop = _faceless_crop(photo, size) if face is None else face.crop
            out.append(FileCrop(path, crop, face, hint))
        return out

    batch_size, workers = max(1, batch_size), max(1, num_workers)
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    pool = ThreadPoolExecutor(workers)
    try:
        with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress,
                  leave=leave) as bar:
            for crops in _in_order(pool, align_chunk, chunks, ahead=workers):
                yield from crops
                bar.update(len(crops))
    finally:  # an error or a caller that stopped early: no chunk starts after this
        pool.shutdown(cancel_futures=True)
