"""One SiT-S/2 training step on this CPU: dispersive overhead, achieved GFLOP/s, sampler overhead.

Measured in one run, so the ratios are comparable:

1. fp32 matmul rate of this machine: a 4096^3 matmul (2 n^3 FLOP), median of a few.
2. A training step of SiT-S/2 (paper Table 8) at batch 8 on 32x32x4 "latents" with 1000
   classes: flow-matching loss (linear path), backward, AdamW (the training loop's settings),
   with and without the dispersive term (``dispersive_loss`` on ``blocks.2`` read through a
   ``FeatureTap``; the baseline step has no hook at all). Steps of the two arms alternate and the
   medians are compared. Target: overhead < 1% of the step.
3. Achieved GFLOP/s: FLOPs of forward + backward counted with ``FlopCounterMode`` (attention
   counted through the "math" backend, whose matmuls the counter sees; the timed runs use sdpa),
   divided by the median forward + backward time and by the whole step time; compared with the
   matmul rate (target >= 75%). The share of forward + backward CPU time spent in matmul-type
   kernels (profiler) says whether the step is matmul-bound. The optimizer is also timed
   separately, with the default and with ``fused=True`` AdamW.
4. Sampling: Heun 25 steps (``dispersive.samplers.heun``) per image beside the pure model
   evaluation time (the same number of forwards, NFE, without the sampler). Target: < 3%.

Usage::

    python benchmarks/train_step.py          # full run, writes "train_step" in docs/benchmarks.md
    python benchmarks/train_step.py --quick  # tiny model and few repeats, prints only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import (  # type: ignore[no-redef]
        DEFAULT_REPORT,
        ensure_importable,
        interleaved_medians,
        machine_info,
        markdown_table,
        write_markdown_section,
    )
else:
    from .common import (
        DEFAULT_REPORT,
        ensure_importable,
        interleaved_medians,
        machine_info,
        markdown_table,
        write_markdown_section,
    )

ensure_importable()

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from dispersive import FeatureTap, dispersive_loss  # noqa: E402
from dispersive.models import build, set_attn_backend  # noqa: E402
from dispersive.objectives import flow_matching_loss  # noqa: E402
from dispersive.paths import LinearPath  # noqa: E402
from dispersive.samplers import heun, nfe  # noqa: E402

# Full run: the setting. Quick: a smoke run of the same code on a tiny model.
FULL = dict(model="SiT-S/2", batch=8, repeats=7, matmul_n=4096, matmul_reps=5, heun_steps=25)
QUICK = dict(model="SiT-XS/2", batch=8, repeats=3, matmul_n=1024, matmul_reps=3, heun_steps=3)
LAYER, LAMBDA, TAU = "blocks.2", 0.5, 0.5  # paper defaults: block 3 of 12 (1-indexed)

# Kernels that do the matmul work of a transformer step on CPU (forward and backward).
MATMUL_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
}


def matmul_gflops(n: int, reps: int) -> float:
    """Median fp32 GFLOP/s of an n x n @ n x n matmul (2 n^3 FLOP)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    sec = interleaved_medians({"mm": lambda: torch.mm(a, b, out=out)}, repeats=reps, warmup=1)
    return 2 * n**3 / sec["mm"] / 1e9


