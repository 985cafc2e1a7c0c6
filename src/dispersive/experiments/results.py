"""Collect a grid's runs into per-run records and per-arm statistics (the paper's tables).

Per arm and over seeds: mean and sample standard deviation (ddof = 1) of the metric, the
relative change of the mean against the baseline arm (paper Tables 2-5: ``(m - m_base) /
m_base``), and the *paired* difference over the seeds both arms share (same seed = same
initial weights, data order and noise): its mean, standard deviation, t-based 95% confidence
interval and the number of seeds where the arm is better. Only runs that reached the grid's step
budget enter the statistics; the others are counted as started but unfinished, or as not run yet.

A seed is a pair only when both runs trained on the same host in the same session (their
``host.json``, written by the runner): reruns of one seed on another host drift apart by as
much as the seed spread, so a cross-host "pair" is not one. Such seeds are left out of the
paired statistics and counted as unpaired; runs from before host recording are paired by seed
and flagged (``host_unknown``).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispersive.atomic import atomic_write
from dispersive.eval.metrics import EVAL_KEYS, METRIC_INFO
from dispersive.experiments.grid import Arm, Grid, RunSpec
from dispersive.train.rundir import DONE_FILE

__all__ = [
    "RunResult",
    "ArmStats",
    "collect",
    "arm_stats",
    "markdown_table",
    "pivot_table",
    "csv_text",
    "runs_csv_text",
    "fmt",
    "host_of",
    "metric_key",
    "pair_kind",
    "spec_text",
    "t_ci_halfwidth",
]


@dataclass
class RunResult:
    """What one run produced (read from its folder)."""

    run: RunSpec
    steps: int  # the grid's budget
    step: int  # steps reached
    finished: bool
    # Metric values at the final step: "proxy_fid", "proxy_acc" (in-training) and, per final
    # evaluation NAME, "fid:NAME", "is:NAME", "kid:NAME", "precision:NAME", "recall:NAME".
    values: dict[str, float] = field(default_factory=dict)
    specs: dict[str, dict] = field(default_factory=dict)  # "proxy" / NAME -> sampler spec
    notes: dict[str, str] = field(default_factory=dict)  # "proxy" / NAME -> how it was measured
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, proxy_fid)
    acc_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, proxy_acc)
    final: dict[str, Any] = field(default_factory=dict)  # last logged training record
    wall_time_s: float | None = None
    host: str | None = None  # host key (host_of); None = not recorded, "mixed" = several
    sessions: frozenset[str] = frozenset()


def host_of(run_dir: Path) -> tuple[str | None, frozenset[str]]:
    """The host key and sessions a run trained in, from its ``host.json``.

    Returns ``(None, {})`` for a run without the file (trained before the runner recorded
    hosts), ``("mixed", sessions)`` for a run resumed on another kind of host.
    """
    from dispersive.experiments.runner import HOST_FILE, _read_json

    rec = _read_json(Path(run_dir) / HOST_FILE) or {}
    segs = [s for s in rec.get("segments", []) if isinstance(s, dict)]
    if not segs:
        return None, frozenset()
    keys = {str(s.get("key")) for s in segs}
    sessions = frozenset(str(s.get("session")) for s in segs)
    return (keys.pop() if len(keys) == 1 else "mixed"), sessions


def pair_kind(a: RunResult, b: RunResult) -> str:
    """How two runs of one seed compare: "pair" (same host and a shared session), "unknown"
    (a host not recorded: paired by seed, flagged) or "unpaired" (different hosts/sessions)."""
    if a.host is None or b.host is None:
        return "unknown"
    if a.host == b.host != "mixed" and a.sessions & b.sessions:
        return "pair"
    return "unpaired"


def t_ci_halfwidth(sd: float | None, n: int, level: float = 0.95) -> float | None:
    """Half-width of the two-sided t confidence interval of a mean: t_{n-1} * sd / sqrt(n)."""
    if sd is None or n < 2:
        return None
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)


@dataclass
class ArmStats:
    arm: Arm
    key: str  # the metric key these statistics are about
    values: dict[int, float]  # seed -> metric (finished runs)
    mean: float | None
    std: float | None
    rel_change: float | None  # vs baseline mean, in percent
    paired_mean: float | None  # mean over paired seeds of (arm - baseline)
    paired_std: float | None
    wins: int  # paired seeds where the arm is better
    shared: int  # paired seeds (same host and session, or host not recorded)
    unfinished: int  # runs not finished, whether started or not
    not_started: int  # of those, runs with no trained step on disk
    final_means: dict[str, float]  # mean of selected final training values
    acc_mean: float | None
    paired_ci: float | None = None  # half-width of the t-based 95% CI of paired_mean
    unpaired: int = 0  # seeds of both arms left out: trained on different hosts or sessions
    host_unknown: int = 0  # paired seeds whose host was not recorded (paired by seed only)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def metric_key(grid: Grid) -> str:
    """The key of the grid's headline metric in :attr:`RunResult.values`."""
    if grid.metric == "proxy_fid":
        return "proxy_fid"
    return f"fid:{grid.final_evals[0].name}"


