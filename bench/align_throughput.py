"""Photos/s of align_faces on real-size photos, MTCNN at full size against a bounded copy.

    python bench/align_throughput.py [PHOTO_DIR] [--sizes 0 640] [--min-side 2000]
                                     [--max-side 3000] [--limit 0] [--threads 1]
                                     [--repeats 2] [--copies 1] [--crop-ratios] [--huge]

Times ``faces.file_alignment.align_files`` (read + decode + EXIF orientation + MTCNN + warp)
over the JPEG/PNG photos in PHOTO_DIR whose longer side is within [--min-side, --max-side], once per
``--sizes`` value (``FaceAligner(detect_size=...)``, 0 = full size) as it is now ("new":
big JPEGs decoded at 1/2-1/8, crops warped from that decode when the face is big enough)
and, for nonzero sizes, as it was ("old": full decode, downscaled copy for MTCNN, crop warped
from the full photo: ``align_batch`` on ``read_image``'s arrays), after one untimed photo;
``--repeats`` rounds, interleaved so that load from other processes hits every setting
alike, best round reported. ``--copies N`` lists every photo N times for the align_files
timings: its ``--workers`` threads each read and align a batch (32) at a time, so only a
list several batches long shows the steady rate. Also times the bare reads (full decode;
reduced decode), the floors, and ``FaceAligner.detect`` alone on the decoded images
(downscale + MTCNN + mapping back): old on the full decode, new on the reduced one.

Crops: new against old, and each against an anti-aliased reference at its own landmarks
(warped at 8x from the full photo and area-averaged), mean absolute difference in grey
levels; and how many new crops were warped from a larger decode than the searched one.

Landmarks: for each setting, the largest distance of its 5 landmarks from the full-size
search's, in % of the full-size eye distance, over the photos where both chose a face (mean
and max); and the same for the full-size search of the photo less its first 2 rows and
columns (MTCNN's own repeatability, the noise floor of that comparison).

``--huge``: seconds and peak memory (max RSS) of align_files on one 8000x8000 JPEG (Grace
Hopper upscaled) per setting, each in a fresh process.

Without PHOTO_DIR (or none in range) it uses ``skimage.data.astronaut()`` and matplotlib's
``grace_hopper.jpg`` upscaled to a 2400 px longer side, and says so: real photos have real
detail at that size, upscaled ones do not. A table, never an assert.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as align_faces.main: before torch

import cv2  # noqa: E402
import matplotlib.cbook  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from skimage import data as skimage_data  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's modules, not us

from faces import face_warp as fw  # noqa: E402
from faces.aligner import DEFAULT_BATCH_SIZE, MIN_REDUCED_EYE_RATIO, FaceAligner  # noqa: E402
from faces.file_alignment import DEFAULT_WORKERS, align_files  # noqa: E402
from faces.reduced_photo import Photo, jpeg_reduction, read_photo  # noqa: E402
from utils import (  # noqa: E402
    decode_image,
    device_name,
    exif_orientation,
    int_at_least,
    jpeg_shape,
    positive_int,
    read_image,
    write_image,
)

UPSCALED_SIDE = 2400  # longer side of the package photos when no photo folder is given
SHIFT = 2  # pixels cut off the top and left for the repeatability row
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
HUGE_SIDE = 8000
HUGE_RUN = """
import os, sys, time
from pathlib import Path
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
from faces.aligner import FaceAligner
from faces.file_alignment import align_files
aligner = FaceAligner(device="cpu", detect_size={size})
def peak_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
# the peak is reset once torch and MTCNN are loaded (ru_maxrss would keep the bench's own
# peak across the exec, and cannot be reset)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = peak_kib()
start = time.perf_counter()
[done] = align_files(aligner, [Path({path!r})], 1, progress=False)
print(time.perf_counter() - start, done.face is not None, (peak_kib() - base) / 2**20,
      base / 2**20)
