"""ArcFace's 5-point face template and the similarity warp of a photo onto it.

``warp_face(image, five_points)`` is the aligned crop: the least-squares similarity
(:func:`estimate_similarity`) taking the landmarks onto :data:`REFERENCE_LANDMARKS`, scaled
to the crop size (:func:`template_for_size`), applied with cv2.warpAffine. Images are RGB
uint8 HxWx3; landmarks (5, 2) (x, y) in the order left eye, right eye, nose tip, left mouth
corner, right mouth corner ("left": the image's left). :func:`center_crop` is the crop of
a photo where no face was found.
"""

from __future__ import annotations

import cv2
import numpy as np

from utils import FACE_CROP_SIZE

# ArcFace's 112x112 template (InsightFace ``arcface_dst``), (x, y) per landmark.
REFERENCE_LANDMARKS = np.array(
    [
        [38.2946, 51.6963],  # left eye (image left)
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float32,
)
TEMPLATE_SIZE = FACE_CROP_SIZE  # side of the square the template's coordinates refer to
# A faceless image falls back to its central square of this fraction of the shorter side:
# about the face region of a loosely cropped face photo such as LFW's 250x250 images.
CENTER_CROP_FRACTION = 0.5


def estimate_similarity(landmarks: np.ndarray,
                        reference: np.ndarray = REFERENCE_LANDMARKS) -> np.ndarray:
    """The 2x3 least-squares similarity (rotation, uniform scale, translation) mapping
    ``landmarks`` onto ``reference`` (Umeyama 1991), as a float64 matrix for cv2.warpAffine.

    Minimises sum_i || s R p_i + t - q_i ||^2 over rotations R (no reflection), s > 0, t.
    """
    src = np.asarray(landmarks, dtype=np.float64)
    dst = np.asarray(reference, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"landmarks must be (N, 2) matching the reference {dst.shape}, "
                         f"got {src.shape}")
    if not np.isfinite(src).all():
        raise ValueError("landmarks contain NaN or infinite values")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c ** 2).sum() / len(src)
    if src_var <= np.finfo(np.float64).eps:
        raise ValueError("landmarks are degenerate (all points coincide)")
    cov = dst_c.T @ src_c / len(src)
    u, sing, vt = np.linalg.svd(cov)
    # Force a proper rotation: flip the weakest axis when U V^T would be a reflection.
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        signs[-1] = -1.0
    rotation = u @ np.diag(signs) @ vt
    scale = (sing * signs).sum() / src_var
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def template_for_size(size: int) -> np.ndarray:
    """The reference landmarks for a ``size`` x ``size`` crop: the 112 template scaled by
    size / 112 (InsightFace shifts x by 8 for 128 instead; we scale for every size)."""
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    return REFERENCE_LANDMARKS * np.float32(size / TEMPLATE_SIZE)


def warp_face(image: np.ndarray, landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The aligned ``size`` x ``size`` RGB crop: ``image`` warped by the similarity taking
    ``landmarks`` onto the template (bilinear, black constant border)."""
    image = check_rgb(image)
    matrix = estimate_similarity(landmarks, template_for_size(size))
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}")
    return image


def center_square_side(shape: tuple[int, ...]) -> int:
    """The side of :func:`center_crop`'s square in an image of ``shape`` (H, W[, C])."""
    return max(1, round(min(shape[0], shape[1]) * CENTER_CROP_FRACTION))


def center_crop(image: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """Fallback crop for an image without a detected face: its central square of side
    CENTER_CROP_FRACTION x the shorter side, resized to ``size`` x ``size``."""
    image = check_rgb(image)
    h, w = image.shape[:2]
    side = center_square_side(image.shape)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top:top + side, left:left + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interp)