HIGHER_IS_BETTER = tuple(k for k, m in METRIC_INFO.items() if m.higher_is_better)


def _higher_is_better(key: str) -> bool:
    return key.split(":")[0] in HIGHER_IS_BETTER


def collect(grid: Grid, steps: dict[str, int]) -> list[RunResult]:
    """Read every run's metrics.jsonl, done.json and final evaluations.

    Args:
        grid: the grid.
        steps: run name -> the step budget (``train.steps`` of its resolved config).
    """
    from dispersive.experiments.runner import _read_json, final_eval_file
    from dispersive.train.logging import read_metrics

    out = []
    for run in grid.runs:
        budget = steps[run.name]
        recs = read_metrics(run.run_dir)
        done = _read_json(run.run_dir / DONE_FILE) or {}
        reached = int(done.get("steps", max((int(r.get("step", 0)) for r in recs), default=0)))
        # Finished at this budget: done, or trained past it (another grid is extending it).
        res = RunResult(
            run, budget, reached, (bool(done) and reached >= budget) or reached > budget
        )
        res.wall_time_s = done.get("wall_time_s")
        res.host, res.sessions = host_of(run.run_dir)
        # A run that another grid trained further is read at this grid's budget.
        recs = [r for r in recs if int(r.get("step", 0)) <= budget]
        res.curve = [(int(r["step"]), r["proxy_fid"]) for r in recs if _finite(r.get("proxy_fid"))]
        res.acc_curve = [
            (int(r["step"]), r["proxy_acc"]) for r in recs if _finite(r.get("proxy_acc"))
        ]
        train_recs = [r for r in recs if "loss_diff" in r]
        res.final = train_recs[-1] if train_recs else {}
        proxy = [r for r in recs if _finite(r.get("proxy_fid"))]
        if res.finished and proxy and int(proxy[-1]["step"]) == budget:  # measured at the budget
            last = proxy[-1]
            res.values["proxy_fid"] = float(last["proxy_fid"])
            if _finite(last.get("proxy_acc")):
                res.values["proxy_acc"] = float(last["proxy_acc"])
            spec = dict(last.get("sampler_spec") or {})
            spec.setdefault("num", last.get("num_samples"))
            res.specs["proxy"] = spec
            res.notes["proxy"] = str(last.get("proxy_fid_note", ""))
        for fe in grid.final_evals:
            rec = _read_json(final_eval_file(run.run_dir, fe.name, budget))
            if rec is None or int(rec.get("checkpoint_step", -1)) != budget:
                continue
            for k in EVAL_KEYS:
                if _finite(rec.get(k)):
                    res.values[f"{k}:{fe.name}"] = float(rec[k])
            res.specs[fe.name] = dict(rec.get("sampler_spec") or {})
            res.notes[fe.name] = (
                f"{rec.get('features', '')} features, {rec.get('num_samples')} samples vs "
                f"{rec.get('num_ref')} reference"
            )
        out.append(res)
    return out


_FINAL_KEYS = ("loss_diff", "loss_disp", "floor_gap", "active_frac")


