"""The tiny PCA latent codec (models/codec.py): the Wan VAE's interface, causality, files, reconstruction."""

import pytest
import torch

from data.shapes import ShapesWorld
from models.codec import PCACodec, fit_pca_codec, tensor_to_videos, videos_to_tensor
from scripts.fit_codec import fit_videos, reconstruction_metrics

RECOMMENDED_Z = 32
# Measured on 960 held-out clips (scripts/fit_codec.py --sweep): 64x64 z=32 1.000 (z=24 0.998, z=16 0.960);
# 48x48 z=32 0.993 (z=24 0.973).
RECON_JOINT_MIN = 0.97


@pytest.fixture(scope="module")
def world():
    return ShapesWorld()  # 17 frames at 64x64


@pytest.fixture(scope="module")
def codec(world):
    return fit_pca_codec(fit_videos(world, 192, seed=0), RECOMMENDED_Z)


def test_shapes_and_strides(codec):
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


def test_latents_are_normalised(world, codec):
    latent = codec.encode(videos_to_tensor(fit_videos(world, 48, seed=5)))
    for part in (latent[:, :, :1], latent[:, :, 1:]):
        std = part.transpose(0, 1).reshape(codec.z_dim, -1).std(1)
        assert 0.7 < std.mean() < 1.3 and std.min() > 0.3
        assert part.mean().abs() < 0.2


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


def test_reconstruction_accuracy_48px():
    """The fewest-token setting that clears the bar: 48x48 frames (9 tokens/frame), z=32 (measured 0.993)."""
    world = ShapesWorld(17, 48, 48)
    m = reconstruction_metrics(fit_pca_codec(fit_videos(world, 192, seed=0), RECOMMENDED_Z), world, eval_seeds=2)
    assert m["joint_acc"] >= RECON_JOINT_MIN, m
