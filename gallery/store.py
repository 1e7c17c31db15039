"""A gallery of enrolled face embeddings: each image's unit embedding, identity, source path
and content hash, searched 1:N by cosine similarity, an identity scored by its best image.

    g = Gallery.create("runs/gallery", 512)          # or index="hnsw" / "ivf", half=True
    g.add(embeddings, identities, sources)          # (n, 512), n names, n paths
    g.save()
    Gallery.open("runs/gallery").search(queries, k=5)  # [[(identity, score), ...] per query]

Search is exact by default (``index="flat"``): per block of the gallery, one matrix product
of the queries with the images, the maximum over each identity's images (the images are
held sorted by identity, so the maximum is one ``np.maximum.reduceat``), and a running
top-k; ties go to the identity whose name sorts first. (faiss's exact IndexFlatIP ranks
images: it would need (k-1) m + 1 neighbours a query, m the most images of one identity, to
be sure of k identities; this costs 1.1-1.2x one matrix product of the queries with the
gallery, measured at 10k and 100k 512-D images.) ``index="hnsw"`` or ``"ivf"`` keep a
faiss index over the images (built once, saved, extended as images are added) for galleries
past a few hundred thousand images: approximate, it fetches enough neighbours to find k
identities when no identity has more than APPROX_MAX_NEIGHBOURS / k images. ``"ivf"`` is
faiss's IVF-PQ "fast scan" (4-bit codes of the images in inverted lists: 32 bytes a 512-D
image, scanned with SIMD table lookups) whose best ``rerank`` candidates a query are
re-scored exactly from the embeddings, so every score it returns is the true cosine
(its speed and recall, and IVF-Flat's before it: bench/README.md).

On disk (the folder): ``gallery.json`` names this generation's files,
``embeddings-<gen>.npy`` (float32, or float16 with ``half``), ``images-<gen>.json``
(ids, identity, source, content hash per image) and ``index-<gen>.faiss`` (approximate
indexes only). ``save`` writes a new generation's files under temporary names, renames
them, then replaces ``gallery.json`` (one rename) and only then deletes the old
generation: a writer killed at any point leaves the last saved gallery, and its leftovers
are removed by the next save. One writer at a time (a lock beside the folder); a gallery
saved by another writer since it was opened is not overwritten.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from gallery.threshold import FarThreshold, FpirThreshold, far_threshold, fpir_threshold
from utils import FOLDER, ToolkitError, claim_output, describe_error, temp_path_for

FORMAT = "arcface-toolkit gallery"
FORMAT_VERSION = 1
MANIFEST = "gallery.json"
INDEX_KINDS = ("flat", "hnsw", "ivf")
# floats in one block of query x image scores: 64 MiB, far below a 1M-image gallery's
# 4 GB for 1,000 queries, and blocks this large keep the matrix products efficient
SCORE_BLOCK_ELEMENTS = 1 << 24
# the first block's images: its top k per query (an argpartition of all its scores) sets the
# bar the later blocks' scores are filtered by, so it is kept small; the blocks then grow by
# BLOCK_GROWTH, so that each lets few scores past the bar (about k x BLOCK_GROWTH a query)
FIRST_BLOCK_IMAGES = 512
BLOCK_GROWTH = 4
INT32_TOP = 2**31 - 1  # float32 bits as int32 made monotone: x ^ INT32_TOP for x < 0
ROW_SHIFT = 32  # a merge's sort key: row << 32 | 32-bit score key
QUERY_CHUNK = 1024  # queries scored together (each block of scores is QUERY_CHUNK rows at most)
# faiss HNSW: links per node, and the candidate lists of build and search (faiss's defaults
# are 32 / 40 / 16; wider lists trade build and search time for recall). 32 / 40: on the
# bench's tuning gallery (seed 1, 30k 512-D) they built in 14 s on 2 cores with recall@1 0.999
# at efSearch 128, the best recall per search second of M 16/32 x efConstruction 40/80;
# efConstruction 200 took 525 s at 100k (an hour or more at 1M)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 128
# faiss IVF: lists = IVF_LISTS_PER_ROOT x sqrt(images) (faiss's guide: 4-16 sqrt(N)), each
# trained on at least IVF_MIN_POINTS_PER_LIST points (below 39 faiss warns), of which the
# training takes at most IVF_TRAIN_PER_LIST per list (a seeded random sample: k-means costs
# sample x lists, at 1M 4,000 lists on every image ~40 TFLOP, on 64 a list ~10); 4 sqrt(N),
# the guide's low end, as that cost grows with lists squared; a gallery grown
# IVF_RETRAIN_GROWTH times past the images it was trained on is trained again at the next save
IVF_LISTS_PER_ROOT = 4
IVF_MIN_POINTS_PER_LIST = 39
IVF_TRAIN_PER_LIST = 64
IVF_RETRAIN_GROWTH = 4
# lists searched per query when nprobe is 0: an eighth of them (at 1M synthetic faces, 512
# of 4,000 found exact search's top identity for 99% of queries; 64 for 84%)
IVF_PROBED_FRACTION = 1 / 8
# the codes: one 4-bit code (16 centroids: what faiss's fast scan takes) per PQ_DIMS_PER_CODE
# dimensions (512-D: 64 codes, 32 bytes an image); the best IVF_RERANK candidates a query
# (by their codes) are re-scored from the embeddings, so a true neighbour whose code
# under-scores it still wins
PQ_BITS = 4
PQ_DIMS_PER_CODE = 8
PQ_MIN_IMAGES = 2 ** PQ_BITS  # codes are trained by k-means: a point a centroid at least
IVF_RERANK = 100
INDEX_PARAMS = {"flat": {}, "hnsw": {"hnsw_m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION,
                                     "ef_search": HNSW_EF_SEARCH},
                # nlist / nprobe / pq_m 0: from the size / the lists / the dimension
                "ivf": {"nlist": 0, "nprobe": 0, "pq_m": 0, "rerank": IVF_RERANK}}
# values of candidate embeddings gathered at a time for re-scoring: 2 MiB of float32, one
# buffer reused (a fresh 64 MiB one a block cost page faults: re-scoring 1,000 queries x 100
# candidates at 1M took 0.079 s, 0.064 s with the buffer)
RESCORE_BLOCK_ELEMENTS = 1 << 19
APPROX_MAX_NEIGHBOURS = 2048  # images an approximate search fetches per query, at most
# a float32 norm below this may have lost digits to squares below float32's normal range
# (|x| < 1e-19); face embeddings are nowhere near, other inputs are measured in float64
FLOAT32_NORM_LOW = 1e-10
OPEN_TRIES = 3  # a reader racing a writer's clean-up reads the new generation instead
TRAIN_SEED = 0  # the images an IVF index is trained on are a seeded sample
_GENERATION_FILE = re.compile(r"(embeddings|images|index)-.*\.(npy|json|faiss)")


class GalleryError(ToolkitError, ValueError):
    """A gallery that cannot be used as asked (missing, corrupt, of another size or model),
    or inputs that do not fit it; the message names the folder or file."""


def _normalised(x: Any, dim: int, what: str) -> np.ndarray:
    """``x`` as (n, dim) float32 rows of unit length; GalleryError for another width,
    non-finite values or a zero row."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1 and x.size == dim:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim:
        raise GalleryError(f"{what}: shape {x.shape}, but the gallery holds {dim}-D embeddings")
    if not np.isfinite(x).all():
        raise GalleryError(f"{what}: non-finite (NaN/inf) values")
    with np.errstate(over="ignore", under="ignore"):
        norms = np.linalg.norm(x, axis=1, keepdims=True)
    # squares past float32's range (|x| ~1e19 or ~1e-19): those rows in float64
    odd = np.flatnonzero(~(norms[:, 0] > FLOAT32_NORM_LOW) | np.isinf(norms[:, 0]))
    wide = x[odd].astype(np.float64)
    wide_norms = np.linalg.norm(wide, axis=1, keepdims=True)
    if len(odd) and not wide_norms.min() > 0:
        raise GalleryError(f"{what}: a zero vector has no direction to compare")
    norms[odd] = 1
    x = x / norms
    x[odd] = wide / wide_norms
    return x


