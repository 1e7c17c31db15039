"""Photos decoded at a reduced scale for a face search, and their pixels in the full photo's.

A big JPEG is decoded at 1/2, 1/4 or 1/8 of its size with libjpeg's DCT scaling
(``utils.decode_image(reduce=...)``): faster than a full decode and no separate downscale.
:class:`Photo` holds that reduced image, maps its pixel coordinates to the full-size photo's
and back, and decodes it again at a larger size when asked (align_faces warps a face from the
smallest decode where it is at least the template's size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils import ImageReadError, decode_image, exif_orientation, jpeg_shape, read_image_bytes


def jpeg_reduction(shape: Sequence[int], detect_size: int) -> int:
    """The largest JPEG DCT reduction (8, 4 or 2) that leaves the longer side of a photo of
    (upright) ``shape`` at least ``detect_size`` pixels; 1 when none does or detect_size is 0."""
    longest = max(shape[0], shape[1])
    for reduce in (8, 4, 2):
        if detect_size > 0 and -(-longest // reduce) >= detect_size:
            return reduce
    return 1


# Per EXIF orientation, whether the upright x and y axes run against the stored JPEG's: a
# 1/r decode's blocks start at the stored image's first pixel, the far end of such an axis.
_REVERSED_AXES = {2: (True, False), 3: (True, True), 4: (False, True), 6: (True, False),
                  7: (True, True), 8: (False, True)}


@dataclass
class Photo:
    """A photo as :meth:`FaceAligner.align_photos` takes it: ``image``, upright RGB, decoded
    at 1/``reduce`` of the full size (utils.decode_image's DCT scaling); ``data``, the encoded
    file, decodes the full size when a crop needs it. ``Photo(rgb_array)``: full size."""

    image: np.ndarray
    reduce: int = 1
    full_shape: tuple[int, int] | None = None  # upright (H, W) at full size; None: image's
    data: bytes | None = None
    source: str = "<array>"
    orientation: int = 1  # EXIF orientation the image was turned upright by

    def __post_init__(self) -> None:
        if self.full_shape is None:
            self.full_shape = tuple(self.image.shape[:2])
        r, (h, w), (rh, rw) = self.reduce, self.full_shape, self.image.shape[:2]
        rev_x, rev_y = _REVERSED_AXES.get(self.orientation, (False, False))
        # full-size pixel = reduced pixel * r + offset (pixel centres; blocks of r pixels)
        self._offset = np.array([(r - 1) / 2 + (w - rw * r if rev_x else 0),
                                 (r - 1) / 2 + (h - rh * r if rev_y else 0)])

    def to_full(self, xy: np.ndarray) -> np.ndarray:
        """(..., 2) pixel coordinates of ``image`` in the full-size photo's pixels."""
        return np.asarray(xy, dtype=np.float64) * self.reduce + self._offset

    def to_reduced(self, xy: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_full`."""
        return (np.asarray(xy, dtype=np.float64) - self._offset) / self.reduce

    def decoded_at(self, reduce: int) -> Photo:
        """This photo decoded at 1/``reduce`` (8, 4, 2 or 1: full size); itself when it
        already is, and the full size when the reduced decode has not the size it should."""
        return self if reduce == self.reduce else \
            _decode(self.data, self.source, self.full_shape, reduce)

    def full_image(self) -> np.ndarray:
        """The photo at full size (decoded again when ``image`` is reduced)."""
        return self.decoded_at(1).image


def read_photo(path: Path, detect_size: int = 0) -> Photo | ImageReadError:
    """The photo file at ``path`` for a search at ``detect_size``: a JPEG whose longer side
    is at least 2x detect_size is decoded reduced (:func:`jpeg_reduction`), anything else at
    full size; or the ImageReadError saying why it cannot be read."""
    try:
        data = read_image_bytes(path)
        shape = jpeg_shape(data)
        reduce = 1 if shape is None else jpeg_reduction(shape, detect_size)
        return _decode(data, str(path), shape, reduce)
    except ImageReadError as e:
        return e


def _decode(data: bytes, source: str, shape: Sequence[int] | None, reduce: int) -> Photo:
    """``data`` (a photo of upright ``shape``) decoded at 1/``reduce``, or at full size when
    ``reduce`` is 1 or the reduced decode has not the size it should (a header that lied)."""
    if reduce > 1:
        image = decode_image(data, source, reduce=reduce)
        if image.shape[:2] == tuple(-(-side // reduce) for side in shape):
            return Photo(image, reduce, tuple(shape), data, source, exif_orientation(data))
    return Photo(decode_image(data, source), source=source)
