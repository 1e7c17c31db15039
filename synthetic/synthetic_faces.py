"""Synthetic LFW-style face identities, made on the spot from two public photographs.

No face dataset can be downloaded here, so the tests and ``make demo`` use faces built from
the photographs that installed packages ship: ``skimage.data.astronaut()`` (public domain)
and matplotlib's sample ``grace_hopper.jpg``. Both, and their mirror images, are placed by
their five MTCNN landmarks in one canonical face frame (synthetic_faces_assets.py), so every
trait of an identity lives in the coordinates that face alignment restores.

An identity (:func:`make_identity`, fixed by its seed) is: per region (eyes and brows, nose,
mouth, skin, hair, body) a blend of the base faces, the fine skin detail (wrinkles) blended on
its own; local shape changes (eye size, spacing and height, brows, nose, mouth, lips, jaw,
chin, forehead, face width, cheeks); skin tone inside a skin mask; lip, hair and brow colour;
stubble; moles and freckles.

An image (:func:`render_image`) adds a pseudo-3D yaw and pitch from a depth map, in-plane
rotation, scale and offset, an expression, side lighting, a random background outside the
head, colour and blur changes, sensor noise and JPEG compression (quality 30-95), in a
250x250 canvas like LFW's.

:func:`generate_dataset` writes training identities to ``train/<name>/<name>_0001.jpg`` and
held-out identities to ``lfw/<name>/...`` with ``lfw/pairs.txt`` in LFW's format. The two
splits never share an identity seed (:func:`identity_seed`) or a name (:func:`identity_name`).
Like LFW's view 2, pairs.txt puts each held-out identity in one fold when there are at least
two identities per fold (else all folds draw distinct pairs from all identities; the summary
says which); pairs per fold default to LFW's 300 or as many as the set allows.

Determinism: each image is seeded by (identity seed, image number) alone, so its bytes do not
depend on what an earlier run already wrote (a rerun only fills in missing files) nor on
``workers``; OpenCV runs on one thread (utils) and no BLAS call touches pixels, so one seed
gives the same bytes on one machine every time (other CPUs or library builds may differ in
the last bits of float arithmetic).

The base photos' landmarks are a table measured once with facenet-pytorch's MTCNN (the tests
re-measure them), so generation needs neither torch nor MTCNN. Cost: about 8 ms of one core
per image (identity construction included); 200x15 + 100x10 images take ~33 s CPU.

    python synthetic_faces.py --identities 200 --images-per-identity 15 --out data/synth
"""

from __future__ import annotations

import argparse
import itertools
import math
import multiprocessing
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import utils  # imported first: sets cv2.setNumThreads(1) for deterministic, fork-safe OpenCV
from synthetic.synthetic_faces_assets import CANVAS, CENTRE_X, HEAD_CENTRE, load_base_assets
from utils import (
    add_debug_flag,
    atomic_write_bytes,
    atomic_write_text,
    decode_image,
    encode_image,
    get_logger,
    run_cli,
)

cv2 = utils.cv2

# Identity seeds are (seed * 2 + split) * IDENTITY_STRIDE + index: the training (split 0) and
# held-out (split 1) identities of one run can never share a seed.
IDENTITY_STRIDE = 1_000_000
TRAIN_SPLIT, EVAL_SPLIT = 0, 1
IDENTITY_SALT = 0x1D  # keeps the identity and image random streams of one seed apart
IMAGE_SALT = 0x1A
PAIRS_SALT = 0x9A

LFW_PAIRS_PER_FOLD = 300  # LFW's view 2: 10 folds of 300 same + 300 different pairs
LFW_FOLDS = 10

