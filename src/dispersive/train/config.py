"""Training configuration: TOML files -> frozen dataclasses, with checks that fail before any work.

A config file holds only the *differences* from the dataclass defaults below, in the sections
``[model] [data] [objective] [dispersive] [optim] [train] [sample] [eval]``. Command-line
overrides are ``a.b=<TOML literal>`` (``train.steps=6``, ``data.path="/x"``,
``dispersive.layers=["blocks.2"]``, ``model.overrides.depth=2``). A file may start with
``extends = "other.toml"`` (path relative to the file): the other file is loaded first and this
file's keys are merged over it, section by section.

Three levels of checks, all raising :class:`dispersive.errors.UserError` with one line:

1. keys and types, when a file, a dict or an override is read (unknown keys list the valid
   ones and the closest match);
2. per-field values (choices of enumerated keys, ranges), also in :func:`validate`;
3. cross-field checks in :func:`validate` (the batch divides by the world size, at least two
   samples per dispersive group, the tapped layers exist in the model, ...).

Per-device batch (paper: 16 per device, global 256 on 16 devices; authors' PyTorch code: 32 per
GPU) is expressed as ``train.global_batch`` plus ``dispersive.group_size``: the training loop
splits each device's batch into groups of ``group_size`` samples and averages the dispersive
loss over the groups. A preset with ``global_batch = 256`` and ``group_size = 16`` therefore
computes the paper's objective on 1, 2, 4, 8 or 16 devices alike. ``group_size = 0`` means "the
whole per-device batch" (``scope = "local"``) or the whole global batch (``scope = "global"``).
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispersive.data.datasets import DATASETS
from dispersive.errors import UserError
from dispersive.eval.features import FEATURES
from dispersive.generate import KIND_SAMPLERS, SAMPLER_OPTIONS
from dispersive.losses import SCOPES, VARIANTS
from dispersive.models.official import WEIGHTS
from dispersive.paths import PATHS
from dispersive.samplers import SAMPLERS
from dispersive.timesteps import T_DISTS, TWO_VIEW_MODES

__all__ = [
    "ModelConfig",
    "DataConfig",
    "ObjectiveConfig",
    "DispersiveConfig",
    "OptimConfig",
    "TrainConfig",
    "SampleConfig",
    "EvalConfig",
    "Config",
    "SECTIONS",
    "CHOICES",
    "load_config",
    "read_config",
    "config_source",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "dump_toml",
    "validate",
    "preflight",
    "meta_model",
    "per_device_batch",
    "dispersive_group_size",
    "model_kwargs",
]


# ----------------------------------------------------------------------------------------------
# Sections. Keys and defaults follow docs/architecture.md "Config keys"; this file is the source
# of truth. Sequences are stored as tuples so a Config is immutable; TOML arrays are accepted.


@dataclass(frozen=True)
class ModelConfig:
    name: str = "SiT-T/4"  # registry name in dispersive.models.MODELS
    input_size: int = 28  # H = W of the model input (latent size for latent data)
    in_channels: int = 1
    num_classes: int = 10  # 0 = unconditional; the null label is num_classes
    overrides: dict = field(default_factory=dict)  # passed to models.build (depth, attn, ...)
    # Start from these weights (step 0 only; a resumed run continues from its own checkpoint):
    # an official DiT / SiT .pt (plain or training dict) or a checkpoint / run dir of this
    # package. See dispersive.train.model_init.
    init: str = ""
    init_sha256: str = ""  # optional: verify model.init's file before loading it
    init_weights: str = "ema"  # ema | model: which weights of a checkpoint that has both


@dataclass(frozen=True)
class DataConfig:
    name: str = "fashion-mnist"  # data.datasets.DATASETS
    path: str = ""  # "" = the dataset's default folder
    hflip: bool = False
    num_workers: int = 0  # DataLoader workers (imagefolder only)
    synthetic_size: int = 512  # samples in the synthetic dataset


@dataclass(frozen=True)
class ObjectiveConfig:
    kind: str = "flow"  # flow | ddpm | meanflow (generate.KIND_SAMPLERS)
    path: str = "linear"  # paths.PATHS (flow)
    t_dist: str = "uniform"  # timesteps.T_DISTS
    t_mean: float = 0.0
    t_std: float = 1.0
    label_dropout: float = 0.1
    two_view: str = "none"  # none | independent | restricted (contrastive comparison, Table 2)
    two_view_gap: float = 0.005
    # MeanFlow (Geng et al. 2025): share of pairs with r != t, adaptive loss weight power and
    # constant (eps 0.01: the official JAX code's norm_eps), and the training-time guidance of
    # its CFG variant (omega, kappa, active t interval).
    ratio_r_neq_t: float = 0.25
    adaptive_p: float = 1.0
    adaptive_eps: float = 0.01
    cfg_omega: float = 1.0
    cfg_kappa: float = 0.0
    cfg_t_min: float = 0.0
    cfg_t_max: float = 1.0


@dataclass(frozen=True)
class DispersiveConfig:
    weight: float = 0.0  # lambda; 0 = exactly the baseline
    tau: float = 0.5
    variant: str = "infonce_l2"  # losses.VARIANTS
    layers: tuple[str, ...] = ("blocks.1",)  # FeatureTap names (model.block_names)
    scope: str = "local"  # local (per device, the paper/authors) | global (gathered)
    group_size: int = 0  # samples per loss group; 0 = the whole local (or global) batch
    normalize_by_dim: bool = True  # squared distance / D, as the authors' code
    include_diagonal: bool = True
    margin: float = 1.0  # hinge epsilon
    contrastive: bool = False  # contrastive_loss on two views instead (needs objective.two_view)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0 = off
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay = min(ema_decay, (1 + n) / (10 + n))


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    global_batch: int = 128  # summed over devices; per device = global_batch / world_size
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    keep_last: int = 2
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False
    outdir: str = "runs"
    run_name: str = ""  # "" = derived from the config file name
    max_nonfinite: int = 5  # consecutive skipped steps before stopping with an error
    device: str = "auto"  # auto | cpu | cuda
    dist_timeout_s: int = 600


@dataclass(frozen=True)
class SampleConfig:
    sampler: str = "heun"  # samplers.SAMPLERS, one of generate.KIND_SAMPLERS[objective.kind]
    steps: int = 25
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    # Guide the first N sample channels, the rest conditional; 0 = all. Official DiT / SiT guide
    # 3 of the 4 latent channels (forward_with_cfg), as their published FIDs: the ImageNet presets.
    cfg_channels: int = 0
    # Options of sample.sampler (generate.SAMPLER_OPTIONS), e.g. {atol = 1e-6, rtol = 1e-3}
    # for dopri5, {final_euler = false} for heun; unset ones take their defaults.
    options: dict = field(default_factory=dict)
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # proxy FID every K steps (0 = off)
    num_samples: int = 2000
    features: str = "fashion-mnist"  # eval.features.FEATURES


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    dispersive: DispersiveConfig = field(default_factory=DispersiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]

# Enumerated keys: "section.key" -> valid values. The names come from the library's own
# registries, so a new variant, path, sampler or feature network is added in one place.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.init_weights": WEIGHTS,
    "data.name": DATASETS,
    "objective.kind": tuple(KIND_SAMPLERS),
    "objective.path": tuple(PATHS),
    "objective.t_dist": T_DISTS,
    "objective.two_view": ("none", *TWO_VIEW_MODES),
    "dispersive.variant": VARIANTS,
    "dispersive.scope": SCOPES,
    "train.precision": ("fp32", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "sample.sampler": tuple(SAMPLERS),
    "eval.features": FEATURES,
}

# Numeric ranges: "section.key" -> (low, high, low_inclusive, high_inclusive); None = unbounded.
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "model.input_size": (1, None, True, True),
    "model.in_channels": (1, None, True, True),
    "model.num_classes": (0, None, True, True),
    "data.num_workers": (0, None, True, True),
    "data.synthetic_size": (1, None, True, True),
    "objective.t_std": (0, None, False, True),
    "objective.label_dropout": (0, 1, True, False),
    "objective.two_view_gap": (0, 1, True, True),
    "objective.ratio_r_neq_t": (0, 1, True, True),
    "objective.adaptive_p": (0, None, True, True),
    "objective.adaptive_eps": (0, None, False, True),
    "objective.cfg_t_min": (0, 1, True, True),
    "objective.cfg_t_max": (0, 1, True, True),
    "dispersive.weight": (0, None, True, True),
    "dispersive.tau": (0, None, False, True),
    "dispersive.group_size": (0, None, True, True),
    "dispersive.margin": (0, None, False, True),
    "optim.lr": (0, None, False, True),
    "optim.weight_decay": (0, None, True, True),
    "optim.warmup_steps": (0, None, True, True),
    "optim.grad_clip": (0, None, True, True),
    "optim.ema_decay": (0, 1, True, True),
    "train.steps": (0, None, True, True),
    "train.global_batch": (1, None, True, True),
    "train.seed": (0, None, True, True),
    "train.log_every": (1, None, True, True),
    "train.ckpt_every": (1, None, True, True),
    "train.keep_last": (1, None, True, True),
    "train.max_nonfinite": (1, None, True, True),
    "train.dist_timeout_s": (1, None, True, True),
    "sample.steps": (1, None, True, True),
    "sample.cfg_scale": (0, None, True, True),
    "sample.cfg_channels": (0, None, True, True),
    "sample.seed": (0, None, True, True),
    "eval.every": (0, None, True, True),
    "eval.num_samples": (1, None, True, True),
}

# Image datasets with a fixed shape and class count: name -> (input_size, in_channels, classes).
_FIXED_DATA = {"fashion-mnist": (28, 1, 10), "cifar10": (32, 3, 10)}


# ----------------------------------------------------------------------------------------------
# Key/type checking


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _valid_keys(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[section])]


def _unknown(what: str, name: str, valid: Sequence[str], where: str, label: str = "") -> UserError:
    """``unknown key 'train.stpes' in x.toml; did you mean 'train.steps'? valid keys in ...``."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ";"
    label = label or f"{what}s"
    return UserError(f"unknown {what} '{name}'{where}{hint} valid {label}: {', '.join(valid)}")


