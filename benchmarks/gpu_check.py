"""The GPU check (``make gpu-check``): what this project does on one CUDA GPU, in one command.

Sections, each with its own time budget inside one overall limit (default 440 s, so the whole
check stays under 8 minutes on one data-centre GPU); a section that would overrun what is left
is skipped and recorded as skipped, with the reason:

1. ``environment``: GPU, driver, torch / CUDA / cuDNN / NCCL versions.
2. ``loss_accuracy``: ``dispersive_loss`` value and gradient on the device vs a float64 CPU
   oracle (the authors' pdist formulation, independent of this package's code) on the same
   input values, for float32 input, bf16 input under bf16 autocast, and fp16 input under fp16
   autocast (backward scaled by GradScaler's initial 2^16, as fp16 training does: without it
   the per-element gradients, ~1/(B D), underflow fp16).
3. ``loss_speed``: forward + backward time and peak memory of ``dispersive_loss`` vs the
   authors' formulation (``benchmarks/loss.py: authors_loss``) at B 16..256 x D up to 196,608.
4. ``train_step``: SiT-B/2 and SiT-XL/2 training steps on 32x32x4 latents (256x256 images),
   with the paper's dispersive settings read from ``configs/imagenet256-sit-*-disp.toml``
   (layer, lambda, tau, groups of 16; the loop's ``DispersiveTerm``), bf16 autocast + TF32,
   fused AdamW; baseline and dispersive arms alternate: images/s, the term's overhead
   (per-round ratio, median and interval), peak memory; eager, then ``torch.compile`` of the
   model with the taps attached. Graph breaks (must be 0) are counted by
   ``torch._dynamo.explain`` over the whole forward in one graph: model, taps and term.
5. ``train_loop``: the training loop itself (``dispersive.train``) on the device: its
   device-side non-finite guard (train/guard.py) against the host-side one on poisoned batches,
   the stop after ``train.max_nonfinite`` bad steps, and the host syncs of a plain step
   (``torch.cuda.set_sync_debug_mode``; on the CPU the tensor reads to Python instead).
6. ``sampling``: Heun (``dispersive.generate``) throughput of SiT-XL/2, batch 256, bf16.
7. ``ddp``: one-process DDP over NCCL started by torchrun (this script's ``--ddp-worker``):
   the tapped, DDP-wrapped model's gradients equal the plain model's.

Writes ``docs/gpu-check.md`` and ``docs/gpu-check.json`` (format: docs/benchmarks.md, "GPU
check"). Exit status 0 when every check passed (skipped sections do not fail), 1 otherwise. On
a machine without CUDA it prints one line and exits 0. ``--device cpu --tiny`` runs every code
path on the CPU at tiny sizes (the test suite does; the numbers mean nothing).

Usage::

    python benchmarks/gpu_check.py                         # on a GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --time-limit 900        # more time, more repeats
    python benchmarks/gpu_check.py --device cpu --tiny --outdir /tmp/gc   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script and as benchmarks.x
from common import REPO, ensure_importable, markdown_table, median_ci, verdict

ensure_importable()

import torch  # noqa: E402

from dispersive import FeatureTap, dispersive_loss  # noqa: E402

SCHEMA = 1
# 7.3 min, + 20 s of watchdog grace + start-up: under the 8 minutes of the issue in any case.
DEFAULT_LIMIT_S = 440.0
WATCHDOG_GRACE_S = 20.0
OVERHEAD_TARGET = 0.01  # the dispersive term's share of a step (issue 14)
DDP_GRAD_TOL = 1e-4  # DDP vs plain gradients, relative to each parameter's largest gradient


# --------------------------------------------------------------------------------------------
# Sizes: the real check and the tiny CPU smoke run share every code path
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    accuracy_cases: tuple[tuple[int, int], ...]  # (B, D)
    speed_b: tuple[int, ...]
    speed_d: tuple[int, ...]
    speed_repeats: int
    # (model name, config with the paper's dispersive settings)
    models: tuple[tuple[str, str], ...]
    input_size: int
    batch: int
    group: int | None  # None: the config's group_size
    step_rounds: int
    sample_model: str
    sample_batch: int
    sample_steps: int  # the paper's Heun steps; measured with fewer when the budget is short
    ddp_model: str  # also the training loop's model (section train_loop)
    loop_sync_steps: int  # n of the host-sync count: runs of n and 2n steps
    compile_backend: str
    budgets: dict[str, tuple[float, float]] = field(default_factory=dict)  # name: (plan, min)


FULL = Sizes(
    accuracy_cases=((16, 3136), (64, 16384), (256, 98304)),
    speed_b=(16, 32, 64, 128, 256),
    speed_d=(3136, 16384, 98304, 196608),
    speed_repeats=20,
    models=(
        ("SiT-B/2", "configs/imagenet256-sit-b2-disp.toml"),
        ("SiT-XL/2", "configs/imagenet256-sit-xl2-disp.toml"),
    ),
    input_size=32,
    batch=32,  # the paper's global 256 on 8 GPUs
    group=None,
    step_rounds=15,
    sample_model="SiT-XL/2",
    sample_batch=256,
    sample_steps=250,
    ddp_model="SiT-S/2",
    loop_sync_steps=4,
    compile_backend="inductor",
    budgets={
        "environment": (5, 1),
        "loss_accuracy": (25, 10),
        "loss_speed": (45, 15),
        "train_step": (215, 60),
        "train_loop": (40, 15),
        "sampling": (55, 20),
        "ddp": (45, 20),
    },
)
TINY = Sizes(
    accuracy_cases=((8, 64), (16, 300)),
    speed_b=(4, 8),
    speed_d=(64, 256),
    speed_repeats=3,
    models=(("SiT-XS/2", "configs/imagenet256-sit-b2-disp.toml"),),
    input_size=8,
    batch=8,
    group=4,
    step_rounds=3,
    sample_model="SiT-XS/2",
    sample_batch=4,
    sample_steps=3,
    ddp_model="SiT-XS/2",
    loop_sync_steps=2,
    compile_backend="eager",  # dynamo's graph capture without inductor's C++ build
    budgets={
        "environment": (5, 1),
        "loss_accuracy": (10, 1),
        "loss_speed": (10, 1),
        "train_step": (60, 1),
        "train_loop": (60, 1),
        "sampling": (10, 1),
        "ddp": (40, 1),
    },
)


# --------------------------------------------------------------------------------------------
# Budgets and small helpers
# --------------------------------------------------------------------------------------------


class Budget:
    """Seconds left for one section; loops ask ``left()`` before another repeat."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def ci(values: list[float]) -> dict:
    mid, lo, hi = median_ci(values)
    return {"median": mid, "lo": lo, "hi": hi, "n": len(values)}


