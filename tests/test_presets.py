"""Recipes (the paper's and the authors' settings), the block each regularises, and the
TOML presets that carry them into runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from dispersive.losses import VARIANTS, dispersive_loss
from dispersive.recipes import RECIPES, Recipe, get_recipe, resolve_block


def test_paper_recipe_values():
    p = get_recipe("paper")
    assert (p.weight, p.tau, p.variant, p.per_device_batch) == (0.5, 0.5, "infonce_l2", 16)
    assert p.normalize_by_dim and p.include_diagonal


def test_authors_pytorch_recipe_values():
    p = get_recipe("authors-pytorch")
    assert (p.weight, p.tau, p.variant, p.per_device_batch) == (0.25, 1.0, "infonce_l2", 32)


@pytest.mark.parametrize("depth", [4, 12, 24, 28, 31])
def test_paper_block_is_the_end_of_the_first_quarter(depth):
    # 1-indexed block depth // 4, i.e. 0-indexed depth // 4 - 1 (block 3 of 12 -> blocks.2).
    assert resolve_block("paper", depth) == f"blocks.{depth // 4 - 1}"


def test_paper_block_for_sit_b():
    assert resolve_block("paper", 12) == "blocks.2"
    assert resolve_block(get_recipe("paper"), 28, prefix="model.blocks") == "model.blocks.6"


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_shallow_models_use_the_first_block(depth):
    assert resolve_block("paper", depth) == "blocks.0"


@pytest.mark.parametrize("depth", [1, 12, 28])
def test_authors_block_is_the_last(depth):
    assert resolve_block("authors-pytorch", depth, prefix="layers") == f"layers.{depth - 1}"


def test_unknown_recipe_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown dispersive recipe 'papers'.*authors-pytorch"):
        get_recipe("papers")
    with pytest.raises(ValueError, match="valid recipes"):
        resolve_block("nope", 12)


@pytest.mark.parametrize("depth", [0, -3, 2.5, True, "12"])
def test_bad_depth_is_refused(depth):
    with pytest.raises(ValueError, match="depth must be a positive int"):
        resolve_block("paper", depth)


def test_recipes_are_frozen_and_named_consistently():
    for name, p in RECIPES.items():
        assert p.name == name and p.note
        assert p.variant in VARIANTS
        with pytest.raises(dataclasses.FrozenInstanceError):
            p.tau = 2.0  # type: ignore[misc]


def test_loss_kwargs_drive_the_loss():
    z = torch.randn(8, 3, 5)
    for p in RECIPES.values():
        kw = p.loss_kwargs()
        assert "weight" not in kw
        expected = dispersive_loss(z, variant=p.variant, tau=p.tau)
        torch.testing.assert_close(dispersive_loss(z, **kw), expected)


def test_unknown_block_rule_is_refused():
    p = Recipe("x", weight=1.0, tau=1.0, variant="hinge", block_rule="middle", per_device_batch=8)
    with pytest.raises(ValueError, match=r"unknown block rule 'middle'.*first_quarter"):
        resolve_block(p, 12)


# ---------------------------------------------------------------------------------------------
# The TOML presets that carry these settings into training runs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("stem", ["imagenet256-sit-b2", "imagenet256-sit-xl2"])
def test_authors_pytorch_configs_use_adamw_default_betas(stem):
    # The authors' train.py (SiT's) builds AdamW(lr=1e-4, weight_decay=0): betas (0.9, 0.999);
    # the paper's runs (and the base preset) use (0.9, 0.95). Nothing else of the run differs.
    from dispersive.train.config import load_config

    base = load_config(CONFIGS / f"{stem}.toml")
    authors = load_config(CONFIGS / f"{stem}-disp-pytorch.toml")
    adamw_default = torch.optim.AdamW([torch.zeros(1)]).defaults["betas"]
    assert tuple(authors.optim.betas) == tuple(adamw_default) == (0.9, 0.999)
    paper = load_config(CONFIGS / f"{stem}-disp.toml")
    assert tuple(base.optim.betas) == tuple(paper.optim.betas)
    assert tuple(base.optim.betas) == (0.9, 0.95)
    same = dataclasses.replace(authors, dispersive=base.dispersive, optim=base.optim)
    assert same == base
    assert dataclasses.replace(authors.optim, betas=base.optim.betas) == base.optim
    p = get_recipe("authors-pytorch")
    assert (authors.dispersive.weight, authors.dispersive.tau) == (p.weight, p.tau)
    assert "0.999" in p.note


MF_PRESETS = [
    "imagenet256-mf-b4",
    "imagenet256-mf-b4-disp",
    "imagenet256-mf-b2",
    "imagenet256-mf-b2-disp",
]


def _meanflow_recipe(obj) -> tuple:
    # Training-time guidance enters the target as omega v + kappa u_cond + (1-omega-kappa) u_null;
    # at its fixed point u_cond = v_null + w (v - v_null) with w = omega / (1 - kappa).
    effective = obj.cfg_omega / (1.0 - obj.cfg_kappa)
    return (
        effective, obj.cfg_omega, obj.cfg_kappa, obj.cfg_t_min, obj.cfg_t_max,
        obj.adaptive_p, obj.adaptive_eps, obj.ratio_r_neq_t, obj.t_dist, obj.t_mean, obj.t_std,
        obj.label_dropout,
    )  # fmt: skip


# The official MeanFlow code (Gsunshine/meanflow d70cb55, configs/default.py + run_b4.yml):
# omega 1.0, kappa 0.5 on t in [0, 1] (effective 2.0, the paper's B/4 omega' = 2.0, kappa 0.5),
# norm_p 1.0, norm_eps 0.01, data_proportion 0.75, logit-normal(-0.4, 1.0), class dropout 0.1.
OFFICIAL_MF = (2.0, 1.0, 0.5, 0.0, 1.0, 1.0, 0.01, 0.25, "logit_normal", -0.4, 1.0, 0.1)


@pytest.mark.parametrize("stem", MF_PRESETS)
def test_meanflow_presets_train_with_the_official_recipe(stem):
    from dispersive.train.config import load_config

    cfg = load_config(CONFIGS / f"{stem}.toml")
    assert cfg.objective.kind == "meanflow"
    assert _meanflow_recipe(cfg.objective) == OFFICIAL_MF
    assert tuple(cfg.optim.betas) == (0.9, 0.95) and cfg.optim.lr == 1e-4  # adam_b2 0.95
    from dispersive.models import build
    from dispersive.train.config import model_kwargs

    with torch.device("meta"):
        model = build(**model_kwargs(cfg.model))
    assert model.time_scale_value == 1.0  # the official networks embed the raw t and h


def test_table7_grid_trains_every_arm_with_the_official_recipe(tmp_path):
    from dispersive.experiments.grid import load_grid, resolve_run_config

    grid = load_grid(CONFIGS / "experiments" / "imagenet256-table7.toml", outdir=tmp_path)
    sizes = set()
    for run in grid.runs:
        cfg = resolve_run_config(grid, run)
        assert _meanflow_recipe(cfg.objective) == OFFICIAL_MF, run.name
        sizes.add(cfg.model.name)
    assert sizes == {"MF-B/4", "MF-B/2", "MF-XL/2"}
