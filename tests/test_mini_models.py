"""Mini Wan2.1 folders (models/mini.py): the official and diffusers layouts, loading both into our networks
(configs read off the files), parity with diffusers/transformers `from_pretrained` of the same folder, and the
fast part of the rehearsal: the shipped real configs generating on mini folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.loader import load_pipeline
from models.clip import CLIPImageEncoder
from models.components import load_dit, load_model_folder
from models.diffusers_folder import (
    dit_config_from_diffusers,
    is_diffusers_folder,
    load_any_folder,
    load_diffusers_folder,
)
from models.loading import (
    DIT_WEIGHTS,
    clip_config_from_state,
    read_components,
    read_sharded,
    umt5_config_from_state,
    wan_vae_config_from_state,
)
from models.mini import MINI_CLIP, MINI_DIT, MINI_UMT5, MINI_VAE, build_mini, write_mini
from models.registry import WAN_FILES
from models.t5 import HFTokenizer, UMT5Encoder
from models.vae import WanVAE

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving left"
SMALL = dict(target_video_length=5, target_height=32, target_width=32, device="cpu", dtype="fp32")
# fp32 forward of the same weights through two implementations (different kernels and op order)
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(task, layout) -> a mini folder; the two layouts of a task hold the same weights (seed 0)."""
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("mini")
    return {(task, layout): write_mini(root / f"{task}_{layout}", task, layout)
            for task in ("t2v", "i2v") for layout in ("official", "diffusers")}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "start.png"
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # square: I2V keeps 32x32
    Image.fromarray(pixels).save(path)
    return path


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k not in skip:
            assert torch.equal(a[k].float(), b[k].float()), k


# ---- layouts -------------------------------------------------------------------------------------------------

def test_official_layout_has_every_file(folders):
    t2v, i2v = folders[("t2v", "official")], folders[("i2v", "official")]
    common = {"config.json", DIT_WEIGHTS, WAN_FILES["vae"], WAN_FILES["text_encoder"]}
    tokenizer = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert common <= {p.name for p in t2v.iterdir()}
    assert not (t2v / WAN_FILES["image_encoder"]).exists()
    assert common | {WAN_FILES["image_encoder"]} <= {p.name for p in i2v.iterdir()}
    for folder in (t2v / WAN_FILES["tokenizer"], i2v / "xlm-roberta-large"):
        assert tokenizer <= {p.name for p in folder.iterdir()}
    assert {v.dtype for v in torch.load(t2v / WAN_FILES["text_encoder"], weights_only=True).values()} == {
        torch.bfloat16}
    config = json.loads((t2v / "config.json").read_text())
    assert config["_class_name"] == "WanModel" and config["dim"] == MINI_DIT["dim"] and config["text_len"] == 512


