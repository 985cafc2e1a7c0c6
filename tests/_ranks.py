"""Run a test function on several local ranks without ever hanging the suite.

The ranks are spawned, not forked: a fork copies the parent's threads' locks (OpenMP, gloo,
earlier tests' workers) in whatever state they are, and a child can then wait forever. A rank
that does not finish within ``timeout`` seconds fails the test, and every rank still alive is
killed, so neither pytest-timeout nor multiprocessing's exit handler waits on it.

Each rank imports torch._dynamo before ``fn`` creates its process group, as
``init_distributed`` does: imported later, it keeps the group alive until exit, with gloo's
threads, which can then abort the rank as it exits (retire_process_group's docstring).
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable

import torch.multiprocessing as mp


def run_ranks(fn: Callable, args: tuple, nprocs: int, *, timeout: float = 240.0) -> None:
    """Call ``fn(rank, *args)`` on ``nprocs`` spawned processes and wait for all of them."""
    ctx = mp.start_processes(
        _rank_main, args=(fn, args), nprocs=nprocs, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{nprocs} ranks of {fn.__name__} did not finish in {timeout}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()


def _rank_main(rank: int, fn: Callable, args: tuple) -> None:
    importlib.import_module("torch._dynamo")
    fn(rank, *args)


def process_group_threads() -> list[str]:
    """Names of this process's threads that belong to a process group (gloo, its TCP store)."""
    tasks = os.listdir("/proc/self/task")
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks]
    return [n for n in names if "gloo" in n or "tcpstore" in n]