class Trainer:
    """Fixed data and one model/optimizer; ``step(disp)`` runs one timed training step."""

    def __init__(self, name: str, batch: int, fused: bool = False):
        torch.manual_seed(0)
        self.model = build(name, input_size=32, in_channels=4, num_classes=1000)
        # The training loop's optimizer (paper Table 8): AdamW, lr 1e-4, betas (0.9, 0.95), wd 0.
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=fused
        )
        g = torch.Generator().manual_seed(1)
        self.x0 = torch.randn(batch, 4, 32, 32, generator=g)
        self.noise = torch.randn(batch, 4, 32, 32, generator=g)
        self.t = torch.rand(batch, generator=g)
        self.y = torch.randint(0, 1000, (batch,), generator=g)
        self.path = LinearPath()
        self.times: dict[str, list[float]] = {}

    def loss(self, disp: bool) -> torch.Tensor:
        tap = FeatureTap(self.model, LAYER) if disp else None
        per_sample = flow_matching_loss(
            lambda x_t, t: self.model(x_t, t, self.y),
            self.x0,
            t=self.t,
            noise=self.noise,
            path=self.path,
        )  # (B,)
        loss = per_sample.mean()
        if tap is not None:
            loss = loss + LAMBDA * dispersive_loss(tap.pop(), tau=TAU)
            tap.remove()
        return loss

    def step(self, disp: bool) -> None:
        arm = "disp" if disp else "base"
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.loss(disp).backward()
        t1 = time.perf_counter()
        self.opt.step()
        t2 = time.perf_counter()
        self.times.setdefault(f"{arm}_fwdbwd", []).append(t1 - t0)
        self.times.setdefault(f"{arm}_opt", []).append(t2 - t1)
        self.times.setdefault(f"{arm}_step", []).append(t2 - t0)

    def median(self, key: str) -> float:
        return statistics.median(self.times[key])

    def fwdbwd_flops(self) -> int:
        # The math backend spells attention as matmuls the counter sees (sdpa on CPU is not
        # registered with FlopCounterMode); the FLOPs are the same algorithm's.
        set_attn_backend(self.model, "math")
        with FlopCounterMode(display=False) as counter:
            self.loss(disp=False).backward()
        set_attn_backend(self.model, "sdpa")
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def matmul_share(self) -> tuple[float, list[tuple[str, float]]]:
        """Share of forward + backward self CPU time in matmul kernels, and the top ops."""
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            self.loss(disp=False).backward()
        self.opt.zero_grad(set_to_none=True)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
        return mm / total, [(e.key, e.self_cpu_time_total / total) for e in top]


def sampler_overhead(model: torch.nn.Module, batch: int, steps: int, repeats: int) -> dict:
    """Heun sampling time per image vs the same number of bare model forwards."""
    model.eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    t = torch.full((batch,), 0.5)
    calls = nfe("heun", steps)

    def fn(x_, t_):
        return model(x_, t_, y)

    def sample():
        with torch.no_grad():
            heun(fn, x, steps=steps)

    def pure():
        with torch.no_grad():
            for _ in range(calls):
                fn(x, t)

    with torch.no_grad():
        fn(x, t)  # warm-up: one forward is enough, a whole sampling run would double the cost
    sec = interleaved_medians({"heun": sample, "model": pure}, repeats=repeats, warmup=0)
    model.train()
    return {
        "nfe": calls,
        "heun_per_image": sec["heun"] / batch,
        "model_per_image": sec["model"] / batch,
        "overhead": sec["heun"] / sec["model"] - 1,
    }


def run(quick: bool, threads: int) -> dict:
    s = QUICK if quick else FULL
    torch.set_num_threads(threads)
    res: dict = {"settings": s}
    res["matmul_gflops"] = matmul_gflops(s["matmul_n"], s["matmul_reps"])
    print(f"matmul {s['matmul_n']}^3: {res['matmul_gflops']:.1f} GFLOP/s", flush=True)

    trainer = Trainer(s["model"], s["batch"])
    res["params"] = sum(p.numel() for p in trainer.model.parameters())
    res["flops"] = trainer.fwdbwd_flops()
    trainer.step(False), trainer.step(True)  # warm-up (allocator, optimizer state)
    trainer.times.clear()
    for r in range(s["repeats"]):
        for disp in (False, True) if r % 2 == 0 else (True, False):
            trainer.step(disp)
    for key in ("base_step", "disp_step", "base_fwdbwd", "base_opt"):
        res[key] = trainer.median(key)
    res["disp_overhead"] = res["disp_step"] / res["base_step"] - 1
    res["matmul_share"], res["top_ops"] = trainer.matmul_share()
    print(
        f"step {res['base_step']:.3f} s, dispersive {res['disp_step']:.3f} s "
        f"({100 * res['disp_overhead']:+.2f}%)",
        flush=True,
    )

    # Optimizer alone: the loop's default AdamW vs fused=True, interleaved.
    fused = Trainer(s["model"], s["batch"], fused=True)
    fused.model.load_state_dict(trainer.model.state_dict())
    for tr in (trainer, fused):
        tr.opt.zero_grad(set_to_none=True)
        tr.loss(False).backward()
    sec = interleaved_medians(
        {"default": trainer.opt.step, "fused": fused.opt.step}, repeats=s["repeats"], warmup=1
    )
    res["opt_default"], res["opt_fused"] = sec["default"], sec["fused"]
    del fused

    res["sampler"] = sampler_overhead(trainer.model, s["batch"], s["heun_steps"], repeats=3)
    return res


