"""Five points from MediaPipe's face mesh on every photo under a folder, for
landmark_accuracy.py's ``--methods points:FILE`` (a second landmark model on the same faces).

    python bench/mediapipe_landmarks.py DATA_DIR OUT.json

Runs in its own virtual environment, not the project's: the MediaPipe wheels that carry their
face mesh model (0.10.14, measured; 0.10.21 too; 0.10.35 and 1.x download it) want NumPy 1
and protobuf 4 (bench/README.md, "Landmark accuracy", has the commands). Per face: the mean
of each eye's 16 contour points (as the annotations' eye centres are made), the nose tip and
the mouth corners, in 0-based pixels (pixel k's centre at k; MediaPipe's normalised x times
the width puts it at k + 0.5), and the box of all its points (its attention model's 478).
Faces as its static-image mode finds them (up to ``MAX_FACES`` a photo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm")  # as landmark_accuracy reads
MAX_FACES = 10  # the fixtures' group photos hold up to 6 annotated faces
MIN_DETECTION_CONFIDENCE = 0.3  # below MediaPipe's 0.5: HELEN's close crops are found more often
# Mesh indices, "left" being the photo's (the person's right): each eye's contour, nose tip,
# mouth corners (MediaPipe's canonical face model). The tip is the point nearest the camera
# (least z) on most photos (63 of 120 HELEN faces; 1, often called the tip, sits below it).
LEFT_EYE = [33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246]
RIGHT_EYE = [263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466]
NOSE_TIP, MOUTH_LEFT, MOUTH_RIGHT = 4, 61, 291
PIXEL_CENTRE = 0.5  # normalised coordinates x width count pixel k's centre as k + 0.5


def five_points(mesh: np.ndarray) -> np.ndarray:
    return np.stack([mesh[LEFT_EYE].mean(0), mesh[RIGHT_EYE].mean(0), mesh[NOSE_TIP],
                     mesh[MOUTH_LEFT], mesh[MOUTH_RIGHT]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data_dir", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    try:
        import mediapipe as mp  # after the flags: --help answers in the project's venv too
    except ImportError:
        print("error: mediapipe is not installed here (bench/README.md: its own venv)",
              file=sys.stderr)
        return 2
    photos = sorted(q for q in args.data_dir.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
    if not photos:
        print(f"error: {args.data_dir}: no photos", file=sys.stderr)
        return 2
    images = {}
    # refine_landmarks: the attention model, finer about the eyes and lips (and 10 iris points)
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=MAX_FACES,
                                         refine_landmarks=True,
                                         min_detection_confidence=MIN_DETECTION_CONFIDENCE) as fm:
        for path in photos:
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                print(f"error: {path}: not an image", file=sys.stderr)
                return 2
            h, w = bgr.shape[:2]
            found = fm.process(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).multi_face_landmarks or []
            faces = []
            for face in found:
                mesh = np.array([[q.x * w, q.y * h] for q in face.landmark]) - PIXEL_CENTRE
                faces.append({"box": [*mesh.min(0).tolist(), *mesh.max(0).tolist()],
                              "points": five_points(mesh).tolist()})
            images[path.relative_to(args.data_dir).as_posix()] = faces
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"model": f"mediapipe {mp.__version__} face_mesh, refine_landmarks",
                               "origin": 0, "images": images}))
    tmp.replace(args.out)
    print(f"{args.out}: {sum(map(len, images.values()))} faces in {len(images)} photos "
          f"({sum(not f for f in images.values())} with none)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
