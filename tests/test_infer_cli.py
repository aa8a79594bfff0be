"""infer.py end to end on a random tiny model: .mp4 / .gif / .npy outputs, prompt files with per-video seeds,
and bad input rejected with exit code 2 and a clear message before any network is loaded."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

import infer
import inference.loader
from inference.loader import load_pipeline
from tests.test_pipeline import assert_videos_close

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle moving left"


@pytest.fixture
def t2v_config(tmp_path, tiny_t2v_dir, write_config):
    return write_config(tmp_path / "t2v.json", model_path=str(tiny_t2v_dir), seed=5)


@pytest.fixture
def i2v_config(tmp_path, tiny_i2v_dir, write_config):
    return write_config(tmp_path / "i2v.json", task="i2v", model_path=str(tiny_i2v_dir), seed=5)


@pytest.fixture
def no_model_work(monkeypatch):
    """Fail the test if any network would be loaded."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    for name in ("load_model_folder", "load_any_folder"):  # whichever the loader reads folders with
        if hasattr(inference.loader, name):
            monkeypatch.setattr(inference.loader, name, boom)


def _reference(config, seed: int, prompts=(PROMPT,)) -> np.ndarray:
    """What the pipeline itself makes for these prompts (video i with seed + i)."""
    return load_pipeline(config).generate(list(prompts), seed=seed)


def test_npy_is_the_exact_pipeline_output(tmp_path, t2v_config, capsys):
    out = tmp_path / "out" / "video.npy"
    assert infer.main(["--config", str(t2v_config), "--prompt", PROMPT, "--save_result_path", str(out)]) == 0
    saved = np.load(out)
    np.testing.assert_array_equal(saved, _reference(t2v_config, seed=5)[0])
    assert saved.dtype == np.uint8 and saved.shape == (5, 32, 32, 3)
    log = capsys.readouterr().out
    assert "DiT evaluations: 6" in log and f"saved {out}" in log  # 3 steps x 2 CFG passes


def test_mp4_is_playable(tmp_path, t2v_config):
    out = tmp_path / "video.mp4"
    assert infer.main(["--config", str(t2v_config), "--prompt", PROMPT, "--save_result_path", str(out)]) == 0
    with imageio.get_reader(out) as reader:
        frames = [np.asarray(f) for f in reader]
        fps = reader.get_meta_data()["fps"]
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3) and fps == 8
    ref = _reference(t2v_config, seed=5)[0].astype(float)
    assert np.abs(np.stack(frames).astype(float) - ref).mean() < 8  # H.264 is lossy, but it is this video
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temp file


def test_gif(tmp_path, t2v_config):
    out = tmp_path / "video.gif"
    assert infer.main(["--config", str(t2v_config), "--prompt", PROMPT, "--save_result_path", str(out),
                       "--seed", "9"]) == 0
    frames = imageio.mimread(out)
    assert len(frames) == 5 and np.asarray(frames[0]).shape[:2] == (32, 32)


def test_prompt_file_writes_one_video_per_prompt(tmp_path, t2v_config):
    prompts = ["a red circle", "", "a blue square moving up", "two triangles"]  # blank lines are skipped
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "videos"
    assert infer.main(["--config", str(t2v_config), "--prompt_file", str(tmp_path / "prompts.txt"),
                       "--output_dir", str(out), "--seed", "100"]) == 0
    kept = [p for p in prompts if p]
    assert sorted(p.name for p in out.iterdir()) == ["000000.mp4", "000001.mp4", "000002.mp4", "prompts.jsonl"]
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["prompt"] for r in rows] == kept
    assert [r["seed"] for r in rows] == [100, 101, 102]
    assert [r["path"] for r in rows] == [str(out / f"{i:06d}.mp4") for i in range(3)]
    with imageio.get_reader(out / "000002.mp4") as reader:
        assert sum(1 for _ in reader) == 5


def test_prompt_file_batches_keep_per_video_seeds(tmp_path, t2v_config):
    prompts = ["a red circle", "a blue square moving up", "two triangles"]
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    assert infer.main(["--config", str(t2v_config), "--prompt_file", str(tmp_path / "p.txt"), "--output_dir",
                       str(tmp_path / "o"), "--format", "npy", "--batch_size", "2"]) == 0
    ref = _reference(t2v_config, seed=5, prompts=prompts)
    for i in range(3):  # batches of 2 vs one batch of 3: other float kernels, so +-1 per uint8 value
        assert_videos_close(np.load(tmp_path / "o" / f"{i:06d}.npy"), ref[i], f"video {i}")