def _write_file(path: Path, write) -> None:
    """``write(binary file)`` into a temporary beside ``path``, fsync, rename."""
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_folder(folder: Path) -> None:
    """The renames in ``folder`` made durable: the new generation's files before the
    manifest names them, the manifest before the old generation's files are deleted."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices (rows, min(k, cols)) of each row's k largest scores, ties going to the
    lower column (callers' columns run in name order); unordered."""
    cols = scores.shape[1]
    if cols <= k:
        return np.broadcast_to(np.arange(cols), (scores.shape[0], cols)).copy()
    part = np.argpartition(scores, cols - k - 1, axis=1)
    top, below = part[:, cols - k:], part[:, cols - k - 1]
    rows = np.arange(scores.shape[0])
    kth = np.take_along_axis(scores, top, axis=1).min(axis=1)
    for r in np.flatnonzero(scores[rows, below] == kth[rows]):  # a tie at the cut: rare
        top[r] = np.lexsort((np.arange(cols), -scores[r]))[:k]
    return top


def _descending_key(scores: np.ndarray) -> np.ndarray:
    """int64 keys in [0, 2^32) that order float32 ``scores`` from high to low (their IEEE
    bits made monotone; -0 counts as +0)."""
    bits = (scores.astype(np.float32) + np.float32(0)).view(np.int32).astype(np.int64)
    return INT32_TOP - np.where(bits < 0, bits ^ INT32_TOP, bits)


