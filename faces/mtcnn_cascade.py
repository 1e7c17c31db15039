"""MTCNN's three-stage cascade on one image on the CPU, with OpenCV doing the resampling;
and MTCNN's pixel coordinates mapped between images.

facenet-pytorch's MTCNN runs the cascade of Zhang et al. (2016) -- a P-net over an image
pyramid, an R-net and an O-net over the square crops that survive -- batched on torch
tensors. On a CPU about a third of its time went to resampling: every pyramid level pooled
from the whole image with ``interpolate(mode="area")`` and every candidate crop resized by
its own ``interpolate`` call (cProfile, 512 px photos). :func:`detect` runs the same three
networks (facenet-pytorch's weights) on the same candidates with one ``cv2.resize`` of the
uint8 image per level (each level from the one before) and per crop: 1.5x faster at 512 px,
2.4x at full size. Its thresholds, pyramid scales, box arithmetic and non-maximum
suppressions are MTCNN's, and its coordinates follow facenet-pytorch's (1-based, see
MTCNN_COORDINATE_OFFSET), so the two drivers' results mean the same thing; the area averages
differ slightly, so the detections agree about as closely as two runs of MTCNN on a photo
shifted by two pixels do (tests/test_mtcnn_cascade.py). One difference on purpose: a box
that leaves the image is cropped with a black border, as MTCNN's own code does, where
facenet-pytorch stretches the part inside (:func:`_crops`). Figures: bench/README.md,
alignment and landmark sections.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
import torchvision

PNET_STRIDE = 2  # the P-net's output grid step, in pixels of its pyramid level
PNET_CELL = 12  # the P-net's window: a face of min_face_size is this big on the first level
RNET_SIZE, ONET_SIZE = 24, 48  # the R- and O-net input sides
PYRAMID_FACTOR = 0.709  # each level is this times the previous one (area halves)
PIXEL_MEAN, PIXEL_SCALE = 127.5, 1 / 128  # the networks' input normalisation
# MTCNN's five landmarks (left eye, right eye, nose, left and right mouth corner) as a
# mirror image's landmarks of the same names: the eyes and the mouth corners trade places.
MIRROR_ORDER = [1, 0, 2, 4, 3]
# Overlap above which the weaker of two boxes is dropped: within one pyramid level, across
# levels, after the R-net (intersection over union), and after the O-net, where overlap is
# the intersection over the smaller box ("Min"), as MTCNN does.
NMS_LEVEL, NMS_ALL, NMS_RNET, NMS_ONET = 0.5, 0.7, 0.7, 0.7

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (N, 4), probs (N,), points
# facenet-pytorch's MTCNN keeps the Matlab original's 1-based pixel indices (and so does
# :func:`detect`): boxes and landmarks sit this much right of and below 0-based pixel
# centres. Measured, detecting 25 photos at two sizes (2x and 4x apart): landmarks +1.06 /
# +1.15 px (x / y, +-0.1), boxes +0.9 / +1.6 px. Left in, it would grow with a downscale
# (3.4 px at full size for a 2000 px photo searched at 640) and shift every landmark by ~5%
# of the eye distance; :func:`map_detections` takes it out and puts it back.
MTCNN_COORDINATE_OFFSET = 1.0


def pyramid_scales(height: int, width: int, min_face_size: float,
                   factor: float = PYRAMID_FACTOR) -> list[float]:
    """The P-net's scales: from PNET_CELL / min_face_size down by ``factor`` while the
    shorter side scaled stays at least PNET_CELL pixels."""
    scale = PNET_CELL / min_face_size
    side, scales = min(height, width) * scale, []
    while side >= PNET_CELL:
        scales.append(scale)
        scale, side = scale * factor, side * factor
    return scales


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float,
        over_smaller: bool = False) -> np.ndarray:
    """Indices of the boxes kept, best score first: each drops the later ones whose overlap
    with it is above ``threshold`` (intersection over union, or over the smaller box).
    Areas count pixels inclusively (width x2 - x1 + 1) when ``over_smaller``, as MTCNN's
    last stage does; torchvision's convention (x2 - x1) otherwise."""
    if not over_smaller:  # torchvision's C++ loop, as facenet-pytorch's first two stages use
        return torchvision.ops.nms(torch.as_tensor(boxes, dtype=torch.float32),
                                   torch.as_tensor(scores, dtype=torch.float32),
                                   threshold).numpy()
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter <= threshold * np.minimum(area[i], area[rest])]
    return np.asarray(keep, dtype=np.int64)


