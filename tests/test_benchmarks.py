"""Command-line helpers of the benchmarks (benchmarks/quality.py, benchmarks/shape_labels.py)."""

import pytest

from benchmarks.quality import parse_spec, pick_prompts
from data.shapes import PROMPTS


def test_parse_spec_overrides_with_json_lists():
    spec = parse_spec("a.json:sample_guide_interval=[300, 850],infer_steps=4,enable_cfg=false,model_path=runs/x")
    assert spec.path == "a.json"
    assert spec.overrides == {"sample_guide_interval": [300, 850], "infer_steps": 4, "enable_cfg": False,
                              "model_path": "runs/x"}
    assert parse_spec("a.json").overrides == {}
    with pytest.raises(ValueError, match="not key=value"):
        parse_spec("a.json:infer_steps")


def test_pick_prompts_spreads_over_the_world():
    assert pick_prompts(200) == list(PROMPTS)
    some = pick_prompts(6)
    assert len(set(some)) == 6 and some[0] == PROMPTS[0] and some[-1] == PROMPTS[-1]


def test_shape_labels_check_and_sheets(tmp_path):
    """benchmarks/shape_labels.py on ground-truth clips: the evaluator agrees with correct labels, the first
    version's box rule misses ragged squares, bad label files are refused, sheets are written."""
    import numpy as np

    from benchmarks.shape_labels import CONFIGS, box_template_shape, check, write_sheets
    from data.shapes import ShapesWorld, parse_prompt
    from tests.test_shapes import _defect

    world, rng = ShapesWorld(9, 48, 48), np.random.default_rng(0)
    prompts = PROMPTS[::8]  # 12 prompts, every shape
    items = [{**CONFIGS[0], "prompt": p, "tile": i, "frames": world.render(p, i)} for i, p in enumerate(prompts)]
    labels = {str(it["tile"]): parse_prompt(it["prompt"])[1] for it in items}
    table = check(items, labels)
    assert "| evaluator (area + centroid template IoU) | `all` | 100.0% | 12 |" in table
    assert "Labels equal to the prompt's shape: 12 of 12 tiles (0 unclear)" in table
    ragged = _defect(world.render("a red square moving left", 0), "ragged", rng)
    assert box_template_shape(ragged) == "circle"  # why the rule was replaced (docs/results.md, "Reading shapes")
    with pytest.raises(ValueError, match="missing tiles"):
        check(items, {k: v for k, v in labels.items() if k != "3"})
    with pytest.raises(ValueError, match="unknown values"):
        check(items, {**labels, "0": "star"})
    paths = write_sheets(items, tmp_path / "s")
    assert [p.name for p in paths] == ["s_sheet0.png"] and paths[0].stat().st_size > 0
