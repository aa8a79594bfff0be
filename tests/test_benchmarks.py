"""Command-line helpers of the benchmarks (benchmarks/quality.py)."""

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