def arm_stats(grid: Grid, results: list[RunResult], key: str | None = None) -> list[ArmStats]:
    """Per-arm statistics of one metric over seeds, in the grid's arm order.

    Args:
        grid: the grid.
        results: from :func:`collect`.
        key: the metric (default: the grid's headline metric, :func:`metric_key`).
    """
    key = key or metric_key(grid)
    sign = -1.0 if _higher_is_better(key) else 1.0
    by_arm: dict[str, list[RunResult]] = {}
    for r in results:
        by_arm.setdefault(r.run.arm.name, []).append(r)

    def values(name: str) -> dict[int, float]:
        return {r.run.seed: r.values[key] for r in by_arm.get(name, [])
                if r.finished and key in r.values}  # fmt: skip

    def run_of(name: str) -> dict[int, RunResult]:
        return {r.run.seed: r for r in by_arm.get(name, [])}

    stats = []
    for arm in grid.arms:
        ref = arm.baseline or grid.baseline
        base = values(ref) if ref and ref != arm.name else {}
        base_mean = statistics.fmean(base.values()) if base else None
        vals = values(arm.name)
        runs = by_arm.get(arm.name, [])
        mean = statistics.fmean(vals.values()) if vals else None
        std = statistics.stdev(vals.values()) if len(vals) > 1 else None
        rel = None
        if mean is not None and base_mean:
            rel = 100.0 * (mean - base_mean) / base_mean
        common = sorted(set(vals) & set(base))
        mine, theirs = run_of(arm.name), run_of(ref) if base else {}
        kinds = {s: pair_kind(mine[s], theirs[s]) for s in common}
        shared = [s for s in common if kinds[s] != "unpaired"]
        diffs = [vals[s] - base[s] for s in shared]
        paired_std = statistics.stdev(diffs) if len(diffs) > 1 else None
        finals: dict[str, float] = {}
        for k in _FINAL_KEYS:
            xs = [r.final[k] for r in runs if r.finished and _finite(r.final.get(k))]
            if xs:
                finals[k] = statistics.fmean(xs)
        accs = [r.values["proxy_acc"] for r in runs if r.finished and "proxy_acc" in r.values]
        stats.append(
            ArmStats(
                arm=arm, key=key, values=vals, mean=mean, std=std, rel_change=rel,
                paired_mean=statistics.fmean(diffs) if diffs else None,
                paired_std=paired_std, paired_ci=t_ci_halfwidth(paired_std, len(diffs)),
                unpaired=len(common) - len(shared),
                host_unknown=sum(kinds[s] == "unknown" for s in shared),
                wins=sum(sign * d < 0 for d in diffs), shared=len(shared),
                unfinished=sum(not r.finished for r in runs),
                not_started=sum(not r.finished and r.step == 0 for r in runs), final_means=finals,
                acc_mean=statistics.fmean(accs) if accs else None,
            )
        )  # fmt: skip
    return stats


