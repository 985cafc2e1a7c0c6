"""Experiment grids: a TOML file that expands into named training runs.

A grid file::

    [experiment]
    name = "fmnist-variants"          # default: the file's stem
    title = "Table 2 at Fashion-MNIST scale"
    config = "../fashion-mnist.toml"  # base training config, relative to this file
    seeds = [0, 1, 2]                 # every arm runs once per seed (train.seed)
    baseline = "baseline"             # the arm the relative changes refer to ("" = none)
    metric = "proxy_fid"              # proxy_fid (last in-training value) | fid (final_eval)
    outdir = "runs/experiments"       # the experiment folder is outdir / name
    shared_runs = "fmnist-runs"       # optional: run folders shared by grids (outdir / this)
    nproc = 1                         # processes per run (> 1: torchrun, one per device)

    [set]                             # overrides for every run ("section.key" = TOML value)
    "train.steps" = 4000

    [[arm]]                           # explicit arms ...
    name = "baseline"
    set = { "dispersive.weight" = 0.0 }
    # baseline = "other arm"          # per arm: compare with this arm instead (Fig. 4: one
                                      # baseline per model size)

    [axes]                            # ... and/or the Cartesian product of these values;
    "dispersive.weight" = [0.25, 0.5] # every point is one more arm ("weight=0.25 tau=0.5")
    "dispersive.tau" = [0.5, 1.0]

    [[final_eval]]                    # optional: sample and evaluate every finished run;
    name = "ODE"                      # one table or several (CFG / no CFG, ODE / SDE, ...)
    num = 50000
    features = "inception"
    ref = "VIRTUAL_imagenet256_labeled.npz"
    inception_weights = "pt_inception-2015-12-05-6726825d.pth"

Runs are ``(explicit arms + axis arms) x seeds``; the product is not crossed with the explicit
arms, so a baseline arm stays one arm. Overrides apply in the order base config, ``[set]``, the
arm's ``set``, the seed, then command-line ``--set`` values. Every run's config is resolved and
checked (keys, types, layer names against the model on the meta device) before anything runs.

Run folders are ``EXP_DIR/runs/<arm>-s<seed>``. With ``shared_runs`` they are named by the
content of the resolved training config instead (``outdir/shared_runs/<hash>-s<seed>``), so
grids that contain the same run (the baseline of Tables 2, 3 and 4, say) train it once. The
hash leaves out what does not change the training itself: the step budget (a larger
``train.steps`` extends a run), logging and checkpoint intervals, ``eval.every`` and the run's
name and folder; and a config key added after the kept runs were named, while it holds its
default (so that adding an option does not rename, and retrain, every kept run).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispersive.errors import UserError

__all__ = [
    "METRICS",
    "Arm",
    "FinalEval",
    "Grid",
    "RunSpec",
    "load_grid",
    "resolve_run_config",
    "toml_literal",
    "slug",
]

METRICS: tuple[str, ...] = ("proxy_fid", "fid")

_EXPERIMENT_KEYS = {
    "name": str,
    "title": str,
    "description": str,
    "config": str,
    "seeds": list,
    "baseline": str,
    "metric": str,
    "outdir": str,
    "shared_runs": str,
    "nproc": int,
}
_FINAL_EVAL_KEYS = {
    "name": str,
    "num": int,
    "sampler": str,
    "steps": int,
    "cfg_scale": float,
    "features": str,
    "ref": str,
    "inception_weights": str,
    "batch_size": int,
    "metrics": list,
    "seed": int,
}
_TOP_KEYS = ("experiment", "set", "arm", "axes", "final_eval")


def toml_literal(value: Any) -> str:
    """A value as a TOML literal for ``--set key=<literal>`` (``0.5``, ``"x"``, ``["a"]``)."""
    import tomli_w

    line = tomli_w.dumps({"v": value}).strip()
    if not line.startswith("v = "):  # tables: inline form
        inner = ", ".join(f"{k} = {toml_literal(v)}" for k, v in value.items())
        return "{" + inner + "}"
    return line[len("v = ") :]


def slug(name: str) -> str:
    """A folder-safe form of an arm name: ``"InfoNCE l2"`` -> ``"infonce-l2"``."""
    s = re.sub(r"[^a-z0-9.=_]+", "-", name.lower()).strip("-")
    return s.replace("=", "")


@dataclass(frozen=True)
class Arm:
    """One row of the results table: a name and its config overrides (``section.key`` -> value)."""

    name: str
    overrides: dict[str, Any]
    description: str = ""
    baseline: str = ""  # the arm this one is compared with ("" = the grid's baseline)

    @property
    def slug(self) -> str:
        return slug(self.name)


@dataclass(frozen=True)
class FinalEval:
    """Sample ``num`` images from every finished run and evaluate them (``dispersive eval``)."""

    name: str = "final"
    num: int = 10000
    sampler: str = ""  # "" = the run's sample.sampler
    steps: int = 0  # 0 = the run's sample.steps
    cfg_scale: float = -1.0  # < 0 = the run's sample.cfg_scale
    seed: int = -1  # < 0 = the run's sample.seed
    features: str = "fashion-mnist"
    ref: str = ""  # "" = the shipped Fashion-MNIST statistics
    inception_weights: str = ""
    batch_size: int = 256
    metrics: tuple[str, ...] = ("fid",)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    arm: Arm
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]  # --set items, in order

    @property
    def name(self) -> str:
        return self.run_dir.name


@dataclass(frozen=True)
class Grid:
    """A parsed grid file; ``runs`` is the expansion (arms x seeds)."""

    path: Path
    name: str
    title: str
    description: str
    config: Path
    seeds: tuple[int, ...]
    baseline: str
    metric: str
    outdir: Path
    nproc: int
    common: dict[str, Any]
    arms: tuple[Arm, ...]
    axes: dict[str, list]
    final_evals: tuple[FinalEval, ...]
    shared_runs: str = ""
    extra_overrides: tuple[str, ...] = ()
    runs: tuple[RunSpec, ...] = field(default=())

    @property
    def exp_dir(self) -> Path:
        return self.outdir / self.name


def _check_table(table: Any, keys: Mapping[str, type], where: str) -> dict:
    if not isinstance(table, Mapping):
        raise UserError(f"{where} must be a table, got {type(table).__name__}")
    for k, v in table.items():
        if k not in keys:
            raise UserError(f"unknown key '{k}' in {where}; valid keys: {', '.join(keys)}")
        want = keys[k]
        ok = isinstance(v, want) or (want is float and isinstance(v, int))
        if not ok or (want is int and isinstance(v, bool)):
            raise UserError(f"{where} {k} must be a {want.__name__}, got {v!r}")
    return dict(table)


def _check_overrides(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise UserError(f'{where} must be a table of "section.key" = value items, got {table!r}')
    out = {}
    for k, v in table.items():
        if isinstance(v, Mapping) and "." not in k:
            # [set] written as nested tables ([set.train] steps = 4): flatten one level.
            for k2, v2 in v.items():
                out[f"{k}.{k2}"] = v2
            continue
        if k.count(".") < 1:
            raise UserError(
                f'{where}: key {k!r} must name a config key as "section.key" '
                f'(e.g. "dispersive.weight")'
            )
        out[k] = v
    return out


def _axis_label(key: str, value: Any) -> str:
    v = value if not isinstance(value, list | tuple) else ",".join(map(str, value))
    return f"{key.split('.')[-1]}={v}"


def load_grid(
    path: str | Path,
    *,
    outdir: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> Grid:
    """Read a grid file and expand it into runs (not yet checked against the config schema).

    Args:
        path: the grid TOML file.
        outdir: replaces ``[experiment] outdir`` (the experiment folder is ``outdir / name``).
        overrides: extra ``--set key=value`` items applied to every run, last.

    Raises:
        UserError: unreadable file, unknown keys, wrong types, duplicate arm names, a baseline
            that is not an arm, no arms.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"grid file {path} does not exist; grids live in configs/experiments/")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    for k in raw:
        if k not in _TOP_KEYS:
            raise UserError(f"unknown table [{k}] in {path}; valid: {', '.join(_TOP_KEYS)}")
    exp = _check_table(raw.get("experiment", {}), _EXPERIMENT_KEYS, f"[experiment] of {path}")
    name = exp.get("name") or path.stem
    if "config" not in exp:
        raise UserError(
            f'[experiment] of {path} needs config = "<base training config>" '
            '(relative to the grid file, e.g. "../fashion-mnist.toml")'
        )
    config = (path.parent / exp["config"]).resolve()
    if not config.is_file():
        raise UserError(f"[experiment] config = {exp['config']!r} of {path}: {config} not found")
    seeds = exp.get("seeds", [0])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UserError(f"[experiment] seeds of {path} must be a non-empty list of ints")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"[experiment] seeds of {path} has duplicates: {seeds}")
    metric = exp.get("metric", "proxy_fid")
    if metric not in METRICS:
        raise UserError(f"[experiment] metric = {metric!r}; valid metrics: {', '.join(METRICS)}")
    nproc = int(exp.get("nproc", 1))
    if nproc < 1:
        raise UserError(f"[experiment] nproc must be >= 1, got {nproc}")

    common = _check_overrides(raw.get("set", {}), f"[set] of {path}")
    arms: list[Arm] = []
    arm_list = raw.get("arm", [])
    if not isinstance(arm_list, list):
        raise UserError(f"arms of {path} are written [[arm]] (an array of tables)")
    for i, a in enumerate(arm_list):
        where = f"[[arm]] #{i + 1} of {path}"
        a = _check_table(a, {"name": str, "set": dict, "description": str, "baseline": str}, where)
        if "name" not in a:
            raise UserError(f"{where} needs a name")
        ov = _check_overrides(a.get("set", {}), where)
        arms.append(Arm(a["name"], ov, a.get("description", ""), a.get("baseline", "")))
    axes_raw = raw.get("axes", {})
    axes = _check_overrides(axes_raw, f"[axes] of {path}")
    for k, vals in axes.items():
        if not isinstance(vals, list) or not vals:
            raise UserError(f"[axes] {k} of {path} must be a non-empty list of values")
    if axes:
        keys = list(axes)
        for point in itertools.product(*(axes[k] for k in keys)):
            ov = dict(zip(keys, point))
            arms.append(Arm(" ".join(_axis_label(k, v) for k, v in ov.items()), ov))
    if not arms:
        raise UserError(f"{path} defines no runs: add [[arm]] tables or an [axes] table")
    names = [a.name for a in arms]
    slugs = [a.slug for a in arms]
    for group, what in ((names, "name"), (slugs, "folder name")):
        dup = sorted({n for n in group if group.count(n) > 1})
        if dup:
            raise UserError(f"arms of {path} share a {what}: {dup}; give each arm its own name")
    baseline = exp.get("baseline", "baseline" if "baseline" in names else "")
    if baseline and baseline not in names:
        raise UserError(
            f"[experiment] baseline = {baseline!r} of {path} is not an arm; arms: {names}"
        )
    for a in arms:
        if a.baseline and a.baseline not in names:
            raise UserError(
                f"arm {a.name!r} of {path}: baseline = {a.baseline!r} is not an arm; arms: {names}"
            )

    fe_raw = raw.get("final_eval", [])
    fe_list = [fe_raw] if isinstance(fe_raw, Mapping) else list(fe_raw)
    final_evals = []
    for i, fe in enumerate(fe_list):
        fe = _check_table(fe, _FINAL_EVAL_KEYS, f"[[final_eval]] #{i + 1} of {path}")
        if "metrics" in fe:
            fe["metrics"] = tuple(fe["metrics"])
        final_evals.append(FinalEval(**fe))
    fe_names = [fe.name for fe in final_evals]
    if len(set(map(slug, fe_names))) != len(fe_names):
        raise UserError(f"[[final_eval]] tables of {path} need distinct names; got {fe_names}")
    if metric == "fid" and not final_evals:
        raise UserError(f"metric = 'fid' in {path} needs a [final_eval] table (num, features, ...)")
    out = Path(outdir) if outdir is not None else Path(exp.get("outdir", "runs/experiments"))
    grid = Grid(
        path=path,
        name=name,
        title=exp.get("title", name),
        description=exp.get("description", ""),
        config=config,
        seeds=tuple(seeds),
        baseline=baseline,
        metric=metric,
        outdir=out,
        nproc=nproc,
        common=common,
        arms=tuple(arms),
        axes=axes,
        final_evals=tuple(final_evals),
        shared_runs=exp.get("shared_runs", ""),
        extra_overrides=tuple(overrides),
    )
    return dataclasses.replace(grid, runs=tuple(_expand(grid)))


