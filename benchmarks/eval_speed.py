"""Evaluation speed and sanity distances of the Fashion-MNIST domain features.

Times ``dispersive eval`` on N Fashion-MNIST "samples" (real test images stand in for samples;
the speed does not depend on what the images show):

- against the shipped training-set statistics (FID + IS), in-process and as a CLI subprocess
  (which adds Python/torch start-up);
- against N training images (FID + IS + KID + precision/recall).

Target: 10,000 samples in under a minute on a CPU. Also reports the Fréchet distances that show
the features behave: test set vs training statistics, two halves of the test set, and blurred
copies / uniform noise vs training statistics (should be ordered real << blur < noise).

Usage::

    python benchmarks/eval_speed.py          # N = 10000; writes the "eval" section of
                                             # docs/benchmarks.md
    python benchmarks/eval_speed.py --quick  # N = 2000, prints only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script and as benchmarks.x
import common


def _blur(u, sigma: float = 1.0):
    """Separable Gaussian blur of uint8 (N, 28, 28, 1) images (7 taps), back to uint8."""
    import numpy as np
    import torch

    r = np.arange(-3, 4)
    k = np.exp(-(r**2) / (2 * sigma**2))
    k = torch.tensor(k / k.sum(), dtype=torch.float32)
    x = torch.from_numpy(u[..., 0].astype(np.float32))[:, None]
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, 7), padding=(0, 3))
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 7, 1), padding=(3, 0))
    return x[:, 0, :, :, None].round().clamp(0, 255).to(torch.uint8).numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N = 2000, print only")
    p.add_argument("--num", type=int, default=0, help="number of samples (default 10000)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default="", help="Fashion-MNIST folder (default: the system one)")
    common.add_output_argument(p)
    args = p.parse_args(argv)
    common.ensure_importable()

    import numpy as np
    import torch

    from dispersive.data.datasets import load_fashion_mnist
    from dispersive.eval.features import ASSETS_DIR, REF_STATS_FILE, classifier_metadata
    from dispersive.eval.io import save_npz
    from dispersive.eval.metrics import evaluate

    torch.set_num_threads(args.threads)
    n = args.num or (2000 if args.quick else 10000)
    x_test, _ = load_fashion_mnist(args.data or None, train=False)
    x_train, _ = load_fashion_mnist(args.data or None, train=True)
    if n > len(x_test):
        raise SystemExit(f"--num {n} exceeds the {len(x_test)} test images")
    samples = x_test[:n, :, :, None]
    ref_imgs = x_train[:n, :, :, None]
    stats = ASSETS_DIR / REF_STATS_FILE

    with tempfile.TemporaryDirectory() as tmp:
        s_path = save_npz(Path(tmp) / "samples.npz", samples)
        r_path = save_npz(Path(tmp) / "ref.npz", ref_imgs)
        evaluate(samples[:100], stats, metrics=("fid",))  # warm-up: load + checksum the network

        t0 = time.perf_counter()
        res_stats = evaluate(s_path, stats)
        t_stats = time.perf_counter() - t0
        t0 = time.perf_counter()
        res_full = evaluate(s_path, r_path)
        t_full = time.perf_counter() - t0

        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        env["PYTHONPATH"] = os.pathsep.join([str(common.REPO / "src"), env.get("PYTHONPATH", "")])
        cmd = [
            sys.executable,
            "-m",
            "dispersive",
            "eval",
            "--samples",
            str(s_path),
            "--ref",
            str(r_path),
            "--threads",
            str(args.threads),
        ]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        t_cli = time.perf_counter() - t0
        cli_res = json.loads(out.stdout.strip().splitlines()[-1])

    # Sanity distances under the domain features (FID against training-set statistics).
    def fd(u, ref=stats):
        return evaluate(u, ref, metrics=("fid",))["fid"]

    half = n // 2
    with tempfile.TemporaryDirectory() as tmp:
        half_ref = save_npz(Path(tmp) / "half.npz", samples[half:])
        d_halves = fd(samples[:half], half_ref)
    noise = np.random.default_rng(0).integers(0, 256, samples.shape, dtype=np.uint8)
    d_real, d_blur, d_noise = res_stats["fid"], fd(_blur(samples)), fd(noise)

    meta = classifier_metadata()
    timing = [
        (f"{n} samples vs shipped train stats (FID, IS)", f"{t_stats:.2f}"),
        (f"{n} samples vs {n} train images (FID, IS, KID, P/R)", f"{t_full:.2f}"),
        ("same, `dispersive eval` subprocess (incl. start-up)", f"{t_cli:.2f}"),
    ]
    dists = [
        (f"test set ({n}) vs training-set statistics", f"{d_real:.3f}"),
        (f"two halves of the test set ({half} vs {n - half})", f"{d_halves:.3f}"),
        ("blurred test images (Gaussian, sigma 1 px) vs training stats", f"{d_blur:.3f}"),
        ("uniform noise images vs training stats", f"{d_noise:.3f}"),
    ]
    text = (
        "## Evaluation speed (Fashion-MNIST domain features)\n\n"
        f"`python benchmarks/eval_speed.py{' --quick' if args.quick else ''}`; "
        f"{common.machine_info(args.threads)}.\n"
        f"Domain classifier: test accuracy {meta['test_accuracy']:.4f}, "
        f"sha256 {meta['sha256'][:16]}..., {meta['bytes']} bytes.\n\n"
        + common.markdown_table(["evaluation", "seconds"], timing)
        + "\n\nFréchet distances under the domain features (lower = closer):\n\n"
        + common.markdown_table(["images", "FD"], dists)
        + "\n\nMetrics of the real test images vs training images: "
        + ", ".join(f"{k} {res_full[k]:.4g}" for k in ("fid", "is", "kid", "precision", "recall"))
        + f" (CLI: fid {cli_res['fid']:.4g}).\n"
    )
    common.publish(text, "eval", args.output, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
