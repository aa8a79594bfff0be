"""benchmarks/data_scale.py: the planned real figures follow from the model sizes; a small run of the whole
benchmark (slow) writes its tables and keeps the trainer's memory flat across prompt-list sizes."""

from __future__ import annotations

import json

import pytest

from benchmarks import data_scale
from models.registry import get_spec


def test_real_text_figures_follow_the_umt5_xxl_size():
    r = data_scale.real_text(tokens=128, tflops=400.0)
    dim = get_spec("wan2.1-t2v-14b").text_encoder["dim"]
    assert r["bytes_per_prompt"] == 128 * dim * 2 + 12  # bf16 rows of the real tokens + 12 bytes of index
    # a forward is ~2 FLOPs per weight and token outside the embedding table (4.63 B of umT5-XXL's 5.68 B)
    assert 2 * 4.63e9 * 128 < r["tflop_per_prompt"] * 1e12 < 1.1 * 2 * 4.63e9 * 128
    assert r["prompts_per_s_per_gpu"] == pytest.approx(400e12 / (r["tflop_per_prompt"] * 1e12))


def test_synthetic_prompts_are_distinct_and_repeatable():
    a, b = data_scale.synthetic_prompts(500), data_scale.synthetic_prompts(500)
    assert a == b and len(set(a)) == 500


@pytest.mark.slow
def test_small_run_writes_tables_and_memory_stays_flat(tmp_path):
    out = tmp_path / "ds"
    assert data_scale.main(["--out", str(out), "--prompts", "2000", "--small", "200", "--steps", "3"]) == 0
    r = json.loads(out.with_suffix(".json").read_text())
    assert r["encode"]["prompts"] == 2001 and r["rss"]["large"]["prompts"] == 2000
    assert abs(r["rss"]["difference_step3_mb"]) < data_scale.LIMIT_MB
    assert "prompts/s" in out.with_suffix(".md").read_text()
