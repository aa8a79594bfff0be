"""Wan2.2 DiT variants (docs/wan22_dit.md): the I2V-A14B expert without a CLIP branch and TI2V-5B with per-token
timesteps. Real sizes on `meta`; tiny sizes against diffusers' WanTransformer3DModel; the TI2V conditioning
functions of inference/ti2v.py; per-token timesteps under sequence parallelism (2 gloo processes)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from inference.sampling import sample
from inference.schedulers import FlowEulerScheduler, FlowUniPCScheduler
from inference.ti2v import blend_first_frame, first_frame_mask, ti2v_denoiser, token_timesteps
from models.convert import diffusers_config, from_diffusers_key, to_diffusers_state_dict
from models.registry import get_spec
from models.wan_model import WanModel, clip_dim_of
from tests.test_wan_model import GRID, TINY, diffusers_model, inputs, make

TINY_I2V22 = dict(model_type="i2v", in_dim=36, **dict(TINY, clip_dim=None))
TINY_TI2V = dict(model_type="ti2v", in_dim=16, **TINY)  # TI2V: in_dim == out_dim, the latent alone
PARITY_ATOL = 1e-4  # fp32 forward vs diffusers (the Wan2.1 parity tests' tolerance)
EXPAND_ATOL = 1e-5  # t [B] vs the same t expanded to [B, L]: only matmul row-order differences
SP_ATOL = 2e-5  # 2-rank sequence parallelism vs one process (tests/test_parallel_infer.py)
IMAGE_KEYS = ("img_emb.", ".k_img.", ".v_img.", ".norm_k_img.")

# name -> (parameters, tensors); the Wan2.2 I2V expert = Wan2.2 T2V expert + 20 more input channels (409,600)
REAL22 = {"wan2.2-i2v-a14b": (14_288_901_184, 1095), "wan2.2-ti2v-5b": (4_999_787_712, 825)}


def tiny_ti2v_inputs(batch: int = 2) -> dict:
    inp = inputs(TINY_TI2V, batch)
    return {k: inp[k] for k in ("x", "t", "context")}


def per_token_t(t: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """[B] -> [B, L] with the TI2V first-frame mask: 0 on the tokens of latent frame 0."""
    return token_timesteps(t, first_frame_mask(*grid))


# ---- real sizes on meta --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(REAL22))
def test_real_sizes_on_meta(name):
    cfg = get_spec(name).dit
    with torch.device("meta"):
        model = WanModel(**cfg)
        ref = diffusers_model(cfg)
    state = model.state_dict()
    assert (model.num_params(), len(state)) == REAL22[name]
    ref_shapes = {from_diffusers_key(k): tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == ref_shapes
    assert not any(s in k or k.startswith(s) for k in state for s in IMAGE_KEYS)
    assert clip_dim_of(state) is None
    if name == "wan2.2-i2v-a14b":  # the Wan2.1 I2V-14B inventory minus the CLIP branch, same shapes
        with torch.device("meta"):
            w21 = WanModel(**get_spec("wan2.1-i2v-14b-720p").dit).state_dict()
        assert clip_dim_of(w21) == 1280
        kept = {k: tuple(v.shape) for k, v in w21.items() if not any(s in k or k.startswith(s) for s in IMAGE_KEYS)}
        assert {k: tuple(v.shape) for k, v in state.items()} == kept
        assert len(w21) - len(kept) == 8 + 5 * 40  # img_emb.proj: 4 layers x (w, b); k_img, v_img (w, b), norm_k_img
    else:
        assert tuple(state["patch_embedding.weight"].shape) == (3072, 48, 1, 2, 2)
        assert tuple(state["head.head.weight"].shape) == (4 * 48, 3072)
        assert tuple(state["blocks.29.ffn.0.weight"].shape) == (14336, 3072)


# ---- I2V without CLIP ----------------------------------------------------------------------------
def test_i2v_without_clip_inputs_and_config():
    model = make(TINY_I2V22)
    inp = {k: v for k, v in inputs(dict(TINY_I2V22, clip_dim=48)).items() if k != "clip_fea"}
    assert not hasattr(model, "img_emb") and not hasattr(model.blocks[0].cross_attn, "k_img")
    with torch.no_grad():
        assert model(**inp).shape == inp["x"].shape
    with pytest.raises(ValueError, match="clip_fea=None"):
        model(**inp, clip_fea=torch.zeros(2, 257, 48))
    with pytest.raises(ValueError, match="needs y"):
        model(**dict(inp, y=None))
    clone = WanModel.from_config(model.config)
    assert clone.config == model.config and clone.config["clip_dim"] is None
    assert clone.state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="flf2v model needs clip_dim"):
        WanModel(**dict(TINY_I2V22, model_type="flf2v"))
    assert diffusers_config(model.config).get("image_dim") is None
    assert "added_kv_proj_dim" not in diffusers_config(model.config)


def test_parity_i2v_without_clip():
    ref = diffusers_model(TINY_I2V22).eval()
    ours = make(TINY_I2V22)
    ref.load_state_dict(to_diffusers_state_dict(ours.state_dict()), strict=True)
    inp = inputs(dict(TINY_I2V22, clip_dim=48))
    with torch.no_grad():
        v = ours(inp["x"], inp["t"], inp["context"], y=inp["y"])
        v_ref = ref(torch.cat([inp["x"], inp["y"]], 1), inp["t"], inp["context"], return_dict=False)[0]
    assert v.abs().mean() > 0.1
    assert (v - v_ref).abs().max().item() <= PARITY_ATOL


# ---- TI2V: per-token timesteps -------------------------------------------------------------------
def test_ti2v_scalar_t_is_the_wan21_path():
    """t [B] on a ti2v model runs exactly the T2V computation; t expanded to [B, L] agrees within EXPAND_ATOL."""
    ti2v = make(TINY_TI2V)
    t2v = WanModel(**dict(TINY_TI2V, model_type="t2v")).eval()
    t2v.load_state_dict(ti2v.state_dict(), strict=True)
    inp = tiny_ti2v_inputs()
    tokens = GRID[0] * (GRID[1] // 2) * (GRID[2] // 2)
    with torch.no_grad():
        v = ti2v(**inp)
        assert torch.equal(v, t2v(**inp))
        v_tok = ti2v(**dict(inp, t=inp["t"][:, None].expand(2, tokens)))
    torch.testing.assert_close(v_tok, v, atol=EXPAND_ATOL, rtol=0)


def test_parity_ti2v_per_token_with_diffusers():
    ref = diffusers_model(TINY_TI2V).eval()
    ours = make(TINY_TI2V)
    ref.load_state_dict(to_diffusers_state_dict(ours.state_dict()), strict=True)
    inp = tiny_ti2v_inputs()
    t_tok = per_token_t(inp["t"], GRID)  # [2, L], 0 on frame 0
    assert t_tok.shape == (2, 18) and (t_tok[:, :6] == 0).all() and torch.equal(t_tok[:, 6:], inp["t"][:, None]
                                                                                  .expand(2, 12))
    with torch.no_grad():
        v = ours(**dict(inp, t=t_tok))
        v_ref = ref(inp["x"], t_tok, inp["context"], return_dict=False)[0]
        v_scalar = ours(**inp)
    assert (v - v_ref).abs().max().item() <= PARITY_ATOL
    assert (v - v_scalar)[:, :, 0].abs().max() > 1e-3  # the clean-frame tokens really saw t = 0


def test_per_token_embedding_equals_one_token_at_a_time():
    model = make(TINY_TI2V)
    t = torch.tensor([[0.0, 500.0, 999.0], [12.5, 0.0, 12.5]])
    with torch.no_grad():
        e, e0 = model.embed_time(t, 2)
        e1, e01 = model.embed_time(t.reshape(-1), 6)
    assert e.shape == (2, 3, 64) and e0.shape == (2, 3, 6, 64) and e0.dtype == torch.float32
    torch.testing.assert_close(e, e1.view(2, 3, 64), atol=1e-6, rtol=0)
    torch.testing.assert_close(e0, e01.view(2, 3, 6, 64), atol=1e-6, rtol=0)


def test_ti2v_input_errors():
    model = make(TINY_TI2V)
    inp = tiny_ti2v_inputs()
    with pytest.raises(ValueError, match="L = 18 tokens"):
        model(**dict(inp, t=torch.zeros(2, 17)))
    with pytest.raises(ValueError, match=r"\[2\] or \[2, L\]"):
        model.embed_time(torch.zeros(3, 18), 2)
    with pytest.raises(ValueError, match="only .* take y"):
        model(**inp, y=torch.zeros(2, 20, *GRID))
    with pytest.raises(ValueError, match="in_dim == out_dim"):
        WanModel(**dict(TINY_TI2V, in_dim=36))
    t2v = make(dict(TINY_TI2V, model_type="t2v"))
    with pytest.raises(ValueError, match="per-token timesteps"):
        t2v(**dict(inp, t=torch.zeros(2, 18)))


# ---- inference/ti2v.py ---------------------------------------------------------------------------
def test_mask_token_timesteps_and_blend():
    mask = first_frame_mask(3, 4, 6)
    assert mask.shape == (1, 1, 3, 4, 6) and mask[:, :, 0].sum() == 0 and mask[:, :, 1:].min() == 1
    # Wan2.2's own formula: (mask[0][0][:, ::2, ::2] * t).flatten(), f-major like the patch embedding
    t = torch.tensor([700.0, 30.0])
    expected = torch.stack([(mask[0, 0][:, ::2, ::2] * ti).flatten() for ti in t])
    assert torch.equal(token_timesteps(t, mask), expected)
    assert torch.equal(token_timesteps(250.0, mask, batch=3), (mask[0, 0][:, ::2, ::2] * 250.0).flatten()[None]
                       .expand(3, -1))
    x, img = torch.randn(2, 16, 3, 4, 6), torch.randn(2, 16, 1, 4, 6)
    out = blend_first_frame(x, img, mask)
    assert torch.equal(out[:, :, :1], img) and torch.equal(out[:, :, 1:], x[:, :, 1:])
    bad = mask.clone()
    bad[..., 1, 0, 1] = 0
    with pytest.raises(ValueError, match="varies inside a patch"):
        token_timesteps(t, bad)
    with pytest.raises(ValueError, match="image_latent must be"):
        blend_first_frame(x, torch.randn(2, 16, 1, 4, 5), mask)
    with pytest.raises(ValueError, match="does not fit the latent"):
        blend_first_frame(x, img, first_frame_mask(2, 4, 6))
    with pytest.raises(ValueError, match="not divisible"):
        token_timesteps(t, first_frame_mask(3, 5, 6))


@pytest.mark.parametrize("scheduler_cls", [FlowEulerScheduler, FlowUniPCScheduler], ids=["euler", "unipc"])
def test_denoiser_matches_wan22_per_step_blend(scheduler_cls):
    """ti2v_denoiser + one final blend == Wan2.2's loop (blend the state at the start and after every step)."""
    model = make(TINY_TI2V)
    inp = tiny_ti2v_inputs()
    mask, img = first_frame_mask(*GRID), torch.randn(2, 16, 1, *GRID[1:], generator=torch.Generator().manual_seed(3))
    dit = lambda x, t: model(x, t, inp["context"])  # noqa: E731
    with torch.no_grad():
        sched = scheduler_cls(shift=5.0)
        sched.set_timesteps(4)
        ours = blend_first_frame(sample(ti2v_denoiser(dit, img, mask), inp["x"], sched), img, mask)
        sched = scheduler_cls(shift=5.0)
        sched.set_timesteps(4)
        x = blend_first_frame(inp["x"], img, mask)
        for i, t in enumerate(sched.timesteps.float()):
            v = dit(x, token_timesteps(t.expand(2), mask))
            x = blend_first_frame(sched.step(v, i, x), img, mask)
    assert torch.equal(ours, x)


