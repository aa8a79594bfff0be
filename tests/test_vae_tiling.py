"""Spatially tiled Wan VAE decode and encode (models/vae.py: `WanVAE.enable_tiling`).

Tolerances (tiled vs untiled, the same weights): decode PSNR >= 40 dB over the [-1, 1] range and mean |error|
<= 0.01; encode mean |error| <= 2% of the mean |latent|. Tiles differ from one whole-frame pass because the middle
attention is global within a frame and the convolutions' receptive field (29 latent pixels on these VAEs, 37 on the
real one) is wider than the overlap; the linear blending itself is exact (`test_tiler_is_exact_for_a_local_map`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.tiling import blend_ramp, tile_spans
from models.vae import WanVAE

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_downsample=(False, True, True))
MINI = dict(dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1)  # the real level structure at width 8
SMALL = dict(dim=4, z_dim=2, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, False))


def random_vae(cfg: dict, seed: int = 0) -> WanVAE:
    torch.manual_seed(seed)
    vae = WanVAE(**cfg).eval()
    with torch.no_grad():  # perturb everything, the zero-initialised attention projection too
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4.0 / (a - b).pow(2).mean()))


def test_tile_spans_cover_with_the_overlap_and_end_at_the_edge():
    assert tile_spans(90, 48, 16) == [(0, 48), (32, 80), (42, 90)]  # 720p: 90 latent rows
    assert tile_spans(160, 48, 16) == [(0, 48), (32, 80), (64, 112), (96, 144), (112, 160)]
    assert tile_spans(40, 48, 16) == [(0, 40)]
    assert tile_spans(64, 32, 0) == [(0, 32), (32, 64)]


@pytest.mark.parametrize("size,tile,overlap,mult", [(64, 24, 8, 8), (160, 48, 16, 1), (37, 29, 20, 2)])
def test_blend_weights_sum_to_one_where_tiles_overlap_in_pairs(size, tile, overlap, mult):
    """(Where a short last tile overlaps two others, as for 90 = 48 + 32 + 10, `_tiled` divides by the sum.)"""
    spans = tile_spans(size, tile, overlap)
    total = torch.zeros(size * mult, dtype=torch.float64)
    for i, (a, b) in enumerate(spans):
        w = blend_ramp(spans, i, mult)
        assert w.shape == ((b - a) * mult,) and bool((w > 0).all())
        total[a * mult:b * mult] += w.double()
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)


def test_tiler_is_exact_for_a_local_map():
    """With a map that looks at one latent pixel (8x nearest upsampling) tiling + blending must change nothing."""
    vae = random_vae(SMALL)
    vae.tiling = (5, 2)  # set directly: the map below has no receptive field to respect
    z = torch.randn(2, 3, 2, 13, 11)

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=(1, 8, 8), mode="nearest")

    torch.testing.assert_close(vae._tiled(up, z, 1, 8), up(z), rtol=0, atol=1e-6)
    v = torch.randn(1, 3, 2, 13 * 4, 11 * 4)
    torch.testing.assert_close(vae._tiled(lambda x: F.avg_pool3d(x, (1, 4, 4)), v, 4, 1),
                               F.avg_pool3d(v, (1, 4, 4)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [TINY, MINI], ids=["tiny", "mini"])
def test_tiled_decode_and_encode_match_untiled(cfg, monkeypatch):
    vae = random_vae(cfg)
    dec, _ = vae.receptive_fields()
    assert dec == 29
    z = torch.randn(1, vae.z_dim, 1, 40, 36, generator=torch.Generator().manual_seed(1))
    video = torch.rand(1, 3, 1, 320, 288, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref, ref_z = vae.decode(z), vae.encode(video)
        vae.enable_tiling(dec, 12)
        calls = []
        inner = vae._decode
        monkeypatch.setattr(vae, "_decode", lambda x, n: (calls.append(tuple(x.shape[-2:])), inner(x, n))[1])
        out, out_z = vae.decode(z), vae.encode(video)
    assert calls == [(29, 29)] * 4  # 2 x 2 tiles of 29: rows (0, 29), (11, 40); columns (0, 29), (7, 36)
    assert out.shape == ref.shape and out_z.shape == ref_z.shape
    assert psnr(out, ref) >= 40.0 and float((out - ref).abs().mean()) <= 0.01
    assert float((out_z - ref_z).abs().mean()) <= 0.02 * float(ref_z.abs().mean())


def test_tiled_decode_keeps_the_causal_time_chunks():
    """Several latent frames: each tile runs the decoder's frame-by-frame cache on its own."""
    vae = random_vae(SMALL)
    dec, enc = vae.receptive_fields()
    z = torch.randn(1, 2, 3, dec + 6, dec + 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = vae.decode(z)
        vae.enable_tiling(dec, 6)
        out = vae.decode(z)
    assert out.shape == ref.shape == (1, 3, 1 + 2 * 2, 4 * (dec + 6), 4 * (dec + 3))
    assert psnr(out, ref) >= 40.0


def test_real_vae_receptive_fields_and_default_tile():
    with torch.device("meta"):
        vae = WanVAE()
    assert vae.receptive_fields() == (37, 231)  # latent pixels (decoder), pixels (encoder)
    vae.enable_tiling(48, 16)  # the config's default
    assert vae.tiling == (48, 16)


def test_tile_smaller_than_the_receptive_field_is_an_error():
    vae = random_vae(TINY)
    with pytest.raises(ValueError, match=r"smaller than the receptive field .* at least 29 latent pixels"):
        vae.enable_tiling(28, 8)
    with pytest.raises(ValueError, match=r"overlap must be in \[0, tile=32\)"):
        vae.enable_tiling(32, 32)
    assert vae.tiling is None


def test_config_and_loader_rules_of_tiling(make_config):
    from inference.loader import enable_vae_tiling
    from models.codec import PCACodec

    with pytest.raises(ValueError, match="vae_tile_overlap < vae_tile_size"):
        make_config(use_tiling_vae=True, vae_tile_size=16, vae_tile_overlap=16)
    codec = PCACodec.__new__(PCACodec)
    with pytest.raises(ValueError, match="use_tiling_vae needs the Wan VAE"):
        enable_vae_tiling(codec, 48, 16)


@pytest.mark.parametrize("vae_entry,match", [
    (None, "use_tiling_vae needs the Wan VAE; .* has a pca_codec"),
    ({"type": "wan_vae", "file": "vae.safetensors", "config": TINY}, "smaller than the receptive field"),
], ids=["pca-codec", "tile-too-small"])
def test_tiling_rules_are_checked_before_any_weight_is_read(vae_entry, match, tiny_t2v_dir, make_config, tmp_path,
                                                            monkeypatch):
    import json
    import shutil

    import inference.loader as loader

    folder = Path(shutil.copytree(tiny_t2v_dir, tmp_path / "folder"))
    if vae_entry is not None:
        table = json.loads((folder / "components.json").read_text())
        table["vae"] = {**vae_entry, "config": {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in vae_entry["config"].items()}}
        (folder / "components.json").write_text(json.dumps(table))

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read before the tiling rule was checked")

    monkeypatch.setattr(loader, "load_any_folder", no_loading)
    with pytest.raises(ValueError, match=match):
        loader.load_pipeline(make_config(use_tiling_vae=True, vae_tile_size=20, vae_tile_overlap=4), model_path=folder)
