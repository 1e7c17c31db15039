"""1:N gallery search (identify.Gallery) against one matmul, and approximate indexes at 1M.

    python bench/identify_speed.py [--sizes 10000 100000 1000000] [--ann ivf hnsw]
        [--ivf-size 1000000] [--hnsw-size 100000] [--enrol-photos 200]

Synthetic clustered galleries, 512-D unit vectors: identity centres uniform on the sphere,
IMAGES_PER_IDENTITY images each, an image = cos * centre + sin * (a random unit direction
orthogonal to it) with cos ~ U(CENTRE_COS) to its centre (two images of one identity meet at
~0.42, impostors at ~N(0, 1/sqrt(512))). Queries: new images of enrolled identities and,
UNENROLLED_FRACTION of them, images of identities not in the gallery.

1. Exact: 1,000 queries against galleries of each size, timed in alternating rounds (medians)
   beside ONE matmul of queries x gallery^T (torch.mm, in reused column blocks where the whole
   output would pass MM_MAX_OUTPUT_BYTES): the Gallery's search (top-5 identities, each scored
   by its best image) and faiss's IndexFlatIP alone (top-5 images). Target: Gallery <= 1.5x.
2. Approximate (the Gallery's "ivf": IVF-PQ fast scan, its best candidates re-scored from
   the embeddings; "hnsw": HNSW-Flat): recall@1 = the same top identity as exact search, over
   enrolled queries (the target, >= 0.99) and unenrolled ones (reported: their "nearest" is a
   random impostor, and a threshold names them unknown anyway); speed-up over IndexFlatIP in
   alternating rounds (target >= 20x); build time; index bytes (written file); the build's
   peak memory above what was resident before it (Linux VmHWM). nprobe / efSearch are chosen
   on a separate tuning gallery (seed TUNE_SEED, same size): the smallest on the grid whose
   enrolled recall@1 reaches the target, else the largest.
3. Enrol: `identify.py enrol` (a subprocess) on synthetic face photos (synthetic/) with the
   demo's network (ir_narrow, untrained: the weights do not change the time), photos/s of the
   whole command and of the enrolment alone (the first run minus a rerun with nothing new).

Prints tables; never asserts a target.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repo's modules, not us

from bench._peak_memory import peak_above, process_peak, start_peak  # noqa: E402
from identify import Gallery  # noqa: E402
from models import build_model  # noqa: E402
from synthetic import synthetic_faces  # noqa: E402
from utils import fraction, int_at_least, save_checkpoint  # noqa: E402

DIM = 512
NUM_QUERIES = 1000
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
IMAGES_PER_IDENTITY = 5  # a gallery enrols a few photos per person
CENTRE_COS = (0.5, 0.8)  # an image's cosine to its identity centre (face models: ~0.5-0.8)
UNENROLLED_FRACTION = 0.1  # queries of people not in the gallery
TOP_K = 5
SEED = 0
TUNE_SEED = 1  # the tuning gallery: parameters are never chosen on the measured one
GEN_BLOCK = 65_536  # rows generated at a time: no full-size float64 temporaries
ADD_CHUNK = 4 * GEN_BLOCK  # rows per Gallery.add: its normalised copy stays small
CENTRE_SALT, IMAGE_SALT = 0xCE, 0x1A  # keep the centre and image streams of one seed apart
MM_BLOCK = 65_536
MM_MAX_OUTPUT_BYTES = 2**30  # a larger mm output is computed in reused column blocks (memory)
RATIO_TARGET = 1.5
RECALL_TARGET = 0.99
SPEEDUP_TARGET = 20.0
NPROBE_GRID = (16, 32, 64, 128, 256, 512, 1024, 2048)
EF_SEARCH_GRID = (16, 32, 64, 128, 256, 512, 1024)
ENROL_IMAGES_PER_IDENTITY = 5
ENROL_NETWORK, ENROL_EMBEDDING = "ir_narrow", 128  # the demo's network (config "demo")


# ----------------------------------------------------------------------------- data

def _unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _images_of(centres: np.ndarray, rng: np.random.Generator,
               centre_cos: tuple[float, float]) -> np.ndarray:
    """One image per centre row: cos * centre + sin * unit direction orthogonal to it."""
    cos = rng.uniform(*centre_cos, (len(centres), 1)).astype(np.float32)
    z = rng.standard_normal(centres.shape, dtype=np.float32)
    z -= np.sum(z * centres, axis=1, keepdims=True) * centres
    _unit_rows(z)
    return _unit_rows(cos * centres + np.sqrt(1.0 - cos * cos) * z)


class SyntheticGallery:
    """A gallery of ``n`` images of ceil(n / IMAGES_PER_IDENTITY) identities (identity i owns
    rows i*IMAGES_PER_IDENTITY ...) and its queries (label -1: not enrolled). Rows come in
    GEN_BLOCK blocks, each from its own seeded stream: the same rows whether made whole or
    block by block, so a gallery is regenerated instead of held twice."""

    def __init__(self, n: int, seed: int, num_queries: int = NUM_QUERIES,
                 centre_cos: tuple[float, float] = CENTRE_COS) -> None:
        self.n, self.seed, self.centre_cos = n, seed, tuple(centre_cos)
        rng = np.random.default_rng([seed, CENTRE_SALT])
        num_ids = -(-n // IMAGES_PER_IDENTITY)
        self.centres = _unit_rows(rng.standard_normal((num_ids, DIM), dtype=np.float32))
        self.labels = np.repeat(np.arange(num_ids), IMAGES_PER_IDENTITY)[:n]
        num_unenrolled = round(num_queries * UNENROLLED_FRACTION)
        self.query_labels = rng.integers(0, num_ids, num_queries)
        self.query_labels[:num_unenrolled] = -1
        query_centres = self.centres[np.maximum(self.query_labels, 0)]
        query_centres[:num_unenrolled] = _unit_rows(
            rng.standard_normal((num_unenrolled, DIM), dtype=np.float32))
        self.queries = _images_of(query_centres, rng, self.centre_cos)
        self.enrolled = self.query_labels >= 0
        # zero-padded names sort in label order; a name says its label
        self.names = [f"id{i:07d}" for i in range(num_ids)]

    def block(self, start: int) -> np.ndarray:
        """Rows [start, start + GEN_BLOCK) (start a multiple of GEN_BLOCK)."""
        rng = np.random.default_rng([self.seed, IMAGE_SALT, start // GEN_BLOCK])
        return _images_of(self.centres[self.labels[start:start + GEN_BLOCK]], rng,
                          self.centre_cos)

    def array(self) -> np.ndarray:
        out = np.empty((self.n, DIM), np.float32)
        for start in range(0, self.n, GEN_BLOCK):
            out[start:start + GEN_BLOCK] = self.block(start)
        return out

    def into(self, gallery) -> None:
        """Add every row to ``gallery`` (identify.Gallery), ADD_CHUNK rows at a time: the
        whole array is never held beside the gallery's own copy."""
        for start in range(0, self.n, ADD_CHUNK):
            stop = min(start + ADD_CHUNK, self.n)
            rows = np.concatenate([self.block(b) for b in range(start, stop, GEN_BLOCK)])
            gallery.add(rows, [self.names[i] for i in self.labels[start:stop]],
                        [f"synthetic/{i}.jpg" for i in range(start, stop)])


