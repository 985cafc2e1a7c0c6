"""Tables of docs/results.md that the grid reports do not make, from the runs' metrics.jsonl.

    python scripts/study_tables.py dispersion   # dispersion of the fmnist-variants arms
    python scripts/study_tables.py dispersion --grid blocks      # the fmnist-blocks arms
    python scripts/study_tables.py dispersion --grid lambda-tau  # the fmnist-lambda-tau arms
    python scripts/study_tables.py dispersion --steps 4000 12000 --runs DIR  # other steps
    python scripts/study_tables.py long         # baseline vs InfoNCE-l2 per step and seed
    python scripts/study_tables.py paired       # every arm against the baseline, seed by seed
    python scripts/study_tables.py norm-fid     # rank correlation of feature norm and proxy FID
    python scripts/study_tables.py power        # seeds per arm for a 95% CI within +-5%
    python scripts/study_tables.py paired --final 5k --metric kid  # a final evaluation's KID
    python scripts/study_tables.py paired --seeds 6 7 8 9  # only some seeds (a host's block)
    python scripts/study_tables.py noise        # evaluation noise of the proxy FID (real images)
    python scripts/study_tables.py all          # every table of docs/results.md, from results/

"mean dist" and "active pairs" are logged on the run's first loss layer at the run's tau (the
baseline: blocks.0, tau 0.5).

Runs are found in runs/experiments/fmnist-runs (or --runs DIR) by their config.toml.
"""

from __future__ import annotations

import argparse
import json
import math
import tomllib
from pathlib import Path
from statistics import median

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


def _any_arm(run_dir: Path) -> str | None:
    """Any grid's arm (the screen's): "baseline" or the arm's settings (``_label``)."""
    d = _dispersive(run_dir)
    if d is None:
        return None
    return "baseline" if d["weight"] == 0 else _label(d)


