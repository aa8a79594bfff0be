"""A catalogue of bad inputs, each expected to end in a clear error: "clear error N of M".

    python -m benchmarks.bad_inputs [--out benchmarks/results/bad_inputs] [--only infer.py|HTTP|train.py]

Each entry of `CASES` is a `BadInput(name, command, expect)`:
- `command` is an entry point and its arguments, run in this process (one torch import for all):
  `("infer.py", "--config", ...)`, `("train.py", ...)`, or any module with `main(argv)`; or an HTTP request to a
  loopback server on the tiny T2V student, `("HTTP", method, path, body)` (body: raw text, usually JSON).
- `{tmp}` in any argument is the folder of files made by `make_fixtures` (bad configs, a non-image, a truncated
  LoRA, ...); `{inputs}` is the server's --input_dir inside it.
- `expect` is a piece of text the error must contain (case-insensitive).

A case counts as a clear error when the command fails (non-zero exit / HTTP 4xx), prints no Python traceback, and
its message contains `expect`. To add cases (e.g. for training), append `BadInput`s to `CASES` and, if they need
files, write them in `make_fixtures`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

T2V = "configs/infer/tiny/t2v_distill_4step.json"
I2V = "configs/infer/tiny/i2v_distill_4step.json"
TEACHER = "configs/infer/tiny/t2v_teacher.json"
P = "a red circle moving left"


@dataclass(frozen=True)
class BadInput:
    name: str
    command: tuple[str, ...]
    expect: str


def infer(name: str, expect: str, *args: str, config: str = T2V, out: tuple[str, ...] | None = None) -> BadInput:
    """An infer.py case with the usual prompt and output unless given."""
    out = out if out is not None else ("--save_result_path", "{tmp}/out/" + name.replace(" ", "_") + ".mp4")
    has_prompt = any(a in ("--prompt", "--prompt_file") for a in args)
    return BadInput(name, ("infer.py", "--config", config, *(() if has_prompt else ("--prompt", P)), *args, *out),
                    expect)


def http(name: str, expect: str, body: dict[str, Any] | str, method: str = "POST",
         path: str = "/v1/tasks/video/") -> BadInput:
    text = body if isinstance(body, str) else json.dumps(body)
    return BadInput(name, ("HTTP", method, path, text), expect)


def train(name: str, expect: str, *args: str, config: str = "configs/train/tiny/t2v_dmd.yaml") -> BadInput:
    """A train.py case (run_dir inside the fixtures, so nothing outside them is written)."""
    run = ("run_dir={tmp}/runs/" + name.replace(" ", "_"),) if not any(a.startswith("run_dir=") for a in args) else ()
    return BadInput(name, ("train.py", "--config", config, *run, *args), expect)


CASES: list[BadInput] = [
    # ---- infer.py: the config file
    infer("config missing", "inference config not found", config="{tmp}/nope.json"),
    infer("config not JSON", "is not valid JSON", config="{tmp}/garbled.json"),
    infer("config a JSON list", "must be a JSON object", config="{tmp}/list.json"),
    infer("config not UTF-8", "not UTF-8", config="{tmp}/latin1.json"),
    infer("frames as a string", "target_video_length = '17'", config="{tmp}/frames_str.json"),
    infer("steps as a string", "infer_steps = '4'", config="{tmp}/steps_str.json"),
    infer("seed not a number", "seed = 'abc'", config="{tmp}/seed_str.json"),
    infer("shift as a string", "sample_shift = '5'", config="{tmp}/shift_str.json"),
    infer("boolean as a string", "enable_cfg = 'false'", config="{tmp}/cfg_str.json"),
    infer("bad key in lora_configs", "lora_configs[0].strenght", config="{tmp}/lora_key.json"),
    infer("frames not 4n+1", "target_video_length must be 4n+1", config="{tmp}/frames16.json"),
    infer("height not a multiple of 16", "target_height must be a positive multiple of 16",
          config="{tmp}/height100.json"),
    infer("quant scheme unknown", "dit_quant_scheme must be one of", config="{tmp}/nvfp4.json"),
    infer("distill schedule on base weights", "base (teacher) weights", config="{tmp}/distill_on_base.json"),
    # ---- infer.py: arguments
    infer("model_cls of another model", "model_cls 'wan2.1_vace'", "--model_cls", "wan2.1_vace"),
    infer("model_cls unknown", "model_cls must be one of", "--model_cls", "wan3"),
    infer("lora strength nan", "--lora_strength: must be a finite number", "--lora_path", "{tmp}/lora_cut.safetensors",
          "--lora_strength", "nan"),
    infer("lora strength inf", "--lora_strength: must be a finite number", "--lora_path", "{tmp}/lora_cut.safetensors",
          "--lora_strength", "inf"),
    infer("seed negative", "seed must be an integer in [0, 2**63)", "--seed", "-1"),
    infer("seed not an integer", "--seed: invalid int value", "--seed", "1.5"),
    infer("batch size 0", "--batch_size: must be >= 1", "--prompt_file", "{tmp}/prompts.txt", "--batch_size", "0",
          out=("--output_dir", "{tmp}/out/batch0")),
    infer("prompt file missing", "prompt file not found", "--prompt_file", "{tmp}/none.txt",
          out=("--output_dir", "{tmp}/out/pf_missing")),
    infer("prompt file not UTF-8", "prompts_latin1.txt is not UTF-8", "--prompt_file", "{tmp}/prompts_latin1.txt",
          out=("--output_dir", "{tmp}/out/pf_latin1")),
    infer("prompt file empty", "is empty", "--prompt_file", "{tmp}/empty.txt", out=("--output_dir", "{tmp}/out/pf0")),
    infer("prompt file a directory", "is a directory", "--prompt_file", "{tmp}/a_folder",
          out=("--output_dir", "{tmp}/out/pfdir")),
    infer("blank prompt", "non-whitespace", "--prompt", "   "),
    infer("image on a T2V config", "--image_path is for image-to-video", "--image_path", "{tmp}/frame.png"),
    infer("I2V without an image", "i2v needs --image_path", config=I2V),
    infer("image missing", "image not found", "--image_path", "{tmp}/none.png", config=I2V),
    infer("image not a picture", "not a picture format", "--image_path", "{tmp}/notimage.png", config=I2V),
    infer("image truncated", "cannot read", "--image_path", "{tmp}/cut.png", config=I2V),
    infer("image a directory", "is a directory", "--image_path", "{tmp}/a_folder", config=I2V),
    infer("image path with a NUL byte", "NUL byte", "--image_path", "{tmp}/a\x00b.png", config=I2V),
    infer("output extension", "--save_result_path must end in one of", out=("--save_result_path", "{tmp}/o.avi")),
    infer("output path a directory", "is a directory", out=("--save_result_path", "{tmp}/folder.mp4")),
    infer("output folder a file", "is a file, not a folder", out=("--save_result_path", "{tmp}/plain/o.mp4")),
    infer("output path with a NUL byte", "NUL byte", out=("--save_result_path", "{tmp}/o\x00.mp4")),
    infer("earlier run in output_dir", "already holds an earlier run", "--prompt_file", "{tmp}/prompts.txt",
          out=("--output_dir", "{tmp}/earlier_run")),
    infer("model folder missing", "model folder not found", "--model_path", "{tmp}/no_model"),
    infer("distill weights truncated", "distill_model.safetensors is truncated", "--model_path", "{tmp}/cut_model"),
    infer("LoRA file missing", "LoRA file not found", "--lora_path", "{tmp}/none.safetensors"),
    infer("LoRA file truncated", "lora_cut.safetensors is truncated", "--lora_path", "{tmp}/lora_cut.safetensors"),
    infer("I2V config on a T2V model", "does not match the DiT", "--model_path", "checkpoints/tiny-t2v-distill-4step",
          "--image_path", "{tmp}/frame.png", config=I2V),
    # ---- train.py
    train("training config missing", "not found", config="{tmp}/nope.yaml"),
    train("training YAML garbled", "is not valid YAML", config="{tmp}/garbled.yaml"),
    train("training YAML a list", "must be a mapping of keys", config="{tmp}/list.yaml"),
    train("training key unknown", "max_stepz", "max_stepz=10"),
    train("training value of the wrong type", "max_steps", "max_steps=abc"),
    train("training seed negative", "seed must be in [0, 2**32 - 1]", "seed=-1"),
    train("training max_update negative", "optim.max_update must be >= 0", "optim.max_update=-1"),
    train("training step list not decreasing", "strictly decreasing", "distill.denoising_step_list=[250,500]"),
    train("training checkpoints path a file", "exists and is a file", "run_dir={tmp}/ckfile_run"),
    train("teacher weights truncated", "(model.path) is not a complete safetensors file",
          "model.path={tmp}/cut_teacher"),
    # ---- the HTTP server
    http("frames beyond the limit", "--max_frames", {"prompt": P, "target_video_length": 100001}),
    http("frames not 4n+1", "4n+1", {"prompt": P, "target_video_length": 6}),
    http("area beyond the limit", "--max_pixels", {"prompt": P, "target_height": 4096, "target_width": 4096}),
    http("prompt beyond the limit", "--max_prompt_chars", {"prompt": "a" * 5000}),
    http("body beyond the limit", "--max_body_bytes", {"prompt": "a" * (25 * 2**20)}),
    http("no prompt", "field required", {"seed": 1}),
    http("blank prompt", "non-whitespace", {"prompt": "  "}),
    http("seed not a number", "valid integer", {"prompt": P, "seed": "abc"}),
    http("seed negative", "greater than or equal to 0", {"prompt": P, "seed": -1}),
    http("steps on a distill model", "denoising_step_list", {"prompt": P, "infer_steps": 8}),
    http("lora strength not a number", "valid number", {"prompt": P, "lora_strength": "strong"}),
    http("save path extension", "extension must be one of", {"prompt": P, "save_result_path": "a.txt"}),
    http("save path ..", "must not contain '..'", {"prompt": P, "save_result_path": "../a.mp4"}),
    http("save path NUL byte", "NUL byte", {"prompt": P, "save_result_path": "a\x00.mp4"}),
    http("save path outside", "leads outside", {"prompt": P, "save_result_path": "/etc/a.mp4"}),
    http("image on a T2V server", "this server runs t2v", {"prompt": P, "image_path": "frame.png"}),
    http("lora_name with a path", "must be a file name", {"prompt": P, "lora_name": "../x"}),
    http("body not JSON", "JSON decode error", "{prompt: oops"),
    http("body a JSON list", "valid dictionary", json.dumps([P])),
    http("unknown task", "unknown task id", "", method="GET", path="/v1/tasks/nope/status"),
    http("cancel unknown task", "unknown task id", "", method="DELETE", path="/v1/tasks/nope"),
]


# ---- files the cases refer to ---------------------------------------------------------------------------------
def _config(tmp: Path, name: str, base: str = T2V, **changes: Any) -> None:
    data = json.loads(Path(base).read_text())  # model_path stays relative (to the repository root)
    (tmp / name).write_text(json.dumps({**data, **changes}))


def _png(path: Path, size: int = 48) -> bytes:
    import imageio.v2 as imageio
    import numpy as np

    rng = np.random.default_rng(0)
    imageio.imwrite(path, rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    return path.read_bytes()


def make_fixtures(tmp: Path) -> None:
    """Write every file the cases refer to under `tmp`."""
    (tmp / "out").mkdir()
    (tmp / "garbled.yaml").write_text("task: [pretrain\n  lr: :\n")
    (tmp / "list.yaml").write_text("- task: pretrain\n")
    (tmp / "ckfile_run").mkdir()
    (tmp / "ckfile_run" / "checkpoints").write_text("not a folder")
    shutil.copytree("checkpoints/tiny-t2v-teacher", tmp / "cut_teacher")
    teacher = tmp / "cut_teacher" / "diffusion_pytorch_model.safetensors"
    teacher.write_bytes(teacher.read_bytes()[:1000])
    (tmp / "garbled.json").write_text('{"infer_steps": 4,')
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "latin1.json").write_bytes(b'{"sample_neg_prompt": "caf\xe9"}')
    for name, changes in {"frames_str": {"target_video_length": "17"}, "steps_str": {"infer_steps": "4"},
                          "seed_str": {"seed": "abc"}, "shift_str": {"sample_shift": "5"},
                          "cfg_str": {"enable_cfg": "false"}, "frames16": {"target_video_length": 16},
                          "lora_key": {"lora_configs": [{"path": "a.safetensors", "strenght": 1.0}]},
                          "height100": {"target_height": 100},
                          "nvfp4": {"dit_quantized": True, "dit_quant_scheme": "nvfp4"}}.items():
        _config(tmp, f"{name}.json", **changes)
    # a LightX2V distill JSON (no model_cls) on the teacher's folder: base weights under a 4-step schedule
    _config(tmp, "distill_on_base.json", base=TEACHER, denoising_step_list=[1000, 750, 500, 250], enable_cfg=False)
    (tmp / "prompts.txt").write_text(f"{P}\na blue square moving up\n")
    (tmp / "prompts_latin1.txt").write_bytes("un cercle rouge, caf\xe9\n".encode("latin-1"))
    (tmp / "empty.txt").write_text("\n  \n")
    (tmp / "a_folder").mkdir()
    (tmp / "folder.mp4").mkdir()
    (tmp / "loras").mkdir()
    (tmp / "plain").write_text("a file")
    (tmp / "notimage.png").write_text("this is text, not a picture")
    data = _png(tmp / "frame.png")
    (tmp / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp / "earlier_run").mkdir()
    (tmp / "earlier_run" / "prompts.jsonl").write_text('{"index": 0}\n')
    shutil.copytree("checkpoints/tiny-t2v-distill-4step", tmp / "cut_model")
    weights = tmp / "cut_model" / "distill_models" / "distill_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    lora = Path("checkpoints/tiny-t2v-distill-lora-r64.safetensors").read_bytes()
    (tmp / "lora_cut.safetensors").write_bytes(lora[: len(lora) // 2])
    (tmp / "inputs").mkdir()
    (tmp / "inputs" / "frame.png").write_bytes(data)


# ---- running them ---------------------------------------------------------------------------------------------
def run_cli(command: tuple[str, ...]) -> tuple[bool, str]:
    """(failed, output) of `module.main(argv)` run here; an uncaught exception counts as failed with a traceback."""
    module = importlib.import_module(Path(command[0]).stem)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = module.main(list(command[1:]))
        except SystemExit as e:
            rc = e.code
        except Exception:  # noqa: BLE001 - an escaped exception is what this benchmark looks for
            traceback.print_exc()
            rc = 1
    return rc not in (0, None), out.getvalue()


def run_http(client, command: tuple[str, ...]) -> tuple[bool, str]:
    _, method, path, body = command
    r = client.request(method, path, content=body.encode(), headers={"Content-Type": "application/json"})
    return 400 <= r.status_code < 500, f"HTTP {r.status_code}: {r.text[:300]}"


def judge(case: BadInput, failed: bool, output: str) -> bool:
    return failed and "Traceback" not in output and case.expect.lower() in output.lower()


def first_error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    pick = next((ln for ln in lines if ln.startswith(("error:", "HTTP")) or "Error" in ln), lines[-1] if lines else "")
    return pick.strip()[:220]


def run_cases(cases: list[BadInput], tmp: Path) -> list[dict[str, Any]]:
    """Run `cases` with their files in `tmp` (a server is started only if there are HTTP cases)."""
    import warnings

    make_fixtures(tmp)
    rows = []
    with contextlib.ExitStack() as stack:
        client = None
        if any(c.command[0] == "HTTP" for c in cases):
            client = stack.enter_context(_server(tmp))
        for case in cases:
            command = tuple(a.replace("{tmp}", str(tmp)).replace("{inputs}", str(tmp / "inputs")) for a in case.command)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                failed, output = run_http(client, command) if command[0] == "HTTP" else run_cli(command)
            rows.append({"name": case.name, "entry": case.command[0], "clear": judge(case, failed, output),
                         "seconds": time.perf_counter() - t0, "expect": case.expect,
                         "message": _no_machine_paths(first_error_line(output), tmp)})
    return rows


@contextlib.contextmanager
def _server(tmp: Path):
    import httpx

    from inference.server import BackgroundServer, build_manager, create_app

    manager = build_manager(T2V, output_dir=tmp / "server_out", input_dir=tmp / "inputs", lora_dir=tmp / "loras")
    with BackgroundServer(create_app(manager)) as server, httpx.Client(base_url=server.url, timeout=60.0) as client:
        yield client


def _no_machine_paths(text: str, tmp: Path) -> str:
    """Messages as committed results show them: the fixture folder as {tmp}, the repository relative."""
    return text.replace(str(tmp), "{tmp}").replace(str(Path.cwd()) + "/", "")


def report(rows: list[dict[str, Any]]) -> str:
    clear = sum(r["clear"] for r in rows)
    lines = [f"**clear error {clear} of {len(rows)}**", "", "| entry | case | clear | s | message |",
             "|---|---|---|---|---|"]
    for r in rows:
        msg = r["message"].replace("|", "/")
        lines.append(f"| {r['entry']} | {r['name']} | {'yes' if r['clear'] else '**no**'} | {r['seconds']:.2f} | "
                     f"{msg} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write <out>.json and <out>.md")
    p.add_argument("--only", help="run only the cases of this entry point (infer.py, HTTP, train.py, ...)")
    a = p.parse_args(argv)
    cases = [c for c in CASES if a.only is None or c.command[0] == a.only]
    with tempfile.TemporaryDirectory(prefix="bad_inputs_") as tmp:
        rows = run_cases(cases, Path(tmp))
    summary = {"clear": sum(r["clear"] for r in rows), "total": len(rows), "cases": rows}
    text = report(rows)
    print(text)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        out.with_suffix(".md").write_text(text + "\n")
    return summary


if __name__ == "__main__":
    main()
