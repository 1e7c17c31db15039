"""Issue 17, classes 1 and 2: an output that is an input is refused before any work, naming
both paths; one writer per output (a second one is refused naming the holder's pid, and a
killed holder leaves no stale lock)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import recordio_testlib as lib

import utils
from utils import OutputBusyError, OutputConflictError, claim_output, lock_path_for, run_cli

ROOT = Path(__file__).resolve().parent.parent


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


class Holder:
    """Another process that claims ``output`` (as a writer script does) until killed."""

    def __init__(self, output: Path):
        code = ("import sys\nfrom utils import claim_output\n"
                f"with claim_output({str(output)!r}, '--out'):\n"
                "    print('held', flush=True)\n    sys.stdin.read()\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.kill()


def _small_tree(root: Path) -> Path:
    for n, name in enumerate(("amy", "bob")):
        (root / name).mkdir(parents=True)
        for j in range(2):
            (root / name / f"{j}.jpg").write_bytes(lib.jpeg_bytes(lib.textured_image(10 * n + j)))
    return root


# ----------------------------------------------------------------------------- class 1


def test_index_out_naming_the_set_itself_or_a_link_to_it_is_refused(tmp_path, capsys):
    import pre_process

    rec, _, _ = lib.build_insightface_set(tmp_path, (2, 3))
    before = rec.read_bytes()
    link = tmp_path / "link.index.npz"
    link.symlink_to(rec)
    for index_out in (rec, link):
        assert run_cli(pre_process.main, ["--rec", str(rec), "--index-out", str(index_out),
                                          "--no-progress"]) == 1
        line = one_error_line(capsys)
        assert f"--index-out {index_out}" in line and f"--rec {rec}" in line, line
        assert rec.read_bytes() == before


def test_pack_index_out_inside_the_source_tree_is_refused(tmp_path, capsys):
    import pre_process

    src = _small_tree(tmp_path / "aligned")
    photo = src / "amy" / "0.jpg"
    before = files_of(src)
    out = tmp_path / "set" / "train.rec"
    assert run_cli(pre_process.main, ["--pack", str(src), "--out", str(out), "--index-out",
                                      str(photo), "--no-progress"]) == 1
    line = one_error_line(capsys)
    assert f"--index-out {photo}" in line and f"--pack {src}" in line, line
    assert files_of(src) == before and not out.exists()


def test_align_report_over_a_file_that_is_not_a_report_is_refused(tmp_path, capsys):
    import align_faces

    src = _small_tree(tmp_path / "photos")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nnot a report\n")
    dst = tmp_path / "aligned"
    assert run_cli(align_faces.main, [str(src), str(dst), "--report", str(notes),
                                      "--no-progress"]) == 1
    line = one_error_line(capsys)
    assert f"--report {notes}" in line and "not an alignment report" in line, line
    assert notes.read_text() == "my notes\nnot a report\n" and not dst.exists()
    photo = src / "amy" / "0.jpg"
    assert run_cli(align_faces.main, [str(src), str(dst), "--report", str(photo)]) == 1
    assert f"lies inside the source {src}" in one_error_line(capsys)
    # a report that an earlier run wrote is one (it is resumed and rewritten)
    notes.write_text("no_face\tamy/0.jpg\tcentre-cropped\nunreadable\tbob/1.jpg\tbad\n")
    utils.check_output(notes, "--report", kind=align_faces.REPORT_KIND)
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    utils.check_output(empty, "--report", kind=align_faces.REPORT_KIND)


def test_two_alignments_sharing_one_report_are_refused(tmp_path):
    """Two runs into different DST_DIRs with one --report would each rewrite it with only
    their own files' entries: the second writer is refused, and writes nothing."""
    import align_faces

    src = _small_tree(tmp_path / "photos")
    report = tmp_path / "shared.tsv"
    dst = tmp_path / "aligned"
    with Holder(report) as holder:
        with pytest.raises(OutputBusyError, match=f"--report {report}: .*pid {holder.proc.pid}"):
            align_faces.align_tree(src, dst, report_path=report, progress=False)
    assert not dst.exists() and not report.exists()


