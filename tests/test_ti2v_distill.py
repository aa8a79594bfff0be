"""DMD pieces for TI2V-5B (distill/ti2v.py, the `mask` of distill/losses.py): mixed T2V / I2V batches through one
network call, the rollout's first frame and gradients, the masked DMD gradient / normaliser and critic loss."""

from __future__ import annotations

import pytest
import torch

from distill.losses import critic_loss, critic_sigmas, dmd_loss
from distill.ti2v import TI2VBatch, TI2VNet, ti2v_rollout
from inference.flow import add_noise
from inference.guidance import Cond, Guidance, combine, guided_velocity
from inference.sampling import backward_simulation, gaussian_noise
from inference.schedulers import DistillScheduler
from inference.ti2v import blend_first_frame, first_frame_mask, token_timesteps
from models.mini import randomize
from models.wan_model import WanModel

TINY_TI2V = dict(model_type="ti2v", in_dim=8, out_dim=8, dim=32, ffn_dim=64, freq_dim=32, num_heads=2, num_layers=1,
                 text_len=8, text_dim=16)
SHAPE = (8, 2, 4, 4)  # (C, F, h, w): 4 tokens per latent frame
EXPAND_ATOL = 1e-5  # per-token t vs t [B], and row-batch differences (tests/test_wan22_dit.py)


@pytest.fixture(scope="module")
def net() -> WanModel:
    return randomize(WanModel.from_config(TINY_TI2V), torch.Generator().manual_seed(0)).eval()


def data(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *SHAPE, generator=g)
    ctx = torch.randn(batch, 5, 16, generator=g)
    img = torch.randn(SHAPE[0], 1, *SHAPE[2:], generator=g)
    return x, ctx, img


def test_text_only_batch_is_the_plain_dit(net):
    x, ctx, _ = data()
    t = torch.tensor([900.0, 300.0])
    batch = TI2VBatch.build([None, None], SHAPE)
    assert batch.text_only and torch.equal(batch.mask, torch.ones(2, 1, *SHAPE[1:]))
    with torch.no_grad():
        assert torch.equal(TI2VNet(net, batch)(x, t, ctx), net(x, t, ctx))


def test_mixed_batch_rows_equal_their_own_runs_with_and_without_cfg(net):
    x, ctx, img = data()
    t = torch.tensor([900.0, 300.0])
    batch = TI2VBatch.build([None, img], SHAPE)
    mask1 = first_frame_mask(*SHAPE[1:])
    with torch.no_grad():
        out = TI2VNet(net, batch)(x, t, ctx)
        t2v = net(x[:1], t[:1], ctx[:1])
        i2v = net(blend_first_frame(x[1:], img[None], mask1), token_timesteps(t[1:], mask1), ctx[1:])
        torch.testing.assert_close(out, torch.cat([t2v, i2v]), atol=EXPAND_ATOL, rtol=0)
        # CFG's [cond; uncond] batch: each half gets the same images and masks, in order
        unctx = torch.randn(ctx.shape, generator=torch.Generator().manual_seed(9))
        v = guided_velocity(TI2VNet(net, batch), x, t, Cond(ctx), Cond(unctx), Guidance(4.0), per_sample=True)
        ref = combine(TI2VNet(net, batch)(x, t, ctx), TI2VNet(net, batch)(x, t, unctx), 4.0)
        torch.testing.assert_close(v, ref, atol=EXPAND_ATOL, rtol=0)


def test_rollout_puts_the_image_on_frame_0_and_blocks_its_gradient(net):
    noise, ctx, img = data(seed=2)
    batch = TI2VBatch.build([None, img], SHAPE)
    sched = DistillScheduler((1000, 750, 500, 250), shift=5.0, mode="lcm")
    sched.set_timesteps(None)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x0, _, t = ti2v_rollout(net, Cond(ctx), batch, noise, sched, 2, gaussian_noise(gens))
    assert t.shape == (2,)
    assert torch.equal(x0[1, :, :1], img)  # the I2V sample's first frame is the given image
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with torch.no_grad():  # the T2V sample is the plain rollout (per-token t only on the other row)
        plain, _, _ = backward_simulation(lambda x, tt: net(x, tt, ctx), noise, sched, 2, gaussian_noise(gens))
    torch.testing.assert_close(x0[0].detach(), plain[0], atol=EXPAND_ATOL, rtol=0)
    params = [p for p in net.parameters() if p.requires_grad]
    frame0 = torch.autograd.grad(x0[1, :, 0].sum(), params, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in frame0)
    frame1 = torch.autograd.grad(x0[1, :, 1].sum(), params, allow_unused=True)
    assert any(g is not None and g.any() for g in frame1)


