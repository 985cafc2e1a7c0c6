"""The experiment report: ``EXP_DIR/report.md`` with the results table, figures and provenance.

Files written to the experiment folder:

- ``report.md``: what ran (base config, grid, exact command), the results table (mean ± std over
  seeds, relative and paired change against the baseline), a λ x τ pivot for two-axis grids,
  the figures, and one row per run; every number with the sampler spec that produced it;
- ``results.csv`` (per arm) and ``runs.csv`` (per run);
- ``curves.png`` (metric during training, paper Fig. 2), ``accuracy.png`` (the domain
  classifier's agreement with the conditioning class), ``norms.png`` (block norms, Fig. 3),
  ``samples.png`` (one sample grid per arm, Fig. 5).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dispersive.eval.metrics import EVAL_KEYS, METRIC_INFO
from dispersive.experiments.grid import Grid, toml_literal
from dispersive.experiments.plots import plot_block_norms, plot_curves, plot_samples
from dispersive.experiments.results import (
    RunResult,
    arm_stats,
    collect,
    csv_text,
    fmt,
    markdown_table,
    metric_key,
    pivot_table,
    runs_csv_text,
    spec_text,
    write_text,
)

__all__ = ["write_report"]


def _common_spec(results: list[RunResult], spec_name: str) -> dict[str, Any]:
    """The sampler spec shared by the runs' metric values (keys that differ are dropped)."""
    specs = [r.specs[spec_name] for r in results if r.specs.get(spec_name)]
    if not specs:
        return {}
    out = dict(specs[0])
    for s in specs[1:]:
        for k in list(out):
            if s.get(k) != out[k]:
                out.pop(k)
    return out


def _config_summary(config: Any) -> str:
    m, tr, o, s, obj = config.model, config.train, config.optim, config.sample, config.objective
    ov = f" {dict(m.overrides)}" if m.overrides else ""
    return (
        f"{m.name}{ov} on {config.data.name} ({m.in_channels}x{m.input_size}x{m.input_size}, "
        f"{m.num_classes} classes); {obj.kind} objective ({obj.path} path, "
        f"t {obj.t_dist}); {tr.steps} steps at global batch {tr.global_batch}; AdamW "
        f"lr {o.lr:g} (warm-up {o.warmup_steps}), EMA {o.ema_decay}"
        f"{' with warm-up' if o.ema_warmup else ''}; {tr.precision}; sampler {s.sampler} "
        f"{s.steps} steps, guidance {s.cfg_scale:g}"
    )