def test_onnx_out_over_its_checkpoint_is_refused(tmp_path, capsys):
    import torch

    import export_onnx
    from models import build_model

    ckpt = tmp_path / "backbone.pt"
    torch.save(build_model("ir_narrow", 16).state_dict(), ckpt)
    before = ckpt.read_bytes()
    link = tmp_path / "model.onnx"
    link.symlink_to(ckpt)
    for out in (ckpt, link):
        assert run_cli(export_onnx.main, ["--checkpoint", str(ckpt), "--out", str(out),
                                          "--network", "ir_narrow"]) == 1
        line = one_error_line(capsys)
        assert f"--out {out}" in line and f"--checkpoint {ckpt}" in line, line
        assert ckpt.read_bytes() == before
    # another existing file that is not an ONNX model (a checkpoint of another run)
    other = tmp_path / "other.pt"
    other.write_bytes(before)
    assert run_cli(export_onnx.main, ["--checkpoint", str(ckpt), "--out", str(other),
                                      "--network", "ir_narrow"]) == 1
    assert "not an ONNX model" in one_error_line(capsys)
    assert other.read_bytes() == before


def test_demo_refuses_a_run_folder_holding_a_model_it_did_not_make(tmp_path, capsys):
    import demo
    from config import make_config

    runs, data = tmp_path / "runs", tmp_path / "data"
    runs.mkdir()
    make_config({"rec": str(tmp_path / "faces_emore" / "train.rec"), "output": str(runs),
                 "network": "ir50"}).save(runs / "config.json")
    (runs / "backbone.pt").write_bytes(b"PK\x03\x04 a trained model")
    (runs / "checkpoint.pt").write_bytes(b"PK\x03\x04 its checkpoint")
    before = files_of(runs)
    assert run_cli(demo.main, ["--data-dir", str(data), "--run-dir", str(runs),
                               "--train-identities", "2", "--eval-identities", "2"]) == 1
    line = one_error_line(capsys)
    assert f"--run-dir {runs}" in line and str(tmp_path / "faces_emore" / "train.rec") in line
    assert files_of(runs) == before and not data.exists()


def test_demo_refuses_a_data_folder_holding_a_real_lfw_tree(tmp_path, capsys):
    import demo

    data, runs = tmp_path / "data", tmp_path / "runs"
    lfw = data / "lfw"
    for name in ("Aaron_Eckhart", "Abel_Pacheco"):
        (lfw / name).mkdir(parents=True)
        (lfw / name / f"{name}_0001.jpg").write_bytes(lib.jpeg_bytes(lib.textured_image(1)))
    (lfw / "pairs.txt").write_text("1\t1\nAbel_Pacheco\t1\t1\n")
    before = files_of(data)
    assert run_cli(demo.main, ["--data-dir", str(data), "--run-dir", str(runs),
                               "--train-identities", "2", "--eval-identities", "2"]) == 1
    line = one_error_line(capsys)
    assert f"--data-dir {data}" in line and str(lfw / "Aaron_Eckhart") in line, line
    assert files_of(data) == before and not runs.exists()


def test_check_output_rule(tmp_path):
    """The rule itself, against the truth of the file system: same file through a link or
    a hard link, inside an input tree (through a linked folder too), kinds sniffed."""
    tree = _small_tree(tmp_path / "tree")
    photo = tree / "amy" / "0.jpg"
    hard = tmp_path / "hard.jpg"
    os.link(photo, hard)
    linked_tree = tmp_path / "linked"
    linked_tree.symlink_to(tree)
    inputs = {"--src": tree}
    for out in (photo, hard, linked_tree / "bob" / "new.txt", tree, tmp_path / "linked"):
        with pytest.raises(OutputConflictError, match="--src"):
            utils.check_output(out, "--out", {"--src": [photo], "--tree": tree} if out == hard
                               else inputs)
    # beside the tree, or a missing input: fine
    utils.check_output(tmp_path / "tree_aligned", "--out", inputs)
    utils.check_output(tmp_path / "x", "--out", {"--src": tmp_path / "missing", "--o": None})
    json_kind = utils.OutputKind("a JSON file", utils.starts_with(b"{"))
    (tmp_path / "a.json").write_text('{"a": 1}')
    utils.check_output(tmp_path / "a.json", "--out", kind=json_kind)
    with pytest.raises(OutputConflictError, match="exists and is not a JSON file"):
        utils.check_output(photo, "--out", kind=json_kind)