def test_diffusers_layout_has_every_component(folders):
    for task, parts in (("t2v", set()), ("i2v", {"image_encoder", "image_processor"})):
        folder = folders[(task, "diffusers")]
        index = json.loads((folder / "model_index.json").read_text())
        expected = {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"} | parts
        assert expected <= {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}
        assert all((folder / name).is_dir() for name in expected)
        assert is_diffusers_folder(folder) and not is_diffusers_folder(folders[(task, "official")])
    assert json.loads((folders[("i2v", "diffusers")] / "model_index.json").read_text())["_class_name"] == (
        "WanImageToVideoPipeline")


def test_sharded_official_folder_equals_single_file(folders, tmp_path):
    sharded = write_mini(tmp_path / "sharded", "t2v", "official", sharded=True)
    assert not (sharded / DIT_WEIGHTS).exists()
    index = json.loads((sharded / f"{DIT_WEIGHTS}.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    _equal_states(load_dit(sharded).state_dict(), load_dit(folders[("t2v", "official")]).state_dict())


def test_sharded_diffusers_transformer_loads(folders, tmp_path):
    sharded = write_mini(tmp_path / "sharded", "t2v", "diffusers", sharded=True)
    assert (sharded / "transformer" / f"{DIT_WEIGHTS}.index.json").is_file()
    a = load_diffusers_folder(sharded, "t2v").dit.state_dict()
    _equal_states(a, load_dit(folders[("t2v", "official")]).state_dict())


def test_write_mini_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        write_mini(tmp_path / "a", "t2i")
    with pytest.raises(ValueError, match="layout must be one of"):
        write_mini(tmp_path / "a", "t2v", "comfy")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        write_mini(tmp_path / "full", "t2v")


def test_same_seed_same_weights_other_seed_differs():
    a, b, c = build_mini("t2v", seed=0), build_mini("t2v", seed=0), build_mini("t2v", seed=1)
    _equal_states(a.dit.state_dict(), b.dit.state_dict())
    assert not torch.equal(a.dit.head.head.weight, c.dit.head.head.weight)


# ---- configs from the files ----------------------------------------------------------------------------------

def test_official_component_configs_are_read_off_the_tensors(folders):
    table = read_components(folders[("i2v", "official")])
    assert {k: table["vae"]["config"][k] for k in ("dim", "z_dim", "num_res_blocks")} == {
        "dim": MINI_VAE["dim"], "z_dim": MINI_VAE["z_dim"], "num_res_blocks": MINI_VAE["num_res_blocks"]}
    assert table["vae"]["config"]["dim_mult"] == list(MINI_VAE["dim_mult"])
    assert table["vae"]["config"]["temporal_downsample"] == [False, True, True]
    t5 = table["text_encoder"]["config"]
    assert {k: t5[k] for k in MINI_UMT5} == MINI_UMT5
    clip = table["image_encoder"]["config"]
    assert {k: clip[k] for k in MINI_CLIP} == MINI_CLIP


def test_real_size_configs_from_meta_state_dicts():
    """The same inference gives the real umT5-XXL, ViT-H/14 and Wan2.1 VAE configs (built on `meta`)."""
    with torch.device("meta"):
        t5, clip, vae = UMT5Encoder(), CLIPImageEncoder(), WanVAE()
    got_t5 = umt5_config_from_state(t5.state_dict())
    assert got_t5 == {k: t5.config[k] for k in got_t5}
    got_clip = clip_config_from_state(clip.state_dict())
    assert got_clip == {k: clip.config[k] for k in got_clip}
    got_vae = wan_vae_config_from_state(vae.state_dict())
    assert got_vae == {k: vae.config[k] for k in got_vae}
    with torch.device("meta"):
        other = WanVAE(dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=2, attn_scales=(0.5,),
                       temporal_downsample=(True, False))
    assert wan_vae_config_from_state(other.state_dict())["attn_scales"] == [0.5]


def test_diffusers_dit_config_refuses_unknown_fields():
    config = {"num_attention_heads": 2, "attention_head_dim": 32, "in_channels": 16, "out_channels": 16,
              "ffn_dim": 128, "freq_dim": 64, "num_layers": 2}
    assert dit_config_from_diffusers(config)["dim"] == 64
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['rope_theta'\]"):
        dit_config_from_diffusers({**config, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_max_seq_len 2048"):
        dit_config_from_diffusers({**config, "rope_max_seq_len": 2048})


def test_diffusers_vae_and_encoder_configs_refuse_other_architectures():
    from models.convert import clip_config_from_transformers, umt5_config_from_transformers
    from models.diffusers_folder import vae_config_from_diffusers

    assert vae_config_from_diffusers({"base_dim": 8, "num_res_blocks": 1})["dim"] == 8
    with pytest.raises(ValueError, match="not the Wan2.1 VAE.*is_residual True"):
        vae_config_from_diffusers({"base_dim": 160, "z_dim": 48, "is_residual": True})
    with pytest.raises(ValueError, match="scale_factor_spatial 16 does not match"):
        vae_config_from_diffusers({"scale_factor_spatial": 16})
    t5 = {"vocab_size": 10, "d_model": 8, "d_kv": 2, "num_heads": 4, "d_ff": 16, "num_layers": 1}
    assert umt5_config_from_transformers(t5)["dim_attn"] == 8
    with pytest.raises(ValueError, match="feed_forward_proj 'relu'"):
        umt5_config_from_transformers({**t5, "feed_forward_proj": "relu"})
    with pytest.raises(ValueError, match="hidden_act 'quick_gelu'"):
        clip_config_from_transformers({"hidden_size": 8, "hidden_act": "quick_gelu"})


# ---- the two layouts load to the same networks --------------------------------------------------------------

@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_official_and_diffusers_twins_load_equal_weights(folders, task):
    off = load_model_folder(folders[(task, "official")], task)
    dif = load_diffusers_folder(folders[(task, "diffusers")], task)
    _equal_states(off.dit.state_dict(), dif.dit.state_dict())
    _equal_states(off.vae.state_dict(), dif.vae.state_dict())
    _equal_states(off.text_encoder.model.state_dict(), dif.text_encoder.model.state_dict())
    assert dif.dit.text_len == off.dit.text_len == 512
    if task == "i2v":  # CLIPVisionModel has no projection: the unused head is zero-filled
        _equal_states(off.image_encoder.state_dict(), dif.image_encoder.state_dict(), skip=("visual.head",))
        assert not dif.image_encoder.visual.head.any()


def test_tokenizer_folder_reads_in_both_libraries(folders):
    transformers = pytest.importorskip("transformers")
    folder = folders[("t2v", "official")] / WAN_FILES["tokenizer"]
    ids, mask = HFTokenizer(folder)([PROMPT], max_len=512)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))(PROMPT).input_ids
    assert ids[0, : int(mask.sum())].tolist() == ref and ref[-1] == 1  # </s> = 1, as in umT5
    xlmr = transformers.AutoTokenizer.from_pretrained(str(folders[("i2v", "official")] / "xlm-roberta-large"))
    ids = xlmr(PROMPT).input_ids
    assert type(xlmr).__name__.startswith("XLMRoberta") and ids[0] == 0 and ids[-1] == 2  # <s> ... </s>


# ---- parity with diffusers / transformers from_pretrained ----------------------------------------------------

def test_transformer_matches_diffusers_from_pretrained(folders):
    diffusers = pytest.importorskip("diffusers")
    folder = folders[("i2v", "diffusers")]
    ref = diffusers.WanTransformer3DModel.from_pretrained(str(folder / "transformer")).eval()
    ours = load_diffusers_folder(folder, "i2v").dit
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 20, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 512, MINI_UMT5["dim"], generator=g)
    clip = torch.randn(1, 17, MINI_CLIP["dim"], generator=g)
    t = torch.tensor([700.0])
    with torch.no_grad():
        want = ref(torch.cat([x, y], 1), t, ctx, encoder_hidden_states_image=clip, return_dict=False)[0]
        got = ours(x, t, ctx, clip_fea=clip, y=y)
    torch.testing.assert_close(got, want, **TOL)


def test_vae_text_and_image_encoders_match_from_pretrained(folders):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    folder = folders[("i2v", "diffusers")]
    comps = load_diffusers_folder(folder, "i2v")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        vae = diffusers.AutoencoderKLWan.from_pretrained(str(folder / "vae")).eval()
        video = torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1
        torch.testing.assert_close(comps.vae.encode_mean(video), vae.encode(video).latent_dist.mean, **TOL)

        t5 = transformers.UMT5EncoderModel.from_pretrained(str(folder / "text_encoder")).eval()
        ids, mask = comps.text_encoder.tokenizer([PROMPT, "a cat"], max_len=512)
        want = t5(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(comps.text_encoder.model(ids, mask) * mask[..., None], want * mask[..., None],
                                   **TOL)

        clip = transformers.CLIPVisionModel.from_pretrained(str(folder / "image_encoder")).eval()
        pixels = torch.randn(2, 3, 56, 56, generator=g)
        want = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(comps.image_encoder(pixels), want, **TOL)


def test_diffusers_pipelines_load_the_folders(folders):
    diffusers = pytest.importorskip("diffusers")
    t2v = diffusers.WanPipeline.from_pretrained(str(folders[("t2v", "diffusers")]))
    i2v = diffusers.WanImageToVideoPipeline.from_pretrained(str(folders[("i2v", "diffusers")]))
    assert type(t2v.transformer).__name__ == "WanTransformer3DModel" and i2v.image_encoder is not None


# ---- fast rehearsal: the shipped real configs on mini folders ----------------------------------------------

@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_real_configs_generate_on_both_layouts(folders, image_file, task):
    image = {"image": str(image_file)} if task == "i2v" else {}
    videos = {}
    for layout in ("official", "diffusers"):
        pipe = load_pipeline(REPO / "configs" / "infer" / "wan" / f"wan_{task}.json", folders[(task, layout)],
                             infer_steps=3, **SMALL)
        videos[layout] = pipe.generate([PROMPT], seed=0, **image)
        assert videos[layout].shape == (1, 5, 32, 32, 3) and videos[layout].std() > 1
    diff = np.abs(videos["official"].astype(int) - videos["diffusers"].astype(int))
    assert diff.max() <= 1  # same weights, same code: at most a rounding flip


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_distill_config_runs_on_distill_models(folders, image_file, tmp_path, layout):
    """configs/infer/wan/*_distill_*: model_cls wan2.1_distill reads distill_models/distill_model.safetensors."""
    folder = Path(shutil.copytree(folders[("i2v", layout)], tmp_path / "m"))
    dit = load_any_folder(folder, "i2v").dit
    from models.loading import write_safetensors

    write_safetensors(dit.state_dict(), folder / "distill_models" / "distill_model.safetensors")
    pipe = load_pipeline(REPO / "configs" / "infer" / "wan" / "wan_i2v_distill_4step_cfg.json", folder, **SMALL)
    assert pipe.dit.weights_source.endswith("distill_model.safetensors")
    assert pipe.generate([PROMPT], seed=0, image=str(image_file)).shape == (1, 5, 32, 32, 3)


def test_quantized_dit_on_a_diffusers_folder_is_an_error(folders):
    with pytest.raises(ValueError, match="official Wan layout"):
        load_any_folder(folders[("t2v", "diffusers")], "t2v", dit_loader=lambda *a: None)


def test_read_sharded_reads_transformers_names(folders):
    state = read_sharded(folders[("t2v", "diffusers")] / "text_encoder", "model.safetensors")
    assert "shared.weight" in state


# ---- the 1.3B geometry and the GPU rehearsal's CPU logic ----------------------------------------------------

def test_rehearsal_geometry_is_the_real_1_3b_dit_and_vae():
    from models.mini import mini_configs
    from models.registry import get_spec

    cfg = mini_configs("t2v", "1.3b")
    assert cfg["dit"] == get_spec("wan2.1-t2v-1.3b").dit and cfg["vae"] == {}
    assert cfg["umt5"]["dim"] == cfg["dit"].get("text_dim", 4096) == 4096
    with pytest.raises(ValueError, match="no I2V model of that size"):
        mini_configs("i2v", "1.3b")
    with pytest.raises(ValueError, match="geometry must be one of"):
        write_mini(Path("unused"), "t2v", geometry="14b")


def test_peak_memory_records_a_script_run(tmp_path):
    from scripts.peak_memory import main

    script = tmp_path / "job.py"
    script.write_text("import sys\nprint(sys.argv[1:])\nsys.exit(3)\n")
    assert main(["--out", str(tmp_path / "r.json"), str(script), "--", "a", "b=1"]) == 3
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["args"] == ["a", "b=1"] and record["exit_code"] == 3
    assert record["wall_s"] >= 0 and record["peak_host_rss_gib"] > 0


def test_rehearsal_report_iteration_times_and_table(tmp_path):
    from scripts.rehearsal_report import iteration_times, markdown, summarize

    run = tmp_path / "runs" / "dmd"
    run.mkdir(parents=True)
    rows = [{"step": s, "time": t} for s, t in [(1, 100.0), (2, 102.0), (3, 103.0), (4, 113.0), (5, 114.5)]]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert iteration_times(run / "metrics.jsonl") == {2: 2.0, 3: 1.0, 4: 10.0, 5: 1.5}
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "dmd.json").write_text(json.dumps(
        {"wall_s": 20.0, "exit_code": 0, "peak_host_rss_gib": 1.0, "peak_cuda_allocated_gib": 30.0,
         "peak_cuda_reserved_gib": 31.0}))
    summary = summarize(tmp_path, skip_steps={4})  # step 4 also wrote samples
    assert summary["dmd_iteration_median_s"] == 1.5 and summary["dmd_iteration_max_s"] == 2.0
    assert "| dmd | 20.0 | 0 | 30.0 | 31.0 | 1.0 |" in markdown(summary)
    (run / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="at least two rows"):
        iteration_times(run / "metrics.jsonl")


def test_rehearsal_report_splits_generator_and_critic_steps_and_reads_cuda_peaks(tmp_path):
    """step_time medians per iteration kind (warm-up step 1 out); the training rows' peak and the sampling event's."""
    from scripts.rehearsal_report import markdown, summarize

    run = tmp_path / "runs" / "dmd"
    run.mkdir(parents=True)
    rows = [{"step": 1, "time": 0.0, "step_time": 15.0, "generator_loss": 1.0, "cuda_peak_gib": 40.0},
            {"step": 2, "time": 5.0, "step_time": 5.0, "cuda_peak_gib": 41.0},
            {"step": 3, "time": 9.0, "step_time": 4.0, "cuda_peak_gib": 39.0},
            {"step": 4, "time": 21.0, "step_time": 12.0, "generator_loss": 1.0, "cuda_peak_gib": 55.5},
            {"step": 5, "time": 24.0, "step_time": 3.0, "cuda_peak_gib": 39.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "events.log").write_text("[step 5] sample sample_0: a.npy\n"
                                    "[step 5] sampling peak CUDA memory allocated: 66.70 GiB\n")
    summary = summarize(tmp_path)
    assert summary["generator_iteration_s"] == 12.0 and summary["critic_only_iteration_s"] == 4.0
    assert summary["training_peak_gib"] == 55.5 and summary["sampling_peak_gib"] == 66.7
    text = markdown(summary)
    assert "generator iteration 12.00 s, critic-only iteration 4.00 s" in text
    assert "training iterations 55.5 GiB, sampling 66.7 GiB" in text
    from scripts.rehearsal_report import main

    (tmp_path / "stages").mkdir(exist_ok=True)
    (tmp_path / "stages" / "dmd.json").write_text(json.dumps(
        {"wall_s": 1.0, "exit_code": 0, "peak_host_rss_gib": 1.0, "args": [f"run_dir={tmp_path}/runs/dmd"]}))
    (tmp_path / "rehearsal.json").write_text(json.dumps({"geometry": "mini", "work": str(tmp_path)}))
    main(["--work", str(tmp_path), "--out", str(tmp_path / "res" / "gpu_rehearsal_1.3b")])  # the dot stays
    written = (tmp_path / "res" / "gpu_rehearsal_1.3b.json").read_text()
    assert str(tmp_path) not in written and "run_dir=WORK/runs/dmd" in written  # no machine path is kept
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["gpu_rehearsal_1.3b.json", "gpu_rehearsal_1.3b.md"]


def test_trainer_cuda_peak_carries_the_training_peak_over_sampling(monkeypatch):
    """Trainer.cuda_peak: max(carry, allocator peak), then reset; nothing off CUDA (no device needed)."""
    from types import SimpleNamespace

    from distill.trainer import Trainer

    resets = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: resets.append(device))
    cuda = SimpleNamespace(device=torch.device("cuda", 0))
    assert Trainer.cuda_peak(cuda, "k") == {"k": 3.0} and len(resets) == 1
    assert Trainer.cuda_peak(cuda, "k", carry=5.0) == {"k": 5.0} and len(resets) == 2
    assert Trainer.cuda_peak(SimpleNamespace(device=torch.device("cpu")), "k", carry=5.0) == {}
    assert len(resets) == 2


@pytest.mark.slow
def test_gpu_rehearsal_script_runs_at_mini_geometry_on_cpu(tmp_path):
    """scripts/gpu_rehearsal.sh with GEOMETRY=mini: every stage exits 0, the export generates, the report is written."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "GEOMETRY": "mini", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(["bash", "scripts/gpu_rehearsal.sh", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "gpu_rehearsal_mini.json").read_text())
    assert set(summary["stages"]) == {"make_model", "ode", "dmd", "infer_export"}
    assert all(s["exit_code"] == 0 for s in summary["stages"].values())
    assert len(summary["dmd_iteration_s"]) == 9 and (tmp_path / "export.mp4").stat().st_size > 0
