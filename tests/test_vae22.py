"""Wan22VAE (the Wan2.2 TI2V-5B VAE): parity with diffusers' AutoencoderKLWan(is_residual=True) on tiny random
weights through the official <-> diffusers key map, the real size on `meta` (key inventory, parameter count),
the config read off the tensors, loading a folder with Wan2.2_VAE.pth, causality/chunking, the shortcuts and the
patchify order, the codec interface and tiling."""

from __future__ import annotations

import json

import pytest
import torch

from models.vae import WanVAE
from models.vae22 import (
    WAN22_LATENT_MEAN,
    WAN22_LATENT_STD,
    WAN22_VAE_FILE,
    AvgDown3d,
    DupUp3d,
    Wan22VAE,
    patchify,
    unpatchify,
)
from models.vae22_keys import (
    wan22_vae_config_from_state,
    wan22_vae_from_diffusers,
    wan22_vae_to_diffusers,
    wan22_vae_to_diffusers_key,
)

diffusers = pytest.importorskip("diffusers")

# dim_mult (1, 2, 2, 2) keeps the real layout (three downsampling levels, two of them temporal, a last level
# without shortcut/resampler) at ~0.1M parameters; dec_dim != dim so the two widths cannot be swapped unseen.
TINY = dict(dim=8, dec_dim=12, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
            temporal_downsample=(False, True, True))
MEAN, STD = (0.1, -0.2, 0.3, 0.5), (1.5, 0.7, 2.0, 1.1)
# The real size, counted here on `meta` and equal to diffusers' AutoencoderKLWan built with the config of its
# conversion script (`vae22_diffusers_config`): 196 tensors, 704,688,668 parameters (encoder 149.6M, decoder
# 555.0M), 2.82 GB in fp32.
REAL_TENSORS, REAL_PARAMS = 196, 704_688_668


def _tiny(seed: int = 0) -> Wan22VAE:
    torch.manual_seed(seed)
    vae = Wan22VAE(**TINY, latent_mean=MEAN, latent_std=STD).eval()
    with torch.no_grad():  # perturb everything (gammas, the zero-initialised attention proj): all paths count
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


def _diffusers_wan22(**kw) -> torch.nn.Module:
    """diffusers' Wan2.2 VAE layout (the keys of `vae22_diffusers_config` in its conversion script)."""
    p = kw.pop("patch_size", 2)
    return diffusers.AutoencoderKLWan(is_residual=True, patch_size=p, in_channels=3 * p * p,
                                      out_channels=3 * p * p, scale_factor_temporal=4, **kw)


def _stats() -> tuple[torch.Tensor, torch.Tensor]:
    view = (1, -1, 1, 1, 1)
    return torch.tensor(MEAN).view(view), torch.tensor(STD).view(view)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convs are op-overhead bound; one thread avoids OpenMP spinning on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair():
    vae = _tiny()
    ref = _diffusers_wan22(base_dim=TINY["dim"], decoder_base_dim=TINY["dec_dim"], z_dim=TINY["z_dim"],
                           dim_mult=list(TINY["dim_mult"]), num_res_blocks=TINY["num_res_blocks"],
                           temperal_downsample=list(TINY["temporal_downsample"]), latents_mean=list(MEAN),
                           latents_std=list(STD), scale_factor_spatial=16).eval()
    ref.load_state_dict(wan22_vae_to_diffusers(vae.state_dict()), strict=True)
    return vae, ref


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 9, 32, 32, generator=g) * 2 - 1  # B=2, 9 frames, 2x2 latent pixels


# ---- parity with diffusers ------------------------------------------------------------------------------

@torch.no_grad()
def test_encode_decode_match_diffusers(pair, video):
    """fp32, same weights: encode within 1e-5, decode within 1e-4 (measured ~1e-7 and ~3e-6)."""
    vae, ref = pair
    mean, std = _stats()
    z = vae.encode(video)
    assert z.shape == (2, 4, 3, 2, 2) and z.dtype == torch.float32
    mu_ref = ref.encode(video).latent_dist.mean  # unnormalised posterior mean
    assert (vae.encode_mean(video) - mu_ref).abs().max() <= 1e-5
    assert (z - (mu_ref - mean) / std).abs().max() <= 1e-5

    out = vae.decode(z)
    out_ref = ref.decode(z * std + mean).sample
    assert out.shape == video.shape
    assert 0.5 < (out.abs() < 1).float().mean()  # mostly not clamped: the comparison means something
    assert (out - out_ref).abs().max() <= 1e-4
    assert out.min() >= -1 and out.max() <= 1


