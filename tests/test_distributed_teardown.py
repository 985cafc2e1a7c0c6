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

from _ranks import process_group_threads as _group_threads
from _ranks import run_ranks

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names from /proc"),
]


def _teardown_worker(rank: int, ports: list[int]) -> None:
    import torch
    import torch.distributed as dist

    from dispersive.train import distributed as d

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="2")

    def init(port: int):
        # A new port for each group: rank 1 could otherwise reach the previous group's store
        # while rank 0 is closing it.
        os.environ["MASTER_PORT"] = str(port)
        return d.init_distributed(device="cpu")

    def ddp_step():
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
        ddp(torch.randn(3, 4)).sum().backward()  # one gradient all-reduce
        return ddp

    # An all-reduce, then retired: destroyed and joined inside the call.
    info = init(ports[0])
    assert info.initialized_here and _group_threads()
    x = torch.ones(3)
    dist.all_reduce(x)
    del x  # a worker thread may still hold it
    d.cleanup_distributed(info)
    assert not dist.is_initialized() and _group_threads() == [] and d._RETIRED == []

    # A DDP wrapper that is gone by then (train(): its frame has returned): the same.
    info = init(ports[1])
    ddp_step()
    d.cleanup_distributed(info)
    assert _group_threads() == [] and d._RETIRED == []

    # A live DDP wrapper holds the group: kept, then joined by the exit handler once it is gone.
    info = init(ports[2])
    ddp = ddp_step()
    d.cleanup_distributed(info)
    assert len(d._RETIRED) == 1 and _group_threads()
    del ddp
    d._release_retired()
    assert _group_threads() == [] and d._RETIRED == []


def test_retiring_the_group_leaves_no_thread_of_it_running():
    sockets = [socket.socket() for _ in range(3)]
    for s in sockets:  # bound together, so the three ports differ
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    run_ranks(_teardown_worker, (ports,), 2, timeout=120)