def _net_input(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 to the networks' normalised float (N, 3, H, W), channels last."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() - PIXEL_MEAN) * PIXEL_SCALE


def _square(boxes: np.ndarray) -> np.ndarray:
    """Boxes grown to squares of their longer side about the same centre."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + (w - side) / 2
    out[:, 1] = boxes[:, 1] + (h - side) / 2
    out[:, 2:4] = out[:, :2] + side[:, None]
    return out


def _regress(boxes: np.ndarray, offsets: np.ndarray, inclusive: bool = True) -> np.ndarray:
    """Box corners moved by ``offsets`` (N, 4) in units of the box's width and height."""
    out = boxes.copy()
    extra = 1.0 if inclusive else 0.0
    size = np.stack([boxes[:, 2] - boxes[:, 0] + extra, boxes[:, 3] - boxes[:, 1] + extra], 1)
    out[:, :4] = boxes[:, :4] + offsets[:, :4] * np.tile(size, 2)
    return out


def _crops(image: np.ndarray, boxes: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Each box's pixels (1-based truncated corners, as MTCNN's), black where the box leaves
    the image, resized to side x side; and which boxes had any pixel of the image.

    The black border is MTCNN's own (its Matlab code pads each crop with zeros);
    facenet-pytorch resizes only the part inside the image, which stretches a face that
    the photo cuts: its landmarks then missed human annotations by 7.2% of the eye distance
    on average, 5.8% with the padding (bench/landmark_accuracy.py, 375 faces; most of
    HELEN's photos are cut close around the face)."""
    h, w = image.shape[:2]
    corners = np.trunc(boxes[:, :4]).astype(np.int64)
    x1, y1 = np.maximum(corners[:, 0], 1), np.maximum(corners[:, 1], 1)
    x2, y2 = np.minimum(corners[:, 2], w), np.minimum(corners[:, 3], h)
    valid = (x2 >= x1) & (y2 >= y1)
    crops = []
    for (a, b, c, d), i, j, k, m in zip(corners[valid], x1[valid], y1[valid], x2[valid],
                                        y2[valid], strict=True):
        inside = image[j - 1:m, i - 1:k]
        if (i, j, k, m) != (a, b, c, d):  # the box leaves the image: pad the rest black
            inside = cv2.copyMakeBorder(inside, j - b, d - m, i - a, c - k,
                                        cv2.BORDER_CONSTANT, value=(0, 0, 0))
        crops.append(cv2.resize(inside, (side, side), interpolation=cv2.INTER_AREA))
    return np.stack(crops) if crops else np.zeros((0, side, side, 3), np.uint8), valid


def _rescore(net: torch.nn.Module, image: np.ndarray, boxes: np.ndarray, side: int,
             threshold: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """The boxes whose side x side crop ``net`` (the R- or O-net) scores above ``threshold``,
    as (x1, y1, x2, y2, score) rows, and the net's other outputs for them."""
    crops, valid = _crops(image, boxes, side)
    if len(crops) == 0:
        return np.zeros((0, 5)), []
    *outputs, probs = (t.numpy() for t in net(_net_input(crops)))
    passed = probs[:, 1] > threshold
    return (np.concatenate([boxes[valid][passed, :4], probs[passed, 1:2]], axis=1),
            [out[passed] for out in outputs])


def _landmarks(boxes: np.ndarray, marks: np.ndarray) -> np.ndarray:
    """(N, 5, 2) landmarks from the O-net's (N, 10) outputs (x0..x4, y0..y4 in units of the
    input box's width and height)."""
    size = np.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1], 1)
    return np.stack([marks[:, :5], marks[:, 5:]], 2) * size[:, None, :] + boxes[:, None, :2] - 1


def _onet_mirrored(onet: torch.nn.Module, image: np.ndarray,
                   square: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The O-net on each square box's crop and on that crop's mirror image, the mirror's
    answer turned back: boxes (N, 4) and landmarks (N, 5, 2), each the mean of the two
    answers; and which boxes had a crop. The mean is exactly mirror-symmetric: a photo's
    mirror gets the mirror of its boxes and landmarks (tests/test_mtcnn_cascade.py)."""
    crops, valid = _crops(image, square, ONET_SIZE)
    if not valid.any():
        return np.zeros((0, 4)), np.zeros((0, 5, 2)), valid
    device = next(onet.parameters()).device
    both = np.concatenate([crops, crops[:, :, ::-1]])
    offsets, marks, _ = (t.cpu().numpy().astype(np.float64)
                         for t in onet(_net_input(both).to(device)))
    count, boxes = len(crops), np.concatenate([square[valid]] * 2)
    points, regressed = _landmarks(boxes, marks), _regress(boxes, offsets)
    # Crop pixel u (1-based, between the truncated corners a and c) shows photo pixel a + c - u
    # in the mirror: its points and box edges are turned back by x -> a + c - x.
    axis = (np.trunc(square[valid, 0]) + np.trunc(square[valid, 2]))[:, None]
    mirrored = points[count:][:, MIRROR_ORDER]
    mirrored[..., 0] = axis - mirrored[..., 0]
    box = regressed[count:].copy()
    box[:, [0, 2]] = axis - regressed[count:, [2, 0]]
    return (regressed[:count] + box) / 2, (points[:count] + mirrored) / 2, valid


def refine(onet: torch.nn.Module, image: np.ndarray, boxes: np.ndarray, points: np.ndarray,
           steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4) and landmarks (N, 5, 2) found in ``image`` re-estimated ``steps`` times
    by the O-net, each time on the square crop of its own last box and on that crop's mirror
    (:func:`_onet_mirrored`); the landmarks returned are the mean of the given ones and every
    step's.

    MTCNN's landmarks come from one O-net pass on the box the R-net left, so they follow
    that box's noise: a photo shifted by 2 px moved them by 2.3% of the eye distance on
    average. Fed its own refined box, the O-net settles: after 2 steps the shift moved them
    1.0%, a rotated and scaled photo's landmarks were 28% nearer the rotated ones (3.4%
    against 4.8%), and a 512 px search landed 1.8% from the full-size one instead of 4.0%
    (bench README). The last step's landmarks alone were further from human annotations
    than MTCNN's (6.9% against 6.8% of the eye distance, 19 faces of bench/
    landmark_accuracy.py); the mean of the estimates was nearer than either on both halves
    of the faces (6.0 and 6.6% against 6.7 and 7.2%) and steadier under rotation (2.8%
    against 3.3%, tests/test_mtcnn_cascade.py's 12 cases). The mirrored pass took the
    mean from 5.00 to 4.87% on one half of 377 annotated faces and from 5.63 to 5.44% on the
    other (bench README), and the rotation cases' from 2.8 to 2.5%. Call it under
    ``torch.inference_mode()``."""
    boxes, points = boxes[:, :4].astype(np.float64), points.astype(np.float64)
    total, estimates = points.copy(), 1
    for _ in range(steps):
        square = _square(boxes)
        refined, marks, valid = _onet_mirrored(onet, image, square)
        if not valid.any():
            break
        points[valid], boxes[valid] = marks, refined
        total, estimates = total + points, estimates + 1
    return boxes, total / estimates


def no_faces() -> Detections:
    return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))


