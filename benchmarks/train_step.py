"""One SiT-S/2 training step on this CPU: dispersive overhead, achieved GFLOP/s, sampler overhead.

Everything is measured in rounds, and in each round the references run next to what they are
the reference of, so that the machine's load (other processes on a shared machine) hits both
alike. Each figure is a median over rounds with a distribution-free ~95% interval of that median
(``common.median_ci``); a target's verdict is "met" / "not met" only when the whole interval is
on one side of it, "within noise" otherwise.

1. Ceilings. (a) The CPU's fp32 FMA peak: cores x FLOP/cycle (vector width from the CPU flags,
   two FMA pipes) x the clock measured by a compiled dependent-add loop: nothing can pass it.
   (b) The best GEMM rate of this machine: several matmul shapes, the training step's own three
   most expensive ones (read from the profiler) and a large square one, timed in every round;
   the round's ceiling is the fastest of them. A model made of those GEMMs cannot run its GEMM
   FLOPs faster than that (the old single 4096^3 reference, timed before the steps, could be
   passed: 112%).
2. A training step of SiT-S/2 (paper Table 8) at batch 8 on 32x32x4 "latents" with 1000
   classes: flow-matching loss (linear path), backward, AdamW (the training loop's settings),
   with and without the dispersive term (``dispersive_loss`` on ``blocks.2`` read through a
   ``FeatureTap``; the baseline step has no hook at all). Overhead = per-round ratio of the
   two arms - 1. Target: < 1% of the step.
3. Achieved GFLOP/s: FLOPs of forward + backward counted with ``FlopCounterMode`` (attention
   counted through the "math" backend, whose matmuls the counter sees; the timed runs use sdpa),
   divided by the forward + backward time and by the whole step time, over the round's GEMM
   ceiling. Target >= 75%. The share of forward + backward CPU time spent in matmul-type
   kernels (profiler) says whether the step is matmul-bound. The optimizer is also timed
   separately, with the default and with ``fused=True`` AdamW.
4. Sampling: Heun (``dispersive.samplers.heun``) per image beside the pure model evaluation
   time (the same number of forwards, NFE, without the sampler), per-round ratio. Target: < 3%.

Usage::

    python benchmarks/train_step.py          # full run, writes "train_step" in docs/benchmarks.md
    python benchmarks/train_step.py --quick  # tiny model and few repeats, prints only
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script and as benchmarks.x
import common

common.ensure_importable()

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from dispersive import FeatureTap, dispersive_loss  # noqa: E402
from dispersive.models import build, set_attn_backend  # noqa: E402
from dispersive.objectives import flow_matching_loss  # noqa: E402
from dispersive.paths import LinearPath  # noqa: E402
from dispersive.samplers import heun, nfe  # noqa: E402

# Full run: the setting. Quick: a smoke run of the same code on a tiny model.
# 11 rounds: the median's interval is then the 2nd to 10th value (coverage 98.8%).
FULL = dict(
    model="SiT-S/2", batch=8, repeats=11, square_n=4096, heun_steps=4, heun_repeats=9, gemm_s=0.3
)
QUICK = dict(
    model="SiT-XS/2", batch=8, repeats=3, square_n=512, heun_steps=2, heun_repeats=3, gemm_s=0.02
)
LAYER, LAMBDA, TAU = "blocks.2", 0.5, 0.5  # paper defaults: block 3 of 12 (1-indexed)
TARGET_OVERHEAD, TARGET_RATE, TARGET_SAMPLER = 0.01, 0.75, 0.03
MODEL_SHAPES = 3  # the step's most expensive GEMM shapes added to the ceiling's set

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


def _gemm_shape(op: str, shapes: list) -> tuple[int, int, int] | None:
    """(M, K, N) of an ``aten::mm`` / ``aten::addmm`` call from the profiler's input shapes."""
    mats = [sh for sh in shapes if isinstance(sh, list) and len(sh) == 2]
    if op not in ("aten::mm", "aten::addmm") or len(mats) < 2:
        return None
    (m, k), (k2, n) = mats[-2], mats[-1]
    return (m, k, n) if k == k2 else None