# --- identity traits
BLEND_CONCENTRATION = 0.6  # Dirichlet over base faces per region: mostly one, sometimes mixed
DETAIL_CONCENTRATION = 0.5
LIGHT_SKIN_GAIN = np.array([1.06, 1.0, 0.96])
DARK_SKIN_GAIN = np.array([0.5, 0.37, 0.3])
LIP_COLOUR = np.array([0.75, 0.33, 0.35])
HAIR_COLOURS = np.array([
    [0.10, 0.08, 0.07],  # black
    [0.30, 0.20, 0.13],  # dark brown
    [0.52, 0.36, 0.22],  # brown
    [0.62, 0.30, 0.16],  # auburn
    [0.85, 0.70, 0.45],  # blond
    [0.72, 0.72, 0.72],  # grey
])
MOLE_COLOUR = np.array([0.3, 0.2, 0.15], np.float32)  # multiplies the skin under a mole
MAX_MOLES = 4
SILHOUETTE_SHARPNESS = 3.0
STUBBLE_PROBABILITY = 0.3
FRECKLE_PROBABILITY = 0.2

# --- per-image variation (degrees, pixels, fractions of full scale)
MAX_YAW_DEG = 28.0
MAX_PITCH_DEG = 14.0
MAX_ROLL_DEG = 12.0
SCALE_RANGE = (0.86, 1.14)
MAX_OFFSET_PX = 9.0
MAX_LIGHT_AZIMUTH_DEG = 75.0
LIGHT_ELEVATION_DEG = (-20.0, 45.0)
LIGHT_STRENGTH = (0.15, 0.75)
LIGHT_GAIN = 1.25  # a face lit head-on comes out slightly brighter than unlit
BACKGROUND_DRAW_SIZE = 64
JPEG_QUALITY_RANGE = (30, 95)
NOISE_SIGMA_RANGE = (1.0, 7.0)  # 0-255 units
BLUR_PROBABILITY = 0.6
BLUR_SIGMA_RANGE = (0.3, 1.4)
GAMMA_RANGE = (0.8, 1.25)


@dataclass
class Identity:
    """One synthetic person: an RGBA texture in the canonical frame and the traits drawn.

    ``texture`` is float32 HxWx4 in [0, 1]: RGB, then the head-neck-shoulders silhouette that
    separates the person from each image's background."""

    seed: int
    texture: np.ndarray
    traits: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- identities

def _stamp_dot(canvas: np.ndarray, cx: float, cy: float, radius: float, value: float) -> None:
    """Raise ``canvas`` to ``value`` inside an anti-aliased disk (in place, on its window)."""
    r = int(math.ceil(radius + 1))
    x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 2, canvas.shape[1])
    y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 2, canvas.shape[0])
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    disk = np.clip(radius + 0.5 - np.hypot(xx - cx, yy - cy), 0.0, 1.0) * np.float32(value)
    np.maximum(canvas[y0:y1, x0:x1], disk, out=canvas[y0:y1, x0:x1])


def _weighted_sum(coefs: np.ndarray, arrays: np.ndarray) -> np.ndarray:
    """``out[i] = sum_k coefs[i, k] * arrays[k]`` by plain element-wise float32 arithmetic,
    in a fixed order: a BLAS product could split the work across threads differently from
    one machine or thread count to the next and change the last bits (and the JPEG bytes)."""
    out = np.zeros((len(coefs),) + arrays.shape[1:], np.float32)
    for i, row in enumerate(np.asarray(coefs, np.float32)):
        for k, c in enumerate(row):
            out[i] += c * arrays[k]
    return out


