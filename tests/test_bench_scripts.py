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
