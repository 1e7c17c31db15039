"""fast_loader.RingBufferLoader: the batches a plain loop over the images would give (order,
pixels, labels), worker errors surfacing, workers gone after an early break, close or
garbage collection, and corrupt images replaced and counted inside the workers."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import struct

import numpy as np
import pytest
import recordio_testlib as lib
import torch

import data_gen
from records import recordio
from training.fast_loader import RingBufferLoader

COUNTS = (3, 5, 2, 6)  # 16 images, 4 classes
# out of order, a repeated index, and a short last batch
BATCHES = [[3, 0, 7, 15], [1, 2, 4, 5], [14, 13, 12, 11], [6, 8, 9, 3], [10]]
TIMEOUT_S = 30.0  # a hang becomes a failure, never a stuck test run


def _alive(pids: list[int]) -> set[int]:
    """Which of ``pids`` are still running children (active_children reaps the exited)."""
    return {p.pid for p in multiprocessing.active_children()} & set(pids)


def _collect(loader) -> tuple[list[np.ndarray], list[list[int]]]:
    images, labels = [], []
    for batch_images, batch_labels in loader:
        assert batch_images.dtype == torch.uint8 and batch_labels.dtype == torch.int64
        images.append(batch_images.numpy().copy())  # the view is recycled by the next batch
        labels.append(batch_labels.tolist())
    return images, labels


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_equal_the_images_in_sampler_order(tmp_path, workers):
    rec, _, expected = lib.build_insightface_set(tmp_path, COUNTS)
    ds = data_gen.FaceRecordDataset(rec, train=False)
    # 2 slots for 5 batches: every slot is reused, and with 2 workers results arrive out of
    # order; two epochs over the same persistent workers
    loader = RingBufferLoader(ds, BATCHES, num_workers=workers, slots=2, batch_size=4,
                              timeout=TIMEOUT_S, persistent_workers=True)
    assert len(loader) == len(BATCHES)
    for _ in range(2):
        images, labels = _collect(loader)
        assert [len(b) for b in images] == [len(b) for b in BATCHES]  # short last batch
        for batch, got_images, got_labels in zip(BATCHES, images, labels, strict=True):
            # the reference: the test library's own decode of what it wrote
            assert got_labels == [expected[i][1] for i in batch]
            for i, got in zip(batch, got_images, strict=True):
                assert got.shape == (112, 112, 3)
                np.testing.assert_array_equal(got, expected[i][2])
        assert len(_alive(loader.worker_pids)) == workers  # persistent between epochs
    pids = loader.worker_pids
    loader.close()
    assert not _alive(pids) and loader.worker_pids == []
    assert ds.corrupt_count == 0


def test_workers_stop_after_early_break_close_and_garbage_collection(tmp_path):
    rec, _, expected = lib.build_insightface_set(tmp_path, COUNTS)
    ds = data_gen.FaceRecordDataset(rec, train=False)
    loader = RingBufferLoader(ds, BATCHES, num_workers=2, batch_size=4, timeout=TIMEOUT_S)
    for images, _ in loader:
        pids = loader.worker_pids
        assert len(_alive(pids)) == 2
        np.testing.assert_array_equal(images[1].numpy(), expected[BATCHES[0][1]][2])
        break
    assert not _alive(pids)  # not persistent: the abandoned iteration stopped its workers
    # exhaustion stops them too, and a new iteration starts fresh ones
    assert _collect(loader)[1] == [[expected[i][1] for i in b] for b in BATCHES]
    assert loader.worker_pids == []

    persistent = RingBufferLoader(ds, BATCHES, num_workers=1, batch_size=4,
                                  timeout=TIMEOUT_S, persistent_workers=True)
    it = iter(persistent)
    next(it)
    pids = persistent.worker_pids
    del it  # an early break keeps persistent workers, and the next epoch is whole
    assert _alive(pids)
    assert _collect(persistent)[1] == [[expected[i][1] for i in b] for b in BATCHES]
    persistent.close()
    assert not _alive(pids)

    collected = RingBufferLoader(ds, BATCHES, num_workers=1, batch_size=4,
                                 timeout=TIMEOUT_S, persistent_workers=True)
    _collect(collected)
    pids = collected.worker_pids
    assert _alive(pids)
    del collected
    gc.collect()
    assert not _alive(pids)


def test_worker_error_names_file_and_offset(tmp_path):
    rec, offsets, _ = lib.build_insightface_set(tmp_path, COUNTS)
    ds = data_gen.FaceRecordDataset(rec, train=False)
    data = bytearray(rec.read_bytes())  # the file changes under a built dataset
    struct.pack_into("<I", data, offsets[9], 0x12345678)  # sample 8 (key 9): bad magic
    rec.write_bytes(bytes(data))
    loader = RingBufferLoader(ds, BATCHES, num_workers=2, batch_size=4, timeout=TIMEOUT_S)
    seen = 0
    with pytest.raises(recordio.RecordIOError) as err:
        for _ in loader:
            seen += 1
    assert str(rec) in str(err.value) and f"byte offset {offsets[9]}" in str(err.value)
    assert seen == 3  # the batches before the broken one ([6, 8, 9, 3]) came through
    assert loader.worker_pids == []


def test_killed_worker_raises_instead_of_hanging(tmp_path):
    rec, _, _ = lib.build_insightface_set(tmp_path, COUNTS)
    ds = data_gen.FaceRecordDataset(rec, train=False)
    loader = RingBufferLoader(ds, BATCHES * 3, num_workers=1, slots=2, batch_size=4,
                              timeout=TIMEOUT_S)
    it = iter(loader)
    next(it)
    os.kill(loader.worker_pids[0], signal.SIGKILL)
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        for _ in it:
            pass


def test_corrupt_jpeg_replaced_and_counted_in_a_worker(tmp_path):
    bad_key = 5  # class 1 holds keys 4..8 (samples 3..7)
    rec, _, expected = lib.build_insightface_set(tmp_path, COUNTS, corrupt_jpeg_at=bad_key)
    ds = data_gen.FaceRecordDataset(rec, train=False)
    batches = [list(range(8)), list(range(8, 16))]
    loader = RingBufferLoader(ds, batches, num_workers=2, batch_size=8, timeout=TIMEOUT_S)
    images, labels = _collect(loader)
    assert sum(labels, []) == [c for _, c, _ in expected]
    got = np.concatenate(images)
    bad = bad_key - 1
    same_class = [w for k, c, w in expected if c == 1 and k != bad_key]
    assert any(np.array_equal(got[bad], w) for w in same_class)
    for i, (_, _, want) in enumerate(expected):
        if i != bad:
            np.testing.assert_array_equal(got[i], want)
    assert ds.corrupt_count == 1  # counted in a worker, seen here


def test_spawned_worker_and_training_flip(tmp_path):
    rec, _, expected = lib.build_insightface_set(tmp_path, (2, 2), corrupt_jpeg_at=2)
    ds = data_gen.FaceRecordDataset(rec, train=True)
    loader = RingBufferLoader(ds, [[0, 1, 2, 3]] * 4, num_workers=1, batch_size=4,
                              timeout=TIMEOUT_S, mp_context="spawn")
    images, labels = _collect(loader)
    assert labels == [[0, 0, 1, 1]] * 4
    seen = set()
    for batch in images:
        for i, got in enumerate(batch):
            want = expected[0 if i == 1 else i][2]  # sample 1 (key 2) is corrupt: 0 stands in
            if np.array_equal(got, want):
                seen.add("plain")
            else:
                np.testing.assert_array_equal(got, want[:, ::-1])
                seen.add("flipped")
    assert seen == {"plain", "flipped"}  # 16 coin flips
    assert ds.corrupt_count == 4  # the corrupt sample was met once per batch


def test_raw_item_into_matches_raw_item_for_folders_too(tmp_path):
    rec, _, expected = lib.build_insightface_set(tmp_path / "rec", COUNTS)
    root = tmp_path / "folder"
    for n, (_, cls, want) in enumerate(expected[:4]):
        (root / f"id{cls}").mkdir(parents=True, exist_ok=True)
        (root / f"id{cls}" / f"{n}.png").write_bytes(lib.png_bytes(want))
    folder = data_gen.ImageFolderDataset(root, train=False)
    out = np.zeros((112, 112, 3), np.uint8)
    for i in range(len(folder)):
        assert folder.raw_item_into(i, out) == int(folder.labels[i])
        np.testing.assert_array_equal(out, folder.read(i)[0])


def test_bad_batch_sampler_and_arguments_are_refused(tmp_path):
    rec, _, _ = lib.build_insightface_set(tmp_path, COUNTS)
    ds = data_gen.FaceRecordDataset(rec, train=False)
    per_index = torch.utils.data.SequentialSampler(ds)
    with pytest.raises(ValueError, match="batch_size"):
        RingBufferLoader(ds, per_index)
    loader = RingBufferLoader(ds, per_index, batch_size=4, timeout=TIMEOUT_S)
    with pytest.raises(TypeError, match="BatchSampler"):
        next(iter(loader))
    with pytest.raises(ValueError, match="does not fit"):
        next(iter(RingBufferLoader(ds, [[0, 1, 2]], batch_size=2, timeout=TIMEOUT_S)))
    with pytest.raises(TypeError, match="raw_item"):
        RingBufferLoader(list(range(4)), [[0]], batch_size=1)
    sampler = torch.utils.data.BatchSampler(per_index, 4, drop_last=False)
    assert len(RingBufferLoader(ds, sampler)) == 4 == len(sampler)


def test_an_iterator_overtaken_by_a_newer_one_raises_instead_of_yielding_empty_batches(
        tmp_path):
    """iter(loader) twice before the first is read: the workers skip the older iteration's
    tasks, which then came back as batches of 0 images. The old iterator must refuse; the
    newer one gives every image."""
    rec, _, expected = lib.build_insightface_set(tmp_path, COUNTS)
    ds = data_gen.FaceRecordDataset(rec, train=False)
    with RingBufferLoader(ds, BATCHES, num_workers=1, batch_size=4, timeout=TIMEOUT_S,
                          persistent_workers=True) as loader:
        older, newer = iter(loader), iter(loader)
        with pytest.raises(RuntimeError, match="one iteration at a time"):
            next(older)
        got = [(images.numpy().copy(), labels.tolist()) for images, labels in newer]
    assert [labels for _, labels in got] == [[expected[i][1] for i in b] for b in BATCHES]
    for batch, (images, _) in zip(BATCHES, got, strict=True):
        np.testing.assert_array_equal(images, np.stack([expected[i][2] for i in batch]))


def test_train_loader_ring_and_dataloader_give_the_same_batches(tmp_path):
    import train
    from config import make_config
    from data_gen import ResumableBatchSampler
    from training.distributed import DistInfo

    rec, _, expected = lib.build_insightface_set(tmp_path, COUNTS)
    settings = {"rec": str(rec), "batch_size": 3, "num_workers": 1, "seed": 5}
    cfg = make_config(settings)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    dataset, _ = train.build_dataset(cfg)
    runs = {}
    for ring in (True, False):
        sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed)
        ring_cfg = make_config({**settings, "ring_loader": ring})
        loader = train.training_loader(dataset, sampler, ring_cfg, info)
        assert isinstance(loader, RingBufferLoader) == ring
        batches = []
        for epoch, start in ((0, 0), (1, 2)):  # a whole epoch, then one resumed mid-way
            sampler.set_epoch(epoch, start)
            for images, labels in loader:
                batches.append((images.clone(), labels.clone()))
        runs[ring] = batches
        if ring:
            loader.close()
        del loader
    # 16 images at batch 3: 5 batches a epoch (the short one dropped), then 3 resumed
    assert len(runs[True]) == len(runs[False]) == 5 + 3
    for (a_images, a_labels), (b_images, b_labels) in zip(runs[True], runs[False], strict=True):
        assert a_images.dtype == b_images.dtype == torch.uint8
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    # and the order is the sampler's: epoch 0 in full, with the test library's pixels
    order = list(ResumableBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed))
    first = torch.cat([images for images, _ in runs[True][:5]]).numpy()
    for got, i in zip(first, order, strict=True):
        np.testing.assert_array_equal(got, expected[i][2])
