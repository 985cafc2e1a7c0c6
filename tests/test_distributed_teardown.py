"""The process group's threads are joined while Python is alive (retire_process_group).

A gloo worker thread still running when the interpreter finalizes can abort the process after
a finished run (train/distributed.py); through the thread names Linux shows in /proc, the test
checks that none is left once the group is retired: at once when no DDP wrapper holds it (as at
the end of train()), at exit (the atexit handler) when one still does.
"""

from __future__ import annotations

import os
import socket

import pytest

from _ranks import run_ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names from /proc"),
]


def _group_threads() -> list[str]:
    tasks = os.listdir("/proc/self/task")
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks]
    return [n for n in names if "gloo" in n or "tcpstore" in n]


def _teardown_worker(rank: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    from dispersive.train import distributed as d

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )

    def ddp_step():
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
        ddp(torch.randn(3, 4)).sum().backward()  # one gradient all-reduce
        return ddp

    # An all-reduce, then retired: destroyed and joined inside the call.
    info = d.init_distributed(device="cpu")
    assert info.initialized_here and _group_threads()
    x = torch.ones(3)
    dist.all_reduce(x)
    del x  # a worker thread may still hold it
    d.cleanup_distributed(info)
    assert not dist.is_initialized() and _group_threads() == [] and d._RETIRED == []

    # A DDP wrapper that is gone by then (train(): its frame has returned): the same.
    info = d.init_distributed(device="cpu")
    ddp_step()
    d.cleanup_distributed(info)
    assert _group_threads() == [] and d._RETIRED == []

    # A live DDP wrapper holds the group: kept, then joined by the exit handler once it is gone.
    info = d.init_distributed(device="cpu")
    ddp = ddp_step()
    d.cleanup_distributed(info)
    assert len(d._RETIRED) == 1 and _group_threads()
    del ddp
    d._release_retired()
    assert _group_threads() == [] and d._RETIRED == []


def test_retiring_the_group_leaves_no_thread_of_it_running():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_ranks(_teardown_worker, (port,), 2, timeout=120)
