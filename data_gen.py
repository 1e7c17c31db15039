"""Training data: RecordIO and image-folder datasets, the resumable sampler, the checks a
trainer runs on a set before its first step, and the one loader builder.

Every dataset here has the same interface:

* ``len(ds)``, ``ds.num_classes``, ``ds.labels`` (int64 array, one label per sample, so a
  trainer can check the label range before its first step), ``ds.corrupt_count``;
* ``ds.read(i) -> (RGB uint8 HxWx3, int label)``: the raw image, errors raised;
* ``ds[i] -> (float32 tensor 3x112x112 = (x - 127.5) / 127.5, int label)``; the loader's
  collate turns the labels into an int64 tensor. With ``train=True`` a random horizontal flip
  is applied. An undecodable image is counted, warned about (RuntimeWarning naming the
  record) and replaced by another sample of the same class, so an epoch never dies on one bad
  JPEG. A bad magic number (the index does not match the file) is an error naming file and
  byte offset.

``build_loader`` wraps a dataset (``raw_uint8=True``: uint8 batches, normalised by the caller
with :func:`models.normalize_batch`, the faster way; ``ring=True``: fast_loader's ring of shared
memory; ``sampler``: train.py's ResumableBatchSampler); with ``distributed=True`` the
caller must call
``loader.sampler.set_epoch(epoch)`` (or :func:`set_epoch`) before each epoch, otherwise every
epoch repeats the same order.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import random
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from config import build_parser, parse_config
from records import recordio
from records.identity_folders import list_identity_images
from records.record_index import load_or_build_index, require_complete
from training.fast_loader import RingBufferLoader
from utils import FACE_CROP_SIZE as IMAGE_SIZE
from utils import (
    PIXEL_CENTRE,
    DatasetError,
    ImageReadError,
    ToolkitError,
    decode_image,
    positive_int,
    read_image,
    run_cli,
)

FLIP_PROBABILITY = 0.5  # a training image is mirrored this often (here and train.random_flip)
MAX_REPLACEMENT_TRIES = 20  # corrupt samples tried before giving up on a replacement
COUNTER_SLOTS = 256  # per-process corrupt counters: the main process + up to 255 workers

_counter_slot = 0  # this process's corrupt counter when torch reports no DataLoader worker


def _worker_counter_slot(worker_id: int) -> int:
    return 1 + worker_id % (COUNTER_SLOTS - 1)  # slot 0 is the main process's


def set_counter_slot(worker_id: int) -> None:
    """Make this process count unreadable samples in worker ``worker_id``'s own counter
    (for worker processes that are not DataLoader's, e.g. fast_loader's)."""
    global _counter_slot
    _counter_slot = _worker_counter_slot(worker_id)


class _FaceDataset(Dataset):
    """Shared behaviour: normalisation, flip, and replacement of unreadable samples."""

    labels: np.ndarray
    num_classes: int

    def __init__(self, train: bool, image_size: int = IMAGE_SIZE):
        self.train = train
        self.image_size = image_size
        # Shared memory, one slot per process (main = 0, worker k = k + 1), so the parent
        # sees the workers' counts without a lock; a lock would tie the dataset to one
        # multiprocessing start method.
        self._corrupt = multiprocessing.RawArray(ctypes.c_int64, COUNTER_SLOTS)
        self._bad: set[int] = set()  # per process: indices known to be unreadable
        self._rng: np.random.Generator | None = None
        self._rng_pid: int | None = None
        self._by_class: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.labels.size)

    def worker_init(self, worker_id: int) -> None:
        """Count this worker process's unreadable samples in its own cell (called by
        fast_loader's workers; DataLoader's are told apart by torch's worker info)."""
        set_counter_slot(worker_id)

    @property
    def corrupt_count(self) -> int:
        """Unreadable samples met so far, summed over all worker processes."""
        return int(sum(self._corrupt))

    def read(self, i: int) -> tuple[np.ndarray, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, i: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _generator(self) -> np.random.Generator:
        # one generator per process, seeded from torch's per-worker seed, so forked workers
        # never share a random stream
        pid = os.getpid()
        if self._rng is None or self._rng_pid != pid:
            self._rng = np.random.default_rng(torch.initial_seed())
            self._rng_pid = pid
        return self._rng

    def _class_members(self, label: int) -> np.ndarray:
        if self._by_class is None:
            order = np.argsort(self.labels, kind="stable")
            starts = np.searchsorted(self.labels[order], np.arange(self.num_classes + 1))
            self._by_class = (order, starts)
        order, starts = self._by_class
        return order[starts[label]:starts[label + 1]]

    def read_or_replace(self, i: int) -> tuple[np.ndarray, int]:
        """``read(i)``; if that image is unreadable, count it, warn, and read another sample of
        the same class (any class once the whole class turned out unreadable)."""
        try:
            return self._checked_read(i)
        except ImageReadError as e:
            self._record_bad(i, e)
        label = int(self.labels[i])
        rng = self._generator()
        members = self._class_members(label)
        candidates = [int(j) for j in rng.permutation(members) if int(j) not in self._bad]
        for j in candidates[:MAX_REPLACEMENT_TRIES]:
            try:
                return self._checked_read(j)
            except ImageReadError as e:
                self._record_bad(j, e)
        for _ in range(MAX_REPLACEMENT_TRIES):
            j = int(rng.integers(len(self)))
            if j in self._bad:
                continue
            try:
                return self._checked_read(j)
            except ImageReadError as e:
                self._record_bad(j, e)
        raise RuntimeError(f"{self.describe(i)}: unreadable, and no readable replacement "
                           f"found in {MAX_REPLACEMENT_TRIES} tries; is the data corrupt?")

    def _checked_read(self, i: int) -> tuple[np.ndarray, int]:
        image, label = self.read(i)
        if image.shape[:2] != (self.image_size, self.image_size):
            image = cv2.resize(image, (self.image_size, self.image_size),
                               interpolation=cv2.INTER_AREA)
        return image, label

    def _record_bad(self, i: int, error: Exception) -> None:
        self._bad.add(i)
        info = torch.utils.data.get_worker_info()
        self._corrupt[_counter_slot if info is None else _worker_counter_slot(info.id)] += 1
        warnings.warn(f"{error}; replacing it with another sample of class "
                      f"{int(self.labels[i])}", RuntimeWarning, stacklevel=3)

    def _augmented(self, i: int) -> tuple[np.ndarray, int]:
        image, label = self.read_or_replace(int(i))
        if self.train and self._generator().random() < FLIP_PROBABILITY:
            image = cv2.flip(image, 1)  # a contiguous copy: the pass below reads it fast
        return image, label

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self._augmented(i)
        # one pass: HWC -> CHW, uint8 -> float32, x / 127.5 - 1 (== (x - 127.5) / 127.5)
        chw = np.multiply(image.transpose(2, 0, 1), np.float32(1.0 / PIXEL_CENTRE),
                          dtype=np.float32)
        chw -= np.float32(1.0)
        return torch.from_numpy(chw), label

    def raw_item(self, i: int) -> tuple[torch.Tensor, int]:
        """Like ``ds[i]`` but the image stays as decoded: uint8 HxWx3 RGB (flipped when
        training); :func:`models.normalize_batch` finishes the job on the consumer's side."""
        image, label = self._augmented(i)
        return torch.from_numpy(image), label

    def raw_item_into(self, i: int, out: np.ndarray) -> int:
        """``raw_item(i)`` written into ``out`` (uint8 HxWx3 of the dataset's size, e.g. a
        slot of a shared batch buffer); returns the label. The same pixels and the same
        replacement of unreadable images, but the common case decodes straight into ``out``
        (no image allocated, no copy)."""
        i = int(i)
        label = self._read_into(i, out)
        if label is None:  # unreadable or unusual: the ordinary path counts and replaces
            image, label = self._augmented(i)
            out[...] = image
        elif self.train and self._generator().random() < FLIP_PROBABILITY:
            cv2.flip(out, 1, dst=out)
        return label

    def _read_into(self, i: int, out: np.ndarray) -> int | None:
        """Decode sample ``i`` into ``out`` when it is plain 8-bit colour of ``out``'s size
        and return its label; None (nothing counted) otherwise."""
        return None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_rng"] = state["_rng_pid"] = None
        return state


class FaceRecordDataset(_FaceDataset):
    """Aligned faces from an InsightFace / im2rec ``.rec`` (with or without ``.idx``).

    The record index comes from ``pre_process.py``'s saved ``<stem>.index.npz`` when it is
    fresh, else it is built in memory. A set that lost records (damaged, cut off, missing
    from the ``.idx``) is refused with ``record_index.LostRecordsError`` unless
    ``allow_lost_records`` (then a warning with the count, and the dataset holds exactly the
    usable records; ``index_corrupt_count`` / ``lost_records`` say how many were not)."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None,
                 train: bool = True, image_size: int = IMAGE_SIZE,
                 allow_lost_records: bool = False):
        super().__init__(train, image_size)
        self.rec_path = Path(rec_path)
        index = load_or_build_index(self.rec_path, idx_path)
        require_complete(index, allow_lost_records)
        self.lost_records = index.lost
        self.offsets = index.offsets
        self.keys = index.keys
        self.labels = index.labels
        self.num_classes = index.num_classes
        self.classes = index.identities  # names by label where the index keeps them
        self.index_corrupt_count = index.corrupt_count
        self.reader = recordio.RecordReader(self.rec_path)

    def describe(self, i: int) -> str:
        return f"{self.rec_path}: record {self.keys[i]} at byte offset {self.offsets[i]}"

    def read(self, i: int) -> tuple[np.ndarray, int]:
        """The decoded RGB image and label of sample ``i``. ImageReadError for bad image
        bytes; RecordIOError (file and offset named) for a broken record."""
        data, source = self._image_bytes(i)
        return decode_image(data, source), int(self.labels[i])

    def _image_bytes(self, i: int) -> tuple[bytes, str]:
        """Sample ``i``'s encoded image and its description (RecordIOError naming the file
        and offset for a broken record)."""
        source = self.describe(i)
        _, data = recordio.unpack_payload(self.reader.read_at(int(self.offsets[i])), source)
        return data, source

    def _read_into(self, i: int, out: np.ndarray) -> int | None:
        data, source = self._image_bytes(i)
        try:
            decoded = decode_image(data, source, out=out)
        except ImageReadError:
            return None  # read() reports it the general way (counted, replaced)
        if decoded is not out:
            return None  # not plain colour of out's size: read() resizes it
        return int(self.labels[i])


class ImageFolderDataset(_FaceDataset):
    """Aligned faces in ``root/identity/image``: identities sorted by name are labels
    0 .. C-1 (folders without images are ignored), as ``pre_process.py --pack`` numbers them;
    images at any other depth are refused, as --pack refuses them.
    Images that are not ``image_size`` square are resized."""

    def __init__(self, root: str | Path, train: bool = True, image_size: int = IMAGE_SIZE):
        super().__init__(train, image_size)
        self.root = Path(root)
        paths, labels, names = list_identity_images(self.root)
        # relative paths in one NumPy bytes array: no per-item Python objects for forked
        # workers to touch (and copy) through reference counting
        self.paths = np.array([os.fsencode(p.relative_to(self.root)) for p in paths])
        self.labels = labels
        self.classes = names
        self.num_classes = len(names)

    def describe(self, i: int) -> str:
        return str(self.root / os.fsdecode(self.paths[i]))

    def read(self, i: int) -> tuple[np.ndarray, int]:
        return read_image(self.describe(i)), int(self.labels[i])


class RawUint8View(Dataset):
    """A face dataset seen through ``raw_item``: uint8 HxWx3 images (4x less to move between
    processes than float32). Other attributes (labels, num_classes, ...) pass through."""

    def __init__(self, dataset: _FaceDataset):
        if not hasattr(dataset, "raw_item"):
            raise TypeError(f"{type(dataset).__name__} has no raw_item(); raw_uint8 needs one "
                            f"of data_gen's datasets")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.dataset.raw_item(i)

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling): avoid recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableBatchSampler(Sampler[int]):
    """Sample indices for one rank, deterministic in (seed, epoch), resumable mid-epoch.

    Epoch e shuffles all samples with a generator seeded by ``seed + e``; global batch b is
    ``perm[b*G:(b+1)*G]`` with G = batch_size * world_size, and rank r takes the r-th slice
    of it. The incomplete last global batch is dropped. ``set_epoch(e, start_batch=k)`` starts
    the epoch at batch k, so a resumed run reads exactly the batches the interrupted one had
    left, without loading the skipped ones. The order depends only on the seed, epoch and
    global batch, never on the RNG state of the process."""

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.world_size, self.rank = world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = num_samples // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_samples} samples are fewer than one global batch of "
                             f"{self.global_batch} ({batch_size} x {world_size} ranks)")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        for b in range(self.start_batch, self.batches_per_epoch):
            start = b * self.global_batch + self.rank * self.batch_size
            yield from order[start:start + self.batch_size].tolist()

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class LabelRangeError(ToolkitError, ValueError):
    """A training label lies outside [0, num_classes); the message names the data file."""


def check_enough_images(num_images: int, global_batch: int, source: str) -> None:
    """Refuse a set smaller than one global batch (no step could run), naming it."""
    if num_images < global_batch:
        raise DatasetError(f"{source}: {num_images} images, fewer than one global batch of "
                           f"{global_batch}; lower --batch-size")


def check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    """Refuse labels outside [0, num_classes) before training starts, naming the file."""
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise LabelRangeError(
            f"{source}: {bad.size} of {labels.size} labels lie outside [0, {num_classes}) "
            f"(first: sample {i} has label {int(labels[i])}); the data set declares "
            f"{num_classes} identities")


def _seed_worker(worker_id: int) -> None:
    """Seed NumPy and ``random`` in each worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(dataset: Dataset, batch_size: int, num_workers: int = 0,
                 shuffle: bool = True, drop_last: bool = True, distributed: bool = False,
                 seed: int = 0, *, sampler: Sampler[int] | None = None,
                 num_replicas: int | None = None, rank: int | None = None,
                 raw_uint8: bool = False, ring: bool = False, pin_memory: bool | None = None,
                 mp_context: str | None = None) -> Iterable:
    """Batches of ``dataset``: the one loader builder (train.py, tests and bench).

    The order: ``sampler`` when given (train.py's ResumableBatchSampler), else a
    ``DistributedSampler`` when ``distributed`` (world size / rank from the process group
    unless given; the caller calls ``loader.sampler.set_epoch(epoch)`` every epoch), else
    shuffled or not. ``seed`` seeds the loader's own generator, which draws the shuffle and
    the worker base seed, so iterating does not advance the global RNG a checkpoint records.

    A DataLoader with pinned memory (default: when CUDA is present), persistent workers (when
    ``num_workers > 0``) and seeded workers, whose batches are ``(float32 Nx3x112x112
    normalised, int64 N)``. With ``raw_uint8=True`` the images come as uint8 NxHxWx3 instead
    and the caller applies :func:`models.normalize_batch` (best after moving them to the GPU):
    worker processes then pass 4x fewer bytes through shared memory, which on small CPUs costs more
    than the JPEG decode itself (see bench/data_throughput.py). With ``ring`` and workers a
    ``fast_loader.RingBufferLoader`` instead (uint8 batches decoded by persistent workers
    into a fixed ring of shared memory; each batch is valid until the next one is requested).
    ``mp_context`` ("fork", "spawn", "forkserver") overrides the workers' start method.
    """
    generator = torch.Generator().manual_seed(seed)
    if sampler is None and distributed:
        if num_replicas is None and not torch.distributed.is_initialized():
            raise RuntimeError("distributed=True needs an initialised process group "
                               "(or explicit num_replicas and rank)")
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank,
                                     shuffle=shuffle, seed=seed, drop_last=drop_last)
    if ring and num_workers > 0:
        if sampler is None:
            sampler = RandomSampler(dataset, generator=generator) if shuffle \
                else SequentialSampler(dataset)
        return RingBufferLoader(dataset, BatchSampler(sampler, batch_size, drop_last),
                                num_workers=num_workers, persistent_workers=True,
                                generator=generator, mp_context=mp_context)
    if raw_uint8:
        dataset = RawUint8View(dataset)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
        sampler=sampler, num_workers=num_workers, drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0, worker_init_fn=_seed_worker, generator=generator,
        multiprocessing_context=mp_context if num_workers > 0 else None)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell a distributed sampler the epoch (a no-op for the other samplers)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


