"""The dispersive term's cost in a training step, both arms interleaved in one process.

Issue 14, item 2: the Fashion-MNIST preset (``configs/fashion-mnist.toml`` vs
``configs/fashion-mnist-disp.toml``: SiT-XS/4, batch 64, groups of 16 on ``blocks.0``) must
spend < 2% more per step with the term, and SiT-S/2 (32x32x4 latents, groups of 16 on
``blocks.2``) < 1%, everything included: the tap, the grouping, the logging statistics
(``DispersiveTerm.statistics``, ``rep_norms``) and the floor-gap term.

Both arms are built as the training loop builds them (``train/loop.py``: same seed, so the same
initial weights, data and noise; model, EMA, a ``FeatureTap`` on every block, AdamW,
``TrainingObjective``, ``DispersiveTerm``) and each step runs the loop's step body (data,
forward, loss, backward, gradient norm and clipping, AdamW, EMA, and on logging steps the
statistics reduced to one host list as the loop logs them; the JSON line itself, the same for
both arms, is not written). Arms alternate in blocks of ``--block`` steps (A B, then B A, ...).
Every ``--side-every``-th round is a side round: there the term alone and the statistics alone
are timed again on copies of the step's features (outside the timed step), and its steps are
not compared. Running the term a second time in the middle of a step evicts from the caches
what the rest of that step reads, a cost only the dispersive arm would pay.

Each step is timed twice: wall clock, and the CPU time of the calling thread
(``time.thread_time``). With ``torch.set_num_threads(1)`` all of the step's work runs on that
thread (the CPU autograd engine runs the backward on the caller), so its CPU time does not count
the time other processes hold the core: on a loaded machine it is the steadier figure.

The per-step cost of an arm is ``((L - 1) * median(plain steps) + median(logging steps)) / L``
with L the preset's ``train.log_every`` (logging steps in their real proportion; they are
measured more often, every ``--log-every-measured`` steps, so their median is not one sample).
Overhead = cost(dispersive) / cost(baseline) - 1, with a 95% bootstrap interval (rounds of the
paired blocks resampled, logging steps resampled within each arm). "met" only when the whole
interval lies below the target, "not met" when it lies above, "within noise" otherwise.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/train_overhead.py            # both settings, writes docs
    OMP_NUM_THREADS=1 python benchmarks/train_overhead.py --quick    # smoke run, prints only
    OMP_NUM_THREADS=1 python benchmarks/train_overhead.py --only fmnist --rounds 40
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script and as benchmarks.x
import common

common.ensure_importable()

import torch  # noqa: E402

CONFIGS = common.REPO / "configs"
MIN_PLAIN = 6  # plain steps per arm below which the whole-step comparison gets no verdict
SIT_S2 = [
    *common.SIT_S2_LATENTS,
    'dispersive.layers=["blocks.2"]',  # paper: block 3 of 12 (the first quarter of depth)
    "dispersive.group_size=16",
    "dispersive.tau=0.5",
    "train.log_every=100",  # the ImageNet presets' logging interval
]

# name -> (baseline file, dispersive file, shared overrides, batch, full (rounds, block), quick,
#          target)
SETTINGS = {
    "fmnist": (
        "Fashion-MNIST preset (SiT-XS/4, batch 64, 4 groups of 16 on blocks.0)",
        ("fashion-mnist.toml", []),
        ("fashion-mnist-disp.toml", []),
        64, (40, 10), (4, 5), 0.02,
    ),
    "sit-s2": (
        "SiT-S/2, 32x32x4 synthetic latents, batch 16 (1 group of 16 on blocks.2)",
        ("tiny.toml", [*SIT_S2, "dispersive.weight=0"]),
        ("tiny.toml", [*SIT_S2, "dispersive.weight=0.5"]),
        16, (8, 2), (2, 1), 0.01,
    ),
}  # fmt: skip


class Arm:
    """One arm's training state, built as ``train/loop.py`` builds it, and its step."""

    def __init__(self, cfg) -> None:
        from dispersive.taps import FeatureTap
        from dispersive.train.config import dispersive_group_size
        from dispersive.train.ema import EMA
        from dispersive.train.loop import _data
        from dispersive.train.model_init import build_run_model
        from dispersive.train.step import DispersiveTerm, TrainingObjective

        self.cfg, tr = cfg, cfg.train
        torch.manual_seed(tr.seed)
        self.model = model = build_run_model(cfg.model)
        model.train()
        self.num_classes = int(getattr(model, "num_classes", cfg.model.num_classes))
        self.ema = EMA(model, cfg.optim.ema_decay, warmup=cfg.optim.ema_warmup)
        self.block_names = list(getattr(model, "block_names", []))
        tap = FeatureTap(model, list(dict.fromkeys([*self.block_names, *cfg.dispersive.layers])))
        _, self.next_batch, self.data_gen = _data(cfg, tr.global_batch, 0, 1)
        gen = torch.Generator().manual_seed(tr.seed)
        self.params = [p for p in model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay
        )
        self.objective = TrainingObjective(
            cfg, train_model=model, model=model, tap=tap, num_classes=self.num_classes,
            rank=0, world_size=1, generator=gen,
        )  # fmt: skip
        self.term = DispersiveTerm(cfg.dispersive, dispersive_group_size(cfg, 1))
        self.step_count = 0
        # Side measurements (the term alone, the statistics alone), taken out of the step's time.
        self.time_term, self.term_cpu, self.stats_cpu, self.side = False, [], [], (0.0, 0.0)

    def step(self, log_every: int) -> bool:
        """One training step as the loop runs it; returns whether it was a logging step."""
        from dispersive.train.distributed import all_reduce_mean
        from dispersive.train.loop import step_seed
        from dispersive.train.step import rep_norms

        cfg, step, o = self.cfg, self.step_count, self.cfg.optim
        self.data_gen.manual_seed(step_seed(cfg.train.seed, 0, 0, step))
        x, y = self.next_batch()
        y = y if self.num_classes > 0 else None
        per_sample, feats = self.objective(x, y)
        loss_diff = per_sample.float().mean()
        loss_disp = self.term(feats)
        if loss_disp is not None and self.time_term:  # the term alone, on a copy of its input
            zs = {n: feats[n].detach().requires_grad_() for n in self.term.layers}
            w0, c0 = time.perf_counter(), time.thread_time()
            self.term(zs).backward()
            self.term_cpu.append(time.thread_time() - c0)
            self.side = (self.side[0] + time.perf_counter() - w0, self.side[1] + self.term_cpu[-1])
        loss = loss_diff if loss_disp is None else loss_diff + self.term.weight * loss_disp
        log_step = (step + 1) % log_every == 0
        if not log_step:
            feats = {}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in self.params if p.grad is not None]
        )
        if bool(torch.isfinite(grad_norm)):
            if o.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(self.params, o.grad_clip, grad_norm)
            lr = o.lr * (min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else 1.0)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.optimizer.step()
            self.ema.update(self.model, step)
        self.step_count += 1
        if log_step:
            rec = {"loss": loss, "loss_diff": loss_diff, "grad_norm": grad_norm}
            rec |= self.term.statistics(feats, loss_disp) | rep_norms(feats, self.block_names)
            if self.time_term:
                w0, c0 = time.perf_counter(), time.thread_time()
                self.term.statistics(feats, loss_disp)
                self.stats_cpu.append(time.thread_time() - c0)
                self.side = (
                    self.side[0] + time.perf_counter() - w0,
                    self.side[1] + self.stats_cpu[-1],
                )
            values = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in rec.values()])
            self.last_record = dict(zip(rec, all_reduce_mean(values).tolist()))
        return log_step


