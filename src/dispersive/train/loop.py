"""The training loop: one function, read top to bottom (EDM style).

    L = mean_i L_diff(x_i) + lambda * L_disp(Z)        (paper Eq. 1; lambda = dispersive.weight)

The loss is built once, before the loop (train/step.py): ``TrainingObjective`` (the kind's
randomness and per-sample loss: one call per step returns the loss and the tapped features) and
``DispersiveTerm`` (a ``DispersiveLoss`` with its group size, and the logging statistics).
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
import functools
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
    DistInfo,
    all_reduce_mean,
    check_same_on_all_ranks,
    cleanup_distributed,
    env_world_size,
    init_distributed,
)
from dispersive.train.ema import EMA
from dispersive.train.guard import DeferredGuard, stop_message
from dispersive.train.logging import MetricsLogger, truncate_metrics
from dispersive.train.model_init import build_run_model
from dispersive.train.rundir import CONFIG_FILE, DONE_FILE, RunLock, write_json
from dispersive.train.step import DispersiveTerm, TrainingObjective, rep_norms

__all__ = ["train", "step_seed", "grouped_mean", "PROXY_NOTE"]

PROXY_NOTE = "proxy FID on domain features; not comparable to FID-50K (Inception, ADM suite)"


def step_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers such as (seed, rank, step)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def train(
    config: Config,
    *,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    preflighted: bool = False,
) -> dict:
    """Train a model as the config says; rank 0 writes everything under ``run_dir``.

    Works as one plain process and under ``torchrun`` (one process per device, DDP).

    Args:
        config: the resolved config (:func:`dispersive.train.config.load_config`).
        run_dir: ``RUN_DIR`` (train/rundir.py): config.toml, metrics.jsonl, tb/, checkpoints/,
            done.json; rank 0 holds its lock while it trains.
        resume: continue from the latest checkpoint in ``run_dir`` (model, EMA, optimizer, step,
            RNG states, data position) with ``config``, which may differ (e.g. more train.steps).
            Without a checkpoint the run starts at step 0.
        progress: show a tqdm progress bar (rank 0).
        preflighted: the caller already ran :func:`~dispersive.train.config.preflight` on
            ``config`` for this world size (``dispersive train`` does, before it prints the
            config); otherwise it runs here.

    Returns:
        The summary also written to ``RUN_DIR/done.json``: steps, wall time, final metrics.

    Raises:
        UserError: a bad config, another process training in ``run_dir``, or
            ``train.max_nonfinite`` non-finite steps in a row.
    """
    run_dir = Path(run_dir)
    wall_start = time.perf_counter()
    tr = config.train

    # ---- Checks, then distributed setup --------------------------------------------------------
    # Every check runs before any process group exists, so every rank fails the same way.
    if not preflighted:
        preflight(config, world_size=env_world_size())
    local_batch = per_device_batch(config, env_world_size())
    info = init_distributed(device=tr.device, timeout_s=tr.dist_timeout_s)
    try:
        return _train_on_this_rank(config, run_dir, info, local_batch, resume, progress, wall_start)
    finally:
        # Once the rank's frame is gone, so that DDP's reducer no longer holds the process group
        # and it can be destroyed before the interpreter exits (retire_process_group).
        cleanup_distributed(info)


def _train_on_this_rank(
    config: Config, run_dir: Path, info: DistInfo, local_batch: int, resume: bool,
    progress: bool, wall_start: float,
) -> dict:  # fmt: skip
    """:func:`train` on this rank once the process group (if any) exists; see its docs."""
    from dispersive.taps import FeatureTap

    tr, opt_cfg, eval_cfg = config.train, config.optim, config.eval
    rank, world, device = info.rank, info.world_size, info.device
    global_batch = local_batch * world
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(_say_which_rank_failed(rank, world))
        if info.is_main:  # one writer per run directory: a second trainer refuses
            cleanup.enter_context(RunLock(run_dir))
        if device.type == "cuda":  # TF32 matmuls (bf16 autocast is train.precision)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # ---- Model, EMA, feature tap -----------------------------------------------------------
        torch.manual_seed(tr.seed)  # the same initial weights on every rank
        # model.init (fine-tuning) sets the starting weights and the official conventions.
        resume_from = latest_checkpoint(run_dir) if resume else None
        model = build_run_model(config.model, resume_from=resume_from).to(device)
        model.train()
        num_classes = int(getattr(model, "num_classes", config.model.num_classes))
        torch.manual_seed(step_seed(tr.seed, rank, 1))  # per-rank global RNG (if used)
        # EMA before the tap: a deep copy would otherwise copy the tap's hooks as well.
        ema = EMA(model, opt_cfg.ema_decay, warmup=opt_cfg.ema_warmup)
        # One tap on every block (Fig. 3 norms) and on the regularised layers, registered on the
        # plain model before DDP / compile wrap it; a list of names, so pop() gives a dict.
        block_names = list(getattr(model, "block_names", []))
        tap_names = list(dict.fromkeys([*block_names, *config.dispersive.layers]))
        tap = FeatureTap(model, tap_names) if tap_names else None
        if tap is not None:
            cleanup.callback(tap.remove)

        # ---- Data, the step's noise generator, optimizer (paper Table 8: AdamW) -------------
        data, next_batch, data_gen = _data(config, local_batch, rank, world)
        noise_gen = torch.Generator(device=device).manual_seed(tr.seed)  # same on all ranks
        params = [p for p in model.parameters() if p.requires_grad]
        # On an accelerator the non-finite guard stays on the device (train/guard.py), which
        # needs fused AdamW; on the CPU the host-side guard and the default AdamW, unchanged.
        deferred = DeferredGuard(tr.max_nonfinite, device) if device.type in _DEFERRED else None
        optimizer = torch.optim.AdamW(
            params, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), weight_decay=opt_cfg.weight_decay,
            fused=True if deferred is not None else None,
        )  # fmt: skip

        # ---- Resume, then the run directory (resolved config before step 0) ------------------
        step, nonfinite_total = 0, 0
        if resume:
            step, nonfinite_total = _resume(
                run_dir, info.is_main, model=model, ema=ema, optimizer=optimizer, data=data,
                noise_gen=noise_gen, rank_seed=(tr.seed, rank, 1) if rank else None,
            )  # fmt: skip
            # Each rank reads RUN_DIR itself: on nodes without a shared one they would differ.
            check_same_on_all_ranks(
                step, f"the step resumed from in {run_dir}",
                "RUN_DIR must be one folder every node sees (a shared filesystem)",
            )  # fmt: skip
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(run_dir / CONFIG_FILE, dump_toml(config))
            (run_dir / DONE_FILE).unlink(missing_ok=True)

        # ---- Wrappers: DDP, then torch.compile (the tap is already registered) ---------------
        train_model: Any = model
        if world > 1:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None
            )
        if tr.compile:
            train_model = torch.compile(train_model)

        # ---- The loss, built once: objective (per kind) + lambda * dispersive term ----------
        objective = TrainingObjective(
            config, train_model=train_model, model=model, tap=tap, num_classes=num_classes,
            rank=rank, world_size=world, generator=noise_gen,
        )  # fmt: skip
        dispersive = DispersiveTerm(config.dispersive, dispersive_group_size(config, world))
        bf16 = tr.precision == "bf16"
        autocast = functools.partial(torch.autocast, device.type, torch.bfloat16, enabled=bf16)

        # ---- Logging ---------------------------------------------------------------------------
        logger = MetricsLogger(
            run_dir, enabled=info.is_main, total_steps=tr.steps, initial_step=step,
            progress=progress,
        )  # fmt: skip
        cleanup.callback(logger.close)
        logger.write(
            f"{config.model.name}: {sum(p.numel() for p in params) / 1e6:.2f}M parameters, {world} "
            f"rank(s) x {local_batch} samples, device {device}, steps {step} -> {tr.steps}"
        )
        last_record: dict[str, Any] = {}
        nonfinite_run = 0
        interval_start, interval_step, data_wait = time.perf_counter(), step, 0.0

        # ---- The loop --------------------------------------------------------------------------
        while step < tr.steps:
            # Data: this rank's slice of the global batch.
            t_data = time.perf_counter()
            data_gen.manual_seed(step_seed(tr.seed, rank, 0, step))
            x, y = next_batch()
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True) if num_classes > 0 else None
            data_wait += time.perf_counter() - t_data

            # Loss: L = mean_i L_diff(x_i) + lambda * L_disp(Z) (Eq. 1); the tap records Z.
            with autocast():
                per_sample, feats = objective(x, y)
                loss_diff = per_sample.float().mean()
                loss_disp = dispersive(feats)  # None at weight 0: exactly the baseline graph
                loss = loss_diff if loss_disp is None else loss_diff + dispersive.weight * loss_disp
            log_step = (step + 1) % tr.log_every == 0 or step + 1 == tr.steps
            if not log_step:
                feats = {}  # only logging steps read the other blocks; free them early

            # Backward, gradient norm (and clipping), non-finite guard.
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in params if p.grad is not None]
            )
            # After DDP's all-reduce the norm is identical on every rank, so all ranks take the
            # same skip decision without an extra collective.
            if deferred is not None:  # decided on the device: nothing read back (guard.py)
                finite, optimizer.found_inf = deferred.record(grad_norm, step)
                _optimizer_step(optimizer, params, opt_cfg, step, grad_norm)
                ema.update(model, step, mask=finite)
            elif not bool(torch.isfinite(grad_norm)):
                nonfinite_run += 1
                nonfinite_total += 1
                optimizer.zero_grad(set_to_none=True)
                logger.write(
                    f"step {step}: non-finite loss or gradient (loss_diff {loss_diff.item():.4g}, "
                    f"grad_norm {grad_norm.item():.4g}); skipped, "
                    f"{nonfinite_run}/{tr.max_nonfinite} in a row"
                )
                if nonfinite_run >= tr.max_nonfinite:
                    raise UserError(stop_message(step, nonfinite_run, run_dir))
            else:
                nonfinite_run = 0
                _optimizer_step(optimizer, params, opt_cfg, step, grad_norm)
                ema.update(model, step)
            step += 1
            ckpt_step = step % tr.ckpt_every == 0 or step == tr.steps
            if deferred is not None and (log_step or ckpt_step or step % tr.max_nonfinite == 0):
                skipped = deferred.settle(step, logger.write, run_dir)
                nonfinite_total += skipped
                ema.num_updates -= skipped  # the masked updates of skipped steps did nothing

            # Logging: losses, dispersion statistics, block norms (averaged over ranks), speed.
            if log_step:
                rec = {"loss": loss, "loss_diff": loss_diff, "grad_norm": grad_norm}
                rec |= dispersive.statistics(feats, loss_disp) | rep_norms(feats, block_names)
                values = torch.stack(
                    [torch.as_tensor(v, dtype=torch.float32).to(device) for v in rec.values()]
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

            # Proxy FID of the EMA model (rank 0; it must finish within dist_timeout_s). Also at
            # the last step, so a run's final number is always measured. Before the checkpoint
            # of the same step: a run stopped during the evaluation resumes from the previous
            # checkpoint and measures it again, and its curve has no hole.
            if eval_cfg.every and (step % eval_cfg.every == 0 or step == tr.steps) and info.is_main:
                record = _proxy_fid(config, ema.model, step, device)
                logger.log(record)
                logger.write(f"step {step}: proxy_fid {record['proxy_fid']:.3f} (proxy)")

            # Checkpoint (rank 0), atomically; keep the last train.keep_last.
            if info.is_main and ckpt_step:
                state = _checkpoint_state(
                    config, step, model=model, ema=ema, optimizer=optimizer, data=data,
                    noise_gen=noise_gen, nonfinite_total=nonfinite_total,
                )  # fmt: skip
                save_checkpoint(state, checkpoint_path(run_dir, step))
                prune_checkpoints(run_dir, tr.keep_last)

        # ---- Done ------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# The loop's helpers, in the order it uses them

# Device types whose non-finite guard stays on the device (train/guard.py; fused AdamW).
_DEFERRED = ("cuda",)


@contextlib.contextmanager
def _say_which_rank_failed(rank: int, world: int):
    """A failing rank says so and exits non-zero; torchrun then stops the others, and without
    torchrun they fail their next collective (peer gone, or the timeout)."""
    try:
        yield
    except BaseException as e:
        if world > 1 and not isinstance(e, KeyboardInterrupt):
            msg = " ".join(str(e).split())
            print(f"[rank {rank}] training failed: {type(e).__name__}: {msg}", file=sys.stderr)
        raise


def _optimizer_step(optimizer, params, opt_cfg, step: int, grad_norm) -> None:
    """Clip (optim.grad_clip), set the warm-up learning rate of ``step``, step AdamW."""
    if opt_cfg.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, opt_cfg.grad_clip, grad_norm)
    warmup = opt_cfg.warmup_steps
    lr = opt_cfg.lr * (min(1.0, (step + 1) / warmup) if warmup else 1.0)
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()


def _data(config: Config, local_batch: int, rank: int, world: int):
    """``(data, next_batch, data_gen)``: the resumable batch source (its ``state_dict`` goes into
    the checkpoint), a function returning this rank's next ``(x, y)``, and the flip generator
    (re-seeded every step from (seed, rank, step), so no per-rank state is saved)."""
    from dispersive.data import datasets as data_mod

    seed = config.train.seed
    dataset = data_mod.build_dataset(config.data, model_cfg=config.model, train=True, seed=seed)
    stream = data_mod.BatchStream(
        dataset, batch_size=local_batch, seed=seed, rank=rank, world_size=world
    )
    data_gen = torch.Generator()
    if isinstance(dataset, data_mod.ImageFolderDataset):  # decoded in worker processes
        loader = data_mod.BatchLoader(
            dataset, stream, num_workers=config.data.num_workers, generator=data_gen
        )
        return loader, lambda: next(loader), data_gen
    return stream, lambda: dataset.get_batch(next(stream), generator=data_gen), data_gen


def _resume(run_dir: Path, is_main: bool, *, model, ema, optimizer, data, noise_gen, rank_seed):
    """Load the latest checkpoint of ``run_dir`` (if any) into the run's state in place; returns
    ``(step, nonfinite_total)``. ``rank_seed``: the keys of the global RNG seed of a rank other
    than 0, re-seeded with the step (the saved global RNG states are rank 0's)."""
    if is_main:
        remove_stale_temporaries(run_dir)
    step, nonfinite_total = 0, 0
    ckpt_file = latest_checkpoint(run_dir)
    if ckpt_file is not None:
        ckpt = load_checkpoint(ckpt_file, map_location="cpu")
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UserError(
                f"{ckpt_file} does not fit the model of the config ({str(e).splitlines()[0]}); "
                "model.* cannot change when resuming"
            ) from None
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        data.load_state_dict(ckpt["data_state"])
        step = int(ckpt["step"])
        nonfinite_total = int(ckpt.get("nonfinite_total", 0))
        restore_rng_state(ckpt["rng"], {"noise": noise_gen})
        if rank_seed is not None:
            torch.manual_seed(step_seed(*rank_seed, step))
    if is_main:
        truncate_metrics(run_dir, step)
        where = f"{ckpt_file.name} (step {step})" if ckpt_file else "step 0"
        print(f"resuming {run_dir} from {where}", file=sys.stderr, flush=True)
    return step, nonfinite_total


def _checkpoint_state(config: Config, step: int, *, model, ema, optimizer, data, noise_gen,
                      nonfinite_total: int) -> dict:  # fmt: skip
    """The checkpoint dict (train/checkpoint.py documents its format)."""
    return {
        "format": 1,
        "step": step,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": capture_rng_state({"noise": noise_gen}),
        "data_state": data.state_dict(),
        "config": config_to_dict(config),
        "model_config": dict(getattr(model, "config", None) or {}) or model_kwargs(config.model),
        "nonfinite_total": nonfinite_total,
    }


def grouped_mean(fn, group: int, *zs: torch.Tensor) -> torch.Tensor:
    """``fn`` on consecutive groups of ``group`` samples of each of ``zs`` (B, ...), averaged
    (kept for callers of this name; the loop's groups are ``DispersiveLoss(group_size=...)``)."""
    from dispersive.losses import _group_mean

    return _group_mean(fn, group, *zs)


def _proxy_fid(config: Config, ema_model: torch.nn.Module, step: int, device: torch.device) -> dict:
    """Sample with the EMA weights and score the samples with the proxy FID (and accuracy)."""
    from dispersive.eval.proxy import proxy_metrics
    from dispersive.generate import generate

    s = config.sample
    num = config.eval.num_samples
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
        options=dict(s.options),
        labels=labels,
        path=config.objective.path,
        generator=torch.Generator(device=device).manual_seed(s.seed),
        device=device,
    )
    metrics = proxy_metrics(images, labels, features=config.eval.features)
    return {
        "step": step,
        **metrics,
        "num_samples": num,
        "proxy_fid_note": PROXY_NOTE,
        "sampler_spec": spec,
        "eval_seconds": time.perf_counter() - t0,
    }