def make_identity(seed: int) -> Identity:
    """The identity fixed by ``seed`` (non-negative int); a few milliseconds, deterministic."""
    if int(seed) < 0:
        raise ValueError(f"identity seed must be non-negative, got {seed}")
    a = load_base_assets()
    rng = np.random.default_rng([int(seed), IDENTITY_SALT])
    n_bases, traits = len(a.names), {}

    # Per-region blend of the base faces; the skin's fine detail has its own blend ("age").
    region_w = rng.dirichlet(np.full(n_bases, BLEND_CONCENTRATION), size=len(a.region_names))
    detail_w = rng.dirichlet(np.full(n_bases, DETAIL_CONCENTRATION))
    for r, region in enumerate(a.region_names):
        traits.update({f"blend_{region}_{a.names[b]}": float(region_w[r, b])
                       for b in range(n_bases)})
    weights = _weighted_sum(region_w.T, a.regions)  # B x H x W
    skin = a.regions[a.region_names.index("skin")]
    detail_weights = skin * detail_w[:, None, None].astype(np.float32) + (1.0 - skin) * weights
    texture = sum(weights[b, ..., None] * a.bases_low[b]
                  + detail_weights[b, ..., None] * a.bases_detail[b] for b in range(n_bases))
    # Blended outlines would leave a half-transparent ring where the faces' outlines differ:
    # re-sharpen the blend into one edge.
    silhouette = sum(weights[b] * a.silhouettes[b] for b in range(n_bases))
    silhouette = np.clip((silhouette - 0.5) * SILHOUETTE_SHARPNESS + 0.5, 0.0, 1.0)

    # Skin tone: a colour gain inside the skin mask, from light to dark.
    darkness = rng.beta(1.3, 1.8)
    tone = ((1.0 - darkness) * LIGHT_SKIN_GAIN + darkness * DARK_SKIN_GAIN) \
        * np.exp(rng.normal(0.0, 0.05, 3))
    texture *= 1.0 + a.skin_mask[..., None] * (tone.astype(np.float32) - 1.0)
    traits["skin_darkness"] = float(darkness)

    # Lips: blend toward a lip colour that keeps the lips' own shading.
    lip_rgb = (LIP_COLOUR * np.exp(rng.normal(0.0, 0.18, 3))).astype(np.float32)
    lips = a.lip_mask[..., None] * np.float32(rng.uniform(0.2, 0.65))
    lum = cv2.cvtColor(texture, cv2.COLOR_RGB2GRAY)[..., None]
    texture = texture * (1 - lips) + lips * np.clip(1.6 * lum * lip_rgb, 0, 1)

    # Hair: a new colour over the old luminance pattern, scaled to a set mean brightness.
    lum = cv2.cvtColor(texture, cv2.COLOR_RGB2GRAY)[..., None]
    mean_lum = float((lum[..., 0] * a.hair_mask).sum() / max(a.hair_mask.sum(), 1.0))
    hair_rgb = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * np.exp(rng.normal(0, 0.1, 3))
    hair_rgb = (hair_rgb * 0.5 / max(mean_lum, 1e-3)).astype(np.float32)
    hair = a.hair_mask[..., None] * np.float32(rng.uniform(0.55, 0.95))
    hair_new = np.clip(lum * hair_rgb, 0, 1)
    texture = texture * (1 - hair) + hair * hair_new
    texture *= 1.0 + a.brow_mask[..., None] * np.float32(rng.uniform(-0.55, 0.15))

    if rng.random() < STUBBLE_PROBABILITY:  # a fixed fine dark speckle over the lower face
        speckle = (rng.random(texture.shape[:2]) > 0.55).astype(np.float32)
        speckle = cv2.GaussianBlur(speckle, (0, 0), 0.6)
        strength = rng.uniform(0.15, 0.4)
        texture *= 1.0 - (strength * a.beard_mask * speckle)[..., None]
        traits["stubble"] = float(strength)

    # Moles and freckles at fixed places inside the skin.
    ys, xs = np.nonzero(a.skin_mask > 0.8)
    spots = np.zeros(texture.shape[:2], np.float32)
    n_moles = int(rng.integers(0, MAX_MOLES + 1))
    for _ in range(n_moles):
        k = rng.integers(len(xs))
        _stamp_dot(spots, xs[k] + rng.uniform(-.5, .5), ys[k] + rng.uniform(-.5, .5),
                   rng.uniform(1.2, 2.8), rng.uniform(0.5, 0.85))
    traits["moles"] = float(n_moles)
    if rng.random() < FRECKLE_PROBABILITY:
        for _ in range(int(rng.integers(20, 60))):
            k = rng.integers(len(xs))
            _stamp_dot(spots, float(xs[k]), float(ys[k]), 0.8, rng.uniform(0.15, 0.35))
    texture *= 1.0 - spots[..., None] * (1.0 - MOLE_COLOUR)

    # Face shape: one smooth backward displacement field moves every feature at once.
    coefs = rng.uniform(-1.0, 1.0, len(a.shape_names)).astype(np.float32)
    traits.update({f"shape_{n}": float(c) for n, c in zip(a.shape_names, coefs, strict=True)})
    disp = _weighted_sum(coefs[None], a.shape_basis)[0]
    rgba = np.ascontiguousarray(
        np.concatenate([np.clip(texture, 0, 1), silhouette[..., None]], axis=2), np.float32)
    rgba = cv2.remap(rgba, a.grid_x + disp[0], a.grid_y + disp[1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)
    return Identity(seed=int(seed), texture=rgba, traits=traits)


# ----------------------------------------------------------------------------- images

def _background(rng: np.random.Generator) -> np.ndarray:
    """A random smooth scene: a low-frequency colour field with a few blurred blocks (drawn
    at a quarter of the size, then enlarged: the same look at a fraction of the cost)."""
    k = int(rng.integers(2, 7))
    level, spread = rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.6)
    small = (level + spread * (rng.random((k, k, 3)) - 0.5)).astype(np.float32)
    bg = cv2.resize(small, (BACKGROUND_DRAW_SIZE, BACKGROUND_DRAW_SIZE),
                    interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.integers(0, BACKGROUND_DRAW_SIZE, 2)
        w, h = rng.integers(3, BACKGROUND_DRAW_SIZE // 2, 2)
        colour = tuple(float(c) for c in rng.random(3))
        cv2.rectangle(bg, (int(x0), int(y0)), (int(x0 + w), int(y0 + h)), colour, thickness=-1)
    bg = cv2.GaussianBlur(bg, (0, 0), rng.uniform(0.3, 1.3))
    return cv2.resize(bg, (CANVAS, CANVAS), interpolation=cv2.INTER_LINEAR)


def _pose_displacement(fields: np.ndarray, px: np.ndarray, py: np.ndarray,
                       yaw: float, pitch: float) -> tuple[np.ndarray, ...]:
    """Forward pseudo-3D displacement at canonical points (px, py) for a head turned by
    ``yaw`` and ``pitch`` about its centre; also returns the expression field there.

    ``fields`` holds [depth * head weight, head weight, expression x, expression y]."""
    f = cv2.remap(fields, px, py, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    zw, w = f[..., 0], f[..., 1]
    dx = w * (px - CENTRE_X) * (math.cos(yaw) - 1.0) + zw * math.sin(yaw)
    dy = w * (py - HEAD_CENTRE[1]) * (math.cos(pitch) - 1.0) - zw * math.sin(pitch)
    return dx, dy, f[..., 2], f[..., 3]


def render_jpeg(identity: Identity, rng: np.random.Generator) -> bytes:
    """One image of ``identity`` as the JPEG bytes that the dataset files hold."""
    a = load_base_assets()
    yaw = math.radians(rng.uniform(-MAX_YAW_DEG, MAX_YAW_DEG))
    pitch = math.radians(rng.uniform(-MAX_PITCH_DEG, MAX_PITCH_DEG))
    roll = math.radians(rng.uniform(-MAX_ROLL_DEG, MAX_ROLL_DEG))
    scale = rng.uniform(*SCALE_RANGE)
    offset = rng.uniform(-MAX_OFFSET_PX, MAX_OFFSET_PX, 2)
    expression = rng.uniform(-1.0, 1.0, len(a.expression_names)).astype(np.float32)
    expression[a.expression_names.index("open")] = rng.uniform(0.0, 1.0)

    # Side lighting on the depth map's normals (image y points down, so "above" is -y).
    azimuth = math.radians(rng.uniform(-MAX_LIGHT_AZIMUTH_DEG, MAX_LIGHT_AZIMUTH_DEG))
    elevation = math.radians(rng.uniform(*LIGHT_ELEVATION_DEG))
    light = np.array([[math.sin(azimuth) * math.cos(elevation), -math.sin(elevation),
                       math.cos(azimuth) * math.cos(elevation)]], np.float32)
    strength = rng.uniform(*LIGHT_STRENGTH)
    lambert = np.clip(cv2.transform(a.normals, light), 0.0, 1.0)
    shade = ((1.0 - strength) + strength * LIGHT_GAIN * lambert).astype(np.float32)
    texture = identity.texture * cv2.merge([shade, shade, shade, np.ones_like(shade)])

    # Output pixel -> canonical point: inverse of (rotate by roll, scale, shift) about the
    # canvas centre, then the inverse pseudo-3D turn by one fixed-point step, + expression.
    centre = CANVAS / 2.0
    cos_r, sin_r = math.cos(roll) / scale, math.sin(roll) / scale
    qx, qy = a.grid_x - np.float32(centre + offset[0]), a.grid_y - np.float32(centre + offset[1])
    px = cos_r * qx + sin_r * qy + np.float32(centre)
    py = -sin_r * qx + cos_r * qy + np.float32(centre)
    mix = expression[None]
    fields = cv2.merge([a.depth * a.head_weight, a.head_weight,
                        cv2.transform(a.expression_basis[0], mix),
                        cv2.transform(a.expression_basis[1], mix)])
    dx, dy, _, _ = _pose_displacement(fields, px, py, yaw, pitch)
    dx, dy, ex, ey = _pose_displacement(fields, px - dx, py - dy, yaw, pitch)
    person = cv2.remap(texture, px - dx + ex, py - dy + ey, cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE)
    alpha = person[..., 3:4]
    image = person[..., :3] * alpha + _background(rng) * (1.0 - alpha)

    # Camera: white balance, exposure, saturation, contrast, then gamma, blur, noise, JPEG.
    image *= (np.exp(rng.normal(0.0, 0.07, 3)) * rng.uniform(0.7, 1.2)).astype(np.float32)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
    image = grey + np.float32(rng.uniform(0.6, 1.3)) * (image - grey)
    mean = np.float32(grey.mean())
    image = mean + np.float32(rng.uniform(0.8, 1.2)) * (image - mean)
    image = cv2.pow(np.clip(image, 0.0, 1.0), rng.uniform(*GAMMA_RANGE))
    if rng.random() < BLUR_PROBABILITY:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(*BLUR_SIGMA_RANGE))
    oy, ox = rng.integers(0, a.noise_bank.shape[0] - CANVAS + 1, 2)
    noise = a.noise_bank[oy:oy + CANVAS, ox:ox + CANVAS]
    image = image * np.float32(255.0) + noise * np.float32(rng.uniform(*NOISE_SIGMA_RANGE))
    pixels = np.clip(image + np.float32(0.5), 0, 255).astype(np.uint8)
    quality = int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1))
    return encode_image(pixels, ".jpg", quality)


