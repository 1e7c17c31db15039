"""The bench scripts run as bench/README.md says: each answers --help, and the evaluation
benchmarks finish on tiny synthetic inputs (their modules moved into evaluation/; a stale
import fails only when the script runs, not when the suite imports the helpers)."""

from __future__ import annotations

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
