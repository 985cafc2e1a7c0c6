"""Tables of docs/results.md that the grid reports do not make, from the runs' metrics.jsonl.

    python scripts/study_tables.py dispersion   # dispersion of the fmnist-variants arms
    python scripts/study_tables.py dispersion --grid blocks      # the fmnist-blocks arms
    python scripts/study_tables.py dispersion --grid lambda-tau  # the fmnist-lambda-tau arms
    python scripts/study_tables.py dispersion --steps 4000 12000 --runs DIR  # other steps
    python scripts/study_tables.py long         # baseline vs InfoNCE-l2 per step and seed
    python scripts/study_tables.py paired       # every arm against the baseline, seed by seed
    python scripts/study_tables.py norm-fid     # rank correlation of feature norm and proxy FID

"mean dist" and "active pairs" are logged on the run's first loss layer at the run's tau (the
baseline: blocks.0, tau 0.5).

Runs are found in runs/experiments/fmnist-runs (or --runs DIR) by their config.toml.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from dispersive.train.logging import read_metrics

VARIANT_NAMES = {
    "infonce_l2": "InfoNCE l2",
    "infonce_cosine": "InfoNCE cosine",
    "hinge": "Hinge",
    "covariance": "Covariance",
}


def _dispersive(run_dir: Path) -> dict | None:
    """The run's [dispersive] table; None for the baseline's stand-ins (contrastive runs)."""
    d = tomllib.loads((run_dir / "config.toml").read_text())["dispersive"]
    return None if d.get("contrastive") else d


def _is_baseline(d: dict) -> bool:
    return d["weight"] == 0 and d["layers"] == ["blocks.0"] and d["tau"] == 0.5


def _arm(run_dir: Path) -> str | None:
    """The fmnist-variants arm a run belongs to (lambda 0.5, tau 0.5, blocks.0), else None."""
    d = _dispersive(run_dir)
    if d is None or d["layers"] != ["blocks.0"] or d["tau"] != 0.5:
        return None
    if d["weight"] == 0:
        return "baseline"
    return VARIANT_NAMES[d["variant"]] if d["weight"] == 0.5 else None


def _block_arm(run_dir: Path) -> str | None:
    """The fmnist-blocks arm (InfoNCE-l2, lambda 0.5, tau 0.5): the loss layers, else None."""
    d = _dispersive(run_dir)
    if d is None:
        return None
    if _is_baseline(d):
        return "baseline"
    if d["weight"] != 0.5 or d["tau"] != 0.5 or d["variant"] != "infonce_l2":
        return None
    return "all blocks" if len(d["layers"]) > 1 else d["layers"][0]


def _lambda_tau_arm(run_dir: Path) -> str | None:
    """The fmnist-lambda-tau arm (InfoNCE-l2 on blocks.0): "lambda=W tau=T", else None."""
    d = _dispersive(run_dir)
    if d is None or d["layers"] != ["blocks.0"]:
        return None
    if _is_baseline(d):
        return "baseline"
    return f"lambda={d['weight']} tau={d['tau']}" if d["variant"] == "infonce_l2" else None


GRIDS = {"variants": _arm, "blocks": _block_arm, "lambda-tau": _lambda_tau_arm}


def _run_dirs(runs: Path) -> list[Path]:
    return sorted(p for p in runs.iterdir() if (p / "config.toml").is_file())


def dispersion(runs: Path, steps=(100, 1000, 4000), grid: str = "variants") -> str:
    arm_of = GRIDS[grid]
    by_arm: dict[str, list[dict[int, dict]]] = {}
    for d in _run_dirs(runs):
        arm = arm_of(d)
        recs = {r["step"]: r for r in read_metrics(d) if "mean_dist" in r}
        if arm is not None and all(s in recs for s in steps):
            by_arm.setdefault(arm, []).append(recs)
    what = ("mean dist", "active pairs", "norm blocks.0")
    cols = [f"{w} @{s}" for w in what for s in steps]
    lines = [
        "| arm | seeds | " + " | ".join(cols) + f" | norm blocks.3 @{steps[-1]} |",
        "|---" * (len(cols) + 3) + "|",
    ]
    others = sorted(set(by_arm) - {"baseline"}, key=lambda a: (a == "all blocks", a))
    order = [*VARIANT_NAMES.values()] if grid == "variants" else others
    for arm in ["baseline", *order]:
        seeds = by_arm.get(arm, [])
        if not seeds:
            continue

        def mean(key: str, s: int, seeds=seeds) -> float:
            return sum(r[s][key] for r in seeds) / len(seeds)

        cells = [f"{mean('mean_dist', s):.2f}" for s in steps]
        cells += [f"{100 * mean('active_frac', s):.0f}%" for s in steps]
        cells += [f"{mean('rep_norm/blocks.0', s):.0f}" for s in steps]
        cells.append(f"{mean('rep_norm/blocks.3', steps[-1]):.0f}")
        lines.append(f"| {arm} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def long(runs: Path) -> str:
    """Proxy FID of the baseline and InfoNCE-l2 (lambda 0.5, tau 0.5) at every evaluated step,
    seed by seed, with the gap (InfoNCE-l2 - baseline; negative = better) and its mean over the
    seeds that have both arms at that step."""
    curves: dict[tuple[str, int], dict[int, float]] = {}
    for d in _run_dirs(runs):
        arm = _arm(d)
        if arm in ("baseline", "InfoNCE l2"):
            recs = [r for r in read_metrics(d) if "proxy_fid" in r]
            curves[arm, _seed(d)] = {int(r["step"]): float(r["proxy_fid"]) for r in recs}
    seeds = sorted({s for _, s in curves})
    head = [f"seed {s}: baseline / InfoNCE l2 (gap)" for s in seeds]
    lines = ["| step | " + " | ".join(head) + " | mean gap (seeds) |"]
    lines.append("|---" * (len(seeds) + 2) + "|")
    for step in sorted(set().union(*curves.values()) if curves else ()):
        cells, gaps = [], []
        for s in seeds:
            b = curves.get(("baseline", s), {}).get(step)
            x = curves.get(("InfoNCE l2", s), {}).get(step)
            cell = " / ".join(f"{v:.1f}" if v is not None else "–" for v in (b, x))
            if b is not None and x is not None:
                gaps.append(x - b)
                cell += f" ({x - b:+.1f})"
            cells.append(cell)
        mean = f"{sum(gaps) / len(gaps):+.1f} ({len(gaps)})" if gaps else "–"
        lines.append(f"| {step:,} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def _seed(run_dir: Path) -> int:
    """The seed of a run folder named by the experiment runner: HASH-sSEED."""
    return int(run_dir.name.rsplit("-s", 1)[1])


def _label(d: dict) -> str:
    layers = "all blocks" if len(d["layers"]) > 1 else d["layers"][0]
    return f"{VARIANT_NAMES[d['variant']]}, lambda={d['weight']}, tau={d['tau']}, {layers}"


def paired(runs: Path, step: int = 4000) -> str:
    """Every dispersive arm on disk against the baseline at the same seed, then pooled.

    A pair is (arm's proxy FID - baseline's) at ``step`` for one seed: same initial weights,
    data order and noise. The pooled rows count every pair of every arm of one variant, so
    they say how often the regulariser beat the baseline over the whole study.
    """
    values: dict[str, dict[int, float]] = {}
    for d in _run_dirs(runs):
        disp = _dispersive(d)
        if disp is None or (disp["weight"] == 0 and not _is_baseline(disp)):
            continue
        at = [r for r in read_metrics(d) if r.get("step") == step and "proxy_fid" in r]
        if at:
            arm = "baseline" if disp["weight"] == 0 else _label(disp)
            values.setdefault(arm, {})[_seed(d)] = float(at[-1]["proxy_fid"])
    base = values.pop("baseline", {})
    lines = [
        "| arm | seeds | paired Δ mean | min | max | better/seeds |",
        "|---|---|---|---|---|---|",
    ]
    pooled: dict[str, list[float]] = {}
    arms_of: dict[str, int] = {}

    def row(name: str, diffs: list[float]) -> str:
        better = sum(x < 0 for x in diffs)
        return (
            f"| {name} | {len(diffs)} | {sum(diffs) / len(diffs):+.2f} | {min(diffs):+.2f} "
            f"| {max(diffs):+.2f} | {better}/{len(diffs)} |"
        )

    for arm, vals in sorted(values.items()):
        diffs = [v - base[s] for s, v in sorted(vals.items()) if s in base]
        if diffs:
            variant = arm.split(",")[0]
            pooled.setdefault(variant, []).extend(diffs)
            arms_of[variant] = arms_of.get(variant, 0) + 1
            lines.append(row(arm, diffs))
    for variant, diffs in pooled.items():
        if arms_of[variant] > 1:  # one arm: its own row says it all
            lines.append(row(f"**all {arms_of[variant]} {variant} arms (pooled)**", diffs))
    return "\n".join(lines)


def norm_fid(runs: Path, step: int = 4000, block: str = "blocks.0") -> str:
    """Spearman rank correlation of a block's output norm and the proxy FID at ``step``.

    Over all runs of the dispersive and baseline arms, and over the InfoNCE-l2 arms alone:
    does a run that inflated its features more also sample worse?
    """
    from scipy.stats import spearmanr

    pts: dict[str, list[tuple[float, float]]] = {"all runs": [], "InfoNCE-l2 arms": []}
    for d in _run_dirs(runs):
        disp = _dispersive(d)
        recs = [r for r in read_metrics(d) if r.get("step") == step]
        fid = [r["proxy_fid"] for r in recs if "proxy_fid" in r]
        norm = [r[f"rep_norm/{block}"] for r in recs if f"rep_norm/{block}" in r]
        if disp is None or not fid or not norm:
            continue
        pts["all runs"].append((norm[-1], fid[-1]))
        if disp["variant"] == "infonce_l2" and disp["weight"] > 0:
            pts["InfoNCE-l2 arms"].append((norm[-1], fid[-1]))
    lines = [
        f"| runs | n | Spearman rho (norm {block}, proxy FID) @{step} | p |",
        "|---|---|---|---|",
    ]
    for name, xy in pts.items():
        if len(xy) > 2:
            rho, p = spearmanr([x for x, _ in xy], [y for _, y in xy])
            lines.append(f"| {name} | {len(xy)} | {rho:+.2f} | {p:.2g} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", choices=["dispersion", "long", "paired", "norm-fid"])
    p.add_argument("--runs", type=Path, default=Path("runs/experiments/fmnist-runs"))
    p.add_argument("--grid", choices=sorted(GRIDS), default="variants", help="dispersion only")
    p.add_argument(
        "--steps", type=int, nargs="+", default=[100, 1000, 4000],
        help="dispersion only: the logged steps to show (runs that lack one are left out)",
    )  # fmt: skip
    args = p.parse_args()
    if args.table == "dispersion":
        print(dispersion(args.runs, steps=tuple(args.steps), grid=args.grid))
    else:
        tables = {"long": long, "paired": paired, "norm-fid": norm_fid}
        print(tables[args.table](args.runs))


if __name__ == "__main__":
    main()
