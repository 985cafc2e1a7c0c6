"""``make gpu-check`` on a machine without a GPU: every code path at tiny sizes on the CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path, capsys):
    assert gpu_check.main(["--outdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_tiny_cpu_run_passes_every_section_and_writes_both_files(tmp_path):
    assert gpu_check.main(["--device", "cpu", "--tiny", "--outdir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu-check.json").read_text())
    md = (tmp_path / "gpu-check.md").read_text()
    assert res["schema"] == gpu_check.SCHEMA and res["passed"] and res["tiny"]
    secs = res["sections"]
    assert list(secs) == list(gpu_check.SECTIONS)
    assert {name: s["status"] for name, s in secs.items()} == dict.fromkeys(secs, "ok")
    assert res["checks_passed"] == res["checks_total"] > 0
    # Loss: every (B, D) case at the three precisions, the loss always computed in float32.
    acc = secs["loss_accuracy"]["rows"]
    assert len(acc) == 3 * len(gpu_check.TINY.accuracy_cases)
    assert {r["loss_dtype"] for r in acc} == {"float32"}
    assert all(r["value_rel_err"] < 1e-4 for r in acc)
    cells = {(r["B"], r["D"]) for r in secs["loss_speed"]["rows"]}
    assert cells == {(b, d) for b in gpu_check.TINY.speed_b for d in gpu_check.TINY.speed_d}
    # Training: both modes, the taps survive torch.compile without a graph break.
    (row,) = secs["train_step"]["rows"]
    assert row["graph_breaks"] == 0 and row["layers"] == ["blocks.1"] and row["group"] == 4
    for mode in ("eager", "compiled"):
        a = row[mode]
        assert a["images_per_s_baseline"] > 0 and a["images_per_s_dispersive"] > 0
        lo, mid, hi = (a["overhead"][k] for k in ("lo", "median", "hi"))
        assert lo <= mid <= hi
        assert a["overhead_verdict"] in ("met", "not met", "within noise")
    # The loop's device-side non-finite guard (forced onto the CPU) skips exactly as the
    # host-side one, stops after max_nonfinite bad steps, and reads nothing back per step: the
    # host-side guard's one read per plain step is the whole difference.
    loop = secs["train_loop"]
    assert loop["skipped_device"] == loop["skipped_host"] == [1, 2, 3]
    assert loop["ema_updates"] == [3, 3] and loop["max_rel_state_diff"] == 0.0
    assert loop["stopped_at_step"] == 3
    reads = loop["syncs_per_plain_step"]
    assert reads["baseline_host_guard"] - reads["baseline"] == 1
    assert reads["dispersive"] >= reads["baseline"]
    assert secs["sampling"]["nfe"] == 2 * secs["sampling"]["steps"] - 1  # Heun, final Euler
    ddp = secs["ddp"]
    assert ddp["backend"] == "gloo" and ddp["world_size"] == 1
    assert ddp["max_rel_grad_diff"] == 0.0  # CPU: the same kernels, the same order
    headings = [
        "# GPU check",
        "## Loss value and gradient",
        "## Training steps",
        "## The training loop's non-finite guard",
    ]
    headings += ["## Heun sampling", "## DDP through torchrun", "Tiny CPU smoke run"]
    assert all(h in md for h in headings)


def test_a_short_time_limit_skips_sections_and_records_why(tmp_path):
    assert gpu_check.main(["--device", "cpu", "--tiny", "--time-limit", "0.5",
                           "--outdir", str(tmp_path)]) == 0  # fmt: skip
    res = json.loads((tmp_path / "gpu-check.json").read_text())
    for s in res["sections"].values():
        assert s["status"] == "skipped" and "time limit" in s["reason"]
    assert "skipped" in (tmp_path / "gpu-check.md").read_text()


def test_a_broken_section_is_recorded_and_fails_the_run(tmp_path, monkeypatch):
    def broken(device, sizes, budget):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setitem(gpu_check.SECTIONS, "environment", broken)
    args = ["--device", "cpu", "--tiny", "--only", "environment", "--outdir", str(tmp_path)]
    assert gpu_check.main(args) == 1
    res = json.loads((tmp_path / "gpu-check.json").read_text())
    env = res["sections"]["environment"]
    assert env["status"] == "error" and "illegal memory access" in env["reason"]
    assert not res["passed"]