def render_image(identity: Identity, rng: np.random.Generator) -> np.ndarray:
    """One image of ``identity``: RGB uint8 250x250x3, exactly what its JPEG file decodes to
    (JPEG compression included). ``image_rng(identity.seed, k)`` gives dataset image k."""
    return decode_image(render_jpeg(identity, rng), source=f"identity {identity.seed}")


# ----------------------------------------------------------------------------- names, seeds

_NAME_PARTS = (
    ("Al", "Be", "Ca", "Da", "E", "Fa", "Ga", "Ha", "I", "Jo", "Ka", "Le", "Ma", "Ni", "O", "Pe",
     "Ra", "Sa", "Te", "Va"),
    ("bel", "dan", "der", "ric", "lia", "mon", "na", "ra", "ren", "sa", "ton", "vin", "ya",
     "lo", "mir", "nor", "ssa", "tha", "vi", "zo"),
    ("Ab", "Bar", "Cor", "Dun", "El", "Fen", "Gor", "Hal", "Ing", "Kel", "Lor", "Mar", "Nor",
     "Or", "Pra", "Quin", "Ros", "Sto", "Tal", "Wes"),
    ("bury", "dale", "en", "ford", "gate", "ham", "ley", "ling", "man", "mont", "ner", "ova",
     "rick", "son", "ston", "ter", "ville", "well", "win", "ez"),
)
_NAME_RADIX = [len(p) for p in _NAME_PARTS]
_NAME_COUNT = math.prod(_NAME_RADIX)  # 160,000 distinct names
_NAME_STEP = 7_919  # coprime with _NAME_COUNT: consecutive indices get unrelated names
_SYNTHETIC_NAME = re.compile("({})({})_({})({})".format(*("|".join(p) for p in _NAME_PARTS)))