def check(name: str, passed: bool, detail: str) -> dict:
    """A correctness check: any failure makes the exit status 1."""
    return {"name": name, "passed": bool(passed), "detail": detail}


def target(name: str, result: str, detail: str) -> dict:
    """A performance target of the issue: its verdict ("met" / "not met" / "within noise") is
    reported, not enforced (a slower GPU is no bug)."""
    return {"name": name, "verdict": result, "detail": detail}


def authors_loss(z: torch.Tensor) -> torch.Tensor:
    """The authors' formulation, from the loss benchmark (one definition in the project)."""
    if __package__ in (None, ""):
        from loss import authors_loss as f  # type: ignore[import-not-found]  # benchmarks/loss.py
    else:
        from .loss import authors_loss as f

    return f(z)


# --------------------------------------------------------------------------------------------
# 1. Environment
# --------------------------------------------------------------------------------------------


def _nccl_version() -> str | None:
    try:
        v = torch.cuda.nccl.version()  # a tuple (2, 21, 5), or an int in older builds
    except Exception:  # no NCCL in this build
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def section_environment(device: torch.device, sizes: Sizes, budget: Budget) -> dict:
    res: dict = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": str(device),
        "checks": [],
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        res.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            memory_gb=round(p.total_memory / 2**30, 1),
            multiprocessors=p.multi_processor_count,
            gpus_visible=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
            nccl=_nccl_version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            res["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            res["driver"] = None
        res["checks"].append(check("bf16 supported", res["bf16_supported"], p.name))
    else:
        res.update(gpu=None, cpu=platform.processor() or platform.machine())
    return res


# --------------------------------------------------------------------------------------------
# 2. Loss value and gradient vs a float64 CPU oracle
# --------------------------------------------------------------------------------------------

# (input dtype, autocast dtype, loss scale, value tolerance, gradient tolerance). The loss is
# computed in float32 whatever the input, so the value's error is float32 arithmetic; the
# gradient is returned in the input's dtype, so its error is that dtype's rounding (unit
# roundoff bf16 2^-9, fp16 2^-12), measured as a norm-wise relative error.
PRECISIONS = {
    "float32": (torch.float32, None, 1.0, 1e-4, 1e-4),
    "bf16 autocast": (torch.bfloat16, torch.bfloat16, 1.0, 1e-4, 1e-2),
    "fp16 autocast": (torch.float16, torch.float16, 2.0**16, 1e-4, 2e-3),
}


def section_loss_accuracy(device: torch.device, sizes: Sizes, budget: Budget) -> dict:
    rows, checks = [], []
    for b, d in sizes.accuracy_cases:
        for name, (dtype, amp, scale, tol_v, tol_g) in PRECISIONS.items():
            if budget.left() <= 0:
                return {"rows": rows, "checks": checks, "partial": True}
            g = torch.Generator().manual_seed(b * 7 + d)
            z = torch.randn(b, d, generator=g).to(dtype)  # the values both sides see
            # Oracle: the authors' formulation in float64 on the CPU, tau = 1 as theirs.
            z64 = z.double().requires_grad_(True)
            ref = authors_loss(z64)
            ref.backward()
            zd = z.to(device).requires_grad_(True)
            ctx = (
                torch.autocast(device.type, dtype=amp)
                if amp is not None
                else contextlib.nullcontext()
            )
            with ctx:
                loss = dispersive_loss(zd, tau=1.0)
            (loss * scale).backward()
            grad = zd.grad.double().cpu() / scale
            err_v = abs(float(loss.detach()) - float(ref.detach())) / abs(float(ref.detach()))
            err_g = float((grad - z64.grad).norm() / z64.grad.norm())
            underflow = float((zd.grad == 0).double().mean())
            rows.append(
                {
                    "B": b,
                    "D": d,
                    "precision": name,
                    "loss_dtype": str(loss.dtype).replace("torch.", ""),
                    "loss_scale": scale,
                    "value_rel_err": err_v,
                    "grad_rel_err": err_g,
                    "grad_zero_share": underflow,
                    "tol_value": tol_v,
                    "tol_grad": tol_g,
                }
            )
            checks.append(
                check(
                    f"loss B={b} D={d} {name}",
                    loss.dtype == torch.float32 and err_v <= tol_v and err_g <= tol_g,
                    f"value {err_v:.1e} (tol {tol_v:.0e}), gradient {err_g:.1e} "
                    f"(tol {tol_g:.0e}), loss dtype {loss.dtype}",
                )
            )
    return {"rows": rows, "checks": checks}


# --------------------------------------------------------------------------------------------
# 3. Loss speed vs the authors' formulation
# --------------------------------------------------------------------------------------------


def section_loss_speed(device: torch.device, sizes: Sizes, budget: Budget) -> dict:
    impls = {"authors": authors_loss, "dispersive": lambda z: dispersive_loss(z, tau=1.0)}
    rows = []
    cells = [(b, d) for d in sizes.speed_d for b in sizes.speed_b]
    for i, (b, d) in enumerate(cells):
        # Each remaining cell gets an equal share of what is left.
        cell = Budget(budget.left() / (len(cells) - i))
        if budget.left() <= 0:
            return {"rows": rows, "checks": [], "partial": True}
        g = torch.Generator(device=device).manual_seed(0)
        z = torch.randn(b, d, generator=g, device=device).requires_grad_(True)
        z_bytes = z.numel() * z.element_size()

        def fwd_bwd(fn, z=z):
            z.grad = None
            fn(z).backward()

        times: dict[str, list[float]] = {k: [] for k in impls}
        peak: dict[str, int | None] = {}
        for name, fn in impls.items():  # warm-up, and the peak memory of one call
            fwd_bwd(fn)
            sync(device)
            reset_peak(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            fwd_bwd(fn)
            sync(device)
            p = peak_bytes(device)
            peak[name] = None if p is None else p - base
        for r in range(sizes.speed_repeats):
            if r >= 3 and cell.left() <= 0:
                break
            for name in impls if r % 2 == 0 else list(impls)[::-1]:
                times[name].append(timed(lambda fn=impls[name]: fwd_bwd(fn), device))
        ratios = [a / o for a, o in zip(times["authors"], times["dispersive"])]
        rows.append(
            {
                "B": b,
                "D": d,
                "authors_ms": ci([1e3 * t for t in times["authors"]]),
                "dispersive_ms": ci([1e3 * t for t in times["dispersive"]]),
                "speedup": ci(ratios),
                "peak_extra_x_z_authors": None if peak["authors"] is None
                else peak["authors"] / z_bytes,
                "peak_extra_x_z_dispersive": None if peak["dispersive"] is None
                else peak["dispersive"] / z_bytes,
            }
        )  # fmt: skip
        del z
    targets = [
        target(
            f"loss speed-up >= 1x vs the authors' (B={r['B']} D={r['D']})",
            verdict(r["speedup"]["lo"], r["speedup"]["hi"], 1.0, below=False),
            f"{r['speedup']['median']:.2f}x ({r['speedup']['lo']:.2f} to {r['speedup']['hi']:.2f})",
        )
        for r in rows
    ]
    return {"rows": rows, "checks": [], "targets": targets}


# --------------------------------------------------------------------------------------------
# 4. Training steps: eager and compiled, baseline and dispersive
# --------------------------------------------------------------------------------------------


class Step:
    """One SiT, its AdamW (fused), fixed data, and the tap of the config's layers.

    The tap stays attached in both arms (registered before ``torch.compile``, as in the
    training loop): the baseline pops and drops the activations, the dispersive arm adds
    lambda x the training loop's own term (``dispersive.train.step.DispersiveTerm``: the mean
    over layers of the loss on groups of the config's group size, with its finiteness guard).
    """

    def __init__(self, name: str, config: str, device: torch.device, sizes: Sizes):
        import dataclasses

        from dispersive.models import build
        from dispersive.paths import get_path
        from dispersive.train.config import load_config
        from dispersive.train.step import DispersiveTerm

        cfg = load_config(REPO / config)
        disp = cfg.dispersive
        if name != cfg.model.name:  # the tiny run: the config's settings on a smaller model
            disp = dataclasses.replace(disp, layers=("blocks.1",))
        self.layers = list(disp.layers)
        self.weight, self.tau = disp.weight, disp.tau
        self.group = sizes.group or disp.group_size or sizes.batch
        self.term = DispersiveTerm(disp, self.group)
        self.device = device
        torch.manual_seed(0)
        self.model = build(
            name,
            input_size=sizes.input_size,
            in_channels=4,
            num_classes=cfg.model.num_classes,
        ).to(device)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.tap = FeatureTap(self.model, self.layers)
        self.fn = self.model  # replaced by the compiled module
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
            fused=True,
        )
        self.path = get_path(cfg.objective.path)
        g = torch.Generator(device=device).manual_seed(1)
        shape = (sizes.batch, 4, sizes.input_size, sizes.input_size)
        self.x0 = torch.randn(shape, generator=g, device=device)
        self.noise = torch.randn(shape, generator=g, device=device)
        self.t = torch.rand(sizes.batch, generator=g, device=device)
        self.y = torch.randint(0, cfg.model.num_classes, (sizes.batch,), device=device)

    def loss(self, disp: bool, fn: Callable | None = None) -> torch.Tensor:
        """The step's forward: flow matching through ``fn`` (default the step's model, compiled
        or not), the tap's activations and, with ``disp``, lambda x the dispersive term."""
        from dispersive.objectives import flow_matching_loss

        fn = fn or self.fn
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            per_sample = flow_matching_loss(
                lambda x, t: fn(x, t, self.y),
                self.x0,
                t=self.t,
                noise=self.noise,
                path=self.path,
            )
            loss = per_sample.float().mean()
            feats = self.tap.pop()
            feats = feats if isinstance(feats, dict) else {self.layers[0]: feats}
            if disp:
                loss = loss + self.weight * self.term(feats)
        return loss

    def __call__(self, disp: bool) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss(disp).backward()
        self.opt.step()


def graph_breaks(fn: Callable, *args) -> tuple[int, list[str]]:
    """Graph breaks of ``torch.compile(fn)`` on ``args`` and their reasons (first lines), as
    counted by ``torch._dynamo.explain`` (which runs fn once; tests/test_losses_compile.py
    counts the same way)."""
    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(*args)
    return ex.graph_break_count, sorted({str(r.reason).splitlines()[0] for r in ex.break_reasons})


def _arms(step: Step, rounds: int, budget: Budget) -> dict:
    """Alternate baseline and dispersive steps; per-round overhead, images/s, peak memory."""
    dev = step.device
    for disp in (False, True):  # warm-up (and, compiled, the recompile for the other arm)
        step(disp), step(disp)
    times: dict[bool, list[float]] = {False: [], True: []}
    peak: dict[bool, int | None] = {False: None, True: None}
    for r in range(rounds):
        if r >= 3 and budget.left() <= 0:
            break
        for disp in (False, True) if r % 2 == 0 else (True, False):
            reset_peak(dev)
            times[disp].append(timed(lambda disp=disp: step(disp), dev))
            p = peak_bytes(dev)
            peak[disp] = p if peak[disp] is None or p is None else max(p, peak[disp])
    batch = step.x0.shape[0]
    overhead = ci([d / b - 1 for d, b in zip(times[True], times[False])])
    return {
        "step_ms_baseline": ci([1e3 * t for t in times[False]]),
        "step_ms_dispersive": ci([1e3 * t for t in times[True]]),
        "images_per_s_baseline": batch / median_ci(times[False])[0],
        "images_per_s_dispersive": batch / median_ci(times[True])[0],
        "overhead": overhead,
        "overhead_verdict": verdict(overhead["lo"], overhead["hi"], OVERHEAD_TARGET, below=True),
        "peak_gb_baseline": None if peak[False] is None else peak[False] / 2**30,
        "peak_gb_dispersive": None if peak[True] is None else peak[True] / 2**30,
    }


def section_train_step(device: torch.device, sizes: Sizes, budget: Budget) -> dict:
    if device.type == "cuda":  # the training loop's precision settings
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows, checks, targets = [], [], []
    n = len(sizes.models)
    for i, (name, config) in enumerate(sizes.models):
        share = Budget(budget.left() / (n - i))
        step = Step(name, config, device, sizes)
        row: dict = {
            "model": name,
            "params_m": step.params / 1e6,
            "batch": sizes.batch,
            "layers": step.layers,
            "lambda": step.weight,
            "tau": step.tau,
            "group": step.group,
        }
        # Eager gets a third of the model's share, compile (with its compile time) the rest.
        row["eager"] = _arms(step, sizes.step_rounds, Budget(share.left() / 3))
        # Breaks of the whole forward in one graph: model, taps and the dispersive term.
        breaks, reasons = graph_breaks(step.loss, True, step.model)
        torch._dynamo.reset()
        step.fn = torch.compile(step.model, backend=sizes.compile_backend)
        t0 = time.perf_counter()
        step(True)
        sync(device)
        row["compile_s"] = time.perf_counter() - t0
        row["compiled"] = _arms(step, sizes.step_rounds, share)
        row["graph_breaks"] = breaks
        row["graph_break_reasons"] = reasons
        row["compile_backend"] = sizes.compile_backend
        checks.append(
            check(f"{name}: torch.compile with taps, graph breaks", breaks == 0, f"{breaks}")
        )
        for mode in ("eager", "compiled"):
            v = row[mode]["overhead_verdict"]
            o = row[mode]["overhead"]
            targets.append(
                target(
                    f"{name} {mode}: dispersive overhead < {100 * OVERHEAD_TARGET:.0f}%",
                    v,
                    f"{100 * o['median']:+.2f}% ({100 * o['lo']:+.2f} to {100 * o['hi']:+.2f})",
                )
            )
        rows.append(row)
        step.tap.remove()
        del step
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows, "checks": checks, "targets": targets}