def map_detections(detections: Detections,
                   to_full: Callable[[np.ndarray], np.ndarray]) -> Detections:
    """Boxes and landmarks through ``to_full`` (0-based (..., 2) pixel coordinates of one
    image to another's), in MTCNN's coordinate convention before and after."""
    boxes, probs, points = detections
    offset = MTCNN_COORDINATE_OFFSET

    def mapped(xy: np.ndarray) -> np.ndarray:
        return to_full(xy - offset) + offset

    return mapped(boxes.reshape(-1, 2, 2)).reshape(-1, 4), probs, mapped(points)


def zero_based(detections: Detections) -> Detections:
    """Boxes and landmarks moved from MTCNN's 1-based pixels to 0-based ones (pixel k's
    centre at k), the frame the alignment template and cv2's warp count in."""
    boxes, probs, points = detections
    return boxes - MTCNN_COORDINATE_OFFSET, probs, points - MTCNN_COORDINATE_OFFSET


def map_from_copy(detections: Detections, full_shape: Sequence[int],
                  copy_shape: Sequence[int]) -> Detections:
    """Boxes and landmarks found on a resized copy, in the full-size image's pixels (and
    MTCNN's coordinate convention, as a full-size search gives them).

    cv2.resize aligns pixel centres: copy pixel u covers the original at (u + 0.5) * f - 0.5,
    f = full size / copy size along that axis; MTCNN calls pixel u u + MTCNN_COORDINATE_OFFSET.
    """
    factor = np.array([full_shape[1] / copy_shape[1], full_shape[0] / copy_shape[0]])
    return map_detections(detections, lambda xy: xy * factor + (factor - 1) / 2)


