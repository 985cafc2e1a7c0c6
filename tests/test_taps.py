"""Tests for dispersive.taps: FeatureTap, resolve_module, module_names.

Oracles: activations recomputed by calling the submodules by hand (no hooks involved), and
gradients of the same model without checkpointing / without compilation.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from _tiny import tiny_unet2d
from dispersive.taps import FeatureTap, module_names, resolve_module, unwrap
from dispersive.train.distributed import retire_process_group

VOCAB, T, D, DEPTH, B = 11, 5, 16, 4, 6


class Block(nn.Module):
    """Pre-norm transformer block; the attention submodule returns a tuple."""

    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self, depth: int = DEPTH, ckpt: str = "none") -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(0.1 * torch.randn(1, T, D))
        self.blocks = nn.ModuleList([Block(D) for _ in range(depth)])
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)
        self.ckpt = ckpt  # "none" | "reentrant" | "nonreentrant"

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            if self.ckpt == "none":
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.ckpt == "reentrant")
        return self.head(self.norm(x))

    def manual_block_outputs(self, tokens: Tensor) -> list[Tensor]:
        """Every block's output computed without the forward (oracle)."""
        x = self.embed(tokens) + self.pos
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs


class Wrapper(nn.Module):
    """What DDP looks like from the outside: a single child called ``module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def dispersive_like(z: Tensor, tau: float = 0.5) -> Tensor:
    """InfoNCE-l2 dispersive loss written here independently of the library (scalar)."""
    z = z.flatten(1)
    d = torch.cdist(z, z).pow(2) / z.shape[1]
    return torch.logsumexp(-d.flatten() / tau, dim=0) - math.log(d.numel())


@pytest.fixture
def model() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer()


@pytest.fixture
def tokens() -> Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))


def oracle(model: TinyTransformer, tokens: Tensor) -> list[Tensor]:
    """Block outputs from a copy: a copy's modules do not record into the model's taps."""
    return copy.deepcopy(model).manual_block_outputs(tokens)


def no_hooks(model: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 for m in model.modules())


# ---------------------------------------------------------------- basic recording


def test_single_name_pop_returns_tensor_and_clears(model, tokens):
    tap = FeatureTap(model, "blocks.1")
    assert tap.names == ("blocks.1",) and tap.resolved == {"blocks.1": "blocks.1"}
    model(tokens)
    assert tap.counts == {"blocks.1": 1}
    z = tap.pop()
    assert isinstance(z, Tensor) and z.shape == (B, T, D)
    torch.testing.assert_close(z, oracle(model, tokens)[1])
    assert z.requires_grad  # graph kept: a loss on it trains the model
    assert tap.counts == {"blocks.1": 0}
    with pytest.raises(RuntimeError, match="nothing recorded for 'blocks.1'.*torch.compile"):
        tap.pop()


def test_several_names_dict_with_negative_index(model, tokens):
    names = ["blocks.-1", "blocks.0", "embed"]
    tap = FeatureTap(model, names)
    assert tap.resolved == {"blocks.-1": "blocks.3", "blocks.0": "blocks.0", "embed": "embed"}
    model(tokens)
    out = tap.pop()
    assert isinstance(out, dict) and list(out) == names  # keys as given, in order
    ref = oracle(model, tokens)
    torch.testing.assert_close(out["blocks.-1"], ref[-1])
    torch.testing.assert_close(out["blocks.0"], ref[0])
    torch.testing.assert_close(out["embed"], model.embed(tokens))


def test_single_name_in_a_list_still_returns_dict(model, tokens):
    tap = FeatureTap(model, ["blocks.2"])
    model(tokens)
    out = tap.pop()
    assert isinstance(out, dict) and list(out) == ["blocks.2"]


def test_tuple_output_records_first_tensor(model, tokens):
    tap = FeatureTap(model, "blocks.1.attn")  # MultiheadAttention returns (out, None)
    model(tokens)
    z = tap.pop()
    x1 = oracle(model, tokens)[0]
    h = model.blocks[1].norm1(x1)
    torch.testing.assert_close(z, model.blocks[1].attn(h, h, h, need_weights=False)[0])


def test_module_without_tensor_output_raises_clearly():
    class NoTensor(nn.Module):
        def forward(self, x):
            return {"note": "no tensor here"}

    net = nn.Sequential(nn.Linear(2, 2), NoTensor())
    FeatureTap(net, "1")
    with pytest.raises(TypeError, match="'1'.*no tensor"):
        net(torch.randn(3, 2))


def test_detach_records_values_without_graph(model, tokens):
    tap = FeatureTap(model, "blocks.2", detach=True)
    model(tokens)
    z = tap.pop()
    assert not z.requires_grad
    torch.testing.assert_close(z, oracle(model, tokens)[2].detach())


def test_latest_call_wins_and_is_counted(model, tokens):
    tap = FeatureTap(model, "blocks.0")
    model(tokens)
    other = (tokens + 3) % VOCAB
    model(other)
    assert tap.counts == {"blocks.0": 2}
    torch.testing.assert_close(tap.pop(), oracle(model, other)[0])


def test_weight_shared_module_called_twice_in_one_forward():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    net = nn.Sequential(lin, nn.Tanh(), lin)  # the same module at indices 0 and 2
    tap = FeatureTap(net, "0")
    x = torch.randn(4, 3)
    net(x)
    assert tap.counts == {"0": 2}
    torch.testing.assert_close(tap.pop(), lin(torch.tanh(lin(x))))


def test_partial_record_names_the_missing_module(model, tokens):
    tap = FeatureTap(model, ["blocks.0", "blocks.3"])
    model.blocks[0](model.embed(tokens) + model.pos)  # only block 0 runs
    with pytest.raises(RuntimeError, match="'blocks.0' recorded but nothing for 'blocks.3'"):
        tap.pop()
    with pytest.raises(RuntimeError, match="nothing recorded"):  # the failed pop cleared
        tap.pop()


# ---------------------------------------------------------------- names and errors


def test_unknown_name_lists_close_matches_and_leaves_no_hook(model):
    with pytest.raises(ValueError, match=r"'block\.1'.*did you mean.*'blocks\.1'"):
        FeatureTap(model, "block.1")
    with pytest.raises(ValueError, match=r"did you mean.*'blocks\.2\.mlp'"):
        FeatureTap(model, "blocks.2.mpl")
    with pytest.raises(ValueError, match="module_names"):
        FeatureTap(model, ["blocks.0", "zzzzzz"])
    assert no_hooks(model)  # the valid first name was not hooked either


def test_unknown_name_without_close_match_lists_top_level(model):
    with pytest.raises(ValueError, match="top-level modules are 'embed', 'blocks'"):
        resolve_module(model, "qqqqqq")


@pytest.mark.parametrize("name", ["blocks.4", "blocks.-5"])
def test_index_out_of_range(model, name):
    with pytest.raises(ValueError, match="out of range for 'blocks'.*length 4.*-4..-1"):
        FeatureTap(model, name)


@pytest.mark.parametrize(
    ("names", "error", "match"),
    [
        ([], ValueError, "at least one"),
        (3, TypeError, "str or a sequence of str"),
        (["blocks.0", 1], TypeError, "str or a sequence of str"),
        (["blocks.0", "blocks.0"], ValueError, "distinct"),
        ("", ValueError, "non-empty components"),
        ("blocks..1", ValueError, "non-empty components"),
    ],
)
def test_bad_names_argument(model, names, error, match):
    with pytest.raises(error, match=match):
        FeatureTap(model, names)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        FeatureTap(lambda x: x, "blocks.0")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), data=st.data())
def test_integer_indices_resolve_like_python(n, data):
    net = nn.Sequential(*[nn.Identity() for _ in range(n)])
    i = data.draw(st.integers(-n, n - 1))
    path, module = resolve_module(net, str(i))
    assert path == str(i % n) and module is net[i]


def test_module_names_resolve_and_ignore_wrappers(model):
    names = module_names(model)
    assert names[:2] == ["embed", "blocks"] and "blocks.3.mlp.2" in names
    assert len(names) == len(set(names)) == len(list(model.named_modules())) - 1
    for name in names:
        path, module = resolve_module(model, name)
        assert path == name and model.get_submodule(path) is module
    assert module_names(Wrapper(Wrapper(model))) == names


def test_wrapper_prefixes_resolve_both_ways(model, tokens):
    wrapped = Wrapper(model)
    assert resolve_module(wrapped, "blocks.-1")[0] == "module.blocks.3"
    assert resolve_module(wrapped, "module.blocks.1")[0] == "module.blocks.1"
    assert resolve_module(model, "module.blocks.1") == ("blocks.1", model.blocks[1])
    assert resolve_module(model, "_orig_mod.module.blocks.1")[1] is model.blocks[1]
    tap = FeatureTap(wrapped, "blocks.1")
    assert tap.resolved == {"blocks.1": "module.blocks.1"}
    wrapped(tokens)
    torch.testing.assert_close(tap.pop(), oracle(model, tokens)[1])


def test_unwrap_steps_through_nested_wrappers_only(model):
    assert unwrap(Wrapper(Wrapper(model))) is model and unwrap(model) is model
    fn = lambda x: x  # noqa: E731  (a model function that is not a module is left as it is)
    assert unwrap(fn) is fn


def test_ordinary_attribute_named_module_is_not_a_wrapper():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Sequential(nn.Linear(2, 2))
            self.head = nn.Linear(2, 2)

    net = Net()
    assert resolve_module(net, "module.0")[1] is net.module[0]
    with pytest.raises(ValueError, match="no submodule named '0'"):
        resolve_module(net, "0")  # "module" has a sibling, so it is not stepped through
    assert unwrap(net) is net


# ---------------------------------------------------------------- lifetime


def test_remove_stops_recording(model, tokens):
    tap = FeatureTap(model, ["blocks.0", "blocks.2"])
    model(tokens)
    tap.remove()
    tap.remove()  # idempotent
    assert no_hooks(model) and not tap.active
    assert set(tap.pop()) == {"blocks.0", "blocks.2"}  # recorded before removal
    model(tokens)
    with pytest.raises(RuntimeError, match="removed"):
        tap.pop()


def test_context_manager_removes_hooks(model, tokens):
    with FeatureTap(model, "blocks.-1") as tap:
        assert not no_hooks(model)
        model(tokens)
        z = tap.pop()
    assert no_hooks(model)
    torch.testing.assert_close(z, oracle(model, tokens)[-1])
    assert "removed" in repr(tap)


def test_deepcopy_of_tapped_model_does_not_record_into_the_tap(model, tokens):
    tap = FeatureTap(model, "blocks.1")
    ema = copy.deepcopy(model)  # copies the hook dicts, hence the identity check in the hook
    ema(tokens)
    with pytest.raises(RuntimeError, match="nothing recorded"):
        tap.pop()
    model(tokens)
    torch.testing.assert_close(tap.pop(), ema.manual_block_outputs(tokens)[1])


def test_two_taps_on_one_module_are_independent(model, tokens):
    a = FeatureTap(model, "blocks.1")
    b = FeatureTap(model, "blocks.1", detach=True)
    model(tokens)
    za = a.pop()
    a.remove()
    model(tokens)  # only b records now; it keeps the latest
    assert b.counts == {"blocks.1": 2}
    torch.testing.assert_close(b.pop(), za.detach())


# ---------------------------------------------------------------- activation checkpointing


def _grads(model: nn.Module, tokens: Tensor, name: str) -> tuple[Tensor, Tensor, dict]:
    """Forward, pop, regression + dispersive-like loss, backward; returns (z, loss, grads)."""
    tap = FeatureTap(model, name)
    logits = model(tokens)
    z = tap.pop()
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + 0.5 * dispersive_like(z)
    model.zero_grad()
    loss.backward()
    assert tap.counts == {name: 0}  # the recomputation in backward recorded nothing
    with pytest.raises(RuntimeError, match="nothing recorded"):
        tap.pop()
    tap.remove()
    return z.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["blocks.1", "blocks.1.mlp"])  # the block, or inside it
def test_nonreentrant_checkpoint_same_activation_and_gradients(model, tokens, name):
    ckpt_model = copy.deepcopy(model)
    ckpt_model.ckpt = "nonreentrant"
    z0, loss0, g0 = _grads(model, tokens, name)
    z1, loss1, g1 = _grads(ckpt_model, tokens, name)
    torch.testing.assert_close(z1, z0)
    torch.testing.assert_close(loss1, loss0)
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], msg=n)
    # The dispersive term reaches the tapped block: its gradient differs from CE alone.
    assert g0["blocks.1.mlp.0.weight"].abs().sum() > 0


def test_reentrant_checkpoint_is_loud_unless_detached(model, tokens):
    model.ckpt = "reentrant"
    tap = FeatureTap(model, "blocks.1")
    model(tokens)
    with pytest.raises(RuntimeError, match="use_reentrant=True.*use_reentrant=False"):
        tap.pop()
    tap.remove()

    tap = FeatureTap(model, ["blocks.1", "blocks.1.mlp"], detach=True)
    logits = model(tokens)
    out = tap.pop()
    torch.testing.assert_close(out["blocks.1"], oracle(model, tokens)[1].detach())
    logits.sum().backward()  # reentrant recomputation happens here
    assert tap.counts == {"blocks.1": 0, "blocks.1.mlp": 0}


def test_no_grad_forward_without_grad_inputs_is_fine(model, tokens):
    tap = FeatureTap(model, "blocks.0")
    with torch.no_grad():
        model(tokens)
    z = tap.pop()  # ordinary evaluation: inputs do not require grad, no error
    assert not z.requires_grad


# ---------------------------------------------------------------- DDP and torch.compile


def test_real_ddp_one_process(model, tokens, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        ddp = DDP(model)
        tap = FeatureTap(ddp, "blocks.-1")
        assert tap.resolved == {"blocks.-1": "module.blocks.3"}
        ddp(tokens)
        z = tap.pop()
        torch.testing.assert_close(z, oracle(model, tokens)[-1])
        dispersive_like(z).backward()
        assert model.blocks[3].mlp[0].weight.grad is not None
    finally:
        retire_process_group()  # the group outlives the DDP reducer (see its docstring)


@pytest.mark.slow
def test_compile_traces_hooks_registered_before(tokens):
    # backend="aot_eager": dynamo traces the hooks and AOTAutograd builds the backward, like
    # inductor, but without a C++ compile (inductor takes ~20 s even on this model on 2 cores).
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyTransformer(depth=2)  # compile time grows with depth
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    tap = FeatureTap(compiled, ["blocks.0", "_orig_mod.blocks.-1"])
    assert tap.resolved == {
        "blocks.0": "_orig_mod.blocks.0",
        "_orig_mod.blocks.-1": "_orig_mod.blocks.1",
    }
    compiled(tokens)
    assert tap.counts == {"blocks.0": 1, "_orig_mod.blocks.-1": 1}
    out = tap.pop()
    ref = eager.manual_block_outputs(tokens)  # eager was copied before the tap
    torch.testing.assert_close(out["blocks.0"], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["_orig_mod.blocks.-1"], ref[1], atol=1e-5, rtol=1e-5)
    # Gradient through the popped activation equals eager.
    dispersive_like(out["blocks.0"]).backward()
    dispersive_like(ref[0]).backward()
    w, w_ref = model.blocks[0].mlp[0].weight, eager.blocks[0].mlp[0].weight
    assert w.grad is not None and w.grad.abs().sum() > 0
    torch.testing.assert_close(w.grad, w_ref.grad, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="nothing recorded"):
        tap.pop()
    torch._dynamo.reset()


def test_tap_created_after_compiled_run_is_loud(tokens):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyTransformer(depth=3)
    compiled = torch.compile(model, backend="eager")
    compiled(tokens)  # compiled without any hook
    tap = FeatureTap(compiled, "blocks.2")
    compiled(tokens)
    try:
        z = tap.pop()
    except RuntimeError as err:  # current PyTorch: the compiled code skips the new hook
        assert "create the FeatureTap before torch.compile" in str(err)
    else:  # should a PyTorch version recompile on new hooks, the value must be right
        torch.testing.assert_close(z, oracle(model, tokens)[2])
    torch._dynamo.reset()


# ---------------------------------------------------------------- diffusers UNet


@pytest.mark.slow
def test_diffusers_unet2d():
    pytest.importorskip("diffusers")
    unet = tiny_unet2d(1, attention=False)
    names = [
        "down_blocks.1.resnets.0",
        "mid_block",
        "down_blocks.0",  # returns (hidden_states, skip_states): the first tensor is recorded
        "down_blocks.-1",
        "time_embedding",
    ]
    with pytest.raises(ValueError, match="did you mean 'down_blocks.1'"):
        FeatureTap(unet, "down_block.1")
    with FeatureTap(unet, names) as tap:
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
        unet(x, t)
        r = tap.pop()
    assert tap.resolved["down_blocks.-1"] == "down_blocks.1"
    assert r["down_blocks.0"].shape == (2, 8, 4, 4)  # after the first downsample
    assert r["down_blocks.1.resnets.0"].shape == (2, 16, 4, 4)
    assert r["mid_block"].shape == (2, 16, 4, 4)
    # Chain the recorded activations through the submodules by hand (oracle).
    temb = r["time_embedding"]
    down0 = unet.down_blocks[0]
    h = down0.resnets[0](unet.conv_in(x), temb)
    torch.testing.assert_close(r["down_blocks.0"], down0.downsamplers[0](h))
    res = unet.down_blocks[1].resnets[0](r["down_blocks.0"], temb)
    torch.testing.assert_close(r["down_blocks.1.resnets.0"], res)
    torch.testing.assert_close(r["down_blocks.-1"], res)  # last down block has no downsampler
    torch.testing.assert_close(r["mid_block"], unet.mid_block(r["down_blocks.-1"], temb))
    assert no_hooks(unet)
