"""scripts/study-runs.sh: the study's finished runs are kept without checkpoints and restored."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

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


def _run(root: Path, *what: str, check: bool = True) -> str:
    cmd = ["bash", str(root / "scripts" / SCRIPT.name), *what]
    out = subprocess.run(cmd, check=check, capture_output=True, text=True)
    return out.stdout + out.stderr


def test_save_keeps_finished_runs_without_checkpoints_and_restore_brings_them_back(tmp_path):
    live = _tree(tmp_path)
    assert "fmnist-runs: 1 new, 0 with new files, 0 unchanged, 0 refused" in _run(tmp_path, "save")
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


def test_save_never_overwrites_a_kept_run(tmp_path):
    live = _tree(tmp_path)
    _run(tmp_path, "save")
    kept = tmp_path / "results" / "fmnist-runs" / "aaa-s0"
    before = {p: p.read_bytes() for p in kept.rglob("*") if p.is_file()}
    # Saving again changes nothing; a new file (a final evaluation) is added beside the rest.
    assert "0 new, 0 with new files, 1 unchanged, 0 refused" in _run(tmp_path, "save")
    (live / "aaa-s0" / "final_eval").mkdir()
    (live / "aaa-s0" / "final_eval" / "5k-step500.json").write_text("{}")
    assert "1 with new files" in _run(tmp_path, "save")
    assert (kept / "final_eval" / "5k-step500.json").is_file()
    # A rerun that differs (another host, extended, resumed) is refused, loudly, and the kept
    # files stay byte for byte.
    (live / "aaa-s0" / "metrics.jsonl").write_text('{"step": 500, "proxy_fid": 1.0}\n')
    out = subprocess.run(
        ["bash", str(tmp_path / "scripts" / SCRIPT.name), "save"], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "NOT saved" in out.stderr and "metrics.jsonl" in out.stderr
    assert all(p.read_bytes() == b for p, b in before.items())
    # A kept file that the live run no longer has is a difference too.
    (live / "aaa-s0" / "metrics.jsonl").write_bytes(before[kept / "metrics.jsonl"])
    (live / "aaa-s0" / "samples" / "grid.png").unlink()
    assert "grid.png (gone)" in _run(tmp_path, "save", check=False)


def test_save_waits_for_the_evaluation_and_takes_the_grown_log(tmp_path):
    """done.json is written before the final sampling and evaluation: a run whose runner still
    holds its .lock is not saved yet (saved then, it was kept without them). Once saved, the
    lines its log gains later (the evaluation's) are taken; a log that changed is refused."""
    import fcntl

    live = _tree(tmp_path)
    run = live / "aaa-s0"
    (run / "log.txt").write_text("step 500\n")
    with open(run / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # what the runner holds around train-sample-eval
        out = _run(tmp_path, "save")
        assert "0 new, 0 with new files, 0 unchanged, 0 refused, 1 busy" in out
        assert not (tmp_path / "results" / "fmnist-runs" / "aaa-s0").exists()
    assert "1 new" in _run(tmp_path, "save")  # released: saved
    kept = tmp_path / "results" / "fmnist-runs" / "aaa-s0"
    assert not (kept / ".lock").exists()
    (run / "log.txt").write_text("step 500\nfinal FD 30.0\n")
    assert "1 with new files" in _run(tmp_path, "save")
    assert (kept / "log.txt").read_text() == "step 500\nfinal FD 30.0\n"
    (run / "log.txt").write_text("step 500\nfinal FD 31.0\n")  # not a prefix: refused
    out = _run(tmp_path, "save", check=False)
    assert "NOT saved" in out and "log.txt" in out
    assert (kept / "log.txt").read_text() == "step 500\nfinal FD 30.0\n"
    (run / "log.txt").write_text("step 500\n")  # shorter: refused too
    assert "NOT saved" in _run(tmp_path, "save", check=False)


def test_each_pool_is_saved_and_restored_under_its_own_name(tmp_path):
    live = _tree(tmp_path)
    long_pool = live.parent / "fmnist-long-runs"
    shutil.copytree(live / "aaa-s0", long_pool / "aaa-s0")
    (long_pool / "aaa-s0" / "done.json").write_text('{"steps": 12000}')
    out = _run(tmp_path, "save")
    assert "fmnist-long-runs: 1 new" in out and "fmnist-runs: 1 new" in out
    kept = tmp_path / "results"
    assert (kept / "fmnist-long-runs" / "aaa-s0" / "done.json").read_text() == '{"steps": 12000}'
    assert (kept / "fmnist-runs" / "aaa-s0" / "done.json").read_text() == '{"steps": 500}'
    assert not (kept / "fmnist-long-runs" / "aaa-s0" / "checkpoints").exists()

    shutil.rmtree(tmp_path / "runs")
    _run(tmp_path, "restore-long")
    assert (long_pool / "aaa-s0" / "done.json").read_text() == '{"steps": 12000}'
    assert not live.exists()  # the 4,000-step pool is left alone
    _run(tmp_path, "restore")
    assert (live / "aaa-s0" / "done.json").read_text() == '{"steps": 500}'


def _study_tables():
    import importlib.util

    path = SCRIPT.parent / "study_tables.py"
    spec = importlib.util.spec_from_file_location("study_tables", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_study_tables_average_the_seeds_of_each_arm(tmp_path):
    import json

    def run(name, weight, variant, dist, tau=0.5, layers='["blocks.0"]') -> None:
        d = tmp_path / name
        d.mkdir()
        (d / "config.toml").write_text(
            f'[dispersive]\nweight = {weight}\nvariant = "{variant}"\ntau = {tau}\n'
            f"layers = {layers}\n"
        )
        recs = [
            {"step": s, "mean_dist": m, "active_frac": 0.5, "rep_norm/blocks.0": 10.0 + m,
             "rep_norm/blocks.3": 20.0}
            for s, m in zip((100, 1000, 4000), dist)
        ] + [{"step": 4000, "proxy_fid": 30.0 + weight, "proxy_acc": 0.7}]  # fmt: skip
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    run("base-s0", 0.0, "infonce_l2", [1.0, 2.0, 3.0])
    run("base-s1", 0.0, "infonce_l2", [3.0, 4.0, 5.0])
    run("hinge-s0", 0.5, "hinge", [7.0, 8.0, 9.0])
    run("other-s0", 1.0, "hinge", [0.0, 0.0, 0.0])  # not an arm of any grid
    run("lt-s0", 1.0, "infonce_l2", [5.0, 5.0, 5.0], tau=2.0)  # lambda x tau only
    run("b2-s0", 0.5, "infonce_l2", [6.0, 6.0, 6.0], layers='["blocks.2"]')  # blocks only
    run("all-s0", 0.5, "infonce_l2", [4.0, 4.0, 4.0], layers='["blocks.0", "blocks.3"]')
    tables = _study_tables()
    rows = tables.dispersion(tmp_path).splitlines()
    assert len(rows) == 4
    assert rows[2].startswith("| baseline | 2 | 2.00 | 3.00 | 4.00 | 50% |")
    assert rows[3].startswith("| Hinge | 1 | 7.00 |")
    rows = tables.dispersion(tmp_path, steps=(1000, 4000)).splitlines()
    assert rows[0].count("@1000") == 3 and "@100 " not in rows[0]
    assert rows[2].startswith("| baseline | 2 | 3.00 | 4.00 | 50% | 50% | 13 | 14 | 20 |")
    rows = tables.dispersion(tmp_path, grid="blocks").splitlines()
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| baseline", "| blocks.2", "| all blocks"]
    rows = tables.dispersion(tmp_path, grid="lambda-tau").splitlines()
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| baseline", "| lambda=1.0 tau=2.0"]
    assert rows[3].startswith("| lambda=1.0 tau=2.0 | 1 | 5.00 |")
    # The screen's grid takes every run, named by its settings; baselines are pooled.
    rows = tables.dispersion(tmp_path, grid="screen").splitlines()
    assert len(rows) == 2 + 1 + 5 and rows[2].startswith("| baseline | 2 | 2.00 |")
    assert any(r.startswith("| Hinge, lambda=1.0, tau=0.5, blocks.0 | 1 | 0.00 |") for r in rows)
    assert tables.long(tmp_path).splitlines()[2] == "| 4,000 | 30.0 / – | 30.0 / – | – |"
    # Paired with the baseline of the same seed (proxy FID 30 + weight at step 4000).
    rows = {r.split(" | ")[0][2:]: r for r in tables.paired(tmp_path).splitlines()[2:]}
    hinge = rows["Hinge, lambda=0.5, tau=0.5, blocks.0"]
    # One pair: no SD beyond 0 and no CI; the host was not recorded (no host.json).
    assert hinge.endswith(
        "| 1 | +0.50 | 0.00 | – | +0.50 | +0.50 | 0/1 | not recorded | – | +0.50 | 1 |"
    )
    assert rows["InfoNCE l2, lambda=1.0, tau=2.0, blocks.0"].endswith(
        "| 0/1 | not recorded | – | +1.00 | 1 |"
    )
    pooled = rows["**all 3 InfoNCE l2 arms (pooled; pairs share baseline runs, not independent)**"]
    assert pooled.endswith(
        "| 3 | +0.67 | – | – | +0.50 | +1.00 | 0/3 | – | – | +0.50 | – |"
    )  # lt, b2 and all
    assert "baseline" not in rows and len(rows) == 7  # 5 arms; 2 variants with 2+ arms

    # Rank correlation of the blocks.0 norm (10 + mean dist) with the proxy FID at step 4000,
    # against Pearson's r of average ranks computed here.
    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        return np.array([(v < x).sum() + ((v == x).sum() + 1) / 2 for x in v])

    def rho(pairs):
        x, y = ranks([n for n, _ in pairs]), ranks([f for _, f in pairs])
        return np.corrcoef(x, y)[0, 1]

    l2 = [(15.0, 31.0), (16.0, 30.5), (14.0, 30.5)]  # lt, b2, all
    every = [(13.0, 30.0), (15.0, 30.0), (19.0, 30.5), (10.0, 31.0), *l2]
    rows = tables.norm_fid(tmp_path).splitlines()[2:]
    assert rows[0].startswith(f"| all runs | 7 | {rho(every):+.2f} |")
    assert rows[1].startswith(f"| InfoNCE-l2 arms | 3 | {rho(l2):+.2f} |")


def test_long_table_gives_the_gap_per_seed_and_its_mean_over_seeds_with_both_arms(tmp_path):
    import json

    def run(name, weight, fids, variant="infonce_l2") -> None:
        d = tmp_path / name
        d.mkdir()
        (d / "config.toml").write_text(
            f'[dispersive]\nweight = {weight}\nvariant = "{variant}"\ntau = 0.5\n'
            'layers = ["blocks.0"]\n'
        )
        recs = [{"step": s, "proxy_fid": f} for s, f in fids.items()]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    run("b-s0", 0.0, {1000: 80.0, 2000: 50.0})
    run("x-s0", 0.5, {1000: 90.0, 2000: 48.0})
    run("b-s1", 0.0, {1000: 70.0, 2000: 40.0})
    run("x-s1", 0.5, {1000: 74.0})  # seed 1's InfoNCE-l2 run stopped before step 2000
    run("h-s2", 0.5, {1000: 1.0}, variant="hinge")  # not an arm of this table
    rows = _study_tables().long(tmp_path).splitlines()
    assert rows[0].count("seed ") == 2  # no column for the hinge run's seed 2
    assert rows[2] == "| 1,000 | 80.0 / 90.0 (+10.0) | 70.0 / 74.0 (+4.0) | +7.0 (2) |"
    assert rows[3] == "| 2,000 | 50.0 / 48.0 (-2.0) | 40.0 / – | -2.0 (1) |"


def _host(run_dir: Path, key: str, session: str) -> None:
    import json

    seg = {"key": key, "session": session, "from_step": 0}
    (run_dir / "host.json").write_text(json.dumps({"segments": [seg]}))


def test_paired_statistics_pair_only_runs_of_one_host_and_session(tmp_path):
    import json

    from scipy.stats import t

    from dispersive.experiments.grid import load_grid
    from dispersive.experiments.results import arm_stats, collect, markdown_table

    tiny = SCRIPT.parents[1] / "configs" / "tiny.toml"
    f = tmp_path / "g.toml"
    f.write_text(
        f'[experiment]\nconfig = "{tiny}"\nseeds = [0, 1, 2, 3, 4]\n'
        '[[arm]]\nname = "baseline"\nset = { "dispersive.weight" = 0.0 }\n'
        '[[arm]]\nname = "l2"\nset = { "dispersive.weight" = 0.5 }\n'
        '[[arm]]\nname = "hinge"\nset = { "dispersive.weight" = 0.5, '
        '"dispersive.variant" = "hinge" }\n'
    )
    g = load_grid(f, outdir=tmp_path / "out")
    fid = {"baseline": [30.0, 31.0, 29.0, 30.0, 30.0], "l2": [32.0, 30.0, 33.5, 31.0, 50.0]}
    fid["hinge"] = [30.5, 31.5, 29.5, 30.5, 30.5]
    for r in g.runs:
        d = r.run_dir
        d.mkdir(parents=True)
        rec = {"step": 6, "loss_diff": 0.1, "floor_gap": 0.25, "proxy_fid": fid[r.arm.name][r.seed]}
        (d / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
        (d / "done.json").write_text('{"steps": 6}')
        if r.seed in (0, 1, 2):  # one host, one session
            _host(d, "cpu A | f | 2.13 | 1", "s1")
        if r.seed == 3 and r.arm.name != "l2":  # l2 of seed 3: host not recorded
            _host(d, "cpu A | f | 2.13 | 1", "s1")
        if r.seed == 4:  # the arms on another host than their baseline: no pair
            _host(d, "cpu B | g | 2.13 | 1", "s2") if r.arm.name != "baseline" else _host(
                d, "cpu A | f | 2.13 | 1", "s3"
            )
    stats = {s.arm.name: s for s in arm_stats(g, collect(g, {r.name: 6 for r in g.runs}))}
    l2 = stats["l2"]
    diffs = np.array([2.0, -1.0, 4.5, 1.0])  # seeds 0-3; seed 4 (+20) is not a pair
    assert (l2.shared, l2.unpaired, l2.host_unknown, l2.wins) == (4, 1, 1, 1)
    assert l2.paired_mean == pytest.approx(diffs.mean())
    sd = diffs.std(ddof=1)
    assert l2.paired_std == pytest.approx(sd)
    # t quantile for 3 degrees of freedom, two-sided 95%: 3.182446 (tables).
    assert l2.paired_ci == pytest.approx(3.182446 * sd / 2.0, rel=1e-6)
    assert l2.paired_ci == pytest.approx(t.ppf(0.975, 3) * sd / 2.0)
    assert len(l2.values) == 5  # the unpaired seed still counts for the arm's own mean
    table = markdown_table(g, list(stats.values()), metric_label="proxy FID").splitlines()
    row = {line.split(" | ")[0][2:]: line for line in table[2:]}
    lo, hi = diffs.mean() - l2.paired_ci, diffs.mean() + l2.paired_ci
    assert f"[{lo:+.2f}, {hi:+.2f}] (1/4) † (1 unpaired: other host/session)" in row["l2"]
    # The floor gap is an InfoNCE-l2 statistic: n/a for the hinge arm, shown for the others.
    assert row["hinge"].endswith("| n/a |") and row["l2"].endswith("| 0.250 |")
    assert row["**baseline**"].endswith("| 0.250 |")


def test_the_runner_records_the_host_of_every_training_stage(tmp_path):
    from dispersive.experiments.results import host_of
    from dispersive.experiments.runner import _record_host, host_info

    info = host_info(1)
    assert info["threads"] == 1 and info["cpu"] and info["torch"]
    assert info["key"].endswith(" | 1") and info["torch"] in info["key"]
    assert len(info["host"]) == 12  # a hash, not the host name
    _record_host(tmp_path, 0, 1)
    _record_host(tmp_path, 500, 1)  # resumed in the same session
    key, sessions = host_of(tmp_path)
    assert key == info["key"] and sessions == {info["session"]}
    assert host_of(tmp_path / "nothing") == (None, frozenset())


def test_power_gives_the_seeds_whose_t_interval_is_within_the_target():
    from scipy.stats import t

    tables = _study_tables()
    for sd, target in ((3.7, 1.76), (1.0, 1.0), (6.5, 1.76)):
        n = tables.seeds_needed(sd, target)
        assert t.ppf(0.975, n - 1) * sd / np.sqrt(n) <= target
        assert t.ppf(0.975, n - 2) * sd / np.sqrt(n - 1) > target  # n - 1 is not enough
    assert tables.seeds_needed(0.0, 1.0) == 2
    mean, sd, ci = tables.t_ci([1.0, 2.0, 6.0])
    assert (mean, sd) == (3.0, pytest.approx(np.std([1, 2, 6], ddof=1)))
    assert ci == pytest.approx(4.302653 * sd / np.sqrt(3), rel=1e-6)  # t_{0.975, 2}


def test_arm_labels_tell_apart_what_the_screen_varies():
    tables = _study_tables()
    base = {"weight": 0.1, "tau": 1.0, "layers": ["blocks.0"], "variant": "infonce_l2"}
    labels = {
        tables._label(base),
        tables._label({**base, "include_diagonal": False}),
        tables._label({**base, "variant": "hinge"}),
        tables._label({**base, "variant": "hinge", "margin": 4.0}),
    }
    assert len(labels) == 4
    assert tables._label({**base, "include_diagonal": True}) == tables._label(base)


def test_every_kept_run_keeps_its_folder_name_under_todays_config():
    """Run folders are named by a hash of what they train; a config key added since the runs
    were kept (with a default that trains as before) must not rename them, or `make study`
    would train every kept run again under a new name."""
    import tomllib

    from dispersive.experiments.grid import run_hash
    from dispersive.train.config import config_from_dict

    kept = sorted((SCRIPT.parents[1] / "results").glob("*/*-s*/config.toml"))
    assert len(kept) >= 57  # 51 first-pass runs, 4 long runs, the screen's first 2
    for path in kept:
        cfg = config_from_dict(tomllib.loads(path.read_text()), source=str(path))
        assert run_hash(cfg) == path.parent.name.rsplit("-s", 1)[0], path


def _covariance_run(root: Path, name: str, weight: float, step: int, proxy: float, fid: float):
    """A run folder with a covariance [dispersive] table, one logged proxy FID at ``step`` and
    a final evaluation "5k" there (KID = FD / 10)."""
    import json

    d = root / name
    (d / "final_eval").mkdir(parents=True)
    (d / "config.toml").write_text(
        f'[dispersive]\nweight = {weight}\nvariant = "covariance"\ntau = 0.5\n'
        'layers = ["blocks.0"]\n'
    )
    (d / "metrics.jsonl").write_text(json.dumps({"step": step, "proxy_fid": proxy}) + "\n")
    (d / "final_eval" / f"5k-step{step}.json").write_text(json.dumps({"fid": fid, "kid": fid / 10}))


def test_paired_reads_a_named_final_evaluation_when_asked(tmp_path):
    for s, (b, a) in enumerate([(50.0, 49.0), (52.0, 50.0)]):
        _covariance_run(tmp_path, f"base-s{s}", 0.0, 2000, proxy=60.0, fid=b)
        _covariance_run(tmp_path, f"cov-s{s}", 0.1, 2000, proxy=70.0, fid=a)
    tables = _study_tables()
    row = tables.paired(tmp_path, step=2000, final="5k").splitlines()[2]
    # Differences -1 and -2: mean -1.5, SD 0.71, CI half-width t(0.975, 1) * 0.71 / sqrt 2.
    assert row.startswith(
        "| Covariance, lambda=0.1, tau=0.5, blocks.0 | 2 | -1.50 | 0.71 | [-7.85, +4.85]"
    )
    row = tables.paired(tmp_path, step=2000).splitlines()[2]  # the logged proxy FID
    assert "| 2 | +10.00 | 0.00 |" in row
    assert tables.paired(tmp_path, step=4000, final="5k").count("\n") == 1  # nothing at 4000
    # KID (x 1e3) of the same evaluation: a tenth of the FD here, differences -0.1 and -0.2.
    row = tables.paired(tmp_path, step=2000, final="5k", metric="kid").splitlines()[2]
    assert "| 2 | -0.15 | 0.07 |" in row
    with pytest.raises(ValueError, match="only in final evaluations"):
        tables.paired(tmp_path, step=2000, metric="kid")


def test_all_covers_every_table_command_of_the_results_page(monkeypatch, capsys):
    """`study_tables.py all` regenerates the page: every `study_tables.py ...` command that
    docs/results.md names is one of its entries (same parsed arguments; the page's commands
    without --runs read the first pass, kept in results/fmnist-runs), and `all` runs each."""
    import re

    tables = _study_tables()
    parser = tables.parser()
    cmd = r"python scripts/study_tables\.py "
    commands = []
    parts = (SCRIPT.parents[1] / "docs" / "results.md").read_text().split("```")
    for i, part in enumerate(parts):
        if i % 2:  # a code block: one command per line, comments after #
            commands += re.findall(cmd + r"([^#\n]*?)\s*(?:#|$)", part, flags=re.M)
        else:  # prose: commands in backticks, wrapped across lines
            prose = re.sub(r"\s*\n\s*", " ", part)
            commands += re.findall(cmd + r"([^`]*?)(?:`| and |;|\))", prose)
    assert len(commands) >= 15

    def key(args) -> tuple:  # a command line, or what the parser made of one
        ns = vars(parser.parse_args(args.split()) if isinstance(args, str) else args).copy()
        if ns["runs"] == Path("runs/experiments/fmnist-runs"):
            ns["runs"] = Path("results/fmnist-runs")
        return tuple(sorted((k, str(v)) for k, v in ns.items()))

    entries = {key(cmd) for _, cmd in tables.PAGE}
    for cmd in commands:
        if cmd == "all" or "--samples" in cmd or "|" in cmd:  # itself; a file of one's own;
            continue  # "--grid blocks|lambda-tau" (two commands in one)
        assert key(cmd) in entries, f"docs/results.md names `{cmd}`, which `all` does not make"

    calls = []
    monkeypatch.setattr(tables, "table", lambda args: calls.append(args) or f"T{len(calls)}")
    tables.main(["all"])
    out = capsys.readouterr().out
    assert [key(a) for a in calls] == [key(c) for _, c in tables.PAGE]
    assert out.count("\n## ") + out.startswith("## ") == len(tables.PAGE)


def test_paired_gives_each_arm_a_family_wise_interval_over_the_arms(tmp_path):
    """With k arms against one baseline the last column is each arm's CI at 1 - 0.05 / k
    (Bonferroni): wider than its 95% CI, and all k hold together with >= 95% confidence."""
    from scipy.stats import t

    diffs = {0.1: [1.0, 2.0, 4.0], 0.5: [-1.0, 0.5, -2.0]}
    for s in range(3):
        _covariance_run(tmp_path, f"base-s{s}", 0.0, 4000, proxy=30.0, fid=30.0)
        for w, d in diffs.items():
            _covariance_run(tmp_path, f"w{w}-s{s}", w, 4000, proxy=30.0, fid=30.0 + d[s])
    lines = _study_tables().paired(tmp_path, step=4000, final="5k").splitlines()
    assert "| 97.5% CI (Bonferroni, 2 arms) |" in lines[0]
    for w, d in diffs.items():
        (row,) = [ln for ln in lines if f"lambda={w}," in ln]
        x = np.array(d)
        se = x.std(ddof=1) / np.sqrt(3)
        h95, hk = t.ppf(0.975, 2) * se, t.ppf(1 - 0.025 / 2, 2) * se
        assert f"| [{x.mean() - h95:+.2f}, {x.mean() + h95:+.2f}] |" in row
        assert f"| [{x.mean() - hk:+.2f}, {x.mean() + hk:+.2f}] |" in row
        assert hk > h95


def test_sign_test_is_the_exact_binomial_test_and_the_table_shows_it(tmp_path):
    """The sign test against scipy's exact binomial test (ties dropped), and the paired
    table's median and p columns for an arm with one far-out seed: the mean moves with it,
    the median and the sign test do not."""
    from scipy.stats import binomtest

    tables = _study_tables()
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 9, 10, 13):
        for _ in range(5):
            d = rng.normal(0.3, 1.0, n).round(1).tolist()
            nz = [x for x in d if x != 0]
            want = binomtest(sum(x < 0 for x in nz), len(nz), 0.5).pvalue if nz else None
            got = tables.sign_test(d)
            assert (got is None and want is None) or got == pytest.approx(want, rel=1e-12)
    assert tables.sign_test([1.0] * 9) == pytest.approx(2 / 2**9)
    assert tables.sign_test([0.0, 0.0]) is None
    diffs = [1.0, 2.0, 3.0, 4.0, 40.0]
    for s, d in enumerate(diffs):
        _covariance_run(tmp_path, f"base-s{s}", 0.0, 4000, proxy=30.0, fid=30.0)
        _covariance_run(tmp_path, f"cov-s{s}", 0.5, 4000, proxy=30.0, fid=30.0 + d)
    lines = tables.paired(tmp_path, step=4000, final="5k").splitlines()
    assert lines[0].endswith("| median | sign test p (exact, two-sided) |")
    assert lines[1].count("|---") == lines[0].count(" | ") + 1
    row = lines[2].split(" | ")
    assert row[2] == "+10.00" and row[-2] == "+3.00" and row[-1] == f"{2 / 2**5:.3g} |"


def test_paired_takes_only_the_seeds_asked_for(tmp_path):
    for s, (b, a) in enumerate([(50.0, 49.0), (52.0, 50.0), (51.0, 60.0)]):
        _covariance_run(tmp_path, f"base-s{s}", 0.0, 2000, proxy=60.0, fid=b)
        _covariance_run(tmp_path, f"cov-s{s}", 0.1, 2000, proxy=70.0, fid=a)
    tables = _study_tables()
    row = tables.paired(tmp_path, step=2000, final="5k", seeds=[0, 1]).splitlines()[2]
    assert "| 2 | -1.50 | 0.71 |" in row  # seeds 0 and 1: differences -1 and -2
    row = tables.paired(tmp_path, step=2000, final="5k").splitlines()[2]
    assert "| 3 | +2.00 |" in row  # all three: -1, -2, +9
    args = tables.parser().parse_args(["paired", "--seeds", "6", "7"])
    assert args.seeds == [6, 7]


def test_power_reports_what_it_can_from_one_seed_or_no_infonce_arm(tmp_path):
    # One seed: no arm has two pairs, nothing to pool and no SD of single runs; two seeds of
    # covariance arms only: the InfoNCE-l2 pool is empty. Neither may divide by zero.
    tables = _study_tables()
    _covariance_run(tmp_path, "base-s0", 0.0, 2000, proxy=60.0, fid=50.0)
    _covariance_run(tmp_path, "cov-s0", 0.1, 2000, proxy=70.0, fid=49.0)
    text = tables.power(tmp_path, step=2000, final="5k")
    assert "pooled" not in text and "needs two runs of some arm" in text
    _covariance_run(tmp_path, "base-s1", 0.0, 2000, proxy=60.0, fid=52.0)
    _covariance_run(tmp_path, "cov-s1", 0.1, 2000, proxy=70.0, fid=50.0)
    text = tables.power(tmp_path, step=2000, final="5k")
    assert "pooled over the InfoNCE-l2" not in text
    assert "| **pooled over all arms** (df 1) | – | 0.71 |" in text  # differences -1 and -2
    assert "pooled SD of one run" in text


def test_dispersion_reports_the_last_block_the_model_has(tmp_path):
    # SiT-T/4 has 6 blocks: the last column is blocks.5 (SiT-XS/4's blocks.3 stays as before).
    import json

    for name, weight in (("base-s0", 0.0), ("cov-s0", 0.1)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.toml").write_text(
            f'[dispersive]\nweight = {weight}\nvariant = "covariance"\ntau = 0.5\n'
            'layers = ["blocks.0"]\n'
        )
        rec = {"step": 100, "mean_dist": 1.0, "active_frac": 1.0}
        rec |= {f"rep_norm/blocks.{i}": 10.0 * i + weight for i in range(6)}
        (d / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    rows = _study_tables().dispersion(tmp_path, steps=(100,), grid="screen").splitlines()
    assert rows[0].endswith("| norm blocks.5 @100 |")
    assert rows[2].startswith("| baseline | 1 |") and rows[2].endswith("| 0 | 50 |")
    assert rows[3].endswith("| 0 | 50 |")  # blocks.0 0.1 and blocks.5 50.1, rounded
