"""Spawned gloo ranks for the tests: a free port, and a worker run on every rank whose
per-rank results come back through a manager dict."""

import socket
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(worker: Callable, world: int) -> list:
    """``worker(rank, port, results)`` on ``world`` spawned processes; each rank's
    ``results[rank]``, in rank order."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(worker, args=(free_port(), results), nprocs=world,
                           start_method="spawn")
        return [results[r] for r in range(world)]
