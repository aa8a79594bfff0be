"""WanVAE: parity with diffusers' AutoencoderKLWan on tiny random weights, the real size on `meta`, causality
of the chunked encode/decode, the codec interface (shapes, errors, config round trip, meta loading)."""

from __future__ import annotations

import json

import pytest
import torch

from models.convert import from_diffusers_vae_state_dict, to_diffusers_vae_state_dict
from models.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WanVAE

diffusers = pytest.importorskip("diffusers")

TINY = dict(dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_downsample=(False, True, True))
MEAN, STD = (0.1, -0.2, 0.3, 0.5), (1.5, 0.7, 2.0, 1.1)
REAL_PARAMS = 126_892_531  # Wan2.1_VAE.pth: 126.9M (docs/wan_architecture.md)


def _tiny(seed: int = 0) -> WanVAE:
    torch.manual_seed(seed)
    vae = WanVAE(**TINY, latent_mean=MEAN, latent_std=STD).eval()
    with torch.no_grad():  # perturb everything (gammas, the zero-initialised attention proj): all paths count
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


def _stats() -> tuple[torch.Tensor, torch.Tensor]:
    view = (1, -1, 1, 1, 1)
    return torch.tensor(MEAN).view(view), torch.tensor(STD).view(view)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convs are op-overhead bound; one thread avoids OpenMP spinning on a shared 2-core machine (~5x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair():
    vae = _tiny()
    ref = diffusers.AutoencoderKLWan(base_dim=TINY["dim"], z_dim=TINY["z_dim"],
                                     dim_mult=list(TINY["dim_mult"]), num_res_blocks=TINY["num_res_blocks"],
                                     temperal_downsample=list(TINY["temporal_downsample"]),
                                     latents_mean=list(MEAN), latents_std=list(STD)).eval()
    ref.load_state_dict(to_diffusers_vae_state_dict(vae.state_dict()), strict=True)
    return vae, ref


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 9, 16, 16, generator=g) * 2 - 1  # B=2, 9 frames


# ---- parity with diffusers ------------------------------------------------------------------------------

@torch.no_grad()
def test_encode_decode_match_diffusers(pair, video):
    vae, ref = pair
    mean, std = _stats()
    z = vae.encode(video)
    assert z.shape == (2, 4, 3, 2, 2) and z.dtype == torch.float32
    mu_ref = ref.encode(video).latent_dist.mean  # unnormalised posterior mean
    assert (vae.encode_mean(video) - mu_ref).abs().max() <= 1e-4
    assert (z - (mu_ref - mean) / std).abs().max() <= 1e-4

    out = vae.decode(z)
    out_ref = ref.decode(z * std + mean).sample
    assert out.shape == video.shape
    assert 0.5 < (out.abs() < 1).float().mean()  # mostly not clamped: the comparison means something
    assert (out - out_ref).abs().max() <= 1e-4
    assert out.min() >= -1 and out.max() <= 1


@torch.no_grad()
def test_batch_items_are_independent(pair, video):
    vae, _ = pair
    z = vae.encode(video)
    assert (vae.encode(video[1:]) - z[1:]).abs().max() <= 1e-5
    assert (vae.decode(z[:1]) - vae.decode(z)[:1]).abs().max() <= 1e-5


def test_key_mapping_round_trips(pair):
    vae, ref = pair
    ours, theirs = vae.state_dict(), ref.state_dict()
    back = from_diffusers_vae_state_dict(theirs)
    assert set(back) == set(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)


# ---- the real size on meta ------------------------------------------------------------------------------

def test_real_size_on_meta_matches_official_inventory():
    with torch.device("meta"):
        vae = WanVAE()
        ref = diffusers.AutoencoderKLWan()  # diffusers' defaults are Wan2.1's VAE
    state = vae.state_dict()
    n_params = sum(p.numel() for p in vae.parameters())
    print(f"WanVAE default: {len(state)} tensors, {n_params:,} parameters")
    assert len(state) == 194
    assert n_params == REAL_PARAMS and round(n_params / 1e6, 1) == 126.9
    assert "latent_mean" not in state and "latent_std" not in state  # non-persistent
    assert {k.split(".")[0] for k in state} == {"encoder", "conv1", "conv2", "decoder"}
    # spot checks against the official file's names
    official = {"encoder.conv1.weight": (96, 3, 3, 3, 3), "conv1.weight": (32, 32, 1, 1, 1),
                "conv2.weight": (16, 16, 1, 1, 1), "encoder.middle.0.residual.0.gamma": (384, 1, 1, 1),
                "decoder.middle.1.norm.gamma": (384, 1, 1),
                "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
                "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
                "decoder.head.2.weight": (3, 96, 3, 3, 3)}
    for key, shape in official.items():
        assert tuple(state[key].shape) == shape, key
    ref_state = ref.state_dict()
    back = from_diffusers_vae_state_dict(ref_state)
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape for k in state)
    assert set(to_diffusers_vae_state_dict(state)) == set(ref_state)
    assert (vae.z_dim, vae.temporal_stride, vae.spatial_stride) == (16, 4, 8)
    assert vae.latent_mean.shape == vae.latent_std.shape == (16,)
    assert vae.config["latent_mean"] == list(WAN21_LATENT_MEAN)
    assert vae.config["latent_std"] == list(WAN21_LATENT_STD)


