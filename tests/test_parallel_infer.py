"""Multi-process inference on the CPU (gloo): sequence parallelism (Ulysses, ring) and CFG parallelism give the
one-process video, T2V and I2V, at a token count that does not divide over the ranks; the launch rules fail early.

The group runs are spawned once per module (`group_results`, 2 processes, every scenario in one go) and compared
here with one-process references computed from the same folders. The latents are compared in fp32 (atol 2e-5: the
only differences are summation orders of a sharded attention), the decoded uint8 videos within one level.
9 frames at 48x48 give a latent of 3 x 6 x 6 -> 27 tokens after the (1, 2, 2) patch: 14 + 13 over two ranks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from inference.config import InferConfig, ParallelConfig
from inference.parallel import attention_lse, check_parallel, merge_attention, shard_bounds
from models.attention import attention

REPO = Path(__file__).resolve().parents[1]
ODD = dict(target_video_length=9, target_height=48, target_width=48)  # 27 tokens
LATENT_ATOL = 2e-5  # seen here: 0 (ulysses), 1e-6 (ring, CFG); a RoPE shard off by one rank: 9e-4
TIMEOUT = 240
SERVED_PROMPT = "a green triangle moving down"
IMAGE = (np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)  # I2V start frame
# name -> (task, parallel block, config overrides): every scenario of the spawned 2-process group
SCENARIOS = {
    "t2v_seq_ulysses": ("t2v", {"seq_p_size": 2, "seq_p_attn_type": "ulysses"}, {}),
    "t2v_seq_ring": ("t2v", {"seq_p_size": 2, "seq_p_attn_type": "ring"}, {}),
    # the first step (t = 1000) lies outside the interval: unguided, run on CFG rank 0 and broadcast
    "t2v_cfg": ("t2v", {"cfg_p_size": 2}, {"sample_guide_interval": [0, 990]}),
    "i2v_seq_ulysses": ("i2v", {"seq_p_size": 2}, {}),
    "i2v_cfg": ("i2v", {"cfg_p_size": 2}, {}),
    # 4 processes (the slow test): both kinds at once, ring attention inside each CFG branch
    "t2v_cfg_seq_ring": ("t2v", {"cfg_p_size": 2, "seq_p_size": 2, "seq_p_attn_type": "ring"},
                         {"sample_guide_interval": [0, 990]}),
}
TWO = [name for name in SCENARIOS if name != "t2v_cfg_seq_ring"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scenario_config(task: str, parallel: dict | None, overrides: dict) -> InferConfig:
    from tests.conftest import BASE_CONFIG

    return InferConfig(**{**BASE_CONFIG, "task": task, "infer_steps": 2, **ODD, **overrides, "parallel": parallel})


def run_capturing(pipe) -> tuple[np.ndarray | None, torch.Tensor | None]:
    """One generate call; returns (uint8 video or None, the latent handed to the VAE or None)."""
    seen = {}
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z: decode(seen.setdefault("z", z.clone()))
    try:
        video = pipe.generate(["a red circle moving left", "a blue square moving up"], seed=3,
                              image=IMAGE if pipe.cfg.task == "i2v" else None)
    finally:
        del pipe.vae.decode
    return video, seen.get("z")


# ---- the spawned group ---------------------------------------------------------------------------------------------
def _attention_checks(rank: int, world: int) -> dict[str, float]:
    """Ulysses (4 heads) and ring (3 heads: not divisible by 2) on 7 tokens against full attention: max error."""
    from inference.parallel import SequenceParallel

    group = dist.new_group(list(range(world)))
    out = {}
    for attn_type, heads in (("ulysses", 4), ("ring", 3)):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 7, heads, 8, generator=gen) for _ in range(3))
        full = attention(q, k, v)
        sp = SequenceParallel(group, attn_type)
        rope = (torch.ones(7, 1, 4), torch.zeros(7, 1, 4))
        shards = [sp.shard(t.flatten(2), rope)[0].unflatten(2, (heads, 8)) for t in (q, k, v)]
        mine = sp.attention(*shards)
        start, n = shard_bounds(7, world, rank)
        out[attn_type] = float((mine[:, :n] - full[:, start:start + n]).abs().max())
    return out


def _group_worker(rank: int, world: int, port: int, folders: dict[str, str], out_dir: str,
                  names: list[str]) -> None:
    from inference.loader import load_pipeline
    from inference.parallel import ParallelState, attach

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = Path(out_dir)
    results = {"attention": _attention_checks(rank, world), "none_on_followers": True}
    for name in names:
        task, parallel, overrides = SCENARIOS[name]
        cfg = scenario_config(task, parallel, overrides)
        pipe = load_pipeline(cfg, folders[task])
        attach(pipe, ParallelState(cfg.parallel))
        video, latent = run_capturing(pipe)
        if rank == 0:
            np.save(out / f"{name}.npy", video)
            torch.save({"latent": latent, "nfe": pipe.timings.nfe}, out / f"{name}.pt")
        else:
            results["none_on_followers"] &= video is None and latent is None
    if world == 2:
        results.update(_serve_one_task(rank, folders["t2v"], out))
        results.update(_webui_one_call(rank, folders["t2v"], out))
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _webui_one_call(rank: int, folder: str, out: Path) -> dict:
    """The web UI's group protocol without a browser: rank 0 runs one generation as the page does (cfg_p_size 2),
    rank 1 follows until rank 0 announces the stop."""
    from inference.loader import load_pipeline
    from inference.parallel import ParallelState, announce, attach, follow_webui
    from inference.webui import run_generation

    cfg = scenario_config("t2v", {"cfg_p_size": 2}, {})
    pipe = load_pipeline(cfg, folder)
    attach(pipe, ParallelState(cfg.parallel))
    if rank != 0:
        return {"ui_followed": follow_webui(pipe)}
    result = run_generation(pipe, SERVED_PROMPT, seed=4, output_dir=out / "ui")
    announce(pipe, None)
    np.save(out / "ui.npy", result.frames)
    return {"ui_nfe": result.nfe}


def _serve_one_task(rank: int, folder: str, out: Path) -> dict:
    """The server's group protocol without HTTP: rank 0's manager announces a task and runs it, rank 1 follows
    until rank 0's manager stops (seq_p_size 2)."""
    from inference.loader import load_pipeline
    from inference.parallel import ParallelState, attach, follow, group_task_manager_class
    from inference.requests import VideoRequest

    cfg = scenario_config("t2v", {"seq_p_size": 2}, {})
    pipe = load_pipeline(cfg, folder)
    attach(pipe, ParallelState(cfg.parallel))
    manager = group_task_manager_class()(pipe, folder, out / f"served{rank}")
    if rank != 0:
        return {"followed": follow(manager)}
    manager.start()
    task = manager.make_task(VideoRequest(prompt=SERVED_PROMPT, seed=3, save_result_path="a.npy"))
    manager.submit(task)
    deadline = time.monotonic() + TIMEOUT
    while task.status in ("pending", "processing") and time.monotonic() < deadline:
        time.sleep(0.05)
    manager.stop()
    return {"served": task.status, "error": task.error}