def _config(file: str, overrides: list[str], batch: int):
    from dispersive.train.config import load_config

    sets = [*overrides, f"train.global_batch={batch}", 'train.device="cpu"', "eval.every=0"]
    cfg = load_config(CONFIGS / file, sets)
    if cfg.data.name == "fashion-mnist":
        from dispersive.data.datasets import build_dataset
        from dispersive.errors import UserError

        try:
            build_dataset(cfg.data, model_cfg=cfg.model)
        except UserError:  # no Fashion-MNIST files here: the same shapes, synthetic pixels
            cfg = load_config(CONFIGS / file, [*sets, 'data.name="synthetic"'])
    return cfg


def measure(
    key: str,
    *,
    rounds: int,
    block: int,
    log_every_measured: int,
    seed: int = 0,
    raw: Path | None = None,
    side_every: int = 4,
) -> dict:
    title, (fa, oa), (fb, ob), batch, _, _, target = SETTINGS[key]
    cfgs = {"baseline": _config(fa, oa, batch), "dispersive": _config(fb, ob, batch)}
    log_every = cfgs["baseline"].train.log_every
    arms = {name: Arm(cfg) for name, cfg in cfgs.items()}
    names = list(arms)
    for name in names:  # warm-up: first-call allocations, on a logging step
        arms[name].step(1)
    # samples[name][r] = [(wall, cpu, is_log), ...] of clean round r. Every side_every-th round
    # is a side round instead: the term alone and the statistics alone are timed there, on
    # copies outside the timed step, and its steps are not compared. Running the term a second
    # time in the middle of a step evicts what the rest of that step reads, a cost only the
    # dispersive arm would pay; clean rounds have no side measurement at all.
    samples: dict[str, list[list[tuple[float, float, bool]]]] = {n: [] for n in names}
    counts = [0, 0]  # clean, side rounds so far: each kind alternates the arms' order
    for r in range(rounds):
        side = side_every > 0 and r % side_every == side_every - 1
        order = names if counts[side] % 2 == 0 else names[::-1]
        counts[side] += 1
        for name in order:
            arm, got = arms[name], []
            arm.time_term = side
            for _ in range(block):
                arm.side = (0.0, 0.0)
                w0, c0 = time.perf_counter(), time.thread_time()
                is_log = arm.step(log_every_measured)
                w, c = time.perf_counter() - w0 - arm.side[0], time.thread_time() - c0 - arm.side[1]
                got.append((w, c, is_log))
            if not side:
                samples[name].append(got)
    side_arm = arms["dispersive"]
    if not side_arm.term_cpu or not side_arm.stats_cpu or not samples[names[0]]:
        raise ValueError(
            f"{rounds} rounds with a side round every {side_every} leave no side or no clean "
            "round, or no logging step in the side rounds: use more rounds (or --block / "
            "--log-every-measured so that a side round holds a logging step)"
        )
    rounds = len(samples[names[0]])  # the clean ones, which the bootstrap resamples
    result = {
        "key": key, "title": title, "batch": batch, "rounds": rounds, "block": block,
        "side_rounds": counts[1], "side_every": side_every,
        "log_every": log_every, "log_every_measured": log_every_measured, "target": target,
        "group": arms["dispersive"].term.group, "layers": arms["dispersive"].term.layers,
        "records": {n: arms[n].last_record for n in names},
    }  # fmt: skip
    rng = random.Random(seed)
    if raw is not None:  # every sample, before any analysis
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(
            json.dumps(
                {
                    "samples": samples,
                    "term_cpu": arms["dispersive"].term_cpu,
                    "stats_cpu": {n: arms[n].stats_cpu for n in names},
                }
            )
        )
    # The term alone: its forward + backward every step, plus the difference its statistics make
    # on logging steps, as a share of the baseline's per-step CPU cost.
    d, b = arms["dispersive"], arms["baseline"]

    def term_share(idx_t, idx_sd, idx_sb, base_cost):
        t = statistics.median(d.term_cpu[k] for k in idx_t)
        sd = statistics.median(d.stats_cpu[k] for k in idx_sd)
        sb = statistics.median(b.stats_cpu[k] for k in idx_sb)
        return (t + (sd - sb) / log_every) / base_cost

    for i, clock in enumerate(("wall", "cpu")):
        per_arm = {n: _costs(samples[n], i, log_every) for n in names}
        point = per_arm["dispersive"]["cost"] / per_arm["baseline"]["cost"] - 1
        boot = []
        for _ in range(2000):
            idx = [rng.randrange(rounds) for _ in range(rounds)]
            picked = {n: [samples[n][j] for j in idx] for n in names}
            if not all(any(not st[2] for rnd in picked[n] for st in rnd) for n in names):
                continue  # no plain step drawn (tiny runs): no estimate from this resample
            c = {n: _costs(picked[n], i, log_every, rng=rng) for n in names}
            boot.append(c["dispersive"]["cost"] / c["baseline"]["cost"] - 1)
        boot.sort()
        lo, hi = boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot)) - 1]
        if clock == "cpu":
            base = per_arm["baseline"]["cost"]
            full = [range(len(x)) for x in (d.term_cpu, d.stats_cpu, b.stats_cpu)]
            alone = [term_share(*full, base)]
            for _ in range(2000):
                ks = [[rng.randrange(len(f)) for _ in f] for f in full]
                alone.append(term_share(*ks, base))
            a_sorted = sorted(alone[1:])
            result["term_alone"] = {
                "share": alone[0], "lo": a_sorted[int(0.025 * len(a_sorted))],
                "hi": a_sorted[int(0.975 * len(a_sorted)) - 1],
                "term_ms": 1e3 * statistics.median(d.term_cpu),
                "stats_ms": (1e3 * statistics.median(b.stats_cpu),
                             1e3 * statistics.median(d.stats_cpu)),
            }  # fmt: skip
            result["term_alone"]["verdict"] = common.verdict(
                result["term_alone"]["lo"], result["term_alone"]["hi"], target, below=True
            )
        result[clock] = {
            "arms": per_arm, "overhead": point, "lo": lo, "hi": hi,
            # A bootstrap over a handful of steps has no idea of the noise: no verdict then.
            "verdict": common.verdict(lo, hi, target, below=True)
            if min(a["n_plain"] for a in per_arm.values()) >= MIN_PLAIN
            else f"too few steps (< {MIN_PLAIN} plain per arm)",
        }  # fmt: skip
    return result


