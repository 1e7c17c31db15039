"""The photos identify.py enrols and searches: ``<root>/<identity>/...`` trees and query
folders listed, faces aligned (the central face, as align_faces crops it, or every face a
photo shows), and the contact sheet of query faces beside their matches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from faces.face_warp import warp_face
from faces.file_alignment import align_files
from faces.mtcnn_cascade import zero_based
from utils import ImageReadError, ToolkitError, list_images, read_image

SHEET_TILE_INCHES = 1.6  # one face of the contact sheet
SHEET_ROW_HEIGHT = 1.3  # a row's height over a tile's width: room for the two-line titles
SHEET_TITLE_POINTS = 7  # small enough for a name and a score over a 1.6-inch tile


class PhotosError(ToolkitError, ValueError):
    """A photos folder that cannot be enrolled or searched; the message names it."""


@dataclass
class Face:
    """One aligned face of a photo: its box in the photo's pixels and its crop."""

    box: list[float]  # x1, y1, x2, y2
    crop: np.ndarray  # uint8 (112, 112, 3) RGB


@dataclass
class PhotoFaces:
    """A photo as aligned: its faces (none when no face was found), or why it is unreadable."""

    path: Path
    faces: list[Face]
    error: ImageReadError | None = None


def enrolment_photos(root: str | Path, flag: str = "--photos") -> list[tuple[str, Path]]:
    """(identity, photo) for every photo under ``root/<identity>/`` (any depth), sorted;
    PhotosError when ``root`` is no folder or holds no photo in an identity folder."""
    root = Path(root)
    if not root.is_dir():
        raise PhotosError(f"{flag} {root}: not a folder of <identity>/<photo> files")
    found = [(p.relative_to(root).parts[0], p) for p in list_images(root)
             if len(p.relative_to(root).parts) > 1]
    if not found:
        raise PhotosError(f"{flag} {root}: no photos in identity folders "
                          "(<identity>/<photo>.jpg)")
    return found


def query_photos(source: str | Path, flag: str = "--photos") -> list[Path]:
    """The photos to search: ``source`` itself when a file, else every photo under it;
    PhotosError when there are none."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise PhotosError(f"{flag} {source}: no such photo or folder")
    photos = list_images(source)
    if not photos:
        raise PhotosError(f"{flag} {source}: holds no photos")
    return photos


def central_faces(aligner: Any, paths: Sequence[Path], batch_size: int,
                  progress: bool = True) -> Iterator[PhotoFaces]:
    """Each photo's central face (align_faces' rule), in order, read and aligned by worker
    threads (faces.file_alignment)."""
    for fc in align_files(aligner, paths, batch_size, progress=progress, desc="align"):
        faces = [] if fc.face is None else [Face([float(v) for v in fc.face.box], fc.crop)]
        yield PhotoFaces(fc.path, faces, fc.error)


def every_face(aligner: Any, paths: Sequence[Path], progress: bool = True) -> Iterator[PhotoFaces]:
    """Each photo's faces, every one MTCNN detects, in order."""
    for path in tqdm(paths, desc="detect", unit="photo", disable=not progress):
        try:
            image = read_image(path)
        except ImageReadError as e:
            yield PhotoFaces(path, [], e)
            continue
        # 0-based, as the template and align()'s faces
        boxes, _, landmarks = zero_based(aligner.detect(image))
        yield PhotoFaces(path, [Face([float(v) for v in box[:4]],
                                     warp_face(image, points, aligner.size))
                                for box, points in zip(boxes, landmarks, strict=True)])


def contact_sheet(rows: Sequence[tuple[str, np.ndarray, list[tuple[str, float, Any]]]],
                  path: str | Path, threshold: float | None) -> Path:
    """A PNG: one row per query face (its label and crop), then its matches, each shown by
    its best enrolled image (an RGB crop, or None when that photo cannot be shown) with
    identity and score; matches at or below ``threshold`` are titled in grey."""
    from matplotlib.figure import Figure  # matplotlib (~0.5 s) loads only to plot

    from evaluation.verification_plots import save_figure  # loads matplotlib: as above

    cols = 1 + max((len(matches) for _, _, matches in rows), default=0)
    fig = Figure(figsize=(SHEET_TILE_INCHES * cols,
                          SHEET_TILE_INCHES * SHEET_ROW_HEIGHT * max(1, len(rows))))
    for r, (label, crop, matches) in enumerate(rows):
        tiles = [(label, crop, "black")] + [
            (f"{name}\n{score:.3f}", image,
             "grey" if threshold is not None and score <= threshold else "black")
            for name, score, image in matches]
        for c, (title, image, colour) in enumerate(tiles):
            ax = fig.add_subplot(max(1, len(rows)), cols, r * cols + c + 1)
            ax.set_axis_off()
            if image is not None:
                ax.imshow(image)
            ax.set_title(title, fontsize=SHEET_TITLE_POINTS, color=colour)
    fig.tight_layout()
    return save_figure(fig, path)  # through a temporary and a rename