# ----------------------------------------------------------------------------- class 2


def test_a_second_writer_is_refused_with_the_pid_and_a_killed_one_leaves_no_lock(tmp_path):
    out = tmp_path / "runs" / "a"
    with Holder(out) as holder:
        for name in (out, tmp_path / "runs" / "." / "a"):
            with pytest.raises(OutputBusyError, match=f"pid {holder.proc.pid}\\b"), \
                    claim_output(name, "--output"):
                pass
        link = tmp_path / "link"  # another name of the same folder shares its lock
        link.symlink_to(tmp_path / "runs")
        with pytest.raises(OutputBusyError, match=str(holder.proc.pid)), \
                claim_output(link / "a", "--output"):
            pass
        holder.kill()  # a crash: the OS drops the lock, the file may stay
        with claim_output(out, "--output"):
            assert lock_path_for(out).read_text().strip() == str(os.getpid())
    assert not lock_path_for(out).exists()  # released: nothing left beside the output


def test_a_claim_holds_its_lock_while_nested_claims_of_the_process_pass(tmp_path):
    out = tmp_path / "out.rec"

    def free() -> bool:  # another open file description, as another process would have
        fd = os.open(lock_path_for(out), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    with claim_output(out, "--out"):
        with claim_output(out, "--out"):  # demo.py claims what train.train claims again
            assert not free()
        assert not free()
    assert free()


def test_two_trainings_into_one_output_and_a_resume_of_a_running_one_are_refused(tmp_path):
    import train
    from config import make_config

    rec, _, _ = lib.build_insightface_set(tmp_path, (4, 4))
    out = tmp_path / "run"
    cfg = make_config({"rec": str(rec), "output": str(out), "network": "ir_narrow",
                       "embedding_size": 16, "batch_size": 4, "device": "cpu",
                       "num_workers": 0, "max_steps": 1})
    with Holder(out) as holder:
        with pytest.raises(OutputBusyError, match=f"--output {out}: .*pid {holder.proc.pid}"):
            train.train(cfg)
        assert not out.exists()
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"a run still training")
    before = files_of(out)
    with Holder(out) as holder:
        with pytest.raises(OutputBusyError, match=f"pid {holder.proc.pid}"):
            train.train(cfg, resume=True)
    assert files_of(out) == before


def test_two_packs_into_one_out_are_refused(tmp_path):
    import pre_process

    src = _small_tree(tmp_path / "aligned")
    out = tmp_path / "set" / "train.rec"
    with Holder(out) as holder:
        with pytest.raises(OutputBusyError, match=f"pid {holder.proc.pid}"):
            pre_process.pack_folder(src, out, progress=False)
        assert not out.exists()
    summary = pre_process.pack_folder(src, out, progress=False)
    assert summary.images == 4 and json.dumps(sorted(p.name for p in out.parent.iterdir())) \
        == json.dumps(["property", "train.idx", "train.index.npz", "train.rec"])


