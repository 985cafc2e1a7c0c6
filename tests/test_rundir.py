"""The run directory: one atomic write, one writer (a live second trainer refuses, a dead one's
lock does not block)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dispersive.atomic import atomic_write, remove_temporaries, temporary_name
from dispersive.cli import main
from dispersive.errors import UserError
from dispersive.train.config import dump_toml, load_config
from dispersive.train.rundir import CONFIG_FILE, LOCK_FILE, RunLock, read_json, write_json

ROOT = Path(__file__).resolve().parents[1]

# Another trainer, as the kernel sees it: a process holding the flock of RUN_DIR/train.lock with
# its identity in the file (written as RunLock does). Plain stdlib, so it starts in milliseconds.
HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(os.path.join(sys.argv[1], "train.lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
os.write(fd, json.dumps(me).encode())
print("locked", flush=True)
sys.stdin.read()
"""


def test_atomic_write_bytes_text_and_writer(tmp_path):
    p = tmp_path / "sub" / "f.bin"
    assert atomic_write(p, b"\x00\x01") == p and p.read_bytes() == b"\x00\x01"
    atomic_write(p, "text é")
    assert p.read_text(encoding="utf-8") == "text é"
    atomic_write(p, lambda f: f.write(b"by a writer"))
    assert p.read_bytes() == b"by a writer"
    write_json(tmp_path / "x.json", {"a": [1, 2]})
    assert read_json(tmp_path / "x.json") == {"a": [1, 2]}
    assert read_json(tmp_path / "missing.json") is None
    assert sorted(q.name for q in p.parent.iterdir()) == ["f.bin"]  # no temporaries left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write(p, "old")

    def torn(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, torn)
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["f.txt"]


def test_remove_temporaries_only_removes_killed_writes(tmp_path):
    killed = temporary_name(tmp_path / "ckpt.pt")  # what a SIGKILL mid-write leaves
    killed.write_bytes(b"torn")
    (tmp_path / "keep.tmp").write_text("not hidden: not ours")
    (tmp_path / ".hidden").write_text("not a temporary")
    assert remove_temporaries(tmp_path) == [killed]
    assert sorted(q.name for q in tmp_path.iterdir()) == [".hidden", "keep.tmp"]


def _holder(run_dir: Path) -> subprocess.Popen:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_refuses_naming_the_live_one_and_a_dead_ones_lock_does_not_block(
    tmp_path, capsys
):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(ROOT / "configs" / "tiny.toml")
    (run_dir / CONFIG_FILE).write_text(dump_toml(cfg))
    proc = _holder(run_dir)
    try:
        # A second trainer (the real CLI, --resume) refuses in one line naming the holder.
        assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: run directory")
        assert f"pid {proc.pid} on host {socket.gethostname()}" in err
        with pytest.raises(UserError, match=f"pid {proc.pid}"):
            RunLock(run_dir).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)  # dies holding the lock, as a crashed run would
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    # The file still names the dead process, but the kernel released its flock.
    assert read_json(run_dir / LOCK_FILE)["pid"] == proc.pid
    with RunLock(run_dir) as lock:
        assert read_json(lock.path)["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            RunLock(run_dir).acquire()  # a second open file: the flock is per open file
    with RunLock(run_dir):  # released on exit: the same process can take it again
        pass
    assert json.loads((run_dir / LOCK_FILE).read_text())["host"] == socket.gethostname()