def _shown(path: Path) -> str:
    """A path relative to the working directory when it lies below it (reports get committed)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_report(
    grid: Grid, configs: dict[str, Any], *, command: Sequence[str] | None = None
) -> Path:
    """Collect the runs, write tables, figures and ``report.md``; return the report's path."""
    exp = grid.exp_dir
    exp.mkdir(parents=True, exist_ok=True)
    steps = {name: config.train.steps for name, config in configs.items()}
    results = collect(grid, steps)
    key = metric_key(grid)
    stats = arm_stats(grid, results, key)
    spec_name = "proxy" if key == "proxy_fid" else key.split(":", 1)[1]
    spec = _common_spec(results, spec_name)
    label = _label(key)

    write_text(exp / "results.csv", csv_text(grid, stats, spec))
    write_text(exp / "runs.csv", runs_csv_text(grid, results))
    figs = {
        "curves": plot_curves(grid, results, exp / "curves.png"),
        "accuracy": plot_curves(
            grid,
            results,
            exp / "accuracy.png",
            key="acc_curve",
            ylabel="class agreement of samples (domain classifier)",
            log_y=False,
        ),
        "norms": plot_block_norms(grid, results, exp / "norms.png"),
        "samples": plot_samples(grid, results, exp / "samples.png"),
    }

    first = configs[grid.runs[0].name]
    n_done = sum(r.finished for r in results)
    cmd = (
        " ".join(shlex.quote(c) for c in command)
        if command
        else f"dispersive experiment {grid.path}"
    )
    common = ", ".join(f"`{k}={toml_literal(v)}`" for k, v in grid.common.items())
    lines = [f"# {grid.title}", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    lines += [
        f"- Grid: `{grid.path}` ({len(grid.arms)} arms x {len(grid.seeds)} seeds = "
        f"{len(grid.runs)} runs; {n_done} finished)",
        f"- Command: `{cmd}`",
        f"- Base config: `{_shown(grid.config)}`: {_config_summary(first)}",
        f"- Common overrides: {common or 'none'}"
        + (
            f"; command line: {', '.join(f'`{o}`' for o in grid.extra_overrides)}"
            if grid.extra_overrides
            else ""
        ),
        f"- Metric: {label} at the final step, EMA weights; {_metric_note(results, spec_name)}",
        f"- Sampler spec of every value: {spec_text(spec) or '(no finished runs yet)'}",
        "",
        "## Results",
        "",
        f"Mean ± sample SD (ddof 1) over seeds of {label}. Δ vs baseline is the relative change "
        "of the means (negative = better, as in the paper's tables); paired Δ is the mean ± SD "
        "over paired seeds of (arm − baseline) with the same seed, its t-based 95% confidence "
        "interval, and how many pairs the arm was better. A seed pairs only when both runs "
        "trained on the same host in the same session (`host.json`); other seeds are counted as "
        "unpaired, and † marks pairs of runs whose host was not recorded. loss_diff and the "
        "floor gap (the InfoNCE-l2 statistic + log B: 0 = pinned at the floor; n/a for the other "
        "variants) are the last logged training values, averaged over seeds.",
        "",
        markdown_table(grid, stats, metric_label=label),
        "",
    ]
    others = _other_metrics(grid, results, key)
    if others:
        lines += [
            "### Every final-evaluation metric",
            "",
            "Mean ± sample SD over seeds (relative change of the mean against the baseline).",
            "",
            others,
            "",
        ]
    pivot = pivot_table(grid, stats)
    if pivot:
        lines += [
            f"### {label} by {' x '.join(k.split('.')[-1] for k in grid.axes)}",
            "",
            pivot,
            "",
        ]
    captions = {
        "curves": "Metric during training (mean over seeds, ±1 std band; thin lines: seeds); "
        "paper Fig. 2.",
        "accuracy": "Share of samples the domain classifier assigns to their conditioning class.",
        "norms": "Mean l2 norm of each block's output on the last logged training batch; "
        "paper Fig. 3.",
        "samples": "Samples of the first seed of each arm, same noise and labels; paper Fig. 5.",
    }
    lines += ["## Figures", ""]
    for fig, p in figs.items():  # not `key`: that is the metric's, used again below
        if p is not None:
            lines += [f"![{fig}]({p.name})", "", captions[fig], ""]
    lines += [
        "## Runs",
        "",
        "| run | seed | step | value | class acc. | wall time | folder |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        acc, value = r.values.get("proxy_acc"), r.values.get(key)
        lines.append(
            f"| {r.run.arm.name} | {r.run.seed} | {r.step}/{r.steps} | "
            f"{'–' if value is None else f'{value:.2f}'} | "
            f"{'–' if acc is None else f'{100 * acc:.1f}%'} | "
            f"{'–' if r.wall_time_s is None else f'{r.wall_time_s / 60:.1f} min'} | "
            f"`{r.run.run_dir}` |"
        )
    lines += ["", "Tables as CSV: `results.csv` (per arm), `runs.csv` (per run).", ""]
    path = exp / "report.md"
    write_text(path, "\n".join(lines))
    return path


_LABELS = {k: f"{m.label} {'↑' if m.higher_is_better else '↓'}" for k, m in METRIC_INFO.items()}


def _label(key: str) -> str:
    name, _, ev = key.partition(":")
    base = _LABELS[name]
    return f"{base} ({ev})" if ev else base


def _metric_note(results: list[RunResult], spec_name: str) -> str:
    notes = {r.notes[spec_name] for r in results if r.notes.get(spec_name)}
    return "; ".join(sorted(notes)) or "(no value yet)"


def _other_metrics(grid: Grid, results: list[RunResult], main: str) -> str:
    """Mean ± std (relative change) per arm of every final-evaluation metric but the main one."""
    keys = [f"{m}:{fe.name}" for fe in grid.final_evals for m in EVAL_KEYS]
    keys = [k for k in keys if k != main and any(k in r.values for r in results)]
    if not keys:
        return ""
    cols = {k: {s.arm.name: s for s in arm_stats(grid, results, k)} for k in keys}
    lines = ["| arm | " + " | ".join(_label(k) for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for arm in grid.arms:
        cells = []
        for k in keys:
            st = cols[k][arm.name]
            if st.mean is None:
                cells.append("–")
                continue
            rel = "" if st.rel_change is None else f" ({st.rel_change:+.1f}%)"
            cells.append(f"{st.mean:.4g} ± {fmt(st.std, 3)}{rel}")
        lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
