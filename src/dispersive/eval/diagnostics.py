"""Representation diagnostics: the l2 norm of every block's output (paper Fig. 3).

The paper reports that with Dispersive Loss the representation norm grows at the regularised
block and at every other block. :func:`block_norms` measures it: for each noise level t, the
batch is noised to x_t, one forward pass runs with a :class:`dispersive.FeatureTap` on every
block of ``model.block_names``, and each block's output is flattened per sample; the result is
the mean over samples of its l2 norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["block_norms", "norms_table", "plot_norms"]


@torch.no_grad()
def block_norms(
    model: nn.Module,
    x0: Tensor,
    y: Tensor | None,
    *,
    ts: Sequence[float] = (0.1, 0.5, 0.9),
    generator: torch.Generator | None = None,
    path: str = "linear",
    schedule=None,
) -> dict[float, dict[str, float]]:
    """Mean per-sample l2 norm of every block's output, at several noise levels.

    Noising follows the package convention (t = 0 data, t = 1 noise) and the model's kind:
    "flow" -> ``x_t = alpha(t) x0 + sigma(t) e`` on ``path``, ``model(x_t, t, y)``; "meanflow"
    -> the same x_t with h = 0 (the instantaneous velocity); "ddpm" -> step
    ``k = round(t (K - 1))`` of ``schedule`` (default DiT's 1000 linear betas),
    ``x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) e``, ``model(x_k, k, y)``.
    The same noise e is used at every t, so norms at different t differ only by t.

    Args:
        model: a model with ``block_names`` and ``kind``.
        x0: (B, C, H, W) clean data (as the model sees it, e.g. in [-1, 1] or scaled latents).
        y: (B,) long class labels, or None (unconditional, or the null label for conditional
            models: then ``num_classes`` is used).
        ts: noise levels in [0, 1].
        generator: a CPU generator, the source of the noise e (drawn on the CPU, then moved).
        path: interpolant of flow / meanflow models ("linear" or "gvp").
        schedule: a ``DDPMSchedule`` for "ddpm" models.

    Returns:
        ``{t: {block_name: mean l2 norm}}`` with blocks in forward order.
    """
    from dispersive import FeatureTap
    from dispersive.paths import get_path

    names = list(getattr(model, "block_names", []) or [])
    if not names:
        raise ValueError("block_norms needs a model with a non-empty `block_names` list")
    kind = getattr(model, "kind", "flow")
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise ValueError(f"x0 must be a batch (B, ...); got {tuple(x0.shape)}")
    for t in ts:
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"every t must lie in [0, 1] (t = 0 data, t = 1 noise); got {t}")
    b, device = x0.shape[0], x0.device
    ncls = int(getattr(model, "num_classes", 0) or 0)
    if y is None and ncls > 0:
        y = torch.full((b,), ncls, dtype=torch.long, device=device)  # the null label
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(device, x0.dtype)

    was_training = model.training
    model.eval()
    out: dict[float, dict[str, float]] = {}
    try:
        with FeatureTap(model, names, detach=True) as tap:
            for t in ts:
                tt = torch.full((b,), float(t), device=device, dtype=x0.dtype)
                if kind == "ddpm":
                    from dispersive.ddpm import DDPMSchedule

                    sch = schedule or DDPMSchedule()
                    k = round(float(t) * (sch.num_steps - 1))
                    abar = float(sch.alphas_cumprod[k])
                    x_t = abar**0.5 * x0 + (1 - abar) ** 0.5 * noise
                    model(x_t, torch.full_like(tt, float(k)), y)
                else:
                    x_t = get_path(path).interpolate(x0, noise, tt)
                    if kind == "meanflow":
                        model(x_t, tt, torch.zeros_like(tt), y)
                    else:
                        model(x_t, tt, y)
                acts = tap.pop()
                # float64 norms: D can be ~10^5 elements per sample.
                out[float(t)] = {
                    n: float(acts[n].double().flatten(1).norm(dim=1).mean()) for n in names
                }
    finally:
        model.train(was_training)
    return out


def norms_table(norms: dict[float, dict[str, float]], *, highlight: Sequence[str] = ()) -> str:
    """A markdown table: one row per block, one column per t (``*`` marks ``highlight``)."""
    ts = list(norms)
    blocks = list(next(iter(norms.values())))
    lines = [
        "| block | " + " | ".join(f"t={t:g}" for t in ts) + " |",
        "|---|" + "---:|" * len(ts),
    ]
    for n in blocks:
        mark = " *" if n in highlight else ""
        lines.append(f"| {n}{mark} | " + " | ".join(f"{norms[t][n]:.4g}" for t in ts) + " |")
    return "\n".join(lines)


def plot_norms(norms: dict[float, dict[str, float]], path, *, title: str = "") -> None:
    """Save a PNG: block index on x, mean l2 norm on y, one line per t (paper Fig. 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for t, per_block in norms.items():
        ax.plot(
            range(1, len(per_block) + 1), list(per_block.values()), marker="o", label=f"t={t:g}"
        )
    ax.set_xlabel("block (1-indexed)")
    ax.set_ylabel("mean l2 norm of block output")
    ax.set_title(title or "representation norm per block")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
