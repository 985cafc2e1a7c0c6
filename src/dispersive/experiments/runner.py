"""Run a grid: every run is a pipeline of ``dispersive`` subprocesses in its own folder.

Per run (``EXP_DIR/runs/<arm>-s<seed>/``, a normal ``dispersive train`` run directory):

1. ``dispersive train`` (or ``--resume`` when the folder holds an interrupted run, or a
   finished one with fewer steps than the grid now asks for);
2. ``dispersive sample --num 64`` for the sample grid of the report (``samples/``);
3. per ``[[final_eval]]`` NAME: ``dispersive sample --num N`` and ``dispersive eval``, whose
   JSON is kept as ``final_eval/<name>-step<step>.json`` together with the sampler spec.

Before each training stage the runner appends the host it trains on to ``host.json`` (CPU
model and flags, torch version, threads, a hash of the host name and the boot id as the
session): reruns of one seed are bit-identical on one host but drift apart across hosts by
as much as the seed spread, so the tables pair a run only with a baseline of the same host and
session (:mod:`dispersive.experiments.results`).

Each stage is skipped when its output is already there for the run's final step, so re-running
the grid skips finished runs and resumes interrupted ones; a run killed mid-way loses at most
the steps since its last checkpoint. Runs execute ``jobs`` at a time, each child limited to
``cpus // jobs`` threads so that parallel CPU runs do not oversubscribe the cores. A failed run
is reported with its log file and does not stop the others.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from dispersive.errors import UserError
from dispersive.experiments.grid import Grid, RunSpec, resolve_run_config, toml_literal
from dispersive.train.rundir import (
    CONFIG_FILE,
    DONE_FILE,
    FINAL_EVAL_DIR,
    LOG_FILE,
    SAMPLES_DIR,
    write_json,
)
from dispersive.train.rundir import read_json as _read_json

__all__ = [
    "HOST_FILE",
    "RunStatus",
    "host_info",
    "run_status",
    "check_grid",
    "run_grid",
    "run_grids",
    "select_runs",
    "available_cpus",
    "LOG_FILE",
    "fashion_mnist_reference",
    "final_eval_file",
]

HOST_FILE = "host.json"  # the hosts a run trained on (written here, read by results.py)
GRID_SAMPLES = 64


def final_eval_file(run_dir: Path, name: str, step: int) -> Path:
    """Where the final evaluation ``name`` of a run at ``step`` is kept (one file per step, so a
    run extended to a larger budget keeps its earlier numbers)."""
    from dispersive.experiments.grid import slug

    return Path(run_dir) / FINAL_EVAL_DIR / f"{slug(name)}-step{step}.json"


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:12]


def host_info(threads: int) -> dict:
    """What a run's numbers depend on besides its config: the host it trains on.

    ``key`` (CPU model, a hash of its flags, torch version, threads) decides whether two runs
    are comparable seed by seed; ``session`` (hashes of the host name and boot id) tells the
    runs of one machine session apart. No raw host name is stored.
    """
    import platform
    import socket

    import torch

    cpu, flags = "", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = (part.strip() for part in line.partition(":"))
            if name == "model name" and not cpu:
                cpu = value
            if name in ("flags", "Features") and not flags:
                flags = _sha(" ".join(sorted(value.split())))
    cpu = cpu or platform.processor() or platform.machine()
    boot = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    host = _sha(socket.gethostname())
    info = {"cpu": cpu, "cpu_flags": flags, "torch": torch.__version__, "threads": threads}
    key = " | ".join(str(info[k]) for k in ("cpu", "cpu_flags", "torch", "threads"))
    return {**info, "host": host, "key": key, "session": f"{host}-{_sha(boot or str(os.getpid()))}"}


def _record_host(run_dir: Path, step: int, threads: int) -> None:
    """Append the host of the training stage about to start at ``step`` to ``host.json``."""
    path = run_dir / HOST_FILE
    rec = _read_json(path) or {"segments": []}
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rec["segments"].append({**host_info(threads), "from_step": step, "started": started})
    write_json(path, rec)


@dataclass(frozen=True)
class RunStatus:
    """Where a run stands: ``state`` in {"new", "resume", "extend", "post", "done"}."""

    state: str
    step: int  # steps trained so far (latest checkpoint or done.json)
    steps: int  # steps the grid asks for


def _post_done(grid: Grid, run: RunSpec, step: int) -> bool:
    spec = _read_json(run.run_dir / SAMPLES_DIR / "spec.json")
    if spec is None or int(spec.get("checkpoint_step", -1)) != step:
        return False
    for fe in grid.final_evals:
        res = _read_json(final_eval_file(run.run_dir, fe.name, step))
        if res is None or int(res.get("checkpoint_step", -1)) != step:
            return False
    return True


def run_status(grid: Grid, run: RunSpec, steps: int) -> RunStatus:
    """The state of one run on disk, for a grid that asks for ``steps`` training steps."""
    from dispersive.train.checkpoint import list_checkpoints

    d = run.run_dir
    done = _read_json(d / DONE_FILE)
    ckpts = list_checkpoints(d) if d.is_dir() else []
    step = max([s for s, _ in ckpts], default=0)
    if done is not None:
        step = int(done.get("steps", step))
        if step < steps:
            return RunStatus("extend", step, steps)
        return RunStatus("done" if _post_done(grid, run, step) else "post", step, steps)
    if step >= steps and _post_done(grid, run, steps):
        # Another grid is extending this run (or was stopped doing so): it passed this grid's
        # budget, whose samples and evaluations are kept. Resuming here would train to theirs.
        return RunStatus("done", step, steps)
    if (d / CONFIG_FILE).is_file():
        return RunStatus("resume", step, steps)
    return RunStatus("new", 0, steps)


def check_grid(grid: Grid) -> dict[str, object]:
    """Resolve and check every run's config (meta-device model: no memory, no weights).

    Returns:
        ``{run name: Config}``.

    Raises:
        UserError: the first run whose config is wrong, naming the run.
    """
    from dispersive.train.config import config_source, meta_model, model_kwargs, preflight

    configs: dict[str, object] = {}
    models: dict[str, object] = {}
    for run in grid.runs:
        config = resolve_run_config(grid, run)
        key = json.dumps(model_kwargs(config.model), sort_keys=True, default=str)
        if key not in models:
            models[key] = meta_model(config.model)
        try:
            preflight(
                config, world_size=grid.nproc, model=models[key], source=config_source(grid.config)
            )
        except UserError as e:
            raise UserError(f"run {run.name} of {grid.path.name}: {e}") from None
        configs[run.name] = config
    for fe in grid.final_evals:
        if fe.features == "inception" and not fe.inception_weights:
            raise UserError(
                f"[final_eval] {fe.name!r} of {grid.path.name} uses features = 'inception' but "
                'gives no inception_weights = "<local pt_inception-2015-12-05-6726825d.pth>"'
            )
    return configs


def _check_eval_files(grid: Grid) -> None:
    """Files the final evaluation needs must exist before hours of training start."""
    for fe in grid.final_evals:
        for what, value in (("ref", fe.ref), ("inception_weights", fe.inception_weights)):
            if value and not Path(value).exists():
                raise UserError(
                    f"[final_eval] {fe.name!r} {what} = {value!r} of {grid.path.name} does not "
                    f"exist; give the local file (--final-eval-{what.replace('_', '-')} PATH)"
                )


class _Procs:
    """Live child processes, so that an interrupt can stop them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, cmd: Sequence[str], *, log: Path, env: dict) -> int:
        with self._lock:
            if self.stopping:
                return 130
            with open(log, "a") as fh:
                fh.write(f"\n$ {' '.join(cmd)}\n")
                fh.flush()
                proc = subprocess.Popen(
                    list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            self._procs.add(proc)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._procs.discard(proc)

    def stop(self) -> None:
        import signal

        with self._lock:
            self.stopping = True
            procs = list(self._procs)
        for p in procs:  # SIGINT first: the child stops at once (checkpoints are atomic)
            try:
                os.killpg(p.pid, signal.SIGINT)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 20
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(var, None)
    env.pop("MASTER_PORT", None)
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    return env


def _dispersive(nproc: int = 1) -> list[str]:
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    return [sys.executable]


def _pipeline(grid: Grid, run: RunSpec, status: RunStatus, procs: _Procs, env: dict) -> str:
    """Train, sample and evaluate one run as needed. Returns "" or an error message."""
    d = run.run_dir
    d.mkdir(parents=True, exist_ok=True)
    with _locked(d / ".lock"):
        return _pipeline_locked(grid, run, status, procs, env)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on a run folder: two experiments that share a run take turns."""
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pipeline_locked(grid: Grid, run: RunSpec, status: RunStatus, procs: _Procs, env: dict) -> str:
    d = run.run_dir
    # Another experiment may have advanced this shared run while we waited for the lock.
    status = run_status(grid, run, status.steps)
    log = d / LOG_FILE
    launch = _dispersive(grid.nproc)
    if status.state in ("new", "resume", "extend"):
        _record_host(d, status.step, int(env.get("OMP_NUM_THREADS") or 0))
        if status.state == "new":
            cmd = [
                *launch,
                "-m",
                "dispersive",
                "train",
                str(grid.config),
                "--outdir",
                str(d.parent),
            ]
            sets = [*run.overrides, f"train.run_name={toml_literal(d.name)}"]
        else:
            cmd = [*launch, "-m", "dispersive", "train", "--resume", str(d)]
            sets = list(run.overrides)
        rc = procs.run([*cmd, "--no-progress", "--set", *sets], log=log, env=env)
        if rc != 0:
            return f"training exited with status {rc}"
    done = _read_json(d / DONE_FILE) or {}
    step = int(done.get("steps", 0))

    spec = _read_json(d / SAMPLES_DIR / "spec.json")
    if spec is None or int(spec.get("checkpoint_step", -1)) != step:
        cmd = [*launch, "-m", "dispersive", "sample", "--ckpt", str(d), "--num-samples"]
        cmd += [str(GRID_SAMPLES), "--grid", str(GRID_SAMPLES), "--outdir", str(d / SAMPLES_DIR)]
        rc = procs.run(cmd, log=log, env=env)
        if rc != 0:
            return f"sampling exited with status {rc}"

    for fe in grid.final_evals:
        err = _final_eval(fe, d, step, launch, procs, log, env)
        if err:
            return err
    return ""


def fashion_mnist_reference(folder: Path) -> Path:
    """The Fashion-MNIST training set as a sample file, ``folder/fashion-mnist-train.npz``.

    The reference of final evaluations with KID (or precision/recall) under the domain
    features: the same 60,000 images as the shipped statistics, written once per folder.
    """
    from dispersive.data.datasets import load_fashion_mnist
    from dispersive.eval.io import save_npz

    path = Path(folder) / "fashion-mnist-train.npz"
    if not path.is_file():
        images, labels = load_fashion_mnist(None, train=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        save_npz(tmp, images[..., None], labels)
        tmp.replace(path)  # atomic: two runs may write it at once
    return path


def _final_eval(fe, d: Path, step: int, launch: list[str], procs: _Procs, log: Path, env) -> str:
    """Sample ``fe.num`` images and evaluate them; keep the metrics and the sampler spec."""
    from dispersive.experiments.grid import slug

    result_file = final_eval_file(d, fe.name, step)
    res = _read_json(result_file)
    if res is not None and int(res.get("checkpoint_step", -1)) == step:
        return ""
    out = d / FINAL_EVAL_DIR / f"{slug(fe.name)}-samples"
    cmd = [*launch, "-m", "dispersive", "sample", "--ckpt", str(d), "--num-samples", str(fe.num)]
    cmd += ["--outdir", str(out), "--batch-size", str(fe.batch_size)]
    if fe.sampler:
        cmd += ["--sampler", fe.sampler]
    if fe.steps > 0:
        cmd += ["--steps", str(fe.steps)]
    if fe.cfg_scale >= 0:
        cmd += ["--cfg-scale", str(fe.cfg_scale)]
    if fe.seed >= 0:
        cmd += ["--seed", str(fe.seed)]
    rc = procs.run(cmd, log=log, env=env)
    if rc != 0:
        return f"final evaluation {fe.name!r}: sampling exited with status {rc}"
    ev = [sys.executable, "-m", "dispersive", "eval", "--samples", str(out / "samples.npz")]
    ev += ["--features", fe.features, "--metrics", *fe.metrics]
    ref = fe.ref
    if not ref and fe.features == "fashion-mnist" and {"kid", "pr"} & set(fe.metrics):
        ref = str(fashion_mnist_reference(d.parent))  # KID needs images, not statistics
    if ref:
        ev += ["--ref", ref]
    if fe.inception_weights:
        ev += ["--inception-weights", fe.inception_weights]
    result = subprocess.run(ev, env=env, capture_output=True, text=True)
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(ev)}\n{result.stdout}{result.stderr}")
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return (
            f"final evaluation {fe.name!r}: dispersive eval exited with status {result.returncode}"
        )
    metrics = json.loads(lines[-1])
    record = {**metrics, "name": fe.name, "checkpoint_step": step,
              "sampler_spec": _read_json(out / "spec.json") or {}}  # fmt: skip
    write_json(result_file, record)
    (out / "samples.npz").unlink(missing_ok=True)  # large; the metrics and grid.png are kept
    return ""


def _progress_line(run: RunSpec, steps: int) -> str:
    from dispersive.train.logging import read_metrics

    recs = read_metrics(run.run_dir)
    step = max((int(r.get("step", 0)) for r in recs), default=0)
    fids = [r["proxy_fid"] for r in recs if "proxy_fid" in r]
    losses = [r["loss_diff"] for r in recs if "loss_diff" in r]
    parts = [f"{run.arm.name} (seed {run.seed}) step {min(step, steps)}/{steps}"]
    if losses:
        parts.append(f"loss_diff {losses[-1]:.4f}")
    if fids:
        parts.append(f"proxy_fid {fids[-1]:.1f}")
    return " ".join(parts)


def select_runs(
    grids: Sequence[Grid], arms: Sequence[str] = (), seeds: Sequence[int] = ()
) -> Callable[[RunSpec], bool]:
    """A filter on the grids' runs: arm name matching one of ``arms`` (shell patterns, as in
    ``fnmatch``; empty = every arm) and seed in ``seeds`` (empty = every seed).

    Raises:
        UserError: a pattern or seed that selects no run of any grid (a typo would otherwise
            run nothing, silently).
    """
    runs = [r for g in grids for r in g.runs]
    names = sorted({r.arm.name for r in runs})
    for pat in arms:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise UserError(
                f"--arms {pat!r} matches no arm; the grids' arms are: "
                + ", ".join(repr(n) for n in names)
                + " (quote patterns with spaces or *)"
            )
    known = sorted({r.seed for r in runs})
    for s in seeds:
        if s not in known:
            raise UserError(f"--seeds {s} is not a seed of the grids; they have {known}")

    def keep(run: RunSpec) -> bool:
        by_arm = not arms or any(fnmatch.fnmatchcase(run.arm.name, p) for p in arms)
        return by_arm and (not seeds or run.seed in seeds)

    return keep


def _check_extendable(grid: Grid, run: RunSpec, st: RunStatus) -> None:
    """Refuse to extend a finished run that has no checkpoint at its last step.

    Training it further would start again from step 0 in its own folder and replace the
    numbers it holds (a run restored from results/ is kept without checkpoints).
    """
    from dispersive.train.checkpoint import list_checkpoints

    if any(s == st.step for s, _ in list_checkpoints(run.run_dir)):
        return
    raise UserError(
        f"run {run.run_dir} of {grid.path.name} finished at {st.step} steps and has no "
        f"checkpoint there (a kept copy?): extending it to {st.steps} steps would retrain it "
        "from step 0 in place and replace its numbers; give the longer grid its own "
        "[experiment] shared_runs pool (or outdir) instead"
    )


def build_queue(
    grids: Sequence[Grid],
    configs: dict,
    *,
    echo: Callable[[str], None] = lambda _: None,
    keep: Callable[[RunSpec], bool] | None = None,
) -> tuple[list[tuple[Grid, RunSpec, int]], dict[Path, list[int]]]:
    """The shared queue of several grids, in order: ``(grid, run, budget)`` per task.

    A run folder is queued when it is not done at its first budget, and queued again only when
    a later grid asks for more steps (an extension). ``pending_of[grid.path]`` lists the tasks
    that grid waits for.

    Args:
        grids: the grids.
        configs: ``{grid.path: {run name: Config}}`` from :func:`check_grid`.
        keep: queue only the runs it accepts (:func:`select_runs`); the others are left as
            they are, and a grid's report then shows them as they are on disk.
    """
    # The queue: (grid, run, budget), one entry per run folder and budget increase.
    queue: list[tuple[Grid, RunSpec, int]] = []
    budget_of: dict[Path, int] = {}
    pending_of: dict[Path, list[int]] = {g.path: [] for g in grids}  # grid -> task indices
    for g in grids:
        counts: dict[str, int] = {}
        for run in g.runs:
            steps = configs[g.path][run.name].train.steps
            st = run_status(g, run, steps)
            counts[st.state] = counts.get(st.state, 0) + 1
            if st.state == "extend":
                _check_extendable(g, run, st)
            known = budget_of.get(run.run_dir)
            if known is None or steps > known:
                budget_of[run.run_dir] = steps
                if st.state != "done" and (keep is None or keep(run)):
                    queue.append((g, run, steps))
            # The grid waits for every task of this folder queued so far.
            pending_of[g.path] += [
                i for i, (_, r, _) in enumerate(queue) if r.run_dir == run.run_dir
            ]
        dirs = {r.run_dir for r in g.runs}
        todo = sum(1 for _, r, _ in queue if r.run_dir in dirs)
        states = ", ".join(f"{n} {k}" for k, n in counts.items())
        echo(f"experiment {g.name}: {len(g.runs)} runs ({states}), {todo} task(s); {g.exp_dir}")
    return queue, pending_of


def run_grid(grid: Grid, **kwargs) -> list[tuple[RunSpec, str]]:
    """:func:`run_grids` for one grid."""
    return run_grids([grid], **kwargs)


def run_grids(
    grids: Sequence[Grid],
    *,
    jobs: int = 1,
    threads: int = 0,
    status_every: float = 60.0,
    echo: Callable[[str], None] = print,
    on_grid_done: Callable[[Grid], None] | None = None,
    reverse: bool = False,
    keep: Callable[[RunSpec], bool] | None = None,
    configs: Mapping[Path, Mapping[str, object]] | None = None,
) -> list[tuple[RunSpec, str]]:
    """Bring every run of the grids to its final state (train, samples, final evaluation).

    The grids share one queue, in order: a run folder that several grids contain (a shared
    run) is trained once, and again only to extend it when a later grid asks for more steps.

    Args:
        grids: the loaded grids.
        jobs: runs at a time.
        threads: torch threads per run (0 = available CPUs // jobs, at least 1).
        status_every: seconds between progress lines while runs are going.
        echo: where progress lines go.
        on_grid_done: called (in this thread) when all runs of a grid have finished, e.g. to
            write its report while the other grids go on.
        reverse: work through the queue from its end (for a second process on the same grids).
        keep: run only the runs it accepts (:func:`select_runs`: some arms or seeds first).
        configs: ``{grid.path: check_grid(grid)}`` when the caller has checked the grids already
            (each config is preflighted once); checked here otherwise.

    Returns:
        ``[(run, error message)]`` of the runs that failed (empty when all finished).
    """
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    checked = {}
    for g in grids:
        checked[g.path] = check_grid(g) if configs is None else configs[g.path]
        _check_eval_files(g)
    configs = checked
    nproc = max(g.nproc for g in grids)
    threads = threads or max(1, available_cpus() // (jobs * nproc))
    env = _child_env(threads)

    queue, pending_of = build_queue(grids, configs, echo=echo, keep=keep)
    if reverse:
        # A second process on the same grids works from the other end; the run locks keep the
        # two apart, and an extension met first simply trains to the larger budget directly.
        queue.reverse()
        n = len(queue)
        pending_of = {k: [n - 1 - i for i in v] for k, v in pending_of.items()}
    echo(f"{len(queue)} task(s), {jobs} at a time, {threads} thread(s) each")
    failures: list[tuple[RunSpec, str]] = []
    reported: set[Path] = set()

    def grids_done(finished: set[int]) -> None:
        for g in grids:
            if g.path not in reported and set(pending_of[g.path]) <= finished:
                reported.add(g.path)
                if on_grid_done is not None:
                    on_grid_done(g)

    finished: set[int] = set()
    grids_done(finished)
    if not queue:
        return failures
    procs = _Procs()
    started: dict[int, float] = {}
    pool = ThreadPoolExecutor(max_workers=jobs)

    def task(i: int) -> str:
        g, run, steps = queue[i]
        if procs.stopping:
            return "interrupted"
        started[i] = time.monotonic()
        st = run_status(g, run, steps)
        what = {"new": "start", "resume": f"resume at step {st.step}", "extend": "extend",
                "post": "sample/evaluate", "done": "check"}[st.state]  # fmt: skip
        echo(f"  [{g.name}: {run.arm.name}, seed {run.seed}] {what} ({steps} steps); "
             f"log {run.run_dir / LOG_FILE}")  # fmt: skip
        try:
            return _pipeline(g, run, st, procs, env)
        except Exception as e:  # keep the other runs going; the message names the run
            return f"{type(e).__name__}: {e}"

    futures: dict[Future, int] = {}
    try:
        for i in range(len(queue)):
            futures[pool.submit(task, i)] = i
        pending = set(futures)
        last_status = time.monotonic()
        while pending:
            done, pending = wait(pending, timeout=2.0, return_when=FIRST_COMPLETED)
            for f in done:
                i = futures[f]
                g, run, steps = queue[i]
                err = f.result()
                finished.add(i)
                took = time.monotonic() - started.get(i, time.monotonic())
                label = f"[{g.name}: {run.arm.name}, seed {run.seed}]"
                if err:
                    failures.append((run, err))
                    echo(f"  {label} FAILED: {err}; see {run.run_dir / LOG_FILE}")
                else:
                    echo(
                        f"  {label} finished in {took:.0f} s ({len(finished)}/{len(queue)}): "
                        f"{_progress_line(run, steps)}"
                    )
            if done:
                grids_done(finished)
            if pending and time.monotonic() - last_status >= status_every:
                last_status = time.monotonic()
                for f in pending:
                    i = futures[f]
                    if i in started:
                        echo(f"  ... {_progress_line(queue[i][1], queue[i][2])}")
    except KeyboardInterrupt:
        echo("interrupted: stopping the runs (each keeps its last checkpoint; rerun to resume)")
        procs.stopping = True  # first, so that no queued task starts a process
        pool.shutdown(wait=False, cancel_futures=True)
        procs.stop()
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)
    return failures