def _merge(best_l: np.ndarray, best_s: np.ndarray, rows: np.ndarray, labels: np.ndarray,
           scores: np.ndarray) -> None:
    """Candidates (row, label, score) merged into each row's best k (in place), best first,
    ties in label order. The candidates come row by row, each row's in label order with a
    label's entries adjacent (counted once, with their best score), and their labels are
    above those already among the best (a later block)."""
    if len(rows):
        first = np.ones(len(rows), dtype=bool)
        first[1:] = (rows[1:] != rows[:-1]) | (labels[1:] != labels[:-1])
        if not first.all():
            starts = np.flatnonzero(first)
            scores = np.maximum.reduceat(scores, starts)
            rows, labels = rows[starts], labels[starts]
    q, k = best_l.shape
    r = np.concatenate([np.repeat(np.arange(q), k), rows])
    lab = np.concatenate([best_l.ravel(), labels])
    sc = np.concatenate([best_s.ravel(), scores])
    # by row, then score; a stable sort keeps ties in label order (the best come first)
    order = np.argsort((r << ROW_SHIFT) | _descending_key(sc), kind="stable")
    r, lab, sc = r[order], lab[order], sc[order]
    pos = np.arange(len(r)) - np.searchsorted(r, r)
    keep = pos < k
    best_l[r[keep], pos[keep]] = lab[keep]
    best_s[r[keep], pos[keep]] = sc[keep]