def test_key_map_round_trips_and_names(pair):
    vae, ref = pair
    ours, theirs = vae.state_dict(), ref.state_dict()
    assert set(wan22_vae_to_diffusers(ours)) == set(theirs)
    back = wan22_vae_from_diffusers(theirs)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    # names as in diffusers' convert_vae_22
    assert wan22_vae_to_diffusers_key("conv1.weight") == "quant_conv.weight"
    assert wan22_vae_to_diffusers_key("conv2.bias") == "post_quant_conv.bias"
    assert wan22_vae_to_diffusers_key("encoder.conv1.weight") == "encoder.conv_in.weight"
    assert wan22_vae_to_diffusers_key("encoder.downsamples.1.downsamples.0.shortcut.weight") == \
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    assert wan22_vae_to_diffusers_key("encoder.downsamples.1.downsamples.2.time_conv.bias") == \
        "encoder.down_blocks.1.downsampler.time_conv.bias"
    assert wan22_vae_to_diffusers_key("decoder.upsamples.0.upsamples.3.resample.1.weight") == \
        "decoder.up_blocks.0.upsampler.resample.1.weight"
    assert wan22_vae_to_diffusers_key("decoder.upsamples.3.upsamples.2.residual.6.weight") == \
        "decoder.up_blocks.3.resnets.2.conv2.weight"
    assert wan22_vae_to_diffusers_key("decoder.middle.2.residual.3.gamma") == \
        "decoder.mid_block.resnets.1.norm2.gamma"
    assert wan22_vae_to_diffusers_key("encoder.middle.1.to_qkv.weight") == \
        "encoder.mid_block.attentions.0.to_qkv.weight"
    assert wan22_vae_to_diffusers_key("decoder.head.0.gamma") == "decoder.norm_out.gamma"
    with pytest.raises(KeyError, match="not a Wan2.2 VAE key"):
        wan22_vae_to_diffusers_key("decoder.upsamples.3.residual.0.gamma")  # a Wan2.1 (flat) decoder key


# ---- the real size on meta ------------------------------------------------------------------------------

def test_real_size_on_meta_matches_diffusers_inventory():
    with torch.device("meta"):
        vae = Wan22VAE()
        ref = _diffusers_wan22(base_dim=160, decoder_base_dim=256, z_dim=48, scale_factor_spatial=16,
                               latents_mean=list(WAN22_LATENT_MEAN), latents_std=list(WAN22_LATENT_STD))
    state = vae.state_dict()
    n_params = sum(p.numel() for p in vae.parameters())
    assert len(state) == REAL_TENSORS and n_params == REAL_PARAMS
    assert sum(p.numel() for p in ref.parameters()) == REAL_PARAMS
    per_part = {part: sum(v.numel() for k, v in state.items() if k.split(".")[0] == part)
                for part in ("encoder", "conv1", "conv2", "decoder")}
    assert per_part == dict(encoder=149_627_776, conv1=9_312, conv2=2_352, decoder=555_049_228)
    assert "latent_mean" not in state and "latent_std" not in state  # non-persistent
    assert {k.split(".")[0] for k in state} == {"encoder", "conv1", "conv2", "decoder"}
    official = {"encoder.conv1.weight": (160, 12, 3, 3, 3),  # 2x2-patchified RGB in
                "encoder.downsamples.0.downsamples.2.resample.1.weight": (160, 160, 3, 3),
                "encoder.downsamples.1.downsamples.0.shortcut.weight": (320, 160, 1, 1, 1),
                "encoder.downsamples.1.downsamples.2.time_conv.weight": (320, 320, 3, 1, 1),
                "encoder.head.2.weight": (96, 640, 3, 3, 3), "conv1.weight": (96, 96, 1, 1, 1),
                "conv2.weight": (48, 48, 1, 1, 1), "decoder.conv1.weight": (1024, 48, 3, 3, 3),
                "decoder.middle.1.to_qkv.weight": (3072, 1024, 1, 1),
                "decoder.upsamples.0.upsamples.3.time_conv.weight": (2048, 1024, 3, 1, 1),
                "decoder.upsamples.0.upsamples.3.resample.1.weight": (1024, 1024, 3, 3),  # width kept
                "decoder.upsamples.2.upsamples.0.shortcut.weight": (512, 1024, 1, 1, 1),
                "decoder.head.2.weight": (12, 256, 3, 3, 3)}
    for key, shape in official.items():
        assert tuple(state[key].shape) == shape, key
    # time_conv only where the official file has it: encoder levels 1, 2; decoder levels 0, 1
    assert sorted(k for k in state if k.endswith("time_conv.weight")) == [
        "decoder.upsamples.0.upsamples.3.time_conv.weight", "decoder.upsamples.1.upsamples.3.time_conv.weight",
        "encoder.downsamples.1.downsamples.2.time_conv.weight", "encoder.downsamples.2.downsamples.2.time_conv.weight"]
    assert set(wan22_vae_to_diffusers(state)) == set(ref.state_dict())
    assert all(ref.state_dict()[wan22_vae_to_diffusers_key(k)].shape == v.shape for k, v in state.items())
    assert (vae.z_dim, vae.temporal_stride, vae.spatial_stride) == (48, 4, 16)
    assert vae.latent_shape(121, 704, 1280) == (48, 31, 44, 80)  # TI2V-5B's default 720P clip
    assert wan22_vae_config_from_state(state) == dict(dim=160, dec_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4],
                                                      num_res_blocks=2, temporal_downsample=[False, True, True],
                                                      patch_size=2)


