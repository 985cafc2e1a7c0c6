"""Figures of an experiment: metric curves (paper Fig. 2), block norms (Fig. 3), samples (Fig. 5).

matplotlib (the ``eval`` extra) with the non-interactive Agg backend; every function writes one
PNG and returns its path, or None when there is nothing to draw.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from dispersive.experiments.grid import Grid
from dispersive.experiments.results import RunResult

__all__ = ["plot_curves", "plot_block_norms", "plot_samples"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _finish(fig, ax, title: str, path: Path) -> Path:
    import textwrap

    # Grid titles are sentences: wrap them rather than letting the figure cut them off.
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path


def _mean_curve(
    curves: list[list[tuple[int, float]]],
) -> tuple[list[int], list[float], list[float]]:
    """Mean and spread over seeds at the steps every seed has."""
    common = set.intersection(*(set(s for s, _ in c) for c in curves)) if curves else set()
    steps = sorted(common)
    mean, spread = [], []
    for s in steps:
        vals = [dict(c)[s] for c in curves]
        mean.append(statistics.fmean(vals))
        spread.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return steps, mean, spread


def plot_curves(
    grid: Grid,
    results: list[RunResult],
    path: Path,
    *,
    key: str = "curve",
    ylabel: str = "proxy FID (domain features)",
    log_y: bool = True,
) -> Path | None:
    """The metric against training steps: mean over seeds with a ±1 std band, thin seed lines."""
    by_arm: dict[str, list[RunResult]] = {}
    for r in results:
        if getattr(r, key):
            by_arm.setdefault(r.run.arm.name, []).append(r)
    if not by_arm:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for color, arm in zip(_colors(len(grid.arms)), grid.arms):
        runs = by_arm.get(arm.name)
        if not runs:
            continue
        for r in runs:
            s, v = zip(*getattr(r, key))
            ax.plot(s, v, color=color, alpha=0.25, lw=0.8)
        steps, mean, spread = _mean_curve([getattr(r, key) for r in runs])
        if steps:
            m, sd = np.array(mean), np.array(spread)
            lw = 2.4 if arm.name == grid.baseline else 1.6
            ax.plot(steps, m, color=color, lw=lw, label=f"{arm.name} (n={len(runs)})")
            ax.fill_between(steps, m - sd, m + sd, color=color, alpha=0.12, lw=0)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, f"{grid.title}: {ylabel} during training (EMA weights)", path)


def plot_block_norms(grid: Grid, results: list[RunResult], path: Path) -> Path | None:
    """Mean l2 norm of every block's output at the end of training, per arm (paper Fig. 3)."""
    by_arm: dict[str, list[dict[str, float]]] = {}
    blocks: list[str] = []
    for r in results:
        norms = {k[len("rep_norm/") :]: v for k, v in r.final.items() if k.startswith("rep_norm/")}
        if norms and r.finished:
            by_arm.setdefault(r.run.arm.name, []).append(norms)
            blocks = blocks or list(norms)
    if not by_arm:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.0), dpi=110)
    x = np.arange(len(blocks))
    for color, arm in zip(_colors(len(grid.arms)), grid.arms):
        rows = by_arm.get(arm.name)
        if not rows:
            continue
        m = [statistics.fmean(r[b] for r in rows if b in r) for b in blocks]
        lw = 2.4 if arm.name == grid.baseline else 1.4
        ax.plot(x, m, marker="o", ms=3, color=color, lw=lw, label=arm.name)
    ax.set_xticks(x, [b.replace("blocks.", "") for b in blocks], fontsize=7, rotation=90)
    ax.set_xlabel("block")
    ax.set_ylabel("mean l2 norm of the block output")
    ax.set_yscale("log")
    title = f"{grid.title}: representation norm per block (training batch, last log)"
    return _finish(fig, ax, title, path)


def plot_samples(
    grid: Grid, results: list[RunResult], path: Path, *, per_arm: int = 32
) -> Path | None:
    """One panel of samples per arm (its first finished seed), same seed and labels in all."""
    from dispersive.eval.io import load_npz, make_grid

    panels = []
    for arm in grid.arms:
        runs = [r for r in results if r.run.arm.name == arm.name and r.finished]
        for r in sorted(runs, key=lambda r: r.run.seed):
            f = r.run.run_dir / "samples" / "samples.npz"
            if f.is_file():
                panels.append((f"{arm.name} (seed {r.run.seed})", load_npz(f)[:per_arm]))
                break
    if not panels:
        return None
    plt = _plt()
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, imgs) in zip(axes.flat, panels):
        g = make_grid(imgs, nrow=8)
        ax.imshow(g.squeeze(-1) if g.shape[-1] == 1 else g, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
