"""benchmarks/bad_inputs.py: the catalogue runner judges cases right, and every catalogued bad input gets a clear
error (the whole catalogue runs in a few seconds: one torch import, networks loaded only by the cases that reach
them)."""

from __future__ import annotations

from benchmarks.bad_inputs import CASES, BadInput, judge, main, run_cases


def test_runner_judges_clear_and_unclear_errors(tmp_path):
    picked = [c for c in CASES if c.name in ("config a JSON list", "frames beyond the limit")]
    wrong = BadInput("expects another message", ("infer.py", "--config", "{tmp}/list.json", "--prompt", "p",
                                                 "--save_result_path", "{tmp}/o.mp4"), "something else")
    rows = run_cases([*picked, wrong], tmp_path)
    assert [(r["name"], r["clear"]) for r in rows] == [("config a JSON list", True), ("frames beyond the limit", True),
                                                        ("expects another message", False)]
    assert "{tmp}" in rows[2]["message"] and str(tmp_path) not in rows[2]["message"]


def test_judge_needs_failure_message_and_no_traceback():
    case = BadInput("x", ("infer.py",), "Named Problem")
    assert judge(case, True, "error: the named problem")  # case-insensitive
    assert not judge(case, False, "error: the named problem")  # it did not fail
    assert not judge(case, True, "Traceback (most recent call last):\nValueError: named problem")
    assert not judge(case, True, "error: something else")


def test_case_names_are_unique_per_entry_point():
    keys = [(c.command[0], c.name) for c in CASES]
    assert len(keys) == len(set(keys))


def test_every_catalogued_bad_input_gets_a_clear_error(tmp_path, capsys):
    summary = main(["--out", str(tmp_path / "bad")])
    unclear = [(r["name"], r["message"]) for r in summary["cases"] if not r["clear"]]
    assert not unclear and summary["clear"] == summary["total"] == len(CASES)
    assert f"clear error {len(CASES)} of {len(CASES)}" in capsys.readouterr().out
