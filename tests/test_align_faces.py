"""align_faces: similarity estimation, warping, face choice, MTCNN on a real photo, the CLI."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import recordio_testlib as lib
from skimage import data
from skimage.transform import SimilarityTransform

import align_faces as af
from faces import aligner as faces_aligner
from faces import face_warp as fw
from faces import file_alignment as fa
from faces import mtcnn_cascade as mc
from utils import write_image

TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]])  # the values


def similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    """3x3 homogeneous similarity x -> s R x + t, written out."""
    a = np.deg2rad(degrees)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx],
                     [scale * np.sin(a), scale * np.cos(a), ty],
                     [0.0, 0.0, 1.0]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def test_reference_landmarks_are_the_arcface_template():
    assert fw.REFERENCE_LANDMARKS.dtype == np.float32 and fw.REFERENCE_LANDMARKS.shape == (5, 2)
    np.testing.assert_allclose(fw.REFERENCE_LANDMARKS, TEMPLATE, atol=1e-4)


def test_estimate_similarity_matches_skimage_on_noisy_points():
    rng = np.random.default_rng(0)
    for trial in range(20):
        truth = similarity(rng.uniform(0.2, 3), rng.uniform(-180, 180), *rng.uniform(-200, 200, 2))
        src = apply(np.linalg.inv(truth), TEMPLATE) + rng.normal(0, 3, (5, 2))
        ours = fw.estimate_similarity(src)
        # the default reference is the float32 template: give skimage the same numbers
        ref = SimilarityTransform.from_estimate(src, fw.REFERENCE_LANDMARKS.astype(np.float64))
        assert ours.shape == (2, 3) and ours.dtype == np.float64
        np.testing.assert_allclose(ours, ref.params[:2], atol=1e-6, err_msg=f"trial {trial}")


def test_estimate_similarity_recovers_a_known_similarity_exactly():
    truth = similarity(0.43, 23.0, -31.0, 12.5)  # source image -> template frame
    landmarks = apply(np.linalg.inv(truth), TEMPLATE)
    matrix = fw.estimate_similarity(landmarks)
    np.testing.assert_allclose(matrix, truth[:2], atol=1e-9)
    assert np.abs(apply(matrix, landmarks) - TEMPLATE).max() < 0.1
    # a crop of another size uses the template scaled by size / 112
    big = fw.estimate_similarity(landmarks, fw.template_for_size(224))
    assert np.abs(apply(big, landmarks) - 2 * TEMPLATE).max() < 0.1


def _rotation_costs(p: np.ndarray, q: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """min over s >= 0 of sum_i ||s R(a) p_i - q_i||^2 for each angle a (centred points)."""
    a = angles[:, None, None]
    rp = np.concatenate([np.cos(a) * p[:, :1] - np.sin(a) * p[:, 1:],
                         np.sin(a) * p[:, :1] + np.cos(a) * p[:, 1:]], axis=2)
    s = np.clip((rp * q).sum(axis=(1, 2)) / (p ** 2).sum(), 0, None)[:, None, None]
    return ((s * rp - q) ** 2).sum(axis=(1, 2))


def test_estimate_similarity_never_mirrors_even_when_a_reflection_fits_better():
    """Mirrored landmarks (left and right swapped, as a mirror image gives them): a
    reflection would fit them exactly, yet the fit must be a rotation with s > 0, the least-
    squares best among rotations: brute force over the angle in float64, the optimal scale
    and translation written out for each."""
    rng = np.random.default_rng(5)
    for trial in range(5):
        truth = similarity(rng.uniform(0.3, 2), rng.uniform(-180, 180), *rng.uniform(-90, 90, 2))
        src = apply(np.linalg.inv(truth), TEMPLATE) * [-1.0, 1.0] + rng.normal(0, 0.5, (5, 2))
        ours = fw.estimate_similarity(src, TEMPLATE)
        rotation = ours[:, :2] / np.sqrt(np.linalg.det(ours[:, :2]))
        assert np.linalg.det(ours[:, :2]) > 0
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(2), atol=1e-12)
        p, q = src - src.mean(0), TEMPLATE - TEMPLATE.mean(0)
        coarse = np.linspace(-np.pi, np.pi, 36001)  # 1.7e-4 rad apart, then 2e-8 around
        near = coarse[np.argmin(_rotation_costs(p, q, coarse))]
        best = _rotation_costs(p, q, np.linspace(near - 2e-4, near + 2e-4, 20001)).min()
        cost = ((apply(np.vstack([ours, [0, 0, 1]]), src) - TEMPLATE) ** 2).sum()
        assert best - 1e-9 <= cost <= best + 1e-9, (trial, cost, best)


def test_estimate_similarity_rejects_degenerate_input():
    with pytest.raises(ValueError, match="degenerate"):
        fw.estimate_similarity(np.ones((5, 2)))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        fw.estimate_similarity(np.ones((4, 2)))


def test_warp_face_puts_dots_on_the_template():
    """A source image rendered analytically as the template-frame pattern (Gaussian dots at
    the template points) seen through a known similarity; warping it back must put the
    dots' centroids on the template within 0.1 px."""
    truth = similarity(0.45, -17.0, -60.0, 10.0)  # source -> template frame
    landmarks = apply(np.linalg.inv(truth), TEMPLATE)
    h, w = 320, 300
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    u = truth[0, 0] * xs + truth[0, 1] * ys + truth[0, 2]  # template-frame coordinates
    v = truth[1, 0] * xs + truth[1, 1] * ys + truth[1, 2]
    sigma = 1.6  # template pixels
    pattern = sum(np.exp(-((u - px) ** 2 + (v - py) ** 2) / (2 * sigma ** 2))
                  for px, py in TEMPLATE)
    gray = np.round(255 * pattern).clip(0, 255).astype(np.uint8)
    image = np.stack([gray, gray // 2, 255 - gray], axis=2)  # distinct channels: RGB kept
    crop = fw.warp_face(image, landmarks)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    # channel order unchanged: the warp is linear, so each channel keeps its relation
    # (only where the crop samples inside the source; outside is the black border)
    back = np.linalg.inv(truth)
    cy, cx = np.mgrid[0:112, 0:112].astype(np.float64)
    sx = back[0, 0] * cx + back[0, 1] * cy + back[0, 2]
    sy = back[1, 0] * cx + back[1, 1] * cy + back[1, 2]
    inside = (sx >= 1) & (sx <= w - 2) & (sy >= 1) & (sy <= h - 2)
    assert inside.mean() > 0.5
    red = crop[..., 0].astype(int)
    assert red.max() > 200
    assert np.abs(crop[..., 1].astype(int) - red / 2)[inside].max() <= 1
    assert np.abs(crop[..., 2].astype(int) - (255 - red))[inside].max() <= 1
    dots = crop[..., 0].astype(np.float64)
    radius = 5
    for px, py in TEMPLATE:
        x0, y0 = int(round(px)), int(round(py))
        win = dots[y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1]
        gy, gx = np.mgrid[y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1]
        cx, cy = (win * gx).sum() / win.sum(), (win * gy).sum() / win.sum()
        assert abs(cx - px) < 0.1 and abs(cy - py) < 0.1, (cx, cy, px, py)


def test_warp_face_border_is_black():
    landmarks = TEMPLATE  # identity warp: the crop reaches past the 40x40 image
    image = np.full((40, 40, 3), 200, np.uint8)
    crop = fw.warp_face(image, landmarks)
    assert (crop[-1, -1] == 0).all() and (crop[0, 0] == 200).all()


def test_select_central_face_follows_the_rule():
    shape = (200, 300, 3)  # H, W
    boxes = np.array([
        [0, 0, 120, 120, 0.99],  # biggest, but in the corner
        [110, 60, 190, 140, 0.98],  # smaller, centred
        [140, 90, 160, 110, 0.97],  # tiny, exactly centred
    ])

    def rule(b):  # area - 2 * squared distance of the box centre from (W/2, H/2)
        area = (b[2] - b[0]) * (b[3] - b[1])
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        return area - 2 * ((cx - 150) ** 2 + (cy - 100) ** 2)

    scores = [rule(b) for b in boxes]
    assert faces_aligner.select_central_face(boxes, shape) == int(np.argmax(scores)) == 1
    rng = np.random.default_rng(1)
    for _ in range(50):
        xy = rng.uniform(0, 250, (6, 2))
        wh = rng.uniform(5, 120, (6, 2))
        b = np.hstack([xy, xy + wh])
        assert faces_aligner.select_central_face(b, shape) == int(np.argmax([rule(r) for r in b]))
    assert faces_aligner.select_central_face(boxes[:1], shape) == 0
    with pytest.raises(ValueError):
        faces_aligner.select_central_face(np.zeros((0, 4)), shape)


def group_photo_detections() -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """The issue's group photo, as detections: six confident faces in a row across a
    1600x1000 photo, none near its centre, and a doubtful one (a hand, 0.75) at the centre."""
    shape = (1000, 1600, 3)
    faces = [[x, 250, x + 90, 360] for x in (60, 300, 540, 970, 1210, 1450)]
    hand = [760, 460, 840, 540]  # smaller than every face, but at the centre
    boxes = np.array(faces + [hand], dtype=np.float64)
    scores = np.array([0.999, 0.995, 0.998, 0.991, 0.997, 0.993, 0.75])
    return boxes, scores, shape


def test_central_face_rule_does_not_prefer_a_doubtful_detection():
    boxes, scores, shape = group_photo_detections()
    # the bare rule: the hand is central
    assert faces_aligner.select_central_face(boxes, shape) == 6
    k = faces_aligner.select_central_face(boxes, shape, scores)
    # Among the six faces the rule picks the one nearest the centre (box centres 585 and
    # 1015 px are 215 px from x = 800; the left one is nearer in y too: equal), computed here
    # from the formula on the faces alone.
    faces = boxes[:6]
    centre = (faces[:, :2] + faces[:, 2:]) / 2 - [800, 500]
    rule = (faces[:, 2] - faces[:, 0]) * (faces[:, 3] - faces[:, 1]) - 2 * (centre ** 2).sum(1)
    assert k == int(np.argmax(rule)) and k != 6
    # Only doubtful detections: the rule weighs them all, as before.
    assert faces_aligner.select_central_face(boxes[[0, 6]], shape, [0.8, 0.75]) == 1
    # A confident face just at the floor competes; one just below it does not.
    floor = faces_aligner.CONFIDENT_FACE_SCORE
    assert faces_aligner.select_central_face(boxes[[0, 6]], shape, [0.999, floor]) == 1
    assert faces_aligner.select_central_face(boxes[[0, 6]], shape, [0.999, floor - 0.01]) == 0
    with pytest.raises(ValueError):
        faces_aligner.select_central_face(boxes, shape, scores[:3])


def test_align_crops_a_confident_face_not_the_central_doubtful_one(aligner):
    boxes, scores, shape = group_photo_detections()
    eyes = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]])
    size = boxes[:, 2:] - boxes[:, :2]
    points = boxes[:, None, :2] + eyes[None] * size[:, None, :]
    photo = faces_aligner.Photo(np.zeros(shape, np.uint8))
    face = aligner._choose((boxes, scores, points), photo, None)
    assert face is not None and face.score >= 0.99 and face.box[0] != boxes[6, 0]