def test_latent_statistics_are_the_official_constants():
    assert len(WAN22_LATENT_MEAN) == len(WAN22_LATENT_STD) == 48
    # spot values of wan/modules/vae2_2.py (Wan2_2_VAE) = diffusers' vae22_diffusers_config
    assert WAN22_LATENT_MEAN[:3] == (-0.2289, -0.0052, -0.1323) and WAN22_LATENT_MEAN[-1] == -0.0667
    assert WAN22_LATENT_STD[:3] == (0.4765, 1.0364, 0.4514) and WAN22_LATENT_STD[-1] == 0.7744
    assert max(WAN22_LATENT_STD) == 1.6887 and min(WAN22_LATENT_STD) == 0.3523
    assert round(sum(WAN22_LATENT_MEAN), 4) == -0.5589 and round(sum(WAN22_LATENT_STD), 4) == 32.536
    vae = Wan22VAE(dim=4, dec_dim=4, z_dim=48, dim_mult=(1, 1), num_res_blocks=1, temporal_downsample=(False,))
    assert vae.latent_mean.tolist() == pytest.approx(WAN22_LATENT_MEAN)
    assert vae.latent_std.tolist() == pytest.approx(WAN22_LATENT_STD)


# ---- the parameter-free pieces ----------------------------------------------------------------------------

def test_patchify_order_and_shortcuts():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 1, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (1, 8, 1, 2, 2)
    # channel c*4 + col_offset*2 + row_offset (official "b c f (h q) (w r) -> b (c r q) f h w")
    assert p[0, :4, 0, 0, 0].tolist() == [x[0, 0, 0, 0, 0], x[0, 0, 0, 1, 0], x[0, 0, 0, 0, 1], x[0, 0, 0, 1, 1]]
    assert torch.equal(unpatchify(p, 2), x)

    y = torch.randn(1, 2, 3, 4, 4)
    down = AvgDown3d(2, 4, factor_t=2, factor_s=2)(y)  # 3 frames: one zero frame in front
    padded = torch.cat([torch.zeros_like(y[:, :, :1]), y], dim=2)
    # out channel o averages the 16 / 4 = 4 consecutive space/time-to-channel values starting at 4 o
    cell = padded[0, 0, 0:2, 0:2, 0:2].reshape(-1)  # (ft, fh, fw) order, input channel 0, output cell (0, 0, 0)
    assert down.shape == (1, 4, 2, 2, 2)
    assert torch.allclose(down[0, 0, 0, 0, 0], cell[:4].mean()) and torch.allclose(down[0, 1, 0, 0, 0], cell[4:].mean())
    up = DupUp3d(4, 2, factor_t=2, factor_s=2)
    z = torch.randn(1, 4, 2, 2, 2)
    assert up(z, first_chunk=False).shape == (1, 2, 4, 4, 4)
    assert torch.equal(up(z, first_chunk=True), up(z, first_chunk=False)[:, :, 1:])  # first frame undoubled
    with pytest.raises(ValueError, match="AvgDown3d"):
        AvgDown3d(3, 4, 1, 1)


# ---- causality and chunking -------------------------------------------------------------------------------