# Keys that do not change what a run trains (they are left out of the shared-run hash).
_NOT_IDENTITY = {
    "train": ("steps", "seed", "log_every", "ckpt_every", "keep_last", "outdir", "run_name",
              "max_nonfinite", "dist_timeout_s"),
    "eval": ("every",),
}  # fmt: skip


# The config keys the run hash was first defined over (2026-12-02, when the study's kept runs in
# results/ were named). A key added since enters the hash only when its value differs from its
# default: a new option that leaves training as it was must not rename every run folder (the
# kept runs would no longer be found, and would be trained again under new names).
_HASH_KEYS_V1 = {
    "model": "in_channels input_size name num_classes overrides",
    "data": "hflip name num_workers path synthetic_size",
    "objective": "adaptive_p cfg_kappa cfg_omega cfg_t_max cfg_t_min kind label_dropout path "
    "ratio_r_neq_t t_dist t_mean t_std two_view two_view_gap",
    "dispersive": "contrastive group_size include_diagonal layers margin normalize_by_dim scope "
    "tau variant weight",
    "optim": "betas ema_decay ema_warmup grad_clip lr warmup_steps weight_decay",
    "train": "ckpt_every compile device dist_timeout_s global_batch keep_last log_every "
    "max_nonfinite outdir precision run_name seed steps",
    "sample": "cfg_interval cfg_scale sampler seed steps",
    "eval": "every features num_samples",
}