def is_synthetic_name(name: str) -> bool:
    """Whether ``name`` is one that :func:`identity_name` gives (any split, any index): every
    code maps to one name, so a name is synthetic exactly when it is four of the parts."""
    return _SYNTHETIC_NAME.fullmatch(name) is not None


def identity_name(split: int, index: int) -> str:
    """LFW-like ``First_Last`` name, unique over both splits of up to 80,000 identities each:
    training identities count up from code 0, held-out ones down from the last code."""
    half = _NAME_COUNT // 2
    if not 0 <= index < half:
        raise ValueError(f"identity index {index} out of range 0..{half - 1}")
    code = index if split == TRAIN_SPLIT else _NAME_COUNT - 1 - index
    code = code * _NAME_STEP % _NAME_COUNT
    parts = []
    for radix, options in zip(_NAME_RADIX, _NAME_PARTS, strict=True):
        code, digit = divmod(code, radix)
        parts.append(options[digit])
    return f"{parts[0]}{parts[1]}_{parts[2]}{parts[3]}"


def identity_seed(seed: int, split: int, index: int) -> int:
    """The identity seed of identity ``index`` of ``split`` in a run seeded ``seed``."""
    if seed < 0 or not 0 <= index < IDENTITY_STRIDE:
        raise ValueError(f"need seed >= 0 and 0 <= index < {IDENTITY_STRIDE}")
    return (seed * 2 + split) * IDENTITY_STRIDE + index