def test_i2v_cli(tmp_path, i2v_config):
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = (255, 0, 0)
    imageio.imwrite(tmp_path / "frame0.png", image)
    out = tmp_path / "i2v.npy"
    assert infer.main(["--config", str(i2v_config), "--prompt", PROMPT, "--image_path",
                       str(tmp_path / "frame0.png"), "--save_result_path", str(out)]) == 0
    ref = load_pipeline(i2v_config).generate(PROMPT, seed=5, image=image)
    np.testing.assert_array_equal(np.load(out), ref[0])


# ---- bad input: exit code 2, a message naming the problem, no network loaded -----------------------------
def _fails(argv, capsys, *needles) -> str:
    assert infer.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, err
    return err


def test_missing_model_folder(tmp_path, write_config, capsys, no_model_work):
    missing = tmp_path / "no_such_model"
    config = write_config(tmp_path / "c.json", model_path=str(missing))
    _fails(["--config", config, "--prompt", PROMPT, "--save_result_path", tmp_path / "o.mp4"], capsys,
           "model folder not found", str(missing))
    # --model_path wins over the config's folder and is reported the same way
    other = tmp_path / "elsewhere"
    _fails(["--config", config, "--model_path", other, "--prompt", PROMPT, "--save_result_path",
            tmp_path / "o.mp4"], capsys, str(other))
    assert not (tmp_path / "o.mp4").exists()


def test_missing_config(tmp_path, capsys, no_model_work):
    _fails(["--config", tmp_path / "nope.json", "--prompt", PROMPT, "--save_result_path", tmp_path / "o.mp4"],
           capsys, "inference config not found", "nope.json")


def test_empty_prompt_file(tmp_path, t2v_config, capsys, no_model_work):
    (tmp_path / "empty.txt").write_text("\n   \n")
    _fails(["--config", t2v_config, "--prompt_file", tmp_path / "empty.txt", "--output_dir", tmp_path / "o"],
           capsys, "empty.txt is empty")
    _fails(["--config", t2v_config, "--prompt_file", tmp_path / "missing.txt", "--output_dir", tmp_path / "o"],
           capsys, "prompt file not found", "missing.txt")
    assert not (tmp_path / "o").exists()


def test_i2v_without_image(tmp_path, i2v_config, capsys, no_model_work):
    _fails(["--config", i2v_config, "--prompt", PROMPT, "--save_result_path", tmp_path / "o.mp4"], capsys,
           "i2v needs --image_path")
    # --task i2v on a T2V config asks for the image too
    t2v = i2v_config.with_name("t.json")
    t2v.write_text(i2v_config.read_text().replace('"i2v"', '"t2v"'))
    _fails(["--config", t2v, "--task", "i2v", "--prompt", PROMPT, "--save_result_path", tmp_path / "o.mp4"],
           capsys, "--image_path")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # imageio probes its legacy plugins on a bad file
def test_unreadable_image(tmp_path, i2v_config, capsys, no_model_work):
    fake = tmp_path / "x.png"
    fake.write_text("this is not a png")
    _fails(["--config", i2v_config, "--prompt", PROMPT, "--image_path", fake, "--save_result_path",
            tmp_path / "o.mp4"], capsys, "cannot read", str(fake))
    _fails(["--config", i2v_config, "--prompt", PROMPT, "--image_path", tmp_path / "gone.png",
            "--save_result_path", tmp_path / "o.mp4"], capsys, "image not found", "gone.png")


def test_frames_not_4n_plus_1(tmp_path, tiny_t2v_dir, write_config, capsys, no_model_work):
    config = write_config(tmp_path / "c.json", model_path=str(tiny_t2v_dir), target_video_length=6)
    _fails(["--config", config, "--prompt", PROMPT, "--save_result_path", tmp_path / "o.mp4"], capsys,
           "target_video_length must be 4n+1", "got 6")


def test_bad_output_extension(tmp_path, t2v_config, capsys, no_model_work):
    _fails(["--config", t2v_config, "--prompt", PROMPT, "--save_result_path", tmp_path / "o.avi"], capsys,
           "--save_result_path must end in one of")


def test_task_mismatch_with_model(tmp_path, tiny_t2v_dir, write_config, capsys):
    """An I2V config on a T2V folder is caught when the DiT's config is read (still exit code 2)."""
    image = np.zeros((32, 32, 3), np.uint8)
    imageio.imwrite(tmp_path / "f.png", image)
    config = write_config(tmp_path / "c.json", task="i2v", model_path=str(tiny_t2v_dir))
    _fails(["--config", config, "--prompt", PROMPT, "--image_path", tmp_path / "f.png", "--save_result_path",
            tmp_path / "o.mp4"], capsys, "does not match the DiT", "model_type 't2v'")


