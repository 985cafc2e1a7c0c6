"""Presets: the paper's and the authors' settings, and the block each one regularises."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from dispersive.losses import VARIANTS, dispersive_loss
from dispersive.presets import PRESETS, Preset, get_preset, resolve_block


def test_paper_preset_values():
    p = get_preset("paper")
    assert (p.weight, p.tau, p.variant, p.per_device_batch) == (0.5, 0.5, "infonce_l2", 16)
    assert p.normalize_by_dim and p.include_diagonal


def test_authors_pytorch_preset_values():
    p = get_preset("authors-pytorch")
    assert (p.weight, p.tau, p.variant, p.per_device_batch) == (0.25, 1.0, "infonce_l2", 32)


@pytest.mark.parametrize("depth", [4, 12, 24, 28, 31])
def test_paper_block_is_the_end_of_the_first_quarter(depth):
    # 1-indexed block depth // 4, i.e. 0-indexed depth // 4 - 1 (block 3 of 12 -> blocks.2).
    assert resolve_block("paper", depth) == f"blocks.{depth // 4 - 1}"


def test_paper_block_for_sit_b():
    assert resolve_block("paper", 12) == "blocks.2"
    assert resolve_block(get_preset("paper"), 28, prefix="model.blocks") == "model.blocks.6"


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_shallow_models_use_the_first_block(depth):
    assert resolve_block("paper", depth) == "blocks.0"


@pytest.mark.parametrize("depth", [1, 12, 28])
def test_authors_block_is_the_last(depth):
    assert resolve_block("authors-pytorch", depth, prefix="layers") == f"layers.{depth - 1}"


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown dispersive preset 'papers'.*authors-pytorch"):
        get_preset("papers")
    with pytest.raises(ValueError, match="valid presets"):
        resolve_block("nope", 12)


@pytest.mark.parametrize("depth", [0, -3, 2.5, True, "12"])
def test_bad_depth_is_refused(depth):
    with pytest.raises(ValueError, match="depth must be a positive int"):
        resolve_block("paper", depth)


def test_presets_are_frozen_and_named_consistently():
    for name, p in PRESETS.items():
        assert p.name == name and p.note
        assert p.variant in VARIANTS
        with pytest.raises(dataclasses.FrozenInstanceError):
            p.tau = 2.0  # type: ignore[misc]


def test_loss_kwargs_drive_the_loss():
    z = torch.randn(8, 3, 5)
    for p in PRESETS.values():
        kw = p.loss_kwargs()
        assert "weight" not in kw
        expected = dispersive_loss(z, variant=p.variant, tau=p.tau)
        torch.testing.assert_close(dispersive_loss(z, **kw), expected)


def test_unknown_block_rule_is_refused():
    p = Preset("x", weight=1.0, tau=1.0, variant="hinge", block_rule="middle", per_device_batch=8)
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
    p = get_preset("authors-pytorch")
    assert (authors.dispersive.weight, authors.dispersive.tau) == (p.weight, p.tau)
    assert "0.999" in p.note
