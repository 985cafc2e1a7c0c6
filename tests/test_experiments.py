"""Experiment grids: expansion, checks, statistics against an independent computation, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from dispersive.errors import UserError
from dispersive.experiments.grid import load_grid, slug, toml_literal
from dispersive.experiments.results import arm_stats, collect, markdown_table, pivot_table
from dispersive.experiments.runner import check_grid, run_status

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
GRIDS = sorted((ROOT / "configs" / "experiments").glob("*.toml"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _grid_file(tmp_path: Path, body: str, *, header: str = "") -> Path:
    return _write(
        tmp_path / "grid.toml",
        f'[experiment]\nconfig = "{TINY}"\n{header}\n{body}',
    )


# ---- Expansion ------------------------------------------------------------------------------


def test_grid_expands_arms_axes_and_seeds(tmp_path):
    g = load_grid(
        _grid_file(
            tmp_path,
            '[set]\n"train.steps" = 4\n'
            '[[arm]]\nname = "baseline"\nset = { "dispersive.weight" = 0.0 }\n'
            '[axes]\n"dispersive.weight" = [0.25, 0.5]\n"dispersive.tau" = [0.5, 1.0]\n',
            header='seeds = [3, 7]\nname = "lt"\nbaseline = "baseline"',
        ),
        outdir=tmp_path / "out",
        overrides=["train.log_every=1"],
    )
    assert [a.name for a in g.arms] == [
        "baseline",
        "weight=0.25 tau=0.5",
        "weight=0.25 tau=1.0",
        "weight=0.5 tau=0.5",
        "weight=0.5 tau=1.0",
    ]
    assert len(g.runs) == 10 and {r.seed for r in g.runs} == {3, 7}
    assert len({r.run_dir for r in g.runs}) == 10
    assert g.exp_dir == tmp_path / "out" / "lt"
    run = next(r for r in g.runs if r.arm.name == "weight=0.5 tau=1.0" and r.seed == 7)
    # Order: [set], the arm's values, the seed, then the command line (last wins).
    assert run.overrides == (
        "train.steps=4",
        "dispersive.weight=0.5",
        "dispersive.tau=1.0",
        "train.seed=7",
        "train.log_every=1",
    )
    cfgs = check_grid(g)
    c = cfgs[run.name]
    assert (c.dispersive.weight, c.dispersive.tau, c.train.seed, c.train.steps) == (0.5, 1.0, 7, 4)
    assert cfgs[g.runs[0].name].dispersive.weight == 0.0


@pytest.mark.parametrize(
    "value", [0.5, 3, True, "blocks.1", ["blocks.0", "blocks.-1"], [0.9, 0.95], {"depth": 2}]
)
def test_toml_literal_round_trips(value):
    assert tomllib.loads(f"v = {toml_literal(value)}")["v"] == value


def test_slug_is_folder_safe():
    assert slug("InfoNCE l2 (cos)/x") == "infonce-l2-cos-x"
    assert slug("weight=0.25 tau=0.5") == "weight0.25-tau0.5"


@pytest.mark.parametrize(
    ("header", "body", "match"),
    [
        ("bogus = 1", '[[arm]]\nname = "a"', "unknown key 'bogus'"),
        ("", '[[arm]]\nname = "a"\n[bogus]\nx = 1', r"unknown table \[bogus\]"),
        ("", '[[arm]]\nname = "a"\n[[arm]]\nname = "a"', "share a name"),
        ('baseline = "base"', '[[arm]]\nname = "a"', "baseline = 'base'"),
        ('metric = "fid"', '[[arm]]\nname = "a"', r"needs a \[final_eval\]"),
        ('metric = "kid"', '[[arm]]\nname = "a"', "valid metrics"),
        ("", "", "defines no runs"),
        ("seeds = []", '[[arm]]\nname = "a"', "non-empty list"),
        ("", '[[arm]]\nname = "a"\nset = { weight = 1 }', "section.key"),
    ],
)
def test_bad_grids_are_one_line_errors(tmp_path, header, body, match):
    with pytest.raises(UserError, match=match):
        load_grid(_grid_file(tmp_path, body, header=header))


def test_run_configs_are_checked_before_anything_runs(tmp_path):
    bad_key = _grid_file(tmp_path, '[[arm]]\nname = "a"\nset = { "dispersive.wieght" = 1.0 }')
    with pytest.raises(UserError, match=r"run a-s0 .*did you mean 'dispersive.weight'"):
        check_grid(load_grid(bad_key))
    bad_layer = _grid_file(
        tmp_path, '[[arm]]\nname = "a"\nset = { "dispersive.layers" = ["blk.9"] }'
    )
    with pytest.raises(UserError, match="run a-s0 .*blk.9"):
        check_grid(load_grid(bad_layer))
    missing = _write(tmp_path / "g2.toml", '[experiment]\nconfig = "nope.toml"\n[[arm]]\nname="a"')
    with pytest.raises(UserError, match="nope.toml"):
        load_grid(missing)


@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_shipped_grids_resolve(path):
    grid = load_grid(path)
    cfgs = check_grid(grid)
    assert len(cfgs) == len(grid.runs) >= 2
    if grid.baseline:
        base = [cfgs[r.name] for r in grid.runs if r.arm.name == grid.baseline]
        assert all(c.dispersive.weight == 0 for c in base)


# ---- Statistics -----------------------------------------------------------------------------


def _fake_run(run_dir: Path, *, fid: float | None, steps: int, reached: int, done: bool) -> None:
    run_dir.mkdir(parents=True)
    recs = [
        {"step": reached, "loss_diff": 0.1, "floor_gap": 0.5, "rep_norm/blocks.0": 2.0},
    ]
    if fid is not None:
        recs.append(
            {
                "step": reached,
                "proxy_fid": fid,
                "proxy_acc": 0.5,
                "sampler_spec": {"method": "heun", "steps": 25, "nfe": 49},
            }
        )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run_dir / "config.toml").write_text("")
    if done:
        (run_dir / "done.json").write_text(json.dumps({"steps": reached}))


def test_arm_statistics_match_an_independent_computation(tmp_path):
    g = load_grid(
        _grid_file(
            tmp_path,
            '[[arm]]\nname = "baseline"\nset = { "dispersive.weight" = 0.0 }\n'
            '[[arm]]\nname = "disp"\nset = { "dispersive.weight" = 0.5 }\n'
            '[[arm]]\nname = "half"\nset = { "dispersive.weight" = 0.1 }\n',
            header="seeds = [0, 1, 2]",
        ),
        outdir=tmp_path / "out",
    )
    base = {0: 100.0, 1: 110.0, 2: 96.0}
    disp = {0: 90.0, 1: 111.0, 2: 85.0}
    for r in g.runs:
        if r.arm.name == "baseline":
            _fake_run(r.run_dir, fid=base[r.seed], steps=6, reached=6, done=True)
        elif r.arm.name == "disp":
            _fake_run(r.run_dir, fid=disp[r.seed], steps=6, reached=6, done=True)
        elif r.seed == 0:  # "half": one finished seed, one interrupted, one never started
            _fake_run(r.run_dir, fid=50.0, steps=6, reached=6, done=True)
        elif r.seed == 1:
            _fake_run(r.run_dir, fid=40.0, steps=6, reached=3, done=False)
    results = collect(g, {r.name: 6 for r in g.runs})
    stats = {s.arm.name: s for s in arm_stats(g, results)}

    b, d = np.array(list(base.values())), np.array(list(disp.values()))
    s = stats["disp"]
    assert s.mean == pytest.approx(d.mean()) and s.std == pytest.approx(d.std(ddof=1))
    assert s.rel_change == pytest.approx(100 * (d.mean() - b.mean()) / b.mean())
    assert s.paired_mean == pytest.approx((d - b).mean())
    assert s.paired_std == pytest.approx((d - b).std(ddof=1))
    assert (s.wins, s.shared) == (2, 3)
    assert stats["baseline"].rel_change is None and stats["baseline"].paired_mean is None
    half = stats["half"]
    assert half.values == {0: 50.0} and half.std is None
    assert (half.unfinished, half.not_started) == (2, 1)
    table = markdown_table(g, list(stats.values()), metric_label="proxy FID")
    assert "(baseline)" in table and f"{100 * (d.mean() - b.mean()) / b.mean():+.1f}%" in table
    assert "(+1 unfinished, +1 not run)" in table

    # The state of each run on disk.
    by = {r.name: r for r in g.runs}
    assert run_status(g, by["half-s1"], 6).state == "resume"
    assert run_status(g, by["half-s2"], 6).state == "new"
    assert run_status(g, by["half-s0"], 6).state == "post"  # trained, no sample grid yet
    assert run_status(g, by["half-s0"], 9).state == "extend"

    # A longer grid is extending a finished run (done.json is gone while it trains): for this
    # grid the run stays finished, with its value at this budget, and is not resumed.
    ext = by["disp-s0"].run_dir
    (ext / "done.json").unlink()
    (ext / "samples").mkdir()
    (ext / "samples" / "spec.json").write_text(json.dumps({"checkpoint_step": 6}))
    (ext / "checkpoints").mkdir()
    (ext / "checkpoints" / "ckpt-0000008.pt").write_bytes(b"")
    with (ext / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": 8, "loss_diff": 0.1, "proxy_fid": 1.0}) + "\n")
    assert run_status(g, by["disp-s0"], 6).state == "done"
    assert run_status(g, by["disp-s0"], 12).state == "resume"
    again = {r.run.name: r for r in collect(g, {r.name: 6 for r in g.runs})}
    assert again["disp-s0"].finished and again["disp-s0"].values["proxy_fid"] == 90.0


def test_two_axis_grids_get_a_pivot_table(tmp_path):
    g = load_grid(
        _grid_file(
            tmp_path,
            '[axes]\n"dispersive.weight" = [0.25, 0.5]\n"dispersive.tau" = [0.5, 1.0, 2.0]\n',
        ),
        outdir=tmp_path / "out",
    )
    for i, r in enumerate(g.runs):
        _fake_run(r.run_dir, fid=10.0 + i, steps=6, reached=6, done=True)
    stats = arm_stats(g, collect(g, {r.name: 6 for r in g.runs}))
    pivot = pivot_table(g, stats).splitlines()
    assert pivot[0] == "| weight \\ tau | 0.5 | 1.0 | 2.0 |"
    assert pivot[2].startswith("| 0.25 | 10.00") and pivot[3].startswith("| 0.5 | 13.00")


# ---- End to end -----------------------------------------------------------------------------


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DISPERSIVE_DEBUG"):
        env.pop(var, None)
    return env


TINY_28 = """
[set]
"model.input_size" = 28
"model.overrides" = { depth = 2, hidden_size = 32, num_heads = 2, patch_size = 7 }
"train.steps" = 2
"train.log_every" = 1
"eval.every" = 2
"eval.num_samples" = 8
"sample.sampler" = "euler"
"sample.steps" = 2