def _unknown_key(section: str, key: str, where: str) -> UserError:
    keys = _valid_keys(section)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f"; did you mean '{section}.{close[0]}'?" if close else ";"
    return UserError(
        f"unknown key '{section}.{key}'{where}{hint} valid keys in [{section}]: {', '.join(keys)}"
    )


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        inner = {int: "ints", float: "floats", bool: "bools", str: "strings"}[args[0]]
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {inner}"
        return f"a list of {len(args)} {inner}"
    return {int: "an int", float: "a float", bool: "a bool", str: "a string", dict: "a table"}.get(
        hint, str(hint)
    )


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    """Check one value against its field type; return it in the stored form (tuples, floats)."""

    def bad() -> UserError:
        return UserError(f"{key} must be {_type_name(hint)}, got {_describe(value)}{where}")

    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if key == "dispersive.layers" and isinstance(value, str):
            value = [value]  # one layer name is unambiguous
        if not isinstance(value, list | tuple):
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            item_hints = [args[0]] * len(value)
        else:
            if len(value) != len(args):
                raise bad()
            item_hints = list(args)
        out = []
        for v, h in zip(value, item_hints):
            try:
                out.append(_coerce(key, v, h, where))
            except UserError:
                raise bad() from None
        return tuple(out)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad()
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if hint is dict:
        if not isinstance(value, Mapping):
            raise bad()
        return _plain(dict(value))
    raise TypeError(f"unsupported config field type {hint!r} for {key}")  # a bug in this file