@torch.no_grad()
def test_encode_is_causal_and_chunking_does_not_change_the_result(pair, video):
    vae, _ = pair
    z = vae.encode(video)
    perturbed = video.clone()
    perturbed[:, :, 1:] = torch.rand_like(perturbed[:, :, 1:]) * 2 - 1
    zp = vae.encode(perturbed)
    assert torch.equal(zp[:, :, 0], z[:, :, 0])  # latent 0 sees pixel frame 0 only
    assert (zp[:, :, 1:] - z[:, :, 1:]).abs().max() > 1e-3
    assert (vae.encode(video[:, :, :5]) - z[:, :, :2]).abs().max() <= 1e-5
    default = vae.encode_mean(video)  # chunks [1, 4, 4]
    for chunks in ([9], [1, 8], [5, 4]):  # the avg-down shortcut pads odd chunks in front: still invariant
        assert (vae.encode_mean(video, chunks) - default).abs().max() <= 1e-5, chunks
    out = vae.decode(z)
    assert (vae.decode(z, frames_per_chunk=3) - out).abs().max() <= 1e-5  # dup-up's first chunk handled
    assert (vae.decode(z[:, :, :2]) - out[:, :, :5]).abs().max() <= 1e-5
    assert (vae.decode(z[1:]) - out[1:]).abs().max() <= 1e-5  # batch items independent


# ---- interface ------------------------------------------------------------------------------------------

def test_latent_shape_and_errors():
    vae = Wan22VAE(**TINY)
    assert (vae.temporal_stride, vae.spatial_stride) == (4, 16)
    assert vae.latent_shape(1, 16, 32) == (4, 1, 1, 2)
    with pytest.raises(ValueError, match=r"Wan22VAE: num_frames must be 4n\+1.*got 8"):
        vae.latent_shape(8, 64, 64)
    with pytest.raises(ValueError, match=r"height must be a positive multiple of 16, got 24"):
        vae.latent_shape(9, 24, 64)
    with pytest.raises(ValueError, match=r"video \[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(1, 12, 5, 16, 16))
    with pytest.raises(ValueError, match=r"latent \[B, 4, F, h, w\]"):
        vae.decode(torch.zeros(1, 48, 2, 2, 2))
    with pytest.raises(ValueError, match="temporal_downsample"):
        Wan22VAE(dim=4, dec_dim=4, z_dim=2, dim_mult=(1, 2, 2), temporal_downsample=(True, True, True))
    with pytest.raises(ValueError, match="latent_mean/latent_std"):
        Wan22VAE(**TINY, latent_mean=(0.0,) * 48)


@torch.no_grad()
def test_config_round_trip_meta_loading_and_bf16(pair, video):
    vae, _ = pair
    config = json.loads(json.dumps(vae.config))
    assert Wan22VAE(**config).config == vae.config
    assert wan22_vae_config_from_state(vae.state_dict()) == {k: v for k, v in config.items()
                                                            if k not in ("dropout", "latent_mean", "latent_std")}
    with torch.device("meta"):
        lazy = Wan22VAE(**config)
    lazy.load_state_dict(vae.state_dict(), assign=True)  # weights assigned, latent statistics rebuilt
    assert not lazy.latent_mean.is_meta
    assert torch.equal(lazy.encode(video[:1]), vae.encode(video[:1]))
    half = _tiny().to(torch.bfloat16)
    z = half.encode(video[:1])
    assert z.dtype == torch.float32 and (z - vae.encode(video[:1])).abs().max() < 0.1
    assert half.decode(z).dtype == torch.float32


def test_config_from_state_rejects_a_wan21_file():
    from models.loading import KeyMismatchError

    state = WanVAE(dim=4, z_dim=2, dim_mult=(1, 2), num_res_blocks=1, temporal_downsample=(True,)).state_dict()
    with pytest.raises(KeyMismatchError, match="Wan2.1"):
        wan22_vae_config_from_state(state)


@torch.no_grad()
def test_official_folder_and_components_json_load_it(pair, tmp_path, video):
    """A folder with Wan2.2_VAE.pth (no Wan2.1_VAE.pth) gets type wan22_vae with the config read off the file;
    save_components records the type; both load back to the same network."""
    from models.components import _build_vae, save_components
    from models.loading import read_components
    from models.t5 import UMT5Encoder

    vae, _ = pair
    torch.save(vae.state_dict(), tmp_path / WAN22_VAE_FILE)
    entry = read_components(tmp_path)["vae"]
    assert entry["type"] == "wan22_vae" and entry["file"] == WAN22_VAE_FILE
    assert entry["config"]["dec_dim"] == 12 and entry["config"]["z_dim"] == 4
    loaded = _build_vae(entry, tmp_path)
    assert isinstance(loaded, Wan22VAE)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vae.state_dict().items())

    text = UMT5Encoder(vocab_size=16, dim=8, dim_attn=8, dim_ffn=16, num_heads=2, num_layers=1, num_buckets=8)
    save_components(tmp_path / "tiny", vae, text, None)
    entry = json.loads((tmp_path / "tiny" / "components.json").read_text())["vae"]
    assert entry["type"] == "wan22_vae"
    again = _build_vae(entry, tmp_path / "tiny").eval()
    assert torch.equal(again.encode(video[:1]), vae.encode(video[:1]))  # incl. the custom latent statistics


