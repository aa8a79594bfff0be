"""Model folders: strict DiT loading (key and shape mismatches reported with names and counts), sharded
safetensors, which DiT weights are used (base / distill_models / explicit dit_original_ckpt), clear errors for
missing files, and meta-device construction with assigned weights. Tiny random folders from conftest.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import models.components
from inference.loader import load_pipeline
from models.components import load_dit, load_model_folder
from models.loading import DIT_CONFIG, DIT_WEIGHTS, KeyMismatchError, read_sharded, read_state_dict, write_safetensors
from models.registry import TINY_Z

pytestmark = pytest.mark.usefixtures("one_thread")

DISTILL = dict(model_cls="wan2.1_distill", denoising_step_list=[1000, 750, 500, 250], enable_cfg=False)


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(folder / DIT_WEIGHTS)


def _dit_folder(dst: Path, src: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """config.json of `src` + the given state dict (default: src's weights) as a single file."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / DIT_CONFIG, dst / DIT_CONFIG)
    write_safetensors(_state(src) if state is None else state, dst / DIT_WEIGHTS)
    return dst


def _assert_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got[k], v), k


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> Path:
    """Different DiT weights of the same architecture (another seed), as a single safetensors file."""
    from models.components import make_tiny_model
    from tests.conftest import SMALL_DIT

    folder = tmp_path_factory.mktemp("tiny-t2v-seed1")
    make_tiny_model(folder, "tiny-t2v", seed=1, **SMALL_DIT)
    return folder / DIT_WEIGHTS


@pytest.fixture
def model_copy(tmp_path, tiny_t2v_dir) -> Path:
    """A full copy of the tiny T2V folder (DiT + components) that a test may add files to."""
    return Path(shutil.copytree(tiny_t2v_dir, tmp_path / "model"))


# ---- strict keys and shapes ----------------------------------------------------------------------------
def test_key_mismatch_lists_missing_and_unexpected(tmp_path, tiny_t2v_dir):
    state = _state(tiny_t2v_dir)
    state["blocks.0.self_attn.query.weight"] = state.pop("blocks.0.self_attn.q.weight")  # renamed
    state["extra_head.bias"] = torch.zeros(3)  # not in the network
    folder = _dit_folder(tmp_path / "bad", tiny_t2v_dir, state)
    with pytest.raises(KeyMismatchError) as e:
        load_dit(folder)
    msg = str(e.value)
    assert "1 missing key(s)" in msg and "blocks.0.self_attn.q.weight" in msg
    assert "2 unexpected key(s)" in msg and "blocks.0.self_attn.query.weight" in msg and "extra_head.bias" in msg
    assert str(folder) in msg and "shape" not in msg
    assert isinstance(e.value, ValueError)  # the CLI reports it as bad input


def test_many_missing_keys_are_counted(tmp_path, tiny_t2v_dir):
    state = _state(tiny_t2v_dir)
    dropped = [k for k in state if k.startswith("blocks.1.")]
    for k in dropped:
        del state[k]
    with pytest.raises(KeyMismatchError, match=rf"{len(dropped)} missing key\(s\), e\.g\. \['blocks\.1\."):
        load_dit(_dit_folder(tmp_path / "bad", tiny_t2v_dir, state))
    assert len(dropped) > 5  # more keys than the message lists by name


def test_i2v_weights_into_t2v_model_report_shapes(tiny_t2v_dir, tiny_i2v_dir):
    with pytest.raises(KeyMismatchError) as e:
        load_dit(tiny_t2v_dir, explicit=str(tiny_i2v_dir / DIT_WEIGHTS))
    msg = str(e.value)
    # I2V patch embedding takes z + 4 + z input channels, the T2V one z
    z = TINY_Z
    assert "1 shape mismatch(es)" in msg
    assert f"patch_embedding.weight: file (64, {2 * z + 4}, 1, 2, 2) vs model (64, {z}, 1, 2, 2)" in msg
    i2v_only = set(_state(tiny_i2v_dir)) - set(_state(tiny_t2v_dir))  # img_emb.*, cross_attn.{k,v}_img, ...
    assert any(k.startswith("img_emb.proj") for k in i2v_only)
    assert f"{len(i2v_only)} unexpected key(s)" in msg and "k_img" in msg and "missing" not in msg


def test_task_must_match_the_folder(tiny_t2v_dir, tiny_i2v_dir):
    with pytest.raises(ValueError, match=r"task 'i2v' does not match the DiT in .*model_type 't2v'"):
        load_model_folder(tiny_t2v_dir, "i2v")
    with pytest.raises(ValueError, match=r"task 't2v' does not match the DiT in .*model_type 'i2v'"):
        load_model_folder(tiny_i2v_dir, "t2v")