def _plain(value: Any) -> Any:
    """Deep copy into plain dict/list/scalars (TOML/JSON-able)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _check_value(key: str, value: Any, where: str = "") -> None:
    """Choices and ranges of one already-typed value."""
    if key in CHOICES and value not in CHOICES[key]:
        close = difflib.get_close_matches(str(value), CHOICES[key], n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ";"
        raise UserError(
            f"{key} = {value!r} is not a valid choice{where}{hint} "
            f"valid choices: {', '.join(CHOICES[key])}"
        )
    if key in _RANGES:
        lo, hi, lo_inc, hi_inc = _RANGES[key]
        ok = True
        if lo is not None:
            ok &= value >= lo if lo_inc else value > lo
        if hi is not None:
            ok &= value <= hi if hi_inc else value < hi
        if not ok:
            lb = "[" if lo_inc else "("
            rb = "]" if hi_inc else ")"
            rng = f"{lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}"
            raise UserError(f"{key} = {value!r} is out of range {rng}{where}")


def _merge(base: dict, new: Mapping, where: str) -> dict:
    """Merge a {section: {key: value}} mapping into ``base`` (checked), returning ``base``."""
    for section, table in new.items():
        if section not in SECTIONS:
            raise _unknown("section", str(section), list(SECTIONS), where)
        if not isinstance(table, Mapping):
            raise UserError(
                f"[{section}] must be a table of keys, got {_describe(table)}{where}; "
                f"write it as [{section}] followed by key = value lines"
            )
        hints = _hints(SECTIONS[section])
        for key, value in table.items():
            if key not in hints:
                raise _unknown_key(section, str(key), where)
            full = f"{section}.{key}"
            stored = _coerce(full, value, hints[key], where)
            _check_value(full, stored, where)
            base.setdefault(section, {})[key] = stored
    return base


def _build(d: Mapping[str, Mapping[str, Any]]) -> Config:
    sections = {}
    for name, cls in SECTIONS.items():
        sections[name] = cls(**dict(d.get(name, {})))
    return Config(**sections)


# ----------------------------------------------------------------------------------------------
# Public API


def config_to_dict(config: Config) -> dict:
    """The full resolved config as a plain nested dict (lists, not tuples): TOML/JSON-able."""
    return {
        name: {f.name: _plain(getattr(sec, f.name)) for f in dataclasses.fields(sec)}
        for name, sec in ((n, getattr(config, n)) for n in SECTIONS)
    }


def config_from_dict(d: Mapping[str, Any], *, source: str = "") -> Config:
    """Build a Config from a (possibly partial) nested dict, checking keys, types and values.

    Args:
        d: ``{section: {key: value}}``; missing sections/keys keep their defaults.
        source: where the dict came from, for error messages (e.g. a checkpoint path).

    Raises:
        UserError: unknown section/key, wrong type, invalid value or failed cross-field check.
    """
    where = f" in {source}" if source else ""
    if not isinstance(d, Mapping):
        raise UserError(f"a config must be a table of sections, got {_describe(d)}{where}")
    merged = _merge({}, d, where)
    config = _build(merged)
    validate(config)
    return config


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a TOML config, following ``extends``; returns checked {section: {key: value}}."""
    path = Path(path)
    where = f" in {path}"
    if not path.is_file():
        raise UserError(
            f"config file {path} not found; give a path to a .toml file (presets are in configs/)"
        )
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise UserError(f"'extends' forms a cycle: {chain}")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    base: dict = {}
    extends = raw.pop("extends", None)
    if extends is not None:
        if not isinstance(extends, str):
            raise UserError(f"'extends' must be a string path, got {_describe(extends)}{where}")
        parent = (path.parent / extends).resolve()
        base = _read_toml(parent, (*seen, path.resolve()))
    return _merge(base, raw, where)