# ---- tiling ----------------------------------------------------------------------------------------------

@torch.no_grad()
def test_tiling_matches_untiled_within_tolerance():
    """WanVAE's tiler over Wan22VAE: decode PSNR >= 40 dB and encode mean |error| <= 2% of the mean |latent| (the
    tolerances of tests/test_vae_tiling.py; measured ~46 dB and ~0.6%); tiles below the receptive field refused."""
    vae = _tiny()
    dec, enc = vae.receptive_fields()
    assert (dec, enc) == (29, 343)  # latent pixels / pixels at this tiny size
    with torch.device("meta"):
        assert Wan22VAE().receptive_fields() == (37, 463)  # the real size: tiles of >= 37 latent pixels
    with pytest.raises(ValueError, match="receptive field"):
        vae.enable_tiling(dec - 1, 0)
    z = torch.randn(1, 4, 1, 8, 36, generator=torch.Generator().manual_seed(3))  # two tiles across
    plain = vae.decode(z)
    vae.enable_tiling(dec, 12)
    tiled = vae.decode(z)
    assert tiled.shape == plain.shape == (1, 3, 1, 128, 576)
    assert float(10 * torch.log10(4.0 / (tiled - plain).pow(2).mean())) >= 40
    z_tiled = vae.encode(plain)
    vae.disable_tiling()
    z_plain = vae.encode(plain)
    assert vae.tiling is None
    assert (z_tiled - z_plain).abs().mean() <= 0.02 * z_plain.abs().mean()


@pytest.mark.slow
@torch.no_grad()
def test_real_size_matches_diffusers():
    """The real widths (704.7M parameters, fan-in scaled random weights) on a 5-frame 32x32 clip: encode and decode
    agree with diffusers within 1e-4 relative to the output scale. Both networks share the same tensors."""
    with torch.device("meta"):
        vae = Wan22VAE().eval()
        ref = _diffusers_wan22(base_dim=160, decoder_base_dim=256, z_dim=48, scale_factor_spatial=16,
                               latents_mean=list(WAN22_LATENT_MEAN), latents_std=list(WAN22_LATENT_STD)).eval()
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, p in vae.state_dict().items():
        if key.endswith("gamma"):
            state[key] = 1 + 0.05 * torch.randn(p.shape, generator=g)
        elif key.endswith("bias"):
            state[key] = 0.01 * torch.randn(p.shape, generator=g)
        else:
            state[key] = torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5)
    vae.load_state_dict(state, assign=True)
    ref.load_state_dict(wan22_vae_to_diffusers(state), strict=True, assign=True)
    video = torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1
    mean, std = vae.latent_mean.view(1, -1, 1, 1, 1), vae.latent_std.view(1, -1, 1, 1, 1)
    mu, mu_ref = vae.encode_mean(video), ref.encode(video).latent_dist.mean
    assert mu.shape == (1, 48, 2, 2, 2)
    assert (mu - mu_ref).abs().max() <= 1e-4 * mu_ref.abs().max()
    z = (mu - mean) / std
    out, out_ref = vae.decode(z), ref.decode(z * std + mean).sample
    assert out.shape == video.shape and 0.5 < (out.abs() < 1).float().mean()
    assert (out - out_ref).abs().max() <= 1e-4


def test_registry_spec_builds_the_real_size():
    """models/registry.py `wan2.2-ti2v-5b` names this VAE with the official sizes."""
    from models.registry import get_spec

    entry = get_spec("wan2.2-ti2v-5b").vae
    assert entry["type"] == Wan22VAE.COMPONENT_TYPE
    with torch.device("meta"):
        vae = Wan22VAE(**{k: v for k, v in entry.items() if k != "type"})
    assert sum(p.numel() for p in vae.parameters()) == REAL_PARAMS and vae.z_dim == 48