class Gallery:
    """Enrolled face embeddings, searched 1:N; see the module docstring. Build one with
    :meth:`create` or :meth:`open`; ``model`` (a dict, saved with it) records the network
    and checkpoint the embeddings came from."""

    def __init__(self, path: str | Path, dim: int, index: str, params: dict[str, Any],
                 half: bool) -> None:
        self.path = Path(path)
        self.dim, self.index_kind, self.half, self.params = dim, index, half, params
        self.model: dict[str, Any] | None = None
        self._dtype = np.float16 if half else np.float32
        self._emb = np.zeros((0, dim), self._dtype)  # sorted by (identity name, id)
        self._ids = np.zeros(0, np.int64)  # each image's id, never reused
        self._row_of_id: np.ndarray | None = None  # row of each id (-1: none), when needed
        self._label = np.zeros(0, np.int64)  # index of its identity in _names
        self._names: list[str] = []  # sorted; every one has an image
        self._sources: list[str] = []
        self._hashes: list[str] = []
        self._next_id = 0
        self._generation = 0  # of the manifest this was read from or last saved as
        self._files: dict[str, str] = {}
        self._changed = False  # images added or removed since then
        self._index = None  # the approximate index (faiss), or None until built
        self._index_changed = False
        self._trained_on = 0  # images an IVF index was trained on

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: str | Path, dim: int, index: str = "flat", half: bool = False,
               **index_params: Any) -> Gallery:
        """A new, empty gallery of ``dim``-D embeddings at ``path`` (written by :meth:`save`).
        ``index``: "flat" (exact), "hnsw" (``hnsw_m``, ``ef_construction``, ``ef_search``)
        or "ivf" (``nlist``, 0 for 4 sqrt(images); ``nprobe``); ``half``: float16 storage."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise GalleryError(f"{path}: already holds a gallery; open it instead")
        if path.exists() and not path.is_dir():
            raise GalleryError(f"{path}: exists and is not a folder")
        return cls(path, *_spec(path, dim, index, index_params), bool(half))

    @classmethod
    def open(cls, path: str | Path) -> Gallery:
        """The gallery saved at ``path``; GalleryError when there is none or it is damaged."""
        path = Path(path)
        for attempt in range(OPEN_TRIES):
            manifest = _read_manifest(path)
            try:
                return cls._load(path, manifest)
            except FileNotFoundError:  # a writer replaced this generation meanwhile
                if attempt + 1 == OPEN_TRIES or _read_manifest(path) == manifest:
                    raise GalleryError(f"{path}: a file its {MANIFEST} names is missing; "
                                       "the gallery is damaged") from None
        raise AssertionError("unreachable")

    @classmethod
    def _load(cls, path: Path, m: dict[str, Any]) -> Gallery:
        where = path / MANIFEST
        try:
            spec = _spec(where, m["dim"], m["index"]["kind"], dict(m["index"]["params"]))
            g = cls(path, *spec, m["dtype"] == "float16")
            g.model, files = m.get("model"), dict(m["files"])
            g._generation, g._next_id = int(m["generation"]), int(m["next_id"])
            g._trained_on, n = int(m.get("trained_on", 0)), int(m["images"])
            emb_file, table_file = path / files["embeddings"], path / files["images"]
        except (KeyError, TypeError, ValueError) as e:
            raise GalleryError(f"{where}: not a gallery manifest ({describe_error(e)})") from None
        try:
            emb = np.load(emb_file, allow_pickle=False)
            table = json.loads(table_file.read_text(encoding="utf-8"))
            ids = np.asarray(table["ids"], dtype=np.int64)
            identities, sources, hashes = table["identities"], table["sources"], table["hashes"]
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
            raise GalleryError(f"{path}: a gallery file is damaged ({describe_error(e)})") from None
        if emb.shape != (n, g.dim) or emb.dtype != g._dtype or \
                not len(ids) == len(identities) == len(sources) == len(hashes) == n:
            raise GalleryError(f"{emb_file}: holds {emb.shape} {emb.dtype} embeddings and "
                               f"{len(ids)} table rows, but {where} says {n} x {g.dim} "
                               f"{g._dtype.__name__}; the gallery is damaged")
        if not np.isfinite(emb).all():
            raise GalleryError(f"{emb_file}: holds non-finite values; the gallery is damaged")
        g._insert(emb, [str(s) for s in identities], list(sources), list(hashes), ids)
        g._files, g._changed = files, False
        if "index" in files:
            try:
                g._index = faiss.read_index(str(path / files["index"]))
            except RuntimeError as e:
                if not (path / files["index"]).exists():
                    raise FileNotFoundError(path / files["index"]) from None
                raise GalleryError(f"{path / files['index']}: not a faiss index "
                                   f"({describe_error(e)})") from None
            if g._index.ntotal != n:
                raise GalleryError(f"{path / files['index']}: indexes {g._index.ntotal} images, "
                                   f"the gallery holds {n}; the gallery is damaged")
            if g.index_kind == "ivf" and not isinstance(
                    faiss.downcast_index(g._index), faiss.IndexIVFPQFastScan):
                g._index = None  # an IVF-Flat index of an earlier version: built again
        return g

    # ------------------------------------------------------------------ contents
    def __len__(self) -> int:
        return len(self._ids)

    @property
    def generation(self) -> int:
        """The saved generation this copy was read from or last saved as (0: never saved)."""
        return self._generation

    def identities(self) -> list[str]:
        """The enrolled identities, sorted."""
        return list(self._names)

    def enrolled(self) -> dict[str, str]:
        """Each enrolled image's source -> its content hash."""
        return dict(zip(self._sources, self._hashes, strict=True))

    def far_threshold(self, far: float, source: str = "--far",
                      progress: bool = True) -> FarThreshold:
        """The threshold at false-accept rate ``far`` from this gallery's impostor pairs
        (gallery.threshold)."""
        return far_threshold(self._emb, self._label, far, source=source, progress=progress)

    def fpir_threshold(self, fpir: float, source: str = "--fpir",
                       progress: bool = True) -> FpirThreshold:
        """The threshold at false positive identification rate ``fpir`` (the fraction of
        unknown faces a search names), each image searched against the other identities
        (gallery.threshold)."""
        return fpir_threshold(self._emb, self._label, fpir, source=source, progress=progress)

    def add(self, embeddings: Any, identities: Sequence[str], sources: Sequence[str],
            hashes: Sequence[str] | None = None) -> None:
        """Enrol n images: (n, dim) embeddings (normalised to unit length here), each
        image's identity and source (e.g. its path), optionally its content hash."""
        n = len(identities)
        emb = _normalised(embeddings, self.dim, f"{self.path}: embeddings to add")
        hashes = [""] * n if hashes is None else list(hashes)
        if not emb.shape[0] == n == len(sources) == len(hashes):
            raise GalleryError(f"{self.path}: {emb.shape[0]} embeddings, {n} identities, "
                               f"{len(sources)} sources and {len(hashes)} hashes to add; "
                               "give one of each per image")
        bad = [i for i in identities if not isinstance(i, str) or not i]
        if bad:
            raise GalleryError(f"{self.path}: identities must be non-empty strings, got "
                               f"{bad[0]!r}")
        ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        stored = emb.astype(self._dtype, copy=False)
        self._insert(stored, list(identities), [str(s) for s in sources],
                     [str(h) for h in hashes], ids)
        self._next_id += n
        self._changed = self._changed or n > 0
        if self._index is not None and n:  # the values stored (float16 too), as a build
            self._index.add_with_ids(stored.astype(np.float32, copy=False), ids)
            self._index_changed = True

    def _insert(self, emb: np.ndarray, identities: list[str], sources: list[str],
                hashes: list[str], ids: np.ndarray) -> None:
        """Merge rows into the sorted arrays, renumbering the identities by name."""
        fresh = sorted(set(identities).difference(self._names))
        if not self._names or not fresh or fresh[0] > self._names[-1]:
            names, old = self._names + fresh, self._label  # the old names keep their places
        else:
            names = sorted(self._names + fresh)
            rank = {name: i for i, name in enumerate(names)}
            old = np.array([rank[name] for name in self._names], dtype=np.int64)[self._label]
        rank = {name: i for i, name in enumerate(names)}
        labels = np.concatenate([old, np.array([rank[i] for i in identities], dtype=np.int64)])
        all_ids = np.concatenate([self._ids, ids])
        order = np.lexsort((all_ids, labels))
        sources, hashes = self._sources + sources, self._hashes + hashes
        self._emb = np.concatenate([self._emb, emb])
        self._row_of_id = None
        if (np.diff(order) == 1).all():  # added in order (a big gallery in one call): no copy
            self._ids, self._label, self._names = all_ids, labels, names
            self._sources, self._hashes = sources, hashes
            return
        self._emb = self._emb[order]
        self._ids, self._label, self._names = all_ids[order], labels[order], names
        self._sources = [sources[i] for i in order]
        self._hashes = [hashes[i] for i in order]

    def remove(self, identity: str) -> int:
        """Remove every image of ``identity``; the number removed. GalleryError when the
        gallery has no such identity."""
        if identity not in self._names:
            raise GalleryError(f"{self.path}: no identity {identity!r} is enrolled "
                               f"({len(self._names)} identities)")
        return self._keep(self._label != self._names.index(identity))

    def remove_sources(self, sources: Sequence[str]) -> int:
        """Remove the images of these sources (a replaced photo); the number removed."""
        gone = set(sources)
        return self._keep(np.array([s not in gone for s in self._sources], dtype=bool))

    def _keep(self, keep: np.ndarray) -> int:
        removed = int((~keep).sum())
        if not removed:
            return 0
        if self._index is not None:
            if self.index_kind == "ivf":
                self._index.remove_ids(self._ids[~keep])
                self._index_changed = True
            else:  # faiss's HNSW cannot remove: rebuilt at the next save or search
                self._index = None
        used = np.unique(self._label[keep])
        relabel = np.full(len(self._names), -1, dtype=np.int64)
        relabel[used] = np.arange(len(used))
        self._emb, self._ids, self._row_of_id = self._emb[keep], self._ids[keep], None
        self._label = relabel[self._label[keep]]
        self._names = [self._names[i] for i in used]
        self._sources = [s for s, k in zip(self._sources, keep, strict=True) if k]
        self._hashes = [h for h, k in zip(self._hashes, keep, strict=True) if k]
        self._changed = True
        return removed

    # ------------------------------------------------------------------ save
    def save(self) -> None:
        """Write the gallery as a new generation (see the module docstring); nothing when
        unchanged since it was opened or saved."""
        with claim_output(self.path, "--gallery", kind=FOLDER):
            self.path.mkdir(parents=True, exist_ok=True)
            on_disk = _read_manifest(self.path)["generation"] \
                if (self.path / MANIFEST).exists() else 0
            if on_disk != self._generation:
                raise GalleryError(f"{self.path}: saved by another writer (generation "
                                   f"{on_disk}) since this copy was read (generation "
                                   f"{self._generation}); open it again and redo the change")
            if self._generation and not (self._changed or self._index_changed
                                         or self._index_needs_build()):
                return
            generation = self._generation + 1
            files = self._write_generation(f"{generation:06d}-{secrets.token_hex(4)}")
            _fsync_folder(self.path)
            manifest = {"format": FORMAT, "version": FORMAT_VERSION, "generation": generation,
                        "dim": self.dim, "dtype": np.dtype(self._dtype).name,
                        "index": {"kind": self.index_kind, "params": self.params},
                        "images": len(self), "identities": len(self._names),
                        "next_id": self._next_id, "trained_on": self._trained_on,
                        "model": self.model, "files": files}
            text = json.dumps(manifest, indent=1) + "\n"
            _write_file(self.path / MANIFEST, lambda f: f.write(text.encode("utf-8")))
            _fsync_folder(self.path)  # the new manifest durable before the old files go
            self._generation, self._files = generation, files
            self._changed = self._index_changed = False
            self._remove_other_files()

    def _write_generation(self, token: str) -> dict[str, str]:
        """This generation's files (those unchanged since the last save are kept)."""
        files = dict(self._files)
        if self._changed or not files:
            files["embeddings"], files["images"] = f"embeddings-{token}.npy", \
                f"images-{token}.json"
            emb = np.ascontiguousarray(self._emb)
            _write_file(self.path / files["embeddings"], lambda f: np.save(f, emb))
            table = json.dumps({"ids": self._ids.tolist(),
                                "identities": [self._names[i] for i in self._label],
                                "sources": self._sources, "hashes": self._hashes})
            _write_file(self.path / files["images"], lambda f: f.write(table.encode("utf-8")))
        if self.index_kind != "flat":
            if self._index_needs_build():
                self._build_index()
            if self._index is None:  # none any more (an emptied hnsw gallery): none named
                files.pop("index", None)
            elif self._index_changed or "index" not in files:
                files["index"] = f"index-{token}.faiss"
                _write_file(self.path / files["index"],
                            lambda f: f.write(faiss.serialize_index(self._index).tobytes()))
        return files

    def _remove_other_files(self) -> None:
        """Delete earlier generations' files and killed writers' temporaries."""
        named = set(self._files.values())
        for p in self.path.iterdir():
            stale_temp = p.name.startswith(".") and p.name.endswith(".tmp")
            if stale_temp or (_GENERATION_FILE.fullmatch(p.name) and p.name not in named):
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ approximate index
    def _index_needs_build(self) -> bool:
        if self.index_kind == "flat" or not len(self):
            return False
        if self.index_kind == "ivf" and self._index is None and len(self) < PQ_MIN_IMAGES:
            return False  # too few images to train codes on: searched exactly until then
        if self._index is None:
            return True
        return self.index_kind == "ivf" and len(self) > IVF_RETRAIN_GROWTH * self._trained_on

    def _build_index(self) -> None:
        """The faiss index over every image (by id), trained on the images when IVF."""
        emb = np.ascontiguousarray(self._emb, np.float32)  # float32 held: no 2 GB copy at 1M
        if self.index_kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.params["hnsw_m"],
                                        faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.params["ef_construction"]
            index = faiss.IndexIDMap2(inner)
        else:
            nlist = self.params["nlist"] or round(IVF_LISTS_PER_ROOT * math.sqrt(len(self)))
            nlist = max(1, min(nlist, len(self) // IVF_MIN_POINTS_PER_LIST))
            index = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(self.dim), self.dim, nlist,
                                             self._pq_m(), PQ_BITS, faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(TRAIN_SEED).permutation(len(self))[
                :nlist * IVF_TRAIN_PER_LIST]
            index.train(emb[np.sort(sample)])
            self._trained_on = len(self)
        index.add_with_ids(emb, self._ids)
        self._index, self._index_changed = index, True

    def _pq_m(self) -> int:
        """The codes an image: ``pq_m``, else the most that divide the dimension with at
        least PQ_DIMS_PER_CODE dimensions each."""
        if self.params["pq_m"]:
            return self.params["pq_m"]
        return max(m for m in range(1, max(1, self.dim // PQ_DIMS_PER_CODE) + 1)
                   if self.dim % m == 0)

    # ------------------------------------------------------------------ search
    def search(self, queries: Any, k: int = 5,
               with_sources: bool = False) -> list[list[tuple]]:
        """For each query embedding, the top ``k`` identities as (identity, score), best
        first, one entry per identity, an identity scored by its best-matching image
        (cosine similarity); ties in name order. ``with_sources``: (identity, score, source
        of that best image) instead."""
        if not (isinstance(k, (int, np.integer)) and k >= 1):
            raise GalleryError(f"k must be a positive integer, got {k!r}")
        q = _normalised(queries, self.dim, "queries")
        if not len(self):
            return [[] for _ in range(len(q))]
        out = []
        for start in range(0, len(q), QUERY_CHUNK):
            chunk = q[start:start + QUERY_CHUNK]
            search = self._exact if self.index_kind == "flat" else self._approximate
            labels, scores, best = search(chunk, min(int(k), len(self._names)), with_sources)
            for lab, sc, b in zip(labels, scores, best, strict=True):
                out.append([(self._names[i], float(s), self._sources[p]) if with_sources
                            else (self._names[i], float(s))
                            for i, s, p in zip(lab, sc, b, strict=True) if i >= 0])
        return out

    def _groups(self) -> np.ndarray:
        """Where each identity's images start (they are sorted by identity), then the end."""
        change = np.flatnonzero(self._label[1:] != self._label[:-1]) + 1
        return np.concatenate([[0], change, [len(self)]])

    def _blocks(self, rows: int, starts: np.ndarray) -> list[tuple[int, int]]:
        """Identity ranges [a, b) whose images make blocks of up to SCORE_BLOCK_ELEMENTS
        scores for ``rows`` queries, the first of FIRST_BLOCK_IMAGES, each next one
        BLOCK_GROWTH times the last (an identity is never split)."""
        size = max(1, SCORE_BLOCK_ELEMENTS // rows)
        ends, step = [], min(size, FIRST_BLOCK_IMAGES)
        end = step
        while end < len(self):
            ends.append(end)
            step = min(size, step * BLOCK_GROWTH)
            end += step
        cuts = np.searchsorted(starts, ends)
        edges = [0, *sorted({int(c) for c in cuts if 0 < c < len(starts) - 1}), len(starts) - 1]
        return list(zip(edges[:-1], edges[1:], strict=True))

    def _exact(self, q: np.ndarray, k: int,
               sources: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labels, scores and (``sources``) best images (rows, k) of the exact top k
        identities: block by block, the images that beat a row's kth best so far
        (strictly: the blocks run in name order, so a tie goes to the earlier block), an
        identity scored by the best of them (its images that do not beat the bar cannot
        be its best where it enters)."""
        starts = self._groups()
        best_l = np.full((len(q), k), np.iinfo(np.int64).max, np.int64)
        best_s = np.full((len(q), k), -np.inf, np.float32)
        for a, b in self._blocks(len(q), starts):
            lo, hi = starts[a], starts[b]
            scores = q @ self._emb[lo:hi].astype(np.float32, copy=False).T
            if np.isneginf(best_s[:, -1]).any():  # the first block: its top k identities
                if hi - lo != b - a:  # the best image of each identity
                    scores = np.maximum.reduceat(scores, starts[a:b] - lo, axis=1)
                cols = np.sort(_top_k(scores, k), axis=1)  # in label order
                rows = np.repeat(np.arange(len(q)), cols.shape[1])
                cols = cols.ravel()
                labels = cols + a
            else:  # images that beat the kth best so far: few, after the first block
                rows, cols = np.divmod(np.flatnonzero(scores > best_s[:, -1:]), hi - lo)
                labels = self._label[lo + cols]
            _merge(best_l, best_s, rows, labels, scores[rows, cols])
        best = np.zeros_like(best_l)
        for r, row in enumerate(best_l if sources else []):  # the image that scored each
            for c, label in enumerate(row):
                lo, hi = starts[label], starts[label + 1]
                best[r, c] = lo + int(np.argmax(self._emb[lo:hi].astype(np.float32) @ q[r]))
        return best_l, best_s, best

    def _position(self, ids: np.ndarray) -> np.ndarray:
        """Row of each image id (ids of no image: -1): one lookup in a table of every id
        given so far (8 bytes an id)."""
        if self._row_of_id is None:
            self._row_of_id = np.full(self._next_id + 1, -1, np.int64)  # [-1]: no image
            self._row_of_id[self._ids] = np.arange(len(self))
        return self._row_of_id[np.where((ids >= 0) & (ids < self._next_id), ids, -1)]

    def _approximate(self, q: np.ndarray, k: int,
                     sources: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_exact`'s results from the faiss index (-1: fewer than k identities
        found), fetching enough images for k identities when APPROX_MAX_NEIGHBOURS allows."""
        if self._index_needs_build():
            self._build_index()
        if self._index is None:  # an ivf gallery below PQ_MIN_IMAGES
            return self._exact(q, k, sources)
        most = int(np.diff(self._groups()).max())
        fetch = min(len(self), (k - 1) * most + 1, max(k, APPROX_MAX_NEIGHBOURS))
        inner = faiss.downcast_index(self._index.index) if self.index_kind == "hnsw" \
            else self._index
        if self.index_kind == "hnsw":
            inner.hnsw.efSearch = max(self.params["ef_search"], fetch)
        else:
            inner.nprobe = min(self.params["nprobe"], inner.nlist) or \
                max(1, round(IVF_PROBED_FRACTION * inner.nlist))
            fetch = min(len(self), max(fetch, self.params["rerank"]))
        scores, ids = self._index.search(q, fetch)
        pos = self._position(ids.reshape(-1)).reshape(ids.shape)
        if self.index_kind == "ivf":  # the codes' scores are estimates: the true ones
            scores = self._rescored(q, pos)
        # best first, ties in name order as in _exact (faiss's order is its own); no image last
        order = np.lexsort((np.where(pos >= 0, self._label[np.maximum(pos, 0)],
                                     len(self._names)), -scores), axis=1)
        scores, pos = np.take_along_axis(scores, order, 1), np.take_along_axis(pos, order, 1)
        labels = np.full((len(q), k), -1, np.int64)
        best_s = np.zeros((len(q), k), np.float32)
        best = np.zeros((len(q), k), np.int64)
        for r in range(len(q)):
            seen: set[int] = set()
            for s, p in zip(scores[r], pos[r], strict=True):
                if p < 0 or self._label[p] in seen:
                    continue
                c = len(seen)
                seen.add(int(self._label[p]))
                labels[r, c], best_s[r, c], best[r, c] = self._label[p], s, p
                if len(seen) == k:
                    break
        return labels, best_s, best

    def _rescored(self, q: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """The exact cosine of each query with its candidate images (rows ``pos``, -1: none,
        scored -inf); the candidates are gathered RESCORE_BLOCK_ELEMENTS values at a time."""
        scores = np.full(pos.shape, -np.inf, np.float32)
        step = max(1, RESCORE_BLOCK_ELEMENTS // max(1, pos.shape[1] * self.dim))
        cand = np.empty((step, pos.shape[1], self.dim), self._emb.dtype)  # reused: no page faults
        for a in range(0, len(q), step):
            rows = pos[a:a + step]
            np.take(self._emb, np.maximum(rows, 0), axis=0, out=cand[:len(rows)])
            block = np.einsum("qd,qrd->qr", q[a:a + step], cand[:len(rows)],
                              dtype=np.float32, casting="unsafe")
            scores[a:a + step] = np.where(rows >= 0, block, -np.inf)
        return scores


def _spec(where: Path, dim: Any, index: str,
          index_params: dict[str, Any]) -> tuple[int, str, dict[str, Any]]:
    """The embedding size, index kind and its full parameters, checked; GalleryError
    naming ``where`` otherwise."""
    if not (isinstance(dim, (int, np.integer)) and dim >= 1):
        raise GalleryError(f"{where}: the embedding size must be a positive integer, "
                           f"got {dim!r}")
    if index not in INDEX_KINDS:
        raise GalleryError(f"{where}: index {index!r} is not one of {', '.join(INDEX_KINDS)}")
    unknown = set(index_params) - set(INDEX_PARAMS[index])
    if unknown:
        raise GalleryError(f"{where}: index {index!r} takes "
                           f"{sorted(INDEX_PARAMS[index]) or 'no parameters'}, not "
                           f"{sorted(unknown)}")
    params = {**INDEX_PARAMS[index], **index_params}
    if any(not isinstance(v, int) or v < 0 for v in params.values()):
        raise GalleryError(f"{where}: index parameters must be non-negative integers: "
                           f"{params}")
    if index == "hnsw" and params["hnsw_m"] < 1:  # faiss aborts the process on a build
        raise GalleryError(f"{where}: hnsw_m (links per node) must be at least 1, got 0")
    if index == "ivf" and params["pq_m"] and dim % params["pq_m"]:
        raise GalleryError(f"{where}: pq_m {params['pq_m']} does not divide the embedding "
                           f"size {dim} (each code covers dim / pq_m dimensions)")
    return int(dim), index, params


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the gallery at ``path``; GalleryError naming what is wrong."""
    where = path / MANIFEST
    if not where.is_file():
        why = "not a folder" if path.exists() and not path.is_dir() else \
            "no such folder" if not path.exists() else f"no {MANIFEST} in it"
        raise GalleryError(f"{path}: no gallery here ({why}); enrol photos into it first")
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GalleryError(f"{where}: not a gallery manifest ({describe_error(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GalleryError(f"{where}: not a gallery manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise GalleryError(f"{where}: gallery format version {manifest.get('version')}, this "
                           f"version reads {FORMAT_VERSION}")
    return manifest
