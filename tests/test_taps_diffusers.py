"""FeatureTap on diffusers' own models (UNet2DModel, DiTTransformer2DModel), tiny configs.

Oracles: the activations recomputed by calling the models' submodules by hand (no hooks), and
the value and gradients of the same loss without the tap path (hand-computed activation) or
without gradient checkpointing. The last test is the README's diffusers example.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _tiny import tiny_unet2d

diffusers = pytest.importorskip("diffusers")

from dispersive import FeatureTap, dispersive_loss  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def tiny_dit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned variance, as DiT
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=4,
    )
    # adaLN-Zero starts every block as the identity and the output as 0; perturb the zeros so
    # that every block and its gradient is non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    # eval(): in train mode the label embedding drops labels at random (class dropout 0.1),
    # so two forwards would see different conditioning. Checkpointing does not depend on it.
    return model.eval()


def unet_mid_by_hand(unet, x, t):
    """mid_block's output of UNet2DModel, computed by calling its submodules (no hooks)."""
    emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))
    h = unet.conv_in(x)
    for block in unet.down_blocks:
        h, _ = block(hidden_states=h, temb=emb)
    return unet.mid_block(h, emb)


def test_unet2d_mid_block_value_and_gradient():
    unet = tiny_unet2d(3, attention=True)
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([3, 250, 500, 999])
    tap = FeatureTap(unet, ["mid_block", "down_blocks.1.attentions.0"])
    unet(x, t)
    rec = tap.pop()
    z = rec["mid_block"]
    assert z.shape == (4, 16, 4, 4) and rec["down_blocks.1.attentions.0"].shape == (4, 16, 4, 4)
    tap.remove()
    oracle = unet_mid_by_hand(unet, x, t)
    torch.testing.assert_close(z, oracle)

    # Gradient of L_disp through the tap = through the hand-computed activation.
    params = [p for p in unet.parameters() if p.requires_grad]
    g_tap = torch.autograd.grad(dispersive_loss(z, tau=0.5), params, allow_unused=True)
    g_ref = torch.autograd.grad(dispersive_loss(oracle, tau=0.5), params, allow_unused=True)
    n_nonzero = 0
    for a, b in zip(g_tap, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
            n_nonzero += bool(a.abs().sum() > 0)
    assert n_nonzero > 10  # the term reaches the encoder half of the UNet


def test_dit_transformer_blocks_by_hand_and_under_checkpointing():
    model = tiny_dit()
    x = torch.randn(4, 4, 8, 8)
    t, y = torch.tensor([1, 200, 600, 999]), torch.tensor([0, 3, 9, 10])  # 10: null class
    names = ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.-1"]
    with FeatureTap(model, names) as tap:
        out = model(x, timestep=t, class_labels=y).sample
        rec = tap.pop()
    assert out.shape == (4, 8, 8, 8)
    assert tap.resolved["transformer_blocks.-1"] == "transformer_blocks.2"
    h0 = rec["transformer_blocks.0"]
    assert h0.shape == (4, 16, 16)  # (B, tokens (8/2)^2, heads * head_dim)
    # Block 1 called by hand on block 0's recorded output (DiT passes timestep and labels).
    h1 = model.transformer_blocks[1](h0, timestep=t, class_labels=y)
    torch.testing.assert_close(rec["transformer_blocks.1"], h1)
    h2 = model.transformer_blocks[2](h1, timestep=t, class_labels=y)
    torch.testing.assert_close(rec["transformer_blocks.-1"], h2)

    # With diffusers' gradient checkpointing (use_reentrant=False) the tap records the real
    # forward only, and the loss on it has the same value and gradients.
    def loss_and_grads(m, block_calls: int):
        m.zero_grad()
        calls = []
        # A pre-hook: the recomputation stops early, before the block's forward hooks run.
        hook = m.transformer_blocks[1].register_forward_pre_hook(lambda *_: calls.append(1))
        with FeatureTap(m, "transformer_blocks.1") as tap:
            pred = m(x, timestep=t, class_labels=y).sample
            loss = pred.square().mean() + 0.5 * dispersive_loss(tap.pop(), tau=0.5)
            loss.backward()
            assert tap.counts == {"transformer_blocks.1": 0}  # recomputation not recorded
        hook.remove()
        assert len(calls) == block_calls  # 2: the forward and its recomputation in backward
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    loss, grads = loss_and_grads(model, block_calls=1)
    model.enable_gradient_checkpointing()
    loss_ckpt, grads_ckpt = loss_and_grads(model, block_calls=2)
    torch.testing.assert_close(loss_ckpt, loss)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, msg=name)


def test_readme_diffusers_example():
    # The README's example for diffusers users, with a tiny UNet and diffusers' own scheduler.
    from diffusers import DDPMScheduler

    unet, scheduler = tiny_unet2d(3, attention=True), DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1

    tap = FeatureTap(unet, "mid_block")  # once, before DDP / torch.compile
    losses = []
    for _ in range(2):
        noise = torch.randn(images.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (8,), generator=g)
        pred = unet(scheduler.add_noise(images, noise, t), t).sample
        loss_disp = dispersive_loss(tap.pop(), tau=0.5)
        loss = F.mse_loss(pred, noise) + 0.5 * loss_disp
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss_disp.item())
    # InfoNCE-l2 (with the diagonal) lies in [-log B, 0]; a second forward was recorded.
    assert all(-torch.log(torch.tensor(8.0)).item() <= v <= 0 for v in losses)
    assert losses[0] != losses[1]