"""


def longer_side(path: Path) -> int:
    """The longer side, from a JPEG's header where possible (no decode)."""
    shape = jpeg_shape(path.read_bytes())
    if shape is None:
        full = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        shape = (0, 0) if full is None else full.shape[:2]
    return max(shape)


def package_photos(folder: Path) -> list[Path]:
    """The astronaut and Grace Hopper upscaled to UPSCALED_SIDE, written as JPEGs."""
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        grace = decode_image(f.read(), "grace_hopper.jpg")
    paths = []
    for name, image in (("astronaut", skimage_data.astronaut()), ("grace_hopper", grace)):
        scale = UPSCALED_SIDE / max(image.shape[:2])
        big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        write_image(folder / f"{name}.jpg", big)
        paths.append(folder / f"{name}.jpg")
    return paths


def huge_rows(folder: Path, sizes: list[int], threads: int) -> list[tuple]:
    """One 8000x8000 JPEG per setting through align_files (read, decode, align), each in a
    fresh process: seconds, and how far that raised the peak RSS above that of the process
    with torch and MTCNN loaded (the photo decoded at full size is 183 MiB)."""
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


def reference(image: np.ndarray, landmarks: np.ndarray, over: int = 8) -> np.ndarray:
    """An anti-aliased 112 crop: warped at ``over`` x 112 from ``image`` and area-averaged
    (the template shifted so that each block of ``over`` pixels centres on a 112 pixel)."""
    matrix = fw.estimate_similarity(landmarks, fw.REFERENCE_LANDMARKS * over + (over - 1) / 2)
    big = cv2.warpAffine(image, matrix, (112 * over, 112 * over), flags=cv2.INTER_LINEAR)
    return cv2.resize(big, (112, 112), interpolation=cv2.INTER_AREA).astype(float)


RATIO_BINS = (0.0, 0.75, 1.0, 1.5, 2.0, 3.0, np.inf)


def crop_ratio_rows(faces: dict, paths: list[Path]) -> list[str]:
    """Crops warped from 1/2, 1/4 and 1/8 decodes (JPEGs only) at the full-size search's
    landmarks, against the reference crop, binned by the eye distance on the reduced decode
    in template eye distances (align_faces.MIN_REDUCED_EYE_RATIO); and the crop warped from
    the full photo against the same reference, for the same photos."""
    template_eye = float(np.linalg.norm(fw.REFERENCE_LANDMARKS[1] - fw.REFERENCE_LANDMARKS[0]))
    rows = []  # (ratio, reduced crop vs reference, full crop vs reference)
    for q in paths:
        data = q.read_bytes()
        shape = jpeg_shape(data)
        if faces.get(q) is None or shape is None:
            continue
        full, landmarks = decode_image(data, str(q)), faces[q].landmarks
        ref = reference(full, landmarks)
        full_error = np.abs(fw.warp_face(full, landmarks) - ref).mean()
        for reduce in (2, 4, 8):
            photo = Photo(decode_image(data, reduce=reduce), reduce, shape, data, str(q),
                          exif_orientation(data))
            small = photo.to_reduced(landmarks)
            crop = fw.warp_face(photo.image, small)
            rows.append((np.linalg.norm(small[1] - small[0]) / template_eye,
                         np.abs(crop - ref).mean(), full_error))
    table = np.array(rows).reshape(-1, 3)
    lines = []
    for low, high in zip(RATIO_BINS[:-1], RATIO_BINS[1:], strict=True):
        inside = table[(table[:, 0] >= low) & (table[:, 0] < high)]
        if len(inside):
            lines.append(f"eye ratio {low:4.2f}-{high:<4.2f}: {len(inside):3d} crops, reduced vs "
                         f"reference {inside[:, 1].mean():5.2f} / {inside[:, 1].max():5.2f}, "
                         f"full-size warp vs reference {inside[:, 2].mean():5.2f}")
    return lines