# --------------------------------------------------------------------------------------------
# 5. The training loop on the device: its non-finite guard and its host syncs
# --------------------------------------------------------------------------------------------

LOOP_POISONED = (1, 3, 4)  # steps whose batch is NaN in the guard runs (0-based)
LOOP_TOL = 1e-4  # device vs host guard, relative to each tensor's largest value (as DDP)


@contextlib.contextmanager
def _patched(obj: object, name: str, value: object):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def poisoned_build_dataset(bad_calls: set[int]) -> Callable:
    """``dispersive.data.datasets.build_dataset`` (as it is now) whose datasets return NaN
    images on the given ``get_batch`` calls (0-based; the loop makes one per step). Also used
    by tests/test_train_loop.py."""
    import dispersive.data.datasets as data

    real = data.build_dataset

    def build(*args, **kwargs):
        ds = real(*args, **kwargs)
        get, calls = ds.get_batch, [0]

        def get_batch(indices, generator=None):
            x, y = get(indices, generator=generator)
            calls[0] += 1
            return (x * float("nan"), y) if calls[0] - 1 in bad_calls else (x, y)

        ds.get_batch = get_batch
        return ds

    return build


def _poisoned(bad_steps: set[int]):
    """The loop's dataset with NaN images on the batches of the given steps, while in use."""
    import dispersive.data.datasets as data

    return _patched(data, "build_dataset", poisoned_build_dataset(bad_steps))


