"""Which small model trains fastest on a CPU: time of one training step of CPU-sized candidates.

The Fashion-MNIST presets must learn as much as possible per CPU-second. This times one
training step (forward, flow-matching loss, backward, AdamW) of each candidate at 28x28x1 with
10 classes, batch 64, in one process with ``--threads`` threads (the demo and the study run one
thread per run, two runs side by side), steps interleaved, medians. Sample quality per step of
the candidates is in docs/results.md ("Choosing the CPU preset"); together they give quality
per CPU-second.

Usage::

    python benchmarks/cpu_models.py          # writes "cpu_models" in docs/benchmarks.md
    python benchmarks/cpu_models.py --quick  # two candidates, prints only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script and as benchmarks.x
import common

common.ensure_importable()

import torch  # noqa: E402

from dispersive.models import build  # noqa: E402

# name -> (registry name, overrides)
CANDIDATES = {
    "SiT-XS/4 (the preset)": ("SiT-XS/4", {}),
    "SiT-XS/7": ("SiT-XS/7", {}),
    "SiT-T/4": ("SiT-T/4", {}),
    "SiT-T/7": ("SiT-T/7", {}),
    "UNet-T (32 ch, mult 1-2-2, 2 res blocks)": ("UNet-T", {}),
    "UNet 32 ch, mult 1-2, 1 res block": ("UNet-T", {"channel_mult": (1, 2), "num_res_blocks": 1}),
}
QUICK = ("SiT-XS/4 (the preset)", "SiT-XS/7")


def _stepper(name: str, overrides: dict, batch: int):
    torch.manual_seed(0)
    model = build(name, input_size=28, in_channels=1, num_classes=10, overrides=overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    x0, noise = (
        torch.randn(batch, 1, 28, 28, generator=g),
        torch.randn(batch, 1, 28, 28, generator=g),
    )
    t, y = torch.rand(batch, generator=g), torch.randint(0, 10, (batch,), generator=g)
    x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        (model(x_t, t, y) - (noise - x0)).square().mean().backward()
        opt.step()

    return step, sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    common.add_output_argument(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = QUICK if args.quick else tuple(CANDIDATES)
    steppers, params = {}, {}
    for n in names:
        steppers[n], params[n] = _stepper(*CANDIDATES[n], args.batch)
    sec = common.interleaved_medians(steppers, repeats=2 if args.quick else args.repeats, warmup=1)
    ref = sec[names[0]]
    rows = [
        [n, f"{params[n] / 1e6:.2f}M", f"{1e3 * sec[n]:.0f}", f"{1 / sec[n]:.2f}",
         f"{args.batch / sec[n]:.0f}", f"{sec[n] / ref:.2f}x"]
        for n in names
    ]  # fmt: skip
    text = "\n".join(
        [
            "## CPU model choice: one training step of the small candidates",
            "",
            f"`benchmarks/cpu_models.py`; {common.machine_info(args.threads)}; "
            "28x28x1, 10 classes, "
            f"batch {args.batch}, flow-matching loss + backward + AdamW; median of "
            f"{args.repeats} interleaved steps.",
            "",
            common.markdown_table(
                ["model", "parameters", "ms / step", "steps / s", "images / s", "vs preset"], rows
            ),
            "",
            'Quality per step of these models: docs/results.md, "Choosing the CPU preset".',
        ]
    )
    common.publish(text, "cpu_models", args.output, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
