"""data_gen.py: datasets over test-written RecordIO files and folders, and the loader."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
import recordio_testlib as lib
import torch

import data_gen
import models
import pre_process
from records import record_index, recordio
from utils import run_cli

COUNTS = (3, 5, 2, 6)


def _normalised(rgb: np.ndarray) -> np.ndarray:
    """The protocol, in float64: CHW, (x - 127.5) / 127.5."""
    return (rgb.astype(np.float64).transpose(2, 0, 1) - 127.5) / 127.5


def test_record_dataset_reads_every_image_and_label(tmp_path):
    rec, _, expected = lib.build_insightface_set(tmp_path, COUNTS)
    ds = data_gen.FaceRecordDataset(rec, train=False)
    assert len(ds) == sum(COUNTS) and ds.num_classes == len(COUNTS)
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [c for _, c, _ in expected]
    for i, (_, cls, want) in enumerate(expected):
        image, label = ds.read(i)
        assert image.dtype == np.uint8 and label == cls
        np.testing.assert_array_equal(image, want)
        tensor, label = ds[i]
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (3, 112, 112)
        np.testing.assert_allclose(tensor.numpy(), _normalised(want), atol=1e-6)
    assert ds.corrupt_count == 0


def test_record_dataset_without_idx(tmp_path):
    rec, _, expected = lib.build_insightface_set(tmp_path, COUNTS, idx=False)
    ds = data_gen.FaceRecordDataset(rec, train=False)
    assert ds.labels.tolist() == [c for _, c, _ in expected]
    np.testing.assert_array_equal(ds.read(1)[0], expected[1][2])  # the split record


def test_train_flip_is_horizontal_and_random(tmp_path):
    rec, _, expected = lib.build_insightface_set(tmp_path, COUNTS)
    ds = data_gen.FaceRecordDataset(rec, train=True)
    plain = _normalised(expected[0][2])
    mirrored = plain[:, :, ::-1]
    seen = set()
    for _ in range(40):
        out = ds[0][0].numpy()
        if np.allclose(out, plain, atol=1e-6):
            seen.add("plain")
        elif np.allclose(out, mirrored, atol=1e-6):
            seen.add("flipped")
        else:
            raise AssertionError("train output is neither the image nor its mirror")
    assert seen == {"plain", "flipped"}


def test_corrupt_jpeg_replaced_by_same_class(tmp_path):
    bad_key = 5  # class 1 holds keys 4..8
    rec, _, expected = lib.build_insightface_set(tmp_path, COUNTS, corrupt_jpeg_at=bad_key)
    ds = data_gen.FaceRecordDataset(rec, train=False)
    bad = [k for k, _, _ in expected].index(bad_key)
    same_class = [_normalised(w) for k, c, w in expected if c == 1 and k != bad_key]
    with pytest.warns(RuntimeWarning, match=f"record {bad_key} at byte offset"):
        tensor, label = ds[bad]
    assert label == 1 and ds.corrupt_count == 1
    assert any(np.allclose(tensor.numpy(), w, atol=1e-6) for w in same_class)
    with pytest.raises(Exception, match="not a decodable image"):
        ds.read(bad)  # read() itself reports; only __getitem__ replaces


def test_bad_magic_during_training_names_file_and_offset(tmp_path):
    rec, offsets, _ = lib.build_insightface_set(tmp_path, COUNTS)
    ds = data_gen.FaceRecordDataset(rec, train=False)
    data = bytearray(rec.read_bytes())  # the file changes under a built dataset
    struct.pack_into("<I", data, offsets[3], 0x12345678)
    rec.write_bytes(bytes(data))
    with pytest.raises(recordio.RecordIOError) as err:
        ds[2]
    assert str(rec) in str(err.value) and f"byte offset {offsets[3]}" in str(err.value)


def test_loader_with_two_workers(tmp_path):
    rec, _, expected = lib.build_insightface_set(tmp_path, COUNTS, corrupt_jpeg_at=12)
    ds = data_gen.FaceRecordDataset(rec, train=False)
    loader = data_gen.build_loader(ds, batch_size=4, num_workers=2, shuffle=False,
                                   drop_last=True)
    assert loader.persistent_workers and loader.num_workers == 2
    batches = list(loader)
    assert len(batches) == len(ds) // 4
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.dtype == torch.float32 and tuple(images.shape[1:]) == (3, 112, 112)
    assert labels.dtype == torch.int64
    assert labels.tolist() == ds.labels.tolist()[:len(labels)]
    for i, (key, _, want) in enumerate(expected[:len(labels)]):
        if key == 12:  # replaced by a readable sample of its class
            continue
        np.testing.assert_allclose(images[i].numpy(), _normalised(want), atol=1e-6)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert ds.corrupt_count == 1  # counted inside a worker, visible here


def test_shuffled_loader_is_seeded(tmp_path):
    rec, _, _ = lib.build_insightface_set(tmp_path, COUNTS)
    ds = data_gen.FaceRecordDataset(rec, train=False)

    def order(seed):
        loader = data_gen.build_loader(ds, batch_size=len(ds), seed=seed, drop_last=False)
        return [batch[0][:, 0, 0, 0].tolist() for batch in loader][0]

    assert order(3) == order(3) and order(3) != order(4)


def test_distributed_sampler_splits_and_reshuffles(tmp_path):
    rec, _, _ = lib.build_insightface_set(tmp_path, COUNTS)
    ds = data_gen.FaceRecordDataset(rec, train=False)
    loaders = [data_gen.build_loader(ds, batch_size=2, distributed=True, num_replicas=2,
                                     rank=r, seed=1) for r in (0, 1)]
    assert all(isinstance(ld.sampler, torch.utils.data.DistributedSampler) for ld in loaders)
    parts = [list(ld.sampler) for ld in loaders]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(len(ds)))  # 16 samples, 8 per rank
    first = list(loaders[0].sampler)
    data_gen.set_epoch(loaders[0], 1)
    assert list(loaders[0].sampler) != first
    with pytest.raises(RuntimeError, match="process group"):
        data_gen.build_loader(ds, batch_size=2, distributed=True)


def test_distributed_ring_loader_takes_set_epoch(tmp_path):
    """With ring=True the loader is a RingBufferLoader: set_epoch (the call the docstring
    asks for every epoch) raised AttributeError (no .sampler), so each epoch could only
    repeat epoch 0's order. Each epoch's batches must be torch's DistributedSampler's."""
    rec, _, expected = lib.build_insightface_set(tmp_path, COUNTS)
    ds = data_gen.FaceRecordDataset(rec, train=False)
    loader = data_gen.build_loader(ds, batch_size=4, num_workers=1, distributed=True,
                                   num_replicas=2, rank=1, seed=3, ring=True)
    reference = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=1, seed=3,
                                                    drop_last=True)
    orders = []
    try:
        for epoch in (0, 1):
            data_gen.set_epoch(loader, epoch)
            reference.set_epoch(epoch)
            want = list(reference)
            got = np.concatenate([images.numpy().copy() for images, _ in loader])
            np.testing.assert_array_equal(got, np.stack([expected[i][2] for i in want]))
            orders.append(want)
    finally:
        loader.close()
    assert orders[0] != orders[1]


def test_image_folder_dataset(tmp_path):
    root = tmp_path / "faces"
    want = {}
    for name, seeds in (("b_second", (3, 4)), ("a_first", (1,)), ("c_third", (5, 6, 7))):
        (root / name).mkdir(parents=True)
        for seed in seeds:
            rgb = lib.textured_image(seed)
            path = root / name / f"{seed}.png"
            path.write_bytes(lib.png_bytes(rgb))
            want[str(path)] = (rgb, sorted(["a_first", "b_second", "c_third"]).index(name))
    (root / "b_second" / "9.jpg").write_bytes(b"broken")
    (root / "no_images").mkdir()  # ignored
    ds = data_gen.ImageFolderDataset(root, train=False)
    assert ds.num_classes == 3 and len(ds) == len(want) + 1
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 1, 1, 1, 2, 2, 2]
    for i in range(len(ds)):
        path = ds.describe(i)
        if path.endswith("9.jpg"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tensor, label = ds[i]
            assert label == 1 and ds.corrupt_count == 1 and caught
            continue
        rgb, label = want[path]
        image, got = ds.read(i)
        assert got == label
        np.testing.assert_array_equal(image, rgb)
        np.testing.assert_allclose(ds[i][0].numpy(), _normalised(rgb), atol=1e-6)


def test_image_folder_dataset_refuses_images_in_sub_folders(tmp_path):
    """The labels pre_process.py --pack would refuse to give are refused for training too:
    images in a sub-folder of an identity are not silently merged into it."""
    root = tmp_path / "faces"
    for rel in ("a/1.png", "b/2.png", "b/sub/3.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(lib.png_bytes(lib.textured_image(len(rel))))
    with pytest.raises(pre_process.DatasetError, match="1 image.s. at depth 3") as err:
        data_gen.build_dataset(image_folder=str(root))
    assert str(root / "b" / "sub" / "3.png") in str(err.value)


def test_raw_uint8_loader_and_normalize_batch(tmp_path):
    rec, _, expected = lib.build_insightface_set(tmp_path, COUNTS)
    ds = data_gen.FaceRecordDataset(rec, train=False)
    loader = data_gen.build_loader(ds, batch_size=5, shuffle=False, drop_last=True,
                                   raw_uint8=True)
    assert loader.dataset.num_classes == len(COUNTS)  # attributes pass through the view
    images, labels = next(iter(loader))
    assert images.dtype == torch.uint8 and tuple(images.shape) == (5, 112, 112, 3)
    assert labels.tolist() == [c for _, c, _ in expected[:5]]
    floats = models.normalize_batch(images)
    assert floats.dtype == torch.float32 and tuple(floats.shape) == (5, 3, 112, 112)
    for i in range(5):
        np.testing.assert_array_equal(images[i].numpy(), expected[i][2])
        np.testing.assert_allclose(floats[i].numpy(), _normalised(expected[i][2]), atol=1e-6)


@pytest.mark.slow  # a spawned worker process
def test_spawned_worker_reads_and_reports_corrupt(tmp_path):
    rec, _, expected = lib.build_insightface_set(tmp_path, (2, 2), corrupt_jpeg_at=2)
    ds = data_gen.FaceRecordDataset(rec, train=False)
    loader = data_gen.build_loader(ds, batch_size=4, num_workers=1, shuffle=False,
                                   mp_context="spawn")
    images, labels = next(iter(loader))
    assert labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(images[0].numpy(), _normalised(expected[0][2]), atol=1e-6)
    # sample 1 (key 2) is corrupt: its only classmate (sample 0) stands in for it
    np.testing.assert_allclose(images[1].numpy(), _normalised(expected[0][2]), atol=1e-6)
    assert ds.corrupt_count == 1


def test_cli_reports_set_and_batch(tmp_path, capsys):
    rec, _, _ = lib.build_insightface_set(tmp_path, COUNTS)
    assert data_gen.main(["--rec", str(rec), "--batch-size", "4", "--num-workers", "0",
                          "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{sum(COUNTS)} images, {len(COUNTS)} identities, labels 0..{len(COUNTS) - 1}" in out
    assert "images (4, 3, 112, 112) torch.float32" in out and "8 images in" in out
    assert run_cli(data_gen.main, ["--rec", str(tmp_path / "missing.rec")]) == 1


@pytest.mark.parametrize("how", lib.DAMAGES)
def test_record_dataset_refuses_lost_records_unless_allowed(tmp_path, caplog, how):
    rec, at, lost, surviving = lib.damaged_insightface_set(tmp_path, how, COUNTS)
    with pytest.raises(record_index.LostRecordsError) as err:
        data_gen.build_dataset(str(rec), train=False)
    assert str(rec) in str(err.value) and f"{lost} record(s) lost or damaged" in str(err.value)
    assert f"byte offset(s) {at}" in str(err.value)
    record_index.log.addHandler(caplog.handler)  # the module's logger does not propagate
    try:
        ds = data_gen.build_dataset(str(rec), train=False, allow_lost_records=True)
    finally:
        record_index.log.removeHandler(caplog.handler)
    assert f"{rec}: {lost} record(s) lost or damaged" in caplog.text  # the warning
    assert list(zip(ds.offsets.tolist(), ds.labels.tolist(), strict=True)) == surviving
    assert ds.num_classes == len(COUNTS) and ds.lost_records == lost
    # every surviving record reads back with its label
    for i, (_, cls) in enumerate(surviving):
        assert ds.read(i)[1] == cls


def test_train_build_dataset_passes_allow_lost_records(tmp_path):
    import train
    from config import make_config

    rec, _, lost, surviving = lib.damaged_insightface_set(tmp_path, "truncated", COUNTS)
    with pytest.raises(record_index.LostRecordsError, match=f"{lost} record"):
        train.build_dataset(make_config({"rec": str(rec)}))
    ds, source = train.build_dataset(make_config({"rec": str(rec), "allow_lost_records": True}))
    assert source == str(rec) and ds.offsets.tolist() == [o for o, _ in surviving]