def _loop_run(
    device: torch.device,
    sizes: Sizes,
    run_dir: Path,
    *extra: str,
    guard: str = "device",
    bad: set[int] = frozenset(),
) -> str:
    """Train ``sizes.ddp_model`` with the loop itself (``dispersive.train``) on synthetic
    data, the dispersive settings of ``sizes.models[0]``'s config, bf16 autocast and fused
    AdamW (the device-side guard's optimizer, also for ``guard="host"``, so that the two guards
    run the same optimizer); returns what the loop wrote to stderr."""
    import io

    import dispersive.train.loop as loop
    from dispersive.train.config import load_config

    config = load_config(REPO / sizes.models[0][1], [
        f'model.name="{sizes.ddp_model}"', f"model.input_size={sizes.input_size}",
        'data.name="synthetic"', "data.synthetic_size=64", f"train.global_batch={sizes.batch}",
        f'train.device="{device.type}"', 'train.precision="bf16"', "eval.every=0",
        "optim.ema_warmup=true", "train.keep_last=1",
        *([f"dispersive.group_size={sizes.group}"] if sizes.group else []), *extra,
    ])  # fmt: skip
    adamw = torch.optim.AdamW
    err = io.StringIO()
    with contextlib.ExitStack() as stack:
        deferred = (device.type,) if guard == "device" else ()
        stack.enter_context(_patched(loop, "_DEFERRED", deferred))
        fused = lambda *a, fused=None, **k: adamw(*a, fused=True, **k)  # noqa: E731
        stack.enter_context(_patched(torch.optim, "AdamW", fused))
        stack.enter_context(_poisoned(set(bad)))
        stack.enter_context(contextlib.redirect_stderr(err))
        loop.train(config, run_dir=run_dir, progress=False)
    return err.getvalue()


def _max_rel_diff(a: dict, b: dict) -> float:
    """Largest difference of model, EMA and optimizer state between two checkpoints, relative
    to each tensor's largest magnitude."""
    pairs = [(a["model"][k], b["model"][k]) for k in a["model"]]
    pairs += [(a["ema"]["shadow"][k], b["ema"]["shadow"][k]) for k in a["ema"]["shadow"]]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    pairs += [(sa[i][k], sb[i][k]) for i in sa for k in sa[i]]
    worst = 0.0
    for x, y in pairs:
        if not x.numel():
            continue
        x, y = x.double(), y.double()
        scale, diff = float(x.abs().max()), float((x - y).abs().max())
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


