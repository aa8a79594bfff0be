"""Inference configs: LightX2V keys, warnings for unknown keys and CFG on a distill schedule, validation rules
(each ValueError names its rule), and the shipped configs under configs/ loading cleanly. No networks."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest

from inference.config import (
    ATTENTION_KEYS,
    IGNORED_KEYS,
    LIGHTX2V_QUANT_SCHEMES,
    UNSUPPORTED_MODEL_CLASSES,
    WAN_NEGATIVE_PROMPT,
    InferConfig,
    LoraSpec,
    config_from_dict,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for d in ("infer/wan", "infer/wan22", "infer/tiny") for p in (REPO / "configs" / d).glob("*.json"))

# Every key of docs/lightx2v_formats.md "Inference JSON" (+ the teacher keys), as a user's file has them.
LIGHTX2V_DISTILL = {
    "infer_steps": 4,
    "denoising_step_list": [1000, 750, 500, 250],
    "sample_shift": 5,
    "enable_cfg": False,
    "sample_guide_scale": 5,
    "target_video_length": 81,
    "target_height": 480,
    "target_width": 832,
    "text_len": 512,
    "fps": 16,
    "seed": 42,
    "lora_configs": [{"path": "a.safetensors", "strength": 0.5}, {"path": "b.safetensors"}],
    "dit_quantized": True,
    "dit_quant_scheme": "int8",
    "cpu_offload": True,
    "self_attn_1_type": "flash_attn3",
    "cross_attn_1_type": "flash_attn2",
    "cross_attn_2_type": "sage_attn2",
    "task": "i2v",
    "model_cls": "wan2.1_distill",
}


def _quiet(fn, *args, **kwargs):
    """Call fn with every warning turned into an error (asserts that it warns about nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


# ---- LightX2V keys -------------------------------------------------------------------------------------
def test_lightx2v_keys_load():
    cfg = _quiet(config_from_dict, LIGHTX2V_DISTILL)
    assert cfg.task == "i2v" and cfg.model_cls == "wan2.1_distill" and cfg.is_distill
    assert cfg.infer_steps == 4 and cfg.denoising_step_list == [1000, 750, 500, 250]
    assert cfg.sample_shift == 5 and cfg.enable_cfg is False and cfg.sample_guide_scale == 5
    assert (cfg.target_video_length, cfg.target_height, cfg.target_width) == (81, 480, 832)
    assert cfg.text_len == 512 and cfg.fps == 16 and cfg.seed == 42
    assert cfg.lora_configs == [LoraSpec("a.safetensors", 0.5), LoraSpec("b.safetensors", 1.0)]
    assert cfg.dit_quantized and cfg.dit_quant_scheme == "int8" and cfg.cpu_offload


def test_defaults_are_the_wan_teacher():
    cfg = InferConfig()
    assert (cfg.task, cfg.infer_steps, cfg.sample_solver, cfg.enable_cfg, cfg.sample_guide_scale) == \
        ("t2v", 50, "unipc", True, 5.0)
    assert (cfg.target_video_length, cfg.target_height, cfg.target_width, cfg.fps) == (81, 480, 832, 16)
    assert cfg.sample_neg_prompt == WAN_NEGATIVE_PROMPT and not cfg.is_distill


def test_unknown_key_warns_naming_it():
    with pytest.warns(UserWarning, match="my_typo_key") as rec:
        cfg = config_from_dict({"infer_steps": 7, "my_typo_key": 1})
    assert cfg.infer_steps == 7
    assert "unknown" in str(rec[0].message)


def test_known_but_unhonoured_lightx2v_keys_warn_naming_them():
    """Keys with no effect here are accepted (LightX2V files load) but never silently: one warning names them.
    Keys that became fields since (offload keys) are fields, not warnings."""
    names = {f.name for f in dataclasses.fields(InferConfig)}
    ignored = [k for k in IGNORED_KEYS if k not in names]
    data = {k: True for k in ignored} | {"_comment": "private keys start with _"}
    with pytest.warns(UserWarning, match="not honoured") as rec:
        cfg = config_from_dict(data)
    assert cfg == InferConfig()
    assert len(rec) == 1 and all(repr(k) in str(rec[0].message) for k in ignored)
    assert "_comment" not in str(rec[0].message)


@pytest.mark.parametrize("key", ATTENTION_KEYS)
@pytest.mark.parametrize("value", ["flash_attn2", "flash_attn3", "sage_attn2", "torch_sdpa", "radial_attn"])
def test_attention_keys_accepted(key, value):
    assert _quiet(config_from_dict, {key: value}) == InferConfig()


def test_unknown_attention_value_warns_naming_key_and_value():
    with pytest.warns(UserWarning, match=r"self_attn_1_type='xformers_magic'"):
        config_from_dict({"self_attn_1_type": "xformers_magic"})


# ---- validation: one rule per ValueError -------------------------------------------------------------
@pytest.mark.parametrize("data, rule", [
    ({"target_video_length": 80}, r"target_video_length must be 4n\+1.*got 80"),
    ({"target_video_length": 0}, r"target_video_length must be 4n\+1"),
    ({"target_height": 472}, r"target_height must be a positive multiple of 16, got 472"),
    ({"target_width": 840}, r"target_width must be a positive multiple of 16, got 840"),
    ({"sample_solver": "dpm++"}, r"sample_solver must be one of \['unipc', 'euler'\], got 'dpm\+\+'"),
    ({"denoising_step_list": [1000, 750, 750, 250]}, r"denoising_step_list must be .*strictly decreasing"),
    ({"denoising_step_list": [250, 500, 750, 1000]}, r"denoising_step_list must be .*strictly decreasing"),
    ({"denoising_step_list": [1200, 750]}, r"must lie in \(0, 1000\]"),
    ({"denoising_step_list": [1000, 0]}, r"must lie in \(0, 1000\]"),
    ({"denoising_step_list": []}, r"denoising_step_list must be a non-empty"),
    ({"task": "flf2v"}, r"task must be one of"),
    ({"model_cls": "wan3.0"}, r"model_cls must be one of"),
    ({"distill_update": "ddim", "denoising_step_list": [1000, 500]}, r"distill_update must be one of"),
    ({"infer_steps": 0}, r"infer_steps must be >= 1"),
    ({"sample_shift": 0}, r"sample_shift must be > 0"),
    ({"sample_guide_scale": -1}, r"sample_guide_scale must be >= 0"),
    ({"dit_quantized": True, "dit_quant_scheme": "int4"}, r"dit_quant_scheme must be one of"),
    ({"dtype": "fp64"}, r"dtype must be one of"),
])
def test_invalid_values_name_the_rule(data, rule):
    with pytest.raises(ValueError, match=rule):
        config_from_dict({"enable_cfg": False, **data})


def test_replace_validates_and_rejects_unknown_fields():
    cfg = InferConfig()
    assert cfg.replace(infer_steps=8).infer_steps == 8 and cfg.infer_steps == 50
    with pytest.raises(ValueError, match="target_height must be a positive multiple of 16"):
        cfg.replace(target_height=100)
    with pytest.raises(ValueError, match=r"unknown inference option\(s\): \['steps'\]"):
        cfg.replace(steps=4)


# ---- distill specifics ---------------------------------------------------------------------------------
def test_cfg_on_with_distill_list_warns_about_blur():
    with pytest.warns(UserWarning, match="blur"):
        cfg = config_from_dict({"denoising_step_list": [1000, 750, 500, 250], "enable_cfg": True})
    assert cfg.enable_cfg  # a warning, not a silent change: the user may want it


@pytest.mark.parametrize("steps", [[1000, 750, 500, 250], [1000, 500], [999, 800, 600, 400, 200, 100]])
def test_infer_steps_follows_denoising_step_list(steps):
    cfg = _quiet(config_from_dict, {"infer_steps": 50, "denoising_step_list": steps, "enable_cfg": False})
    assert cfg.infer_steps == len(steps)
    assert _quiet(cfg.replace, denoising_step_list=[1000, 500, 250]).infer_steps == 3


def test_distill_list_items_become_ints():
    cfg = _quiet(config_from_dict, {"denoising_step_list": [1000.0, 750.0], "enable_cfg": False})
    assert cfg.denoising_step_list == [1000, 750] and all(type(d) is int for d in cfg.denoising_step_list)


# ---- files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO / "configs")) for p in SHIPPED])
def test_shipped_configs_load_without_warnings(path):
    cfg = _quiet(load_config, path)
    data = json.loads(path.read_text())
    for key in ("task", "infer_steps", "enable_cfg", "target_video_length", "sample_shift"):
        if key in data:
            assert getattr(cfg, key) == data[key], key
    if cfg.model_cls == "wan2.1_distill":
        folder = REPO / cfg.model_path if cfg.model_path else None
        if not cfg.is_distill:  # an exported student: its folder carries the schedule (inference/schedule.py)
            if folder is None or not folder.is_dir():  # a folder a command makes (the int8 converter's output)
                return
            from inference.loader import with_folder_schedule

            cfg = with_folder_schedule(cfg, folder)
        assert cfg.is_distill and not cfg.enable_cfg and cfg.infer_steps == len(cfg.denoising_step_list)


def test_shipped_configs_exist():
    names = {p.relative_to(REPO / "configs").as_posix() for p in SHIPPED}
    assert {"infer/wan/wan_t2v.json", "infer/wan/wan_i2v.json", "infer/wan/wan_t2v_distill_4step_cfg.json",
            "infer/wan/wan_i2v_distill_4step_cfg.json"} <= names


def test_shipped_teacher_and_distill_values():
    """The baselines of docs/lightx2v_formats.md: T2V 50 steps / guide 6 / shift 8; I2V 40 / 5 / 3; distill 4 steps,
    no CFG."""
    t2v = load_config(REPO / "configs/infer/wan/wan_t2v.json")
    i2v = load_config(REPO / "configs/infer/wan/wan_i2v.json")
    assert (t2v.infer_steps, t2v.sample_guide_scale, t2v.sample_shift, t2v.enable_cfg) == (50, 6, 8, True)
    assert (i2v.infer_steps, i2v.sample_guide_scale, i2v.sample_shift, i2v.task) == (40, 5, 3, "i2v")
    for name in ("wan_t2v_distill_4step_cfg.json", "wan_i2v_distill_4step_cfg.json"):
        d = load_config(REPO / "configs/infer/wan" / name)
        assert d.denoising_step_list == [1000, 750, 500, 250] and d.infer_steps == 4 and not d.enable_cfg


def test_load_config_overrides_win_and_none_is_unset(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"seed": 1, "task": "t2v", "infer_steps": 9}))
    cfg = load_config(path, seed=7, task=None)
    assert (cfg.seed, cfg.task, cfg.infer_steps) == (7, "t2v", 9)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="inference config not found: .*nope.json"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{infer_steps: 4")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_config(bad)


# ---- the typed schema (issue 15 item 5): JSON types checked against the dataclass annotations ------------------
@pytest.mark.parametrize("data, named", [
    ({"target_video_length": "17"}, r"target_video_length = '17' \(str\).*must be an integer.*without quotes"),
    ({"infer_steps": "4"}, r"infer_steps = '4' \(str\)"),
    ({"seed": "abc"}, r"seed = 'abc' \(str\).*must be an integer"),
    ({"sample_shift": "5"}, r"sample_shift = '5' \(str\).*must be a number"),
    ({"enable_cfg": "false"}, r"enable_cfg = 'false' \(str\).*true or false.*without quotes"),
    ({"enable_cfg": 0}, r"enable_cfg = 0 \(int\)"),
    ({"infer_steps": True}, r"infer_steps = True \(bool\)"),
    ({"infer_steps": 4.5}, r"infer_steps = 4.5 \(float\)"),
    ({"sample_guide_scale": float("nan")}, r"sample_guide_scale = nan .*finite"),
    ({"denoising_step_list": [1000, "750"]}, r"denoising_step_list\[1\] = '750' \(str\)"),
    ({"lora_configs": [{"path": "a.safetensors", "strenght": 1.0}]}, r"lora_configs\[0\]\.strenght = 1\.0"),
    ({"lora_configs": [{"path": "a.safetensors", "strength": "1"}]}, r"lora_configs\[0\]\.strength = '1'"),
    ({"lora_configs": [{"strength": 1.0}]}, r"lora_configs\[0\]\.path is missing in \{.strength.: 1\.0\}"),
    ({"lora_configs": {"path": "a.safetensors"}}, r"lora_configs = \{'path'.*must be a list \(of \{path: a string"),
    ({"lora_configs": [{"path": "a", "strength": float("inf")}]}, r"lora_configs\[0\]\.strength = inf"),
    ({"model_path": 3}, r"model_path = 3 \(int\).*must be a string or null"),
])
def test_wrong_json_types_name_key_value_and_expected_type(data, named):
    with pytest.raises(ValueError, match=named):
        config_from_dict({"enable_cfg": False, **data} if "enable_cfg" not in data else data)


def test_types_also_checked_on_replace_and_construction():
    with pytest.raises(ValueError, match=r"infer_steps = '8' \(str\)"):
        InferConfig().replace(infer_steps="8")
    with pytest.raises(ValueError, match=r"seed = None"):
        InferConfig(seed=None)


def test_numbers_normalised_not_refused():
    cfg = _quiet(config_from_dict, {"sample_shift": 5, "sample_guide_scale": 6, "seed": 7.0, "enable_cfg": False})
    assert type(cfg.sample_shift) is float and cfg.sample_shift == 5.0 and type(cfg.seed) is int and cfg.seed == 7
    spec = _quiet(config_from_dict, {"lora_configs": [{"path": "a", "strength": 1}]}).lora_configs[0]
    assert spec == LoraSpec("a", 1.0) and type(spec.strength) is float


@pytest.mark.parametrize("seed", [-1, 2**63])
def test_seed_out_of_range(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        config_from_dict({"seed": seed})


@pytest.mark.parametrize("body", ["[1, 2]", '"abc"', "null"])
def test_config_file_that_is_not_an_object(tmp_path, body):
    path = tmp_path / "c.json"
    path.write_text(body)
    with pytest.raises(ValueError, match=r"c\.json: an inference config must be a JSON object"):
        load_config(path)


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes(b'{"sample_neg_prompt": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"latin\.json is not UTF-8"):
        load_config(path)


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "typed.json"
    path.write_text(json.dumps({"infer_steps": "4"}))
    with pytest.raises(ValueError, match=r"typed\.json: config key infer_steps"):
        load_config(path)


# ---- LightX2V model classes and quant scheme names (issue 13 item 5) ------------------------------------------
@pytest.mark.parametrize("name", sorted(UNSUPPORTED_MODEL_CLASSES))
def test_other_lightx2v_wan_model_classes_refused_with_what_they_are(name):
    with pytest.raises(ValueError, match=rf"model_cls '{name}' \(.+\) is a LightX2V model class .* supported"):
        config_from_dict({"model_cls": name})


@pytest.mark.parametrize("name, ours", sorted(LIGHTX2V_QUANT_SCHEMES.items()))
def test_lightx2v_quant_scheme_names_map_to_ours(name, ours):
    cfg = _quiet(config_from_dict, {"dit_quantized": True, "dit_quant_scheme": name})
    assert cfg.dit_quant_scheme == ours


def test_lightx2v_quant_scheme_table():
    assert LIGHTX2V_QUANT_SCHEMES["int8-vllm"] == "int8" and LIGHTX2V_QUANT_SCHEMES["fp8-sgl"] == "fp8"
    assert LIGHTX2V_QUANT_SCHEMES["fp8-q8f"] == "fp8" and LIGHTX2V_QUANT_SCHEMES["int8-q8f"] == "int8"
    for name in ("nvfp4", "mxfp4", "fp8-per-block"):  # other layouts: refused, naming the accepted names
        rule = r"dit_quant_scheme must be one of \['int8', 'fp8'\], got .*map onto them.*int8-vllm"
        with pytest.raises(ValueError, match=rule):
            config_from_dict({"dit_quantized": True, "dit_quant_scheme": name})


def test_python_side_values_normalised_like_json():
    """Training code hands over OmegaConf lists and numpy / torch scalars: the same values as JSON would carry."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    steps = OmegaConf.create({"s": [1000, 750]}).s
    cfg = _quiet(InferConfig, denoising_step_list=steps, enable_cfg=False, seed=np.int64(3),
                 sample_shift=torch.tensor(5.0), target_video_length=np.int32(17))
    assert cfg.denoising_step_list == [1000, 750] and type(cfg.denoising_step_list) is list
    assert (cfg.seed, cfg.sample_shift, cfg.target_video_length) == (3, 5.0, 17)
    assert type(cfg.seed) is int and type(cfg.sample_shift) is float
    with pytest.raises(ValueError, match=r"seed = .*'abc'.*must be an integer"):
        InferConfig(seed=np.str_("abc"))