# ---- file layouts ------------------------------------------------------------------------------------
def _shard(folder: Path, src: Path, index: bool) -> Path:
    """Write src's DiT as two shards (keys alternating), with or without the index.json of the 14B layout."""
    folder.mkdir(parents=True)
    shutil.copy2(src / DIT_CONFIG, folder / DIT_CONFIG)
    state = _state(src)
    names = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    weight_map = {k: names[i % 2] for i, k in enumerate(state)}
    for name in names:
        write_safetensors({k: v for k, v in state.items() if weight_map[k] == name}, folder / name)
    if index:
        (folder / f"{DIT_WEIGHTS}.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("index", [True, False], ids=["index", "glob"])
def test_sharded_equals_single_file(tmp_path, tiny_t2v_dir, index):
    folder = _shard(tmp_path / "sharded", tiny_t2v_dir, index)
    assert not (folder / DIT_WEIGHTS).exists()
    single = load_dit(tiny_t2v_dir)
    sharded = load_dit(folder)
    _assert_weights(sharded, single.state_dict())
    x = torch.randn(1, single.in_dim, 2, 4, 4)
    ctx = torch.randn(1, 7, single.text_dim)
    t = torch.tensor([500.0])
    # weights are compared exactly above; the forward of two separately loaded copies may take other SIMD
    # paths (tensor alignment differs between loads), so outputs get an fp32 tolerance
    torch.testing.assert_close(sharded(x, t, ctx), single(x, t, ctx), rtol=1e-5, atol=1e-5)
    assert read_sharded(folder).keys() == _state(tiny_t2v_dir).keys()


def test_distill_weights_used_only_for_the_distill_model_cls(model_copy, other_weights, make_config):
    (model_copy / "distill_models").mkdir()
    shutil.copy2(other_weights, model_copy / "distill_models" / "distill_model.safetensors")
    base, distill = _state(model_copy), read_state_dict(other_weights)
    assert not torch.equal(base["head.head.weight"], distill["head.head.weight"])

    dit = load_dit(model_copy, distill=True)
    assert dit.weights_source == str(model_copy / "distill_models" / "distill_model.safetensors")
    _assert_weights(dit, distill)
    _assert_weights(load_dit(model_copy, distill=False), base)

    # through the inference config: model_cls decides
    pipe = load_pipeline(make_config(**DISTILL), model_copy)
    _assert_weights(pipe.dit, distill)
    assert pipe.dit.weights_source.endswith("distill_model.safetensors")
    pipe = load_pipeline(make_config(), model_copy)
    _assert_weights(pipe.dit, base)
    assert pipe.dit.weights_source == str(model_copy)


def test_distill_pt_file(tmp_path, tiny_t2v_dir, other_weights):
    folder = _dit_folder(tmp_path / "m", tiny_t2v_dir)
    (folder / "distill_models").mkdir()
    torch.save(read_state_dict(other_weights), folder / "distill_models" / "distill_model.pt")
    dit = load_dit(folder, distill=True)
    assert dit.weights_source.endswith("distill_model.pt")
    _assert_weights(dit, read_state_dict(other_weights))


def test_explicit_checkpoint_wins(model_copy, other_weights, tiny_t2v_dir, make_config, tmp_path):
    # distill_models/ holds the base weights here, the explicit file the other ones: explicit must win
    (model_copy / "distill_models").mkdir()
    shutil.copy2(tiny_t2v_dir / DIT_WEIGHTS, model_copy / "distill_models" / "distill_model.safetensors")
    explicit = tmp_path / "student.safetensors"
    shutil.copy2(other_weights, explicit)
    expected = read_state_dict(other_weights)
    for distill in (False, True):
        dit = load_dit(model_copy, distill=distill, explicit=str(explicit))
        assert dit.weights_source == str(explicit)
        _assert_weights(dit, expected)
    pipe = load_pipeline(make_config(**DISTILL, dit_original_ckpt=str(explicit)), model_copy)
    _assert_weights(pipe.dit, expected)
    with pytest.raises(FileNotFoundError, match=r"dit_original_ckpt not found: .*gone\.safetensors"):
        load_dit(model_copy, explicit=str(tmp_path / "gone.safetensors"))


# ---- missing files -----------------------------------------------------------------------------------
def test_missing_folder_names_the_path(tmp_path, make_config):
    missing = tmp_path / "Wan2.1-T2V-1.3B"
    with pytest.raises(FileNotFoundError, match="model folder not found") as e:
        load_model_folder(missing, "t2v")
    assert str(missing) in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        load_pipeline(make_config(), missing)
    assert str(missing) in str(e.value)


def test_missing_files_inside_a_folder(tmp_path, tiny_t2v_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json not found") as e:
        load_dit(empty)
    assert str(empty / DIT_CONFIG) in str(e.value)
    shutil.copy2(tiny_t2v_dir / DIT_CONFIG, empty / DIT_CONFIG)
    with pytest.raises(FileNotFoundError, match="no DiT weights in") as e:
        load_dit(empty)
    assert str(empty) in str(e.value)
    # a DiT without the other components: the components' files are named
    shutil.copy2(tiny_t2v_dir / DIT_WEIGHTS, empty / DIT_WEIGHTS)
    with pytest.raises(FileNotFoundError, match=r"not found: .*Wan2\.1_VAE\.pth"):
        load_model_folder(empty, "t2v")


# ---- meta device -------------------------------------------------------------------------------------
def test_built_on_meta_then_assigned(tiny_i2v_dir, monkeypatch):
    devices = []
    build = models.components.build_dit

    def spy(config, device="cpu"):
        devices.append(str(device))
        return build(config, device)

    monkeypatch.setattr(models.components, "build_dit", spy)
    comps = load_model_folder(tiny_i2v_dir, "i2v")
    assert devices == ["meta"]  # never materialised with random init first
    for name, module in (("dit", comps.dit), ("text", comps.text_encoder.model), ("image", comps.image_encoder),
                         ("vae", comps.vae)):
        tensors = list(module.parameters()) + list(module.buffers())
        assert tensors and not any(t.is_meta for t in tensors), name
    _assert_weights(comps.dit, _state(tiny_i2v_dir))
    assert not comps.dit.training and not any(p.requires_grad for p in comps.dit.parameters())


def test_dtype_cast_on_load(tiny_t2v_dir):
    dit = load_dit(tiny_t2v_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in dit.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in dit.parameters())