class GemmSet:
    """fp32 matmuls of several (M, K, N) shapes; ``rates()`` times each once, in GFLOP/s.

    Each timing repeats its matmul enough times to last ``seconds`` (calibrated once), so that
    the small shapes are not dominated by the timer and the call overhead.
    """

    def __init__(self, shapes: list[tuple[int, int, int]], seconds: float):
        g = torch.Generator().manual_seed(0)
        self.cases = []
        for m, k, n in shapes:
            a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
            out = torch.empty(m, n)
            torch.mm(a, b, out=out)  # warm-up
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            inner = max(1, math.ceil(seconds / max(time.perf_counter() - t0, 1e-6)))
            self.cases.append(((m, k, n), a, b, out, inner))

    def rates(self) -> dict[tuple[int, int, int], float]:
        res = {}
        for shape, a, b, out, inner in self.cases:
            t0 = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b, out=out)
            res[shape] = 2 * math.prod(shape) * inner / (time.perf_counter() - t0) / 1e9
        return res


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

    def fwdbwd_flops(self) -> int:
        # The math backend spells attention as matmuls the counter sees (sdpa on CPU is not
        # registered with FlopCounterMode); the FLOPs are the same algorithm's.
        set_attn_backend(self.model, "math")
        with FlopCounterMode(display=False) as counter:
            self.loss(disp=False).backward()
        set_attn_backend(self.model, "sdpa")
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def profile(self) -> tuple[float, list[tuple[str, float]], list[tuple[int, int, int]]]:
        """Share of forward + backward self CPU time in matmul kernels, the top ops, and the
        GEMM shapes (M, K, N) of the step, most expensive first."""
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
        ) as prof:
            self.loss(disp=False).backward()
        self.opt.zero_grad(set_to_none=True)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
        by_shape: dict[tuple[int, int, int], float] = {}
        for e in prof.key_averages(group_by_input_shape=True):
            shape = _gemm_shape(e.key, e.input_shapes)
            if shape is not None:
                by_shape[shape] = by_shape.get(shape, 0.0) + e.self_cpu_time_total
        shapes = sorted(by_shape, key=lambda sh: -by_shape[sh])
        return mm / total, [(e.key, e.self_cpu_time_total / total) for e in top], shapes


def ci(values: list[float]) -> dict:
    mid, lo, hi = common.median_ci(values)
    return {"median": mid, "lo": lo, "hi": hi, "n": len(values)}


def sampler_overhead(model: torch.nn.Module, batch: int, steps: int, repeats: int) -> dict:
    """Heun sampling time per image vs the same number of bare model forwards, per round."""
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
    sec = common.interleaved_times({"heun": sample, "model": pure}, repeats=repeats, warmup=0)
    model.train()
    return {
        "nfe": calls,
        "heun_per_image": ci([s / batch for s in sec["heun"]]),
        "model_per_image": ci([s / batch for s in sec["model"]]),
        "overhead": ci([h / m - 1 for h, m in zip(sec["heun"], sec["model"])]),
    }


def run(
    quick: bool, threads: int, rounds: int | None = None, heun_rounds: int | None = None
) -> dict:
    s = dict(QUICK if quick else FULL)
    if rounds is not None:
        s["repeats"] = rounds
    if heun_rounds is not None:
        s["heun_repeats"] = heun_rounds
    torch.set_num_threads(threads)
    res: dict = {"settings": s, "threads": threads}
    res["fma"] = common.fma_peak_gflops(threads)
    print(
        f"FMA peak {res['fma']['gflops']:.1f} GFLOP/s ({res['fma']['cores']} cores, "
        f"{res['fma']['ghz']:.2f} GHz {res['fma']['ghz_how']})",
        flush=True,
    )

    trainer = Trainer(s["model"], s["batch"])
    res["params"] = sum(p.numel() for p in trainer.model.parameters())
    res["flops"] = trainer.fwdbwd_flops()
    res["matmul_share"], res["top_ops"], shapes = trainer.profile()
    n = s["square_n"]
    gemm_shapes = [*shapes[:MODEL_SHAPES], (n, n, n)]
    gemms = GemmSet(gemm_shapes, s["gemm_s"])
    res["gemm_shapes"] = gemm_shapes

    trainer.step(False), trainer.step(True)  # warm-up (allocator, optimizer state)
    trainer.times.clear()
    gemm_rounds: list[dict] = []
    for r in range(s["repeats"]):
        gemm_rounds.append(gemms.rates())
        for disp in (False, True) if r % 2 == 0 else (True, False):
            trainer.step(disp)
        print(f"round {r + 1}/{s['repeats']}", flush=True)
    tm = trainer.times
    ceiling = [max(g.values()) for g in gemm_rounds]  # the round's fastest GEMM
    res["gemm"] = {sh: ci([g[sh] for g in gemm_rounds]) for sh in gemm_shapes}
    res["ceiling"] = ci(ceiling)
    res["ceiling_max"] = max(ceiling)
    res["ceiling_over_fma"] = ci([c / res["fma"]["gflops"] for c in ceiling])
    for key in ("base_step", "disp_step", "base_fwdbwd"):
        res[key] = ci(tm[key])
    res["disp_overhead"] = ci([d / b - 1 for d, b in zip(tm["disp_step"], tm["base_step"])])
    gf_fb = [res["flops"] / sec / 1e9 for sec in tm["base_fwdbwd"]]
    gf_step = [res["flops"] / sec / 1e9 for sec in tm["base_step"]]
    res["gflops_fwdbwd"] = ci(gf_fb)
    res["rate_fwdbwd"] = ci([a / c for a, c in zip(gf_fb, ceiling)])
    res["rate_step"] = ci([a / c for a, c in zip(gf_step, ceiling)])
    res["rate_fwdbwd_fma"] = ci([a / res["fma"]["gflops"] for a in gf_fb])
    print(
        f"step {res['base_step']['median']:.3f} s, dispersive overhead "
        f"{100 * res['disp_overhead']['median']:+.2f}%, fwd+bwd / ceiling "
        f"{100 * res['rate_fwdbwd']['median']:.1f}%",
        flush=True,
    )

    # Optimizer alone: the loop's default AdamW vs fused=True, interleaved.
    fused = Trainer(s["model"], s["batch"], fused=True)
    fused.model.load_state_dict(trainer.model.state_dict())
    for tr in (trainer, fused):
        tr.opt.zero_grad(set_to_none=True)
        tr.loss(False).backward()
    sec = common.interleaved_times(
        {"default": trainer.opt.step, "fused": fused.opt.step}, repeats=s["repeats"], warmup=1
    )
    res["opt_default"], res["opt_fused"] = ci(sec["default"]), ci(sec["fused"])
    del fused

    res["sampler"] = sampler_overhead(
        trainer.model, s["batch"], s["heun_steps"], repeats=s["heun_repeats"]
    )
    return res


