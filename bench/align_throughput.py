"""Photos/s of align_faces on real-size photos, MTCNN at full size against a bounded copy.

    python bench/align_throughput.py [PHOTO_DIR] [--sizes 0 640] [--min-side 2000]
                                     [--max-side 3000] [--limit 0] [--threads 1]
                                     [--repeats 2] [--huge]

Times ``align_faces.align_files`` (read + EXIF orientation + MTCNN + warp from the full-size
photo) over the JPEG/PNG photos in PHOTO_DIR whose longer side is within
[--min-side, --max-side], once per ``--sizes`` value (``FaceAligner(detect_size=...)``, 0 =
full size), after one untimed photo; ``--repeats`` rounds, interleaved so that load from
other processes hits every setting alike, best round reported. Also times the bare read
(decode) of the same photos, the floor no detection setting can go under, and
``FaceAligner.detect`` alone on the decoded photos (downscale + MTCNN + mapping back), the
part the setting changes.

Landmarks: for each setting, the largest distance of its 5 landmarks from the full-size
search's, in % of the full-size eye distance, over the photos where both chose a face (mean
and max); and the same for the full-size search of the photo less its first 2 rows and
columns (MTCNN's own repeatability, the noise floor of that comparison).

``--huge``: seconds and peak memory (max RSS) of aligning one 8000x8000 photo (Grace Hopper
upscaled) per setting, each in a fresh process.

Without PHOTO_DIR (or none in range) it uses ``skimage.data.astronaut()`` and matplotlib's
``grace_hopper.jpg`` upscaled to a 2400 px longer side, and says so: real photos have real
detail at that size, upscaled ones do not. A table, never an assert.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as align_faces.main: before torch

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's modules, not us

import cv2  # noqa: E402

UPSCALED_SIDE = 2400  # longer side of the package photos when no photo folder is given
SHIFT = 2  # pixels cut off the top and left for the repeatability row
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
HUGE_SIDE = 8000
HUGE_RUN = """
import os, resource, sys, time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
import align_faces as af
from utils import read_image
image = read_image({path!r})
aligner = af.FaceAligner(device="cpu", detect_size={size})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, torch and the photo loaded
start = time.perf_counter()
face = aligner.align(image)
print(time.perf_counter() - start, face is not None,
      (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20, base / 2**20)
"""


def longer_side(path: Path) -> int:
    """The longer side, from a 1/8-scale JPEG decode (cheap) where possible."""
    small = cv2.imread(str(path), cv2.IMREAD_REDUCED_GRAYSCALE_8)
    if small is not None and path.suffix.lower() in (".jpg", ".jpeg"):
        return max(small.shape) * 8
    full = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return 0 if full is None else max(full.shape[:2])


def package_photos(folder: Path) -> list[Path]:
    """The astronaut and Grace Hopper upscaled to UPSCALED_SIDE, written as JPEGs."""
    import matplotlib.cbook
    from skimage import data

    from utils import decode_image, write_image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        grace = decode_image(f.read(), "grace_hopper.jpg")
    paths = []
    for name, image in (("astronaut", data.astronaut()), ("grace_hopper", grace)):
        scale = UPSCALED_SIDE / max(image.shape[:2])
        big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        write_image(folder / f"{name}.jpg", big)
        paths.append(folder / f"{name}.jpg")
    return paths


def huge_rows(folder: Path, sizes: list[int], threads: int) -> list[tuple]:
    """One 8000x8000 photo per setting, each in a fresh process: seconds, and how far
    aligning it raised the peak RSS above that of the process with torch and the decoded
    photo loaded (the photo itself is 183 MiB)."""
    import subprocess

    import matplotlib.cbook

    from utils import decode_image, write_image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        grace = decode_image(f.read(), "grace_hopper.jpg")
    path = folder / "huge.jpg"
    write_image(path, cv2.resize(grace, (HUGE_SIDE, HUGE_SIDE), interpolation=cv2.INTER_CUBIC))
    root = str(Path(__file__).resolve().parent.parent)
    rows = []
    for size in sizes:
        code = HUGE_RUN.format(root=root, threads=threads, path=str(path), size=size)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout.split()
        name = "full size" if size == 0 else f"detect_size {size}"
        rows.append((f"{HUGE_SIDE}x{HUGE_SIDE}, {name}", f"{float(out[0]):.1f} s",
                     "face" if out[1] == "True" else "no face",
                     f"+{float(out[2]):.2f} GiB over {float(out[3]):.2f}"))
    return rows


def chosen_landmarks(files: list) -> dict[Path, np.ndarray]:
    return {f.path: f.face.landmarks for f in files if f.face is not None}


def landmark_diff(ours: dict[Path, np.ndarray], ref: dict[Path, np.ndarray]) -> list[float]:
    """Per photo: max landmark distance from ``ref``'s, % of ref's eye distance."""
    out = []
    for path, lm in ours.items():
        if path in ref:
            eye = np.linalg.norm(ref[path][1] - ref[path][0])
            out.append(100 * float(np.linalg.norm(lm - ref[path], axis=1).max()) / eye)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("photo_dir", nargs="?", type=Path, default=None)
    p.add_argument("--sizes", type=int, nargs="+", default=[0, 640],
                   help="detect_size values to time (0 = full size, the reference)")
    p.add_argument("--min-side", type=int, default=2000)
    p.add_argument("--max-side", type=int, default=3000)
    p.add_argument("--limit", type=int, default=0, help="at most this many photos (0: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds (best is reported)")
    p.add_argument("--huge", action="store_true",
                   help=f"also one {HUGE_SIDE}x{HUGE_SIDE} photo per setting (time, memory)")
    args = p.parse_args()

    import torch

    import align_faces as af
    from utils import read_image

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    paths: list[Path] = []
    if args.photo_dir is not None:
        paths = sorted(q for q in args.photo_dir.iterdir()
                       if q.suffix.lower() in PHOTO_SUFFIXES
                       and args.min_side <= longer_side(q) <= args.max_side)
    source = f"{len(paths)} photos from {args.photo_dir}"
    if not paths:
        paths = package_photos(Path(tmp.name))
        source = (f"NO real photos: astronaut + grace_hopper upscaled to {UPSCALED_SIDE} px "
                  "(real detail missing)")
    if args.limit:
        paths = paths[:args.limit]
    sides = [longer_side(q) for q in paths]
    print(f"{source}; longer side {min(sides)}-{max(sides)} px; torch threads {args.threads}, "
          f"{os.cpu_count()} CPUs")

    sizes = sorted(set(args.sizes))
    aligners = {size: af.FaceAligner(device="cpu", detect_size=size) for size in sizes}
    for aligner in aligners.values():
        list(af.align_files(aligner, paths[:1], 1, progress=False))  # warm-up
    read_s, results, detect_s = float("inf"), {}, {}
    for _ in range(max(1, args.repeats)):
        start = time.perf_counter()
        images = [read_image(q) for q in paths]
        read_s = min(read_s, time.perf_counter() - start)
        for size, aligner in aligners.items():
            start = time.perf_counter()
            for image in images:
                aligner.detect(image)
            detect_s[size] = min(detect_s.get(size, np.inf), time.perf_counter() - start)
        del images
        for size, aligner in aligners.items():
            start = time.perf_counter()
            done = list(af.align_files(aligner, paths, af.DEFAULT_BATCH_SIZE, progress=False))
            seconds = time.perf_counter() - start
            if size not in results or seconds < results[size][1]:
                results[size] = (chosen_landmarks(done), seconds)
    rows = [("read + decode only", len(paths) / read_s, "", "", "")]
    ref = results.get(0, (None,))[0]
    base_s = results[0][1] if 0 in results else None
    for size, (landmarks, seconds) in results.items():
        name = "full size" if size == 0 else f"detect_size {size}"
        diff = landmark_diff(landmarks, ref) if ref is not None and size != 0 else []
        rows.append((f"{name} ({len(landmarks)}/{len(paths)} faces)", len(paths) / seconds,
                     f"{base_s / seconds:.1f}x" if base_s else "",
                     f"{np.mean(diff):.2f}" if diff else "", f"{np.max(diff):.2f}" if diff else ""))
    for size, seconds in detect_s.items():
        name = "full size" if size == 0 else f"detect_size {size}"
        rows.append((f"  {name}: FaceAligner.detect only", len(paths) / seconds,
                     f"{detect_s[0] / seconds:.1f}x" if 0 in detect_s else "", "", ""))
    if ref is not None:  # MTCNN's repeatability at full size: the same photo shifted by 2 px
        full = af.FaceAligner(device="cpu", detect_size=0)
        shifted = {}
        for q in paths:
            face = full.align(np.ascontiguousarray(read_image(q)[SHIFT:, SHIFT:]))
            if face is not None:
                shifted[q] = face.landmarks + SHIFT
        diff = landmark_diff(shifted, ref)
        rows.append((f"full size, photo shifted {SHIFT} px (MTCNN's own noise)", float("nan"),
                     "", f"{np.mean(diff):.2f}", f"{np.max(diff):.2f}"))

    print(f"\n{'setting':<46} {'photos/s':>9} {'speed-up':>9} "
          f"{'lm diff mean %':>15} {'max %':>7}")
    for name, rate, speedup, mean, worst in rows:
        rate_s = "" if np.isnan(rate) else f"{rate:.2f}"
        print(f"{name:<46} {rate_s:>9} {speedup:>9} {mean:>15} {worst:>7}")
    print("\nlm diff: largest of the 5 landmark distances from the full-size search's, "
          "in % of its eye distance, over photos where both found a face")
    if args.huge:
        print(f"\n{'one huge photo (align only)':<46} {'time':>9} {'result':>9}  "
              "peak RSS (over torch + decoded photo)")
        for name, seconds, found, rss in huge_rows(Path(tmp.name), sizes, args.threads):
            print(f"{name:<46} {seconds:>9} {found:>9}  {rss}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