def test_evaluation_outputs_that_are_inputs_are_refused(tmp_path, capsys):
    """lfw_eval, ijb_eval and megaface: an output folder that is an input file or lies in an
    input tree is refused before the model is loaded, naming both."""
    import ijb_eval
    import lfw_eval
    import megaface

    ckpt = tmp_path / "backbone.pt"
    ckpt.write_bytes(b"PK\x03\x04 weights")
    lfw = tmp_path / "lfw"
    (lfw / "Aaron_Eckhart").mkdir(parents=True)
    pairs = lfw / "pairs.txt"
    pairs.write_text("1\t1\n")
    bin_set = tmp_path / "agedb.bin"
    bin_set.write_bytes(b"\x80 a verification set")
    before = files_of(tmp_path)
    base = ["--checkpoint", str(ckpt), "--device", "cpu"]
    for argv, flag, named in (
            ([*base, "--lfw-dir", str(lfw), "--pairs", str(pairs), "--out", str(pairs)],
             f"--out {pairs}", f"--pairs {pairs}"),
            ([*base, "--lfw-dir", str(lfw), "--pairs", str(pairs), "--out",
              str(lfw / "eval")], f"--out {lfw / 'eval'}", f"--lfw-dir {lfw}"),
            ([*base, "--bin", str(bin_set), "--out", str(bin_set)], f"--out {bin_set}",
             f"--bin {bin_set}")):
        assert run_cli(lfw_eval.main, argv) == 1
        line = one_error_line(capsys)
        assert flag in line and named in line, line
    ijb = tmp_path / "IJBC"
    (ijb / "meta").mkdir(parents=True)
    for out, named in ((ckpt, f"--checkpoint {ckpt}"), (ijb / "results", f"--ijb-dir {ijb}")):
        assert run_cli(ijb_eval.main, ["--checkpoint", str(ckpt), "--ijb-dir", str(ijb),
                                       "--out", str(out), "--device", "cpu"]) == 1
        line = one_error_line(capsys)
        assert f"--out {out}" in line and named in line, line
    features = tmp_path / "features"
    (features / "megaface").mkdir(parents=True)
    noises = tmp_path / "noises.txt"
    noises.write_text("a.jpg\n")
    assert run_cli(megaface.main, ["--action", "remove_noises", "--features-dir",
                                   str(features), "--clean-features-dir", str(features / "clean"),
                                   "--megaface-noises", str(noises), "--facescrub-noises",
                                   str(noises)]) == 1
    line = one_error_line(capsys)
    assert f"--clean-features-dir {features / 'clean'}" in line \
        and f"--features-dir {features}" in line, line
    assert files_of(tmp_path) == {**before, "noises.txt": b"a.jpg\n"}
    assert not (features / "clean").exists()


def test_two_extractions_into_one_destination_are_refused(tmp_path, capsys):
    import zipfile

    import extract

    archive = tmp_path / "faces_emore.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("faces_emore/property", "2,112,112\n")
    dest = tmp_path / "data"
    with Holder(dest) as holder:
        assert run_cli(extract.main, [str(archive), "--dest", str(dest), "--no-progress"]) == 1
        line = one_error_line(capsys)
        assert f"--dest {dest}" in line and f"pid {holder.proc.pid}" in line, line
        assert not dest.exists()
    assert run_cli(extract.main, [str(archive), "--dest", str(dest), "--no-progress"]) == 0
    assert (dest / "faces_emore" / "property").read_text() == "2,112,112\n"


def test_two_alignments_of_one_lfw_tree_into_one_cache_are_refused(tmp_path):
    """The raw LFW crop cache was checked and renamed into place but not locked: two
    lfw_eval runs on one tree aligned the same images at once into one cache. Its writer
    holds its lock (a second is refused naming the pid); a whole cache is read without it."""
    from evaluation.lfw_images import load_lfw_crops
    from evaluation.lfw_pairs import Pair

    lfw, cache = tmp_path / "lfw", tmp_path / "cache"
    for n, name in enumerate(("a", "b")):
        (lfw / name).mkdir(parents=True)
        (lfw / name / f"{name}_0001.jpg").write_bytes(lib.jpeg_bytes(lib.textured_image(n)))
    pairs = [Pair("a/a_0001.jpg", "b/b_0001.jpg", False)]

    class Counting:
        calls = 0

        def align_batch(self, images, hint_box=None):
            self.calls += 1
            return [None] * len(images)  # faceless: centre crops

    load_lfw_crops(lfw, pairs, Counting(), cache)
    (made,) = cache.glob("aligned_*.npz")
    with Holder(made) as holder:
        reader = Counting()  # the cache is whole: read, the writer's lock notwithstanding
        load_lfw_crops(lfw, pairs, reader, cache)
        assert reader.calls == 0
        made.unlink()
        second = Counting()
        busy = f"--cache-dir {re.escape(str(made))}: .*pid {holder.proc.pid}\\b"
        with pytest.raises(OutputBusyError, match=busy):
            load_lfw_crops(lfw, pairs, second, cache)
        assert second.calls == 0 and not made.exists()
    third = Counting()  # the holder gone: aligned and cached
    load_lfw_crops(lfw, pairs, third, cache)
    assert third.calls == 1 and made.is_file()


