"""FaceAligner: MTCNN detection on a bounded copy of each photo, the central confident face,
and its 5-point similarity warp to 112x112 (align_faces.py, lfw_eval.py, megaface.py and
demo.py use it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from facenet_pytorch import MTCNN

from faces import mtcnn_cascade
from faces.face_warp import TEMPLATE_SIZE, check_rgb, template_for_size, warp_face
from faces.mtcnn_cascade import (
    Detections,
    map_detections,
    map_from_copy,
    no_faces,
    zero_based,
)
from faces.reduced_photo import Photo
from utils import get_device, get_logger

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
# steps gained little (4: 3.5% against 3.4% for the rotations). Cost: 2 O-net passes a face
# (each on the crop and its mirror), 1.3-2.6 ms a photo (49 against 54 photos/s at 512 px on
# 2 cores, before the mirror; bench README). The landmarks are the mean of MTCNN's and the
# steps' (LANDMARK_RULE 3): nearer human annotations than either (bench/landmark_accuracy.py).
DEFAULT_REFINE_STEPS = 2
# What the landmarks of given settings mean, for caches keyed by the settings (lfw_images):
# 1 the last refine step's, 2 the mean of MTCNN's and every step's, 3 as 2 with each step
# averaged with its mirrored crop's and crops that leave the photo padded black, 4 as 3 in
# 0-based pixels (crops one photo pixel up and left of 3's).
LANDMARK_RULE = 4
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


log = get_logger("align")


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


@dataclass
class AlignedFace:
    """One aligned face: the crop and where it came from in the original image."""

    crop: np.ndarray  # uint8 (size, size, 3) RGB
    # box and landmarks in the original image's 0-based pixels (pixel k's centre at k), the
    # frame the template is in: MTCNN's 1-based ones less MTCNN_COORDINATE_OFFSET
    box: np.ndarray  # float (4,) x1, y1, x2, y2
    landmarks: np.ndarray  # float (5, 2) (x, y)
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
        landmarks (N, 5, 2), in the image's pixels as MTCNN counts them (1-based: through
        mtcnn_cascade.zero_based before warping); N may be 0."""
        image = check_rgb(image)
        return self._detect_scaled([image])[0]

    # -- alignment
    def _choose(self, detections: Detections, photo: Photo,
                hint_box: Sequence[float] | None) -> AlignedFace | None:
        """The face to crop among ``detections`` (in ``photo.image``'s pixels), its crop, box
        and landmarks in the full-size photo's pixels."""
        if len(detections[0]) == 0:
            return None
        # 0-based, as the template and the warp count pixels (MTCNN's 1-based points moved
        # every crop one photo pixel down and right)
        boxes, probs, points = zero_based(map_detections(detections, photo.to_full))
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