# ---- issue 15: every bad input named before any model work ----------------------------------------------------
def test_output_path_that_is_a_directory_leaves_nothing(tmp_path, t2v_config, capsys, no_model_work):
    target = tmp_path / "dir.mp4"
    target.mkdir()
    _fails(["--config", t2v_config, "--prompt", PROMPT, "--save_result_path", target], capsys,
           "is a directory", str(target))
    assert list(tmp_path.glob(".*tmp*")) == [] and list(target.iterdir()) == []


def test_output_folder_that_is_a_file(tmp_path, t2v_config, capsys, no_model_work):
    (tmp_path / "plain").write_text("x")
    _fails(["--config", t2v_config, "--prompt", PROMPT, "--save_result_path", tmp_path / "plain" / "o.mp4"],
           capsys, "plain is a file, not a folder")
    _fails(["--config", t2v_config, "--prompt", PROMPT, "--output_dir", tmp_path / "plain"], capsys,
           "--output_dir", "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, t2v_config, capsys, no_model_work):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _fails(["--config", t2v_config, "--prompt", PROMPT, "--save_result_path", ro / "o.mp4"], capsys,
               "not writable", str(ro))
    finally:
        ro.chmod(0o755)


def test_existing_run_in_output_dir_is_not_overwritten(tmp_path, t2v_config, capsys):
    (tmp_path / "p.txt").write_text("a red circle\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / "prompts.jsonl").write_text('{"index": 0, "prompt": "earlier"}\n')
    argv = ["--config", t2v_config, "--prompt_file", tmp_path / "p.txt", "--output_dir", out, "--format", "npy"]
    _fails(argv, capsys, "already holds an earlier run", "prompts.jsonl", "--overwrite")
    assert "earlier" in (out / "prompts.jsonl").read_text() and not (out / "000000.npy").exists()
    assert infer.main([str(a) for a in argv] + ["--overwrite"]) == 0
    assert json.loads((out / "prompts.jsonl").read_text())["prompt"] == "a red circle"


@pytest.mark.parametrize("flag, value, needle", [
    ("--batch_size", "0", "--batch_size: must be >= 1, got 0"),
    ("--lora_strength", "nan", "--lora_strength: must be a finite number, got 'nan'"),
    ("--lora_strength", "inf", "--lora_strength: must be a finite number, got 'inf'"),
])
def test_cli_numbers_refused_by_argparse(tmp_path, t2v_config, capsys, flag, value, needle):
    with pytest.raises(SystemExit) as e:
        infer.main(["--config", str(t2v_config), "--prompt", PROMPT, "--save_result_path", str(tmp_path / "o.mp4"),
                    flag, value])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_seed_out_of_range_before_model(tmp_path, t2v_config, capsys, no_model_work):
    _fails(["--config", t2v_config, "--prompt", PROMPT, "--save_result_path", tmp_path / "o.mp4", "--seed", "-1"],
           capsys, "seed must be an integer in [0, 2**63)")


def test_config_types_before_model(tmp_path, tiny_t2v_dir, write_config, capsys, no_model_work):
    config = write_config(tmp_path / "c.json", model_path=str(tiny_t2v_dir), enable_cfg="false")
    _fails(["--config", config, "--prompt", PROMPT, "--save_result_path", tmp_path / "o.mp4"], capsys,
           "c.json", "enable_cfg = 'false' (str)", "true or false")


def test_prompt_file_not_utf8(tmp_path, t2v_config, capsys, no_model_work):
    (tmp_path / "latin1.txt").write_bytes("un cercle rouge caf\xe9\n".encode("latin-1"))
    _fails(["--config", t2v_config, "--prompt_file", tmp_path / "latin1.txt", "--output_dir", tmp_path / "o"],
           capsys, "latin1.txt is not UTF-8")


def test_image_path_problems_named(tmp_path, i2v_config, t2v_config, capsys, no_model_work):
    base = ["--prompt", PROMPT, "--save_result_path", tmp_path / "o.mp4"]
    (tmp_path / "notes.png").write_text("hello, not a picture")
    err = _fails(["--config", i2v_config, "--image_path", tmp_path / "notes.png", *base], capsys,
                 "cannot read", "notes.png", "not a picture format")
    assert "plugin" not in err
    (tmp_path / "folder.png").mkdir()
    _fails(["--config", i2v_config, "--image_path", tmp_path / "folder.png", *base], capsys, "is a directory")
    _fails(["--config", i2v_config, "--image_path", "a\x00b.png", *base], capsys, "NUL byte")
    imageio.imwrite(tmp_path / "f.png", np.zeros((32, 32, 3), np.uint8))
    _fails(["--config", t2v_config, "--image_path", tmp_path / "f.png", *base], capsys,
           "--image_path is for image-to-video", "t2v")


def test_truncated_image(tmp_path, i2v_config, capsys, no_model_work):
    imageio.imwrite(tmp_path / "f.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = (tmp_path / "f.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _fails(["--config", i2v_config, "--prompt", PROMPT, "--image_path", tmp_path / "cut.png", "--save_result_path",
            tmp_path / "o.mp4"], capsys, "cannot read", "cut.png")


def _copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_distill_weights_and_lora_named(tmp_path, tiny_t2v_dir, write_config, capsys, no_model_work):
    folder = _copy_folder(tiny_t2v_dir, tmp_path / "m")
    data = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    (folder / "distill_models").mkdir()
    (folder / "distill_models" / "distill_model.safetensors").write_bytes(data[:-100])
    config = write_config(tmp_path / "d.json", model_path=str(folder), model_cls="wan2.1_distill",
                          denoising_step_list=[1000, 500], enable_cfg=False)
    _fails(["--config", config, "--prompt", PROMPT, "--save_result_path", tmp_path / "o.mp4"], capsys,
           "DiT weights", "distill_model.safetensors is truncated")
    (folder / "lora.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    teacher = write_config(tmp_path / "t.json", model_path=str(folder))
    _fails(["--config", teacher, "--prompt", PROMPT, "--save_result_path", tmp_path / "o.mp4", "--lora_path",
            folder / "lora.safetensors"], capsys, "LoRA file", "lora.safetensors is not a readable safetensors")


# ---- issue 13 item 5: LightX2V command lines --------------------------------------------------------------------
def test_config_json_alias_and_model_cls(tmp_path, t2v_config):
    out = tmp_path / "v.npy"
    assert infer.main(["--config_json", str(t2v_config), "--model_cls", "wan2.1", "--prompt", PROMPT,
                       "--save_result_path", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), _reference(t2v_config, seed=5)[0], atol=1)
    args = infer.parse_args(["--config_json", "c.json", "--prompt", "p", "--save_result_path", "o.mp4"])
    assert args.config == "c.json" and args.model_cls is None


def test_unsupported_model_cls_refused(tmp_path, t2v_config, capsys, no_model_work):
    _fails(["--config", t2v_config, "--model_cls", "wan2.1_causvid", "--prompt", PROMPT, "--save_result_path",
            tmp_path / "o.mp4"], capsys, "model_cls 'wan2.1_causvid'", "CausVid", "supported: 'wan2.1'")


def test_distill_schedule_on_base_weights_names_the_fix(tmp_path, tiny_t2v_dir, write_config, capsys,
                                                        no_model_work):
    folder = _copy_folder(tiny_t2v_dir, tmp_path / "m")
    # a LightX2V distill JSON carries no model_cls: the base weights would load under the 4-step schedule
    config = write_config(tmp_path / "d.json", model_path=str(folder), denoising_step_list=[1000, 750, 500, 250],
                          enable_cfg=False)
    base = ["--config", config, "--prompt", PROMPT, "--save_result_path", tmp_path / "o.mp4"]
    _fails(base, capsys, "denoising_step_list [1000, 750, 500, 250]", "base (teacher) weights", "blurry",
           "distill_models", "--lora_path")
    (folder / "distill_models").mkdir()
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", folder / "distill_models" / "distill_model.safetensors")
    _fails(base, capsys, "pass --model_cls wan2.1_distill")


def test_distill_schedule_with_model_cls_or_lora_loads(tmp_path, tiny_t2v_dir, write_config):
    folder = _copy_folder(tiny_t2v_dir, tmp_path / "m")
    (folder / "distill_models").mkdir()
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", folder / "distill_models" / "distill_model.safetensors")
    config = write_config(tmp_path / "d.json", model_path=str(folder), denoising_step_list=[1000, 500],
                          enable_cfg=False)
    assert infer.main(["--config", str(config), "--model_cls", "wan2.1_distill", "--prompt", PROMPT,
                       "--save_result_path", str(tmp_path / "o.npy")]) == 0


def test_generate_accepts_an_image_path(tmp_path, i2v_pipe):
    image = np.zeros((32, 32, 3), np.uint8)
    image[4:20, 10:30] = (0, 200, 50)
    imageio.imwrite(tmp_path / "frame0.png", image)
    by_path = i2v_pipe.generate(PROMPT, seed=3, image=str(tmp_path / "frame0.png"))
    by_array = i2v_pipe.generate(PROMPT, seed=3, image=image)
    np.testing.assert_allclose(by_path.astype(int), by_array.astype(int), atol=1)  # same input, same path
    with pytest.raises(ValueError, match="is a directory"):
        i2v_pipe.generate(PROMPT, seed=3, image=tmp_path)


@pytest.mark.parametrize("lightx2v_name", ["int8-vllm", "int8-q8f"])
def test_lightx2v_quant_scheme_name_loads_our_int8_folder(tmp_path, tiny_t2v_dir, write_config, lightx2v_name):
    from inference.quant import convert

    convert(tiny_t2v_dir, tmp_path / "q", "int8")
    ours = load_pipeline(write_config(tmp_path / "a.json", model_path=str(tmp_path / "q"), dit_quantized=True,
                                      dit_quant_scheme="int8"))
    theirs = load_pipeline(write_config(tmp_path / "b.json", model_path=str(tmp_path / "q"), dit_quantized=True,
                                        dit_quant_scheme=lightx2v_name))
    assert theirs.cfg.dit_quant_scheme == "int8"
    a, b = ours.dit.state_dict(), theirs.dit.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same weights, exactly


def test_webui_cli_takes_lightx2v_flags(tmp_path, t2v_config, capsys):
    from inference import webui

    args = webui.parse_args(["--config_json", str(t2v_config), "--model_cls", "wan2.1"])
    assert args.config == str(t2v_config) and args.model_cls == "wan2.1"
    assert webui.main(["--config_json", str(t2v_config), "--model_cls", "wan2.1_vace"]) == 2
    assert "model_cls 'wan2.1_vace'" in capsys.readouterr().err


def test_text_len_that_the_dit_overrides_warns(tmp_path, tiny_t2v_dir, write_config):
    """text_len is accepted (LightX2V configs carry it) but the DiT's config.json decides: a different value warns."""
    config = write_config(tmp_path / "c.json", model_path=str(tiny_t2v_dir), text_len=999)
    with pytest.warns(UserWarning, match=r"text_len 999 in the inference config is not used"):
        pipe = load_pipeline(config)
    same = write_config(tmp_path / "same.json", model_path=str(tiny_t2v_dir), text_len=pipe.dit.text_len)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pipeline(same)


def test_python_api_warns_on_a_distill_schedule_over_base_weights(tmp_path, tiny_t2v_dir, write_config):
    """infer.py refuses it (above); load_pipeline warns, for deliberate comparisons, naming the same fix."""
    from inference.loader import BaseWeightsWarning

    config = write_config(tmp_path / "d.json", model_path=str(tiny_t2v_dir), denoising_step_list=[1000, 500],
                          enable_cfg=False)
    with pytest.warns(BaseWeightsWarning, match=r"base \(teacher\) weights.*distill_models"):
        load_pipeline(config)
    with pytest.raises(ValueError, match=r"on_base_weights must be one of \['error', 'warn'\]"):
        load_pipeline(config, on_base_weights="ignore")


def test_quantized_base_with_a_merged_lora_counts_as_distilled(tmp_path, tiny_t2v_dir, write_config):
    """The converter merges a distill LoRA into a base DiT and writes it to <scheme>/, recording the LoRA in the
    file's metadata: that is a distilled DiT, not base weights."""
    from safetensors.torch import save_file

    from inference.config import load_config
    from inference.loader import dit_files

    folder = _copy_folder(tiny_t2v_dir, tmp_path / "m")
    (folder / "int8").mkdir()
    target = folder / "int8" / "diffusion_pytorch_model.safetensors"
    cfg = load_config(write_config(tmp_path / "q.json", model_path=str(folder), dit_quantized=True,
                                   dit_quant_scheme="int8", denoising_step_list=[1000, 500], enable_cfg=False))
    save_file({"x": torch.zeros(1)}, str(target), metadata={"loras": "[]"})
    assert dit_files(cfg, folder) == ([target], False)
    save_file({"x": torch.zeros(1)}, str(target), metadata={"loras": '[["distill_lora.safetensors", 1.0]]'})
    assert dit_files(cfg, folder) == ([target], True)