@pytest.fixture(scope="module")
def group_results(tiny_t2v_dir, tiny_i2v_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("group")
    folders = {"t2v": str(tiny_t2v_dir), "i2v": str(tiny_i2v_dir)}
    mp.spawn(_group_worker, args=(2, free_port(), folders, str(out), TWO), nprocs=2, join=True)
    return out


@pytest.fixture(scope="module")
def references(tiny_t2v_dir, tiny_i2v_dir) -> dict[str, tuple[np.ndarray, torch.Tensor, int]]:
    """One-process (video, latent, NFE) of every scenario: the same config without the parallel block."""
    from inference.loader import load_pipeline

    folders = {"t2v": tiny_t2v_dir, "i2v": tiny_i2v_dir}
    refs = {}
    for name, (task, _, overrides) in SCENARIOS.items():
        pipe = load_pipeline(scenario_config(task, None, overrides), folders[task])
        video, latent = run_capturing(pipe)
        refs[name] = (video, latent, pipe.timings.nfe)
    return refs


def assert_same_video(results: Path, name: str, reference: tuple[np.ndarray, torch.Tensor, int]) -> None:
    ref_video, ref_latent, ref_nfe = reference
    got = torch.load(results / f"{name}.pt")
    torch.testing.assert_close(got["latent"], ref_latent, rtol=0, atol=LATENT_ATOL)
    video = np.load(results / f"{name}.npy")
    assert video.shape == ref_video.shape == (2, 9, 48, 48, 3)
    assert np.abs(video.astype(int) - ref_video.astype(int)).max() <= 1
    assert got["nfe"] == ref_nfe  # the group's DiT evaluations, counted as one process counts them


@pytest.mark.parametrize("name", TWO)
def test_two_processes_give_the_one_process_video(name, group_results, references, one_thread):
    assert_same_video(group_results, name, references[name])


@pytest.mark.slow
def test_four_processes_cfg_times_seq(tiny_t2v_dir, tiny_i2v_dir, tmp_path, references):
    """cfg_p_size 2 x seq_p_size 2 (ring) on 4 gloo processes: the one-process video."""
    folders = {"t2v": str(tiny_t2v_dir), "i2v": str(tiny_i2v_dir)}
    mp.spawn(_group_worker, args=(4, free_port(), folders, str(tmp_path), ["t2v_cfg_seq_ring"]), nprocs=4,
             join=True)
    assert_same_video(tmp_path, "t2v_cfg_seq_ring", references["t2v_cfg_seq_ring"])
    for rank in range(4):  # the attention checks ran on a 4-rank group: 7 tokens -> 2, 2, 2, 1
        errs = json.loads((tmp_path / f"rank{rank}.json").read_text())["attention"]
        assert max(errs.values()) < 1e-5, (rank, errs)


def test_group_task_manager_runs_a_task_on_both_ranks(group_results, tiny_t2v_dir):
    """Rank 0's manager ran the task (written once, the one-process video); rank 1 followed it and then stopped."""
    from inference.loader import load_pipeline

    rank0, rank1 = (json.loads((group_results / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["served"] == "completed", rank0["error"]
    assert rank1["followed"] == 1
    assert not (group_results / "served1" / "a.npy").exists()
    ref = load_pipeline(scenario_config("t2v", None, {}), tiny_t2v_dir).generate(SERVED_PROMPT, seed=3)[0]
    got = np.load(group_results / "served0" / "a.npy")
    assert got.shape == ref.shape and np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_webui_generation_runs_on_both_ranks(group_results, tiny_t2v_dir):
    """A web UI generation on rank 0 (cfg_p_size 2) is repeated by rank 1 and gives the one-process video."""
    from inference.loader import load_pipeline

    rank0, rank1 = (json.loads((group_results / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank1["ui_followed"] == 1
    ref_pipe = load_pipeline(scenario_config("t2v", None, {}), tiny_t2v_dir)
    ref = ref_pipe.generate(SERVED_PROMPT, seed=4)[0]
    assert rank0["ui_nfe"] == ref_pipe.timings.nfe
    got = np.load(group_results / "ui.npy")
    assert got.shape == ref.shape and np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_only_rank0_decodes_and_returns(group_results):
    assert json.loads((group_results / "rank1.json").read_text())["none_on_followers"] is True


@pytest.mark.parametrize("attn_type", ["ulysses", "ring"])
def test_sharded_attention_equals_full_attention(attn_type, group_results):
    for rank in (0, 1):
        err = json.loads((group_results / f"rank{rank}.json").read_text())["attention"][attn_type]
        assert err < 1e-5, (rank, err)


# ---- pieces without a group ----------------------------------------------------------------------------------------
def test_merged_blocks_equal_one_softmax():
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 5, 2, 4, generator=gen), torch.randn(1, 9, 2, 4, generator=gen), \
        torch.randn(1, 9, 2, 4, generator=gen)
    whole, lse = attention_lse(q, k, v)
    out, acc = None, None
    for lo, hi in ((0, 4), (4, 6), (6, 9)):
        out, acc = merge_attention(out, acc, *attention_lse(q, k[:, lo:hi], v[:, lo:hi]))
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(acc, lse, rtol=0, atol=1e-6)
    chunked = attention_lse(q, k, v, chunk=2)  # 5 queries in chunks of 2, 2, 1: the same rows
    torch.testing.assert_close(chunked[0], whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked[1], lse, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole, attention(q, k, v), rtol=0, atol=1e-6)  # the kernel one process uses


def test_shard_bounds_cover_every_token_once():
    for length, size in ((27, 2), (7, 3), (3, 4), (8, 8)):
        spans = [shard_bounds(length, size, r) for r in range(size)]
        covered = [i for start, n in spans for i in range(start, start + n)]
        assert covered == list(range(length)), (length, size, spans)


@pytest.mark.parametrize("par, world, heads, rule", [
    (ParallelConfig(seq_p_size=3), 4, 12, "seq_p_size 3 does not divide the world size 4"),
    (ParallelConfig(seq_p_size=2), 4, 12, "world size 4 must equal cfg_p_size x seq_p_size = 1 x 2"),
    (ParallelConfig(seq_p_size=2, cfg_p_size=2), 1, 12, "needs a distributed launch of 4 processes"),
    (None, 2, 12, "no parallel block"),
    (ParallelConfig(seq_p_size=4), 4, 6, "num_heads must be divisible by seq_p_size"),
])
def test_launch_rules(par, world, heads, rule):
    with pytest.raises(ValueError, match=rule):
        check_parallel(par, world, heads)


def test_num_heads_read_from_either_layout(tmp_path, tiny_t2v_dir):
    from inference.parallel import model_num_heads

    assert model_num_heads(tiny_t2v_dir) == 2
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"num_attention_heads": 12}))
    assert model_num_heads(tmp_path) == 12
    with pytest.raises(FileNotFoundError, match="transformer/config.json"):
        model_num_heads(tmp_path / "transformer" / "nothing")


def test_ring_accepts_heads_that_do_not_divide():
    check_parallel(ParallelConfig(seq_p_size=4, seq_p_attn_type="ring"), 4, 6)
    check_parallel(ParallelConfig(seq_p_size=2, cfg_p_size=2), 4, 12)
    check_parallel(None, 1, None)


@pytest.mark.parametrize("block, rule", [
    ({"seq_p_size": 0}, "seq_p_size must be >= 1"),
    ({"seq_p_attn_type": "allgather"}, "seq_p_attn_type must be one of"),
    ({"cfg_p_size": 4}, "cfg_p_size must be one of"),
    ({"seq_p_sise": 2}, "parallel.seq_p_sise"),
])
def test_parallel_block_errors(block, rule):
    with pytest.raises(ValueError, match=rule):
        InferConfig(parallel=block)


def test_cfg_parallel_needs_cfg():
    with pytest.raises(ValueError, match="cfg_p_size 2 .* no CFG"):
        InferConfig(parallel={"cfg_p_size": 2}, enable_cfg=False)


def test_infer_refuses_before_loading(tmp_path, tiny_t2v_dir, write_config, monkeypatch, capsys):
    """A parallel config without torchrun, and ulysses with 2 heads over 3 ranks: exit 2 with the rule, no load."""
    import infer
    import inference.loader

    monkeypatch.setattr(inference.loader, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cases = [({"seq_p_size": 2}, None, "needs a distributed launch of 2 processes"),
             ({"seq_p_size": 3}, "3", "the 2 attention heads over seq_p_size 3")]
    for i, (block, world, rule) in enumerate(cases):
        if world is not None:
            monkeypatch.setenv("WORLD_SIZE", world)
        cfg = write_config(tmp_path / f"c{i}.json", model_path=str(tiny_t2v_dir), parallel=block)
        code = infer.main(["--config", str(cfg), "--prompt", "a red circle moving left",
                           "--save_result_path", str(tmp_path / f"o{i}.npy")])
        assert code == 2 and rule in capsys.readouterr().err
        assert not (tmp_path / f"o{i}.npy").exists()


# ---- torchrun launches -----------------------------------------------------------------------------------------
def torchrun(args: list[str], nproc: int, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers (our own session)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout} s (a rank waiting on the other?)\n{out[-4000:]}")
    return out


def test_torchrun_infer_writes_once_on_rank0(tmp_path, tiny_t2v_dir, write_config):
    """`torchrun --nproc_per_node 2 infer.py` with seq_p_size 2 (ring): the one-process video, written once."""
    common = dict(model_path=str(tiny_t2v_dir), infer_steps=2, **ODD)
    one = write_config(tmp_path / "one.json", **common)
    two = write_config(tmp_path / "two.json", **common, parallel={"seq_p_size": 2, "seq_p_attn_type": "ring"})
    args = ["--prompt", "a red circle moving left", "--seed", "5"]
    import infer

    assert infer.main(["--config", str(one), *args, "--save_result_path", str(tmp_path / "one.npy")]) == 0
    proc = torchrun(["infer.py", "--config", str(two), *args, "--save_result_path", str(tmp_path / "two.npy")], 2)
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    assert out.count("saved ") == 1, out[-4000:]
    a, b = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.slow
def test_torchrun_server_rank0_serves_both_ranks_compute(tmp_path, tiny_t2v_dir, write_config):
    """The HTTP server on a 2-process group (cfg_p_size 2): a request gives the one-process video, and stopping
    the server stops the follower rank too."""
    import httpx

    cfg = write_config(tmp_path / "two.json", model_path=str(tiny_t2v_dir), infer_steps=2, **ODD,
                       parallel={"cfg_p_size": 2})
    port = free_port()
    proc = torchrun(["-m", "inference.server", "--config", str(cfg), "--port", str(port), "--output_dir",
                     str(tmp_path / "out"), "--log_level", "warning"], 2)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
            try:
                httpx.get(url + "/v1/service/status", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        body = {"prompt": "a red circle moving left", "seed": 5, "save_result_path": "a.npy"}
        task = httpx.post(url + "/v1/tasks/video/", json=body, timeout=10).json()
        while (status := httpx.get(f"{url}/v1/tasks/{task['task_id']}/status", timeout=10).json())["status"] in (
                "pending", "processing"):
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert status["status"] == "completed", status
    finally:
        proc.send_signal(signal.SIGTERM)
        out = finish(proc, 60)
    from inference.loader import load_pipeline

    ref = load_pipeline(scenario_config("t2v", None, {}), tiny_t2v_dir).generate("a red circle moving left", seed=5)
    got = np.load(tmp_path / "out" / "a.npy")
    assert got.shape == ref[0].shape and np.abs(got.astype(int) - ref[0].astype(int)).max() <= 1, out[-3000:]