class Linear:
    """v = a * x (+ `frame0` on latent frame 0): x0 = x_t - s v, so the DMD gradient has a closed form."""

    model_type, patch_size = "ti2v", (1, 2, 2)

    def __init__(self, a: float, frame0: float = 0.0) -> None:
        self.a, self.frame0 = a, frame0

    def __call__(self, x, t, context, clip_fea=None, y=None):
        v = self.a * x
        v[:, :, 0] += self.frame0  # what a network outputs on frame 0 must not matter under the mask
        return v


def test_masked_dmd_gradient_and_normaliser():
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    mask = torch.stack([torch.ones(1, *SHAPE[1:]), first_frame_mask(*SHAPE[1:])[0]])
    cond = Cond(torch.zeros(2, 5, 16))
    loss, _ = dmd_loss(x, Linear(0.5, frame0=7.0), Linear(0.8, frame0=-3.0), cond, None, 1.0, 5.0,
                       generator=torch.Generator().manual_seed(4), mask=mask)
    loss.backward()
    g = torch.Generator().manual_seed(4)  # the loss's draws, in its order
    s = critic_sigmas(2, 5.0, 20.0, 980.0, g)
    x_t = add_noise(x.detach(), torch.randn(x.shape, generator=g), s)
    sv = s.view(-1, 1, 1, 1, 1)
    real = x_t - sv * Linear(0.5, frame0=7.0)(x_t, None, None)  # x0 = x_t - s v
    fake = x_t - sv * Linear(0.8, frame0=-3.0)(x_t, None, None)
    m = mask.expand_as(x)
    norm = ((x.detach() - real).abs() * m).sum((1, 2, 3, 4), keepdim=True) / m.sum((1, 2, 3, 4), keepdim=True)
    expected = (fake - real) * m / norm / x.numel()  # d loss / d x = grad / N
    torch.testing.assert_close(x.grad, expected, atol=1e-9, rtol=1e-5)
    assert not x.grad[1, :, 0].any() and x.grad[0, :, 0].any()
    # an all-ones mask is the unmasked loss
    args = (x.detach(), Linear(0.5), Linear(0.8), cond, None, 1.0, 5.0)
    plain, _ = dmd_loss(*args, generator=torch.Generator().manual_seed(4))
    ones, _ = dmd_loss(*args, generator=torch.Generator().manual_seed(4), mask=torch.ones(2, 1, *SHAPE[1:]))
    torch.testing.assert_close(ones, plain, atol=0, rtol=1e-6)


def test_masked_critic_loss_ignores_frame_0_of_i2v_samples():
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    mask = torch.stack([torch.ones(1, *SHAPE[1:]), first_frame_mask(*SHAPE[1:])[0]])
    cond = Cond(torch.zeros(2, 5, 16))

    def loss(critic, m=mask):
        return critic_loss(critic, x, cond, 5.0, generator=torch.Generator().manual_seed(6), mask=m)

    g = torch.Generator().manual_seed(6)
    s = critic_sigmas(2, 5.0, 20.0, 980.0, g)
    eps = torch.randn(x.shape, generator=g)
    err = (0.3 * add_noise(x, eps, s) - (eps - x)).pow(2)
    m = mask.expand_as(err)
    torch.testing.assert_close(loss(Linear(0.3)), (err * m).sum() / m.sum(), atol=0, rtol=1e-6)
    # row 0 is T2V: its frame-0 output counts; row 1's does not
    assert loss(Linear(0.3, frame0=5.0)) != loss(Linear(0.3))
    mask_i2v = first_frame_mask(*SHAPE[1:]).expand(2, -1, -1, -1, -1)
    assert loss(Linear(0.3, frame0=5.0), mask_i2v) == loss(Linear(0.3), mask_i2v)


def test_bad_inputs(net):
    _, ctx, img = data()
    with pytest.raises(ValueError, match=r"image latent 1 must be \[8, 1, 4, 4\]"):
        TI2VBatch.build([None, img[:, :, :2]], SHAPE)
    with pytest.raises(ValueError, match="one entry per sample"):
        TI2VBatch.build([], SHAPE)
    batch = TI2VBatch.build([img, None], SHAPE)
    with pytest.raises(ValueError, match="not a whole number of copies"):
        batch.tiled(3)
    with pytest.raises(ValueError, match="neither CLIP features nor y"):
        TI2VNet(net, batch)(torch.zeros(2, *SHAPE), torch.ones(2), ctx, y=torch.zeros(2, 4, *SHAPE[1:]))
    t2v = WanModel.from_config({**TINY_TI2V, "model_type": "t2v"})
    with pytest.raises(ValueError, match="wraps a TI2V DiT"):
        TI2VNet(t2v, batch)