def test_center_crop_takes_the_middle():
    image = np.zeros((250, 250, 3), np.uint8)
    image[63:188, 63:188] = 255  # the central half of the shorter side
    crop = fw.center_crop(image)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    assert crop[2:-2, 2:-2].min() == 255


class _TopLeftAligner:
    """Stands in for MTCNN: a face (a crop of 7s) unless the top-left pixel is 0; records calls."""

    def __init__(self):
        self.calls = []  # (number of images, hint_box as passed)

    def align_batch(self, images, hint_box="not passed"):
        self.calls.append((len(images), hint_box))
        return [None if im[0, 0, 0] == 0 else faces_aligner.AlignedFace(
            crop=np.full((112, 112, 3), 7, np.uint8), box=np.zeros(4),
            landmarks=np.zeros((5, 2)), score=0.9) for im in images]


def test_align_files_keeps_order_centre_crops_faceless_and_reports_unreadable(tmp_path):
    rng = np.random.default_rng(0)
    faceless = rng.integers(1, 255, (60, 80, 3), dtype=np.uint8)
    faceless[0, 0] = 0
    write_image(tmp_path / "a.png", np.full((50, 50, 3), 9, np.uint8))
    write_image(tmp_path / "b.png", faceless)
    (tmp_path / "c.jpg").write_bytes(b"not an image")
    write_image(tmp_path / "d.png", np.full((30, 40, 3), 5, np.uint8))
    paths = [tmp_path / n for n in ("a.png", "b.png", "c.jpg", "d.png")]
    boxes = {"a.png": (1.0, 2.0, 3.0, 4.0), "b.png": None, "d.png": (5.0, 6.0, 7.0, 8.0)}
    asked = []

    def hint_for(path):
        asked.append(path.name)
        return boxes[path.name]

    fake = _TopLeftAligner()
    out = list(fa.align_files(fake, paths, batch_size=2, hint_for=hint_for, num_workers=1,
                              progress=False))
    assert [r.path for r in out] == paths
    assert asked == ["a.png", "b.png", "d.png"]  # never for the unreadable file
    assert fake.calls == [(2, [(1.0, 2.0, 3.0, 4.0), None]), (1, [(5.0, 6.0, 7.0, 8.0)])]
    a, b, c, d = out
    assert a.face is not None and (a.crop == 7).all() and a.hint == boxes["a.png"]
    assert b.face is None and b.error is None and b.hint is None
    # centre crop written out: the central 30x30 square (half the shorter side) of 60x80
    expected = cv2.resize(faceless[15:45, 25:55], (112, 112), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(b.crop, expected)
    assert c.crop is None and c.face is None and "c.jpg" in str(c.error)
    assert d.face is not None and d.hint == boxes["d.png"]


def test_align_files_without_hints_calls_align_batch_without_them(tmp_path):
    write_image(tmp_path / "x.png", np.zeros((20, 20, 3), np.uint8))  # faceless
    fake = _TopLeftAligner()
    [done] = fa.align_files(fake, [tmp_path / "x.png"], batch_size=8, size=64, progress=False)
    assert fake.calls == [(1, "not passed")] and done.hint is None and done.face is None
    assert done.crop.shape == (64, 64, 3)  # the centre crop at the size asked for


def test_align_files_workers_keep_the_order_and_pass_errors_on(tmp_path):
    """Three threads on chunks of two: every FileCrop in the order of the paths, each chunk
    aligned once; an error inside a chunk reaches the caller, and a caller that stops early
    leaves no chunk running."""
    import threading

    paths = []
    for i in range(11):
        paths.append(tmp_path / f"{i:02d}.png")
        write_image(paths[-1], np.full((20 + i, 30, 3), 1 + i, np.uint8))
    fake, threads = _TopLeftAligner(), threading.active_count()
    out = list(fa.align_files(fake, paths, batch_size=2, num_workers=3, progress=False))
    assert [r.path for r in out] == paths
    assert [int(r.crop[0, 0, 0]) for r in out] == [7] * 11  # each its own face crop
    assert sorted(n for n, _ in fake.calls) == [1] + [2] * 5

    class Failing(_TopLeftAligner):
        def align_batch(self, images, hint_box="not passed"):
            if any(im.shape[0] == 24 for im in images):  # in the third chunk
                raise RuntimeError("bug in chunk 3")
            return super().align_batch(images, hint_box)

    with pytest.raises(RuntimeError, match="bug in chunk 3"):
        list(fa.align_files(Failing(), paths, batch_size=2, num_workers=2, progress=False))
    first = next(fa.align_files(fake, paths, batch_size=2, num_workers=2, progress=False))
    assert first.path == paths[0]
    assert threading.active_count() == threads  # the pool was shut down with the generator


@pytest.fixture(scope="module")
def aligner():
    return af.FaceAligner(device="cpu")


def eye_error(face: faces_aligner.AlignedFace) -> float:
    """Where the detected eyes land in the crop, against the template (px)."""
    matrix = fw.estimate_similarity(face.landmarks)
    return float(np.abs(apply(matrix, face.landmarks)[:2] - TEMPLATE[:2]).max())


def test_mtcnn_aligns_the_astronaut(aligner):
    image = data.astronaut()
    face = aligner.align(image)
    assert face is not None and face.score > 0.95
    assert face.crop.shape == (112, 112, 3) and face.crop.dtype == np.uint8
    x1, y1, x2, y2 = face.box
    assert 150 < (x1 + x2) / 2 < 300 and 60 < (y1 + y2) / 2 < 200  # her face, not the flag
    assert face.landmarks[0, 0] < face.landmarks[1, 0]  # "left eye" is on the image's left
    assert eye_error(face) < 3.0
    # warp_face reproduces the crop from the same landmarks
    np.testing.assert_array_equal(fw.warp_face(image, face.landmarks), face.crop)
    # RGB kept: skin between the eyes and the mouth is redder than it is blue
    skin = face.crop[60:75, 35:50].reshape(-1, 3).mean(axis=0)
    assert skin[0] > skin[2] + 30


def test_align_batch_mixes_sizes_and_faceless_images(aligner):
    photo = cv2.resize(data.astronaut(), (320, 320), interpolation=cv2.INTER_AREA)
    small = cv2.resize(photo, (250, 250), interpolation=cv2.INTER_AREA)
    blank = np.full((250, 250, 3), 128, np.uint8)
    tiny = np.zeros((20, 20, 3), np.uint8)  # smaller than min_face_size: no scale to search
    results = aligner.align_batch([small, blank, photo, small[:, ::-1].copy(), tiny])
    assert results[1] is None and results[4] is None
    assert all(results[i] is not None for i in (0, 2, 3))
    single = aligner.align(small)
    np.testing.assert_allclose(results[0].landmarks, single.landmarks, atol=1e-3)
    # the mirrored photo's face is mirrored: its box centre reflects about the middle
    cx, cx_m = results[0].box[[0, 2]].mean(), results[3].box[[0, 2]].mean()
    assert abs((cx + cx_m) - 249) < 6
    boxes, probs, points = aligner.detect(blank)
    assert boxes.shape == (0, 4) and probs.shape == (0,) and points.shape == (0, 5, 2)


def test_hint_box_picks_the_overlapping_face(aligner):
    face = cv2.resize(data.astronaut()[40:296, 100:356], (128, 128), interpolation=cv2.INTER_AREA)
    canvas = np.full((200, 420, 3), 90, np.uint8)
    canvas[36:164, 10:138] = face  # left face, at the edge
    canvas[36:164, 230:358] = face  # right face, nearer the centre
    boxes, probs, _ = aligner.detect(canvas)
    assert len(boxes) == 2 and boxes.dtype == np.float64 and probs.dtype == np.float64
    central = aligner.align(canvas)
    k = faces_aligner.select_central_face(boxes, canvas.shape)
    assert central.box[0] == boxes[k][0] - mc.MTCNN_COORDINATE_OFFSET  # detect's are 1-based
    assert central.box[0] > 200
    left = aligner.align(canvas, hint_box=[0, 30, 150, 170])
    assert left is not None and left.box[2] < 150
    assert aligner.align(canvas, hint_box=[370, 0, 420, 30]) is None  # overlaps nothing
    both = aligner.align_batch([canvas, canvas], hint_box=[[0, 30, 150, 170], None])
    assert both[0].box[2] < 150 and both[1].box[0] > 200


def make_tree(root: Path) -> None:
    photo = cv2.resize(data.astronaut(), (250, 250), interpolation=cv2.INTER_AREA)
    write_image(root / "alice" / "a.jpg", photo)
    write_image(root / "alice" / "blank.png", np.full((250, 250, 3), 128, np.uint8))
    (root / "bob").mkdir()
    (root / "bob" / "broken.jpg").write_bytes(b"not a jpeg at all")


def test_cli_reports_faceless_and_unreadable_and_resumes(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    assert af.main([str(src), str(dst), "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "aligned           1" in out and "unreadable        1" in out
    assert "no face found     1 (1 centre-cropped" in out
    aligned = cv2.imread(str(dst / "alice" / "a.jpg"))
    assert aligned.shape == (112, 112, 3)
    assert cv2.imread(str(dst / "alice" / "blank.png")).shape == (112, 112, 3)
    assert not (dst / "bob" / "broken.jpg").exists()
    report = (dst / "align_report.tsv").read_text().splitlines()
    assert sorted(line.split("\t")[:2] for line in report) == [
        ["no_face", "alice/blank.png"], ["unreadable", "bob/broken.jpg"]]
    assert "not a decodable image" in report[-1]

    mtime = (dst / "alice" / "a.jpg").stat().st_mtime_ns
    again = af.align_tree(src, dst, progress=False)  # resumes: both outputs exist
    assert again["skipped_existing"] == 2 and again["aligned"] == 0
    assert again["unreadable"] == 1 and again["no_face"] == 0
    assert (dst / "alice" / "a.jpg").stat().st_mtime_ns == mtime
    assert len((dst / "align_report.tsv").read_text().splitlines()) == 2  # still both listed


def test_skip_missing_writes_no_crop_but_lists_it(tmp_path, aligner):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    report = tmp_path / "report.tsv"
    summary = af.align_tree(src, dst, skip_missing=True, report_path=report, progress=False,
                            aligner=aligner)
    assert (summary["aligned"], summary["no_face"], summary["unreadable"]) == (1, 1, 1)
    assert summary["centre_cropped"] == 0
    assert not (dst / "alice" / "blank.png").exists()
    assert "no_face\talice/blank.png\tskipped" in report.read_text()
    with pytest.raises(ValueError, match="inside the source"):
        af.align_tree(src, src / "out", progress=False, aligner=aligner)


def _grace_hopper() -> np.ndarray:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return cv2.cvtColor(cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR),
                            cv2.COLOR_BGR2RGB)


def test_phone_photo_stored_sideways_is_aligned_upright(tmp_path):
    """A JPEG stored rotated with EXIF Orientation=6 (as phones write it): the face is found
    where it is in the upright photo, and the crop equals the upright photo's crop."""
    from PIL import Image

    aligner = af.FaceAligner(device="cpu", detect_size=0)  # both searched at full size

    upright = _grace_hopper()  # 600x512, one face
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(cv2.rotate(upright, cv2.ROTATE_90_COUNTERCLOCKWISE)).save(
        path, exif=exif, quality=95)
    reference = aligner.align(upright)
    [done] = fa.align_files(aligner, [path], batch_size=1, progress=False)
    assert reference is not None and done.face is not None
    eye_distance = np.linalg.norm(reference.landmarks[1] - reference.landmarks[0])
    assert np.abs(done.face.landmarks - reference.landmarks).max() < 0.05 * eye_distance
    # the JPEG's own loss moves MTCNN's landmarks by ~1% of the eye distance (up to ~1.4 px
    # here: 2-9 grey levels of crop); read sideways, the crop would differ by ~70
    assert np.abs(done.crop.astype(int) - reference.crop).mean() < 12


def _big_photo_with_a_small_face() -> np.ndarray:
    """2048x2048: the astronaut upscaled 2x (her face ~170 px wide) and, far right, her head
    shrunk to 128 px (face ~45 px: found at full size, too small on the default copy)."""
    photo = data.astronaut()
    canvas = np.full((2048, 2048, 3), 110, np.uint8)
    canvas[200:1224, 100:1124] = cv2.resize(photo, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    canvas[1500:1628, 1600:1728] = cv2.resize(photo[40:296, 100:356], (128, 128),
                                              interpolation=cv2.INTER_AREA)
    return canvas


def test_big_photo_is_searched_on_a_bounded_copy_and_warped_at_full_size(aligner, monkeypatch):
    big = _big_photo_with_a_small_face()
    full = af.FaceAligner(device="cpu", detect_size=0)  # the reference: MTCNN at full size
    full_boxes, _, full_points = full.detect(big)
    assert len(full_boxes) == 2  # both faces at full size
    seen = []  # the sizes of the images MTCNN is given
    detect = aligner._detect_stack
    monkeypatch.setattr(aligner, "_detect_stack",
                        lambda stack: seen.append(stack.shape) or detect(stack))
    face = aligner.align(big)
    size = af.DEFAULT_DETECT_SIZE
    assert seen == [(1, size, size, 3)] and aligner.detect_size == size
    # the big face, in full-size pixels: the landmarks of the full-size search within MTCNN's
    # own repeatability (it moves them by up to ~7% of the eye distance on a 2 px shift)
    k = int(np.argmin(full_boxes[:, 0]))
    eye_distance = np.linalg.norm(full_points[k, 1] - full_points[k, 0])
    assert eye_distance > 60
    assert np.linalg.norm(face.landmarks - full_points[k], axis=1).max() < 0.05 * eye_distance
    assert box_iou_one(face.box, full_boxes[k]) > 0.85
    # the crop is cut from the full-size photo with the mapped landmarks
    np.testing.assert_array_equal(face.crop, fw.warp_face(big, face.landmarks))
    # the trade-off: the 45 px face is below min_face_size on the default copy
    assert len(aligner.detect(big)[0]) == 1


def box_iou_one(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_map_to_full_follows_cv2_resize_pixel_centres():
    """A bright pixel at (u, v) of a copy made by cv2.resize came from the block of the
    original whose centre map_from_copy names (an exact 4x shrink of a 4x4 bright block),
    both in MTCNN's 1-based coordinates (pixel u is u + 1)."""
    full = np.zeros((400, 600, 3), np.uint8)
    full[100:104, 200:204] = 255  # the block's centre: x = 201.5, y = 101.5 (0-based)
    copy = cv2.resize(full, (150, 100), interpolation=cv2.INTER_AREA)
    v, u = np.argwhere(copy[..., 0] == 255)[0] + mc.MTCNN_COORDINATE_OFFSET
    boxes = np.array([[u, v, u, v]], float)
    points = np.array([[[u, v]] * 5], float)
    mapped_boxes, _, mapped_points = mc.map_from_copy((boxes, np.ones(1), points),
                                                     full.shape, copy.shape)
    x, y = np.array([201.5, 101.5]) + mc.MTCNN_COORDINATE_OFFSET
    np.testing.assert_allclose(mapped_boxes[0], [x, y, x, y])
    np.testing.assert_allclose(mapped_points[0], [[x, y]] * 5)


def test_detection_scale_bounds_the_longer_side():
    assert faces_aligner.detection_scale((3000, 2000, 3), 640) == pytest.approx(640 / 3000)
    assert faces_aligner.detection_scale((2000, 3000), 640) == pytest.approx(640 / 3000)
    assert faces_aligner.detection_scale((600, 500, 3), 640) == 1.0  # small photos as they are
    assert faces_aligner.detection_scale((8000, 8000, 3), 0) == 1.0  # 0: full size
    with pytest.raises(ValueError, match="detect_size"):
        af.FaceAligner(device="cpu", detect_size=-1)


@pytest.mark.parametrize("case", ["missing source", "source is a file", "no images",
                                  "destination is a file", "destination inside source"])
def test_cli_refuses_unusable_folders_in_one_line(tmp_path, capsys, case):
    from utils import run_cli

    src, dst = tmp_path / "src", tmp_path / "dst"
    if case == "missing source":
        named, words = src, "source folder not found"
    elif case == "source is a file":
        src.write_bytes(b"x")
        named, words = src, "source is a file"
    elif case == "no images":
        (src / "alice").mkdir(parents=True)
        (src / "alice" / "notes.txt").write_text("no photo here")
        named, words = src, "no images"
    elif case == "destination is a file":
        make_tree(src)
        dst.write_bytes(b"x")
        named, words = dst, "destination is a file"
    else:
        make_tree(src)
        dst = src / "out"
        named, words = dst, "must not be inside the source"
    code = run_cli(af.main, [str(src), str(dst), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == af.AlignInputError.exit_code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert words in err and str(named.resolve()) in err
    if case in ("missing source", "no images"):
        assert not dst.exists()  # nothing created for a mistyped source


def test_script_exit_status_for_a_missing_source(tmp_path):
    import subprocess
    import sys

    script = Path(af.__file__)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "nope"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr == f"error: source folder not found: {tmp_path / 'nope'}\n"


def test_bad_numbers_are_refused_by_the_parser(capsys):
    for flag, value in (("--detect-size", "-1"), ("--batch-size", "0"),
                        ("--min-face-size", "many")):
        with pytest.raises(SystemExit) as stop:
            af.main(["src", "dst", flag, value])
        assert stop.value.code == 2 and flag in capsys.readouterr().err


def test_detect_size_option_reaches_the_aligner(tmp_path, monkeypatch):
    made = []

    class Recorder(_TopLeftAligner):
        size = fw.TEMPLATE_SIZE

        def __init__(self, **kwargs):
            super().__init__()
            made.append(kwargs)

    import torch

    monkeypatch.setattr(af, "FaceAligner", Recorder)
    make_tree(tmp_path / "src")
    threads, seen = torch.get_num_threads(), []
    monkeypatch.setattr(af, "align_files", lambda *a, **kw: seen.append(
        (kw["num_workers"], torch.get_num_threads())) or iter(()))
    assert af.main([str(tmp_path / "src"), str(tmp_path / "dst"), "--detect-size", "0",
                    "--workers", "3", "--refine-steps", "0", "--no-progress"]) == 0
    assert made[0]["detect_size"] == 0 and made[0]["refine_steps"] == 0
    # three workers share torch's threads while they run; main leaves them as they were
    assert seen == [(3, max(1, threads // 3))] and torch.get_num_threads() == threads
    monkeypatch.undo()
    monkeypatch.setattr(af, "FaceAligner", Recorder)
    af.align_tree(tmp_path / "src", tmp_path / "dst2", progress=False)
    assert made[1]["detect_size"] == af.DEFAULT_DETECT_SIZE


def test_report_cut_inside_a_utf8_name_is_read_with_a_warning(tmp_path):
    """A killed run left half of a multi-byte character at the end of the report: the run
    resumes, warns naming the file, keeps the other entries and drops the garbled one."""
    import logging

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    dst.mkdir()
    report = dst / af.REPORT_NAME
    cut = "no_face\talice/caf\u00e9.jpg\tskipped\n".encode()
    cut = cut[:cut.index(b"\xc3") + 1]  # the first of the two bytes of the e-acute
    report.write_bytes(b"unreadable\tbob/broken.jpg\tnot a decodable image\n" + cut)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("align").addHandler(handler)
    fake = _TopLeftAligner()  # a "face" in every readable image
    fake.size = fw.TEMPLATE_SIZE
    try:
        summary = af.align_tree(src, dst, progress=False, aligner=fake)
    finally:
        logging.getLogger("align").removeHandler(handler)
    assert summary["images"] == 3
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(report) in warnings[0] and "UTF-8" in warnings[0]
    lines = report.read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["unreadable", "bob/broken.jpg"]]


def test_odd_names_and_a_symlinked_identity_are_aligned_as_pack_sees_them(tmp_path):
    import os

    import pre_process

    want = lib.make_odd_tree(tmp_path)
    src, dst = tmp_path / "src", tmp_path / "dst"
    fake = _TopLeftAligner()  # a "face" in every readable image
    fake.size = fw.TEMPLATE_SIZE
    summary = af.align_tree(src, dst, progress=False, aligner=fake, num_workers=1)
    assert summary["images"] == len(want) and summary["unreadable"] == 1
    for rel, readable in want.items():
        assert (dst / rel).is_file() == readable, rel
    # the one bad file is listed under its bytes as Python writes them; the others are done
    broken = "amy/d\\xe9j\\xe0.jpg"
    lines = (dst / af.REPORT_NAME).read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["unreadable", broken]]
    again = af.align_tree(src, dst, progress=False, aligner=fake, num_workers=1)
    assert again["skipped_existing"] == len(want) - 1 and again["unreadable"] == 1
    lines = (dst / af.REPORT_NAME).read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["unreadable", broken]]
    # --pack walks the same tree to the same files
    paths, _, names = pre_process.list_identity_images(src)
    assert names == ["amy", "bob", "cid"]
    assert sorted(os.fsencode(p.relative_to(src)) for p in paths) == sorted(
        os.fsencode(rel) for rel in want)


def test_names_with_a_tab_or_a_line_break_keep_one_report_line_each(tmp_path):
    """Tab, line feed, carriage return, form feed and U+2028 are legal in Linux file names:
    each file keeps one three-field line (its name with \\xNN / \\uNNNN escapes, as
    Python's backslashreplace writes them), and the next run takes the report as its own."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    names = ["t\tab.png", "n\new.png", "r\ret.png", "f\x0cfeed.png", "u\u2028sep.png"]
    (src / "amy").mkdir(parents=True)
    for name in names:
        write_image(src / "amy" / name, np.zeros((20, 20, 3), np.uint8))  # faceless: listed
    (src / "amy" / "bad\tone.jpg").write_bytes(b"not an image")
    fake = _TopLeftAligner()
    fake.size = fw.TEMPLATE_SIZE
    escaped = {"\t": "\\x09", "\n": "\\x0a", "\r": "\\x0d", "\x0c": "\\x0c",
               "\u2028": "\\u2028"}
    want = sorted(["no_face", "amy/" + "".join(escaped.get(c, c) for c in name)]
                  for name in names) + [["unreadable", "amy/bad\\x09one.jpg"]]
    for run in range(2):
        summary = af.align_tree(src, dst, progress=False, aligner=fake, num_workers=1)
        assert summary["report_entries"] == len(names) + 1, run
        lines = (dst / af.REPORT_NAME).read_text(encoding="utf-8").split("\n")
        assert lines.pop() == ""  # the file ends with a line feed and has no other break
        fields = [line.split("\t") for line in lines]
        assert all(len(f) == 3 for f in fields), fields
        assert sorted(f[:2] for f in fields) == sorted(want), run


def test_a_crop_that_cannot_be_written_is_listed_and_the_others_are_done(tmp_path, capsys,
                                                                        monkeypatch):
    """One file's output the destination refuses (here a file where its folder should be;
    as well a name or character another filesystem refuses): listed in the report and the
    summary, every other file written. A full disk still stops the run."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    dst.mkdir()
    (dst / "alice").write_bytes(b"in the way")
    fake = _TopLeftAligner()
    fake.size = fw.TEMPLATE_SIZE
    summary = af.align_tree(src, dst, progress=False, aligner=fake, num_workers=1)
    assert (summary["not_written"], summary["unreadable"]) == (2, 1)
    lines = sorted(line.split("\t")[:2]
                   for line in (dst / af.REPORT_NAME).read_text().splitlines())
    assert lines == [["not_written", "alice/a.jpg"], ["not_written", "alice/blank.png"],
                     ["unreadable", "bob/broken.jpg"]]
    assert "not written       2" in af.format_summary(summary)
    (dst / "alice").unlink()
    again = af.align_tree(src, dst, progress=False, aligner=fake, num_workers=1)
    assert again["aligned"] == 2 and (dst / "alice" / "a.jpg").is_file()
    assert [line.split("\t")[:2] for line in (dst / af.REPORT_NAME).read_text().splitlines()
            ] == [["unreadable", "bob/broken.jpg"]]
    import errno

    def disk_full(path, image):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(af, "write_image", disk_full)
    (dst / "alice" / "a.jpg").unlink()
    with pytest.raises(OSError, match="No space left"):
        af.align_tree(src, dst, progress=False, aligner=fake, num_workers=1)


# ----------------------------------------------------------------------------- reduced JPEG decode

def _reference_crop(image: np.ndarray, landmarks: np.ndarray, over: int = 8) -> np.ndarray:
    """An anti-aliased crop: warped at ``over`` x 112 and area-averaged down to 112 (the
    template shifted so that each block of ``over`` pixels is centred on a 112 pixel)."""
    matrix = fw.estimate_similarity(landmarks, fw.REFERENCE_LANDMARKS * over + (over - 1) / 2)
    big = cv2.warpAffine(image, matrix, (112 * over, 112 * over), flags=cv2.INTER_LINEAR)
    return cv2.resize(big, (112, 112), interpolation=cv2.INTER_AREA).astype(float)


def test_big_jpeg_is_searched_and_cropped_on_a_reduced_decode(tmp_path, monkeypatch):
    """The 2048 px photo as a JPEG, searched at 640: decoded at 1/2 (1024 px, the largest
    reduction still >= 640; at 1/4 her eyes would be closer than the template's), its
    landmarks within the same tolerance of the full-size search as the downscaled
    array's, and its crop, warped from the reduced decode, close to the full-size one."""
    from faces import reduced_photo
    from faces.reduced_photo import read_photo
    from utils import read_image

    aligner = af.FaceAligner(device="cpu", detect_size=640)
    path = tmp_path / "big.jpg"
    write_image(path, _big_photo_with_a_small_face())
    photo = read_photo(path, aligner.detect_size)
    assert photo.reduce == 2 and photo.image.shape == (1024, 1024, 3)
    full = read_image(path)
    full_boxes, _, full_points = af.FaceAligner(device="cpu", detect_size=0).detect(full)
    k = int(np.argmin(full_boxes[:, 0]))  # the big face
    decoded = []  # the reductions decode_image is asked for
    decode = reduced_photo.decode_image
    monkeypatch.setattr(reduced_photo, "decode_image",
                        lambda *a, **kw: decoded.append(kw.get("reduce", 1)) or decode(*a, **kw))
    [done] = fa.align_files(aligner, [path], batch_size=1, progress=False)
    assert decoded == [2]  # the face is big enough on the reduced decode: no full-size decode
    eye_distance = np.linalg.norm(full_points[k, 1] - full_points[k, 0])
    assert np.linalg.norm(done.face.landmarks - full_points[k], axis=1).max() < 0.05 * eye_distance
    assert box_iou_one(done.face.box, full_boxes[k]) > 0.85
    # the crop from the reduced decode against the one warped from the full photo with the same
    # landmarks: 1.7 levels apart on average here. The full-size warp is no ground truth (a
    # bilinear 2.5x shrink aliases): against an anti-aliased crop the reduced one is closer.
    from_full = fw.warp_face(full, done.face.landmarks).astype(float)
    assert np.abs(done.crop - from_full).mean() < 3.0
    reference = _reference_crop(full, done.face.landmarks)
    assert np.abs(done.crop - reference).mean() <= np.abs(from_full - reference).mean()


def test_small_face_in_a_big_jpeg_is_warped_from_a_full_size_decode(tmp_path, aligner):
    """The astronaut at her own size (eye distance ~42 px) in a 1300 px JPEG: searched on the
    1/2 decode, but there her eyes are ~21 px apart, below the template's 35: the crop is
    warped from the full-size decode, exactly as from the full image."""
    from faces.reduced_photo import read_photo
    from utils import read_image

    canvas = np.full((1300, 1301, 3), 110, np.uint8)
    canvas[400:912, 400:912] = data.astronaut()
    path = tmp_path / "small_face.jpg"
    write_image(path, canvas)
    assert read_photo(path, af.DEFAULT_DETECT_SIZE).reduce == 2
    [done] = fa.align_files(aligner, [path], batch_size=1, progress=False)
    landmarks = done.face.landmarks
    half_eye_distance = np.linalg.norm(landmarks[1] - landmarks[0]) / 2
    assert half_eye_distance < 35.24 * faces_aligner.MIN_REDUCED_EYE_RATIO
    np.testing.assert_array_equal(done.crop, fw.warp_face(read_image(path), landmarks))


def test_face_too_small_on_the_search_decode_is_warped_from_the_next_larger_one(
        tmp_path, aligner, monkeypatch):
    """The 2048 px photo (her eyes ~84 px apart at full size) searched at 512 on the 1/4
    decode, where her eyes are ~21 px apart: the crop comes from the 1/2 decode (~42 px, at
    least the template's 35), not from a full-size one, and equals the warp of that decode."""
    from faces import reduced_photo
    from utils import decode_image

    path = tmp_path / "big.jpg"
    write_image(path, _big_photo_with_a_small_face())
    decoded = []  # the reductions decode_image is asked for
    decode = reduced_photo.decode_image
    monkeypatch.setattr(reduced_photo, "decode_image",
                        lambda *a, **kw: decoded.append(kw.get("reduce", 1)) or decode(*a, **kw))
    [done] = fa.align_files(aligner, [path], batch_size=1, progress=False)
    assert decoded == [4, 2]
    landmarks = done.face.landmarks
    eye = np.linalg.norm(landmarks[1] - landmarks[0])
    assert eye / 4 < 35.24 * faces_aligner.MIN_REDUCED_EYE_RATIO <= eye / 2
    photo = reduced_photo.Photo(decode_image(path.read_bytes(), reduce=2), 2, (2048, 2048))
    np.testing.assert_array_equal(done.crop,
                                  fw.warp_face(photo.image, photo.to_reduced(landmarks)))


def test_big_faceless_jpeg_is_centre_cropped_from_its_reduced_decode(tmp_path, aligner,
                                                                     monkeypatch):
    """No face in a 2400 px JPEG: its centre crop comes from the 1/4 decode it was searched
    on (the 300 px square there is larger than 112), with no second decode."""
    from faces import reduced_photo
    from utils import decode_image

    yy, xx = np.mgrid[0:2400, 0:2400]
    flat = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)  # no face
    path = tmp_path / "wall.jpg"
    write_image(path, flat)
    decoded = []
    decode = reduced_photo.decode_image
    monkeypatch.setattr(reduced_photo, "decode_image",
                        lambda *a, **kw: decoded.append(kw.get("reduce", 1)) or decode(*a, **kw))
    [done] = fa.align_files(aligner, [path], batch_size=1, progress=False)
    assert done.face is None and decoded == [4]
    expected = fw.center_crop(decode_image(path.read_bytes(), reduce=4))
    np.testing.assert_array_equal(done.crop, expected)


def test_jpeg_reduction_keeps_the_longer_side_at_least_the_detect_size():
    from faces.reduced_photo import jpeg_reduction

    assert jpeg_reduction((2048, 1536), 640) == 2  # 1024; 1/4 would be 512
    assert jpeg_reduction((1536, 2504), 640) == 2  # 1252; 1/4 would be 626
    assert jpeg_reduction((8000, 8000), 640) == 8  # 1000
    assert jpeg_reduction((3000, 2560), 640) == 4  # 750; 1/8 would be 375
    assert jpeg_reduction((1279, 900), 640) == 2  # ceil(639.5) = 640: enough
    assert jpeg_reduction((1278, 900), 640) == 1  # 639: too small, decoded at full size
    assert jpeg_reduction((8000, 8000), 0) == 1  # 0: full size


@pytest.mark.parametrize("orientation", range(1, 9))
def test_reduced_pixels_map_to_the_upright_full_photo(tmp_path, orientation):
    """A blob at a known place of the upright photo, stored turned for each EXIF orientation
    on sides no multiple of 8: its centroid on every reduced decode, mapped by Photo.to_full,
    is where it is at full size (computed from the upright array, not by our mapping)."""
    from PIL import Image

    from faces.reduced_photo import read_photo
    from utils import apply_orientation

    h, w = 1299, 1013
    yy, xx = np.mgrid[:h, :w]
    centre = np.array([701.3, 388.6])  # (x, y)
    blob = 255 * np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * 12.0 ** 2))
    upright = np.repeat(blob[..., None], 3, axis=2).astype(np.uint8)
    # the stored pixels: what apply_orientation turns upright (its inverse, by trying)
    inverse = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}[orientation]
    stored = apply_orientation(upright, inverse)
    assert np.array_equal(apply_orientation(stored, orientation), upright)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "blob.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=98)
    for detect_size in (640, 320, 150):  # 1/2, 1/4, 1/8
        photo = read_photo(path, detect_size)
        assert photo.full_shape == (h, w) and photo.reduce == {640: 2, 320: 4, 150: 8}[detect_size]
        weights = photo.image[..., 0].astype(float)
        weights[weights < 20] = 0  # JPEG noise off the blob
        v, u = np.mgrid[:weights.shape[0], :weights.shape[1]]
        found = np.array([(u * weights).sum(), (v * weights).sum()]) / weights.sum()
        np.testing.assert_allclose(photo.to_full(found), centre, atol=0.25 * photo.reduce)
        np.testing.assert_allclose(photo.to_reduced(photo.to_full(found)), found)


@pytest.mark.parametrize("orientation,turn_stored", [
    (6, cv2.ROTATE_90_COUNTERCLOCKWISE), (3, cv2.ROTATE_180), (8, cv2.ROTATE_90_CLOCKWISE)])
def test_big_sideways_jpeg_is_aligned_upright_through_the_reduced_decode(
        tmp_path, aligner, orientation, turn_stored):
    """Grace Hopper upscaled to 1403x1197 (a 1/2 decode), stored turned with an EXIF
    orientation: the face and landmarks as from the upright JPEG, the crop upright."""
    from PIL import Image

    from faces.reduced_photo import read_photo

    upright = cv2.resize(_grace_hopper(), (1197, 1403), interpolation=cv2.INTER_CUBIC)
    write_image(tmp_path / "upright.jpg", upright)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "turned.jpg"
    Image.fromarray(cv2.rotate(upright, turn_stored)).save(path, exif=exif, quality=95)
    assert read_photo(path, af.DEFAULT_DETECT_SIZE).reduce == 2
    reference, done = fa.align_files(aligner, [tmp_path / "upright.jpg", path], batch_size=2,
                                     progress=False)
    assert reference.face is not None and done.face is not None
    eye_distance = np.linalg.norm(reference.face.landmarks[1] - reference.face.landmarks[0])
    assert eye_distance / 2 > 35.24  # warped from the reduced decode
    # MTCNN's own repeatability (up to 6.7% of the eye distance on a 2 px shift, bench
    # README): a turned photo's 1/2 decode is another block grid than the upright one's
    assert np.abs(done.face.landmarks - reference.face.landmarks).max() < 0.07 * eye_distance
    # the crop is the upright photo's at those landmarks (as in the test above: < 3 levels)
    from_full = fw.warp_face(upright, done.face.landmarks).astype(float)
    assert np.abs(done.crop - from_full).mean() < 3.0
    skin = done.crop[60:75, 35:50].reshape(-1, 3).mean(axis=0)
    assert skin[0] > skin[2] + 20  # RGB kept: skin is redder than blue


def test_read_photo_returns_the_error_for_a_missing_or_undecodable_file(tmp_path):
    from faces.reduced_photo import read_photo
    from utils import ImageReadError

    missing = read_photo(tmp_path / "gone.jpg", af.DEFAULT_DETECT_SIZE)
    assert isinstance(missing, ImageReadError) and "gone.jpg: cannot read file" in str(missing)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    bad = read_photo(tmp_path / "bad.jpg", af.DEFAULT_DETECT_SIZE)
    assert isinstance(bad, ImageReadError) and "bad.jpg" in str(bad)


@pytest.mark.parametrize("mode,fmt,reduce", [
    ("CMYK", "JPEG", 1), ("CMYK", "JPEG", 2), ("L", "JPEG", 2), ("P", "PNG", 1),
    ("P+tRNS", "PNG", 1), ("LA", "PNG", 1), ("1", "PNG", 1), ("I;16", "PNG", 1), ("P", "BMP", 1)])
def test_read_photo_gives_rgb_of_every_colour_mode(tmp_path, mode, fmt, reduce):
    """CMYK and greyscale JPEGs (full and 1/2 decodes), palette (with transparency), grey with
    alpha, 1-bit and 16-bit grey images: RGB uint8 as PIL's convert("RGB") gives them (16-bit:
    its value / 257 written out, as PIL's own conversion clips it), a reduced decode as the
    2x2 block means of that."""
    from PIL import Image

    from faces.reduced_photo import read_photo

    yy, xx = np.mgrid[:48, :64]
    rgb = np.stack([xx * 4, yy * 5, 255 - xx * 2], axis=2).astype(np.uint8)
    path = tmp_path / f"photo.{fmt.lower()}"
    if mode == "I;16":
        grey = (xx * 1000 + yy * 37).astype(np.uint16)
        Image.fromarray(grey).save(path)
        want = np.repeat(np.floor(grey / 257 + 0.5)[..., None], 3, axis=2)
    else:
        image = Image.fromarray(rgb).convert(mode.split("+")[0])
        extra = {"JPEG": {"quality": 98}}.get(fmt, {"transparency": 0} if "+" in mode else {})
        image.save(path, **extra)
        with Image.open(path) as saved:
            want = np.asarray(saved.convert("RGB"), np.float64)
    photo = read_photo(path, detect_size=32 if reduce == 2 else 0)
    assert photo.reduce == reduce and photo.full_shape == (48, 64)
    if reduce == 2:
        want = want.reshape(24, 2, 32, 2, 3).mean(axis=(1, 3))
    assert photo.image.dtype == np.uint8 and photo.image.shape == want.shape
    tolerance = {1: 1, 2: 3}[reduce] if fmt == "JPEG" else 0  # two JPEG decoders' rounding
    assert np.abs(photo.image - want).max() <= tolerance + (0.5 if reduce == 2 else 0)


def test_cli_bad_device_is_one_line_and_bugs_keep_their_traceback(tmp_path, capsys,
                                                                   monkeypatch):
    from utils import run_cli

    src = tmp_path / "src"
    make_tree(src)
    code = run_cli(af.main, [str(src), str(tmp_path / "dst"), "--device", "nonsense",
                             "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --device nonsense")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(af, "align_tree", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(af.main, [str(src), str(tmp_path / "dst"), "--no-progress"])


def test_landmarks_on_the_template_give_the_photo_itself_as_the_crop(aligner, monkeypatch,
                                                                      tmp_path):
    """MTCNN reports pixel k as k + MTCNN_COORDINATE_OFFSET; the template (and cv2's warp)
    count from 0. A detection whose 0-based landmarks are exactly the template's must crop
    the 112 px photo unmoved (the identity similarity), in align() and in identify's
    every_face; with the 1-based points every crop sat one pixel off."""
    from gallery.photos import every_face  # identify's --all-faces path

    photo = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    template = fw.template_for_size(112)
    offset = mc.MTCNN_COORDINATE_OFFSET
    found = (np.array([[10.0, 12.0, 100.0, 104.0]]) + offset, np.array([0.99]),
             (template + offset)[None])
    monkeypatch.setattr(aligner, "_detect_scaled", lambda images: [found for _ in images])
    face = aligner.align(photo)
    np.testing.assert_allclose(face.landmarks, template, atol=1e-9)
    np.testing.assert_allclose(face.box, [10.0, 12.0, 100.0, 104.0], atol=1e-9)
    assert np.abs(face.crop.astype(int) - photo).max() <= 1  # bilinear at whole pixels
    write_image(tmp_path / "p.png", photo)
    (listed,) = every_face(aligner, [tmp_path / "p.png"], progress=False)
    assert np.abs(listed.faces[0].crop.astype(int) - photo).max() <= 1
    assert listed.faces[0].box == pytest.approx([10.0, 12.0, 100.0, 104.0])