def test_two_library_extractions_into_one_destination_are_refused(tmp_path):
    """extract_archive deletes the member temporaries a killed run left, relying on the
    CLI's --dest lock: a library call took none, so a second one deleted the first's live
    temporaries. It holds the destination's lock itself, as the CLI's own (re-entered)."""
    import zipfile

    import extract

    archive = tmp_path / "faces_emore.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("faces_emore/property", "2,112,112\n")
    dest = tmp_path / "data"
    live = dest / "faces_emore" / ".property.0123abcd.tmp"  # the other writer's, half written
    live.parent.mkdir(parents=True)
    live.write_bytes(b"2,11")
    with Holder(dest) as holder:
        with pytest.raises(OutputBusyError, match=f"pid {holder.proc.pid}\\b"):
            extract.extract_archive(archive, dest, progress=False)
        assert live.read_bytes() == b"2,11" and not (dest / "faces_emore" / "property").exists()
    extract.extract_archive(archive, dest, progress=False)  # the writer gone: a killed one's
    assert not live.exists()
    assert (dest / "faces_emore" / "property").read_text() == "2,112,112\n"


@pytest.mark.slow  # torchrun: two processes importing torch
def test_torchrun_ranks_all_refuse_an_output_another_training_holds(tmp_path):
    import socket

    rec, _, _ = lib.build_insightface_set(tmp_path, (4, 4))
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--rec", str(rec), "--output", str(out), "--network", "ir_narrow",
            "--embedding-size", "16", "--batch-size", "2", "--device", "cpu",
            "--num-workers", "0", "--max-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with Holder(out) as holder:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                               "--nproc_per_node=2", f"--master_port={port}", "train.py",
                               *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=240)  # a rank left waiting would hang, not fail
        assert proc.returncode != 0
        assert f"error: --output {out}: another process (pid {holder.proc.pid})" \
            in proc.stderr, proc.stderr[-2000:]
        assert f"error: --output {out}: refused on rank 0" in proc.stderr
        assert not out.exists()


def test_onnx_files_are_told_from_checkpoints(tmp_path):
    """An ONNX model as the onnx package serialises it is one; a PyTorch checkpoint is not."""
    import torch
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["x2"])], "g", [value],
                              [helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1])])
    model = tmp_path / "m.onnx"
    model.write_bytes(helper.make_model(graph).SerializeToString())
    import export_onnx

    assert export_onnx.ONNX_KIND.matches(model)
    ckpt = tmp_path / "c.pt"
    torch.save({"w": torch.zeros(2)}, ckpt)
    assert not export_onnx.ONNX_KIND.matches(ckpt)


@pytest.mark.slow  # two exports through torch.export: tens of seconds on 2 busy cores
def test_an_export_over_an_earlier_export_is_allowed(tmp_path):
    """What torch's exporter writes is recognised as ONNX (so re-exporting is not refused),
    also when the weights go to a file of their own."""
    import torch

    import export_onnx

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, stride=8), torch.nn.Flatten())
    for max_bytes in (export_onnx.SINGLE_FILE_MAX_BYTES, 0):
        out = tmp_path / f"m{max_bytes}.onnx"
        export_onnx.export_onnx(model, out, single_file_max_bytes=max_bytes)
        utils.check_output(out, "--out", kind=export_onnx.ONNX_KIND)
        assert export_onnx.external_data_path(out).exists() == (max_bytes == 0)