def crop_differences(results: dict, paths: list[Path]) -> list[str]:
    """For each nonzero size: the new crops against the old ones (both paths' own landmarks),
    each against an anti-aliased reference crop at its own landmarks (warped at 8x from the
    full-size photo, area-averaged to 112), and how many new crops needed a full decode."""
    template_eye = float(np.linalg.norm(fw.REFERENCE_LANDMARKS[1] - fw.REFERENCE_LANDMARKS[0]))
    lines = []
    for size in sorted({size for size, _ in results if size}):
        new, old = results[size, "new"][0], results[size, "old"][0]
        both = [q for q in paths if new[q] is not None and old[q] is not None]
        new_old, new_ref, old_ref, larger_decodes = [], [], [], 0
        for q in both:
            data = q.read_bytes()
            image, shape = decode_image(data, str(q)), jpeg_shape(data)
            reduce = 1 if shape is None else jpeg_reduction(shape, size)  # as read_photo's
            eye = np.linalg.norm(new[q].landmarks[1] - new[q].landmarks[0]) / reduce
            larger_decodes += reduce > 1 and eye < MIN_REDUCED_EYE_RATIO * template_eye
            new_old.append(np.abs(new[q].crop.astype(float) - old[q].crop).mean())
            new_ref.append(np.abs(new[q].crop - reference(image, new[q].landmarks)).mean())
            old_ref.append(np.abs(old[q].crop - reference(image, old[q].landmarks)).mean())
        for name, values in (("new vs old crop", new_old),
                             ("new crop vs anti-aliased reference", new_ref),
                             ("old crop (warped at full size) vs reference", old_ref)):
            lines.append(f"detect_size {size}: {name:<44} {np.mean(values):5.2f} / "
                         f"{np.max(values):5.2f}")
        lines.append(f"detect_size {size}: new crops warped from a larger decode than the "
                     f"searched one: {larger_decodes} of {len(both)}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("photo_dir", nargs="?", type=Path, default=None)
    p.add_argument("--sizes", type=int_at_least(0), nargs="+", default=[0, 640],
                   help="detect_size values to time (0 = full size, the reference)")
    p.add_argument("--min-side", type=positive_int, default=2000)
    p.add_argument("--max-side", type=positive_int, default=3000)
    p.add_argument("--limit", type=int_at_least(0), default=0,
                   help="at most this many photos (0: all)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    p.add_argument("--device", type=device_name, default="cpu",
                   help="cpu | cuda (there FaceAligner's default driver is facenet-pytorch's, "
                        "so 'full' and 'before' differ only by the refine steps)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="align_files threads (default align_faces.DEFAULT_WORKERS)")
    p.add_argument("--repeats", type=positive_int, default=2,
                   help="timed rounds (best is reported)")
    p.add_argument("--copies", type=positive_int, default=1,
                   help="list each photo this many times in the align_files timings")
    p.add_argument("--crop-ratios", action="store_true",
                   help="also crops from 1/2, 1/4, 1/8 decodes against an anti-aliased one, "
                        "by eye distance on the decode (the MIN_REDUCED_EYE_RATIO choice)")
    p.add_argument("--huge", action="store_true",
                   help=f"also one {HUGE_SIDE}x{HUGE_SIDE} photo per setting (time, memory)")
    return p


def select_photos(args: argparse.Namespace, folder: Path) -> tuple[list[Path], str]:
    """The photos in range from PHOTO_DIR, else the package photos written into ``folder``;
    and a line saying which, with their sizes."""
    paths: list[Path] = []
    sides: dict[Path, int] = {}
    if args.photo_dir is not None:
        sides = {q: longer_side(q) for q in sorted(args.photo_dir.iterdir())
                 if q.suffix.lower() in PHOTO_SUFFIXES}
        paths = [q for q, side in sides.items() if args.min_side <= side <= args.max_side]
    source = f"{len(paths)} photos from {args.photo_dir}"
    if not paths:
        paths = package_photos(folder)
        source = (f"NO real photos: astronaut + grace_hopper upscaled to {UPSCALED_SIDE} px "
                  "(real detail missing)")
    if args.limit:
        paths = paths[:args.limit]
    in_range = [sides.get(q) or longer_side(q) for q in paths]
    return paths, f"{source} (timed as {args.copies} copies); longer side " \
                  f"{min(in_range)}-{max(in_range)} px"


def time_detection(paths: list[Path], aligners: dict[int, FaceAligner], floors: dict,
                   detect_s: dict) -> None:
    """One round of the bare reads (full and reduced decode) and FaceAligner.detect on
    them; keeps each one's best time in ``floors`` and ``detect_s``."""
    sizes = sorted(aligners)
    for name, read in (("full", read_image), ("reduced", None)):
        start = time.perf_counter()
        if read is None:  # what align_files reads for the first nonzero size
            images = [read_photo(q, max(sizes)).image for q in paths]
        else:
            images = [read(q) for q in paths]
        floors[name] = min(floors.get(name, np.inf), time.perf_counter() - start)
        for size, aligner in aligners.items():
            if name == "reduced" and size == 0:
                continue
            start = time.perf_counter()
            for image in images:
                aligner.detect(image)
            key = (size, "old" if name == "full" else "new")
            detect_s[key] = min(detect_s.get(key, np.inf), time.perf_counter() - start)
        del images


def time_alignment(listed: list[Path], settings: list[tuple[int, str]],
                   aligners: dict[int, FaceAligner], before: FaceAligner, workers: int,
                   results: dict) -> None:
    """One round of every setting over ``listed``; keeps each one's best (faces, seconds)
    in ``results``."""
    for size, how in settings:
        aligner = before if how == "facenet" else aligners[size]
        start = time.perf_counter()
        if how in ("new", "facenet"):
            done = [f.face for f in align_files(aligner, listed, DEFAULT_BATCH_SIZE,
                                                num_workers=workers, progress=False)]
        else:
            done = [face for i in range(0, len(listed), DEFAULT_BATCH_SIZE)
                    for face in aligner.align_batch(
                        [read_image(q) for q in listed[i:i + DEFAULT_BATCH_SIZE]])]
        seconds = time.perf_counter() - start
        if (size, how) not in results or seconds < results[size, how][1]:
            results[size, how] = (dict(zip(listed, done, strict=True)), seconds)


def speed_rows(paths: list[Path], listed: list[Path], sizes: list[int], floors: dict,
               results: dict, detect_s: dict) -> tuple[list[tuple], dict | None]:
    """The table's rows (name, photos/s, vs full, vs before, landmark diff mean, max) and
    the full-size search's landmarks (None when it was not timed)."""
    rows = [("read + full decode (floor, old)", len(paths) / floors["full"], "", "", "", ""),
            (f"read + reduced decode for {max(sizes)} (floor, new)",
             len(paths) / floors["reduced"], "", "", "", "")]
    ref = {q: f.landmarks for q, f in results[0, "new"][0].items() if f is not None} \
        if (0, "new") in results else None
    base_s = results[0, "new"][1] if (0, "new") in results else None
    before_s = results[0, "facenet"][1]
    for (size, how), (faces, seconds) in results.items():
        name = "full size" if size == 0 else f"detect_size {size}, {how}"
        name = "full size, facenet-pytorch's driver" if how == "facenet" else name
        landmarks = {q: f.landmarks for q, f in faces.items() if f is not None}
        diff = landmark_diff(landmarks, ref) if ref is not None and (size or how != "new") else []
        rows.append((f"{name} ({len(landmarks)}/{len(paths)} faces)", len(listed) / seconds,
                     f"{base_s / seconds:.1f}x" if base_s else "", f"{before_s / seconds:.1f}x",
                     f"{np.mean(diff):.2f}" if diff else "", f"{np.max(diff):.2f}" if diff else ""))
    for (size, how), seconds in detect_s.items():
        name = "full size" if size == 0 else f"detect_size {size}, {how}"
        rows.append((f"  {name}: FaceAligner.detect only", len(paths) / seconds,
                     f"{detect_s[0, 'old'] / seconds:.1f}x" if (0, "old") in detect_s else "",
                     "", "", ""))
    return rows, ref


def shift_row(paths: list[Path], full: FaceAligner, ref: dict) -> tuple:
    """MTCNN's repeatability at full size: the same photos shifted by SHIFT pixels."""
    shifted = {}
    for q in paths:
        face = full.align(np.ascontiguousarray(read_image(q)[SHIFT:, SHIFT:]))
        if face is not None:
            shifted[q] = face.landmarks + SHIFT
    diff = landmark_diff(shifted, ref)
    return (f"full size, photo shifted {SHIFT} px (MTCNN's own noise)", float("nan"),
            "", "", f"{np.mean(diff):.2f}", f"{np.max(diff):.2f}")


def print_speed_table(rows: list[tuple], crop_rows: list[str]) -> None:
    print(f"\n{'setting':<52} {'photos/s':>9} {'vs full':>8} {'vs before':>10} "
          f"{'lm diff mean %':>15} {'max %':>7}")
    for name, rate, speedup, over_before, mean, worst in rows:
        rate_s = "" if np.isnan(rate) else f"{rate:.2f}"
        print(f"{name:<52} {rate_s:>9} {speedup:>8} {over_before:>10} {mean:>15} {worst:>7}")
    print("\nvs full: speed-up over the full-size search (align_files, --detect-size 0); vs "
          "before: over the same with facenet-pytorch's MTCNN driver (this toolkit before "
          "mtcnn_cascade)")
    print("\nlm diff: largest of the 5 landmark distances from the full-size search's, "
          "in % of its eye distance, over photos where both found a face")
    print("\ncrops (mean absolute difference, grey levels, mean / max over photos):")
    for line in crop_rows:
        print("  " + line)


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    workers = DEFAULT_WORKERS if args.workers is None else args.workers
    tmp = tempfile.TemporaryDirectory()
    paths, source = select_photos(args, Path(tmp.name))
    print(f"{source}; torch threads {args.threads}, align_files workers {workers}, "
          f"{args.device}, {os.cpu_count()} CPUs")

    sizes = sorted(set(args.sizes))
    aligners = {size: FaceAligner(device=args.device, detect_size=size) for size in sizes}
    # the full-size search as before mtcnn_cascade: facenet-pytorch's own MTCNN driver, and
    # its landmarks as MTCNN gives them (no refine steps)
    before = FaceAligner(device=args.device, detect_size=0, cascade="facenet", refine_steps=0)
    for aligner in [*aligners.values(), before]:
        list(align_files(aligner, paths[:1], 1, progress=False))  # warm-up
    # settings: (size, "new") = align_files as it is (reduced JPEG decode for size > 0);
    # (size, "old") = the code before it: full decode, align_batch on the array (downscale
    # from full size, crop warped from full size), as align_files did.
    settings = [(size, "new") for size in sizes] + [(size, "old") for size in sizes if size] \
        + [(0, "facenet")]
    floors, results, detect_s = {}, {}, {}
    listed = paths * max(1, args.copies)  # what align_files is timed on
    for _ in range(max(1, args.repeats)):  # interleaved rounds: load hits every setting alike
        time_detection(paths, aligners, floors, detect_s)
        time_alignment(listed, settings, aligners, before, workers, results)
    rows, ref = speed_rows(paths, listed, sizes, floors, results, detect_s)
    if ref is not None:
        rows.append(shift_row(paths, aligners[0], ref))
    print_speed_table(rows, crop_differences(results, paths))
    if args.crop_ratios and (0, "new") in results:
        print("\ncrops from reduced decodes at the full-size landmarks (grey levels, mean / max):")
        for line in crop_ratio_rows(results[0, "new"][0], paths):
            print("  " + line)
    if args.huge:
        print(f"\n{'one huge JPEG (read + decode + align)':<46} {'time':>9} {'result':>9}  "
              "peak RSS (over torch + MTCNN)")
        for name, seconds, found, rss in huge_rows(Path(tmp.name), sizes, args.threads):
            print(f"{name:<46} {seconds:>9} {found:>9}  {rss}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