def image_rng(seed_of_identity: int, image_number: int) -> np.random.Generator:
    """The random stream of one image: (identity seed, 1-based image number) alone."""
    return np.random.default_rng([seed_of_identity, image_number, IMAGE_SALT])


def image_path(root: Path, name: str, image_number: int) -> Path:
    """LFW's layout: ``root/name/name_0001.jpg``."""
    return root / name / f"{name}_{image_number:04d}.jpg"


# ----------------------------------------------------------------------------- pairs.txt

def make_pairs(counts: dict[str, int], folds: int, pairs_per_fold: int | None,
               rng: np.random.Generator) -> tuple[list[tuple[list, list]], int, bool]:
    """Draw LFW-style verification folds from identities with ``counts[name]`` images.

    Like LFW's view 2, each identity goes to one fold (round-robin after a shuffle), so folds
    are identity-disjoint, when every fold can get at least two identities; with fewer
    identities all folds draw from all of them (the pairs are still all distinct).
    Returns ([(same, different)] per fold, pairs per fold, identity_disjoint)."""
    names = sorted(counts)
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    if len(names) < 2 or min(counts.values()) < 2:
        raise ValueError("pairs need at least 2 identities with at least 2 images each")
    disjoint = len(names) >= 2 * folds
    order = [names[i] for i in rng.permutation(len(names))]
    groups = [sorted(order[f::folds]) for f in range(folds)] if disjoint else [names]

    def same_pool(group: list[str]) -> list[tuple]:
        return [(n, i, j) for n in group
                for i, j in itertools.combinations(range(1, counts[n] + 1), 2)]

    def different_capacity(group: list[str]) -> int:
        sizes = [counts[n] for n in group]
        return (sum(sizes) ** 2 - sum(s * s for s in sizes)) // 2

    # Without disjoint folds, one pool is shared: capacities are split between the folds.
    share = 1 if disjoint else folds
    capacity = min(min(len(same_pool(g)), different_capacity(g)) // share for g in groups)
    n = min(LFW_PAIRS_PER_FOLD, capacity) if pairs_per_fold is None else pairs_per_fold
    if not 1 <= n <= capacity:
        raise ValueError(f"pairs_per_fold={pairs_per_fold}: these identities allow 1..{capacity} "
                         f"same and different pairs per fold")
    result: list[tuple[list, list]] = []
    if disjoint:
        for group in groups:
            pool = same_pool(group)
            same = [pool[k] for k in rng.choice(len(pool), n, replace=False)]
            result.append((sorted(same), sorted(_different_pairs(group, counts, n, set(), rng))))
    else:
        pool = same_pool(names)
        picked = [pool[k] for k in rng.choice(len(pool), n * folds, replace=False)]
        used: set[tuple] = set()
        for f in range(folds):
            different = _different_pairs(names, counts, n, used, rng)
            used.update(different)
            result.append((sorted(picked[f * n:(f + 1) * n]), sorted(different)))
    return result, n, disjoint


def _different_pairs(group: list[str], counts: dict[str, int], n: int, exclude: set,
                     rng: np.random.Generator) -> list[tuple]:
    """``n`` distinct different-person pairs (n1, i, n2, j) with n1 < n2, none in ``exclude``;
    drawn by rejection (the caller checked there are enough)."""
    chosen: set[tuple] = set()
    while len(chosen) < n:
        a, b = sorted(rng.choice(len(group), 2, replace=False))
        pair = (group[a], int(rng.integers(1, counts[group[a]] + 1)),
                group[b], int(rng.integers(1, counts[group[b]] + 1)))
        if pair not in exclude:
            chosen.add(pair)
    return sorted(chosen)


def format_pairs(folds: list[tuple[list, list]], n: int) -> str:
    """LFW's pairs.txt text: ``folds<TAB>n``, then per fold n same lines, n different lines."""
    lines = [f"{len(folds)}\t{n}"]
    for same, different in folds:
        lines += [f"{a}\t{i}\t{j}" for a, i, j in same]
        lines += [f"{a}\t{i}\t{b}\t{j}" for a, i, b, j in different]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- dataset

def _exists(path: Path) -> bool:
    """A finished image: writes are atomic, but an empty file (a full disk) is redone."""
    return path.is_file() and path.stat().st_size > 0


def _render_identity(job: tuple[Path, str, int, list[int]]) -> int:
    """Write the listed images of one identity; returns how many (a pool worker's task)."""
    root, name, seed_of_identity, numbers = job
    identity = make_identity(seed_of_identity)
    for k in numbers:
        atomic_write_bytes(image_path(root, name, k),
                           render_jpeg(identity, image_rng(seed_of_identity, k)))
    return len(numbers)


def generate_dataset(out_dir: str | Path, train_identities: int = 200, train_images: int = 15,
                     eval_identities: int = 100, eval_images: int = 10, folds: int = LFW_FOLDS,
                     pairs_per_fold: int | None = None, seed: int = 0,
                     progress: bool = True, workers: int = 1) -> dict[str, Any]:
    """Write ``out_dir/train/<name>/<name>_0001.jpg`` (training identities) and
    ``out_dir/lfw/<name>/...`` plus ``out_dir/lfw/pairs.txt`` (held-out identities, disjoint
    seeds and names). Images that already exist are kept (a rerun resumes); pairs.txt is
    rewritten (it is deterministic). ``workers`` > 1 renders identities in that many
    processes: the bytes are the same for any number. Returns a summary dict."""
    for label, value, low in (("train_identities", train_identities, 0),
                              ("train_images", train_images, 1),
                              ("eval_identities", eval_identities, 2),
                              ("eval_images", eval_images, 2), ("seed", seed, 0),
                              ("workers", workers, 1)):
        if int(value) < low:
            raise ValueError(f"{label} must be >= {low}, got {value}")
    start = time.perf_counter()
    out = Path(out_dir)
    train_dir, lfw_dir = out / "train", out / "lfw"
    jobs = [(train_dir, identity_name(TRAIN_SPLIT, i), identity_seed(seed, TRAIN_SPLIT, i),
             train_images) for i in range(train_identities)]
    jobs += [(lfw_dir, identity_name(EVAL_SPLIT, i), identity_seed(seed, EVAL_SPLIT, i),
              eval_images) for i in range(eval_identities)]
    # Pairs first: a bad fold/pair request fails before minutes of rendering.
    eval_counts = {name: n for root, name, _, n in jobs if root == lfw_dir}
    pair_folds, n_pairs, disjoint = make_pairs(
        eval_counts, folds, pairs_per_fold, np.random.default_rng([seed, PAIRS_SALT]))

    pending = []
    for root, name, id_seed, n_images in jobs:
        missing = [k for k in range(1, n_images + 1) if not _exists(image_path(root, name, k))]
        if missing:
            pending.append((root, name, id_seed, missing))
    total = sum(job[3] for job in jobs)
    written = sum(len(job[3]) for job in pending)
    with tqdm(total=total, desc="synthetic faces", unit="img", disable=not progress) as bar:
        bar.update(total - written)
        if workers == 1 or len(pending) < 2:
            for job in pending:
                bar.update(_render_identity(job))
        else:  # spawn: fresh workers, no state forked from a parent that may run threads

            with multiprocessing.get_context("spawn").Pool(min(workers, len(pending))) as pool:
                for count in pool.imap_unordered(_render_identity, pending):
                    bar.update(count)
    pairs_path = lfw_dir / "pairs.txt"
    atomic_write_text(pairs_path, format_pairs(pair_folds, n_pairs))
    return {
        "out_dir": str(out), "train_dir": str(train_dir), "lfw_dir": str(lfw_dir),
        "pairs": str(pairs_path), "train_identities": train_identities,
        "train_images": train_identities * train_images, "eval_identities": eval_identities,
        "eval_images": eval_identities * eval_images, "folds": folds,
        "pairs_per_fold": n_pairs, "folds_identity_disjoint": disjoint, "written": written,
        "skipped": total - written, "seed": seed,
        "seconds": round(time.perf_counter() - start, 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description="Generate synthetic LFW-style face identities (training tree, held-out "
                    "LFW tree and pairs.txt) from two public photographs.")
    add_debug_flag(parser)
    parser.add_argument("--identities", type=int, default=200, help="training identities")
    parser.add_argument("--images-per-identity", type=int, default=15,
                        help="images per training identity")
    parser.add_argument("--eval-identities", type=int, default=100,
                        help="held-out identities (lfw/), disjoint from the training ones")
    parser.add_argument("--eval-images", type=int, default=10,
                        help="images per held-out identity")
    parser.add_argument("--folds", type=int, default=LFW_FOLDS, help="folds in pairs.txt")
    parser.add_argument("--pairs-per-fold", type=int, default=None,
                        help=f"same (and different) pairs per fold; default: "
                             f"{LFW_PAIRS_PER_FOLD} or as many as the held-out set allows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="data/synth", help="output folder")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes rendering identities (same bytes for any number)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    log = get_logger("synthetic_faces")
    try:
        summary = generate_dataset(
            args.out, train_identities=args.identities, train_images=args.images_per_identity,
            eval_identities=args.eval_identities, eval_images=args.eval_images,
            folds=args.folds, pairs_per_fold=args.pairs_per_fold, seed=args.seed,
            progress=not args.no_progress, workers=args.workers)
    except ValueError as e:
        parser.error(str(e))
    log.info("wrote %d images (%d already there) in %.1f s", summary["written"],
             summary["skipped"], summary["seconds"])
    log.info("training identities: %s (%d x %d images)", summary["train_dir"],
             args.identities, args.images_per_identity)
    log.info("held-out identities: %s (%d x %d images)", summary["lfw_dir"],
             args.eval_identities, args.eval_images)
    log.info("pairs: %s (%d folds x %d same + %d different%s)", summary["pairs"],
             summary["folds"], summary["pairs_per_fold"], summary["pairs_per_fold"],
             "" if summary["folds_identity_disjoint"] else "; folds share identities")
    return summary


def _script(argv: list[str]) -> int:
    """The script's exit status: 0 once :func:`main` has written the data set (main returns
    its summary, which run_cli cannot take as a status)."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(_script))