def _ci_pct(c: dict, signed: bool = False) -> str:
    fmt = "{:+.2f}" if signed else "{:.1f}"
    return common.fmt_ci(100 * c["median"], 100 * c["lo"], 100 * c["hi"], fmt, "%")


def report(res: dict, *, threads: int, quick: bool, command_args: str = "") -> str:
    s, fma, smp = res["settings"], res["fma"], res["sampler"]
    n = s["square_n"]

    def shape_name(sh: tuple[int, int, int]) -> str:
        return f"{n}^3 (square)" if sh == (n, n, n) else f"{sh[0]}x{sh[1]} @ {sh[1]}x{sh[2]}"

    rows = [
        [
            "fp32 FMA peak",
            f"{fma['cores']} cores x {fma['flops_per_cycle']} FLOP/cycle "
            f"({fma['flops_per_cycle_how']}) x {fma['ghz']:.2f} GHz ({fma['ghz_how']})",
            f"{fma['gflops']:.1f} GFLOP/s",
            "",
            "",
        ]
    ]
    for sh in res["gemm_shapes"]:
        g = res["gemm"][sh]
        where = "model's own" if sh != (n, n, n) else "reference"
        rows.append(
            [
                f"GEMM {shape_name(sh)}",
                where,
                common.fmt_ci(g["median"], g["lo"], g["hi"], "{:.1f}", " GFLOP/s"),
                "",
                "",
            ]
        )
    c = res["ceiling"]
    rows += [
        [
            "GEMM ceiling",
            "fastest shape of each round",
            common.fmt_ci(c["median"], c["lo"], c["hi"], "{:.1f}", " GFLOP/s"),
            "",
            "",
        ],
        ["GEMM ceiling / FMA peak", "", _ci_pct(res["ceiling_over_fma"]), "<= 100%", ""],
        [
            "training step, baseline",
            f"batch {s['batch']}",
            common.fmt_ci(*(res["base_step"][k] for k in ("median", "lo", "hi")), "{:.3f}", " s"),
            "",
            "",
        ],
        [
            "training step, + dispersive",
            f"`{LAYER}`, lambda {LAMBDA}, tau {TAU}",
            common.fmt_ci(*(res["disp_step"][k] for k in ("median", "lo", "hi")), "{:.3f}", " s"),
            "",
            "",
        ],
        [
            "dispersive overhead",
            "per-round ratio of the two arms - 1",
            _ci_pct(res["disp_overhead"], signed=True),
            f"< {100 * TARGET_OVERHEAD:.0f}%",
            common.verdict(
                res["disp_overhead"]["lo"], res["disp_overhead"]["hi"], TARGET_OVERHEAD, below=True
            ),
        ],  # fmt: skip
        [
            "forward + backward",
            f"{res['flops'] / 1e9:.1f} GFLOP (matmuls)",
            common.fmt_ci(
                *(res["gflops_fwdbwd"][k] for k in ("median", "lo", "hi")), "{:.1f}", " GFLOP/s"
            ),
            "",
            "",
        ],  # fmt: skip
        [
            "achieved / GEMM ceiling",
            "forward + backward",
            _ci_pct(res["rate_fwdbwd"]),
            f">= {100 * TARGET_RATE:.0f}%",
            common.verdict(
                res["rate_fwdbwd"]["lo"], res["rate_fwdbwd"]["hi"], TARGET_RATE, below=False
            ),
        ],
        [
            "achieved / GEMM ceiling",
            "whole step (incl. AdamW)",
            _ci_pct(res["rate_step"]),
            f">= {100 * TARGET_RATE:.0f}%",
            common.verdict(
                res["rate_step"]["lo"], res["rate_step"]["hi"], TARGET_RATE, below=False
            ),
        ],
        ["achieved / FMA peak", "forward + backward", _ci_pct(res["rate_fwdbwd_fma"]), "", ""],
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
            common.fmt_ci(*(res["opt_default"][k] for k in ("median", "lo", "hi")), "{:.3f}", " s"),
            "",
            "",
        ],
        [
            "AdamW step, fused=True",
            "",
            common.fmt_ci(*(res["opt_fused"][k] for k in ("median", "lo", "hi")), "{:.3f}", " s"),
            "",
            "",
        ],
        [
            "Heun sampling per image",
            f"{s['heun_steps']} steps, NFE {smp['nfe']}, batch {s['batch']}",
            common.fmt_ci(
                *(1e3 * smp["heun_per_image"][k] for k in ("median", "lo", "hi")), "{:.1f}", " ms"
            ),
            "",
            "",
        ],  # fmt: skip
        [
            "model evaluations per image",
            f"{smp['nfe']} bare forwards",
            common.fmt_ci(
                *(1e3 * smp["model_per_image"][k] for k in ("median", "lo", "hi")), "{:.1f}", " ms"
            ),
            "",
            "",
        ],  # fmt: skip
        [
            "sampler overhead",
            f"per-round ratio, {smp['overhead']['n']} rounds",
            _ci_pct(smp["overhead"], signed=True),
            f"< {100 * TARGET_SAMPLER:.0f}%",
            common.verdict(
                smp["overhead"]["lo"], smp["overhead"]["hi"], TARGET_SAMPLER, below=True
            ),
        ],
    ]
    top = ", ".join(f"`{k}` {100 * v:.0f}%" for k, v in res["top_ops"])
    return "\n".join(
        [
            "## Training step (SiT, CPU)",
            "",
            f"`benchmarks/train_step.py{' --quick' if quick else ''}{command_args}`; "
            f"{common.machine_info(threads)}.",
            f"Model {s['model']} ({res['params'] / 1e6:.1f}M parameters), 32x32x4 input, 1000 "
            "classes, flow matching (linear path), AdamW. "
            f"{s['repeats']} rounds; in each, every GEMM shape, then the two arms' steps (order "
            "alternating). Figures: median over rounds (a distribution-free ~95% interval of the "
            'median); ratios are taken within a round. A verdict is "met" / "not met" only '
            'when the whole interval is on one side of the target, "within noise" otherwise.'
            + (" **Quick mode: a tiny model, numbers are not representative.**" if quick else ""),
            "",
            common.markdown_table(["quantity", "setting", "measured", "target", "verdict"], rows),
            "",
            f"Top kernels by self CPU time (forward + backward): {top}.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and few repeats (smoke run)")
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    p.add_argument(
        "--rounds", type=int, default=None,
        help=f"rounds of GEMMs and steps (default {FULL['repeats']}): more narrow the intervals",
    )  # fmt: skip
    p.add_argument(
        "--heun-rounds", type=int, default=None,
        help=f"rounds of the sampler-overhead comparison (default {FULL['heun_repeats']})",
    )  # fmt: skip
    common.add_output_argument(p)
    args = p.parse_args(argv)
    for name in ("rounds", "heun_rounds"):
        if getattr(args, name) is not None and getattr(args, name) < 3:
            p.error(f"--{name.replace('_', '-')} must be >= 3 (a median's interval needs them)")
    res = run(args.quick, args.threads, rounds=args.rounds, heun_rounds=args.heun_rounds)
    extra = [f"--threads {args.threads}"]
    extra += [f"--rounds {args.rounds}"] if args.rounds is not None else []
    extra += [f"--heun-rounds {args.heun_rounds}"] if args.heun_rounds is not None else []
    text = report(res, threads=args.threads, quick=args.quick, command_args=" " + " ".join(extra))
    common.publish(text, "train_step", args.output, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