# ---- sequence parallelism: per-token timesteps are sharded with their tokens ---------------------
SP_GRID = (3, 2, 6)  # 9 tokens: 5 + 4 over two ranks (a padded shard)


def _sp_worker(rank: int, port: int, state: dict, inp: dict, out: dict) -> None:
    from inference.parallel import SequenceParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = WanModel(**TINY_TI2V).eval()
        model.load_state_dict(state)
        for attn in ("ulysses", "ring"):
            sp = SequenceParallel(dist.group.WORLD, attn)
            model.seq_parallel = sp
            for block in model.blocks:
                block.self_attn.seq_parallel = sp
            with torch.no_grad():
                out[f"{attn}{rank}"] = model(**inp)
    finally:
        dist.destroy_process_group()


def test_sequence_parallel_per_token_t():
    model = make(TINY_TI2V)
    g = torch.Generator().manual_seed(5)
    inp = dict(x=torch.randn(2, 16, *SP_GRID, generator=g), t=per_token_t(torch.tensor([800.0, 90.0]), SP_GRID),
               context=tiny_ti2v_inputs()["context"])
    with torch.no_grad():
        ref = model(**inp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_sp_worker, args=(port, model.state_dict(), inp, out), nprocs=2, join=True)
        results = dict(out)
    assert len(results) == 4
    for name, v in results.items():
        torch.testing.assert_close(v, ref, atol=SP_ATOL, rtol=0, msg=name)