def fmt(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _pending(started: int, not_started: int) -> str:
    """The seeds column's note on runs without a value: " (+1 unfinished, +2 not run)"."""
    parts = []
    if started:
        parts.append(f"+{started} unfinished")
    if not_started:
        parts.append(f"+{not_started} not run")
    return f" ({', '.join(parts)})" if parts else ""


def _settings(arm: Arm, common_keys: set[str]) -> str:
    items = [f"{k.split('.', 1)[1]}={v}" for k, v in arm.overrides.items()]
    return ", ".join(items) if items else "(base config)"


def _is_infonce_l2(grid: Grid, arm: Arm) -> bool:
    """Whether the arm trains InfoNCE-l2 or no term (the baseline): the logged floor gap is that
    statistic's distance to -log B, which means nothing for the other variants."""
    items = {**grid.common, **arm.overrides}
    return items.get("dispersive.weight", 0) == 0 or (
        items.get("dispersive.variant", "infonce_l2") == "infonce_l2"
        and not items.get("dispersive.contrastive", False)
    )


def markdown_table(grid: Grid, stats: list[ArmStats], *, metric_label: str) -> str:
    """The results table: one row per arm (mean ± std over seeds, change vs baseline)."""
    has_acc = any(s.acc_mean is not None for s in stats)
    head = [
        "arm",
        "settings",
        f"{metric_label} (mean ± SD)",
        "Δ vs baseline",
        "paired Δ ± SD [95% CI] (better/pairs)",
        "seeds",
        "loss_diff",
        "floor gap",
    ]
    if has_acc:
        head.insert(6, "class acc.")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    common = set(grid.common)
    for s in stats:
        is_base = s.arm.name == grid.baseline
        name = f"**{s.arm.name}**" if is_base else s.arm.name
        value = "–" if s.mean is None else f"{s.mean:.2f} ± {fmt(s.std)}"
        rel = (
            "(baseline)" if is_base else ("–" if s.rel_change is None else f"{s.rel_change:+.1f}%")
        )
        paired = "–"
        if s.paired_mean is not None:
            ci = ""
            if s.paired_ci is not None:
                lo, hi = s.paired_mean - s.paired_ci, s.paired_mean + s.paired_ci
                ci = f" [{lo:+.2f}, {hi:+.2f}]"
            paired = f"{s.paired_mean:+.2f} ± {fmt(s.paired_std)}{ci} ({s.wins}/{s.shared})"
            if s.host_unknown:
                paired += " †"
        if s.unpaired:
            paired += f" ({s.unpaired} unpaired: other host/session)"
        seeds = f"{len(s.values)}" + _pending(s.unfinished - s.not_started, s.not_started)
        row = [
            name,
            _settings(s.arm, common),
            value,
            rel,
            paired,
            seeds,
            fmt(s.final_means.get("loss_diff"), 4),
            fmt(s.final_means.get("floor_gap"), 3) if _is_infonce_l2(grid, s.arm) else "n/a",
        ]
        if has_acc:
            row.insert(6, "–" if s.acc_mean is None else f"{100 * s.acc_mean:.1f}%")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def pivot_table(grid: Grid, stats: list[ArmStats]) -> str:
    """For a grid with exactly two axes: rows = first axis, columns = second (paper Table 4)."""
    if len(grid.axes) != 2:
        return ""
    k1, k2 = list(grid.axes)
    cell: dict[tuple[Any, Any], ArmStats] = {}
    for s in stats:
        if k1 in s.arm.overrides and k2 in s.arm.overrides and set(s.arm.overrides) == {k1, k2}:
            cell[(s.arm.overrides[k1], s.arm.overrides[k2])] = s
    n1, n2 = k1.split(".")[-1], k2.split(".")[-1]
    lines = [
        f"| {n1} \\ {n2} | " + " | ".join(str(v) for v in grid.axes[k2]) + " |",
        "|---|" + "---|" * len(grid.axes[k2]),
    ]
    for v1 in grid.axes[k1]:
        row = []
        for v2 in grid.axes[k2]:
            s = cell.get((v1, v2))
            if s is None or s.mean is None:
                row.append("–")
            else:
                rel = "" if s.rel_change is None else f" ({s.rel_change:+.1f}%)"
                row.append(f"{s.mean:.2f} ± {fmt(s.std)}{rel}")
        lines.append(f"| {v1} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def csv_text(grid: Grid, stats: list[ArmStats], spec: dict[str, Any]) -> str:
    """Per-arm results as CSV, each row with the sampler spec that produced the numbers."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "arm",
            "settings",
            "metric",
            "mean",
            "std",
            "n",
            "rel_change_pct",
            "paired_mean",
            "paired_std",
            "paired_better",
            "paired_n",
            "paired_ci95_halfwidth",
            "unpaired",
            "paired_host_unknown",
            "class_acc",
            "loss_diff",
            "floor_gap",
            "values",
            "sampler_spec",
        ]
    )
    for s in stats:
        w.writerow(
            [
                s.arm.name,
                _settings(s.arm, set()),
                grid.metric,
                s.mean,
                s.std,
                len(s.values),
                s.rel_change,
                s.paired_mean,
                s.paired_std,
                s.wins,
                s.shared,
                s.paired_ci,
                s.unpaired,
                s.host_unknown,
                s.acc_mean,
                s.final_means.get("loss_diff"),
                s.final_means.get("floor_gap"),
                " ".join(f"s{k}:{v:.4f}" for k, v in sorted(s.values.items())),
                _spec_text(spec),
            ]
        )
    return buf.getvalue()


def runs_csv_text(grid: Grid, results: list[RunResult]) -> str:
    """One row per run: seed, state, every metric, the sampler specs, final training values."""
    keys = sorted({k for r in results for k in r.values})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", "arm", "seed", "step", "steps", "finished", *keys, *_FINAL_KEYS,
                "wall_time_s", "host", "sessions", "sampler_specs", "run_dir"])  # fmt: skip
    for r in results:
        specs = " | ".join(f"{n}: {_spec_text(s)}" for n, s in r.specs.items())
        w.writerow([r.run.name, r.run.arm.name, r.run.seed, r.step, r.steps, r.finished,
                    *(r.values.get(k) for k in keys), *(r.final.get(k) for k in _FINAL_KEYS),
                    r.wall_time_s, r.host or "not recorded", " ".join(sorted(r.sessions)),
                    specs, str(r.run.run_dir)])  # fmt: skip
    return buf.getvalue()


def _spec_text(spec: dict[str, Any]) -> str:
    keys = "model method steps nfe cfg_scale cfg_interval cfg_channels seed num".split()
    return "; ".join(f"{k}={spec[k]}" for k in keys if spec.get(k) is not None)


def spec_text(spec: dict[str, Any]) -> str:
    """A one-line sampler spec: ``method=heun; steps=25; nfe=49; cfg_scale=1.0; ...``."""
    return _spec_text(spec)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, text)
