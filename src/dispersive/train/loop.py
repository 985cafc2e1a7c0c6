"""The training loop: one function, read top to bottom (EDM style).

    L = mean_i L_diff(x_i) + lambda * L_disp(Z)        (paper Eq. 1; lambda = dispersive.weight)

Z is read through a :class:`~dispersive.taps.FeatureTap` registered on the plain model before
DDP and ``torch.compile`` wrap it. With ``dispersive.weight = 0`` the loss graph is exactly the
baseline's; the tap only keeps references to the block outputs, which the logging steps use
for the dispersion statistics and the representation norms (paper Fig. 3).

Randomness (exact resume; the same numbers on any number of ranks):

- t, noise and label dropout are drawn for the *global* batch from one generator seeded with
  ``train.seed`` on every rank; each rank keeps its slice. No two ranks share noise, and a run
  on N ranks sees the numbers of one process with the same global batch (results then differ
  only by the order of float additions in the gradient all-reduce).
- Data augmentation (flips) draws from a generator re-seeded every step from
  (seed, rank, step): no per-rank state has to be gathered into the checkpoint.
- The data order comes from ``BatchStream`` (the same permutation on every rank, sliced); its
  position is saved in the checkpoint with the generator and the global RNG states.

Dispersive scope: ``"local"`` (default, the paper's and the authors' per-device loss, optionally
averaged over groups of ``dispersive.group_size`` samples) or ``"global"`` (activations gathered
from all ranks with a differentiable all-gather: the one-process objective on the global batch).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dispersive.atomic import atomic_write
from dispersive.errors import UserError
from dispersive.train.checkpoint import (
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
)
from dispersive.train.config import (
    Config,
    config_to_dict,
    dispersive_group_size,
    dump_toml,
    model_kwargs,
    per_device_batch,
    preflight,
)
from dispersive.train.distributed import (
    all_reduce_mean,
    cleanup_distributed,
    env_world_size,
    init_distributed,
)
from dispersive.train.ema import EMA
from dispersive.train.logging import MetricsLogger, truncate_metrics
from dispersive.train.model_init import build_run_model
from dispersive.train.rundir import CONFIG_FILE, DONE_FILE, RunLock, write_json

__all__ = ["train", "step_seed", "grouped_mean", "PROXY_NOTE"]

PROXY_NOTE = "proxy FID on domain features; not comparable to FID-50K (Inception, ADM suite)"


def step_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers such as (seed, rank, step)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def train(cfg: Config, *, run_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train a model as the config says; rank 0 writes everything under ``run_dir``.

    Works as one plain process and under ``torchrun`` (one process per device, DDP).

    Args:
        cfg: the resolved config (:func:`dispersive.train.config.load_config`).
        run_dir: ``RUN_DIR``: config.toml, metrics.jsonl, tb/, checkpoints/, done.json.
        resume: continue from the latest checkpoint in ``run_dir`` (model, EMA, optimizer, step,
            RNG states, data position) with ``cfg``, which may differ (e.g. more train.steps).
            Without a checkpoint the run starts at step 0.
        progress: show a tqdm progress bar (rank 0).

    Returns:
        The summary also written to ``RUN_DIR/done.json``: steps, wall time, final metrics.

    Raises:
        UserError: a bad config, or ``train.max_nonfinite`` non-finite steps in a row.
    """
    from dispersive import losses, objectives, timesteps
    from dispersive.taps import FeatureTap
    from dispersive.train.data import BatchLoader, BatchStream, ImageFolderDataset, build_dataset

    run_dir = Path(run_dir)
    wall_start = time.perf_counter()
    tr, opt_cfg, disp, obj = cfg.train, cfg.optim, cfg.dispersive, cfg.objective

    # ---- Checks, then distributed setup --------------------------------------------------------
    # Every check runs before any process group exists, so every rank fails the same way.
    preflight(cfg, world_size=env_world_size())
    local_batch = per_device_batch(cfg, env_world_size())
    info = init_distributed(device=tr.device, timeout_s=tr.dist_timeout_s)
    rank, world, device = info.rank, info.world_size, info.device
    global_batch = local_batch * world
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(cleanup_distributed, info)
        try:
            # ---- One writer per run directory (a second --resume of a live run refuses) ------
            if info.is_main:
                cleanup.enter_context(RunLock(run_dir))
            # ---- Precision: TF32 matmuls and bf16 autocast on CUDA ---------------------------
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True

            def autocast() -> contextlib.AbstractContextManager:
                return torch.autocast(
                    device.type, dtype=torch.bfloat16, enabled=tr.precision == "bf16"
                )

            # ---- Model -----------------------------------------------------------------------
            torch.manual_seed(tr.seed)  # the same initial weights on every rank
            # model.init (fine-tuning) sets the starting weights and the official conventions.
            resume_from = latest_checkpoint(run_dir) if resume else None
            model = build_run_model(cfg.model, resume_from=resume_from).to(device)
            model.train()
            num_classes = int(getattr(model, "num_classes", cfg.model.num_classes))
            torch.manual_seed(step_seed(tr.seed, rank, 1))  # per-rank global RNG (if used)
            # EMA before the tap: a deep copy would otherwise copy the tap's hooks as well.
            ema = EMA(model, opt_cfg.ema_decay, warmup=opt_cfg.ema_warmup)

            # One tap on every block (Fig. 3 norms) and on the regularised layers, registered on
            # the plain model before DDP / compile wrap it.
            block_names = list(getattr(model, "block_names", []))
            tap_names = list(dict.fromkeys([*block_names, *disp.layers]))
            tap = FeatureTap(model, tap_names) if tap_names else None
            if tap is not None:
                cleanup.callback(tap.remove)
            group = dispersive_group_size(cfg, world)  # samples per L_disp evaluation

            # ---- Data ------------------------------------------------------------------------
            dataset = build_dataset(cfg.data, model_cfg=cfg.model, train=True, seed=tr.seed)
            stream = BatchStream(
                dataset, batch_size=local_batch, seed=tr.seed, rank=rank, world_size=world
            )
            data_gen = torch.Generator()  # flips; re-seeded every step from (seed, rank, step)
            if isinstance(dataset, ImageFolderDataset):  # decoded in worker processes
                data: Any = BatchLoader(
                    dataset, stream, num_workers=cfg.data.num_workers, generator=data_gen
                )
                next_batch = lambda: next(data)  # noqa: E731
            else:
                data = stream
                next_batch = lambda: dataset.get_batch(next(stream), generator=data_gen)  # noqa: E731
            noise_gen = torch.Generator(device=device).manual_seed(tr.seed)  # same on all ranks

            # ---- Optimizer (paper Table 8: AdamW, constant lr 1e-4, betas 0.9/0.95) ----------
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(
                params, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), weight_decay=opt_cfg.weight_decay
            )

            # ---- Resume, then the run directory (resolved config before step 0) --------------
            step, nonfinite_total = 0, 0
            if resume:
                if info.is_main:
                    remove_stale_temporaries(run_dir)
                ckpt_file = latest_checkpoint(run_dir)
                if ckpt_file is not None:
                    ckpt = load_checkpoint(ckpt_file, map_location="cpu")
                    try:
                        model.load_state_dict(ckpt["model"])
                    except RuntimeError as e:
                        raise UserError(
                            f"{ckpt_file} does not fit the model of the config ("
                            f"{str(e).splitlines()[0]}); model.* cannot change when resuming"
                        ) from None
                    ema.load_state_dict(ckpt["ema"])
                    optimizer.load_state_dict(ckpt["optimizer"])
                    data.load_state_dict(ckpt["data_state"])
                    step = int(ckpt["step"])
                    nonfinite_total = int(ckpt.get("nonfinite_total", 0))
                    restore_rng_state(ckpt["rng"], {"noise": noise_gen})
                    if rank != 0:  # the saved global RNG states are rank 0's
                        torch.manual_seed(step_seed(tr.seed, rank, 1, step))
                    del ckpt
                if info.is_main:
                    truncate_metrics(run_dir, step)
                    where = f"{ckpt_file.name} (step {step})" if ckpt_file else "step 0"
                    print(f"resuming {run_dir} from {where}", file=sys.stderr, flush=True)
            if info.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write(run_dir / CONFIG_FILE, dump_toml(cfg))
                (run_dir / DONE_FILE).unlink(missing_ok=True)

            # ---- Wrappers: DDP, then torch.compile (the tap is already registered) -----------
            train_model: Any = model
            if world > 1:
                train_model = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[device] if device.type == "cuda" else None
                )
            if tr.compile:
                train_model = torch.compile(train_model)

            # ---- Objective pieces ------------------------------------------------------------
            if obj.kind == "flow":
                from dispersive.paths import get_path

                path = get_path(obj.path)
            elif obj.kind == "ddpm":
                from dispersive.schedules import DDPMSchedule

                schedule = DDPMSchedule()  # DiT: 1000 linear betas 1e-4 .. 0.02
            disp_kw = dict(
                variant=disp.variant,
                tau=disp.tau,
                margin=disp.margin,
                normalize_by_dim=disp.normalize_by_dim,
                include_diagonal=disp.include_diagonal,
            )

            def disp_term(z: torch.Tensor, **kw) -> torch.Tensor:
                """L_disp of one layer: global, or the mean over local groups of ``group``.
                ``kw`` override the configured loss options (the InfoNCE-l2 diagnostic)."""
                kw = {**disp_kw, **kw}
                if not _all_finite(z):
                    # Diverged activations: a NaN term (the guard below then skips the step on
                    # every rank), still computed, so that collectives match across ranks.
                    return disp_term(z.nan_to_num(0.0, 0.0, 0.0), **kw) * math.nan
                if disp.scope == "global":
                    return losses.dispersive_loss(z, scope="global", **kw)
                return grouped_mean(lambda g: losses.dispersive_loss(g, **kw), group, z)

            def contrastive_term(z: torch.Tensor, z_pos: torch.Tensor) -> torch.Tensor:
                """The contrastive counterpart, grouped like :func:`disp_term` (Table 2)."""
                if disp.scope == "global":
                    return losses.contrastive_loss(z, z_pos, scope="global", **disp_kw)
                return grouped_mean(
                    lambda a, b: losses.contrastive_loss(a, b, **disp_kw), group, z, z_pos
                )

            # ---- Logging ---------------------------------------------------------------------
            logger = MetricsLogger(
                run_dir, enabled=info.is_main, total_steps=tr.steps, initial_step=step,
                progress=progress,
            )  # fmt: skip
            cleanup.callback(logger.close)
            n_params = sum(p.numel() for p in params)
            logger.write(
                f"{cfg.model.name}: {n_params / 1e6:.2f}M parameters, {world} rank(s) x "
                f"{local_batch} samples, device {device}, steps {step} -> {tr.steps}"
            )
            last_record: dict[str, Any] = {}
            nonfinite_run = 0
            interval_start, interval_step, data_wait = time.perf_counter(), step, 0.0

            # ---- The loop --------------------------------------------------------------------
            while step < tr.steps:
                # Data: this rank's slice of the global batch.
                t_data = time.perf_counter()
                data_gen.manual_seed(step_seed(tr.seed, rank, 0, step))
                x, y = next_batch()
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True) if num_classes > 0 else None
                data_wait += time.perf_counter() - t_data

                # Randomness for the global batch (same on every rank), then this rank's slice.
                sl = slice(rank * local_batch, (rank + 1) * local_batch)
                shape = (global_batch, *x.shape[1:])
                t_kw = dict(dist=obj.t_dist, mean=obj.t_mean, std=obj.t_std)
                if obj.kind == "flow":
                    t = timesteps.sample_t(global_batch, **t_kw, generator=noise_gen, device=device)
                elif obj.kind == "ddpm":
                    t = timesteps.sample_steps(global_batch, generator=noise_gen, device=device)
                else:
                    t, r = timesteps.sample_t_r(
                        global_batch, ratio_r_neq_t=obj.ratio_r_neq_t, **t_kw,
                        generator=noise_gen, device=device,
                    )  # fmt: skip
                    r = r[sl]
                t = t[sl]
                noise = torch.randn(shape, generator=noise_gen, device=device)[sl]
                drop = torch.rand(global_batch, generator=noise_gen, device=device)[sl]
                if y is not None and obj.label_dropout > 0:
                    # Classifier-free guidance training: null label = num_classes (paper: 0.1).
                    y = torch.where(drop < obj.label_dropout, torch.full_like(y, num_classes), y)
                if disp.contrastive:
                    # Table 2: a second noisy view of the same images (independent noise).
                    t2 = objectives.two_view_t(
                        t, mode=obj.two_view, max_gap=obj.two_view_gap, generator=noise_gen,
                        **t_kw,
                    )  # fmt: skip
                    noise2 = torch.randn(shape, generator=noise_gen, device=device)[sl]

                # Forward: per-sample objective; the tap records the block outputs.
                with autocast():
                    if obj.kind == "flow" and disp.contrastive:
                        # Both views in one forward (DDP expects one forward per backward);
                        # the regression loss is on the first view only.
                        yy = None if y is None else torch.cat([y, y])
                        per_sample = objectives.flow_matching_loss(
                            lambda x_t, t_, y_=yy: train_model(x_t, t_, y_), torch.cat([x, x]),
                            t=torch.cat([t, t2]), noise=torch.cat([noise, noise2]), path=path,
                        )[:local_batch]  # fmt: skip
                        feats = tap.pop()
                    elif obj.kind == "flow":
                        per_sample = objectives.flow_matching_loss(
                            lambda x_t, t_, y_=y: train_model(x_t, t_, y_), x, t=t, noise=noise,
                            path=path,
                        )  # fmt: skip
                        feats = tap.pop() if tap is not None else {}
                    elif obj.kind == "ddpm":
                        per_sample = objectives.ddpm_loss(
                            lambda x_k, k_, y_=y: train_model(x_k, k_, y_), x, k=t, noise=noise,
                            schedule=schedule, learn_sigma=True,
                        )  # fmt: skip
                        feats = tap.pop() if tap is not None else {}
                    else:
                        # MeanFlow: the jvp runs on the plain model; the tap is read after the
                        # gradient forward and comes back as aux.
                        per_sample, feats = objectives.meanflow_loss(
                            train_model, x, t=t, r=r, noise=noise, y=y, jvp_fn=model, tap=tap,
                            adaptive_p=obj.adaptive_p, adaptive_eps=obj.adaptive_eps,
                            cfg_omega=obj.cfg_omega,
                            cfg_kappa=obj.cfg_kappa, cfg_t_interval=(obj.cfg_t_min, obj.cfg_t_max),
                            null_y=num_classes if num_classes > 0 else None,
                        )  # fmt: skip
                        feats = feats if feats is not None else {}
                    if isinstance(feats, torch.Tensor):
                        feats = {tap_names[0]: feats}
                    loss_diff = per_sample.float().mean()
                    loss_disp = None
                    if disp.weight > 0:
                        if disp.contrastive:
                            terms = []
                            for n in disp.layers:
                                z = (
                                    feats[n]
                                    if _all_finite(feats[n])
                                    else feats[n].nan_to_num(0.0, 0.0, 0.0)
                                )
                                term = contrastive_term(z[:local_batch], z[local_batch:])
                                terms.append(term if z is feats[n] else term * math.nan)
                        else:
                            terms = [disp_term(feats[n]) for n in disp.layers]
                        # Several layers (Table 3, "all blocks"): their mean, so lambda keeps
                        # its meaning whatever the number of layers.
                        loss_disp = torch.stack(terms).mean()
                        loss = loss_diff + disp.weight * loss_disp
                    else:
                        loss = loss_diff  # exactly the baseline graph

                log_step = (step + 1) % tr.log_every == 0 or step + 1 == tr.steps
                if not log_step:
                    feats = {}  # only logging steps read the other blocks; free them early

                # Backward, gradient norm (and clipping), non-finite guard.
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grads = [p.grad for p in params if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads)
                # After DDP's all-reduce the norm is identical on every rank, so all ranks take
                # the same skip decision without an extra collective.
                if not bool(torch.isfinite(grad_norm)):
                    nonfinite_run += 1
                    nonfinite_total += 1
                    optimizer.zero_grad(set_to_none=True)
                    logger.write(
                        f"step {step}: non-finite loss or gradient (loss_diff "
                        f"{loss_diff.item():.4g}, grad_norm {grad_norm.item():.4g}); skipped, "
                        f"{nonfinite_run}/{tr.max_nonfinite} in a row"
                    )
                    if nonfinite_run >= tr.max_nonfinite:
                        raise UserError(
                            f"training stopped at step {step}: {nonfinite_run} steps in a row had "
                            "a non-finite loss or gradient; lower optim.lr, set optim.grad_clip "
                            "(e.g. 1.0) or use train.precision = 'fp32', then start again or "
                            f"resume from the last checkpoint with --resume {run_dir} --set ..."
                        )
                else:
                    nonfinite_run = 0
                    if opt_cfg.grad_clip > 0:
                        torch.nn.utils.clip_grads_with_norm_(params, opt_cfg.grad_clip, grad_norm)
                    lr = opt_cfg.lr * (
                        min(1.0, (step + 1) / opt_cfg.warmup_steps) if opt_cfg.warmup_steps else 1.0
                    )
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    optimizer.step()
                    ema.update(model, step)
                step += 1

                # Logging: losses, dispersion statistics, block norms, speed.
                if log_step:
                    with torch.no_grad():
                        rec = {"loss": loss, "loss_diff": loss_diff, "grad_norm": grad_norm}
                        first = disp.layers[0] if disp.layers else None
                        if first in feats and not disp.contrastive:
                            z = feats[first].detach().float()
                            # The term without lambda (also in the baseline, where it is only
                            # measured), its gap to the floor -log(group), and the share of
                            # pairs that still give gradient. The same keys on every rank (NaN
                            # when diverged): the values are averaged over ranks below.
                            ld = loss_disp if loss_disp is not None else disp_term(z)
                            # The floor gap is InfoNCE-l2's (with the diagonal), the one variant
                            # whose floor is -log B, whatever variant is trained.
                            same = disp.variant == "infonce_l2" and disp.include_diagonal
                            l2 = (
                                ld
                                if same
                                else disp_term(z, variant="infonce_l2", include_diagonal=True)
                            )
                            stats = {"active_frac": math.nan, "mean_dist": math.nan}
                            if _all_finite(z):
                                stats = losses.dispersion_stats(
                                    z[:group], tau=disp.tau, normalize_by_dim=disp.normalize_by_dim
                                )
                            rec.update(
                                loss_disp=ld,
                                floor_gap=l2 + math.log(group),
                                active_frac=stats["active_frac"],
                                mean_dist=stats["mean_dist"],
                            )
                        elif loss_disp is not None:
                            rec["loss_disp"] = loss_disp
                        for n in block_names:  # paper Fig. 3: mean l2 norm per sample
                            z = feats[n].detach().float().flatten(1)
                            rec[f"rep_norm/{n}"] = torch.linalg.vector_norm(z, dim=1).mean()
                        values = torch.stack(
                            [
                                torch.as_tensor(v, dtype=torch.float32).to(device)
                                for v in rec.values()
                            ]
                        )
                        record = {"step": step, **dict(zip(rec, all_reduce_mean(values).tolist()))}
                    now = time.perf_counter()
                    elapsed, done = max(now - interval_start, 1e-9), step - interval_step
                    record.update(
                        lr=optimizer.param_groups[0]["lr"],
                        steps_per_s=done / elapsed,
                        images_per_s=done * global_batch / elapsed,
                        data_wait_frac=data_wait / elapsed,
                        nonfinite_skipped=nonfinite_total,
                        ema_decay=ema.current_decay(),
                    )
                    logger.log(record)
                    last_record = record
                    shown = ("loss_diff", "loss_disp", "floor_gap", "steps_per_s")
                    logger.progress(done, {k: record[k] for k in shown if k in record})
                    interval_start, interval_step, data_wait = now, step, 0.0
                del feats

                # Proxy FID of the EMA model (rank 0; it must finish within dist_timeout_s).
                # Also at the last step, so a run's final number is always measured. Before the
                # checkpoint of the same step: a run stopped during the evaluation resumes from
                # the previous checkpoint and measures it again, and its curve has no hole.
                eval_now = cfg.eval.every and (step % cfg.eval.every == 0 or step == tr.steps)
                if eval_now and info.is_main:
                    record = _proxy_fid(cfg, ema.model, step, device)
                    logger.log(record)
                    logger.write(f"step {step}: proxy_fid {record['proxy_fid']:.3f} (proxy)")

                # Checkpoint (rank 0), atomically; keep the last train.keep_last.
                if info.is_main and (step % tr.ckpt_every == 0 or step == tr.steps):
                    state = {
                        "format": 1,
                        "step": step,
                        "model": model.state_dict(),
                        "ema": ema.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "rng": capture_rng_state({"noise": noise_gen}),
                        "data_state": data.state_dict(),
                        "config": config_to_dict(cfg),
                        "model_config": dict(getattr(model, "config", None) or {})
                        or model_kwargs(cfg.model),
                        "nonfinite_total": nonfinite_total,
                    }
                    save_checkpoint(state, checkpoint_path(run_dir, step))
                    prune_checkpoints(run_dir, tr.keep_last)

            # ---- Done ------------------------------------------------------------------------
            summary = {
                "steps": step,
                "wall_time_s": time.perf_counter() - wall_start,
                "world_size": world,
                "global_batch": global_batch,
                "nonfinite_skipped": nonfinite_total,
                "final": last_record,
            }
            if info.is_main:
                write_json(run_dir / DONE_FILE, summary)
            return summary
        except BaseException as e:
            # A failing rank says so and exits non-zero; torchrun then stops the others, and
            # without torchrun they fail their next collective (peer gone, or the timeout).
            if world > 1 and not isinstance(e, KeyboardInterrupt):
                msg = " ".join(str(e).split())
                print(f"[rank {rank}] training failed: {type(e).__name__}: {msg}", file=sys.stderr)
            raise


