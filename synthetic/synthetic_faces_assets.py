"""The fixed material of ``synthetic_faces.py``: base photos in one canonical face frame,
region masks, a depth map, and the shape and expression displacement bases.

Everything here is computed once per process (:func:`load_base_assets`, cached) from the two
photographs that installed packages ship, placed by their five MTCNN landmarks onto the
ArcFace 112x112 template scaled into a 250x250 canvas (LFW's image size). All geometry below
is in pixels of that canonical canvas.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

import utils
from faces.face_warp import estimate_similarity

cv2 = utils.cv2

CANVAS = 250  # LFW's image size; also the canonical frame's size

# InsightFace's ArcFace 112x112 template (eye L, eye R, nose, mouth L, mouth R), person's
# right eye first as MTCNN reports it.
ARCFACE_TEMPLATE_112 = np.array([
    [38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
    [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
TEMPLATE_SCALE = 1.25  # 112-template px -> canvas px: eyes ~44 px apart, face ~110 px tall
TEMPLATE_CENTRE = np.array([125.0, 120.0])  # where the template's centre (56, 56) lands
CANONICAL_LANDMARKS = (ARCFACE_TEMPLATE_112 - 56.0) * TEMPLATE_SCALE + TEMPLATE_CENTRE

# facenet-pytorch 2.5.3 MTCNN (keep_all, min_face_size=40) on the unmodified base photos;
# tests/test_synthetic_faces.py re-measures them. Hard-coded so generation needs no torch.
BASE_LANDMARKS = {
    "astronaut": np.array([[205.37, 101.48], [246.86, 103.11], [225.06, 129.24],
                           [201.15, 139.58], [245.14, 141.09]]),
    "grace_hopper": np.array([[220.33, 189.92], [308.47, 187.09], [269.23, 238.88],
                              [230.43, 282.64], [306.78, 279.59]]),
}

# Outline of each base photo's person (hair or hat, face, neck, shoulders) in the canonical
# frame, traced by hand on the canonical images; the mirrored bases use it mirrored.
SILHOUETTES = {
    "astronaut": [(110, 22), (140, 22), (160, 30), (178, 42), (195, 60), (205, 80), (205, 100),
                  (198, 122), (185, 140), (172, 152), (165, 175), (160, 190), (185, 192),
                  (205, 205), (215, 230), (220, 250), (0, 250), (5, 225), (15, 200), (30, 180),
                  (45, 172), (85, 172), (80, 160), (70, 145), (60, 135), (50, 120), (45, 100),
                  (45, 80), (52, 60), (68, 42), (85, 30)],
    "grace_hopper": [(100, 28), (145, 28), (165, 42), (178, 60), (183, 80), (183, 100),
                     (182, 130), (178, 150), (170, 165), (160, 178), (190, 188), (225, 200),
                     (245, 225), (250, 250), (0, 250), (0, 205), (30, 192), (90, 183), (82, 168),
                     (74, 150), (70, 130), (66, 100), (65, 80), (70, 60), (82, 42)],
}
FILL_SIGMAS = (6.0, 20.0, 60.0)  # normalised-convolution fill of each photo's background

CENTRE_X = 125.0
HEAD_CENTRE = (125.0, 122.0)  # head ellipse (hair or hat included)
HEAD_AXES = (72.0, 88.0)
FACE_CENTRE = (125.0, 143.0)  # the face oval: brow line to chin, cheek to cheek
FACE_AXES = (48.0, 56.0)
NECK_HALF_WIDTH = 26.0
NECK_TOP = 165.0
MOUTH_CENTRE = (125.0, 165.5)
NOSE_CENTRE = (125.0, 136.0)
NOSE_TIP = (125.0, 141.0)
EYE_Y_ABOVE = 4.0  # eye-region centre sits a little above the pupils to hold the brows
BROW_Y_ABOVE = 13.0
HEAD_DEPTH = 50.0  # pseudo-3D: depth of the face's front above the silhouette plane
NOSE_HEIGHT = 13.0
MASK_SOFTNESS = 3.0  # Gaussian sigma of every region edge
DETAIL_SIGMA = 2.0  # split of a base photo into low frequencies and fine detail
NOISE_BANK_SIZE = 320
NOISE_BANK_SEED = 20240601


@dataclass
class BaseAssets:
    """Canonical-frame material shared by every identity (float32 arrays)."""

    names: list[str]  # base face names (photos and their mirror images)
    bases_low: np.ndarray  # B x H x W x 3 low-frequency colour
    bases_detail: np.ndarray  # B x H x W x 3 fine detail (base minus its low frequencies)
    region_names: list[str]
    regions: np.ndarray  # R x H x W, a partition of unity
    skin_mask: np.ndarray
    lip_mask: np.ndarray
    hair_mask: np.ndarray
    brow_mask: np.ndarray
    beard_mask: np.ndarray
    silhouettes: np.ndarray  # B x H x W outline of each base's person (not background)
    depth: np.ndarray  # height above the silhouette plane, pixels
    head_weight: np.ndarray  # 1 on the head, fading to 0 on the body (which stays rigid)
    normals: np.ndarray  # H x W x 3 unit surface normals from the depth map
    shape_names: list[str]
    shape_basis: np.ndarray  # K x 2 x H x W backward displacement fields (px per unit)
    expression_names: list[str]
    expression_basis: np.ndarray  # 2 x H x W x E (x and y fields, expressions last)
    grid_x: np.ndarray  # H x W pixel x coordinates
    grid_y: np.ndarray
    noise_bank: np.ndarray  # N x N x 3 standard normal, cropped per image


def load_base_photos() -> dict[str, np.ndarray]:
    """The two base photographs as RGB uint8 HxWx3."""
    import matplotlib.cbook  # ~0.5 s of start-up: loaded only when the base photos are read
    import skimage.data  # likewise: only when the base photos are read

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        grace = utils.decode_image(f.read(), source="matplotlib sample grace_hopper.jpg")
    return {"astronaut": np.ascontiguousarray(skimage.data.astronaut()), "grace_hopper": grace}


def _to_canonical(photo: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Warp a photo so its landmarks land on CANONICAL_LANDMARKS (float32 RGB in [0, 1])."""
    matrix = estimate_similarity(landmarks, CANONICAL_LANDMARKS)
    scale = float(np.hypot(*matrix[:, 0]))
    image = photo.astype(np.float32) / 255.0
    if scale < 1.0:  # shrink with area averaging first so the warp does not alias
        h, w = image.shape[:2]
        image = cv2.resize(image, (round(w * scale), round(h * scale)),
                           interpolation=cv2.INTER_AREA)
        landmarks = landmarks * [image.shape[1] / w, image.shape[0] / h]
        matrix = estimate_similarity(landmarks, CANONICAL_LANDMARKS)
    return cv2.warpAffine(image, matrix, (CANVAS, CANVAS), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


def _mirror(photo: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip; landmarks flipped and re-ordered (eyes and mouth corners swap)."""
    flipped = landmarks.copy()
    flipped[:, 0] = photo.shape[1] - 1 - flipped[:, 0]
    return np.ascontiguousarray(photo[:, ::-1]), flipped[[1, 0, 2, 4, 3]]


def _polygon_mask(points: list[tuple[int, int]]) -> np.ndarray:
    """Soft mask (float32) of a polygon given in canonical pixels."""
    mask = np.zeros((CANVAS, CANVAS), np.uint8)
    cv2.fillPoly(mask, [np.array(points, np.int32)], 1)
    return _soften(mask, 1.5)


def _mirror_canonical(mask: np.ndarray) -> np.ndarray:
    """Mirror a canonical-frame array about the face's vertical axis (x = CENTRE_X)."""
    matrix = np.array([[-1.0, 0.0, 2.0 * CENTRE_X], [0.0, 1.0, 0.0]])
    return cv2.warpAffine(mask, matrix, (CANVAS, CANVAS), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def _fill_outside(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Replace the photo's background by a smooth extension of the person's own colours
    (normalised convolution at growing scales), so blending two faces whose outlines differ
    never shows a flag or a wall inside the blended outline."""
    weight = (mask > 0.5).astype(np.float32)
    fill = np.zeros_like(image)
    done = np.zeros(mask.shape, bool)
    for sigma in FILL_SIGMAS:
        num = cv2.GaussianBlur(image * weight[..., None], (0, 0), sigma)
        den = cv2.GaussianBlur(weight, (0, 0), sigma)
        ok = (den > 0.05) & ~done
        fill[ok] = num[ok] / den[ok, None]
        done |= ok
    fill[~done] = image[weight > 0].mean(axis=0)
    return (mask[..., None] * image + (1.0 - mask[..., None]) * fill).astype(np.float32)


def _ellipse(gx: np.ndarray, gy: np.ndarray, centre, axes) -> np.ndarray:
    """Hard ellipse mask (float32 0/1)."""
    u = (gx - centre[0]) / axes[0]
    v = (gy - centre[1]) / axes[1]
    return (u * u + v * v <= 1.0).astype(np.float32)


def _soften(mask: np.ndarray, sigma: float = MASK_SOFTNESS) -> np.ndarray:
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)


def _gauss(gx: np.ndarray, gy: np.ndarray, centre, sigma_x: float, sigma_y: float | None = None
           ) -> np.ndarray:
    sigma_y = sigma_x if sigma_y is None else sigma_y
    return np.exp(-0.5 * (((gx - centre[0]) / sigma_x) ** 2 + ((gy - centre[1]) / sigma_y) ** 2)
                  ).astype(np.float32)


def _shape_basis(gx: np.ndarray, gy: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Backward displacement fields for the identity's face shape, ~1-6 px at coefficient 1.

    The texture is sampled at p + field(p): a field pointing away from a feature's centre
    shrinks it, one pointing toward it enlarges it."""
    lm = CANONICAL_LANDMARKS
    eyes = [(x, y) for x, y in lm[:2]]
    zero = np.zeros_like(gx)
    fields: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    g_eyes = [_gauss(gx, gy, e, 10.0) for e in eyes]
    fields["eye_size"] = (sum(g * (gx - e[0]) for g, e in zip(g_eyes, eyes, strict=True)) * 0.3,
                          sum(g * (gy - e[1]) for g, e in zip(g_eyes, eyes, strict=True)) * 0.3)
    g_wide = [_gauss(gx, gy, e, 13.0) for e in eyes]
    fields["eye_spacing"] = ((g_wide[0] - g_wide[1]) * 3.5, zero)
    fields["eye_height"] = (zero, (g_wide[0] + g_wide[1]) * 3.5)
    brows = [(x, y - BROW_Y_ABOVE) for x, y in eyes]
    g_brows = sum(_gauss(gx, gy, b, 12.0, 6.0) for b in brows)
    fields["brow_height"] = (zero, g_brows * 3.5)
    g_nose = _gauss(gx, gy, NOSE_CENTRE, 9.0, 14.0)
    fields["nose_width"] = (g_nose * (gx - CENTRE_X) * 0.35, zero)
    fields["nose_length"] = (zero, _gauss(gx, gy, NOSE_TIP, 9.0) * 4.5)
    g_mouth = _gauss(gx, gy, MOUTH_CENTRE, 16.0, 9.0)
    fields["mouth_width"] = (g_mouth * (gx - CENTRE_X) * 0.25, zero)
    fields["mouth_height"] = (zero, _gauss(gx, gy, MOUTH_CENTRE, 18.0, 11.0) * 4.5)
    fields["lips"] = (zero, _gauss(gx, gy, MOUTH_CENTRE, 14.0, 6.0) * (gy - MOUTH_CENTRE[1]) * 0.4)
    fields["jaw_width"] = (_gauss(gx, gy, (CENTRE_X, 182.0), 60.0, 22.0) * (gx - CENTRE_X) * 0.15,
                           zero)
    fields["chin"] = (zero, _gauss(gx, gy, (CENTRE_X, 196.0), 22.0, 14.0) * 6.0)
    fields["forehead"] = (zero, _gauss(gx, gy, (CENTRE_X, 88.0), 45.0, 16.0) * 6.0)
    fields["face_width"] = (_gauss(gx, gy, (CENTRE_X, 130.0), 70.0, 75.0) * (gx - CENTRE_X) * 0.1,
                            zero)
    g_cheeks = [_gauss(gx, gy, (CENTRE_X + s * 34.0, 155.0), 12.0) for s in (-1, 1)]
    fields["cheeks"] = ((g_cheeks[1] - g_cheeks[0]) * 3.0, zero)
    names = list(fields)
    basis = np.stack([np.stack(fields[n]) for n in names]).astype(np.float32)
    return names, basis


def _expression_basis(gx: np.ndarray, gy: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Backward displacement fields for one image's expression, a few px at coefficient 1."""
    lm = CANONICAL_LANDMARKS
    zero = np.zeros_like(gx)
    fields: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    corners = [_gauss(gx, gy, c, 7.0) for c in lm[3:]]
    # Smile: corners move out and up, so sample from further in and lower.
    fields["smile"] = ((corners[0] - corners[1]) * 3.0, (corners[0] + corners[1]) * 3.0)
    fields["open"] = (zero, -_gauss(gx, gy, (CENTRE_X, 185.0), 30.0, 18.0) * 4.0)
    brows = [(x, y - BROW_Y_ABOVE) for x, y in lm[:2]]
    fields["brows"] = (zero, sum(_gauss(gx, gy, b, 11.0, 7.0) for b in brows) * 3.0)
    g_eyes = sum(_gauss(gx, gy, e, 9.0, 5.0) * (gy - e[1]) for e in lm[:2])
    fields["squint"] = (zero, g_eyes * 0.35)
    names = list(fields)
    # Channels last, at most 4, so one cv2.transform per axis mixes them per image.
    assert len(names) <= 4
    basis = np.stack([np.dstack([fields[n][axis] for n in names]) for axis in (0, 1)])
    return names, basis.astype(np.float32)


@lru_cache(maxsize=1)
def load_base_assets() -> BaseAssets:
    """Build (once per process) all the canonical-frame material."""
    gy, gx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)
    photos = load_base_photos()
    names, canon, outlines = [], [], []
    for name, photo in photos.items():
        landmarks = BASE_LANDMARKS[name]
        outline = _polygon_mask(SILHOUETTES[name])
        mirrored, mirrored_lm = _mirror(photo, landmarks)
        for image, mask in ((_to_canonical(photo, landmarks), outline),
                            (_to_canonical(mirrored, mirrored_lm), _mirror_canonical(outline))):
            canon.append(_fill_outside(image, mask))
            outlines.append(mask)
        names += [name, name + "_mirrored"]
    bases = np.stack(canon)
    low = np.stack([cv2.GaussianBlur(b, (0, 0), DETAIL_SIGMA) for b in bases])

    lm = CANONICAL_LANDMARKS
    face = _ellipse(gx, gy, FACE_CENTRE, FACE_AXES)
    head = _ellipse(gx, gy, HEAD_CENTRE, HEAD_AXES)
    eyes_raw = np.maximum(*[_ellipse(gx, gy, (x, y - EYE_Y_ABOVE), (16.0, 13.0))
                            for x, y in lm[:2]])
    nose_raw = _ellipse(gx, gy, NOSE_CENTRE, (12.0, 18.0))
    mouth_raw = _ellipse(gx, gy, MOUTH_CENTRE, (25.0, 12.0))
    neck = ((np.abs(gx - CENTRE_X) <= NECK_HALF_WIDTH) & (gy >= NECK_TOP)).astype(np.float32)

    # Partition of unity, by priority: features, then skin, then hair, then the rest.
    eyes, nose, mouth = _soften(eyes_raw), _soften(nose_raw), _soften(mouth_raw)
    features = np.clip(eyes + nose + mouth, 0.0, 1.0)
    scale = np.where(eyes + nose + mouth > 1.0, features / np.maximum(eyes + nose + mouth, 1e-6),
                     1.0)
    eyes, nose, mouth = eyes * scale, nose * scale, mouth * scale
    rest = 1.0 - (eyes + nose + mouth)
    skin_region = _soften(np.maximum(face, neck * (gy < 215))) * rest
    rest = rest - skin_region
    hair_region = _soften(head) * rest
    body_region = rest - hair_region
    region_names = ["eyes", "nose", "mouth", "skin", "hair", "body"]
    regions = np.stack([eyes, nose, mouth, skin_region, hair_region, body_region])

    eye_core = _soften(np.maximum(*[_ellipse(gx, gy, (x, y), (9.0, 5.0)) for x, y in lm[:2]]),
                       1.5)
    lip_mask = _soften(_ellipse(gx, gy, MOUTH_CENTRE, (19.0, 7.5)), 1.5)
    skin_mask = _soften(np.maximum(face, neck)) * (1.0 - eye_core) * (1.0 - 0.6 * lip_mask)
    brows = [_ellipse(gx, gy, (x, y - BROW_Y_ABOVE), (14.0, 4.0)) for x, y in lm[:2]]
    brow_mask = _soften(np.maximum(*brows), 1.5)
    hair_mask = _soften(head * (1.0 - _ellipse(gx, gy, FACE_CENTRE, (FACE_AXES[0] + 3,
                                                                     FACE_AXES[1] + 5)))
                        * (gy < 160))
    beard = face * (gy > NOSE_TIP[1] + 8) * (1.0 - _ellipse(gx, gy, MOUTH_CENTRE, (21.0, 8.0)))
    beard_mask = _soften(beard, 2.0)

    # Depth: an ellipsoid head, a nose ridge and tip, slight eye sockets; smoothed so the
    # pseudo-3D warp folds nowhere.
    u = (gx - HEAD_CENTRE[0]) / (HEAD_AXES[0] - 6.0)
    v = (gy - HEAD_CENTRE[1]) / (HEAD_AXES[1] - 4.0)
    depth = HEAD_DEPTH * np.sqrt(np.clip(1.0 - u * u - v * v, 0.0, None))
    depth += NOSE_HEIGHT * _gauss(gx, gy, NOSE_CENTRE, 5.0, 11.0)
    depth += 0.5 * NOSE_HEIGHT * _gauss(gx, gy, NOSE_TIP, 6.0)
    depth -= sum(4.0 * _gauss(gx, gy, e, 7.0) for e in lm[:2])
    depth = cv2.GaussianBlur(depth.astype(np.float32), (0, 0), 2.5)
    grad_y, grad_x = np.gradient(depth)
    norm = np.sqrt(grad_x ** 2 + grad_y ** 2 + 1.0)
    normals = np.dstack([-grad_x / norm, -grad_y / norm, 1.0 / norm]).astype(np.float32)
    head_weight = _soften(head * (gy < 200), 8.0)

    shape_names, shape_basis = _shape_basis(gx, gy)
    expression_names, expression_basis = _expression_basis(gx, gy)
    noise_bank = np.random.default_rng(NOISE_BANK_SEED).standard_normal(
        (NOISE_BANK_SIZE, NOISE_BANK_SIZE, 3), dtype=np.float32)
    return BaseAssets(
        names=names, bases_low=low, bases_detail=(bases - low).astype(np.float32),
        region_names=region_names, regions=regions.astype(np.float32),
        skin_mask=skin_mask.astype(np.float32), lip_mask=lip_mask, hair_mask=hair_mask,
        brow_mask=brow_mask, beard_mask=beard_mask,
        silhouettes=np.stack(outlines).astype(np.float32),
        depth=depth, head_weight=head_weight.astype(np.float32), normals=normals,
        shape_names=shape_names, shape_basis=shape_basis,
        expression_names=expression_names, expression_basis=expression_basis,
        grid_x=gx, grid_y=gy, noise_bank=noise_bank)