def detect(pnet: torch.nn.Module, rnet: torch.nn.Module, onet: torch.nn.Module,
           image: np.ndarray, min_face_size: float,
           thresholds: Sequence[float]) -> Detections:
    """Faces in an (H, W, 3) uint8 RGB image: boxes (N, 4) x1 y1 x2 y2, probabilities (N,)
    and landmarks (N, 5, 2) (x, y), in facenet-pytorch's coordinates. Call it under
    ``torch.inference_mode()``."""
    image = np.ascontiguousarray(image)
    h, w = image.shape[:2]
    # Stage 1: the P-net's windows over the pyramid, suppressed per level then across levels.
    # Each level is area-averaged from the one before (facenet-pytorch pools each from the
    # image): 0.7 against 2.7 ms a 512 px photo, +7% photos/s in align_files (bench README).
    found, level = [], image
    for scale in pyramid_scales(h, w, min_face_size):
        level = cv2.resize(level, (int(w * scale + 1), int(h * scale + 1)),
                           interpolation=cv2.INTER_AREA)
        offsets, probs = pnet(_net_input(level[None]))
        score = probs[0, 1].numpy()
        ys, xs = np.nonzero(score >= thresholds[0])
        if len(ys) == 0:
            continue
        cell = np.stack([xs, ys], 1).astype(np.float32) * PNET_STRIDE
        boxes = np.concatenate([np.floor((cell + 1) / scale), np.floor((cell + PNET_CELL) / scale),
                                score[ys, xs, None], offsets[0][:, ys, xs].numpy().T], axis=1)
        found.append(boxes[nms(boxes[:, :4], boxes[:, 4], NMS_LEVEL)])
    if not found:
        return no_faces()
    boxes = np.concatenate(found)
    boxes = boxes[nms(boxes[:, :4], boxes[:, 4], NMS_ALL)]
    boxes = _square(_regress(boxes[:, :5], boxes[:, 5:9], inclusive=False))
    # Stage 2: the R-net rescores and refines each square crop.
    boxes, outputs = _rescore(rnet, image, boxes, RNET_SIZE, thresholds[1])
    if len(boxes) == 0:
        return no_faces()
    keep = nms(boxes[:, :4], boxes[:, 4], NMS_RNET)
    boxes = _square(_regress(boxes[keep], outputs[0][keep]))
    # Stage 3: the O-net rescores, refines and places the five landmarks.
    boxes, (offsets, marks) = _rescore(onet, image, boxes, ONET_SIZE, thresholds[2])
    if len(boxes) == 0:
        return no_faces()
    points = _landmarks(boxes, marks)
    boxes = _regress(boxes, offsets)
    keep = nms(boxes[:, :4], boxes[:, 4], NMS_ONET, over_smaller=True)
    return (boxes[keep, :4].astype(np.float64), boxes[keep, 4].astype(np.float64),
            points[keep].astype(np.float64))