@pytest.mark.slow
@torch.no_grad()
def test_real_size_matches_diffusers():
    torch.manual_seed(0)
    vae = WanVAE().eval()
    for p in vae.parameters():
        p.add_(0.02 * torch.randn_like(p))
    ref = diffusers.AutoencoderKLWan().eval()
    ref.load_state_dict(to_diffusers_vae_state_dict(vae.state_dict()), strict=True)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    mean, std = vae.latent_mean.view(1, -1, 1, 1, 1), vae.latent_std.view(1, -1, 1, 1, 1)
    z = vae.encode(video)
    assert (z - (ref.encode(video).latent_dist.mean - mean) / std).abs().max() <= 1e-4
    assert (vae.decode(z) - ref.decode(z * std + mean).sample).abs().max() <= 1e-4


# ---- causality of the chunked passes --------------------------------------------------------------------

@torch.no_grad()
def test_encode_is_causal(pair, video):
    vae, _ = pair
    z = vae.encode(video)
    perturbed = video.clone()
    perturbed[:, :, 1:] = torch.rand_like(perturbed[:, :, 1:]) * 2 - 1
    zp = vae.encode(perturbed)
    assert torch.equal(zp[:, :, 0], z[:, :, 0])  # latent 0 sees pixel frame 0 only
    assert (zp[:, :, 1:] - z[:, :, 1:]).abs().max() > 1e-3
    # latent frames of a prefix = the first latent frames of the whole video
    assert (vae.encode(video[:, :, :5]) - z[:, :, :2]).abs().max() <= 1e-5
    assert (vae.encode(video[:, :, :1]) - z[:, :, :1]).abs().max() <= 1e-5


@torch.no_grad()
def test_chunking_does_not_change_the_result(pair, video):
    vae, _ = pair
    default = vae.encode_mean(video)  # chunks [1, 4, 4]
    for chunks in ([9], [1, 8], [5, 4]):
        assert (vae.encode_mean(video, chunks) - default).abs().max() <= 1e-5, chunks
    z = vae.encode(video)
    one_by_one = vae.decode(z)
    assert (vae.decode(z, frames_per_chunk=3) - one_by_one).abs().max() <= 1e-5
    # decoding is causal too: the first 5 pixel frames come from the first 2 latent frames only
    assert (vae.decode(z[:, :, :2]) - one_by_one[:, :, :5]).abs().max() <= 1e-5


# ---- interface ------------------------------------------------------------------------------------------

def test_latent_shape_and_errors():
    vae = WanVAE(**TINY)
    assert (vae.temporal_stride, vae.spatial_stride) == (4, 8)
    assert vae.latent_shape(81, 480, 832) == (4, 21, 60, 104)
    assert vae.latent_shape(1, 8, 16) == (4, 1, 1, 2)
    with pytest.raises(ValueError, match=r"num_frames must be 4n\+1.*got 8"):
        vae.latent_shape(8, 64, 64)
    with pytest.raises(ValueError, match=r"height must be a positive multiple of 8, got 60"):
        vae.latent_shape(9, 60, 64)
    with pytest.raises(ValueError, match=r"got 8.*height.*got 60.*width.*got 30"):
        vae.latent_shape(8, 60, 30)
    with pytest.raises(ValueError, match="num_frames"):
        vae.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(ValueError, match="latent"):
        vae.decode(torch.zeros(1, 5, 2, 2, 2))


def test_strides_follow_the_config():
    vae = WanVAE(dim=4, z_dim=2, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, False))
    assert (vae.temporal_stride, vae.spatial_stride) == (2, 4)
    assert vae.latent_mean.tolist() == [0.0, 0.0] and vae.latent_std.tolist() == [1.0, 1.0]
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 5, 8, 8))
        assert z.shape == (1, 2, 3, 2, 2)
        assert vae.decode(z).shape == (1, 3, 5, 8, 8)
    with pytest.raises(ValueError, match="temporal_downsample"):
        WanVAE(dim=4, z_dim=2, dim_mult=(1, 2, 2), temporal_downsample=(True, True, True))


@torch.no_grad()
def test_config_round_trip_and_meta_loading(pair, video):
    vae, _ = pair
    config = json.loads(json.dumps(vae.config))
    assert WanVAE(**config).config == vae.config
    with torch.device("meta"):
        lazy = WanVAE(**config)
    lazy.load_state_dict(vae.state_dict(), assign=True)  # weights assigned, latent statistics rebuilt
    assert not lazy.latent_mean.is_meta
    assert torch.equal(lazy.encode(video[:1]), vae.encode(video[:1]))


@torch.no_grad()
def test_bfloat16_runs_and_returns_fp32(pair, video):
    vae, _ = pair
    half = _tiny().to(torch.bfloat16)
    z = half.encode(video[:1])
    assert z.dtype == torch.float32
    assert (z - vae.encode(video[:1])).abs().max() < 0.1
    assert half.decode(z).dtype == torch.float32