[[arm]]
name = "baseline"
set = { "dispersive.weight" = 0.0 }

[[arm]]
name = "dispersive"
set = { "dispersive.weight" = 0.5, "dispersive.layers" = ["blocks.0"] }
"""


@pytest.mark.slow
def test_experiment_cli_runs_resumes_extends_and_reports(tmp_path):
    grid = _grid_file(tmp_path, TINY_28, header='name = "e2e"\nseeds = [0, 1]')
    cmd = [
        sys.executable,
        "-m",
        "dispersive",
        "experiment",
        str(grid),
        "--outdir",
        str(tmp_path),
        "--jobs",
        "2",
        "--threads",
        "1",
    ]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    exp = tmp_path / "e2e"
    assert out.stdout.strip().splitlines()[-1] == f"report: {exp / 'report.md'}"
    report = (exp / "report.md").read_text()
    for name in ("baseline", "dispersive", "method=euler; steps=2"):
        assert name in report
    for f in ("results.csv", "runs.csv", "curves.png", "samples.png", "norms.png"):
        assert (exp / f).is_file(), f
    rows = (exp / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[2].startswith("dispersive,")
    for run in ("baseline-s0", "baseline-s1", "dispersive-s0", "dispersive-s1"):
        recs = [
            json.loads(x) for x in (exp / "runs" / run / "metrics.jsonl").read_text().splitlines()
        ]
        fids = [r for r in recs if "proxy_fid" in r]
        assert fids and fids[-1]["step"] == 2 and math.isfinite(fids[-1]["proxy_fid"])
        # The per-run table shows each run's own final value.
        assert f"| {fids[-1]['proxy_fid']:.2f} |" in report.split("## Runs")[1], run
    # Seeds differ, arms with the same seed start from the same weights and data.
    assert "loss_disp" in recs[-2] or any("loss_disp" in r for r in recs)

    # A second call finds everything done and runs nothing.
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "4 done" in again.stdout, again.stdout + again.stderr
    assert "start" not in again.stdout

    # A larger budget extends the finished runs from their last checkpoint.
    more = subprocess.run(
        [*cmd, "--set", "train.steps=3"], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert more.returncode == 0, more.stdout + more.stderr
    assert "4 extend" in more.stdout
    done = json.loads((exp / "runs" / "dispersive-s1" / "done.json").read_text())
    assert done["steps"] == 3
    log = (exp / "runs" / "dispersive-s1" / "log.txt").read_text()
    assert "--resume" in log and "from ckpt-0000002.pt (step 2)" in log


def test_shared_runs_are_named_by_what_they_train(tmp_path):
    def grid(name: str, arms: str, extra: str = ""):
        body = "[set]\n" + (extra or '"train.log_every" = 3\n') + arms
        f = _write(
            tmp_path / f"{name}.toml",
            f'[experiment]\nconfig = "{TINY}"\nshared_runs = "pool"\nseeds = [0, 1]\n{body}',
        )
        return load_grid(f, outdir=tmp_path)

    a = grid(
        "variants",
        '[[arm]]\nname = "baseline"\nset = { "dispersive.weight" = 0.0 }\n'
        '[[arm]]\nname = "l2"\nset = { "dispersive.weight" = 0.5, "dispersive.tau" = 0.5 }\n',
    )
    # Other arm names, another spelling of the same config, a longer budget and another
    # logging interval: the same runs.
    b = grid(
        "blocks",
        '[[arm]]\nname = "base"\nset = { "dispersive.weight" = 0.0 }\n'
        '[[arm]]\nname = "block 1"\nset = { "dispersive.layers" = ["blocks.1"], '
        '"dispersive.weight" = 0.5 }\n'
        '[[arm]]\nname = "block 0"\nset = { "dispersive.layers" = ["blocks.0"], '
        '"dispersive.weight" = 0.5 }\n',
        extra='"train.steps" = 60\n"train.log_every" = 1\n',
    )
    dirs_a = {(r.arm.name, r.seed): r.run_dir for r in a.runs}
    dirs_b = {(r.arm.name, r.seed): r.run_dir for r in b.runs}
    for s in (0, 1):
        assert dirs_a["baseline", s] == dirs_b["base", s]
        assert dirs_a["l2", s] == dirs_b["block 1", s]
        assert dirs_b["block 0", s] != dirs_b["block 1", s]
        assert (
            dirs_a["l2", s].name.endswith(f"-s{s}") and dirs_a["l2", s].parent == tmp_path / "pool"
        )
    assert dirs_a["l2", 0].name[:10] == dirs_a["l2", 1].name[:10]  # the seed is not in the hash
    with pytest.raises(UserError, match="train the same config"):
        grid(
            "dup",
            '[[arm]]\nname = "x"\nset = { "dispersive.weight" = 0.5 }\n'
            '[[arm]]\nname = "y"\nset = { "dispersive.weight" = 0.5, "dispersive.tau" = 0.5 }\n',
        )


def test_a_run_trained_further_by_another_grid_is_read_at_this_grids_budget(tmp_path):
    g = load_grid(
        _grid_file(tmp_path, '[[arm]]\nname = "a"\nset = { "dispersive.weight" = 0.0 }\n'),
        outdir=tmp_path / "out",
    )
    d = g.runs[0].run_dir
    d.mkdir(parents=True)
    recs = [
        {"step": 4, "loss_diff": 0.4},
        {"step": 4, "proxy_fid": 50.0},
        {"step": 8, "loss_diff": 0.2},
        {"step": 8, "proxy_fid": 30.0},
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "done.json").write_text(json.dumps({"steps": 8}))
    (r4,) = collect(g, {g.runs[0].name: 4})
    assert r4.finished and r4.values["proxy_fid"] == 50.0 and r4.final["loss_diff"] == 0.4
    assert r4.curve == [(4, 50.0)]
    (r8,) = collect(g, {g.runs[0].name: 8})
    assert r8.values["proxy_fid"] == 30.0 and r8.curve == [(4, 50.0), (8, 30.0)]
    (r6,) = collect(g, {g.runs[0].name: 6})  # no measurement at the budget: no value
    assert r6.finished and "proxy_fid" not in r6.values
    assert run_status(g, g.runs[0], 4).state == "post"  # trained enough; needs its sample grid


def test_grids_share_one_queue_and_extend_shared_runs_once(tmp_path):
    from dispersive.experiments.runner import build_queue
    from dispersive.train.checkpoint import checkpoint_path

    def grid(name: str, steps: int, arms: str):
        f = _write(
            tmp_path / f"{name}.toml",
            f'[experiment]\nconfig = "{TINY}"\nshared_runs = "pool"\n'
            f'[set]\n"train.steps" = {steps}\n{arms}',
        )
        return load_grid(f, outdir=tmp_path)

    base = '[[arm]]\nname = "baseline"\nset = { "dispersive.weight" = 0.0 }\n'
    other = '[[arm]]\nname = "l2"\nset = { "dispersive.weight" = 0.5 }\n'
    short, also, long_ = grid("a", 4, base + other), grid("b", 4, base), grid("c", 8, base)
    grids = [short, also, long_]
    cfgs = {g.path: check_grid(g) for g in grids}
    queue, pending = build_queue(grids, cfgs)
    # The baseline once at 4 steps, l2 at 4, then the baseline's extension to 8.
    assert [(g.name, r.arm.name, n) for g, r, n in queue] == [
        ("a", "baseline", 4), ("a", "l2", 4), ("c", "baseline", 8),
    ]  # fmt: skip
    assert pending[short.path] == [0, 1] and pending[also.path] == [0]
    assert pending[long_.path] == [0, 2]
    # A finished shared baseline is not queued again for a grid with the same budget.
    _fake_run(short.runs[0].run_dir, fid=10.0, steps=4, reached=4, done=True)
    (short.runs[0].run_dir / "samples").mkdir()
    (short.runs[0].run_dir / "samples" / "spec.json").write_text('{"checkpoint_step": 4}')
    # Without a checkpoint at its last step (a copy kept in results/), extending it would
    # retrain it from step 0 in place: refused, before anything runs.
    with pytest.raises(UserError, match="no checkpoint there.*own.*shared_runs"):
        build_queue(grids, cfgs)
    ckpt = checkpoint_path(short.runs[0].run_dir, 4)
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    queue, pending = build_queue(grids, cfgs)
    assert [(g.name, r.arm.name, n) for g, r, n in queue] == [("a", "l2", 4), ("c", "baseline", 8)]
    assert pending[also.path] == []


def test_arms_and_seeds_select_the_queued_runs(tmp_path):
    from dispersive.experiments.runner import build_queue, select_runs

    f = _write(
        tmp_path / "g.toml",
        f'[experiment]\nconfig = "{TINY}"\nseeds = [0, 1, 2]\n'
        '[[arm]]\nname = "baseline"\nset = { "dispersive.weight" = 0.0 }\n'
        '[axes]\n"dispersive.weight" = [0.25, 0.5]\n',
    )
    g = load_grid(f, outdir=tmp_path)
    cfgs = {g.path: check_grid(g)}

    def queued(**kw):
        queue, pending = build_queue([g], cfgs, keep=select_runs([g], **kw))
        assert pending[g.path] == list(range(len(queue)))  # the report waits for these only
        return [(r.arm.name, r.seed) for _, r, _ in queue]

    assert len(queued()) == 9  # no filter: 3 arms x 3 seeds
    assert queued(arms=["weight=0.25*"], seeds=[2]) == [("weight=0.25", 2)]
    assert queued(arms=["baseline", "*0.5"], seeds=[0]) == [("baseline", 0), ("weight=0.5", 0)]
    assert queued(seeds=[1]) == [("baseline", 1), ("weight=0.25", 1), ("weight=0.5", 1)]
    with pytest.raises(UserError, match="matches no arm.*'weight=0.25'"):
        select_runs([g], arms=["weight=0.3*"])
    with pytest.raises(UserError, match=r"--seeds 3 .* \[0, 1, 2\]"):
        select_runs([g], seeds=[3])


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_stopping_an_experiment_stops_its_runs_and_they_resume(tmp_path, sig):
    import signal
    import time

    from dispersive.train.checkpoint import list_checkpoints

    grid = _grid_file(
        tmp_path,
        '[set]\n"train.steps" = 100000\n"train.ckpt_every" = 2\n"train.log_every" = 1\n'
        '[[arm]]\nname = "a"\nset = { "dispersive.weight" = 0.0 }\n',
        header='name = "stop"',
    )
    cmd = [sys.executable, "-m", "dispersive", "experiment", str(grid), "--outdir", str(tmp_path)]
    # As a shell starts a background job: SIGINT ignored, which the CLI must undo.
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    run_dir = tmp_path / "stop" / "runs" / "a-s0"
    deadline = time.monotonic() + 120
    while len(list_checkpoints(run_dir)) < 1:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted" in out
    # No training process is left behind (it runs in a session of its own).
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(run_dir.parent) not in ps
    again = subprocess.run([*cmd, "--dry-run"], env=_env(), capture_output=True, text=True)
    assert "a (seed 0): resume" in again.stdout