def grouped_mean(fn, group: int, *zs: torch.Tensor) -> torch.Tensor:
    """``fn`` on consecutive groups of ``group`` samples of each of ``zs`` (B, ...), averaged.

    The paper's loss sees 16 samples per device; a larger local batch is split into such groups
    (``dispersive.group_size``) so that the objective does not depend on the device count.
    """
    b = zs[0].shape[0]
    if group == b:
        return fn(*zs)
    parts = [z.reshape(b // group, group, *z.shape[1:]) for z in zs]
    return torch.stack([fn(*g) for g in zip(*parts)]).mean()


def _all_finite(z: torch.Tensor) -> bool:
    # One float64 reduction: any NaN/inf makes the sum non-finite; finite values cannot overflow.
    return bool(torch.isfinite(z.detach().sum(dtype=torch.float64)))


def _proxy_fid(cfg: Config, ema_model: torch.nn.Module, step: int, device: torch.device) -> dict:
    """Sample with the EMA weights and score the samples with the proxy FID (and accuracy)."""
    from dispersive.eval.proxy import proxy_metrics
    from dispersive.generate import generate

    s = cfg.sample
    num = cfg.eval.num_samples
    ncls = int(getattr(ema_model, "num_classes", 0) or 0)
    labels = torch.arange(num) % ncls if ncls > 0 else None  # class-balanced
    t0 = time.perf_counter()
    images, spec = generate(
        ema_model,
        num=num,
        sampler=s.sampler,
        steps=s.steps,
        cfg_scale=s.cfg_scale,
        cfg_interval=tuple(s.cfg_interval),
        cfg_channels=s.cfg_channels or None,
        labels=labels,
        path=cfg.objective.path,
        generator=torch.Generator(device=device).manual_seed(s.seed),
        device=device,
    )
    metrics = proxy_metrics(images, labels, features=cfg.eval.features)
    return {
        "step": step,
        **metrics,
        "num_samples": num,
        "proxy_fid_note": PROXY_NOTE,
        "sampler_spec": spec,
        "eval_seconds": time.perf_counter() - t0,
    }