def build_dataset(rec: str = "", image_folder: str = "", train: bool = True,
                  allow_lost_records: bool = False) -> _FaceDataset:
    """The training dataset a config names: ``image_folder`` when set, else ``rec``
    (refused when it lost records, unless ``allow_lost_records``)."""
    if image_folder:
        return ImageFolderDataset(image_folder, train=train)
    return FaceRecordDataset(rec, train=train, allow_lost_records=allow_lost_records)


def main(argv: list[str] | None = None) -> int:
    """Open the configured training set, print its size, and time a few loader batches."""
    parser = build_parser("Check a training set: size, classes, and a few timed batches.",
                          only=["rec", "image_folder", "allow_lost_records", "batch_size",
                                "num_workers", "seed"])
    parser.add_argument("--batches", type=positive_int, default=5, help="batches to read")
    parser.add_argument("--raw-uint8", action="store_true", help="uint8 batches")
    cfg, args = parse_config(argv, parser=parser)
    ds = build_dataset(cfg.rec, cfg.image_folder, allow_lost_records=cfg.allow_lost_records)
    source = cfg.image_folder or cfg.rec
    print(f"{source}: {len(ds)} images, {ds.num_classes} identities, labels "
          f"{int(ds.labels.min())}..{int(ds.labels.max())}")
    loader = build_loader(ds, cfg.batch_size, cfg.num_workers, seed=cfg.seed,
                          drop_last=False, raw_uint8=args.raw_uint8)
    start, seen = time.perf_counter(), 0
    for n, (images, labels) in enumerate(loader):
        if n == 0:
            print(f"batch: images {tuple(images.shape)} {images.dtype}, labels "
                  f"{tuple(labels.shape)} {labels.dtype}")
        seen += len(labels)
        if n + 1 >= args.batches:
            break
    elapsed = time.perf_counter() - start
    print(f"{seen} images in {elapsed:.2f} s ({seen / elapsed:.0f} images/s with "
          f"{cfg.num_workers} workers, start-up included); corrupt so far: {ds.corrupt_count}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
