"""Sampling during training under the sharded engines (slow: two processes each): the generator is gathered by
the engine (a collective on every rank), rank 0 samples it on its device in the training dtype; the run goes on
to its checkpoint and export."""

from __future__ import annotations

import pytest

from tests.test_engines import dmd_args, launch_engine


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_sharded_engine_samples_during_training_and_before_export(engine, tmp_path, tiny_t2v_dir):
    run = tmp_path / "run"
    launch_engine(engine, dmd_args(tiny_t2v_dir, run, "max_steps=2", "logging.sample_every=1",
                                   "logging.sample_prompts=['a red circle moving left']"), tmp_path)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step0000001_0.mp4", "step0000002_0.mp4"]
    events = (run / "events.log").read_text()
    assert events.count("sample sample_0:") == 3  # steps 1 and 2, then once more before the export
    assert (run / "model" / "distill_models" / "distill_model.safetensors").is_file()