def exact_top1(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """The brute-force reference: each query's best gallery row, by blocked torch.mm."""
    q = torch.from_numpy(queries)
    best = torch.full((len(queries),), -np.inf)
    arg = torch.zeros(len(queries), dtype=torch.long)
    for start in range(0, len(gallery), MM_BLOCK):
        val, idx = torch.mm(q, torch.from_numpy(gallery[start:start + MM_BLOCK]).t()).max(1)
        better = val > best
        best[better], arg[better] = val[better], idx[better] + start
    return arg.numpy()


# ----------------------------------------------------------------------------- timing

def alternate(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each function, called in turn each round (load hits all alike)."""
    for fn in fns.values():
        fn()  # warm-up: BLAS/OpenMP start-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def whole_mm(queries: int, n: int) -> bool:
    """Whether the queries x gallery^T output fits MM_MAX_OUTPUT_BYTES (else blocks)."""
    return queries * n * 4 <= MM_MAX_OUTPUT_BYTES


def matmul(q: torch.Tensor, g: torch.Tensor) -> None:
    """One queries x gallery^T product: whole, or in reused column blocks when too big."""
    if whole_mm(q.shape[0], g.shape[0]):
        torch.mm(q, g.t())
        return
    buf = torch.empty(q.shape[0], MM_BLOCK)
    for start in range(0, g.shape[0], MM_BLOCK):
        block = g[start:start + MM_BLOCK]
        torch.mm(q, block.t(), out=buf[:, :block.shape[0]])


def top_labels(results: list[list[tuple]]) -> np.ndarray:
    """The label of each query's top identity (names are ``id<label>``); -1 for none."""
    return np.array([int(r[0][0][2:]) if r else -1 for r in results])


def recall_at_1(found: np.ndarray, exact: np.ndarray, mask: np.ndarray) -> float:
    """Share of the ``mask`` queries whose top identity is exact search's."""
    return float(np.mean(found[mask] == exact[mask])) if mask.any() else float("nan")


# ----------------------------------------------------------------------------- measurements

def measure_exact(data: SyntheticGallery, rounds: int, folder: Path) -> dict:
    """Gallery (flat) and IndexFlatIP searches beside one matmul, alternating; the Gallery is
    filled first, so its add's copies never sit beside the test's own gallery array."""
    gallery = Gallery.create(folder / f"flat-{data.n}", DIM)
    start = time.perf_counter()
    data.into(gallery)
    add_s = time.perf_counter() - start
    x = data.array()
    exact = data.labels[exact_top1(data.queries, x)]
    flat = faiss.IndexFlatIP(DIM)
    flat.add(x)
    q, q_t, x_t = data.queries, torch.from_numpy(data.queries), torch.from_numpy(x)
    times = alternate({"mm": lambda: matmul(q_t, x_t),
                       "faiss": lambda: flat.search(q, TOP_K),
                       "gallery": lambda: gallery.search(q, k=TOP_K)}, rounds)
    found = top_labels(gallery.search(q, k=TOP_K))
    _, flat_rows = flat.search(q, 1)
    return {"n": data.n, "add_s": add_s, **times,
            "gallery_agrees": int(np.sum(found == exact)),
            "faiss_agrees": int(np.sum(data.labels[flat_rows[:, 0]] == exact)),
            "exact": exact}


def _search_param(kind: str) -> str:
    return "nprobe" if kind == "ivf" else "ef_search"


def tune(kind: str, n: int, folder: Path, build: dict, queries: int,
         centre_cos: tuple[float, float]) -> tuple[int, list[tuple]]:
    """The smallest grid value whose enrolled recall@1 reaches RECALL_TARGET on the tuning
    gallery (seed TUNE_SEED), else the largest; and the sweep (value, enrolled recall,
    unenrolled recall, seconds)."""
    data = SyntheticGallery(n, TUNE_SEED, queries, centre_cos)
    exact = data.labels[exact_top1(data.queries, data.array())]
    gallery = Gallery.create(folder / f"tune-{kind}-{n}", DIM, index=kind, **build)
    data.into(gallery)
    gallery.search(data.queries[:1], k=TOP_K)  # builds the index
    sweep = []
    for value in NPROBE_GRID if kind == "ivf" else EF_SEARCH_GRID:
        gallery.params[_search_param(kind)] = value
        start = time.perf_counter()
        found = top_labels(gallery.search(data.queries, k=TOP_K))
        seconds = time.perf_counter() - start
        sweep.append((value, recall_at_1(found, exact, data.enrolled),
                      recall_at_1(found, exact, ~data.enrolled), seconds))
        if sweep[-1][1] >= RECALL_TARGET:
            break
    return sweep[-1][0], sweep


def measure_ann(kind: str, data: SyntheticGallery, exact: np.ndarray, value: int, rounds: int,
                folder: Path, build: dict) -> dict:
    """Build time and peak, saved index bytes, search time and recall@1 of one Gallery."""
    gallery = Gallery.create(folder / f"{kind}-{data.n}", DIM, index=kind, **build)
    data.into(gallery)
    gallery.params[_search_param(kind)] = value
    base = start_peak()
    start = time.perf_counter()
    gallery.search(data.queries[:1], k=TOP_K)  # the first search builds the index
    build_s = time.perf_counter() - start
    build_peak = peak_above(base)
    gallery.save()
    index_file = sorted(gallery.path.glob("index-*.faiss"))
    times = alternate({kind: lambda: gallery.search(data.queries, k=TOP_K)}, rounds)
    found = top_labels(gallery.search(data.queries, k=TOP_K))
    return {"kind": kind, "n": data.n, "value": value, "build_s": build_s,
            "build_peak": build_peak, "embedding_bytes": data.n * DIM * 4,
            "index_bytes": index_file[0].stat().st_size if index_file else float("nan"),
            "seconds": times[kind],
            "recall": recall_at_1(found, exact, data.enrolled),
            "recall_unenrolled": recall_at_1(found, exact, ~data.enrolled)}


# ----------------------------------------------------------------------------- enrolment

def make_photos(folder: Path, photos: int) -> None:
    """``photos`` synthetic face photos in ``folder/<identity>/<photo>.jpg`` (the demo's
    generator; ENROL_IMAGES_PER_IDENTITY per identity)."""
    for p in range(photos):
        i, k = divmod(p, ENROL_IMAGES_PER_IDENTITY)
        name = synthetic_faces.identity_name(synthetic_faces.TRAIN_SPLIT, i)
        identity = synthetic_faces.make_identity(synthetic_faces.identity_seed(
            SEED, synthetic_faces.TRAIN_SPLIT, i))
        path = synthetic_faces.image_path(folder, name, k + 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(synthetic_faces.render_jpeg(identity, np.random.default_rng([i, k])))


def measure_enrol(photos: int, folder: Path) -> dict:
    """Seconds of `identify.py enrol` on ``photos`` new photos, then of a rerun (nothing new:
    start-up, model load, the photo listing and hashing)."""
    people, gallery = folder / "people", folder / "enrolled"
    make_photos(people, photos)
    checkpoint = folder / "backbone.pt"
    save_checkpoint(build_model(ENROL_NETWORK, ENROL_EMBEDDING).state_dict(), checkpoint)
    command = [sys.executable, str(ROOT / "identify.py"), "enrol", "--gallery", str(gallery),
               "--photos", str(people), "--checkpoint", str(checkpoint),
               "--network", ENROL_NETWORK, "--device", "cpu"]
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        seconds.append(time.perf_counter() - start)
        if proc.returncode:
            raise SystemExit(f"error: identify.py enrol failed:\n{proc.stderr[-2000:]}")
    return {"photos": photos, "enrolled": len(Gallery.open(gallery)), "first_s": seconds[0],
            "rerun_s": seconds[1]}


# ----------------------------------------------------------------------------- report

def _mib(x: float | None) -> str:
    return "n/a (no /proc)" if x is None else f"{x / 2**20:,.0f} MiB"


def print_exact(rows: list[dict], queries: int) -> None:
    print(f"\nexact search, {queries} queries, top-{TOP_K} (medians of alternating rounds)")
    print(f"{'gallery':>10} {'mm s':>8} {'faiss s':>8} {'Gallery s':>10} {'faiss/mm':>9} "
          f"{'Gallery/mm':>11} {'top-1 = brute force':>20}  mm")
    for r in rows:
        print(f"{r['n']:>10,} {r['mm']:>8.3f} {r['faiss']:>8.3f} {r['gallery']:>10.3f} "
              f"{r['faiss'] / r['mm']:>9.2f} {r['gallery'] / r['mm']:>11.2f} "
              f"{r['gallery_agrees']:>9}/{queries} (faiss {r['faiss_agrees']})  "
              f"{'one mm' if whole_mm(queries, r['n']) else f'{MM_BLOCK}-column blocks'}")
    print(f"(target Gallery/mm <= {RATIO_TARGET}; Gallery.add of the whole gallery: "
          + ", ".join(f"{r['n']:,} {r['add_s']:.1f} s" for r in rows) + ")")


def print_ann(tuned: dict, rows: list[dict], exact: dict) -> None:
    for kind, (value, sweep) in tuned.items():
        print(f"\n{kind} tuning gallery (seed {TUNE_SEED}): {_search_param(kind)}, recall@1 "
              "enrolled / unenrolled, seconds")
        for v, r_in, r_out, s in sweep:
            print(f"  {v:>6} {r_in:.3f} / {r_out:.3f} {s:.3f} s")
        print(f"  chosen: {value}")
    print(f"\napproximate search (seed {SEED}), recall@1 = the same top identity as exact")
    for r in rows:
        speedup = exact[r["n"]] / r["seconds"]
        print(f"  {r['kind']} {r['n']:,} images, {_search_param(r['kind'])} {r['value']}: "
              f"recall@1 enrolled {r['recall']:.4f} (target >= {RECALL_TARGET}), unenrolled "
              f"{r['recall_unenrolled']:.3f}; {r['seconds']:.3f} s, {speedup:.1f}x exact "
              f"(target >= {SPEEDUP_TARGET:.0f}x); build {r['build_s']:.1f} s, build peak "
              f"+{_mib(r['build_peak'])}; index file {_mib(r['index_bytes'])} (embeddings "
              f"{_mib(r['embedding_bytes'])})")


def print_enrol(r: dict) -> None:
    print(f"\nenrol ({ENROL_NETWORK}, {r['photos']} synthetic photos, CPU): "
          f"{r['enrolled']} enrolled; {r['first_s']:.1f} s, {r['photos'] / r['first_s']:.1f} "
          f"photos/s for the whole command; a rerun with nothing new {r['rerun_s']:.1f} s, "
          f"so {r['photos'] / max(r['first_s'] - r['rerun_s'], 1e-9):.1f} photos/s enrolling")


def _progress(line: str) -> None:
    """Each result as it comes (stderr), before the tables at the end of a long run."""
    tqdm.write(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int_at_least(1), nargs="+",
                        default=list(DEFAULT_SIZES))
    parser.add_argument("--queries", type=int_at_least(1), default=NUM_QUERIES)
    parser.add_argument("--rounds", type=int_at_least(1), default=3,
                        help="alternating timing rounds")
    parser.add_argument("--ann", nargs="*", choices=("ivf", "hnsw"), default=["ivf", "hnsw"])
    parser.add_argument("--ivf-size", type=int_at_least(1), default=1_000_000)
    parser.add_argument("--hnsw-size", type=int_at_least(1), default=100_000,
                        help="HNSW's build at 1M takes too long on 2 cores")
    parser.add_argument("--nlist", type=int_at_least(0), default=0,
                        help="IVF lists (0: the Gallery's)")
    parser.add_argument("--centre-cos", type=fraction, nargs=2, default=list(CENTRE_COS),
                        metavar=("LO", "HI"), help="an image's cosine to its identity centre")
    parser.add_argument("--enrol-photos", type=int_at_least(0), default=200,
                        help="0: skip enrolment")
    parser.add_argument("--threads", type=int_at_least(1), default=torch.get_num_threads())
    parser.add_argument("--workdir", default=None, help="temporary galleries (default: /tmp)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    plan = [(k, args.ivf_size if k == "ivf" else args.hnsw_size) for k in args.ann]
    builds = {"ivf": {"nlist": args.nlist}, "hnsw": {}}
    print(f"{DIM}-D, {IMAGES_PER_IDENTITY} images per identity at cos ~ "
          f"U{tuple(args.centre_cos)} to its centre, {args.queries} queries "
          f"({UNENROLLED_FRACTION:.0%} unenrolled); {args.threads} threads; IVF nlist "
          f"{args.nlist or 'the Gallery rule'}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        tuned = {}
        for k, n in tqdm(plan, desc="tuning"):
            tuned[k] = tune(k, n, folder, builds[k], args.queries, args.centre_cos)
            _progress(f"tuned {k} at {n:,}: {tuned[k]}")
        exact_rows, ann_rows = [], []
        for n in tqdm(sorted(set(args.sizes) | {n for _, n in plan}), desc="galleries"):
            data = SyntheticGallery(n, SEED, args.queries, args.centre_cos)
            exact_rows.append(measure_exact(data, args.rounds, folder))
            _progress(f"exact {n:,}: " + str({key: v for key, v in exact_rows[-1].items()
                                               if key != "exact"}))
            for k in [k for k, size in plan if size == n]:
                ann_rows.append(measure_ann(k, data, exact_rows[-1]["exact"], tuned[k][0],
                                            args.rounds, folder, builds[k]))
                _progress(f"{k} {n:,}: {ann_rows[-1]}")
        enrol = measure_enrol(args.enrol_photos, folder) if args.enrol_photos else None
    print_exact(exact_rows, args.queries)
    print_ann(tuned, ann_rows, {r["n"]: r["gallery"] for r in exact_rows})
    if enrol:
        print_enrol(enrol)
    print(f"\npeak resident memory of this process (VmHWM): {_mib(process_peak())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
