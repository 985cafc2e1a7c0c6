"""Classifier-free guidance: the algebra, the batching, the interval and the channels option."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dispersive.guidance import guide, guided

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_check import HostReads  # noqa: E402  (the GPU check's read counter)

NULL = 5  # the null label of a 5-class model


class ToyModel:
    """A label-dependent nonlinear model that records the batches it sees.

    Each output row depends only on its own row of every input, as for a real network in eval
    mode, so a batched forward equals separate calls.
    """

    def __init__(self, out_channels: int = 4):
        self.out_channels = out_channels
        self.batches: list[int] = []

    def __call__(self, x, t, *rest):
        *extra, y = rest
        self.batches.append(x.shape[0])
        yy = y.to(x.dtype).reshape(-1, 1, 1)
        tt = t.reshape(-1, 1, 1)
        h = extra[0].reshape(-1, 1, 1) if extra else 0.0
        base = torch.tanh(x.sum(1, keepdim=True)) * (1 + yy) + tt**2 - 0.5 * h * yy
        scales = torch.arange(1, self.out_channels + 1, dtype=x.dtype).reshape(1, -1, 1)
        return base * scales + x[:, :1] * yy


def _inputs(b: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 3, generator=g, dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64)
    y = torch.randint(0, NULL, (b,), generator=g)
    return x, t, y


def test_scale_one_is_the_conditional_model_without_doubling():
    model = ToyModel()
    x, t, y = _inputs()
    out = guided(model, y=y, null_y=NULL, scale=1.0)(x, t)
    torch.testing.assert_close(out, model(x, t, y))
    assert model.batches == [6, 6]  # one plain call from cfg, one from the check


def test_scale_zero_is_the_unconditional_model():
    model = ToyModel()
    x, t, y = _inputs()
    out = guided(model, y=y, null_y=NULL, scale=0.0)(x, t)
    torch.testing.assert_close(out, model(x, t, torch.full_like(y, NULL)))


@pytest.mark.parametrize("scale", [1.5, 4.0, -0.5])
def test_one_batched_forward_equals_two_calls(scale):
    model = ToyModel()
    x, t, y = _inputs()
    out = guided(model, y=y, null_y=torch.full_like(y, NULL), scale=scale)(x, t)
    assert model.batches == [12]  # ONE forward on the doubled batch
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    torch.testing.assert_close(out, uncond + scale * (cond - uncond))


def test_outside_the_interval_it_is_the_conditional_prediction_in_one_plain_call():
    model = ToyModel()
    x, _, y = _inputs()
    t = torch.full((6,), 0.9, dtype=torch.float64)
    out = guided(model, y=y, null_y=NULL, scale=3.0, interval=(0.2, 0.7))(x, t)
    assert model.batches == [6]
    torch.testing.assert_close(out, model(x, t, y))


def test_mixed_batch_guides_only_the_samples_inside_the_interval():
    model = ToyModel()
    x, _, y = _inputs()
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.2], dtype=torch.float64)
    out = guided(model, y=y, null_y=NULL, scale=2.0, interval=(0.2, 0.7))(x, t)
    assert model.batches == [6 + 4]  # the batch plus the unconditional copies of 4 rows
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    inside = (t >= 0.2) & (t <= 0.7)  # closed interval
    want = torch.where(inside.reshape(-1, 1, 1), uncond + 2.0 * (cond - uncond), cond)
    torch.testing.assert_close(out, want)


def test_channels_option_guides_the_leading_channels_only():
    model = ToyModel(out_channels=8)
    x, t, y = _inputs()
    out = guided(model, y=y, null_y=NULL, scale=4.0, channels=3)(x, t)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])
    # None (the default) guides every channel.
    torch.testing.assert_close(guide(cond, uncond, 4.0), uncond + 4.0 * (cond - uncond))


def test_extra_per_sample_arguments_are_doubled_with_x():
    # MeanFlow: u(z, t, h, y); h must follow its row into the unconditional half.
    model = ToyModel()
    x, _, y = _inputs()
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.2], dtype=torch.float64)
    h = torch.linspace(0.1, 0.6, 6, dtype=torch.float64)
    out = guided(model, y=y, null_y=NULL, scale=2.5, interval=(0.25, 1.0))(x, t, h)
    cond, uncond = model(x, t, h, y), model(x, t, h, torch.full_like(y, NULL))
    inside = (t >= 0.25).reshape(-1, 1, 1)
    torch.testing.assert_close(out, torch.where(inside, uncond + 2.5 * (cond - uncond), cond))


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(-2.0, 8.0, allow_nan=False),
    lo=st.floats(0.0, 1.0),
    width=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    channels=st.one_of(st.none(), st.integers(1, 5)),
)
def test_cfg_matches_a_per_sample_oracle(scale, lo, width, seed, channels):
    model = ToyModel()
    x, t, y = _inputs(b=5, seed=seed)
    hi = min(1.0, lo + width)
    out = guided(model, y=y, null_y=NULL, scale=scale, interval=(lo, hi), channels=channels)(x, t)
    for i in range(5):
        xi, ti = x[i : i + 1], t[i : i + 1]
        cond = model(xi, ti, y[i : i + 1])
        if scale != 1.0 and lo <= float(t[i]) <= hi:
            uncond = model(xi, ti, torch.full((1,), NULL))
            k = cond.shape[1] if channels is None else channels
            want = cond.clone()
            want[:, :k] = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
        else:
            want = cond
        torch.testing.assert_close(out[i : i + 1], want)


def test_bad_arguments_name_the_problem():
    model = ToyModel()
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="lo <= hi"):
        guided(model, y=y, null_y=NULL, scale=2.0, interval=(0.8, 0.2))
    with pytest.raises(ValueError, match=r"y must have shape \(6,\)"):
        guided(model, y=y[:3], null_y=NULL, scale=2.0)(x, t)
    with pytest.raises(TypeError, match="integer class labels"):
        guided(model, y=y.float(), null_y=NULL, scale=2.0)(x, t)
    with pytest.raises(ValueError, match="channels"):
        guided(model, y=y, null_y=NULL, scale=2.0, channels=0)


# ------------------------------------------------------------------ through generate()


class ClassVelocity(torch.nn.Module):
    """An analytic flow model whose velocity is a per-class, per-channel constant:
    v[:, k] = (y + 1) * (k + 1) / 10 for label y (the null label is NULL)."""

    kind, num_classes, in_channels, out_channels, input_size = "flow", NULL, 4, 4, 2
    config = {"name": "class-velocity"}

    def forward(self, x, t, y):
        k = torch.arange(1, 5, dtype=x.dtype).reshape(1, 4, 1, 1)
        return ((y.to(x.dtype) + 1).reshape(-1, 1, 1, 1) * k / 10).expand_as(x).clone()


@pytest.mark.parametrize("channels", [None, 1, 3, 4])
def test_generate_guides_the_chosen_channels_and_records_them(channels):
    from dispersive.generate import generate

    scale, y = 2.5, torch.tensor([0, 3, 1])
    images, spec = generate(
        ClassVelocity(), num=3, sampler="euler", steps=1, cfg_scale=scale, cfg_channels=channels,
        labels=y, space="latent", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    noise = torch.randn((3, 4, 2, 2), generator=torch.Generator().manual_seed(0))
    velocity = noise - images  # one Euler step from t = 1 to 0: x0 = noise - v
    k = torch.arange(1, 5, dtype=torch.float32).reshape(1, 4, 1, 1)
    cond = (y + 1).float().reshape(-1, 1, 1, 1) * k / 10
    uncond = (NULL + 1) * k / 10
    n = 4 if channels is None else channels
    expect = cond.expand(3, 4, 2, 2).clone()
    expect[:, :n] = (uncond + scale * (cond - uncond)).expand(3, 4, 2, 2)[:, :n]
    torch.testing.assert_close(velocity, expect)
    assert spec["cfg_channels"] == n and spec["cfg_scale"] == scale


def test_generate_cfg_channels_errors_are_named():
    from dispersive.generate import generate

    for bad in (0, 5):
        with pytest.raises(ValueError, match=r"cfg_channels must be in \[1, 4\]"):
            generate(ClassVelocity(), num=1, steps=1, cfg_scale=2.0, cfg_channels=bad)


def test_imagenet_presets_guide_three_latent_channels_as_the_official_code():
    from pathlib import Path

    from dispersive.errors import UserError
    from dispersive.train.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    for name in ("sit-b2", "sit-b2-disp", "sit-xl2", "sit-xl2-disp-pytorch", "dit-b2-disp"):
        cfg = load_config(configs / f"imagenet256-{name}.toml")
        assert cfg.sample.cfg_channels == 3 and cfg.model.in_channels == 4, name
    assert load_config(configs / "tiny.toml").sample.cfg_channels == 0  # default: all
    with pytest.raises(UserError, match="sample.cfg_channels = 5 exceeds model.in_channels = 4"):
        load_config(configs / "imagenet256-sit-b2.toml", ["sample.cfg_channels=5"])


def test_sample_options_are_checked_against_the_sampler():
    from pathlib import Path

    from dispersive.errors import UserError
    from dispersive.train.config import load_config

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
    cfg = load_config(tiny, ['sample.sampler="dopri5"', "sample.options={rtol=1e-4}"])
    assert cfg.sample.options == {"rtol": 1e-4}
    cfg = load_config(tiny, ["sample.options.final_euler=false"])  # tiny samples with heun
    assert cfg.sample.options == {"final_euler": False}
    with pytest.raises(UserError, match=r"sample.options \['rtol'\] are not options of"):
        load_config(tiny, ["sample.options.rtol=1e-4"])


def test_interval_none_guides_every_t_without_reading_t_back():
    # The same values as the interval (0, 1) for every t in it, with nothing read back per call
    # (the interval's test reads two booleans: a host sync each on an accelerator).
    x, t, y = _inputs()
    t[0], t[1] = 0.0, 1.0  # the closed ends
    model = ToyModel()
    with HostReads() as reads:
        out = guided(model, y=y, null_y=NULL, scale=2.5, interval=None)(x, t)
    assert reads.names == [] and model.batches == [12]
    with HostReads() as reads:
        want = guided(model, y=y, null_y=NULL, scale=2.5, interval=(0.0, 1.0))(x, t)
    assert reads.names == ["__bool__", "__bool__"]
    assert torch.equal(out, want)


@pytest.mark.parametrize(
    ("sampler", "interval", "tested"),
    [("heun", (0.0, 1.0), False), ("euler_maruyama", (-1.0, 2.0), False),
     ("heun", (0.0, 0.5), True), ("dopri5", (0.0, 1.0), True)],
)  # fmt: skip
def test_generate_skips_the_interval_test_only_when_every_t_is_inside(
    sampler, interval, tested, monkeypatch
):
    # generate passes interval=None when the guidance interval covers every t of a fixed-grid
    # sampler; dopri5 may evaluate just past t_end, so it keeps the test.
    import dispersive.generate as gen

    seen = []
    real = gen.guided
    monkeypatch.setattr(gen, "guided", lambda *a, **k: seen.append(k["interval"]) or real(*a, **k))
    images, spec = gen.generate(
        ClassVelocity(), num=3, sampler=sampler, steps=3, cfg_scale=2.0, cfg_interval=interval,
        space="latent", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert (seen[0] is not None) == tested
    assert spec["cfg_interval"] == list(interval)  # recorded as given