def report(res: dict, *, threads: int, quick: bool) -> str:
    s, peak = res["settings"], res["matmul_gflops"]
    gf_fb = res["flops"] / res["base_fwdbwd"] / 1e9
    gf_step = res["flops"] / res["base_step"] / 1e9
    smp = res["sampler"]

    def ok(good: bool) -> str:
        return "yes" if good else "**no**"

    rows = [
        [
            "fp32 matmul rate",
            f"{s['matmul_n']}^3, median of {s['matmul_reps']}",
            f"{peak:.1f} GFLOP/s",
            "",
            "",
        ],
        [
            "training step, baseline",
            f"batch {s['batch']}, median of {s['repeats']}",
            f"{res['base_step']:.3f} s",
            "",
            "",
        ],
        [
            "training step, + dispersive",
            f"`{LAYER}`, lambda {LAMBDA}, tau {TAU}",
            f"{res['disp_step']:.3f} s",
            "",
            "",
        ],
        [
            "dispersive overhead",
            "share of the baseline step",
            f"{100 * res['disp_overhead']:+.2f}%",
            "< 1%",
            ok(res["disp_overhead"] < 0.01),
        ],
        [
            "forward + backward",
            f"{res['flops'] / 1e9:.1f} GFLOP",
            f"{res['base_fwdbwd']:.3f} s = {gf_fb:.1f} GFLOP/s",
            "",
            "",
        ],
        [
            "achieved / matmul rate",
            "forward + backward",
            f"{100 * gf_fb / peak:.1f}%",
            ">= 75%",
            ok(gf_fb / peak >= 0.75),
        ],
        [
            "achieved / matmul rate",
            "whole step (incl. AdamW)",
            f"{100 * gf_step / peak:.1f}%",
            ">= 75%",
            ok(gf_step / peak >= 0.75),
        ],
        [
            "matmul kernels",
            "share of fwd + bwd CPU time",
            f"{100 * res['matmul_share']:.1f}%",
            "",
            "",
        ],
        [
            "AdamW step (loop default)",
            "for-loop implementation",
            f"{res['opt_default']:.3f} s",
            "",
            "",
        ],
        ["AdamW step, fused=True", "", f"{res['opt_fused']:.3f} s", "", ""],
        [
            "Heun sampling per image",
            f"{s['heun_steps']} steps, NFE {smp['nfe']}",
            f"{1e3 * smp['heun_per_image']:.1f} ms",
            "",
            "",
        ],
        [
            "model evaluations per image",
            f"{smp['nfe']} bare forwards",
            f"{1e3 * smp['model_per_image']:.1f} ms",
            "",
            "",
        ],
        [
            "sampler overhead",
            "",
            f"{100 * smp['overhead']:+.2f}%",
            "< 3%",
            ok(smp["overhead"] < 0.03),
        ],
    ]
    top = ", ".join(f"`{k}` {100 * v:.0f}%" for k, v in res["top_ops"])
    return "\n".join(
        [
            "## Training step (SiT, CPU)",
            "",
            f"`benchmarks/train_step.py{' --quick' if quick else ''}`; {machine_info(threads)}.",
            f"Model {s['model']} ({res['params'] / 1e6:.1f}M parameters), 32x32x4 input, 1000 "
            "classes, flow matching (linear path), AdamW. Arms alternate; medians."
            + (" **Quick mode: a tiny model, numbers are not representative.**" if quick else ""),
            "",
            markdown_table(["quantity", "setting", "measured", "target", "met"], rows),
            "",
            f"Top kernels by self CPU time (forward + backward): {top}.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and few repeats (smoke run)")
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"markdown file to update (default {DEFAULT_REPORT} unless --quick)",
    )
    args = p.parse_args(argv)
    res = run(args.quick, args.threads)
    text = report(res, threads=args.threads, quick=args.quick)
    print()
    print(text)
    output = args.output or (None if args.quick else DEFAULT_REPORT)
    if output is not None:
        write_markdown_section(output, "train_step", text)
        print(f"\nwrote section 'train_step' of {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
