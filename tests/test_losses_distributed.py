"""scope="global" with 2 gloo processes on CPU against the one-process loss and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from _ranks import run_ranks
from dispersive.losses import VARIANTS, contrastive_loss, dispersive_loss
from dispersive.train.distributed import retire_process_group

pytestmark = pytest.mark.distributed

WORLD = 2
SIZES = (3, 5)  # uneven per-rank batches: the gather pads and trims
DIM = (2, 4)
KW = dict(tau=0.7, margin=2.0)


def _full_batch(seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(SIZES), *DIM, generator=g, dtype=dtype)


def _rows(rank: int) -> slice:
    start = sum(SIZES[:rank])
    return slice(start, start + SIZES[rank])


def _model_and_inputs() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(5, 6).double()
    x = torch.randn(sum(SIZES), 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, x


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out: dict[str, torch.Tensor] = {}
        for i, variant in enumerate(VARIANTS):
            z = _full_batch(i)[_rows(rank)].clone().requires_grad_(True)
            loss = dispersive_loss(z, variant=variant, scope="global", **KW)
            loss.backward()
            out[f"{variant}/loss"] = loss.detach()
            out[f"{variant}/grad"] = z.grad
            out[f"{variant}/local"] = dispersive_loss(z.detach(), variant=variant, **KW)
            # Contrastive: both views are gathered.
            zp = (_full_batch(100 + i)[_rows(rank)]).clone().requires_grad_(True)
            zz = z.detach().clone().requires_grad_(True)
            closs = contrastive_loss(zz, zp, variant=variant, scope="global", **KW)
            closs.backward()
            out[f"{variant}/closs"] = closs.detach()
            out[f"{variant}/cgrad"] = zz.grad
            out[f"{variant}/cgrad_pos"] = zp.grad
        # bf16 activations are upcast before the gather.
        zb = _full_batch(7, torch.float32)[_rows(rank)].bfloat16().requires_grad_(True)
        lb = dispersive_loss(zb, scope="global")
        lb.backward()
        out["bf16/loss"], out["bf16/grad"] = lb.detach(), zb.grad.float()
        # A NaN on one rank raises on every rank (checked after the gather), no rank hangs.
        zn = _full_batch(8)[_rows(rank)].clone()
        if rank == 1:
            zn[0, 0, 0] = float("nan")
        try:
            dispersive_loss(zn, scope="global")
            out["nan/raised"] = torch.tensor(False)
        except ValueError as e:
            out["nan/raised"] = torch.tensor("non-finite" in str(e))
        # End to end: DDP averages the parameter gradients over ranks.
        model, x = _model_and_inputs()
        ddp = DDP(model)
        dispersive_loss(ddp(x[_rows(rank)]), scope="global", **KW).backward()
        out["ddp/weight_grad"] = model.weight.grad
        out["ddp/bias_grad"] = model.bias.grad
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        retire_process_group()  # the group outlives the DDP reducer (see its docstring)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp("gloo")
    run_ranks(_worker, (str(tmp / "init"), str(tmp)), WORLD)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_global_loss_and_gradient_equal_the_one_process_ones(results, variant):
    i = VARIANTS.index(variant)
    z = _full_batch(i).requires_grad_(True)
    loss = dispersive_loss(z, variant=variant, **KW)
    loss.backward()
    for rank, out in enumerate(results):
        torch.testing.assert_close(out[f"{variant}/loss"], loss.detach())
        # Documented: rank r receives sum over ranks of dL_s/dz_r = world_size * dL/dz_r.
        torch.testing.assert_close(out[f"{variant}/grad"], WORLD * z.grad[_rows(rank)])
        # scope="local" under a process group is the rank's own batch (authors' semantics).
        local = dispersive_loss(_full_batch(i)[_rows(rank)], variant=variant, **KW)
        torch.testing.assert_close(out[f"{variant}/local"], local)


@pytest.mark.parametrize("variant", VARIANTS)
def test_global_contrastive_gathers_both_views(results, variant):
    i = VARIANTS.index(variant)
    z = _full_batch(i).requires_grad_(True)
    zp = _full_batch(100 + i).requires_grad_(True)
    loss = contrastive_loss(z, zp, variant=variant, **KW)
    loss.backward()
    for rank, out in enumerate(results):
        torch.testing.assert_close(out[f"{variant}/closs"], loss.detach())
        torch.testing.assert_close(out[f"{variant}/cgrad"], WORLD * z.grad[_rows(rank)])
        torch.testing.assert_close(out[f"{variant}/cgrad_pos"], WORLD * zp.grad[_rows(rank)])


def test_global_bf16_input(results):
    z = _full_batch(7, torch.float32).bfloat16().requires_grad_(True)
    loss = dispersive_loss(z)
    loss.backward()
    for rank, out in enumerate(results):
        torch.testing.assert_close(out["bf16/loss"], loss.detach())
        torch.testing.assert_close(out["bf16/grad"], WORLD * z.grad[_rows(rank)].float())


def test_non_finite_on_one_rank_raises_on_all_ranks(results):
    assert all(bool(out["nan/raised"]) for out in results)


def test_ddp_parameter_gradient_equals_one_process_gradient(results):
    model, x = _model_and_inputs()
    dispersive_loss(model(x), **KW).backward()
    for out in results:
        torch.testing.assert_close(out["ddp/weight_grad"], model.weight.grad)
        torch.testing.assert_close(out["ddp/bias_grad"], model.bias.grad)