def run_hash(config) -> str:
    """10 hex digits naming what a resolved config trains (see the module doc)."""
    import hashlib
    import json

    from dispersive.train.config import Config, config_to_dict

    d, default = config_to_dict(config), config_to_dict(Config())
    for section, values in d.items():
        known = _HASH_KEYS_V1.get(section, "").split()
        for k in list(values):
            if k not in known and values[k] == default[section].get(k):
                del values[k]
        if not values and section not in _HASH_KEYS_V1:
            del d[section]
    for section, keys in _NOT_IDENTITY.items():
        for k in keys:
            d[section].pop(k, None)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def _expand(grid: Grid) -> list[RunSpec]:
    runs = []
    # Seed-major: a grid stopped part-way has every arm at the same number of seeds.
    for seed in grid.seeds:
        for arm in grid.arms:
            items = {**grid.common, **arm.overrides, "train.seed": seed}
            sets = (*[f"{k}={toml_literal(v)}" for k, v in items.items()], *grid.extra_overrides)
            run_dir = grid.exp_dir / "runs" / f"{arm.slug}-s{seed}"
            if grid.shared_runs:
                spec = RunSpec(arm, seed, run_dir, sets)
                digest = run_hash(resolve_run_config(grid, spec))
                run_dir = grid.outdir / grid.shared_runs / f"{digest}-s{seed}"
            runs.append(RunSpec(arm, seed, run_dir, sets))
    seen: dict[Path, str] = {}
    for r in runs:
        if r.run_dir in seen:
            raise UserError(
                f"arms {seen[r.run_dir]!r} and {r.arm.name!r} of {grid.path} train the same "
                "config; remove one of them"
            )
        seen[r.run_dir] = r.arm.name
    return runs


def resolve_run_config(grid: Grid, run: RunSpec):
    """The run's resolved training config (checked: keys, types and values; the cross-field
    checks against the model are the one preflight of ``runner.check_grid``)."""
    from dispersive.train.config import read_config

    try:
        return read_config(grid.config, run.overrides)
    except UserError as e:
        raise UserError(f"run {run.name} of {grid.path.name}: {e}") from None
