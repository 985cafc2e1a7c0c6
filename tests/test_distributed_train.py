"""DDP with 2 gloo CPU processes: equivalence with one process, and a failing rank never hangs.

The ranks are plain subprocesses with the variables torchrun would set (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the test exercises ``init_distributed`` as torchrun
runs it, without torchrun's agent (which would kill the surviving rank for us).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dispersive.train.checkpoint import load_checkpoint
from dispersive.train.config import load_config
from dispersive.train.logging import read_metrics
from dispersive.train.loop import train

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
SETS = [
    'model.name="SiT-XS/4"',
    "model.overrides={depth=2, hidden_size=32, num_heads=2}",
    'data.name="synthetic"',
    "data.synthetic_size=64",
    "train.global_batch=8",
    "train.log_every=1",
    "train.ckpt_every=100",
    'train.device="cpu"',
    "dispersive.weight=0.5",
    'dispersive.layers=["blocks.0"]',
    'dispersive.scope="global"',
    "optim.lr=1e-3",
]

WORKER = r"""
import os, sys
import torch
torch.set_num_threads(1)
from dispersive.train.config import load_config
from dispersive.train.loop import train

if os.environ.get("TEST_FAIL_RANK") == os.environ["RANK"]:
    # This rank raises while fetching its second batch; the other one must not hang.
    import dispersive.data.datasets as data
    real = data.build_dataset
    def build(*args, **kwargs):
        ds = real(*args, **kwargs)
        get, calls = ds.get_batch, [0]
        def get_batch(indices, generator=None):
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("injected failure")
            return get(indices, generator=generator)
        ds.get_batch = get_batch
        return ds
    data.build_dataset = build

resume = os.environ.get("TEST_RESUME") == "1"
train(load_config(sys.argv[1], sys.argv[3:]), run_dir=sys.argv[2], resume=resume, progress=False)

# train() joined gloo's threads: one still running at exit can abort the process (SIGABRT)
# after a finished run (train/distributed.py, retire_process_group).
if os.path.isdir("/proc/self/task"):
    from _ranks import process_group_threads

    left = process_group_threads()
    if left:
        sys.exit(f"threads of the process group still running after train(): {left}")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir: Path, sets: list[str], fail_rank: int | None = None, resume: bool = False):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ)
        env.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join(
                [str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")]
            ),
        )  # fmt: skip
        if fail_rank is not None:
            env["TEST_FAIL_RANK"] = str(fail_rank)
        env["TEST_RESUME"] = "1" if resume else "0"
        cmd = [sys.executable, "-c", WORKER, str(TINY), str(run_dir), *sets]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        )
    return procs


def _finish(procs, timeout: float) -> list[tuple[int, str]]:
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            out.append((p.returncode, err.decode()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def test_ddp_global_scope_matches_one_process(tmp_path):
    # Start both from the same step-2 checkpoint: at step 1 adaLN-Zero leaves most gradients
    # exactly zero and a few (shift-invariant directions of L_disp) at round-off level, which
    # Adam's first update turns into +-lr steps that depend on the summation order. From step 2
    # on every weight has a real gradient history, so the comparison can be tight. This also
    # resumes a DDP run from a one-process checkpoint.
    one_thread = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(
            load_config(TINY, [*SETS, "train.steps=2"]), run_dir=tmp_path / "base", progress=False
        )
        for name in ("ddp", "one"):
            shutil.copytree(tmp_path / "base", tmp_path / name)
        sets = [*SETS, "train.steps=4"]
        procs = _launch(tmp_path / "ddp", sets, resume=True)
        # Meanwhile, the same global batch of 8 in this process.
        train(load_config(TINY, sets), run_dir=tmp_path / "one", resume=True, progress=False)
    finally:
        torch.set_num_threads(one_thread)
    for rc, err in _finish(procs, timeout=180):
        assert rc == 0, err

    ddp, one = load_checkpoint(tmp_path / "ddp"), load_checkpoint(tmp_path / "one")
    assert ddp["step"] == one["step"] == 4
    # Same data, noise, t and label dropout by construction, and the global-scope dispersive
    # gradient is exact (differentiable all-gather); the gradients differ only by the order of
    # float additions (two half-batch sums averaged by the all-reduce vs one sum): float32
    # round-off, carried through two Adam steps. Exception: entries whose gradient is zero in
    # exact arithmetic (e.g. the key bias: softmax ignores a shift shared by a row of logits)
    # get round-off-sized gradients, which Adam normalises into steps of up to lr that depend on
    # the summation order. They are recognised by a gradient RMS (Adam's sqrt(exp_avg_sq))
    # far below the model's typical one, and only bounded by the two lr-sized steps.
    from dispersive.models import build

    names = [n for n, _ in build(**one["model_config"]).named_parameters()]
    rms = {n: one["optimizer"]["state"][i]["exp_avg_sq"].sqrt() for i, n in enumerate(names)}
    floor = 1e-4 * torch.cat([r.flatten() for r in rms.values()]).median()
    lr = 1e-3
    n_noise = 0
    for name in names:
        w, w_ddp, real = one["model"][name], ddp["model"][name], rms[name] > floor
        torch.testing.assert_close(w_ddp[real], w[real], rtol=1e-5, atol=1e-7, msg=name)
        assert bool(((w_ddp - w)[~real].abs() <= 2 * lr).all())
        n_noise += int((~real).sum())
    assert n_noise < 0.01 * sum(w.numel() for w in one["model"].values())
    for name, w in one["ema"]["shadow"].items():  # EMA decay 0.9999: noise entries are tiny
        torch.testing.assert_close(ddp["ema"]["shadow"][name], w, rtol=1e-5, atol=1e-6, msg=name)
    steps = [r["step"] for r in read_metrics(tmp_path / "ddp")]
    assert steps == [1, 2, 3, 4]
    for a, b in zip(read_metrics(tmp_path / "ddp")[2:], read_metrics(tmp_path / "one")[2:]):
        # Logged values are means over ranks: the global-batch values.
        for key in ("loss", "loss_diff", "loss_disp", "floor_gap", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert (tmp_path / "ddp" / "done.json").is_file()


def test_a_failing_rank_makes_every_rank_exit(tmp_path):
    sets = [*SETS, "train.steps=50", "train.dist_timeout_s=10"]
    start = time.monotonic()
    results = _finish(_launch(tmp_path / "fail", sets, fail_rank=1), timeout=120)
    elapsed = time.monotonic() - start
    (rc0, err0), (rc1, err1) = results
    assert rc1 != 0 and "[rank 1] training failed: RuntimeError: injected failure" in err1
    # The healthy rank fails its next collective (peer gone, at the latest the 10 s timeout).
    assert rc0 != 0 and "[rank 0] training failed" in err0, err0
    assert elapsed < 90