class HostReads(torch.overrides.TorchFunctionMode):
    """Records the tensor methods that read a value back to Python (``item``, ``bool``, ...)
    while active, in ``names``: on the CPU, where no device sync exists to report, the code's
    own reads. Also used by tests/test_guidance.py."""

    NAMES = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__",
                       "nonzero", "numpy"})  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def _syncs(
    device: torch.device, sizes: Sizes, run_dir: Path, steps: int, weight: float, guard: str
) -> int:
    """Host syncs over a whole run of ``steps`` steps (logging, checkpoint and the device-side
    guard's settle only at the last step): on CUDA those the runtime reports
    (``torch.cuda.set_sync_debug_mode``); elsewhere the reads counted by :class:`HostReads`,
    which include the checks the code runs only on the CPU, where a read costs nothing."""
    import warnings

    run = functools.partial(
        _loop_run, device, sizes, run_dir, f"train.steps={steps}", f"train.log_every={steps}",
        f"train.ckpt_every={steps}", f"train.max_nonfinite={steps + 1}",
        f"dispersive.weight={weight}", guard=guard,
    )  # fmt: skip
    if device.type != "cuda":
        with HostReads() as reads:
            run()
        return len(reads.names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def section_train_loop(device: torch.device, sizes: Sizes, budget: Budget) -> dict:
    """The loop's device-side non-finite guard (train/guard.py) against its host-side one on
    the same device, the stop after ``train.max_nonfinite`` bad steps in a row, and the host
    syncs of a plain step, from the difference of two run lengths."""
    import re
    import tempfile

    from dispersive.errors import UserError
    from dispersive.train.checkpoint import latest_checkpoint, load_checkpoint
    from dispersive.train.config import load_config
    from dispersive.train.logging import read_metrics

    lambda_ = load_config(REPO / sizes.models[0][1]).dispersive.weight

    res: dict = {"model": sizes.ddp_model, "config": sizes.models[0][1],
                 "poisoned_steps": list(LOOP_POISONED)}  # fmt: skip
    checks, targets = [], []
    with tempfile.TemporaryDirectory(prefix="gpu-check-loop-") as tmp:
        tmp = Path(tmp)
        guard = ("train.steps=6", "train.max_nonfinite=3", "train.log_every=2",
                 "train.ckpt_every=6")  # fmt: skip
        runs = {}
        for kind in ("host", "device"):
            log = _loop_run(device, sizes, tmp / kind, *guard, guard=kind, bad=set(LOOP_POISONED))
            runs[kind] = (load_checkpoint(tmp / kind), read_metrics(tmp / kind), log)
        (ha, hm, _), (da, dm, dlog) = runs["host"], runs["device"]
        res["skipped_host"] = [r["nonfinite_skipped"] for r in hm]
        res["skipped_device"] = [r["nonfinite_skipped"] for r in dm]
        res["ema_updates"] = [ha["ema"]["num_updates"], da["ema"]["num_updates"]]
        res["max_rel_state_diff"] = _max_rel_diff(ha, da)
        want = [1, 2, 3]  # skipped so far at the logging steps 2, 4, 6
        checks += [
            check("device-side guard: skipped steps counted as the host-side guard counts them",
                  res["skipped_device"] == res["skipped_host"] == want,
                  f"device {res['skipped_device']}, host {res['skipped_host']}, want {want}"),
            check("device-side guard: EMA updated on the 3 good steps only",
                  res["ema_updates"] == [3, 3], f"num_updates {res['ema_updates']}"),
            check("device-side guard: model, EMA and AdamW state = host-side guard's",
                  res["max_rel_state_diff"] <= LOOP_TOL,
                  f"max relative difference {res['max_rel_state_diff']:.1e}"),
            check("device-side guard: the skip is reported in the log",
                  "with a non-finite loss or gradient skipped" in dlog, "settle message"),
        ]  # fmt: skip
        try:
            _loop_run(device, sizes, tmp / "all", "train.steps=9", "train.max_nonfinite=3",
                      "train.log_every=5", bad=set(range(100)))  # fmt: skip
            stopped, detail = None, "trained 9 bad steps without stopping"
        except UserError as e:
            m = re.search(r"stopped at step (\d+): (\d+) steps in a row", str(e))
            stopped = int(m.group(1)) if m else None
            detail = f"stopped at step {stopped} (at most 3 steps late)" if m else str(e)[:200]
        res["stopped_at_step"] = stopped
        checks.append(check(
            "device-side guard: training stops after max_nonfinite = 3 bad steps, nothing saved",
            stopped is not None and 3 <= stopped <= 6 and latest_checkpoint(tmp / "all") is None,
            detail))  # fmt: skip

        # Host syncs per plain step: (syncs of 2n steps - syncs of n steps) / n. Both runs
        # share start-up and the last step's logging, checkpoint and settle.
        n = sizes.loop_sync_steps
        res["sync_counter"] = (
            "torch.cuda.set_sync_debug_mode" if device.type == "cuda" else "tensor reads (CPU)"
        )
        res["sync_steps"] = n
        res["syncs_per_plain_step"] = {}
        arms = (("baseline", "device", 0.0), ("baseline_host_guard", "host", 0.0),
                ("dispersive", "device", lambda_))  # fmt: skip
        for arm, guard_kind, weight in arms:
            if budget.left() <= 0:
                res["partial"] = True
                break
            s1 = _syncs(device, sizes, tmp / f"s-{arm}-1", n, weight, guard_kind)
            s2 = _syncs(device, sizes, tmp / f"s-{arm}-2", 2 * n, weight, guard_kind)
            res["syncs_per_plain_step"][arm] = (s2 - s1) / n
        per_step = res["syncs_per_plain_step"]
        if device.type == "cuda" and "baseline" in per_step:
            targets.append(target(
                "host syncs per plain training step (baseline loop, device-side guard)",
                "met" if per_step["baseline"] == 0 else "not met",
                f"{per_step['baseline']:g}; host-side guard "
                f"{per_step.get('baseline_host_guard', 'not measured')}, dispersive arm "
                f"{per_step.get('dispersive', 'not measured')}"))  # fmt: skip
    res["checks"], res["targets"] = checks, targets
    return res


# --------------------------------------------------------------------------------------------
# 6. Heun sampling throughput
# --------------------------------------------------------------------------------------------


def section_sampling(device: torch.device, sizes: Sizes, budget: Budget) -> dict:
    from dispersive.generate import generate
    from dispersive.models import build
    from dispersive.samplers import nfe

    torch.manual_seed(0)
    model = build(sizes.sample_model, input_size=sizes.input_size, in_channels=4, num_classes=1000)
    model = model.to(device)
    g = torch.Generator(device=device)

    def run(steps: int) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return timed(
                lambda: generate(
                    model,
                    num=sizes.sample_batch,
                    sampler="heun",
                    steps=steps,
                    batch_size=sizes.sample_batch,
                    device=device,
                    generator=g.manual_seed(0),
                ),
                device,
            )

    run(2)  # warm-up
    probe_steps = 2
    per_nfe = run(probe_steps) / nfe("heun", probe_steps)
    # As many steps as fit in 80% of what is left, up to the paper's 250.
    fit = int(0.8 * budget.left() / per_nfe)
    steps = max(probe_steps, min(sizes.sample_steps, (fit + 1) // 2))
    sec = run(steps)
    calls = nfe("heun", steps)
    res = {
        "model": sizes.sample_model,
        "batch": sizes.sample_batch,
        "steps": steps,
        "nfe": calls,
        "seconds": sec,
        "images_per_s": sizes.sample_batch / sec,
        "ms_per_forward": 1e3 * sec / calls,
        "paper_steps": sizes.sample_steps,
        "images_per_s_at_paper_steps": sizes.sample_batch
        / (sec / calls * nfe("heun", sizes.sample_steps)),
        "checks": [],
    }
    return res


# --------------------------------------------------------------------------------------------
# 7. One-process DDP through torchrun
# --------------------------------------------------------------------------------------------


def ddp_worker(device_type: str, model_name: str, input_size: int) -> None:
    """Run under torchrun: DDP + tap + dispersive term; prints one JSON line (rank 0)."""
    import torch.distributed as dist

    from dispersive.models import build

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(device_type, local) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # The project's init_distributed makes no group for a single process; the check wants one.
    dist.init_process_group(backend=backend)
    try:
        torch.manual_seed(0)
        kw = dict(input_size=input_size, in_channels=4, num_classes=10)
        plain = build(model_name, **kw).to(device)
        wrapped = build(model_name, **kw).to(device)
        wrapped.load_state_dict(plain.state_dict())
        taps = [FeatureTap(m, "blocks.1") for m in (plain, wrapped)]  # before the DDP wrap
        ddp = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device] if device.type == "cuda" else None
        )
        g = torch.Generator(device=device).manual_seed(rank)
        x = torch.randn(8, 4, input_size, input_size, generator=g, device=device)
        t = torch.rand(8, generator=g, device=device)
        y = torch.randint(0, 10, (8,), device=device)
        for model, tap in ((plain, taps[0]), (ddp, taps[1])):
            out = model(x, t, y)
            loss = out.square().mean() + 0.5 * dispersive_loss(tap.pop(), scope="global")
            loss.backward()
        diffs = [
            float((a.grad - b.grad).abs().max() / (a.grad.abs().max() + 1e-30))
            for a, b in zip(plain.parameters(), wrapped.parameters())
            if a.grad is not None
        ]
        ones = torch.ones(1, device=device)
        dist.all_reduce(ones)
        if rank == 0:
            print(
                json.dumps(
                    {
                        "backend": dist.get_backend(),
                        "world_size": dist.get_world_size(),
                        "all_reduce": float(ones),
                        "max_rel_grad_diff": max(diffs),
                        "params_with_grad": len(diffs),
                    }
                ),
                flush=True,
            )
    finally:
        dist.destroy_process_group()


def section_ddp(device: torch.device, sizes: Sizes, budget: Budget) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        str(Path(__file__).resolve()), "--ddp-worker", "--device", device.type,
        "--ddp-model", sizes.ddp_model, "--ddp-input-size", str(sizes.input_size),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=max(5.0, budget.left())
        )
    except subprocess.TimeoutExpired:
        return {"checks": [check("torchrun DDP", False, "timed out")], "timed_out": True}
    wall = time.perf_counter() - t0
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        return {"checks": [check("torchrun DDP", False, " | ".join(tail))], "seconds": wall}
    res = json.loads(lines[-1])
    want = "nccl" if device.type == "cuda" else "gloo"
    res["seconds"] = wall
    res["checks"] = [
        check("torchrun DDP backend", res["backend"] == want, res["backend"]),
        check("all_reduce over the group", res["all_reduce"] == res["world_size"], "sum of ones"),
        check(
            "DDP gradients (tap, dispersive term) = plain model's",
            # Not exactly 0 on CUDA: attention and embedding backward kernels accumulate with
            # atomics, in an order that can differ between two runs.
            res["max_rel_grad_diff"] <= DDP_GRAD_TOL,
            f"max relative difference {res['max_rel_grad_diff']:.1e}",
        ),
    ]
    return res


