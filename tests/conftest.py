"""Shared test setup: the repo root on sys.path, and small torch thread counts (2 cores)."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test: a second one only spins on this shared 2-core
    machine (the training tests ran slower with it). Use it as
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch  # on first use: most test files never load torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: the folder cannot be written, for this test: its mode 0o555
    and access(2)'s answer for it, which the mode does not change for root (the answer a
    read-only mount gives everyone). The mode is restored afterwards."""
    made = []
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).absolute() in made:
            return False
        return real_access(path, mode, *args, **kwargs)

    def make(folder: Path) -> None:
        folder.chmod(0o555)
        made.append(Path(folder).absolute())

    monkeypatch.setattr(os, "access", access)
    yield make
    for folder in made:
        folder.chmod(0o755)
