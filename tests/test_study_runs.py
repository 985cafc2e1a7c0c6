"""scripts/study-runs.sh: the study's finished runs are kept without checkpoints and restored."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "study-runs.sh"


def _tree(root: Path) -> Path:
    (root / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "scripts" / SCRIPT.name)
    live = root / "runs" / "experiments" / "fmnist-runs"
    for run, done in (("aaa-s0", True), ("bbb-s0", False)):
        d = live / run
        (d / "checkpoints").mkdir(parents=True)
        (d / "checkpoints" / "ckpt-0000500.pt").write_bytes(b"weights")
        (d / "tb").mkdir()
        (d / "tb" / "events").write_bytes(b"tb")
        (d / "samples").mkdir()
        (d / "samples" / "samples.npz").write_bytes(b"npz")
        (d / "samples" / "grid.png").write_bytes(b"png")
        (d / "metrics.jsonl").write_text('{"step": 500}\n')
        if done:
            (d / "done.json").write_text('{"steps": 500}')
    return live


def _run(root: Path, what: str) -> str:
    cmd = ["bash", str(root / "scripts" / SCRIPT.name), what]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def test_save_keeps_finished_runs_without_checkpoints_and_restore_brings_them_back(tmp_path):
    live = _tree(tmp_path)
    assert "saved 1 finished run(s)" in _run(tmp_path, "save")
    kept = tmp_path / "results" / "fmnist-runs"
    assert sorted(p.name for p in kept.iterdir()) == ["aaa-s0"]  # bbb is still training
    files = {p.relative_to(kept / "aaa-s0").as_posix() for p in kept.rglob("*") if p.is_file()}
    assert files == {"done.json", "metrics.jsonl", "samples/grid.png"}

    shutil.rmtree(live / "aaa-s0")
    (live / "bbb-s0" / "metrics.jsonl").write_text('{"step": 1000}\n')
    (kept / "bbb-s0").mkdir()
    (kept / "bbb-s0" / "metrics.jsonl").write_text('{"step": 0}\n')
    _run(tmp_path, "restore")
    assert (live / "aaa-s0" / "done.json").is_file()
    # A live run is never overwritten by a kept copy.
    assert (live / "bbb-s0" / "metrics.jsonl").read_text() == '{"step": 1000}\n'