GRIDS = {
    "variants": _arm,
    "blocks": _block_arm,
    "lambda-tau": _lambda_tau_arm,
    "screen": _any_arm,
}


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
    # The model's last block (blocks.3 of SiT-XS/4, blocks.5 of SiT-T/4): the highest logged.
    logged = {k for runs_ in by_arm.values() for r in runs_ for k in r[steps[-1]]}
    blocks = [int(k.rsplit(".", 1)[1]) for k in logged if k.startswith("rep_norm/blocks.")]
    last = f"blocks.{max(blocks, default=3)}"
    lines = [
        "| arm | seeds | " + " | ".join(cols) + f" | norm {last} @{steps[-1]} |",
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
        cells.append(f"{mean(f'rep_norm/{last}', steps[-1]):.0f}")
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
    extra = ", no diagonal" if d.get("include_diagonal", True) is False else ""
    if d["variant"] == "hinge" and d.get("margin", 1.0) != 1.0:
        extra += f", margin={d['margin']}"
    return f"{VARIANT_NAMES[d['variant']]}, lambda={d['weight']}, tau={d['tau']}, {layers}{extra}"


def _value(run_dir: Path, step: int, final: str | None, metric: str = "fid") -> float | None:
    """The run's Fréchet distance at ``step``: the logged proxy FID (1,000 samples), or with
    ``final`` the final evaluation of that name (``final_eval/NAME-stepSTEP.json``, e.g. the
    5,000-sample "5k" of the later grids), whose ``metric`` ("fid" or "kid", x 1e3) it reads."""
    if final is not None:
        path = run_dir / "final_eval" / f"{final}-step{step}.json"
        return float(json.loads(path.read_text())[metric]) if path.is_file() else None
    if metric != "fid":
        raise ValueError(f"metric {metric!r} exists only in final evaluations: pass final=NAME")
    at = [r for r in read_metrics(run_dir) if r.get("step") == step and "proxy_fid" in r]
    return float(at[-1]["proxy_fid"]) if at else None


def _paired_values(
    runs: Path, step: int, final: str | None = None, metric: str = "fid", seeds=None
):
    """Proxy FID at ``step`` per seed: the baseline's, every dispersive arm's by label, and
    each run's host (``host_of``: key and sessions) by (label, seed); only ``seeds`` if given."""
    from types import SimpleNamespace

    from dispersive.experiments.results import host_of

    values: dict[str, dict[int, float]] = {}
    hosts: dict[tuple[str, int], SimpleNamespace] = {}
    for d in _run_dirs(runs):
        disp = _dispersive(d)
        if disp is None or (disp["weight"] == 0 and not _is_baseline(disp)):
            continue
        if seeds is not None and _seed(d) not in seeds:
            continue
        value = _value(d, step, final, metric)
        if value is not None:
            arm = "baseline" if disp["weight"] == 0 else _label(disp)
            values.setdefault(arm, {})[_seed(d)] = value
            host, sessions = host_of(d)
            hosts[arm, _seed(d)] = SimpleNamespace(host=host, sessions=sessions)
    return values.pop("baseline", {}), values, hosts


def t_ci(diffs: list[float], level: float = 0.95) -> tuple[float, float, float | None]:
    """Mean, sample SD (ddof 1) and the half-width of the t-based CI of the mean."""
    from dispersive.experiments.results import t_ci_halfwidth

    n = len(diffs)
    mean = sum(diffs) / n
    sd = (sum((x - mean) ** 2 for x in diffs) / (n - 1)) ** 0.5 if n > 1 else None
    return mean, sd or 0.0, t_ci_halfwidth(sd, n, level)


def sign_test(diffs: list[float]) -> float | None:
    """Exact two-sided sign test of "the median paired difference is 0": the binomial test of
    the count of negative differences among the non-zero ones, at p = 1/2 (ties dropped).
    Distribution-free: one far-out seed moves it no more than any other. None with no
    non-zero difference."""
    n = sum(x != 0 for x in diffs)
    if n == 0:
        return None
    k = min(sum(x < 0 for x in diffs), sum(x > 0 for x in diffs))
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired(
    runs: Path, step: int = 4000, final: str | None = None, metric: str = "fid", seeds=None
) -> str:
    """Every dispersive arm on disk against the baseline at the same seed, then pooled.

    A pair is (arm's proxy FID - baseline's) at ``step`` for one seed: same initial weights,
    data order and noise. Per arm: mean, sample SD (ddof 1), t-based 95% CI, range and how
    many pairs the arm was better. A pair counts as one only if both runs recorded the same
    host and session (``host.json``); runs from before host recording are shown as "not
    recorded". The pooled rows share the baseline runs between arms, so their pairs are not
    independent: they count, without a CI. Then each arm's CI at the Bonferroni level
    1 - 0.05 / k for the k arms compared with the one baseline (all k intervals hold together
    with at least 95% confidence), and two figures that one far-out seed cannot carry: the
    median difference and the exact two-sided sign test's p-value (:func:`sign_test`).
    """
    from dispersive.experiments.results import pair_kind

    base, values, hosts = _paired_values(runs, step, final, metric, seeds)
    rows = []  # (arm, diffs, seeds, kinds)
    for arm, vals in sorted(values.items()):
        kinds = {s: pair_kind(hosts[arm, s], hosts["baseline", s]) for s in vals if s in base}
        seeds = [s for s, k in kinds.items() if k != "unpaired"]
        diffs = [vals[s] - base[s] for s in seeds]
        if diffs:
            rows.append((arm, diffs, seeds, kinds))
    k = len(rows)
    lines = [
        "| arm | pairs | paired Δ mean | SD (ddof 1) | 95% CI (t) | min | max | better/pairs "
        f"| host | {100 - 5 / max(k, 1):.3g}% CI (Bonferroni, {k} arms) | median "
        "| sign test p (exact, two-sided) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pooled: dict[str, list[float]] = {}
    arms_of: dict[str, int] = {}
    for arm, diffs, seeds, kinds in rows:
        variant = arm.split(",")[0]
        pooled.setdefault(variant, []).extend(diffs)
        arms_of[variant] = arms_of.get(variant, 0) + 1
        mean, sd, ci = t_ci(diffs)
        interval = "–" if ci is None else f"[{mean - ci:+.2f}, {mean + ci:+.2f}]"
        ci_k = t_ci(diffs, 1 - 0.05 / k)[2]
        family = "–" if ci_k is None else f"[{mean - ci_k:+.2f}, {mean + ci_k:+.2f}]"
        unknown = sum(kinds[s] == "unknown" for s in seeds)
        unpaired = len(kinds) - len(seeds)
        host = "not recorded" if unknown == len(seeds) else f"same ({len(seeds) - unknown})"
        if unpaired:
            host += f"; {unpaired} unpaired (other host/session)"
        p = sign_test(diffs)
        lines.append(
            f"| {arm} | {len(diffs)} | {mean:+.2f} | {sd:.2f} | {interval} | {min(diffs):+.2f} "
            f"| {max(diffs):+.2f} | {sum(x < 0 for x in diffs)}/{len(diffs)} | {host} "
            f"| {family} | {median(diffs):+.2f} | {'–' if p is None else f'{p:.3g}'} |"
        )
    for variant, diffs in pooled.items():
        if arms_of[variant] > 1:  # one arm: its own row says it all
            mean = sum(diffs) / len(diffs)
            lines.append(
                f"| **all {arms_of[variant]} {variant} arms (pooled; pairs share baseline "
                f"runs, not independent)** | {len(diffs)} | {mean:+.2f} | – | – "
                f"| {min(diffs):+.2f} | {max(diffs):+.2f} | {sum(x < 0 for x in diffs)}/"
                f"{len(diffs)} | – | – | {median(diffs):+.2f} | – |"
            )
    return "\n".join(lines)


def seeds_needed(sd: float, target: float, level: float = 0.95, n_max: int = 1000) -> int:
    """The smallest n >= 2 whose t-based CI half-width t_{n-1} * sd / sqrt(n) is <= target."""
    from scipy.stats import t

    for n in range(2, n_max + 1):
        if t.ppf(0.5 + level / 2, n - 1) * sd / n**0.5 <= target:
            return n
    return n_max


def power(
    runs: Path,
    step: int = 4000,
    rel: float = 0.05,
    final: str | None = None,
    metric: str = "fid",
    seeds=None,
) -> str:
    """Seeds per arm for a 95% CI of the paired difference within +-rel of the baseline mean.

    From the measured paired differences of every arm (sample SD, ddof 1) and, pooled over arms
    (variances averaged with their degrees of freedom), for the InfoNCE-l2 arms and all arms;
    plus the unpaired design (two independent means) from the pooled SD of the arms' values.
    """
    from scipy.stats import t

    base, values, _ = _paired_values(runs, step, final, metric, seeds)
    bmean = sum(base.values()) / len(base)
    target = rel * bmean
    lines = [
        f"Baseline mean {bmean:.2f} (n = {len(base)}): target 95% CI half-width {target:.2f} "
        f"(±{100 * rel:.0f}%).",
        "",
        "| arm | pairs | SD of paired Δ | 95% CI half-width now | seeds needed |",
        "|---|---|---|---|---|",
    ]
    pools: dict[str, list[tuple[int, float]]] = {"InfoNCE l2": [], "all": []}
    for arm, vals in sorted(values.items()):
        diffs = [vals[s] - base[s] for s in sorted(vals) if s in base]
        if len(diffs) < 2:
            continue
        _, sd, ci = t_ci(diffs)
        pools["all"].append((len(diffs) - 1, sd))
        if arm.startswith("InfoNCE l2"):
            pools["InfoNCE l2"].append((len(diffs) - 1, sd))
        lines.append(
            f"| {arm} | {len(diffs)} | {sd:.2f} | ±{ci:.2f} | {seeds_needed(sd, target)} |"
        )
    for name, items in pools.items():
        df = sum(k for k, _ in items)
        if df == 0:  # no arm of the pool with two pairs yet: nothing to pool
            continue
        sd = (sum(k * v * v for k, v in items) / df) ** 0.5
        lines.append(
            f"| **pooled over {'the InfoNCE-l2' if name != 'all' else 'all'} arms** (df {df}) "
            f"| – | {sd:.2f} | – | {seeds_needed(sd, target)} |"
        )
    # Unpaired: difference of two means with n runs each, pooled SD of single runs.
    arms = [base, *values.values()]
    df = sum(len(v) - 1 for v in arms if len(v) > 1)
    var = sum(
        sum((x - sum(v.values()) / len(v)) ** 2 for x in v.values()) for v in arms if len(v) > 1
    )
    if df == 0:
        lines += ["", "Unpaired (two independent means): needs two runs of some arm; none yet."]
        return "\n".join(lines)
    sd1 = (var / df) ** 0.5
    n_unpaired = next(
        (n for n in range(2, 1001) if t.ppf(0.975, 2 * n - 2) * sd1 * (2 / n) ** 0.5 <= target),
        None,
    )
    lines += [
        "",
        f"Unpaired (two independent means, n runs each): pooled SD of one run {sd1:.2f} "
        f"(df {df}), {n_unpaired or 'more than 1,000'} seeds per arm.",
    ]
    return "\n".join(lines)


def noise(sizes=(1000, 5000), repeats: int = 20, seed: int = 0, samples: Path | None = None) -> str:
    """Proxy FID of real held-out images (the Fashion-MNIST test set) against the training
    statistics, over ``repeats`` random subsets of each size: the metric's floor and its spread
    at the sample counts the study uses. Subsets of 5,000 of the 10,000 test images overlap, so
    their SD understates that of independent draws by about sqrt(1 - n / 10000).

    With ``samples`` (a sample file of a trained model, e.g. ``dispersive sample --num-samples
    10000``), the same over random subsets of that fixed sample set: the spread of one model's
    evaluation at each sample count."""
    import numpy as np
    import torch

    from dispersive.data.datasets import load_fashion_mnist
    from dispersive.eval.features import ASSETS_DIR, REF_STATS_FILE, get_extractor
    from dispersive.eval.metrics import (
        feature_statistics,
        frechet_distance,
        kernel_inception_distance,
        load_statistics,
    )

    train, _ = load_fashion_mnist(None, train=True)
    ext = get_extractor("fashion-mnist")
    f_train, _ = ext(train[..., None])
    ref = load_statistics(ASSETS_DIR / REF_STATS_FILE)
    rng = np.random.default_rng(seed)
    lines = [
        "| images | subsets | FD mean | FD sample SD (ddof 1) | KID mean | KID sample SD |",
        "|---|---|---|---|---|---|",
    ]
    test, _ = load_fashion_mnist(None, train=False)
    f_test, _ = ext(test[..., None])
    full = feature_statistics(f_test)
    fd_full = frechet_distance(full.mu, full.sigma, ref.mu, ref.sigma)

    def subsets(feats: torch.Tensor, n: int) -> tuple[list[float], list[float]]:
        # FD and KID of `repeats` random subsets of n rows of feats (the shared rng, in order).
        fds, kids = [], []
        for _ in range(repeats):
            idx = torch.from_numpy(rng.choice(len(feats), n, replace=False))
            st = feature_statistics(feats[idx])
            fds.append(frechet_distance(st.mu, st.sigma, ref.mu, ref.sigma))
            kids.append(kernel_inception_distance(f_train, feats[idx], seed=seed)[0])
        return fds, kids

    for n in sizes if samples is None else ():  # real images once; then the sample set alone
        fds, kids = subsets(f_test, n)
        lines.append(
            f"| {n:,} test images | {repeats} | {np.mean(fds):.3f} | {np.std(fds, ddof=1):.3f} "
            f"| {np.mean(kids):.5f} | {np.std(kids, ddof=1):.5f} |"
        )
    if samples is None:
        lines.append(f"| all 10,000 test images | 1 | {fd_full:.3f} | – | – | – |")
    if samples is not None:
        from dispersive.eval.io import load_images

        f_gen, _ = ext(load_images(samples))
        st = feature_statistics(f_gen)
        fd = frechet_distance(st.mu, st.sigma, ref.mu, ref.sigma)
        kid = kernel_inception_distance(f_train, f_gen, seed=seed)[0]
        lines.append(
            f"| all {len(f_gen):,} samples ({samples}) | 1 | {fd:.3f} | – | {kid:.5f} | – |"
        )
        # Subsets smaller than the set (the set itself has no spread between subsets).
        for n in sorted({min(n, len(f_gen) // 2) for n in sizes}):
            fds, kids = subsets(f_gen, n)
            lines.append(
                f"| {n:,} of {len(f_gen):,} samples ({samples}) | {repeats} | {np.mean(fds):.3f} "
                f"| {np.std(fds, ddof=1):.3f} | {np.mean(kids):.5f} | {np.std(kids, ddof=1):.5f} |"
            )
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


# Every table of docs/results.md this script makes, in the page's order, with the arguments the
# page names (`all` prints them one after the other; tests check that every command on the page
# is here). The first pass's runs are read from results/ (the page's commands without --runs
# read the same runs restored to runs/experiments/fmnist-runs).
PAGE = (
    ("The answer: the confirmation, paired FD(5k) at step 4,000",
     "paired --runs results/fmnist-confirm-runs --step 4000 --final 5k"),
    ("The answer: the confirmation, paired KID(5k)",
     "paired --runs results/fmnist-confirm-runs --step 4000 --final 5k --metric kid"),
    ("The answer: the confirmation's dispersion",
     "dispersion --grid screen --steps 100 1000 4000 --runs results/fmnist-confirm-runs"),
    ("The answer: power from the confirmation",
     "power --runs results/fmnist-confirm-runs --step 4000 --final 5k"),
    ("The answer: the confirmation without seed 5 (the paper default's +41 run)",
     "paired --runs results/fmnist-confirm-runs --step 4000 --final 5k --seeds 0 1 2 3 4 6 7 8 9"),
    ("The answer: the confirmation on the AMD host (seeds 0-5)",
     "paired --runs results/fmnist-confirm-runs --step 4000 --final 5k --seeds 0 1 2 3 4 5"),
    ("The answer: the confirmation on the Intel host (seeds 6-9)",
     "paired --runs results/fmnist-confirm-runs --step 4000 --final 5k --seeds 6 7 8 9"),
    ("The larger model (SiT-T/4): paired FD(5k) at step 4,000",
     "paired --runs results/fmnist-larger-runs --step 4000 --final 5k"),
    ("The larger model (SiT-T/4): paired KID(5k)",
     "paired --runs results/fmnist-larger-runs --step 4000 --final 5k --metric kid"),
    ("The larger model (SiT-T/4): dispersion",
     "dispersion --grid screen --steps 100 1000 4000 --runs results/fmnist-larger-runs"),
    ("The larger model (SiT-T/4): power",
     "power --runs results/fmnist-larger-runs --step 4000 --final 5k"),
    ("The larger model (SiT-T/4) without seed 4 (the paper default's +10 run)",
     "paired --runs results/fmnist-larger-runs --step 4000 --final 5k --seeds 0 1 2 3"),
    ("The screen: paired FD(5k) at step 2,000",
     "paired --runs results/fmnist-screen-runs --step 2000 --final 5k"),
    ("The screen: paired KID(5k)",
     "paired --runs results/fmnist-screen-runs --step 2000 --final 5k --metric kid"),
    ("The screen: dispersion",
     "dispersion --grid screen --steps 100 1000 2000 --runs results/fmnist-screen-runs"),
    ("The screen: power",
     "power --runs results/fmnist-screen-runs --step 2000 --final 5k"),
    ("Evaluation noise (real test images)", "noise"),
    ("First pass: paired proxy FID at step 4,000", "paired --runs results/fmnist-runs"),
    ("First pass: power", "power --runs results/fmnist-runs"),
    ("First pass: dispersion of the variants", "dispersion --runs results/fmnist-runs"),
    ("First pass: dispersion of the blocks",
     "dispersion --grid blocks --runs results/fmnist-runs"),
    ("First pass: dispersion of lambda and tau",
     "dispersion --grid lambda-tau --runs results/fmnist-runs"),
    ("First pass: feature norm and proxy FID", "norm-fid --runs results/fmnist-runs"),
    ("Long training: the gap per seed", "long --runs results/fmnist-long-runs"),
    ("Long training: dispersion",
     "dispersion --steps 4000 8000 12000 --runs results/fmnist-long-runs"),
)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "table", choices=["dispersion", "long", "paired", "norm-fid", "power", "noise", "all"],
        help="one table, or all: every table of docs/results.md from the runs kept in results/",
    )  # fmt: skip
    p.add_argument("--runs", type=Path, default=Path("runs/experiments/fmnist-runs"))
    p.add_argument("--grid", choices=sorted(GRIDS), default="variants", help="dispersion only")
    p.add_argument(
        "--steps", type=int, nargs="+", default=[100, 1000, 4000],
        help="dispersion only: the logged steps to show (runs that lack one are left out)",
    )  # fmt: skip
    p.add_argument("--samples", type=Path, default=None, help="noise only: a sample file")
    p.add_argument(
        "--step", type=int, default=4000,
        help="paired / power: the step compared (4000 for the first pass, 2000 for the screen)",
    )  # fmt: skip
    p.add_argument(
        "--final", default=None,
        help='paired / power: a final evaluation\'s name (e.g. "5k") instead of the logged '
        "1,000-sample proxy FID",
    )  # fmt: skip
    p.add_argument(
        "--metric", choices=["fid", "kid"], default="fid",
        help="paired / power with --final: the Fréchet distance (default) or KID (x 1e3)",
    )  # fmt: skip
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None,
        help="paired / power: only these training seeds (a host's block, or without one seed)",
    )  # fmt: skip
    return p


def table(args: argparse.Namespace) -> str:
    """The table ``args`` ask for (one of the parser's, not ``all``)."""
    if args.table == "dispersion":
        return dispersion(args.runs, steps=tuple(args.steps), grid=args.grid)
    if args.table == "noise":
        return noise(samples=args.samples)
    if args.table in ("paired", "power"):
        fn = paired if args.table == "paired" else power
        return fn(args.runs, step=args.step, final=args.final, metric=args.metric, seeds=args.seeds)
    return {"long": long, "norm-fid": norm_fid}[args.table](args.runs)


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.metric != "fid" and args.final is None:
        p.error("--metric kid needs --final NAME (the logged proxy is a Fréchet distance only)")
    if args.table != "all":
        print(table(args))
        return
    for heading, command in PAGE:
        print(f"## {heading}\n\n`python scripts/study_tables.py {command}`\n", flush=True)
        print(table(p.parse_args(command.split())) + "\n", flush=True)


if __name__ == "__main__":
    main()
