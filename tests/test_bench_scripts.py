"""The bench scripts run as bench/README.md says: each answers --help, and the evaluation
benchmarks finish on tiny synthetic inputs (their modules moved into evaluation/; a stale
import fails only when the script runs, not when the suite imports the helpers)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))
RUN_SECONDS = 300  # generous: the tiny runs below take under 10 s on 2 shared cores


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=RUN_SECONDS, check=False)


def test_readme_names_every_bench_script():
    readme = (BENCH / "README.md").read_text(encoding="utf-8")
    assert [s for s in SCRIPTS if f"`{s}`" not in readme] == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_answers_help(script):
    proc = _run(f"bench/{script}", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_lfw_scoring_speed_runs():
    proc = _run("bench/lfw_scoring_speed.py", "--pairs", "600", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr
    assert "exact 10-fold accuracy" in proc.stdout


@pytest.mark.slow
def test_megaface_scoring_speed_runs():
    proc = _run("bench/megaface_scoring_speed.py", "--distractors", "5000", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "ratio evaluator / mm" in proc.stdout


@pytest.mark.slow
def test_ijb_protocol_speed_runs():
    proc = _run("bench/ijb_protocol_speed.py", "--scale", "0.002", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert "1:1 scoring" in proc.stdout and "IJBC" in proc.stdout


class _Parsed(Exception):
    """Raised once a bench script's flags parse: the test stops it before any work."""


# (script, bad flags, the flag the one error line names): a count or size of 0 or below, a
# device this toolkit does not run on, a head that does not exist, too few pairs for 10 folds
BAD_FLAGS = [
    ("align_throughput.py", ["--sizes", "-1"], "--sizes"),
    ("align_throughput.py", ["--device", "mps"], "--device"),
    ("data_throughput.py", ["--batch-size", "0"], "--batch-size"),
    ("data_throughput.py", ["--workers", "1", "-2"], "--workers"),
    ("head_accuracy.py", ["--heads", "arcfase"], "--heads"),
    ("head_step_time.py", ["--batch", "0"], "--batch"),
    ("head_step_time.py", ["--device", "gpu0"], "--device"),
    ("identify_speed.py", ["--sizes", "0"], "--sizes"),
    ("identify_speed.py", ["--centre-cos", "0.5", "1.5"], "--centre-cos"),
    ("ijb_protocol_speed.py", ["--scale", "-0.1"], "--scale"),
    ("ijb_protocol_speed.py", ["--workers", "0"], "--workers"),
    ("landmark_accuracy.py", ["data", "--min-eye-distance", "nan"], "--min-eye-distance"),
    ("lfw_scoring_speed.py", ["--pairs", "5"], "--pairs"),
    ("lfw_scoring_speed.py", ["--repeats", "0"], "--repeats"),
    ("megaface_scoring_speed.py", ["--chunk-size", "-5"], "--chunk-size"),
    ("megaface_scoring_speed.py", ["--distractors", "0"], "--distractors"),
    ("train_smoke.py", ["--steps", "0"], "--steps"),
    ("train_smoke.py", ["--identities", "1"], "--identities"),
    ("train_throughput.py", ["--batch-size", "0"], "--batch-size"),
    ("train_throughput.py", ["--num-classes", "1"], "--num-classes"),
]
# each script's flags of the same kinds at values that are fine
GOOD_FLAGS = {
    "align_throughput.py": ["--sizes", "0", "640", "--device", "cpu"],
    "data_throughput.py": ["--batch-size", "1", "--workers", "0", "2"],
    "head_accuracy.py": ["--heads", "arcface"],
    "head_step_time.py": ["--batch", "1", "--device", "cpu"],
    "identify_speed.py": ["--sizes", "10", "--centre-cos", "0.5", "0.8"],
    "ijb_protocol_speed.py": ["--scale", "0.5", "--workers", "1"],
    "landmark_accuracy.py": ["data", "--min-eye-distance", "20"],
    "lfw_scoring_speed.py": ["--pairs", "20", "--repeats", "1"],
    "megaface_scoring_speed.py": ["--chunk-size", "5", "--distractors", "1"],
    "train_smoke.py": ["--steps", "1", "--identities", "2"],
    "train_throughput.py": ["--batch-size", "1", "--num-classes", "2"],
}


def _parse_only(script: str, flags: list[str], monkeypatch) -> None:
    """Run ``bench/script`` with ``flags`` in this process up to its parse_args: _Parsed when
    they parse, argparse's SystemExit when refused; nothing after parsing runs."""
    import argparse
    import importlib.util

    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *args, **kwargs):
        parse(self, *args, **kwargs)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [f"bench/{script}", *flags])
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    module.main()


@pytest.mark.parametrize("script, flags, named", BAD_FLAGS)
def test_bench_flags_are_checked_where_parsed(script, flags, named, monkeypatch, capsys):
    """bench scripts took `--batch-size 0`, negative counts and `--device mps` and failed
    later with a traceback, or ran with them."""
    with pytest.raises(SystemExit) as stop:
        _parse_only(script, flags, monkeypatch)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert stop.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"argument {named}" in errors[0], errors[0]


@pytest.mark.parametrize("script", sorted(GOOD_FLAGS))
def test_bench_flags_at_good_values_parse(script, monkeypatch):
    assert {s for s, _, _ in BAD_FLAGS} == set(GOOD_FLAGS)
    with pytest.raises(_Parsed):
        _parse_only(script, GOOD_FLAGS[script], monkeypatch)


@pytest.mark.slow
def test_identify_speed_runs():
    # 300 images of 60 identities: the exact Gallery and IndexFlatIP must name the
    # brute-force top identity of every query; IVF (7 lists) finds every enrolled one
    proc = _run("bench/identify_speed.py", "--sizes", "300", "--queries", "10", "--ivf-size",
                "300", "--hnsw-size", "300", "--rounds", "1", "--enrol-photos", "0")
    assert proc.returncode == 0, proc.stderr
    assert "10/10 (faiss 10)" in proc.stdout  # Gallery and IndexFlatIP top-1 = brute force
    assert re.search(r"ivf 300 images, nprobe \d+: recall@1 enrolled 1\.0000", proc.stdout)
    assert "hnsw 300 images" in proc.stdout and "Gallery/mm" in proc.stdout