# --------------------------------------------------------------------------------------------
# Runner and report
# --------------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[torch.device, Sizes, Budget], dict]] = {
    "environment": section_environment,
    "loss_accuracy": section_loss_accuracy,
    "loss_speed": section_loss_speed,
    "train_step": section_train_step,
    "train_loop": section_train_loop,
    "sampling": section_sampling,
    "ddp": section_ddp,
}


def run_all(
    device: torch.device,
    sizes: Sizes,
    limit_s: float,
    only: list[str],
    result: dict,
    argv: list[str],
) -> dict:
    """Run the chosen sections in order into ``result`` (filled as it goes, so that the
    watchdog can write what is done). A section gets what is left minus the plans of the later
    sections (at least their minimums when time is short), and is skipped below its minimum."""
    start = time.perf_counter()
    deadline = start + limit_s
    names = [n for n in SECTIONS if n in only]
    result.update(
        schema=SCHEMA,
        started_utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command=" ".join(["python", "benchmarks/gpu_check.py", *argv]),
        time_limit_s=limit_s,
        sections={},
    )
    for i, name in enumerate(names):
        plan, minimum = sizes.budgets[name]
        left = deadline - time.perf_counter()
        later = names[i + 1 :]
        give = left - sum(sizes.budgets[n][0] for n in later)
        if give < minimum:  # squeeze the later sections to their minimums
            give = min(plan, left - sum(sizes.budgets[n][1] for n in later))
        if give < minimum:
            result["sections"][name] = {
                "status": "skipped",
                "reason": f"time limit: {max(give, 0):.0f} s left for it, needs {minimum:.0f} s",
                "budget_s": max(give, 0.0),
                "checks": [],
            }
            print(f"[gpu-check] {name}: skipped (time limit)", flush=True)
            continue
        print(f"[gpu-check] {name} (budget {give:.0f} s) ...", flush=True)
        t0 = time.perf_counter()
        try:
            res = SECTIONS[name](device, sizes, Budget(give))
            res["status"] = "ok" if all(c["passed"] for c in res["checks"]) else "failed"
        except Exception as e:  # a broken section is recorded; the others still run
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:500]
            res = {"status": "error", "reason": msg, "checks": [check(name, False, msg)]}
        res["seconds"] = time.perf_counter() - t0
        res["budget_s"] = give
        result["sections"][name] = res
        print(f"[gpu-check] {name}: {res['status']} in {res['seconds']:.1f} s", flush=True)
    return finish(result, start)


