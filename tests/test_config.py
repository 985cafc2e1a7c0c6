"""Config: TOML/dict round trips, one-line errors, --set literals, presets on the meta device."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dispersive.errors import UserError
from dispersive.train.config import (
    CHOICES,
    SECTIONS,
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dispersive_group_size,
    dump_toml,
    load_config,
    model_kwargs,
    per_device_batch,
    validate,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIGS.glob("*.toml"))


def write(tmp_path: Path, text: str, name: str = "x.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, f"error must be one line: {msg!r}"
    return msg


def tiny_model(cfg: Config):
    import dispersive.models as models

    with torch.device("meta"):
        return models.build(**model_kwargs(cfg.model))


# ---------------------------------------------------------------------------------------------
# Defaults and round trips


def test_defaults_match_dataclasses():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.dispersive.weight == 0.0 and cfg.dispersive.layers == ("blocks.1",)
    assert cfg.optim.betas == (0.9, 0.95)
    assert set(config_to_dict(cfg)) == set(SECTIONS)


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_round_trip_toml_and_json(preset):
    cfg = load_config(preset)
    text = dump_toml(cfg)
    assert config_from_dict(tomllib.loads(text)) == cfg
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    # The dump is the full resolved config: every key of every section.
    parsed = tomllib.loads(text)
    for name, cls in SECTIONS.items():
        assert set(parsed[name]) == {f.name for f in dataclasses.fields(cls)}


def test_dict_is_plain_and_detached():
    cfg = apply_overrides(Config(), ["model.overrides.depth=2"])
    d = config_to_dict(cfg)
    assert d["dispersive"]["layers"] == ["blocks.1"] and isinstance(d["optim"]["betas"], list)
    d["model"]["overrides"]["depth"] = 99  # mutating the dict must not touch the config
    assert cfg.model.overrides == {"depth": 2}


def test_file_holds_differences_only(tmp_path):
    p = write(tmp_path, '[train]\nsteps = 6\n[data]\npath = "/x"\n')
    cfg = load_config(p)
    assert cfg.train.steps == 6 and cfg.data.path == "/x"
    assert dataclasses.replace(cfg.train, steps=1000) == Config().train


def test_int_is_accepted_for_float_and_stored_as_float(tmp_path):
    cfg = load_config(write(tmp_path, "[optim]\nlr = 1\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_key_names_fix_and_valid_keys(tmp_path):
    p = write(tmp_path, "[train]\nstpes = 6\n")
    msg = error_of(load_config, p)
    assert "unknown key 'train.stpes'" in msg
    assert "did you mean 'train.steps'" in msg
    assert "valid keys in [train]" in msg and "global_batch" in msg and "ckpt_every" in msg
    assert str(p) in msg


def test_unknown_section(tmp_path):
    msg = error_of(load_config, write(tmp_path, "[trian]\nsteps = 6\n"))
    assert "unknown section 'trian'" in msg and "'train'" in msg and "dispersive" in msg


def test_top_level_key_is_an_error(tmp_path):
    msg = error_of(load_config, write(tmp_path, "steps = 6\n"))
    assert "steps" in msg and "section" in msg


@pytest.mark.parametrize(
    "text, expected",
    [
        ('[train]\nsteps = "6"\n', "train.steps must be an int, got str '6'"),
        ("[train]\nsteps = 6.5\n", "train.steps must be an int, got float 6.5"),
        ("[train]\ncompile = 1\n", "train.compile must be a bool, got int 1"),
        ("[train]\nsteps = true\n", "train.steps must be an int, got bool True"),
        ("[data]\npath = 3\n", "data.path must be a string, got int 3"),
        ("[dispersive]\nlayers = [1]\n", "dispersive.layers must be a list of strings"),
        ("[optim]\nbetas = [0.9]\n", "optim.betas must be a list of 2 floats"),
        ("[model]\noverrides = 2\n", "model.overrides must be a table"),
    ],
)
def test_wrong_type_messages(tmp_path, text, expected):
    assert expected in error_of(load_config, write(tmp_path, text))


def test_choice_error_lists_choices(tmp_path):
    msg = error_of(load_config, write(tmp_path, '[dispersive]\nvariant = "infonce_l3"\n'))
    assert "did you mean 'infonce_l2'" in msg
    for v in CHOICES["dispersive.variant"]:
        assert v in msg


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("dispersive.tau=0", "dispersive.tau = 0.0 is out of range (0, inf]"),
        ("dispersive.weight=-1", "out of range"),
        ("objective.label_dropout=1.0", "out of range [0, 1)"),
        ("train.global_batch=0", "train.global_batch = 0 is out of range"),
        ("data.name='mnist'", "valid choices: fashion-mnist"),
        ("train.precision='fp16'", "valid choices: fp32, bf16"),
        ("sample.sampler='dpm'", "valid choices"),
    ],
)
def test_value_errors(item, fragment):
    assert fragment in error_of(apply_overrides, Config(), [item])


def test_not_valid_toml(tmp_path):
    msg = error_of(load_config, write(tmp_path, "[train\nsteps = 6\n"))
    assert "not valid TOML" in msg


def test_missing_file(tmp_path):
    assert "not found" in error_of(load_config, tmp_path / "nope.toml")


# ---------------------------------------------------------------------------------------------
# --set literals


def test_set_literals_of_every_type():
    cfg = apply_overrides(
        Config(),
        [
            'data.path="/x y"',
            "train.steps=6",
            "optim.lr=3e-4",
            "train.compile=true",
            'dispersive.layers=["blocks.2", "blocks.-1"]',
            "optim.betas=[0.9, 0.99]",
            "sample.cfg_interval=[0, 1]",
            'model.overrides={depth=2, attn="math"}',
        ],
    )
    assert cfg.data.path == "/x y"
    assert cfg.train.steps == 6 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.compile is True
    assert cfg.dispersive.layers == ("blocks.2", "blocks.-1")
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.sample.cfg_interval == (0.0, 1.0)
    assert cfg.model.overrides == {"depth": 2, "attn": "math"}
    # One layer name is accepted where a list is expected.
    assert apply_overrides(cfg, ['dispersive.layers="blocks.3"']).dispersive.layers == ("blocks.3",)


def test_set_bare_string_for_string_keys():
    # Shells strip quotes: `--set data.path="/x"` arrives as data.path=/x.
    cfg = apply_overrides(Config(), ["data.path=/data/x", "data.name=synthetic"])
    assert cfg.data.path == "/data/x" and cfg.data.name == "synthetic"


def test_set_nested_overrides_dict():
    cfg = apply_overrides(Config(), ["model.overrides.depth=2", "model.overrides.attn='math'"])
    assert cfg.model.overrides == {"depth": 2, "attn": "math"}
    cfg2 = apply_overrides(cfg, ["model.overrides.depth=3"])
    assert (
        cfg2.model.overrides == {"depth": 3, "attn": "math"} and cfg.model.overrides["depth"] == 2
    )


def test_set_later_wins_and_original_untouched():
    base = Config()
    cfg = apply_overrides(base, ["train.steps=6", "train.steps=7"])
    assert cfg.train.steps == 7 and base.train.steps == 1000


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("train.steps", "key=value"),
        ("train.steps=abc", "not a TOML literal"),
        ("train.stpes=3", "did you mean 'train.steps'"),
        ("steps=3", "section.key"),
        ("train.steps.x=3", "not a table"),
        ("train.steps='6'", "train.steps must be an int, got str '6'"),
        ("dispersive.layers=[blocks.2]", "not a TOML literal"),
        ('data.path="/x', "not a TOML literal"),
    ],
)
def test_set_errors(item, fragment):
    assert fragment in error_of(apply_overrides, Config(), [item])


def test_load_config_applies_overrides_after_file(tmp_path):
    p = write(tmp_path, "[train]\nsteps = 6\n")
    assert load_config(p, ["train.steps=9"]).train.steps == 9


@settings(max_examples=30, deadline=None)
@given(
    lr=st.floats(min_value=1e-12, max_value=1e3, allow_nan=False),
    steps=st.integers(min_value=0, max_value=10**9),
    name=st.text(
        alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=20
    ),
    flag=st.booleans(),
)
def test_set_literal_round_trip(lr, steps, name, flag):
    cfg = apply_overrides(
        Config(),
        [
            f"optim.lr={lr!r}",
            f"train.steps={steps}",
            f"train.run_name={json.dumps(name, ensure_ascii=False)}",
            f"train.compile={str(flag).lower()}",
        ],
    )
    assert (cfg.optim.lr, cfg.train.steps, cfg.train.run_name) == (lr, steps, name)
    assert cfg.train.compile is flag


# ---------------------------------------------------------------------------------------------
# extends


def test_extends_merges_and_child_wins(tmp_path):
    write(tmp_path, "[train]\nsteps = 6\nseed = 3\n[dispersive]\ntau = 2.0\n", "base.toml")
    child = write(tmp_path, 'extends = "base.toml"\n[train]\nsteps = 9\n', "child.toml")
    cfg = load_config(child)
    assert (cfg.train.steps, cfg.train.seed, cfg.dispersive.tau) == (9, 3, 2.0)


def test_extends_cycle(tmp_path):
    write(tmp_path, 'extends = "b.toml"\n', "a.toml")
    write(tmp_path, 'extends = "a.toml"\n', "b.toml")
    assert "cycle" in error_of(load_config, tmp_path / "a.toml")


# ---------------------------------------------------------------------------------------------
# Cross-field validation


def test_batch_must_divide_by_world_size():
    cfg = apply_overrides(Config(), ["train.global_batch=10"])
    msg = error_of(validate, cfg, world_size=4)
    assert "10" in msg and "4" in msg and "train.global_batch" in msg
    validate(cfg, world_size=5)
    assert per_device_batch(cfg, 5) == 2


def test_one_sample_per_device_with_dispersive_is_refused():
    cfg = apply_overrides(Config(), ["train.global_batch=8", "dispersive.weight=0.5"])
    msg = error_of(validate, cfg, world_size=8)
    assert "at least 2 samples per device" in msg and "8" in msg
    validate(apply_overrides(cfg, ["dispersive.weight=0"]), world_size=8)  # baseline is fine
    validate(apply_overrides(cfg, ["dispersive.scope='global'"]), world_size=8)


def test_group_size_rules():
    cfg = apply_overrides(
        Config(), ["train.global_batch=256", "dispersive.weight=0.5", "dispersive.group_size=16"]
    )
    for ws in (1, 2, 4, 8, 16):
        validate(cfg, world_size=ws)
        assert dispersive_group_size(cfg, ws) == 16
    assert "does not divide into dispersive.group_size" in error_of(validate, cfg, world_size=32)
    assert "at least 2" in error_of(apply_overrides, cfg, ["dispersive.group_size=1"])
    assert "scope 'local'" in error_of(apply_overrides, cfg, ["dispersive.scope='global'"])
    base = apply_overrides(cfg, ["dispersive.group_size=0"])
    assert dispersive_group_size(base, 4) == 64
    assert dispersive_group_size(apply_overrides(base, ["dispersive.scope='global'"]), 4) == 256


def test_contrastive_needs_two_views():
    msg = error_of(apply_overrides, Config(), ["dispersive.contrastive=true"])
    assert "objective.two_view" in msg
    apply_overrides(Config(), ["dispersive.contrastive=true", "objective.two_view='restricted'"])


def test_sampler_must_fit_objective():
    msg = error_of(apply_overrides, Config(), ["objective.kind='ddpm'"])
    assert "sample.sampler = 'heun'" in msg and "ddpm, ddim" in msg


def test_dataset_shape_must_fit_model():
    msg = error_of(apply_overrides, Config(), ["data.name='cifar10'"])
    assert "model.input_size = 32" in msg and "model.in_channels = 3" in msg
    msg = error_of(apply_overrides, Config(), ["model.num_classes=100"])
    assert "model.num_classes = 10" in msg


def test_fashion_mnist_proxy_needs_fashion_mnist_shapes():
    msg = error_of(
        apply_overrides, Config(), ["data.name='synthetic'", "model.input_size=8", "eval.every=5"]
    )
    assert "eval.every = 0" in msg and "8x8x1" in msg
    apply_overrides(Config(), ["eval.every=5"])
    # Inception features are for `dispersive eval`, not the in-training proxy.
    msg = error_of(apply_overrides, Config(), ["eval.every=5", "eval.features='inception'"])
    assert "eval.every = 0" in msg and "'inception'" in msg
    apply_overrides(Config(), ["eval.features='inception'"])


def test_folder_datasets_need_a_path():
    msg = error_of(apply_overrides, Config(), ["data.name='latents'", "model.in_channels=4"])
    assert "data.path" in msg


def test_tapped_layers_must_exist_in_model():
    cfg = load_config(CONFIGS / "tiny.toml")
    model = tiny_model(cfg)
    validate(cfg, model=model)
    bad = apply_overrides(cfg, ['dispersive.layers=["blocks.9"]'])
    msg = error_of(validate, bad, model=model)
    assert "dispersive.layers" in msg and "out of range" in msg
    typo = apply_overrides(cfg, ['dispersive.layers=["blokcs.1"]'])
    assert "blocks.1" in error_of(validate, typo, model=model)
    validate(apply_overrides(cfg, ['dispersive.layers=["blocks.-1"]']), model=model)


def test_model_kind_must_match_objective():
    cfg = load_config(CONFIGS / "tiny.toml")
    ddpm = apply_overrides(cfg, ["objective.kind='ddpm'", "sample.sampler='ddim'"])
    msg = error_of(validate, ddpm, model=tiny_model(cfg))
    assert "'flow' model" in msg and "objective.kind = 'flow'" in msg


def test_model_kwargs_build_the_model_config():
    cfg = apply_overrides(load_config(CONFIGS / "tiny.toml"), ["model.overrides.depth=2"])
    model = tiny_model(cfg)
    assert model.config == model_kwargs(cfg.model)
    assert len(model.block_names) == 2


# ---------------------------------------------------------------------------------------------
# Presets


def test_expected_presets_exist():
    names = {p.name for p in PRESETS}
    for n in (
        "tiny.toml",
        "fashion-mnist.toml",
        "fashion-mnist-disp.toml",
        "imagenet256-sit-b2.toml",
        "imagenet256-sit-b2-disp.toml",
        "imagenet256-sit-b2-disp-pytorch.toml",
        "imagenet256-sit-xl2-disp.toml",
        "imagenet256-dit-b2-disp.toml",
        "imagenet256-mf-b4-disp.toml",
        "imagenet256-mf-b2-disp.toml",
        "cifar10-unet-disp.toml",
    ):
        assert n in names, n


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_loads_and_validates_on_meta(preset):
    cfg = load_config(preset)
    model = tiny_model(cfg)  # meta device: the big ones cost nothing
    validate(cfg, world_size=1, model=model)
    assert model.kind == cfg.objective.kind
    for layer in cfg.dispersive.layers:
        # Tapped layers are real blocks (not arbitrary submodules).
        from dispersive.taps import resolve_module

        name, _ = resolve_module(model, layer)
        assert name in model.block_names


def test_paper_presets_follow_the_paper():
    # paper: lambda 0.5, tau 0.5, blocks[depth // 4 - 1], 16 per device; authors: 0.25, 1.0, last.
    for stem in ("imagenet256-sit-b2", "imagenet256-sit-xl2"):
        paper = load_config(CONFIGS / f"{stem}-disp.toml")
        authors = load_config(CONFIGS / f"{stem}-disp-pytorch.toml")
        depth = tiny_model(paper).depth
        assert (paper.dispersive.weight, paper.dispersive.tau) == (0.5, 0.5)
        assert paper.dispersive.layers == (f"blocks.{depth // 4 - 1}",)
        assert dispersive_group_size(paper, 16) == 16 and dispersive_group_size(paper, 1) == 16
        assert (authors.dispersive.weight, authors.dispersive.tau) == (0.25, 1.0)
        assert authors.dispersive.layers == (f"blocks.{depth - 1}",)
        assert dispersive_group_size(authors, 8) == 32
        assert paper.train.global_batch == 256 and paper.optim.lr == 1e-4
        base = load_config(CONFIGS / f"{stem}.toml")
        assert base.dispersive.weight == 0.0
        assert dataclasses.replace(paper, dispersive=base.dispersive) == base
    assert load_config(CONFIGS / "imagenet256-mf-b4-disp.toml").dispersive.weight == 0.25
    assert load_config(CONFIGS / "imagenet256-mf-b2-disp.toml").dispersive.weight == 1.0
    cifar = load_config(CONFIGS / "cifar10-unet-disp.toml")
    assert cifar.dispersive.layers == (tiny_model(cifar).block_names[14],)


def test_fashion_mnist_presets_differ_only_in_dispersive():
    base = load_config(CONFIGS / "fashion-mnist.toml")
    disp = load_config(CONFIGS / "fashion-mnist-disp.toml")
    assert base.dispersive.weight == 0.0 and disp.dispersive.weight > 0
    assert dataclasses.replace(disp, dispersive=base.dispersive) == base


def test_choices_are_the_librarys_own_names():
    # One source of names: a new variant, path, t distribution, sampler or feature network is
    # added to its library registry and the config accepts it, with nothing copied here.
    from dispersive import losses, paths, samplers, timesteps
    from dispersive.data.datasets import DATASETS
    from dispersive.eval.features import FEATURES
    from dispersive.generate import KIND_SAMPLERS
    from dispersive.timesteps import TWO_VIEW_MODES

    assert CHOICES["dispersive.variant"] is losses.VARIANTS
    assert CHOICES["dispersive.scope"] is losses.SCOPES
    assert CHOICES["objective.t_dist"] is timesteps.T_DISTS
    assert CHOICES["objective.path"] == tuple(paths.PATHS)
    assert CHOICES["objective.two_view"] == ("none", *TWO_VIEW_MODES)
    assert CHOICES["objective.kind"] == tuple(KIND_SAMPLERS)
    assert CHOICES["sample.sampler"] == tuple(samplers.SAMPLERS)
    assert CHOICES["eval.features"] is FEATURES and CHOICES["data.name"] is DATASETS
    # Every sampler a kind allows exists, and every sampler fits some kind.
    by_kind = [s for names in KIND_SAMPLERS.values() for s in names]
    assert sorted(by_kind) == sorted(samplers.SAMPLERS)
