"""The two halves of a training step's loss, each built once from the config (EDM style: the
loss is an object the loop calls):

- :class:`TrainingObjective`: ``objective.kind``'s randomness and per-sample loss. One call per
  step returns ``(per-sample loss (B,), tapped features {name: (B', ...)})`` whatever the kind.
- :class:`DispersiveTerm`: ``L_disp`` of the regularised layers (a
  :class:`~dispersive.losses.DispersiveLoss` with its group size), and the dispersion
  statistics of logging steps.

Randomness: t (or the DDPM step, or MeanFlow's (t, r)), noise and label dropout are drawn for
the *global* batch from one generator that is the same on every rank, in this order, then the
contrastive comparison's second view (t2, noise2); each rank keeps its slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dispersive import objectives, timesteps
from dispersive.losses import DispersiveLoss, NonFiniteInputError, distance_stats

__all__ = ["TrainingObjective", "DispersiveTerm", "rep_norms"]


class TrainingObjective:
    """Per-sample loss of ``objective.kind`` on this rank's slice of the global batch.

    Args:
        config: the resolved Config.
        train_model: the model as trained (DDP / compile wrappers included).
        model: the plain model (MeanFlow's jvp runs on it).
        tap: the FeatureTap of the plain model (names as a list, so ``pop()`` is a dict), or None.
        num_classes: the model's class count (0: unconditional); the null label is num_classes.
        rank, world_size: this rank's slice of the global batch.
        generator: draws t, noise and label dropout, the same on every rank.
    """

    def __init__(
        self,
        config: Any,
        *,
        train_model: nn.Module,
        model: nn.Module,
        tap: Any,
        num_classes: int,
        rank: int,
        world_size: int,
        generator: torch.Generator,
    ) -> None:
        self.obj = config.objective
        self.contrastive = config.dispersive.contrastive  # flow only (checked by validate)
        self.train_model, self.model, self.tap = train_model, model, tap
        self.num_classes, self.rank, self.world_size = num_classes, rank, world_size
        self.gen = generator
        self.t_kw = dict(dist=self.obj.t_dist, mean=self.obj.t_mean, std=self.obj.t_std)
        kind = self.obj.kind
        if kind == "flow":
            from dispersive.paths import get_path

            self.path = get_path(self.obj.path)
        elif kind == "ddpm":
            from dispersive.ddpm import DDPMSchedule

            self.schedule = DDPMSchedule()  # DiT: 1000 linear betas 1e-4 .. 0.02
        # The kind's time draw and forward, chosen once.
        self._times = {"flow": self._flow_t, "ddpm": self._ddpm_t, "meanflow": self._meanflow_t}[
            kind
        ]
        flow = self._flow_two_views if self.contrastive else self._flow
        self._forward = {"flow": flow, "ddpm": self._ddpm, "meanflow": self._meanflow}[kind]

    def __call__(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """x (B, C, H, W), y (B,) or None -> (per-sample loss (B,), tapped features)."""
        b = x.shape[0]
        n = b * self.world_size  # the global batch
        sl = slice(self.rank * b, (self.rank + 1) * b)
        shape, dev, gen, obj = (n, *x.shape[1:]), x.device, self.gen, self.obj
        times = {k: v[sl] for k, v in self._times(n, dev).items()}
        noise = torch.randn(shape, generator=gen, device=dev)[sl]
        drop = torch.rand(n, generator=gen, device=dev)[sl]
        if y is not None and obj.label_dropout > 0:
            # Classifier-free guidance training: null label = num_classes (paper: 0.1).
            y = torch.where(drop < obj.label_dropout, torch.full_like(y, self.num_classes), y)
        if self.contrastive:
            # Table 2: a second noisy view of the same images (independent noise).
            t2 = timesteps.two_view_t(
                times["t"], mode=obj.two_view, max_gap=obj.two_view_gap, generator=gen,
                **self.t_kw,
            )  # fmt: skip
            noise2 = torch.randn(shape, generator=gen, device=dev)[sl]
            times["t"], noise = torch.cat([times["t"], t2]), torch.cat([noise, noise2])
        return self._forward(x, y, noise=noise, **times)

    def _flow_t(self, n: int, dev: torch.device) -> dict[str, Tensor]:
        return {"t": timesteps.sample_t(n, **self.t_kw, generator=self.gen, device=dev)}

    def _ddpm_t(self, n: int, dev: torch.device) -> dict[str, Tensor]:
        return {"t": timesteps.sample_steps(n, generator=self.gen, device=dev)}

    def _meanflow_t(self, n: int, dev: torch.device) -> dict[str, Tensor]:
        t, r = timesteps.sample_t_r(
            n, ratio_r_neq_t=self.obj.ratio_r_neq_t, **self.t_kw, generator=self.gen, device=dev
        )
        return {"t": t, "r": r}

    def _feats(self) -> dict[str, Tensor]:
        return self.tap.pop() if self.tap is not None else {}

    def _flow(self, x, y, *, t, noise):
        m = self.train_model
        per_sample = objectives.flow_matching_loss(
            lambda x_t, t_: m(x_t, t_, y), x, t=t, noise=noise, path=self.path
        )
        return per_sample, self._feats()

    def _flow_two_views(self, x, y, *, t, noise):
        # Both views in one forward (DDP expects one forward per backward); the regression
        # loss is on the first view only; the features hold both views (2B, ...).
        m, b = self.train_model, x.shape[0]
        yy = None if y is None else torch.cat([y, y])
        per_sample = objectives.flow_matching_loss(
            lambda x_t, t_: m(x_t, t_, yy), torch.cat([x, x]), t=t, noise=noise, path=self.path
        )
        return per_sample[:b], self._feats()

    def _ddpm(self, x, y, *, t, noise):
        m = self.train_model
        per_sample = objectives.ddpm_loss(
            lambda x_k, k_: m(x_k, k_, y), x, k=t, noise=noise, schedule=self.schedule,
            learn_sigma=True,
        )  # fmt: skip
        return per_sample, self._feats()

    def _meanflow(self, x, y, *, t, r, noise):
        # The jvp runs on the plain model; the tap is read after the gradient forward and comes
        # back as aux.
        obj = self.obj
        per_sample, feats = objectives.meanflow_loss(
            self.train_model, x, t=t, r=r, noise=noise, y=y, jvp_fn=self.model, tap=self.tap,
            adaptive_p=obj.adaptive_p, adaptive_eps=obj.adaptive_eps, cfg_omega=obj.cfg_omega,
            cfg_kappa=obj.cfg_kappa,
            cfg_t_interval=(obj.cfg_t_min, obj.cfg_t_max),
            null_y=self.num_classes if self.num_classes > 0 else None,
        )  # fmt: skip
        return per_sample, feats if feats is not None else {}


class DispersiveTerm:
    """``L_disp`` of ``dispersive.layers`` (their mean) and its logging statistics.

    Args:
        disp: ``Config.dispersive``.
        group: samples per loss evaluation (:func:`~dispersive.train.config.dispersive_group_size`).
    """

    def __init__(self, disp: Any, group: int) -> None:
        self.weight, self.layers, self.contrastive = (
            disp.weight,
            list(disp.layers),
            disp.contrastive,
        )
        self.group = group
        opts = dict(
            tau=disp.tau, margin=disp.margin, normalize_by_dim=disp.normalize_by_dim,
            scope=disp.scope, group_size=group if disp.scope == "local" else 0,
        )  # fmt: skip
        self.loss = DispersiveLoss(
            variant=disp.variant, include_diagonal=disp.include_diagonal, **opts
        )
        # The floor gap is InfoNCE-l2's (with the diagonal), the one variant whose floor is
        # -log B, whatever variant is trained.
        same = disp.variant == "infonce_l2" and disp.include_diagonal
        self.floor_loss = self.loss if same else DispersiveLoss(variant="infonce_l2", **opts)
        self.tau, self.normalize_by_dim = disp.tau, disp.normalize_by_dim

    def __call__(self, feats: dict[str, Tensor]) -> Tensor | None:
        """The term without lambda (None at weight 0: exactly the baseline graph)."""
        if self.weight <= 0:
            return None
        if self.contrastive:  # features of both views (2B, ...): first half against second
            terms = [
                _guarded(lambda z: self.loss.contrastive(*z.chunk(2)), feats[n])
                for n in self.layers
            ]
        else:
            terms = [_guarded(self.loss, feats[n]) for n in self.layers]
        # Several layers (Table 3, "all blocks"): their mean, so lambda keeps its meaning
        # whatever the number of layers.
        return torch.stack(terms).mean()

    @torch.no_grad()
    def statistics(self, feats: dict[str, Tensor], loss_disp: Tensor | None) -> dict[str, Any]:
        """Logging steps: the term (also measured in the baseline), its gap to the floor
        -log(group), and on the first group the share of pairs that still give gradient and
        the mean distance. The same keys on every rank (NaN when diverged).

        Each is computed once: the term is the step's own (``loss_disp``) when it has one, the
        floor gap reuses it for InfoNCE-l2, and the distances give only the distance
        statistics (:func:`~dispersive.losses.distance_stats`, no loss of their own)."""
        first = self.layers[0] if self.layers else None
        if first not in feats or self.contrastive:
            return {} if loss_disp is None else {"loss_disp": loss_disp}
        z = feats[first].detach().float()
        ld = loss_disp if loss_disp is not None else _guarded(self.loss, z)
        l2 = ld if self.floor_loss is self.loss else _guarded(self.floor_loss, z)
        stats = {"active_frac": math.nan, "mean_dist": math.nan}
        if _all_finite(z):
            stats = distance_stats(
                z[: self.group], tau=self.tau, normalize_by_dim=self.normalize_by_dim
            )
        return {
            "loss_disp": ld,
            "floor_gap": l2 + math.log(self.group),
            "active_frac": stats["active_frac"],
            "mean_dist": stats["mean_dist"],
        }


@torch.no_grad()
def rep_norms(feats: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    """Paper Fig. 3: the mean l2 norm per sample of each block's output."""
    return {
        f"rep_norm/{n}": torch.linalg.vector_norm(
            feats[n].detach().float().flatten(1), dim=1
        ).mean()
        for n in names
    }


def _guarded(loss: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """``loss(z)``; for diverged activations a NaN term (the loop then skips the step on every
    rank), still computed, so that collectives match across ranks.

    The loss itself finds non-finite input (from its distances, at no extra cost) and raises
    ``NonFiniteInputError``; a separate pass over z every step would cost more than the loss's
    own small-group path. With global scope every rank sees the same gathered z, so all raise
    and retry together."""
    try:
        return loss(z)
    except NonFiniteInputError:
        return loss(z.nan_to_num(0.0, 0.0, 0.0)) * math.nan


def _all_finite(z: Tensor) -> bool:
    # One float64 reduction: any NaN/inf makes the sum non-finite; finite values cannot overflow.
    return bool(torch.isfinite(z.detach().sum(dtype=torch.float64)))