def finish(result: dict, start: float) -> dict:
    result["elapsed_s"] = time.perf_counter() - start
    secs = result.get("sections", {})
    checks = [c for s in secs.values() for c in s["checks"]]
    result["checks_passed"] = sum(c["passed"] for c in checks)
    result["checks_total"] = len(checks)
    result["passed"] = all(c["passed"] for c in checks) and not any(
        s["status"] == "error" for s in secs.values()
    )
    return result


def _ms(c: dict) -> str:
    return f"{c['median']:.2f} ({c['lo']:.2f}-{c['hi']:.2f})"


def _pct(c: dict) -> str:
    return f"{100 * c['median']:+.2f}% ({100 * c['lo']:+.2f} to {100 * c['hi']:+.2f})"


def _gb(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown(result: dict, tiny: bool) -> str:
    secs = result["sections"]
    env = secs.get("environment", {})
    out = [
        "# GPU check",
        "",
        f"`{result['command']}`; {result['started_utc']}; {result['elapsed_s']:.0f} s of a "
        f"{result['time_limit_s']:.0f} s limit; checks passed: {result['checks_passed']} / "
        f"{result['checks_total']}; overall: **{'pass' if result['passed'] else 'FAIL'}**.",
        'Format and meaning of every field: docs/benchmarks.md, "GPU check".',
    ]
    if tiny:
        out += ["", "**Tiny CPU smoke run: code paths only, the numbers mean nothing.**"]
    if result.get("aborted"):
        out += ["", f"**Aborted: {result['aborted']}; the sections below are what finished.**"]
    out += ["", "## Sections", ""]
    out.append(
        markdown_table(
            ["section", "status", "seconds", "budget (s)", "note"],
            [
                [
                    n,
                    s["status"],
                    f"{s.get('seconds', 0):.1f}",
                    f"{s['budget_s']:.0f}",
                    s.get("reason", "partial (budget)" if s.get("partial") else ""),
                ]
                for n, s in secs.items()
            ],  # fmt: skip
        )
    )
    if env.get("status") == "ok":
        keys = ["gpu", "capability", "memory_gb", "gpus_visible", "driver", "torch", "cuda",
                "cudnn", "nccl", "python", "device"]  # fmt: skip
        out += ["", "## Environment", "", markdown_table(
            ["field", "value"], [[k, env.get(k)] for k in keys if k in env])]  # fmt: skip
    s = secs.get("loss_accuracy", {})
    if s.get("rows"):
        out += ["", "## Loss value and gradient vs the float64 CPU oracle", "",
                "Oracle: the authors' pdist formulation in float64 on the CPU, on the same "
                "input values; tau 1. Errors are relative (gradient: norm-wise).", ""]  # fmt: skip
        out.append(
            markdown_table(
                ["B", "D", "precision", "loss dtype", "value err", "grad err", "grad zeros",
                 "tolerances", "ok"],
                [[r["B"], r["D"], r["precision"]
                  + (f" (x{r['loss_scale']:.0f} loss scale)" if r["loss_scale"] != 1 else ""),
                  r["loss_dtype"], f"{r['value_rel_err']:.1e}", f"{r['grad_rel_err']:.1e}",
                  f"{100 * r['grad_zero_share']:.1f}%",
                  f"{r['tol_value']:.0e} / {r['tol_grad']:.0e}",
                  "yes" if c["passed"] else "**no**"]
                 for r, c in zip(s["rows"], s["checks"])],
            )
        )  # fmt: skip
    s = secs.get("loss_speed", {})
    if s.get("rows"):
        out += ["", "## Loss forward + backward vs the authors' formulation", "",
                "float32, tau 1; median (interval) of interleaved runs; speed-up per round.",
                ""]  # fmt: skip
        out.append(
            markdown_table(
                ["B", "D", "authors (ms)", "dispersive_loss (ms)", "speed-up",
                 "peak extra mem authors (x z)", "ours (x z)"],
                [[r["B"], r["D"], _ms(r["authors_ms"]), _ms(r["dispersive_ms"]),
                  f"{r['speedup']['median']:.2f}x ({r['speedup']['lo']:.2f}-"
                  f"{r['speedup']['hi']:.2f})",
                  _gb(r["peak_extra_x_z_authors"]), _gb(r["peak_extra_x_z_dispersive"])]
                 for r in s["rows"]],
            )
        )  # fmt: skip
    s = secs.get("train_step", {})
    if s.get("rows"):
        out += ["", "## Training steps (bf16 autocast, TF32, fused AdamW)", "",
                "32x32x4 latents (256x256 images); the dispersive settings of the paper's "
                "config; arms alternate; overhead = per-round ratio - 1, median (interval) and "
                "verdict on < 1%.", ""]  # fmt: skip
        table = []
        for r in s["rows"]:
            for mode in ("eager", "compiled"):
                a = r[mode]
                table.append([
                    f"{r['model']} ({r['params_m']:.3g}M)", mode, r["batch"],
                    f"{', '.join(r['layers'])}, lambda {r['lambda']}, tau {r['tau']}, "
                    f"groups of {r['group']}",
                    f"{a['images_per_s_baseline']:.1f}", f"{a['images_per_s_dispersive']:.1f}",
                    f"{_pct(a['overhead'])} {a['overhead_verdict']}",
                    f"{_gb(a['peak_gb_baseline'])} / {_gb(a['peak_gb_dispersive'])}",
                ])  # fmt: skip
        out.append(
            markdown_table(
                ["model", "mode", "batch", "dispersive", "images/s base", "images/s disp",
                 "overhead", "peak GB base / disp"],
                table,
            )
        )  # fmt: skip
        out += [""] + [
            f"- {r['model']}: torch.compile ({r['compile_backend']}) with the taps attached: "
            f"{r['graph_breaks']} graph break(s)"
            + (f" ({'; '.join(r['graph_break_reasons'])})" if r["graph_breaks"] else "")
            + f"; first compiled step {r['compile_s']:.1f} s."
            for r in s["rows"]
        ]
    s = secs.get("train_loop", {})
    if "skipped_device" in s:
        out += ["", "## The training loop's non-finite guard on the device", "",
                f"`dispersive.train` itself: {s['model']} with the dispersive settings of "
                f"`{s['config']}`, bf16 autocast, fused AdamW, synthetic data; the batches of "
                f"steps {s['poisoned_steps']} are NaN. Skipped steps counted at the logging "
                f"steps 2, 4, 6: device-side guard {s['skipped_device']}, host-side guard "
                f"{s['skipped_host']}; EMA updates {s['ema_updates'][1]} / "
                f"{s['ema_updates'][0]}; model, EMA and AdamW state after 6 steps, largest "
                f"relative difference {s['max_rel_state_diff']:.1e}. Every batch NaN, "
                f"`train.max_nonfinite = 3`: stopped at step {s['stopped_at_step']}."]  # fmt: skip
        if s.get("syncs_per_plain_step"):
            out += ["", f"Host syncs per plain step ({s['sync_counter']}; runs of "
                    f"{s['sync_steps']} and {2 * s['sync_steps']} steps): "
                    + ", ".join(f"{k} {v:g}" for k, v in s["syncs_per_plain_step"].items())
                    + "."]  # fmt: skip
    s = secs.get("sampling", {})
    if s.get("status") in ("ok", "failed"):
        out += ["", "## Heun sampling (bf16)", "",
                f"{s['model']}, batch {s['batch']}, {s['steps']} steps (NFE {s['nfe']}), "
                f"random weights: **{s['images_per_s']:.1f} images/s** "
                f"({s['ms_per_forward']:.1f} ms per batch forward); at the paper's "
                f"{s['paper_steps']} steps: {s['images_per_s_at_paper_steps']:.2f} images/s "
                "(scaled by NFE)."]  # fmt: skip
    s = secs.get("ddp", {})
    if "backend" in s:
        out += ["", "## DDP through torchrun (one process)", "",
                f"backend {s['backend']}, world size {s['world_size']}; DDP-wrapped model with "
                f"a tap and the global-scope dispersive term vs the plain model: max relative "
                f"gradient difference {s['max_rel_grad_diff']:.1e}; {s['seconds']:.1f} s "
                "including start-up."]  # fmt: skip
    tg = [t for sec in secs.values() for t in sec.get("targets", [])]
    if tg:
        out += ["", "## Targets (reported, not enforced)", ""]
        out += [f"- {t['name']}: **{t['verdict']}**, {t['detail']}" for t in tg]
    failed = [c for sec in secs.values() for c in sec["checks"] if not c["passed"]]
    if failed:
        out += ["", "## Failed checks", ""] + [f"- {c['name']}: {c['detail']}" for c in failed]
    return "\n".join(out) + "\n"


def write_outputs(result: dict, tiny: bool, outdir: Path | None) -> None:
    text = markdown(result, tiny)
    if outdir is None:
        print(text)
        return
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "gpu-check.json").write_text(json.dumps(result, indent=1) + "\n")
    (outdir / "gpu-check.md").write_text(text)
    print(f"[gpu-check] wrote {outdir / 'gpu-check.md'} and {outdir / 'gpu-check.json'}")


