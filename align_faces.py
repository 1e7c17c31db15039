"""Face detection (MTCNN) and 5-point similarity alignment to ArcFace's 112x112 template.

Usage as a script mirrors a tree of photos ``SRC_DIR/identity/image.jpg`` into aligned
112x112 crops ``DST_DIR/identity/image.jpg``::

    python align_faces.py data/casia_raw data/casia_aligned [--skip-missing]
                          [--detect-size 512] [--workers 2]

MTCNN searches each photo on a copy whose longer side is at most ``--detect-size`` pixels
(0: full size; DEFAULT_DETECT_SIZE says what that costs and saves). A JPEG at least twice
that size is decoded at 1/2-1/8 (reduced_photo) and its crop warped from that decode unless
the face is too small there (MIN_REDUCED_EYE_RATIO). Photos are read upright by EXIF.

As a library::

    aligner = FaceAligner()                      # MTCNN, CUDA when present
    face = aligner.align(rgb_image)              # AlignedFace or None
    crop = face_warp.warp_face(rgb_image, five_points)  # when the landmarks are known

Detection uses facenet-pytorch's MTCNN, whose weights ship inside its wheel (nothing is
downloaded). Every image in and out is RGB uint8 HxWx3 (the repo's colour contract).
Landmarks are (5, 2) float arrays of (x, y) pixel coordinates in the order left eye, right
eye, nose tip, left mouth corner, right mouth corner, where "left" means the image's left
(InsightFace's and MTCNN's convention).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

import mtcnn_cascade
from face_warp import TEMPLATE_SIZE, check_rgb, template_for_size, warp_face
from file_alignment import DEFAULT_WORKERS, align_files
from mtcnn_cascade import Detections, map_detections, map_from_copy, no_faces
from reduced_photo import Photo
from utils import (
    IMAGE_EXTENSIONS,
    DeviceError,
    OutputKind,
    ToolkitError,
    add_debug_flag,
    atomic_write_text,
    claim_output,
    describe_error,
    get_device,
    get_logger,
    int_at_least,
    list_images,
    run_cli,
    write_image,
)

DEFAULT_MIN_FACE_SIZE = 40  # pixels; MTCNN's smallest searched face (its own default is 20)
# MTCNN sees a copy of each photo scaled so its longer side is at most this (0: full size);
# boxes and landmarks are mapped back to full-size pixels (see MIN_REDUCED_EYE_RATIO). MTCNN's
# cost grows with the pixels it searches (its pyramid starts at 12 / min_face_size of the
# image). On 13 real 2-2.5k px photos (2-core CPU, 1 torch thread, 2 workers; bench README)
# align_files did 49 photos/s at 512, 40 at 640 and 12 at full size (5.2 with facenet-
# pytorch's driver); at 512 the photos are decoded at 1/4 (at 640 at 1/2), and the landmarks
# were 1.8% of the eye distance from the full-size search's on average (1.5% at 640; the
# full-size search moved them 1.0% for a 2 px shift). min_face_size counts pixels of the copy, so a
# photo scaled by s finds faces down to min_face_size / s pixels: 1/12.8 of the longer side
# at the defaults (156 px in a 2000 px photo, 234 px in 3000 px), below the face of a
# portrait (370-740 px in those photos). Small faces in big group photos need a larger
# --detect-size or 0. Searching below ~20 px on the copy instead would spend what the
# downscale saves.
DEFAULT_DETECT_SIZE = 512
# A big JPEG is decoded at 1/2, 1/4 or 1/8 (libjpeg's DCT scaling; the largest that keeps the
# longer side >= the detect size, see read_photo), searched there, and its crop is warped from
# that reduced decode when the face's eye distance there is at least this many times the
# template's (35.2 px at 112): the warp then only shrinks an image whose pixels are block
# averages of the photo's, and loses none of the detail a crop can hold. Smaller faces are
# warped from a full-size decode. On 13 real 2-2.5k px photos decoded at 1/2-1/8 (bench
# README), against a reference crop warped at 8x and area-averaged, crops from a reduced
# decode were off by 1.2-1.7 grey levels on average at ratios 1-3 and 3.2 above (the
# bilinear warp's own aliasing), those from the full photo by 4.2-4.6 (it shrinks 5-10x);
# below ratio 0.75 the reduced crops were worse (4.4 against 2.2).
MIN_REDUCED_EYE_RATIO = 1.0
DEFAULT_THRESHOLDS = (0.6, 0.7, 0.7)  # P-, R- and O-net score thresholds (MTCNN's defaults)
# Who drives MTCNN's three networks: "opencv", mtcnn_cascade's, one image at a time with
# OpenCV resampling (the default on a CPU: 1.5x faster at 512 px, 2.4x at full size;
# bench README), or "facenet", facenet-pytorch's batched torch driver (the default
# elsewhere: it keeps a batch of equal-size images on the device; no GPU figure yet).
CASCADES = ("opencv", "facenet")
# The O-net re-estimates each face's box and landmarks this many times from its own last box
# (mtcnn_cascade.refine; 0: MTCNN's landmarks as published). On 64 real photos at 512 px,
# 2 steps made the landmarks of a rotated and scaled copy 28% nearer the rotated originals
# (crops 24% nearer), a 2 px shift move them 1.8% of the eye distance instead of 2.9%; more
# steps gained little (4: 3.5% against 3.4% for the rotations). Cost: 2 O-net passes a face,
# 1.3-2.6 ms a photo (49 against 54 photos/s at 512 px on 2 cores; bench README). The
# landmarks are the mean of MTCNN's and the steps' (LANDMARK_RULE 2): nearer human
# annotations than either (bench/landmark_accuracy.py).
DEFAULT_REFINE_STEPS = 2
# What the landmarks of given settings mean, for caches keyed by the settings (lfw_images):
# 1 the last refine step's, 2 the mean of MTCNN's and every step's.
LANDMARK_RULE = 2
DEFAULT_BATCH_SIZE = 32
CENTRE_OFFSET_WEIGHT = 2.0  # InsightFace's weight on the squared centre offset
# The central-face rule only weighs detections whose O-net score is at least this when the
# photo has any: a doubtful one must not win over confident faces by being nearer the
# centre (a hand scored 0.75 near the middle of a group photo had been cropped instead of
# six real faces scored >= 0.99). MTCNN keeps detections from 0.7 (its O-net threshold); the
# 19 human-annotated faces of bench/landmark_accuracy.py scored 0.954 (a 33 px grey photo),
# 0.978, and >= 0.99 the rest. A photo whose detections are all below it is judged among
# all of them, as before.
CONFIDENT_FACE_SCORE = 0.9
REPORT_NAME = "align_report.tsv"  # default report file, inside DST_DIR
STATUS_NO_FACE = "no_face"
STATUS_UNREADABLE = "unreadable"
STATUS_NOT_WRITTEN = "not_written"  # the crop's file could not be made (the others were)
# errors of the whole destination, not of one file's name: the run stops at the first
WHOLE_DESTINATION_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
STATUS_ALIGNED = "aligned"  # only written to clear an earlier entry of the same file
REPORT_SNIFF_BYTES = 1 << 16  # the head of an existing --report read to tell it is one

log = get_logger("align")


class AlignInputError(ToolkitError, ValueError):
    """A source or destination folder align_tree cannot use; the message names it."""

    exit_code = 2


# ----------------------------------------------------------------------------- geometry

def select_central_face(boxes: np.ndarray, image_shape: Sequence[int],
                        scores: Sequence[float] | None = None) -> int:
    """Index of the detection a face dataset means when a photo shows several faces.

    InsightFace's rule: score_i = area_i - 2 * ||centre_i - image_centre||^2, with
    area = (x2 - x1) * (y2 - y1), centre_i the box centre and image_centre (W / 2, H / 2);
    the largest score wins, so a big face near the middle beats a bigger one at the edge.
    With the detector's ``scores`` (N,), only the detections scored at least
    CONFIDENT_FACE_SCORE compete when there is one. ``boxes`` is (N, 4+) as
    (x1, y1, x2, y2, ...); ``image_shape`` is (H, W[, C]).
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] < 4 or len(boxes) == 0:
        raise ValueError(f"expected a non-empty (N, 4) array of boxes, got shape {boxes.shape}")
    height, width = image_shape[0], image_shape[1]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    dx = (boxes[:, 0] + boxes[:, 2]) / 2 - width / 2
    dy = (boxes[:, 1] + boxes[:, 3]) / 2 - height / 2
    rule = area - CENTRE_OFFSET_WEIGHT * (dx ** 2 + dy ** 2)
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.shape != (len(boxes),):
            raise ValueError(f"expected one score per box ({len(boxes)}), got {scores.shape}")
        confident = scores >= CONFIDENT_FACE_SCORE
        if confident.any():
            rule = np.where(confident, rule, -np.inf)
    return int(np.argmax(rule))


