"""Images/s of the training input pipeline, next to a bare JPEG-decode loop in the same run.

    python bench/data_throughput.py [--images 4000] [--batch-size 128] [--workers 0 1 2]
                                    [--raw-workers 1] [--ring-workers 1 2] [--align]
                                    [--align-images 16]

Builds a synthetic ``.rec`` in a temporary folder (textured 112x112 JPEGs of quality 95, in
the InsightFace layout), then times

* ``cv2.imdecode`` over the same JPEG bytes held in memory: the bare decode baseline;
* ``FaceRecordDataset`` (read from the file, decode, RGB, flip, normalise) through
  ``build_loader`` with 0, 1, 2 workers (collate and worker transfer included);
* the same with ``build_loader(raw_uint8=True)`` and ``normalize_batch`` in this process
  (uint8 batches: 4x less shared memory between processes);
* ``fast_loader.RingBufferLoader`` (uint8 batches decoded by the workers straight into a
  fixed ring of shared-memory slots, no shared memory allocated per batch) and
  ``normalize_batch`` in this process.

Besides wall-clock images/s the table gives CPU microseconds per image (this process plus its
workers, read from /proc), which a loaded machine disturbs far less than wall time.

Each loader runs one untimed warm-up epoch (worker start-up excluded); then ``--repeats``
rounds each time the bare loop and one epoch of every loader, interleaved so that load from
other processes hits all rows alike, and the best round of each is reported. This
process runs torch with ``--torch-threads`` (default 1, as DataLoader workers do). Target:
one worker >= 80 % of the bare loop. With ``--align``, also aligned images/s of
``align_faces.FaceAligner`` on the CPU (``skimage.data.astronaut()``, one face per image).
A table, never an assert.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's modules, not us

import cv2  # noqa: E402

from data_gen import FaceRecordDataset, build_loader  # noqa: E402
from models import normalize_batch  # noqa: E402
from records import recordio  # noqa: E402
from utils import encode_image, int_at_least, positive_int  # noqa: E402

SIDE = 112
JPEG_QUALITY = 95
CLASSES = 100
TARGET_RATIO = 0.8
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def textured_face_sized(rng: np.random.Generator) -> np.ndarray:
    """A 112x112 RGB image with photo-like structure: smooth colour blobs plus fine noise."""
    coarse = rng.integers(0, 256, size=(14, 14, 3), dtype=np.uint8)
    img = cv2.resize(coarse, (SIDE, SIDE), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    img += rng.integers(-10, 11, size=img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def build_rec(path: Path, count: int, seed: int = 0) -> list[bytes]:
    """An InsightFace-layout .rec of ``count`` images; returns the JPEG bytes in order."""
    rng = np.random.default_rng(seed)
    jpegs = [encode_image(textured_face_sized(rng), ".jpg", JPEG_QUALITY) for _ in range(count)]
    labels = np.arange(count) * CLASSES // count  # contiguous classes, as InsightFace sets
    with recordio.RecordWriter(path) as writer:
        id_start = count + 1
        writer.write(recordio.pack_payload([float(id_start), float(id_start + CLASSES)]), 0)
        for key, (jpeg, label) in enumerate(zip(jpegs, labels, strict=True), 1):
            writer.write(recordio.pack_payload(float(label), jpeg), key)
        for cls in range(CLASSES):
            keys = np.flatnonzero(labels == cls) + 1
            writer.write(recordio.pack_payload([float(keys[0]), float(keys[-1] + 1)]),
                         id_start + cls)
    return jpegs


def bare_decode_seconds(jpegs: list[bytes]) -> float:
    start = time.perf_counter()
    for jpeg in jpegs:
        cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    return time.perf_counter() - start


def _worker_cpu_seconds(loader) -> float:
    """CPU seconds used so far by the loader's worker processes (Linux /proc; 0 if none)."""
    pids = getattr(loader, "worker_pids", None)  # RingBufferLoader
    if pids is None:
        workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
        pids = [worker.pid for worker in workers]
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    return total