def _watchdog(seconds: float, on_fire: Callable[[], None]) -> threading.Timer:
    """Hard stop a little after the limit if a section hangs (a stuck kernel, a deadlock):
    ``on_fire`` writes what is done, then the process exits with status 3."""

    def fire() -> None:
        print(f"[gpu-check] hard time limit ({seconds:.0f} s) reached; stopping", flush=True)
        with contextlib.suppress(Exception):
            on_fire()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke run of every path)")
    p.add_argument("--time-limit", type=float, default=DEFAULT_LIMIT_S, help="seconds, overall")
    p.add_argument(
        "--outdir",
        type=Path,
        default=None,
        help="where gpu-check.md / gpu-check.json go (default docs/, or nowhere with --tiny)",
    )
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ddp-model", default="SiT-S/2", help=argparse.SUPPRESS)
    p.add_argument("--ddp-input-size", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args.device, args.ddp_model, args.ddp_input_size)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA device here (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda}); nothing measured, nothing written."
        )
        return 0
    if args.time_limit <= 0:
        p.error(f"--time-limit must be > 0 seconds; got {args.time_limit}")
    sizes = TINY if args.tiny else FULL
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    outdir = args.outdir or (None if args.tiny else REPO / "docs")
    result: dict = {"tiny": args.tiny}
    start = time.perf_counter()

    def on_fire() -> None:
        result["aborted"] = "hard time limit: a section overran its budget"
        write_outputs(finish(result, start), args.tiny, outdir)

    timer = _watchdog(args.time_limit + WATCHDOG_GRACE_S, on_fire)
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        run_all(device, sizes, args.time_limit, args.only, result, argv)
    finally:
        timer.cancel()
    write_outputs(result, args.tiny, outdir)
    print(
        f"[gpu-check] {'PASS' if result['passed'] else 'FAIL'}: {result['checks_passed']} / "
        f"{result['checks_total']} checks in {result['elapsed_s']:.0f} s",
        flush=True,
    )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