def box_iou(boxes: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """Intersection over union of each of ``boxes`` (N, 4) with one ``box`` (x1, y1, x2, y2)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = (float(v) for v in box)
    iw = np.clip(np.minimum(boxes[:, 2], x2) - np.maximum(boxes[:, 0], x1), 0, None)
    ih = np.clip(np.minimum(boxes[:, 3], y2) - np.maximum(boxes[:, 1], y1), 0, None)
    inter = iw * ih
    union = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
             + (x2 - x1) * (y2 - y1) - inter)
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


# ----------------------------------------------------------------------------- detector

@dataclass
class AlignedFace:
    """One aligned face: the crop and where it came from in the original image."""

    crop: np.ndarray  # uint8 (size, size, 3) RGB
    box: np.ndarray  # float (4,) x1, y1, x2, y2 in the original image
    landmarks: np.ndarray  # float (5, 2) (x, y) in the original image
    score: float  # MTCNN's face probability


def detection_scale(shape: Sequence[int], detect_size: int) -> float:
    """The factor (<= 1) that brings an image of ``shape`` (H, W[, C]) to a longer side of at
    most ``detect_size`` pixels; 1 when it is already that small or ``detect_size`` is 0."""
    longest = max(shape[0], shape[1])
    return 1.0 if detect_size <= 0 or longest <= detect_size else detect_size / longest



class FaceAligner:
    """MTCNN detection + similarity alignment, batched over images of one size.

    ``device=None`` picks CUDA when present. ``min_face_size`` (pixels of the image MTCNN
    sees) bounds the smallest face searched: larger is faster. ``detect_size``: MTCNN sees a
    copy with the longer side at most this many pixels (0: the full image); results are in
    the full image's pixels and the crop is warped from it (see DEFAULT_DETECT_SIZE for the
    trade-off). ``batch_size`` images of equal size go through MTCNN together (with
    ``cascade="facenet"``; see CASCADES: None picks mtcnn_cascade's driver on a CPU).
    ``refine_steps``: DEFAULT_REFINE_STEPS.
    """

    def __init__(self, device: Any = None, min_face_size: int = DEFAULT_MIN_FACE_SIZE,
                 thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                 batch_size: int = DEFAULT_BATCH_SIZE, size: int = TEMPLATE_SIZE,
                 detect_size: int = DEFAULT_DETECT_SIZE, cascade: str | None = None,
                 refine_steps: int = DEFAULT_REFINE_STEPS) -> None:
        import torch
        from facenet_pytorch import MTCNN

        from utils import get_device

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if detect_size < 0:
            raise ValueError(f"detect_size must be >= 0 (0: full size), got {detect_size}")
        self.detect_size = int(detect_size)
        self.device = get_device("auto" if device is None else str(device))
        self.min_face_size = int(min_face_size)
        self.batch_size = int(batch_size)
        self.size = int(size)
        self.thresholds = tuple(float(t) for t in thresholds)
        if refine_steps < 0:
            raise ValueError(f"refine_steps must be >= 0 (0: MTCNN's own landmarks), got "
                             f"{refine_steps}")
        self.refine_steps = int(refine_steps)
        self.landmark_rule = LANDMARK_RULE
        if cascade is None:
            cascade = "opencv" if self.device.type == "cpu" else "facenet"
        if cascade not in CASCADES:
            raise ValueError(f"cascade must be one of {', '.join(CASCADES)}, got {cascade!r}")
        self.cascade = cascade
        # keep_all: we choose among the faces ourselves (central rule or hint box).
        self._mtcnn = MTCNN(min_face_size=self.min_face_size, thresholds=list(thresholds),
                            keep_all=True, select_largest=False, device=self.device)
        self._mtcnn.eval()
        # channels_last roughly halves MTCNN's CPU time (its max-pool and conv kernels) with
        # the same outputs (measured: 21 -> 12 ms of CPU per 250x250 JPEG photo, one thread).
        self._mtcnn.to(memory_format=torch.channels_last)
        self._torch = torch

    # -- detection
    def _detect_stack(self, stack: np.ndarray) -> list[Detections]:
        """MTCNN on an (N, H, W, 3) uint8 stack of equal-size images, its landmarks refined
        ``refine_steps`` times (mtcnn_cascade.refine)."""
        found = self._cascade(stack)
        if self.refine_steps:
            with self._torch.inference_mode():
                for k, (image, (boxes, probs, points)) in enumerate(zip(stack, found,
                                                                        strict=True)):
                    if len(boxes):
                        boxes, points = mtcnn_cascade.refine(self._mtcnn.onet, image, boxes,
                                                             points, self.refine_steps)
                        found[k] = boxes, probs, points
        return found

    def _cascade(self, stack: np.ndarray) -> list[Detections]:
        """MTCNN's three stages on an (N, H, W, 3) uint8 stack of equal-size images."""
        if min(stack.shape[1:3]) < self.min_face_size:
            return [no_faces() for _ in range(len(stack))]  # MTCNN has no scale to try
        if self.cascade == "opencv":
            nets = self._mtcnn.pnet, self._mtcnn.rnet, self._mtcnn.onet
            with self._torch.inference_mode():
                return [mtcnn_cascade.detect(*nets, image, self.min_face_size, self.thresholds)
                        for image in stack]
        try:
            with self._torch.inference_mode():
                boxes, probs, points = self._mtcnn.detect(stack, landmarks=True)
        except (RuntimeError, ValueError) as e:  # e.g. a stage left with no candidate
            if len(stack) > 1:
                return [d for img in stack for d in self._cascade(img[None])]
            log.warning("MTCNN failed on an image (%s); treating it as faceless", e)
            return [no_faces()]
        out = []
        for b, p, lm in zip(boxes, probs, points, strict=True):
            if b is None:
                out.append(no_faces())
            else:  # MTCNN returns object arrays
                out.append((np.asarray(b).astype(float).reshape(-1, 4),
                            np.asarray(p).astype(float).reshape(-1),
                            np.asarray(lm).astype(float).reshape(-1, 5, 2)))
        return out

    def _detect_scaled(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """MTCNN on equal-size images, through copies bounded by ``detect_size``; the results
        in the given images' pixels."""
        shape = images[0].shape
        scale = detection_scale(shape, self.detect_size)
        if scale == 1.0:
            return self._detect_stack(np.stack(images))
        copy_wh = (max(1, round(shape[1] * scale)), max(1, round(shape[0] * scale)))
        # INTER_AREA averages the pixels each copy pixel covers: no aliasing on big shrinks.
        stack = np.stack([cv2.resize(im, copy_wh, interpolation=cv2.INTER_AREA)
                          for im in images])
        return [map_from_copy(d, shape, stack.shape[1:]) for d in self._detect_stack(stack)]

    def detect(self, image: np.ndarray) -> Detections:
        """All faces in an RGB image: boxes (N, 4) x1 y1 x2 y2, probabilities (N,),
        landmarks (N, 5, 2), in the image's pixels; N may be 0."""
        image = check_rgb(image)
        return self._detect_scaled([image])[0]

    # -- alignment
    def _choose(self, detections: Detections, photo: Photo,
                hint_box: Sequence[float] | None) -> AlignedFace | None:
        """The face to crop among ``detections`` (in ``photo.image``'s pixels), its crop, box
        and landmarks in the full-size photo's pixels."""
        if len(detections[0]) == 0:
            return None
        boxes, probs, points = map_detections(detections, photo.to_full)
        if hint_box is None:
            k = select_central_face(boxes, photo.full_shape, probs)
        else:
            iou = box_iou(boxes, hint_box)
            k = int(np.argmax(iou))
            if iou[k] <= 0:
                return None  # no detection overlaps the given box
        return AlignedFace(crop=self._warp(photo, points[k]), box=boxes[k].copy(),
                           landmarks=points[k].copy(), score=float(probs[k]))

    def _warp(self, photo: Photo, landmarks: np.ndarray) -> np.ndarray:
        """The crop for full-size ``landmarks``, warped from the most reduced decode of the
        photo (the one searched, 1/2 of it, ... full size) where the face's eye distance is
        at least MIN_REDUCED_EYE_RATIO x the template's. Every decode's crop samples the same
        points of the photo."""
        template = template_for_size(self.size)
        needed = MIN_REDUCED_EYE_RATIO * np.linalg.norm(template[1] - template[0])
        eye = np.linalg.norm(landmarks[1] - landmarks[0])  # in full-size pixels
        reduce = photo.reduce
        while reduce > 1 and eye / reduce < needed:
            reduce //= 2
        source = photo.decoded_at(reduce)
        return warp_face(source.image, source.to_reduced(landmarks), self.size)

    def align(self, image: np.ndarray,
              hint_box: Sequence[float] | None = None) -> AlignedFace | None:
        """The aligned face of an RGB image, or None when MTCNN finds none.

        Several faces: the central one (:func:`select_central_face`), or with ``hint_box``
        (x1, y1, x2, y2) the detection overlapping it most (None when none overlaps)."""
        return self.align_batch([image], hint_box=None if hint_box is None else [hint_box])[0]

    def align_batch(self, images: Sequence[np.ndarray],
                    hint_box: Sequence[float] | Sequence[Sequence[float] | None] | None = None,
                    ) -> list[AlignedFace | None]:
        """:meth:`align` for many images; equal-size images are detected in batches.

        ``hint_box``: None, one box for every image, or one box (or None) per image."""
        return self.align_photos([Photo(check_rgb(im)) for im in images], hint_box)

    def align_photos(self, photos: Sequence[Photo],
                     hint_box: Sequence[float] | Sequence[Sequence[float] | None] | None = None,
                     ) -> list[AlignedFace | None]:
        """:meth:`align_batch` for photos that may be decoded reduced (:func:`read_photo`):
        each is searched at its decoded size (bounded by ``detect_size``); boxes, landmarks
        and ``hint_box`` are in full-size pixels."""
        hints = _per_image_hints(hint_box, len(photos))
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, photo in enumerate(photos):
            by_shape.setdefault(check_rgb(photo.image).shape, []).append(i)
        results: list[AlignedFace | None] = [None] * len(photos)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                found = self._detect_scaled([photos[i].image for i in chunk])
                for i, det in zip(chunk, found, strict=True):
                    results[i] = self._choose(det, photos[i], hints[i])
        return results


def _per_image_hints(hint_box: Any, count: int) -> list[Sequence[float] | None]:
    if hint_box is None:
        return [None] * count
    if len(hint_box) == 4 and all(np.isscalar(v) for v in hint_box):
        return [hint_box] * count  # a single box for all images
    if len(hint_box) != count:
        raise ValueError(f"hint_box: expected one box per image ({count}), got {len(hint_box)}")
    return list(hint_box)


# ----------------------------------------------------------------------------- tree

def _report_text(text: str) -> str:
    """``text`` (a path relative to the source, or an error naming a file) as the report's
    UTF-8 holds it: the bytes of a file name that is not UTF-8 are written ``\\xNN``, as
    Python shows them (the report would otherwise be cut at that name)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _read_report(path: Path) -> dict[str, tuple[str, str]]:
    """relative path -> (status, detail); later lines win (the file is appended to).

    A run killed while appending can cut a line inside a multi-byte UTF-8 name: such bytes
    are replaced (with a warning naming the file), and the garbled entry, whose path is in
    no source, is dropped when align_tree rewrites the report."""
    entries: dict[str, tuple[str, str]] = {}
    if path.is_file():
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            log.warning("%s: not valid UTF-8 at byte %d (cut by a killed run?); the "
                        "unreadable entry is dropped", path, e.start)
            text = raw.decode("utf-8", errors="replace")
        for line in text.splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            if parts[0] == STATUS_ALIGNED:
                entries.pop(parts[1], None)
            elif parts[0] in (STATUS_NO_FACE, STATUS_UNREADABLE, STATUS_NOT_WRITTEN):
                entries[parts[1]] = (parts[0], parts[2] if len(parts) > 2 else "")
    return entries


def _write_crop(path: Path, crop: np.ndarray) -> str | None:
    """Write one crop; None, or why this file could not be written (a name or character
    the destination's filesystem refuses, a file where its folder should be). A full or
    read-only disk concerns every file: raised."""
    try:
        write_image(path, crop)
    except OSError as e:
        if e.errno in WHOLE_DESTINATION_ERRORS:
            raise
        return describe_error(e)
    return None


def _is_report(path: Path) -> bool:
    """Whether ``path`` is empty or a report: every line ``status<TAB>...`` (the last one may
    be cut short, by a killed run or by the bytes read here)."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(REPORT_SNIFF_BYTES)
    *lines, last = head.split(b"\n")
    starts = [f"{status}\t".encode() for status in
              (STATUS_NO_FACE, STATUS_UNREADABLE, STATUS_ALIGNED,
               STATUS_NOT_WRITTEN)]
    return all(line.startswith(tuple(starts)) for line in lines) and \
        any(last.startswith(s) or s.startswith(last) for s in starts)


REPORT_KIND = OutputKind("an alignment report", _is_report)


def align_tree(src_dir: str | Path, dst_dir: str | Path, **options: Any) -> dict[str, Any]:
    """:func:`_align_tree` (its options by name) as the one writer of ``dst_dir``, whose
    report is an alignment report (or new) and which is none of the source's files.
    Refused before any work (:func:`utils.claim_output`)."""
    report_path = options.get("report_path")
    report = Path(report_path) if report_path is not None else Path(dst_dir) / REPORT_NAME
    # DST_DIR (and so the default report) inside the source is _align_tree's first check
    inputs = {"the source": src_dir} if report_path is not None else {}
    with claim_output(dst_dir, "DST_DIR"), \
            claim_output(report, "--report", inputs, REPORT_KIND, lock=False):
        return _align_tree(src_dir, dst_dir, **options)


def _align_tree(src_dir: str | Path, dst_dir: str | Path, skip_missing: bool = False,
               batch_size: int = DEFAULT_BATCH_SIZE,
               min_face_size: int = DEFAULT_MIN_FACE_SIZE,
               report_path: str | Path | None = None, progress: bool = True,
               device: Any = None, aligner: FaceAligner | None = None,
               detect_size: int = DEFAULT_DETECT_SIZE, num_workers: int = DEFAULT_WORKERS,
               refine_steps: int = DEFAULT_REFINE_STEPS) -> dict[str, Any]:
    """Align every image under ``src_dir`` into the same relative path under ``dst_dir``.

    Resumable: an output that exists is skipped. A faceless image is centre-cropped
    (:func:`center_crop`) or, with ``skip_missing``, not written; either way it is listed in
    the report (``DST_DIR/align_report.tsv`` unless ``report_path``), one line
    ``status<TAB>relative path<TAB>detail``, as is every unreadable file. The report keeps
    what earlier runs found. Returns the summary printed at the end.
    """

    src, dst = Path(src_dir).resolve(), Path(dst_dir).resolve()
    if not src.exists():
        raise AlignInputError(f"source folder not found: {src}")
    if not src.is_dir():
        raise AlignInputError(f"source is a file, not a folder: {src}")
    if dst.exists() and not dst.is_dir():
        raise AlignInputError(f"destination is a file, not a folder: {dst}")
    if dst == src or src in dst.parents:
        raise AlignInputError(f"destination {dst} must not be inside the source {src}")
    files = list_images(src)
    if not files:  # a wrong folder, not a finished job: say so before creating DST_DIR
        raise AlignInputError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) under {src}")
    report = Path(report_path) if report_path is not None else dst / REPORT_NAME
    dst.mkdir(parents=True, exist_ok=True)
    entries = _read_report(report)
    todo = [p for p in files if not (dst / p.relative_to(src)).exists()]
    counts = {"aligned": 0, "no_face": 0, "centre_cropped": 0, "unreadable": 0,
              "not_written": 0}
    start = time.perf_counter()
    if todo and aligner is None:
        aligner = FaceAligner(device=device, min_face_size=min_face_size, batch_size=batch_size,
                              detect_size=detect_size, refine_steps=refine_steps)
    report.parent.mkdir(parents=True, exist_ok=True)
    # Report lines are appended as they happen so a crash loses none of them.
    with report.open("a", encoding="utf-8") as rep:
        def note(rel: str, status: str, detail: str) -> None:
            detail = _report_text(detail)
            entries[rel] = (status, detail)
            rep.write(f"{status}\t{rel}\t{detail}\n")
            rep.flush()

        size = aligner.size if aligner is not None else TEMPLATE_SIZE
        for item in align_files(aligner, todo, batch_size, size=size, progress=progress,
                                num_workers=num_workers):
            rel = item.path.relative_to(src).as_posix()
            key = _report_text(rel)  # the file's name in the report
            failed = None if item.crop is None or (item.face is None and skip_missing) \
                else _write_crop(dst / rel, item.crop)
            if item.error is not None:
                counts["unreadable"] += 1
                note(key, STATUS_UNREADABLE, str(item.error).replace("\t", " "))
            elif failed is not None:
                counts["not_written"] += 1
                note(key, STATUS_NOT_WRITTEN, failed.replace("\t", " "))
            elif item.face is not None:
                counts["aligned"] += 1
                if entries.pop(key, None) is not None:  # listed by an earlier run
                    rep.write(f"{STATUS_ALIGNED}\t{key}\t\n")
            else:
                counts["no_face"] += 1
                if skip_missing:
                    note(key, STATUS_NO_FACE, "skipped")
                else:  # align_files' centre crop, written above
                    counts["centre_cropped"] += 1
                    note(key, STATUS_NO_FACE, "centre-cropped")
    # Compact the appended report: one line per file, only files still in the source.
    present = {_report_text(p.relative_to(src).as_posix()) for p in files}
    lines = [f"{s}\t{rel}\t{d}\n" for rel, (s, d) in sorted(entries.items()) if rel in present]
    atomic_write_text(report, "".join(lines))
    seconds = time.perf_counter() - start
    processed = len(todo) - counts["unreadable"]
    summary = {
        "images": len(files),
        "skipped_existing": len(files) - len(todo),
        **counts,
        "report": str(report),
        "report_entries": len(lines),
        "seconds": round(seconds, 2),
        "images_per_s": round(processed / seconds, 1) if processed and seconds > 0 else 0.0,
    }
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    return "\n".join([
        f"images found      {summary['images']}",
        f"already done      {summary['skipped_existing']} (skipped)",
        f"aligned           {summary['aligned']}",
        f"no face found     {summary['no_face']} "
        f"({summary['centre_cropped']} centre-cropped, the rest skipped)",
        f"unreadable        {summary['unreadable']}",
        f"not written       {summary['not_written']} (listed in the report)",
        f"speed             {summary['images_per_s']} images/s "
        f"({summary['seconds']} s)",
        f"report            {summary['report']} ({summary['report_entries']} entries)",
    ])


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Align a tree SRC_DIR/identity/image.jpg into 112x112 ArcFace crops "
                    "mirrored under DST_DIR (MTCNN + 5-point similarity). Resumable.")
    add_debug_flag(p)
    p.add_argument("src_dir", type=Path, help="folder of identity sub-folders of photos")
    p.add_argument("dst_dir", type=Path, help="output folder (same relative paths)")
    p.add_argument("--skip-missing", action="store_true",
                   help="do not write images without a detected face (default: centre-crop "
                        "them); both ways they are listed in the report")
    p.add_argument("--batch-size", type=int_at_least(1), default=DEFAULT_BATCH_SIZE,
                   help="equal-size images per MTCNN batch")
    p.add_argument("--min-face-size", type=int_at_least(1), default=DEFAULT_MIN_FACE_SIZE,
                   help="smallest face searched, in pixels of the image MTCNN sees (larger "
                        "is faster)")
    p.add_argument("--detect-size", type=int_at_least(0), default=DEFAULT_DETECT_SIZE,
                   help="MTCNN searches a copy whose longer side is at most this many pixels "
                        "(big JPEGs are decoded reduced); a photo scaled down by "
                        "s finds faces from min-face-size / s pixels up. 0: full size (slow "
                        "on big photos; for small faces in big group photos)")
    p.add_argument("--refine-steps", type=int_at_least(0), default=DEFAULT_REFINE_STEPS,
                   help="O-net passes that re-estimate each face's landmarks from its own "
                        "box; the landmarks are the mean of MTCNN's and every pass's (0: "
                        "MTCNN's landmarks as published)")
    p.add_argument("--workers", type=int_at_least(1), default=DEFAULT_WORKERS,
                   help="threads, each reading and aligning a batch of files at a time")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--report", type=Path, default=None,
                   help=f"report file (default DST_DIR/{REPORT_NAME})")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    # MTCNN is many small ops: with OpenMP's default spin-waiting, a core shared with other
    # work made 2 threads 3-10x slower (and burn 4-6x the CPU); sleeping waits do not.
    # Effective only before torch is imported, as in a plain `python align_faces.py` run.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    # The workers' searches run side by side: each gets its share of torch's threads (on 2
    # cores, 2 workers of 1 thread did 50 photos/s at 512 px, of 2 threads 44: bench README).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // args.workers))
    try:  # folder errors are AlignInputErrors: run_cli prints them
        get_device(args.device)  # one the toolkit runs on and this machine has: before any work
        summary = align_tree(args.src_dir, args.dst_dir, skip_missing=args.skip_missing,
                             batch_size=args.batch_size, min_face_size=args.min_face_size,
                             report_path=args.report, progress=not args.no_progress,
                             device=None if args.device == "auto" else args.device,
                             detect_size=args.detect_size, num_workers=args.workers,
                             refine_steps=args.refine_steps)
    except DeviceError as e:  # --device mps, or cuda without CUDA (other errors: run_cli's)
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:  # main() is also called in-process (tests, notebooks)
        torch.set_num_threads(threads)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