def epoch_seconds(loader, raw: bool) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, CPU seconds of the workers) of an epoch."""
    main_cpu, worker_cpu = time.process_time(), _worker_cpu_seconds(loader)
    start = time.perf_counter()
    for images, _labels in loader:
        if raw:  # the consumer's share of the work (on a GPU in training)
            normalize_batch(images)
    wall = time.perf_counter() - start
    return (wall, time.process_time() - main_cpu, _worker_cpu_seconds(loader) - worker_cpu)


def align_rate(count: int) -> float:
    # only with --align: scikit-image's sample photo and MTCNN's weights load just then
    from skimage import data

    from faces.aligner import FaceAligner  # with skimage above: --align only

    image = data.astronaut()
    aligner = FaceAligner(device="cpu")
    aligner.align(image)  # warm-up
    start = time.perf_counter()
    faces = aligner.align_batch([image] * count)
    elapsed = time.perf_counter() - start
    found = sum(face is not None for face in faces)
    return found / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=positive_int, default=4000)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--workers", type=int_at_least(0), nargs="+", default=[0, 1, 2])
    parser.add_argument("--raw-workers", type=int_at_least(0), nargs="*", default=[1],
                        help="also time build_loader(raw_uint8=True) with these workers")
    parser.add_argument("--ring-workers", type=positive_int, nargs="*", default=[1, 2],
                        help="also time fast_loader.RingBufferLoader with these workers")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--torch-threads", type=int_at_least(0), default=1,
                        help="torch threads of this process (collate runs here with 0 "
                             "workers; DataLoader workers always use 1); 0 = leave as is")
    parser.add_argument("--align", action="store_true",
                        help="also time align_faces.py's FaceAligner on the CPU")
    parser.add_argument("--align-images", type=positive_int, default=16)
    args = parser.parse_args(argv)
    if args.torch_threads > 0:
        # on a busy machine OpenMP threads spinning at the barrier slow torch.stack ~10x
        torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "train.rec"
        jpegs = build_rec(rec, args.images)
        mean_kb = np.mean([len(j) for j in jpegs]) / 1024
        print(f"{args.images} JPEGs of {SIDE}x{SIDE} (quality {JPEG_QUALITY}, mean "
              f"{mean_kb:.1f} KiB); batch {args.batch_size}; torch threads "
              f"{torch.get_num_threads()}; CPUs {os.cpu_count()}; load average "
              f"{os.getloadavg()[0]:.1f}")
        configs = [(f"FaceRecordDataset + loader, {w} worker(s)", w, False)
                   for w in args.workers]
        configs += [(f"  raw_uint8 + normalize_batch, {w} worker(s)", w, True)
                    for w in args.raw_workers]
        ring = {f"  RingBufferLoader + normalize_batch, {w} worker(s)": w
                for w in args.ring_workers}
        configs += [(name, w, True) for name, w in ring.items()]
        loaders = []
        for name, workers, raw in configs:
            ds = FaceRecordDataset(rec, train=True)
            loader = build_loader(ds, batch_size=args.batch_size, num_workers=workers,
                                  shuffle=True, drop_last=False, raw_uint8=raw,
                                  ring=name in ring)
            epoch_seconds(loader, raw)  # warm-up: workers start, page cache filled
            loaders.append((name, loader, raw))
        # interleaved rounds, so a burst of load from elsewhere hits every row alike
        bare_wall = bare_cpu = float("inf")
        best = {name: [float("inf")] * 3 for name, _, _ in configs}
        for _ in range(args.repeats):
            cpu = time.process_time()
            bare_wall = min(bare_wall, bare_decode_seconds(jpegs))
            bare_cpu = min(bare_cpu, time.process_time() - cpu)
            for name, loader, raw in loaders:
                best[name] = [min(a, b) for a, b in zip(best[name], epoch_seconds(loader, raw),
                                                         strict=True)]
        del loaders  # persistent workers exit
        n = args.images
        workers_of = {name: w for name, w, _ in configs}
        rows = [("cv2.imdecode loop (bytes in memory)", n / bare_wall, bare_cpu / n, 0.0, 0)]
        rows += [(name, n / wall, main / n, work / n, workers_of[name])
                 for name, (wall, main, work) in best.items()]
    if args.align:
        rows.append((f"FaceAligner on CPU, {args.align_images} astronaut images (aligned)",
                     align_rate(args.align_images), 0.0, 0.0, 0))
    print_table(rows)
    return 0


def print_table(rows: list[tuple[str, float, float, float, int]]) -> None:
    """One line per pipeline: (name, images/s, main-process and worker CPU seconds per
    image, workers), the first row being the bare decode loop the others are compared to."""
    bare, bare_us = rows[0][1], rows[0][2] * 1e6
    width = max(len(row[0]) for row in rows)
    print(f"\n{'pipeline':<{width}}  {'images/s':>9}  {'vs bare':>7}  {'main us':>7}  "
          f"{'worker us':>9}  {'idle-core':>9}")
    for name, rate, main, work, workers in rows:
        cells = ""
        if main or work:
            # on idle dedicated cores the slowest stage sets the pace: the main process,
            # or each worker handling 1/workers of the images
            per_image = max(main, work / workers if workers else 0.0) * 1e6
            cells = f"{main * 1e6:>7.0f}  {work * 1e6:>9.0f}  {bare_us / per_image:>9.0%}"
        print(f"{name:<{width}}  {rate:>9.0f}  {rate / bare:>7.0%}  {cells}")
    print("\nimages/s: wall clock, best round (the machine's load moves it). main us / worker us:"
          " CPU\nmicroseconds per image in this process / in all workers together, much less "
          "load-dependent.\nidle-core: the ratio to the bare loop those CPU times imply when "
          "every process has an idle core\nof its own. Target: 1 worker >= "
          f"{TARGET_RATIO:.0%} of the bare loop.")


if __name__ == "__main__":
    sys.exit(main())
