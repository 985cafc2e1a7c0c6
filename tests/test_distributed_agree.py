"""check_same_on_all_ranks on 2 gloo ranks: what each rank read from its own filesystem (the
step a multi-node run resumes from) must agree, and every rank raises the same one-line error
when it does not."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest

from _ranks import run_ranks

pytestmark = pytest.mark.distributed


def _agree_worker(rank: int, port: int) -> None:
    import torch.distributed as dist

    from dispersive.errors import UserError
    from dispersive.train.distributed import check_same_on_all_ranks, retire_process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        check_same_on_all_ranks(7, "the step", "share RUN_DIR")  # equal: no error
        with pytest.raises(UserError) as err:
            check_same_on_all_ranks(0 if rank else 7, "the step resumed from", "share RUN_DIR")
        msg = str(err.value)
        assert (
            msg
            == "the step resumed from differs between ranks (rank 0: 7, rank 1: 0); share RUN_DIR"
        )
    finally:
        retire_process_group()  # as the training loop ends its group


def test_ranks_that_read_different_run_dirs_all_fail():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_ranks(_agree_worker, (port,), 2, timeout=120)


def test_one_process_is_a_no_op():
    from dispersive.train.distributed import check_same_on_all_ranks

    check_same_on_all_ranks(object(), "anything", "nothing")
