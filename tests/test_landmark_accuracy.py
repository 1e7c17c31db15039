"""bench/landmark_accuracy.py: five points from each annotation scheme, the files it reads,
the error and offset it reports (no detector: those parts are checked on made-up faces)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from utils import write_image

_SPEC = importlib.util.spec_from_file_location(
    "landmark_accuracy", Path(__file__).resolve().parent.parent / "bench" / "landmark_accuracy.py")
la = importlib.util.module_from_spec(_SPEC)
sys.modules["landmark_accuracy"] = la  # its dataclass looks itself up there
_SPEC.loader.exec_module(la)

# Where the made-up faces' five points are: eye centres, nose tip, mouth corners.
EYES = np.array([[30.0, 40.0], [70.0, 40.0]])
NOSE, MOUTH = np.array([50.0, 60.0]), np.array([[35.0, 80.0], [65.0, 80.0]])
FIVE = np.vstack([EYES, NOSE, MOUTH])


def ring(centre: np.ndarray, count: int) -> np.ndarray:
    """``count`` points evenly on a 6x3 ellipse about ``centre`` (their mean is the centre)."""
    a = np.linspace(0, 2 * np.pi, count, endpoint=False)
    return centre + np.stack([6 * np.cos(a), 3 * np.sin(a)], 1)


def ibug68() -> np.ndarray:
    points = np.full((68, 2), 5.0)  # jaw, brows, the rest: not used
    points[36:42], points[42:48] = ring(EYES[0], 6), ring(EYES[1], 6)
    points[30], points[48], points[54] = NOSE, MOUTH[0], MOUTH[1]
    return points


def wflw98() -> np.ndarray:
    points = np.full((98, 2), 5.0)
    points[60:68], points[68:76] = ring(EYES[0], 8), ring(EYES[1], 8)
    points[96:98] = EYES + [0, -2]  # the pupils: not the contour's mean
    points[54], points[76], points[82] = NOSE, MOUTH[0], MOUTH[1]
    return points


def aflw21() -> np.ndarray:
    points = np.full((21, 2), 5.0)  # brows, ears, nose wings, mouth centre, chin: not used
    points[[6, 8]], points[[9, 11]] = EYES[0] + [[-6, 0], [6, 0]], EYES[1] + [[-6, 0], [6, 0]]
    points[7], points[10] = EYES + [0, -2]  # the pupils: AFLW's, not used
    points[14], points[17], points[19] = NOSE, MOUTH[0], MOUTH[1]
    return points


def lfpw29() -> np.ndarray:
    points = np.full((29, 2), 5.0)
    points[[8, 10, 12, 13]], points[[9, 11, 14, 15]] = ring(EYES[0], 4), ring(EYES[1], 4)
    points[20], points[22], points[23] = NOSE, MOUTH[0], MOUTH[1]
    return points


def test_annotations_are_read_from_aflw2000_and_helen_mat_files(tmp_path):
    """AFLW2000-3D's pt2d (2 x 21, 0-based, a point not seen negative: such a face is left
    out when one of its five is) and Zhou et al.'s helen.mat (cells of names and of 2 x 29
    points, 1-based), written here by scipy as Matlab writes them."""
    image = np.zeros((120, 100, 3), np.uint8)
    (tmp_path / "aflw2000").mkdir()
    hidden = aflw21()
    hidden[11] = -1  # the right eye's outer corner not seen
    for name, points in (("seen", aflw21()), ("hidden", hidden)):
        write_image(tmp_path / "aflw2000" / f"{name}.jpg", image)
        scipy.io.savemat(tmp_path / "aflw2000" / f"{name}.mat", {"pt2d": points.T})
    (tmp_path / "helen" / "img").mkdir(parents=True)
    names = np.empty((1, 2), dtype=object)
    names[0, 0], names[0, 1] = "a.jpg", "b.jpg"
    labels = np.empty((1, 2), dtype=object)
    labels[0, 0], labels[0, 1] = (lfpw29() + 1).T, (lfpw29() + 1).T  # Matlab's 1-based
    scipy.io.savemat(tmp_path / "helen" / "helen.mat", {"imgs": names, "Pts": labels})
    write_image(tmp_path / "helen" / "img" / "a.jpg", image)  # b.jpg is missing: left out
    faces = la.load_faces(tmp_path, min_eye_distance=20)
    assert [f.name for f in faces] == ["aflw2000/seen.jpg", "helen/img/a.jpg"]
    for face in faces:
        np.testing.assert_allclose(face.truth, FIVE, atol=1e-9)


def test_halves_alternate_within_each_source():
    faces = [la.Face(f"{source}/{k}.jpg", Path("x"), FIVE) for source, count in
             (("a", 3), ("b", 2)) for k in range(count)]
    halves = la.split_halves(faces)
    assert [[f.name for f in h] for h in halves] == [["a/0.jpg", "a/2.jpg", "b/0.jpg"],
                                                     ["a/1.jpg", "b/1.jpg"]]


def test_five_points_are_the_eye_contour_means_nose_tip_and_mouth_corners():
    np.testing.assert_allclose(la.five_points(ibug68()), FIVE, atol=1e-9)
    np.testing.assert_allclose(la.five_points(wflw98()), FIVE, atol=1e-9)


def test_annotations_are_read_from_pts_and_coco_files_in_0_based_pixels(tmp_path):
    image = np.zeros((120, 100, 3), np.uint8)
    write_image(tmp_path / "menpo" / "face.png", image)
    rows = "\n".join(f"{x + 1:.3f} {y + 1:.3f}" for x, y in ibug68())  # .pts: 1-based
    (tmp_path / "menpo" / "face.pts").write_text(f"version: 1\nn_points: 68\n{{\n{rows}\n}}\n")
    write_image(tmp_path / "wflw" / "two.jpg", image)
    small = (wflw98() - 50) * 0.4 + 50  # eyes 16 px apart: under the minimum
    keypoints = [np.c_[p, np.ones(98)].ravel().tolist() for p in (wflw98(), small)]
    (tmp_path / "wflw" / "test_wflw.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "two.jpg"}],
        "annotations": [{"image_id": 7, "keypoints": k} for k in keypoints]}))
    faces = la.load_faces(tmp_path, min_eye_distance=20)
    assert [f.name for f in faces] == ["menpo/face.png", "wflw/two.jpg#0"]
    for face in faces:
        np.testing.assert_allclose(face.truth, FIVE, atol=1e-3)
        assert face.eye_distance == pytest.approx(40.0, abs=1e-3)
    assert len(la.load_faces(tmp_path, min_eye_distance=10)) == 3


def test_error_and_offset_are_in_the_face_frame_and_removable():
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    face = la.Face("a/b.jpg", Path("b.jpg"), FIVE @ rotation.T)
    along = (face.truth[1] - face.truth[0]) / face.eye_distance
    shifted = face.truth + 0.1 * face.eye_distance * along  # 10% along the eye axis
    face.found["m"] = (shifted, 0.99)
    assert la.error_percent(face, shifted) == pytest.approx(10.0)
    offset = la.mean_offset([face], "m")
    np.testing.assert_allclose(offset, np.tile([0.1, 0.0], (5, 1)), atol=1e-12)
    fixed = la.calibrated(face, shifted, offset)
    assert la.error_percent(face, fixed) == pytest.approx(0, abs=1e-9)


def test_match_takes_the_box_holding_the_face_and_removes_mtcnn_offset():
    face = la.Face("a/b.jpg", Path("b.jpg"), FIVE)
    boxes = np.array([[0, 0, 20, 20], [20, 20, 80, 90], [25, 25, 200, 200]], dtype=float)
    points = np.stack([FIVE + k for k in range(3)]) + 1  # MTCNN's 1-based pixels
    found = la.match(face, (boxes, np.array([0.9, 0.8, 0.7]), points))
    assert found is not None and found[1] == 0.8  # both others miss the centroid or are off
    np.testing.assert_allclose(found[0], FIVE + 1)
    assert la.match(face, (boxes[:1], np.array([0.9]), points[:1])) is None


def test_points_file_is_scored_in_0_based_pixels_whatever_its_origin(tmp_path):
    """Another tool's points (bench/mediapipe_landmarks.py's file): moved from the file's
    origin to MTCNN's pixels by the detector and back by match, so a file whose points are
    the annotation's scores 0 (origin 0) or 1 px per point off (the same numbers, origin 1);
    a photo it does not name has no face; a file that is not one is named in one line."""
    face = la.Face("a/b.jpg", tmp_path / "a" / "b.jpg", FIVE)
    nudged = FIVE + [[3.0, 4.0]] * 5  # every point 5 px off: 12.5% of the 40 px eye distance
    images = {"a/b.jpg": [{"box": [200, 200, 260, 260], "points": (FIVE + 200).tolist()},
                          {"box": [20, 20, 80, 90], "points": nudged.tolist()}]}
    for origin, expected in ((0, 5 / 40 * 100), (1, np.hypot(2, 3) / 40 * 100)):
        path = tmp_path / f"origin{origin}.json"
        path.write_text(json.dumps({"origin": origin, "images": images}))
        found = la.match(face, la.make_detector(f"points:{path}", tmp_path)(face.path))
        assert found is not None
        assert la.error_percent(face, found[0]) == pytest.approx(expected)
    other = la.Face("a/c.jpg", tmp_path / "a" / "c.jpg", FIVE)
    assert la.match(other, la.make_detector(f"points:{path}", tmp_path)(other.path)) is None
    assert la.method_name(f"points:{path}") == "origin1"
    (tmp_path / "bad.json").write_text(json.dumps({"images": images}))  # no origin
    with pytest.raises(SystemExit, match=r"error: .*bad\.json: not a points file"):
        la.make_detector(f"points:{tmp_path / 'bad.json'}", tmp_path)
