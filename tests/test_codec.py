"""The tiny PCA latent codec (models/codec.py): the Wan VAE's interface, causality, files, reconstruction."""

import pytest
import torch

from data.shapes import ShapesWorld
from models.codec import PCACodec, fit_pca_codec, tensor_to_videos, videos_to_tensor
from scripts.fit_codec import fit_videos, reconstruction_metrics

RECOMMENDED_Z, RECOMMENDED_STRIDE = 16, 4  # the tiny models' codec (models/registry.py TINY_Z, TINY_STRIDE)
# Measured on 192 held-out clips (scripts/fit_codec.py --sweep): stride 4, 64x64: z=16 1.000 (PSNR 30.2),
# z=32 1.000 (33.7); stride 8, 64x64: z=32 1.000, z=16 0.960; stride 8, 48x48: z=32 0.993.
RECON_JOINT_MIN = 0.97


@pytest.fixture(scope="module")
def world():
    return ShapesWorld()  # 17 frames at 64x64


@pytest.fixture(scope="module")
def codec(world):
    return fit_pca_codec(fit_videos(world, 192, seed=0), RECOMMENDED_Z, RECOMMENDED_STRIDE, normalize="global")


@pytest.fixture(scope="module")
def codec8(world):
    """The Wan VAE's strides (4, 8, 8), per-channel latent std."""
    return fit_pca_codec(fit_videos(world, 192, seed=0), 32)


def test_tiny_codec_strides(codec):
    assert (codec.z_dim, codec.temporal_stride, codec.spatial_stride) == (16, 4, 4)
    assert codec.latent_shape(17, 64, 64) == (16, 5, 16, 16)
    assert codec.encode(torch.zeros(1, 3, 17, 64, 64)).shape == (1, 16, 5, 16, 16)
    with pytest.raises(ValueError, match="multiples of 4"):
        codec.latent_shape(17, 62, 64)


def test_shapes_and_strides(codec8):
    codec = codec8
    assert (codec.z_dim, codec.temporal_stride, codec.spatial_stride) == (32, 4, 8)
    assert codec.latent_shape(17, 64, 64) == (32, 5, 8, 8)
    assert codec.latent_shape(1, 128, 64) == (32, 1, 16, 8)
    video = torch.rand(2, 3, 9, 32, 48) * 2 - 1
    latent = codec.encode(video)
    assert latent.shape == (2, 32, 3, 4, 6) and latent.dtype == torch.float32
    out = codec.decode(latent)
    assert out.shape == video.shape and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        codec.latent_shape(16, 64, 64)
    with pytest.raises(ValueError, match="multiples of 8"):
        codec.encode(torch.zeros(1, 3, 5, 60, 64))
    with pytest.raises(ValueError, match="latent"):
        codec.decode(torch.zeros(1, 16, 2, 8, 8))


def test_causal_first_frame_and_group_locality(codec):
    torch.manual_seed(0)
    video = torch.rand(1, 3, 13, 16, 16) * 2 - 1
    changed = video.clone()
    changed[:, :, 5:] = -changed[:, :, 5:]  # change frames 5..12 (latent frames 2, 3)
    a, b = codec.encode(video), codec.encode(changed)
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2])  # frame 0 and group 1..4 untouched
    assert not torch.allclose(a[:, :, 2:], b[:, :, 2:])
    # decoding: pixel frame 0 depends on latent frame 0 only
    lat = a.clone()
    lat[:, :, 1:] += 1
    torch.testing.assert_close(codec.decode(lat)[:, :, :1], codec.decode(a)[:, :, :1])


def _channel_std(latent: torch.Tensor) -> list[torch.Tensor]:
    """Per-channel std of the frame-0 part and of the 4-frame-group part of a latent [B, z, f, h, w]."""
    return [p.transpose(0, 1).reshape(p.shape[1], -1).std(1) for p in (latent[:, :, :1], latent[:, :, 1:])]


def test_latents_are_normalised_per_channel(world, codec8):
    latent = codec8.encode(videos_to_tensor(fit_videos(world, 48, seed=5)))
    for std in _channel_std(latent):
        assert 0.7 < std.mean() < 1.3 and std.min() > 0.3
    assert latent.mean().abs() < 0.2


def test_global_normalisation_keeps_pca_energy_order(world, codec):
    """normalize="global": one std for all channels; mean channel variance 1, variances in PCA order."""
    for lat_std in (codec.lat_std0, codec.lat_std):
        assert (lat_std == lat_std[0]).all()
    latent = codec.encode(videos_to_tensor(fit_videos(world, 48, seed=5)))
    for std in _channel_std(latent):
        assert 0.7 < std.pow(2).mean() < 1.3
        assert std[0] > 2 * std[-1] and std[0] > std[1] > std[-1]
    with pytest.raises(ValueError, match="normalize"):
        fit_pca_codec(fit_videos(world, 8, seed=0), 16, normalize="pixel")


def test_save_load_round_trip(codec, tmp_path):
    path = codec.save(tmp_path / "codec.safetensors")
    back = PCACodec.load(path)
    assert back.config == codec.config
    for k, v in codec.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="fit_codec"):
        PCACodec.load(tmp_path / "missing.safetensors")


def test_uint8_conversions_round_trip(world):
    videos = fit_videos(world, 2, seed=3)
    assert (tensor_to_videos(videos_to_tensor(videos)) == videos).all()


def test_reconstruction_accuracy(world, codec):
    m = reconstruction_metrics(codec, world, eval_seeds=2)  # 96 prompts x 2 held-out seeds
    assert m["n"] == 192 and m["joint_acc"] >= RECON_JOINT_MIN, m
    assert m["psnr"] > 25


def test_reconstruction_accuracy_wan_strides(world, codec8):
    """The Wan VAE's strides (16 tokens per latent frame at 64x64) with 32 channels also clear the bar."""
    m = reconstruction_metrics(codec8, world, eval_seeds=1)
    assert m["joint_acc"] >= RECON_JOINT_MIN, m