def test_feature_writers_refuse_a_folder_another_process_writes(tmp_path, capsys):
    """megaface gen_features and ijb_eval hold their feature and result folders."""
    import ijb_eval
    import megaface

    ckpt = tmp_path / "backbone.pt"
    ckpt.write_bytes(b"PK\x03\x04 weights")
    features, ijb_out = tmp_path / "features", tmp_path / "ijbc_results"
    (tmp_path / "IJBC").mkdir()
    for held, command, argv in (
            (features, megaface.main, ["--action", "gen_features", "--checkpoint", str(ckpt),
                                       "--aligned-dir", str(tmp_path / "aligned"),
                                       "--features-dir", str(features)]),
            (ijb_out, ijb_eval.main, ["--checkpoint", str(ckpt), "--ijb-dir",
                                      str(tmp_path / "IJBC"), "--out", str(ijb_out)])):
        with Holder(held) as holder:
            assert run_cli(command, argv) == 1
            line = one_error_line(capsys)
            assert f"{held}: another process (pid {holder.proc.pid})" in line, line
        assert not held.exists()


def test_an_output_whose_folder_cannot_be_written_is_refused_in_one_line(tmp_path,
                                                                         monkeypatch):
    """The lock is the first write: a read-only folder is found there, before any work (a
    read-only file system, simulated: these tests may run as root, whom modes do not stop)."""
    import errno

    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    out = tmp_path / "new" / "train.index.npz"
    with pytest.raises(utils.OutputUnwritableError) as err, \
            claim_output(out, "--index-out"):
        pass
    assert str(err.value) == (f"--index-out {out}: cannot write in {out.parent} "
                              f"({lock_path_for(out)}: Read-only file system)")
    assert not out.parent.exists()  # the folder made for the lock is gone again


def test_pack_refuses_to_replace_a_foreign_idx_or_property_beside_out(tmp_path, capsys):
    """--pack wrote the .idx and property beside --out without a check: a user's file named
    train.idx or property was replaced, and two packs into one folder both wrote property."""
    import pre_process

    src = _small_tree(tmp_path / "aligned")
    for name, flag in (("train.idx", "the .idx of --out"),
                       ("property", "the property file of --out")):
        out_dir = tmp_path / f"set_{name}"
        out_dir.mkdir()
        mine = out_dir / name
        mine.write_text("my notes, not a set file\n")
        assert run_cli(pre_process.main, ["--pack", str(src), "--out",
                                          str(out_dir / "train.rec"), "--no-progress"]) == 1
        line = one_error_line(capsys)
        assert f"{flag} {mine}: exists and is not" in line, line
        assert mine.read_text() == "my notes, not a set file\n"
        assert not (out_dir / "train.rec").exists()
    out = tmp_path / "set" / "a.rec"
    with Holder(out.parent / "property") as holder:  # another pack writing into set/
        with pytest.raises(OutputBusyError, match=f"pid {holder.proc.pid}"):
            pre_process.pack_folder(src, out, progress=False)
    pre_process.pack_folder(src, out, progress=False)
    assert (out.parent / "property").read_text() == "2,112,112\n"
    # a set packed again into its own folder replaces its own .idx and property
    again = pre_process.pack_folder(src, out, progress=False)
    assert again.images == 4


def test_two_long_outputs_sharing_a_start_get_their_own_locks(tmp_path):
    """A lock beside a 250-byte output name fits the filesystem's name limit, and two such
    names that differ only at the end are two locks (the cut start alone would be one)."""
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    first = tmp_path / ("r" * 246 + "a.json")
    second = tmp_path / ("r" * 246 + "b.json")
    with claim_output(first, "--out"), claim_output(second, "--out"):
        locks = [lock_path_for(first), lock_path_for(second)]
        assert all(lock.exists() and len(os.fsencode(lock.name)) <= name_max for lock in locks)
        assert locks[0] != locks[1]
    assert not any(lock.exists() for lock in locks)


def test_a_claim_whose_pid_write_fails_holds_no_lock_afterwards(tmp_path, monkeypatch):
    """The pid written into the lock failing (a full disk) left the flocked descriptor open:
    the process kept the lock, so its next claim of that output was refused as busy, naming
    itself."""
    import errno

    out = tmp_path / "out.rec"

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", full)
        with pytest.raises(utils.OutputUnwritableError, match="no space left"), \
                claim_output(out, "--out"):
            pass
    with claim_output(out, "--out"):  # free again, in this process and for any other
        other = os.open(lock_path_for(out), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
