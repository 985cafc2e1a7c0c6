"""Distributed training helpers: torchrun + DDP on many devices, the same code as one process.

``init_distributed`` reads the variables torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Without them it returns a single-process
:class:`DistInfo` and creates no process group, so nothing else needs torchrun.

Failure handling: every collective carries ``timeout`` (``train.dist_timeout_s``). A rank that
raises prints its error and exits non-zero; under torchrun the agent then terminates the other
ranks at once. Without an agent (e.g. processes started by hand) the surviving ranks fail their
next collective: immediately when the peer's connection closes (gloo), at the latest after the
timeout, so no rank hangs forever. NCCL reports timeouts through its asynchronous error handling
(``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default in recent PyTorch).
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dispersive.errors import UserError

__all__ = [
    "DistInfo",
    "env_world_size",
    "resolve_device",
    "init_distributed",
    "cleanup_distributed",
    "all_reduce_mean",
    "barrier",
    "group_rank_world",
    "check_same_on_all_ranks",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False  # this call created the process group (and must destroy it)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, checkpoints and the run directory."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} must be an integer") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 without torchrun), readable before any init."""
    return max(1, _env_int("WORLD_SIZE", 1))


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:LOCAL_RANK`` if CUDA is available, else CPU; checks ``"cuda"``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                "train.device = 'cuda' but no CUDA device is available; use train.device = "
                "'auto' or 'cpu'"
            )
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if device == "cpu":
        return torch.device("cpu")
    raise UserError(f"train.device = {device!r} is not valid; valid choices: auto, cpu, cuda")


def init_distributed(*, device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the torchrun job if there is one (NCCL on GPU, gloo on CPU), else a single process.

    Args:
        device: ``"auto" | "cpu" | "cuda"`` (``train.device``).
        timeout_s: timeout of every collective, so that a dead rank cannot hang the others.

    Returns:
        A :class:`DistInfo`; ``initialized_here`` tells whether to call
        :func:`cleanup_distributed` at the end.
    """
    world_size = env_world_size()
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    dev = resolve_device(device, local_rank)
    if world_size == 1:
        return DistInfo(device=dev)
    if dist.is_initialized():  # the caller set the group up (e.g. a test harness)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, False)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UserError(
                f"WORLD_SIZE={world_size} but {var} is not set; start distributed runs with "
                "torchrun --nproc_per_node=N -m dispersive train ..."
            )
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    # Imported before the group exists: importing torch._dynamo (DDP does) keeps references to
    # the default group that exists at that moment, forever, and a group that cannot be freed
    # cannot be joined before exit (retire_process_group).
    importlib.import_module("torch._dynamo")

    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=float(timeout_s)),
        **({"device_id": dev} if backend == "nccl" else {}),
    )
    return DistInfo(rank, world_size, local_rank, dev, True)


# Destroyed process groups that something else (a live DDP wrapper) still holds; released at exit.
_RETIRED: list = []


@atexit.register
def _release_retired() -> None:
    """Free the DDP wrappers left in reference cycles, then the groups they held (see below)."""
    if _RETIRED:
        gc.collect()
        _RETIRED.clear()


def cleanup_distributed(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it (call in a finally)."""
    if info.initialized_here and dist.is_initialized():
        retire_process_group()


def retire_process_group() -> None:
    """Destroy the default process group and join its worker threads while Python is alive.

    Why: gloo's worker threads drop a collective's tensors after the caller has seen it
    complete. Freeing a tensor that Python has let go of takes the GIL, and a thread that asks
    for it once the interpreter is finalizing is ended inside a destructor, which aborts the
    process ("terminate called without an active exception", SIGABRT) after a run that
    finished (seen in 2 of about 6 fresh-clone test runs). In a one-off reproduction outside
    the suite (2026-12-07, quiet 2-core machine; no committed command reruns it), a rank that
    exits right after an asynchronous all-reduce aborted in 14 of 20 runs when the group
    outlived the interpreter and in 0 of 20 when it was destroyed first; the suite checks the
    cure instead (no thread of the group is left, tests/test_distributed_teardown.py).

    The group's Python binding releases the GIL while its destructor joins the threads, so
    dropping the last reference here is safe, if it is the last: DDP's C++ reducer holds the
    group too, and destroying it from there (at a garbage collection, GIL held) can deadlock on
    the same threads. DDP wrappers sit in reference cycles, hence the collection; a wrapper that
    is still reachable (a caller's frame, an exception's traceback) keeps the group in
    ``_RETIRED`` until exit, whose handler collects again before dropping it. (A group that
    existed when torch._dynamo was first imported is never freed; init_distributed imports it
    first.)
    """
    if not dist.is_initialized():
        return
    group = dist.group.WORLD
    dist.destroy_process_group()
    gc.collect()
    ddp = torch.nn.parallel.DistributedDataParallel
    if any(isinstance(o, ddp) for o in gc.get_objects()):
        _RETIRED.append(group)
    del group  # the last reference when no DDP wrapper is left: destroyed and joined here


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a no-op in a single process); returns a new tensor."""
    x = x.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def group_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group; ``(0, 1)`` without one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_same_on_all_ranks(value: Any, what: str, fix: str) -> None:
    """Raise the same UserError on every rank if ``value`` differs between ranks.

    For facts every rank reads from its own filesystem (e.g. the step a run resumes from): on
    several nodes without a shared RUN_DIR they silently differ. A no-op in a single process.

    Args:
        value: a small picklable value (all-gathered).
        what: what the value is, for the message ("the step resumed from").
        fix: how to make the ranks agree.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        seen = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise UserError(f"{what} differs between ranks ({seen}); {fix}")


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
