"""A batch loader over worker processes that reuses a fixed ring of shared-memory batches.

torch's DataLoader collates every worker batch into freshly allocated shared memory, and on
small machines faulting in those new pages costs about as much as decoding the JPEGs (see
``bench/data_throughput.py``). :class:`RingBufferLoader` allocates ``slots`` uint8 batch
buffers (plus int64 label buffers) in shared memory once, touches them up front, and lets its
worker processes decode straight into them; only ``(batch, slot)`` numbers travel through
the queues.

Contract of the yielded batches ``(images, labels)``:

* ``images``: uint8 ``N x H x W x 3`` RGB, a *view of a ring slot*. It stays valid until the
  next batch is requested from the same iterator (the slot is handed back to the workers
  then); a consumer that keeps a batch longer must ``.clone()`` it. Moving it to a device or
  normalising it (:func:`models.normalize_batch`) right away, as ``train.py`` does, is fine;
  the slots are not pinned, so a CUDA copy out of them has finished reading the slot when
  ``.to(device, non_blocking=True)`` returns.
* ``labels``: int64 ``N``, a fresh tensor of its own (tiny; safe to keep).

Batches come in the batch sampler's order whatever the number of workers, the last one may
be shorter than the others, and each sample is ``dataset.raw_item(i)`` (so unreadable images
are replaced and counted by the dataset, exactly as with the DataLoader), decoded straight
into its slot by ``dataset.raw_item_into``. Each worker first calls
``dataset.worker_init(worker_id)`` when the dataset has one (data_gen's datasets count
unreadable images per worker there).
"""

from __future__ import annotations

import os
import pickle
import queue
import random
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import cv2
import numpy as np
import torch

DEFAULT_TIMEOUT_S = 300.0  # longest wait for one batch before giving up
POLL_S = 0.5  # how often a waiting main process checks that its workers are alive
JOIN_S = 5.0  # grace period for a worker to exit before it is terminated
SEED_RANGE = 2**62  # worker base seeds are drawn below this, as int64


def _default_context() -> str:
    # fork shares the ring without pickling anything and starts in milliseconds
    return "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else "spawn"


def _pack_error(error: BaseException, worker_id: int) -> bytes:
    """The exception itself (so the consumer gets the same type and message) with the
    worker's traceback as a note; a RuntimeError with the text when it will not pickle."""
    where = f"in RingBufferLoader worker {worker_id} (pid {os.getpid()}):\n"
    where += "".join(traceback.format_exception(error))
    try:
        error.add_note(where)
        data = pickle.dumps(error)
        pickle.loads(data)  # some exceptions pickle but cannot be rebuilt
        return data
    except Exception:
        return pickle.dumps(RuntimeError(f"{type(error).__name__}: {error}\n{where}"))


def _worker_loop(worker_id: int, dataset: Any, images: torch.Tensor, labels: torch.Tensor,
                 tasks: Any, results: Any, generation: Any, base_seed: int) -> None:
    """Decode ``(generation, batch, slot, indices)`` tasks into the ring until a None task."""
    cv2.setNumThreads(1)  # OpenCV's thread pool and fork do not mix; one decode per worker
    torch.set_num_threads(1)
    seed = base_seed + worker_id
    torch.manual_seed(seed)  # the datasets derive their per-process generators from this
    np.random.seed(seed % 2**32)
    random.seed(seed)
    worker_init = getattr(dataset, "worker_init", None)
    if worker_init is not None:  # data_gen's datasets: corrupt counts land in this worker's cell
        worker_init(worker_id)
    images_np, labels_np = images.numpy(), labels.numpy()
    try:
        while True:
            task = tasks.get()
            if task is None:
                return
            gen, batch, slot, indices = task
            if gen != generation.value:  # its iteration was abandoned: skip the work
                results.put((gen, batch, slot, 0, None))
                continue
            try:
                for k, i in enumerate(indices):
                    labels_np[slot, k] = dataset.raw_item_into(i, images_np[slot, k])
            except Exception as e:
                results.put((gen, batch, slot, 0, _pack_error(e, worker_id)))
                continue
            results.put((gen, batch, slot, len(indices), None))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent decides
        pass