def _costs(rounds_: list, i: int, log_every: int, rng: random.Random | None = None) -> dict:
    plain = [s[i] for rnd in rounds_ for s in rnd if not s[2]]
    logs = [s[i] for rnd in rounds_ for s in rnd if s[2]]
    if rng is not None and logs:  # resample the logging steps too (there are few)
        logs = [rng.choice(logs) for _ in logs]
    m_plain = statistics.median(plain)
    m_log = statistics.median(logs) if logs else m_plain
    q = statistics.quantiles(plain, n=4) if len(plain) > 1 else [m_plain] * 3
    return {
        "cost": ((log_every - 1) * m_plain + m_log) / log_every,
        "plain": m_plain, "log": m_log, "iqr": (q[0], q[2]), "n_plain": len(plain),
        "n_log": len(logs),
    }  # fmt: skip


def report(results: list[dict], *, command: str, threads: int) -> str:
    rows = []
    for r in results:
        for clock, label in (("cpu", "thread CPU"), ("wall", "wall")):
            c = r[clock]
            a, b = c["arms"]["baseline"], c["arms"]["dispersive"]
            rows.append([
                r["title"], label,
                f"{1e3 * a['plain']:.2f} ({1e3 * a['iqr'][0]:.2f}-{1e3 * a['iqr'][1]:.2f})",
                f"{1e3 * b['plain']:.2f} ({1e3 * b['iqr'][0]:.2f}-{1e3 * b['iqr'][1]:.2f})",
                f"{1e3 * a['log']:.1f} / {1e3 * b['log']:.1f}",
                f"{100 * c['overhead']:+.2f}% ({100 * c['lo']:+.2f} to {100 * c['hi']:+.2f})",
                f"< {100 * r['target']:.0f}%", c["verdict"],
            ])  # fmt: skip
        t = r["term_alone"]
        rows.append([
            r["title"], "term alone (thread CPU)", "",
            f"term fwd+bwd {t['term_ms']:.2f}", f"{t['stats_ms'][0]:.1f} / {t['stats_ms'][1]:.1f}",
            f"{100 * t['share']:+.2f}% ({100 * t['lo']:+.2f} to {100 * t['hi']:+.2f})",
            f"< {100 * r['target']:.0f}%", t["verdict"],
        ])  # fmt: skip
    table = common.markdown_table(
        [
            "setting", "clock", "baseline step ms (IQR)", "dispersive step ms (IQR)",
            "logging step ms (base / disp)", "overhead (95% CI)", "target", "verdict",
        ],
        rows,
    )  # fmt: skip
    r0 = results[0]
    plan = ", ".join(
        f"{r['key']}: {r['rounds']} rounds x {r['block']} steps per arm compared, plus "
        f"{r['side_rounds']} side rounds"
        for r in results
    )
    return (
        "## Dispersive term overhead (training step)\n\n"
        f"`{command}`; {common.machine_info(threads)}; float32, one process, both arms built as "
        "the training loop builds them (same seed: same weights, data and noise) and run "
        f"interleaved in blocks of steps ({plan}). "
        "The baseline arm is the preset without the term (weight 0: its tap on every block and "
        "its logging statistics stay, as in the loop). Step = data, forward, loss, backward, "
        "clipping, AdamW, EMA, and on logging steps the statistics as the loop logs them. "
        "Plain steps: median (interquartile range); per-step cost = "
        f"((L - 1) median plain + median logging) / L with L = log_every = {r0['log_every']} "
        f"(logging steps measured every {r0['log_every_measured']} steps). Overhead = cost ratio "
        '- 1 with a 95% bootstrap interval over rounds; the verdict is "met" only when the '
        "whole interval lies below the target. Thread CPU time (`time.thread_time`, torch on 1 "
        "thread) does not count the time other processes hold the core; wall time does. "
        '"term alone": the CPU time of the term\'s forward + backward, run again on a copy of '
        "each step's tapped features outside the timed step in the side rounds (every "
        f"{r0['side_every']}th round; their steps are not compared, since the second run evicts "
        "what the rest of the step reads in one arm only), plus (logging statistics of the "
        "dispersive arm - those of the baseline) / L, as a share of the baseline's per-step CPU "
        "cost: the added work itself, with a much narrower interval than the difference of two "
        "noisy steps.\n\n" + table
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few rounds, prints only")
    p.add_argument("--only", choices=list(SETTINGS), action="append", help="settings to run")
    p.add_argument("--rounds", type=int, help="rounds (default per setting)")
    p.add_argument("--block", type=int, help="steps per arm per round (default per setting)")
    p.add_argument("--log-every-measured", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    common.add_output_argument(p)
    p.add_argument("--raw", type=Path, default=None, help="folder for every sample as JSON")
    p.add_argument(
        "--side-every", type=int, default=4,
        help="every Nth round times the term alone and the statistics alone; its steps are not "
        "compared (default 4)",
    )  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for key in args.only or list(SETTINGS):
        full, quick = SETTINGS[key][4], SETTINGS[key][5]
        rounds, block = quick if args.quick else full
        r = measure(
            key, rounds=args.rounds or rounds, block=args.block or block,
            log_every_measured=args.log_every_measured, raw=args.raw and args.raw / f"{key}.json",
            side_every=args.side_every,
        )  # fmt: skip
        for clock in ("cpu", "wall"):
            c = r[clock]
            print(
                f"{key} [{clock}]: baseline {1e3 * c['arms']['baseline']['cost']:.2f} ms, "
                f"dispersive {1e3 * c['arms']['dispersive']['cost']:.2f} ms, overhead "
                f"{100 * c['overhead']:+.2f}% ({100 * c['lo']:+.2f} to {100 * c['hi']:+.2f}), "
                f"{c['verdict']}",
                flush=True,
            )
        t = r["term_alone"]
        print(
            f"{key} [term alone, cpu]: {t['term_ms']:.3f} ms fwd+bwd, statistics "
            f"{t['stats_ms'][0]:.2f} / {t['stats_ms'][1]:.2f} ms, share {100 * t['share']:.2f}% "
            f"({100 * t['lo']:.2f} to {100 * t['hi']:.2f}), {t['verdict']}",
            flush=True,
        )
        results.append(r)
    command = "OMP_NUM_THREADS=1 python " + " ".join(
        ["benchmarks/train_overhead.py", *(argv if argv is not None else sys.argv[1:])]
    )
    text = report(results, command=command.strip(), threads=args.threads)
    common.publish(text, "train_overhead", args.output, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
