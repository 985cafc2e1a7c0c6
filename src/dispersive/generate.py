"""Draw images from a model: the right model function, guidance and sampler for its kind.

:func:`generate` is what ``dispersive sample``, the evaluation and the experiment runner call.
It returns the images and a JSON-able sampler spec that every reported number must carry
(PAPER.md: "FID numbers that cannot be compared").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dispersive.guidance import guided
from dispersive.paths import get_path
from dispersive.samplers import (
    ddim_sample,
    ddpm_sample,
    dopri5,
    euler,
    euler_maruyama,
    heun,
    meanflow_sample,
    nfe,
)

__all__ = ["KIND_SAMPLERS", "SAMPLER_OPTIONS", "SPACES", "generate"]

# Where a model's samples live: "pixel" (images in [-1, 1]) or "latent" (e.g. SD-VAE latents,
# about N(0, 1) after scaling: clamping them to [-1, 1] would clip about a third of the values).
SPACES = ("pixel", "latent")

# Which samplers fit which kind of model (``model.kind``).
KIND_SAMPLERS: dict[str, tuple[str, ...]] = {
    "flow": ("euler", "heun", "dopri5", "euler_maruyama"),
    "ddpm": ("ddpm", "ddim"),
    "meanflow": ("meanflow",),
}

# The tunable options of each sampler and their defaults; the resolved values go into the spec.
SAMPLER_OPTIONS: dict[str, dict[str, Any]] = {
    "euler": {},
    "heun": {"final_euler": True},
    "dopri5": {"atol": 1e-6, "rtol": 1e-3},  # SiT's defaults
    "euler_maruyama": {"diffusion": "sigma", "diffusion_scale": 1.0, "last_step": 0.04},
    "ddpm": {"clip_x0": False, "fixed_var": "large"},
    "ddim": {"eta": 0.0, "clip_x0": False},
    "meanflow": {},
}


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if isinstance(config, dict) and "name" in config:
        return str(config["name"])
    return type(model).__name__


def _labels(labels: Tensor | Sequence[int] | None, num: int, num_classes: int) -> Tensor | None:
    if num_classes == 0:
        if labels is not None:
            raise ValueError("labels were given but the model is unconditional (num_classes=0)")
        return None
    if labels is None:
        # Evenly cycled classes, so any num gives a class-balanced set (up to num % classes).
        return torch.arange(num) % num_classes
    y = torch.as_tensor(labels)
    if y.dtype.is_floating_point or y.shape != (num,):
        raise ValueError(
            f"labels must be {num} integer class labels; got {y.dtype} {tuple(y.shape)}"
        )
    y = y.long()
    if int(y.min()) < 0 or int(y.max()) > num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] (or {num_classes}, the null label); "
            f"got values in [{int(y.min())}, {int(y.max())}]"
        )
    return y


def _counting(fn: Callable[..., Tensor], calls: list[int]) -> Callable[..., Tensor]:
    """``fn`` that adds each of its calls to ``calls[-1]`` (the current batch's NFE)."""

    def counted(*args: Any) -> Tensor:
        calls[-1] += 1
        return fn(*args)

    return counted


def generate(
    model: nn.Module,
    *,
    num: int,
    sampler: str = "heun",
    steps: int = 25,
    cfg_scale: float = 1.0,
    cfg_interval: Sequence[float] = (0.0, 1.0),
    cfg_channels: int | None = None,
    labels: Tensor | Sequence[int] | None = None,
    path: str = "linear",
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    schedule: Any = None,
    options: dict[str, Any] | None = None,
    space: str = "pixel",
    decode: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Generate ``num`` images with a trained model.

    The model function depends on ``model.kind``: "flow" -> velocity ``model(x, t, y)`` with the
    ODE/SDE samplers; "ddpm" -> ``model(x, k, y)`` with DDPM/DDIM (k: original step indices);
    "meanflow" -> ``model(z, t, h, y)`` with the MeanFlow sampler (its guidance is trained in,
    so ``cfg_scale`` is normally 1). For DDPM models the guidance interval, given in the
    package's t, is applied to k / T (T = ``schedule.num_steps``), and only the epsilon channels
    are guided (the learned variance comes from the conditional half).

    Guided channels: ``cfg_channels`` = n guides the first n of the model's ``in_channels``
    sample channels and takes the rest from the conditional output. The official DiT and SiT
    code (``forward_with_cfg``) guides 3 of the 4 SD-VAE latent channels, and their published
    FIDs were measured that way: ``cfg_channels=3`` reproduces them (the ImageNet presets set
    it); the default guides every channel.

    Randomness: per batch, the initial noise and then the sampler's noise are drawn in turn from
    ``generator``, so results are reproducible for the same generator seed and batch_size.

    Args:
        model: a model from :func:`dispersive.models.build` (attributes ``kind``,
            ``num_classes``, ``in_channels``, ``input_size``, ``config``).
        num: number of images.
        sampler: one of :data:`KIND_SAMPLERS` [model.kind].
        steps: sampler steps (see :func:`dispersive.samplers.nfe` for model evaluations);
            ignored by the adaptive "dopri5" (recorded as None), whose calls are counted.
        cfg_scale: classifier-free guidance scale (1 = none; needs a class-conditional model).
        cfg_interval: (lo, hi) range of t where guidance applies.
        cfg_channels: number of leading sample channels to guide, 1..in_channels; None = all.
        labels: (num,) class labels; default cycles through 0..num_classes-1. None for
            unconditional models.
        path: interpolant of flow models ("linear" or "gvp"), for the SDE's score.
        generator: source of all randomness (noise, SDE/DDPM steps).
        batch_size: images per forward batch (doubled internally under guidance).
        device: where to run; default the model's device.
        schedule: DDPM schedule for "ddpm" models; default ``DDPMSchedule()`` (DiT's 1000
            linear betas).
        options: sampler options overriding :data:`SAMPLER_OPTIONS` [sampler], e.g.
            ``{"last_step": 0.0}`` for Euler-Maruyama or ``{"eta": 1.0}`` for DDIM.
        space: where the model's samples live, one of :data:`SPACES`. "pixel": images, clamped
            to [-1, 1]. "latent": never clamped; returned as they are, or decoded by ``decode``.
        decode: for ``space="latent"``, a function latents (b, C, h, w) -> images (b, C', H, W)
            in [-1, 1] (a VAE decoder), applied per batch; the decoded pixels are clamped.

    Returns:
        (images, spec): images (num, C, H, W) float32 on the CPU: pixels clamped to [-1, 1], or
        unclamped latents (``space="latent"`` without ``decode``); spec a JSON-able dict
        {"method", "steps", "nfe" (model calls per batch; for "dopri5" the counted calls,
        averaged over batches, with "nfe_per_batch"), "options" (every sampler option,
        resolved), "cfg_scale",
        "cfg_interval", "cfg_channels" (resolved: the number of guided channels), "model",
        "kind", "num", "space", "decoded" (bool), "clamp" ("pixels" or "none": what was
        clamped to [-1, 1]), "path" (flow), "schedule_steps" (ddpm), "seed" (when a generator
        is given)}.
    """
    kind = getattr(model, "kind", None)
    if kind not in KIND_SAMPLERS:
        raise ValueError(f"model.kind must be one of {sorted(KIND_SAMPLERS)}; got {kind!r}")
    if sampler not in KIND_SAMPLERS[kind]:
        raise ValueError(
            f"sampler {sampler!r} does not fit a {kind!r} model; valid samplers for it: "
            f"{list(KIND_SAMPLERS[kind])}"
        )
    if space not in SPACES:
        raise ValueError(f"space must be one of {list(SPACES)}; got {space!r}")
    if decode is not None and space != "latent":
        raise ValueError(
            "decode is for latent models; pass space='latent' with it (pixel samples are images)"
        )
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive integer; got {num!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    num_classes = int(model.num_classes)
    y_all = _labels(labels, num, num_classes)
    cfg_scale = float(cfg_scale)
    lo, hi = (float(v) for v in cfg_interval)
    if cfg_scale != 1.0 and num_classes == 0:
        raise ValueError("cfg_scale != 1 needs a class-conditional model (num_classes > 0)")
    c, size = int(model.in_channels), int(model.input_size)
    if cfg_channels is None:
        cfg_channels = c
    if isinstance(cfg_channels, bool) or not isinstance(cfg_channels, int):
        raise ValueError(f"cfg_channels must be an int or None (all); got {cfg_channels!r}")
    if not 1 <= cfg_channels <= c:
        raise ValueError(
            f"cfg_channels must be in [1, {c}] (the model's in_channels) or None for all; "
            f"got {cfg_channels}"
        )
    unknown = sorted(set(options or {}) - set(SAMPLER_OPTIONS[sampler]))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for sampler {sampler!r}; valid options: "
            f"{sorted(SAMPLER_OPTIONS[sampler])}"
        )
    opts = {**SAMPLER_OPTIONS[sampler], **(options or {})}
    if sampler == "dopri5":
        n_evals, steps = None, None  # adaptive: counted below
    else:
        n_evals = nfe(
            sampler, steps, **({"final_euler": opts["final_euler"]} if sampler == "heun" else {})
        )

    param = next(model.parameters(), None)
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    # Noise in the model's parameter dtype (float32 for a model without parameters).
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    flow_path = get_path(path) if kind == "flow" else None
    if kind == "ddpm":
        if schedule is None:
            from dispersive.ddpm import DDPMSchedule

            schedule = DDPMSchedule()
        learn_sigma = bool(getattr(model, "learn_sigma", model.out_channels == 2 * c))
        total = float(schedule.num_steps)
        interval = (lo * total, hi * total)  # guidance sees k, not t
    else:
        interval = (lo, hi)
    if lo <= 0.0 and hi >= 1.0 and sampler != "dopri5":
        # Every t a fixed-grid sampler produces (0 <= t <= 1; DDPM's k in [0, total)) is inside:
        # guide without testing t, so no value is read back from the device per model call.
        # (dopri5 may step past t_end and interpolate back, and it reads its error every step.)
        interval = None
    # Leading channels only: the rest (DiT's learned variance included) is the conditional half.
    channels = cfg_channels

    images, calls = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, num, batch_size):
                b = min(batch_size, num - start)
                noise = torch.randn(
                    (b, c, size, size),
                    generator=generator,
                    dtype=dtype,
                    device=generator.device if generator is not None else device,
                ).to(device)
                y = None if y_all is None else y_all[start : start + b].to(device)
                if y is None or cfg_scale == 1.0:
                    fn = lambda x, *a, _y=y: model(x, *a, _y)
                else:
                    fn = guided(
                        model,
                        y=y,
                        null_y=num_classes,
                        scale=cfg_scale,
                        interval=interval,
                        channels=channels,
                    )
                calls.append(0)
                fn = _counting(fn, calls)
                if sampler in ("euler", "heun", "meanflow"):
                    run = {"euler": euler, "heun": heun, "meanflow": meanflow_sample}[sampler]
                    x = run(fn, noise, steps=steps, **opts)
                elif sampler == "dopri5":
                    x = dopri5(fn, noise, **opts)
                elif sampler == "euler_maruyama":
                    x = euler_maruyama(
                        fn, noise, steps=steps, path=flow_path, generator=generator, **opts
                    )
                else:
                    run = ddpm_sample if sampler == "ddpm" else ddim_sample
                    x = run(
                        fn,
                        noise,
                        schedule=schedule,
                        steps=steps,
                        learn_sigma=learn_sigma,
                        generator=generator,
                        **opts,
                    )
                # Clamp pixels only: latents are not images and their decoder expects them raw.
                if decode is not None:
                    x = decode(x).clamp(-1, 1)
                elif space == "pixel":
                    x = x.clamp(-1, 1)
                images.append(x.float().cpu())
    finally:
        model.train(was_training)

    if n_evals is None:  # the NFE actually used; the steps adapt to each batch
        mean = sum(calls) / len(calls)
        n_evals = int(mean) if mean == int(mean) else round(mean, 2)
    spec: dict[str, Any] = {
        "method": sampler,
        "steps": steps,
        "nfe": n_evals,
        "options": opts,
        "cfg_scale": cfg_scale,
        "cfg_interval": [lo, hi],
        "cfg_channels": cfg_channels,
        "model": _model_name(model),
        "kind": kind,
        "num": num,
        "space": space,
        "decoded": decode is not None,
        "clamp": "pixels" if space == "pixel" or decode is not None else "none",
    }
    if sampler == "dopri5":
        spec["nfe_per_batch"] = calls
    if kind == "flow":
        spec["path"] = path
    if kind == "ddpm":
        spec["schedule_steps"] = int(schedule.num_steps)
    if generator is not None:
        spec["seed"] = int(generator.initial_seed())
    return torch.cat(images), spec