class RingBufferLoader:
    """Batches of ``dataset.raw_item`` samples decoded by worker processes into a fixed ring
    of shared-memory slots (see the module docstring for the lifetime of a yielded batch).

    ``batch_sampler`` is any re-iterable of index lists (``torch.utils.data.BatchSampler``
    over a ``DistributedSampler`` or ``data_gen.ResumableBatchSampler``, or a plain list of
    lists); it is iterated afresh for every epoch, so ``set_epoch`` on the inner sampler works
    as usual. ``batch_size`` (the slot size) defaults to ``batch_sampler.batch_size``;
    ``image_shape`` to the dataset's ``image_size`` square with 3 channels. ``slots``
    defaults to ``2 * num_workers + 1``: one batch with the consumer, two in work per worker.

    Workers start with the first iteration. With ``persistent_workers=False`` they stop when
    that iteration ends (exhausted, broken out of, or failed); with True they live on across
    epochs until :meth:`close` (or garbage collection). A worker error is raised here with
    its original type and message (the worker traceback as a note); a worker that dies, or
    no batch within ``timeout`` seconds (None: no limit), raises RuntimeError / TimeoutError
    instead of hanging. Worker seeds: ``base + worker_id`` with ``base`` drawn from
    ``generator`` (the global RNG when None) each time workers start, as DataLoader does.
    """

    def __init__(self, dataset: Any, batch_sampler: Iterable[Sequence[int]],
                 num_workers: int = 1, slots: int | None = None, *,
                 batch_size: int | None = None, image_shape: tuple[int, int, int] | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT_S, persistent_workers: bool = False,
                 generator: torch.Generator | None = None, mp_context: str | None = None):
        if num_workers < 1:
            raise ValueError(f"RingBufferLoader needs num_workers >= 1, got {num_workers}")
        if not hasattr(dataset, "raw_item_into"):
            raise TypeError(f"{type(dataset).__name__} has no raw_item_into(); RingBufferLoader "
                            f"needs one of data_gen's datasets")
        batch_size = batch_size or getattr(batch_sampler, "batch_size", None)
        if not batch_size or batch_size < 1:
            raise ValueError("batch_size is needed when the batch sampler has none")
        if image_shape is None:
            side = int(dataset.image_size)
            image_shape = (side, side, 3)
        slots = 2 * num_workers + 1 if slots is None else slots
        if slots < 2:
            raise ValueError(f"a ring needs at least 2 slots, got {slots}")
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.num_workers, self.num_slots, self.batch_size = num_workers, slots, batch_size
        self.timeout, self.persistent_workers = timeout, persistent_workers
        self.generator = generator
        self._ctx = torch.multiprocessing.get_context(mp_context or _default_context())
        # zeros, then moved to shared memory: the copy faults every page in now, once
        self._images = torch.zeros((slots, batch_size, *image_shape),
                                   dtype=torch.uint8).share_memory_()
        self._labels = torch.zeros((slots, batch_size), dtype=torch.int64).share_memory_()
        # the current iteration's number; workers skip tasks of abandoned ones
        self._generation = self._ctx.RawValue("q", 0)
        self._workers: list[Any] = []
        self._tasks: Any = None
        self._results: Any = None
        self._free: list[int] = list(range(slots))
        self._outstanding = 0  # tasks sent whose result has not come back
        self._active = False  # an iteration is under way

    # ------------------------------------------------------------------ workers

    @property
    def sampler(self) -> Any:
        """The per-index sampler inside the batch sampler (None for a list of lists), as
        DataLoader's ``.sampler``: ``loader.sampler.set_epoch(e)`` reshuffles a distributed one."""
        return getattr(self.batch_sampler, "sampler", None)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (empty when none run)."""
        return [w.pid for w in self._workers]

    def _start_workers(self) -> None:
        self._tasks, self._results = self._ctx.Queue(), self._ctx.Queue()
        base_seed = int(torch.randint(SEED_RANGE, (), generator=self.generator))
        for worker_id in range(self.num_workers):
            w = self._ctx.Process(
                target=_worker_loop, daemon=True,
                args=(worker_id, self.dataset, self._images, self._labels, self._tasks,
                      self._results, self._generation, base_seed))
            w.start()
            self._workers.append(w)

    def _shutdown_workers(self) -> None:
        if not self._workers:
            return
        self._generation.value += 1  # queued work is skipped, not decoded
        try:
            for _ in self._workers:
                self._tasks.put(None)
            deadline = time.monotonic() + JOIN_S
            for w in self._workers:
                w.join(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            for w in self._workers:
                if w.is_alive():
                    w.terminate()
                    w.join()
            for q in (self._tasks, self._results):
                q.cancel_join_thread()  # nobody reads them any more: never block on flush
                q.close()
            self._workers, self._tasks, self._results = [], None, None
            self._free, self._outstanding = list(range(self.num_slots)), 0

    def close(self) -> None:
        """Stop the workers (the ring stays allocated; a new iteration restarts them)."""
        self._shutdown_workers()

    def __del__(self) -> None:
        try:
            self._shutdown_workers()
        except Exception:  # interpreter shutdown: daemon workers are reaped anyway
            pass

    def __enter__(self) -> RingBufferLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ iteration

    def __len__(self) -> int:
        return len(self.batch_sampler)  # TypeError when the sampler has no length

    def _receive(self, gen: int, ready: dict[int, tuple[int, int, bytes | None]]) -> None:
        """Wait for one worker result: file it (or its error) in ``ready`` by batch number,
        or recycle the slot of a stale one."""
        waited = 0.0
        while True:
            try:
                msg_gen, batch, slot, n, error = self._results.get(timeout=POLL_S)
                break
            except queue.Empty:
                waited += POLL_S
            dead = [w for w in self._workers if not w.is_alive()]
            if dead:
                raise RuntimeError(
                    f"RingBufferLoader worker pid {dead[0].pid} exited unexpectedly (exit "
                    f"code {dead[0].exitcode}); killed for memory, or crashed in native code?")
            if self.timeout is not None and waited >= self.timeout:
                raise TimeoutError(f"RingBufferLoader: no batch from {self.num_workers} "
                                   f"worker(s) in {self.timeout:.0f} s")
        self._outstanding -= 1
        if msg_gen != gen:  # left over from an abandoned iteration
            self._free.append(slot)
            return
        ready[batch] = (slot, n, error)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._active:
            raise RuntimeError("RingBufferLoader supports one iteration at a time (a new one "
                               "would recycle the slots of the batches still in use)")
        if not self._workers:
            self._start_workers()
        self._generation.value += 1
        return self._batches(self._generation.value)

    def _batches(self, gen: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if gen != self._generation.value:  # the workers would skip its tasks: empty batches
            raise RuntimeError("RingBufferLoader supports one iteration at a time (this "
                               "iterator was overtaken by a newer iter() before its first "
                               "batch)")
        self._active = True
        batches = iter(self.batch_sampler)
        ready: dict[int, tuple[int, int, bytes | None]] = {}
        sent = yielded = 0
        exhausted, finished = False, False
        try:
            # results of an abandoned iteration still hold slots: wait for them first
            while self._outstanding and not self._free:
                self._receive(gen, ready)
            while True:
                while not exhausted and self._free:
                    indices = next(batches, None)
                    if indices is None:
                        exhausted = True
                        break
                    indices = self._checked(indices)
                    self._tasks.put((gen, sent, self._free.pop(), indices))
                    self._outstanding += 1
                    sent += 1
                if exhausted and yielded == sent:
                    finished = True
                    return
                while yielded not in ready:
                    self._receive(gen, ready)
                slot, n, error = ready.pop(yielded)
                yielded += 1
                if error is not None:  # raised in batch order, as the DataLoader does
                    self._free.append(slot)
                    raise pickle.loads(error)
                try:
                    yield self._images[slot, :n], self._labels[slot, :n].clone()
                finally:
                    self._free.append(slot)  # the consumer asked for more (or left)
        finally:
            self._active = False
            for slot, _, _ in ready.values():
                self._free.append(slot)
            if not self.persistent_workers:
                self._shutdown_workers()
            elif not finished:
                self._generation.value += 1  # workers skip what is still queued

    def _checked(self, indices: Any) -> list[int]:
        try:
            out = [int(i) for i in indices]
        except TypeError:
            raise TypeError(f"the batch sampler yielded {indices!r}, not a list of indices; "
                            f"wrap a per-index sampler in torch.utils.data.BatchSampler"
                            ) from None
        if len(out) > self.batch_size:
            raise ValueError(f"a batch of {len(out)} indices does not fit the ring's "
                             f"{self.batch_size}-image slots")
        return out
