"""The student schedule (inference/schedule.py): grid values, validation, the file an export writes."""

from __future__ import annotations

import json

import pytest
import torch

from inference.schedule import SCHEDULE_FILE, StudentSchedule, read_schedule, write_schedule
from inference.schedulers import DistillScheduler


def test_default_grid_is_the_warped_lightx2v_list() -> None:
    sch = StudentSchedule()
    # shift 5: s' = 5 s / (1 + 4 s) at s = 1, 0.75, 0.5, 0.25
    expected = torch.tensor([1.0, 0.9375, 5 * 0.5 / 3.0, 5 * 0.25 / 2.0, 0.0])
    torch.testing.assert_close(sch.sigmas(), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(sch.timesteps(), 1000 * expected[:-1], rtol=1e-7, atol=1e-4)
    assert sch.num_steps == 4 and sch.update == "lcm" and sch.trained_with == "lcm"


def test_shift_one_is_the_plain_list() -> None:
    sch = StudentSchedule((1000, 500), shift=1)
    assert sch.sigmas().tolist() == [1.0, 0.5, 0.0]
    assert sch.timesteps().tolist() == [1000.0, 500.0]


@pytest.mark.parametrize("steps, match", [
    ([], "non-empty"), ("1000", "non-empty"), ([1000, 1000], "strictly decreasing"), ([500, 750], "strictly"),
    ([1001], r"\(0, 1000\]"), ([0], r"\(0, 1000\]"), ([1000, 937.5], "integers"), ([True], "integers"),
])
def test_bad_step_lists_name_the_rule(steps, match) -> None:
    with pytest.raises(ValueError, match=match):
        StudentSchedule(steps)


@pytest.mark.parametrize("shift", [0, -1, float("inf"), float("nan"), "5", True])
def test_bad_shift(shift) -> None:
    with pytest.raises(ValueError, match="shift"):
        StudentSchedule(shift=shift)


def test_bad_update() -> None:
    with pytest.raises(ValueError, match="update must be one of"):
        StudentSchedule(update="ddim")


def test_file_round_trip_and_errors(tmp_path) -> None:
    sch = StudentSchedule((1000, 500), shift=3.0, update="lcm")
    assert read_schedule(tmp_path) is None
    write_schedule(tmp_path, sch)
    assert read_schedule(tmp_path) == sch
    (tmp_path / SCHEDULE_FILE).write_text(json.dumps({"denoising_step_list": [10, 20]}))
    with pytest.raises(ValueError, match="not a valid student schedule.*strictly decreasing"):
        read_schedule(tmp_path)


def test_same_timesteps_ignores_the_update_rule() -> None:
    a = StudentSchedule()
    assert a.same_timesteps(a.replace(update="lcm"))
    assert not a.same_timesteps(a.replace(shift=3.0))
    assert not a.same_timesteps(a.replace(denoising_step_list=(1000, 500)))


def test_distill_scheduler_uses_the_schedule_grid() -> None:
    sch = StudentSchedule((1000, 700, 300), shift=4.0, update="lcm")
    sched = DistillScheduler.from_schedule(sch)
    assert sched.mode == "lcm"
    assert torch.equal(sched.sigmas, sch.sigmas()) and torch.equal(sched.timesteps, sch.timesteps())
    assert DistillScheduler.from_schedule(sch, mode="euler").mode == "euler"


# ---- the schedule travels with an exported student folder (inference/loader.py) -------------------------------
def _student_folder(tmp_path, schedule: StudentSchedule | None):
    from models.components import make_tiny_model
    from tests.conftest import SMALL_DIT

    folder = make_tiny_model(tmp_path / "student", "tiny-t2v", seed=0, **SMALL_DIT)
    if schedule is not None:
        write_schedule(folder, schedule)
    return folder


def test_config_without_schedule_adopts_the_folders(tmp_path) -> None:
    from inference.config import InferConfig
    from inference.loader import config_for_folder, with_folder_schedule

    folder = _student_folder(tmp_path, StudentSchedule((1000, 500), shift=3.0, update="euler"))
    cfg = with_folder_schedule(InferConfig(model_path=str(folder)), folder)
    assert cfg.is_distill and cfg.model_cls == "wan2.1_distill" and not cfg.enable_cfg
    assert cfg.schedule() == StudentSchedule((1000, 500), shift=3.0, update="euler")
    assert cfg.infer_steps == 2
    assert config_for_folder(folder).task == "t2v"


def test_config_schedule_that_differs_from_the_folders_is_an_error_naming_both(tmp_path) -> None:
    from inference.config import InferConfig
    from inference.loader import with_folder_schedule

    folder = _student_folder(tmp_path, StudentSchedule())
    cfg = InferConfig(model_cls="wan2.1_distill", denoising_step_list=[1000, 500], enable_cfg=False)
    with pytest.raises(ValueError, match=r"\[1000, 500\].*\[1000, 750, 500, 250\]"):
        with_folder_schedule(cfg, folder)
    same = InferConfig(model_cls="wan2.1_distill", denoising_step_list=[1000, 750, 500, 250], distill_update="euler",
                       enable_cfg=False)
    assert with_folder_schedule(same, folder).distill_update == "euler"  # the update rule is the user's choice


def test_distill_model_cls_without_any_schedule_names_the_fix(tmp_path) -> None:
    from inference.config import InferConfig
    from inference.loader import with_folder_schedule

    folder = _student_folder(tmp_path, None)
    with pytest.raises(ValueError, match="needs the student's schedule.*denoising_step_list"):
        with_folder_schedule(InferConfig(model_cls="wan2.1_distill"), folder)