def read_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML config file and apply ``--set`` overrides, checking keys, types and values.

    The cross-field checks are left to the caller's one :func:`preflight` (the train command,
    the experiment runner); :func:`load_config` makes them at once.

    Args:
        path: a .toml file, or None for all defaults.
        overrides: strings ``"section.key=<TOML literal>"``; ``model.overrides.<name>=<literal>``
            sets one entry of the free ``model.overrides`` table.

    Raises:
        UserError: unknown key, wrong type or invalid value, in one line.
    """
    d = _read_toml(Path(path)) if path is not None else {}
    return apply_overrides(_build(d), overrides, _validate=False)


def config_source(path: str | Path | None) -> str:
    """How errors name where a config came from (``read_config``'s ``path``)."""
    return str(path) if path is not None else "the defaults"


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a TOML config file (differences from the defaults) and apply ``--set`` overrides.

    Args:
        path: a .toml file, or None for all defaults.
        overrides: strings ``"section.key=<TOML literal>"``; ``model.overrides.<name>=<literal>``
            sets one entry of the free ``model.overrides`` table.

    Returns:
        The resolved, validated (world size 1, no model) Config.

    Raises:
        UserError: a one-line message naming the problem and the fix.
    """
    config = read_config(path, overrides)
    try:
        validate(config)
    except UserError as e:
        raise UserError(f"{e} (config: {config_source(path)})") from None
    return config


def _parse_literal(item: str, hint: Any | None) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(
            f"--set expects key=value with a TOML literal value, got {item!r}; "
            'e.g. train.steps=6 or data.path="/x"'
        )
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise UserError(f"--set key {key!r} must look like section.key, e.g. train.steps")
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        # Shells eat the quotes of `data.path="/x"`; for string keys take the bare text as is.
        if hint is str and text and text[0] not in "\"'[{" and "\n" not in text:
            return parts, text
        raise UserError(
            f"--set {key}={text}: the value is not a TOML literal; strings need quotes "
            f'(e.g. {key}=\'"value"\' in a shell), lists use brackets (e.g. ["blocks.2"])'
        ) from None
    return parts, value


def apply_overrides(config: Config, overrides: Sequence[str], *, _validate: bool = True) -> Config:
    """Return a copy of ``config`` with ``"section.key=<TOML literal>"`` overrides applied.

    ``model.overrides.depth=2`` sets one entry of the free ``model.overrides`` table; a whole
    table can be given as ``model.overrides={depth=2, attn="math"}``.

    Raises:
        UserError: malformed item, unknown key, wrong type or invalid value.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    d = config_to_dict(config)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        head = key.split(".")
        hint = None
        if len(head) >= 2 and head[0] in SECTIONS:
            hint = _hints(SECTIONS[head[0]]).get(head[1])
        parts, value = _parse_literal(item, hint if len(head) == 2 else None)
        where = f" (from --set {item})"
        section, name, rest = parts[0], parts[1], parts[2:]
        if section not in SECTIONS:
            raise _unknown("section", section, list(SECTIONS), where)
        hints = _hints(SECTIONS[section])
        if name not in hints:
            raise _unknown_key(section, name, where)
        if rest:
            if hints[name] is not dict:
                raise UserError(
                    f"{section}.{name} is not a table, so {key} is not a key{where}; "
                    f"use {section}.{name}=<value>"
                )
            table = d[section][name]
            for p in rest[:-1]:
                sub = table.setdefault(p, {})
                if not isinstance(sub, dict):
                    raise UserError(f"{key}: '{p}' is not a table{where}")
                table = sub
            table[rest[-1]] = _plain(value)
            continue
        stored = _coerce(f"{section}.{name}", value, hints[name], where)
        _check_value(f"{section}.{name}", stored, where)
        d[section][name] = _plain(stored)
    out = _build(_merge({}, d, ""))
    if _validate:
        validate(out)
    return out


def dump_toml(config: Config) -> str:
    """The full resolved config as TOML text (every key, so the run is self-describing)."""
    import tomli_w  # lazy: only needed when writing a run directory

    return tomli_w.dumps(config_to_dict(config))


def per_device_batch(config: Config, world_size: int = 1) -> int:
    """The batch each rank processes: ``train.global_batch / world_size`` (checked)."""
    gb = config.train.global_batch
    if world_size < 1:
        raise UserError(f"world size must be >= 1, got {world_size}")
    if gb % world_size:
        raise UserError(
            f"train.global_batch = {gb} does not divide by the world size {world_size}; "
            f"set train.global_batch to a multiple of {world_size} "
            f"(e.g. {max(world_size, gb // world_size * world_size)})"
        )
    return gb // world_size


def dispersive_group_size(config: Config, world_size: int = 1) -> int:
    """The number of samples each dispersive-loss evaluation sees (after resolving 0)."""
    g = config.dispersive.group_size
    if g:
        return g
    if config.dispersive.scope == "global":
        return config.train.global_batch
    return per_device_batch(config, world_size)


def model_kwargs(model_cfg: ModelConfig) -> dict:
    """Keyword arguments for ``dispersive.models.build(**model_kwargs(config.model))``.

    The same dict as ``model.config`` of the built model.
    """
    return {
        "name": model_cfg.name,
        "input_size": model_cfg.input_size,
        "in_channels": model_cfg.in_channels,
        "num_classes": model_cfg.num_classes,
        "overrides": _plain(model_cfg.overrides),
    }


def meta_model(model_cfg: ModelConfig) -> Any:
    """The config's model on the meta device: its structure (layer names, kind) without memory
    or weights, so that building it is instant even for XL models."""
    import torch

    from dispersive.models import build  # lazy: reading a config needs no model code

    with torch.device("meta"):
        return build(**model_kwargs(model_cfg))


def preflight(
    config: Config, *, world_size: int = 1, model: Any = None, source: str | None = None
) -> None:
    """Every check the training loop makes, before any work starts (no process group, no data).

    The one check shared by ``dispersive train`` (also ``--dry-run``), the experiment runner
    and :func:`dispersive.train.loop.train`: :func:`validate` against the model built on the
    meta device for ``world_size`` ranks. Each entry point runs it once, on a config from
    :func:`read_config` (which checks keys, types and values only).

    Args:
        config: the resolved config.
        world_size: number of ranks the run will use.
        model: the model to check against (default: :func:`meta_model` of ``config.model``); a
            caller checking many configs of one model can build it once.
        source: where the config came from (:func:`config_source`), named in the error.

    Raises:
        UserError: a one-line message naming the problem and the fix.
    """
    try:
        validate(
            config,
            world_size=world_size,
            model=meta_model(config.model) if model is None else model,
        )
    except UserError as e:
        if source is None:
            raise
        raise UserError(f"{e} (config: {source})") from None


def validate(config: Config, *, world_size: int = 1, model: Any = None) -> None:
    """Check every value and the cross-field rules; call before any work starts.

    Args:
        config: the config.
        world_size: number of ranks (the global batch must divide by it).
        model: the built model (optionally on the meta device); when given, the tapped layers
            must exist in it and its ``kind`` must match ``objective.kind``.

    Raises:
        UserError: a one-line message naming the problem and the fix.
    """
    # Field values (a Config built by hand skips the checks done when reading files).
    for name in SECTIONS:
        sec = getattr(config, name)
        hints = _hints(type(sec))
        for f in dataclasses.fields(sec):
            key = f"{name}.{f.name}"
            value = _coerce(key, getattr(sec, f.name), hints[f.name], "")
            _check_value(key, value)

    m, data, obj = config.model, config.data, config.objective
    disp, tr = config.dispersive, config.train
    local = per_device_batch(config, world_size)

    if m.init:
        from dispersive.train.model_init import check_init  # light: no file is read

        check_init(m)

    # Data shape and classes.
    if data.name in _FIXED_DATA:
        size, ch, ncls = _FIXED_DATA[data.name]
        if (m.input_size, m.in_channels) != (size, ch):
            raise UserError(
                f"data.name = '{data.name}' gives {size}x{size}x{ch} images but the model expects "
                f"{m.input_size}x{m.input_size}x{m.in_channels}; set model.input_size = {size} "
                f"and model.in_channels = {ch}"
            )
        if m.num_classes not in (0, ncls):
            raise UserError(
                f"data.name = '{data.name}' has {ncls} classes but model.num_classes = "
                f"{m.num_classes}; set model.num_classes = {ncls} (or 0 for unconditional)"
            )
    if data.name == "imagefolder" and m.in_channels != 3:
        raise UserError(
            f"data.name = 'imagefolder' gives RGB images but model.in_channels = "
            f"{m.in_channels}; set model.in_channels = 3"
        )
    if data.name in ("imagefolder", "latents") and not data.path:
        raise UserError(
            f"data.name = '{data.name}' needs a folder: set data.path (e.g. --set "
            f"data.path='\"/data/imagenet/train\"')"
        )

    # Objective and sampler.
    if obj.cfg_t_min > obj.cfg_t_max:
        raise UserError(
            f"objective.cfg_t_min = {obj.cfg_t_min} > objective.cfg_t_max = {obj.cfg_t_max}; "
            "the guidance interval must have min <= max"
        )
    lo, hi = config.sample.cfg_interval
    if not (0.0 <= lo <= hi <= 1.0):
        raise UserError(f"sample.cfg_interval = [{lo}, {hi}] must satisfy 0 <= min <= max <= 1")
    if config.sample.cfg_channels > m.in_channels:
        raise UserError(
            f"sample.cfg_channels = {config.sample.cfg_channels} exceeds model.in_channels = "
            f"{m.in_channels}; use 1..{m.in_channels}, or 0 to guide every channel"
        )
    valid = sorted(SAMPLER_OPTIONS[config.sample.sampler])
    unknown = sorted(set(config.sample.options) - set(valid))
    if unknown:
        raise UserError(
            f"sample.options {unknown} are not options of sample.sampler = "
            f"'{config.sample.sampler}'; valid: {valid or 'none'}"
        )
    if config.sample.sampler not in KIND_SAMPLERS[obj.kind]:
        raise UserError(
            f"sample.sampler = '{config.sample.sampler}' does not fit objective.kind = "
            f"'{obj.kind}'; use one of: {', '.join(KIND_SAMPLERS[obj.kind])}"
        )
    if obj.kind != "flow" and obj.path != "linear":
        raise UserError(
            f"objective.path = '{obj.path}' only applies to objective.kind = 'flow' "
            f"(got '{obj.kind}'); remove objective.path"
        )

    # In-training proxy FID: the shipped domain network (eval.features = 'fashion-mnist') sees
    # 28x28x1 images; Inception features are for `dispersive eval` on a sample file.
    image = (m.input_size, m.in_channels)
    if config.eval.every > 0 and (config.eval.features != "fashion-mnist" or image != (28, 1)):
        raise UserError(
            f"eval.every = {config.eval.every} computes the in-training proxy FID, which needs "
            f"eval.features = 'fashion-mnist' and 28x28x1 samples (got '{config.eval.features}', "
            f"{m.input_size}x{m.input_size}x{m.in_channels}); set eval.every = 0 and evaluate "
            "samples with `dispersive eval`"
        )

    # Dispersive term.
    if disp.contrastive and obj.kind != "flow":
        raise UserError(
            f"dispersive.contrastive = true is implemented for objective.kind = 'flow' "
            f"(got '{obj.kind}'); set dispersive.contrastive = false"
        )
    if disp.contrastive and obj.two_view == "none":
        raise UserError(
            "dispersive.contrastive = true needs two noisy views; set objective.two_view = "
            "'independent' or 'restricted'"
        )
    if obj.two_view != "none" and not disp.contrastive:
        raise UserError(
            f"objective.two_view = '{obj.two_view}' is only used by the contrastive comparison; "
            "set dispersive.contrastive = true or objective.two_view = 'none'"
        )
    if disp.weight > 0:
        if not disp.layers:
            raise UserError(
                "dispersive.weight > 0 but dispersive.layers is empty; "
                'set dispersive.layers = ["blocks.1"] (see model.block_names)'
            )
        if disp.group_size:
            if disp.scope == "global":
                raise UserError(
                    "dispersive.group_size only applies to scope 'local'; set "
                    "dispersive.group_size = 0 or dispersive.scope = 'local'"
                )
            if disp.group_size < 2:
                raise UserError(
                    f"dispersive.group_size = {disp.group_size}: the loss needs at least 2 "
                    "samples per group (a single sample gives a constant); use >= 2 or 0"
                )
            if local % disp.group_size:
                raise UserError(
                    f"the per-device batch {local} (train.global_batch = {tr.global_batch} over "
                    f"{world_size} device(s)) does not divide into dispersive.group_size = "
                    f"{disp.group_size}; change one of them"
                )
        elif disp.scope == "local" and local < 2:
            raise UserError(
                f"dispersive.weight > 0 needs at least 2 samples per device (the loss of one "
                f"sample is a constant with no gradient), but train.global_batch = "
                f"{tr.global_batch} over {world_size} device(s) gives {local}; raise "
                "train.global_batch or use dispersive.scope = 'global'"
            )
        elif tr.global_batch < 2:
            raise UserError(
                f"dispersive.weight > 0 needs at least 2 samples, train.global_batch = "
                f"{tr.global_batch}; raise train.global_batch"
            )

    # Against the built model.
    if model is not None:
        kind = getattr(model, "kind", None)
        if kind is not None and kind != obj.kind:
            raise UserError(
                f"model {m.name} is a '{kind}' model but objective.kind = '{obj.kind}'; "
                f"set objective.kind = '{kind}' (and a matching sample.sampler)"
            )
        # Checked even at weight 0: the baseline still logs the layer's dispersion statistics.
        if disp.layers:
            from dispersive.taps import resolve_module  # L0, cheap

            for name in disp.layers:
                try:
                    resolve_module(model, name)
                except (KeyError, ValueError, AttributeError, LookupError) as e:
                    msg = " ".join(str(e).strip("'\"").split())
                    raise UserError(
                        f"dispersive.layers: {msg} (model {m.name}; see model.block_names)"
                    ) from None
