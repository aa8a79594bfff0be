"""ODE initialisation at scale (distill/ode.py): trajectories written by every rank equal those of one process;
I2V trajectories from a prompt/image file with another prompt column, text from the prompt store."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from safetensors import safe_open

from distill.config import load_train_config
from distill.encode_prompts import PromptStore
from tests.test_distributed import launch
from train import trainer_for

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.num_frames=5", "data.height=32", "data.width=32", "num_threads=1", "logging.every=1",
         "logging.sample_prompts=[]", "checkpoint.every=100", "batch_size=2", "ode.teacher_steps=6",
         "ode.shard_size=2", "optim.warmup_steps=1"]
# builds the trainer only (trajectory generation happens in build), under the launcher given to launch()
BUILD_ONLY = "import sys\nfrom distill.config import load_train_config\nfrom train import trainer_for\n" \
             "trainer_for(load_train_config(sys.argv[1], sys.argv[2:]))\n"


def read_shards(root: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(root.glob("shard_*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out[path.name] = {"meta": f.metadata(), "states": f.get_tensor("states")}
    return out


def test_trajectories_from_two_ranks_equal_one_process(tmp_path, tiny_t2v_dir, one_thread):
    script = tmp_path / "build.py"
    script.write_text(BUILD_ONLY)
    shards = {}
    for nproc in (1, 2):
        root = tmp_path / f"traj{nproc}"
        args = [str(REPO / "configs/train/tiny/t2v_ode.yaml"), f"run_dir={tmp_path}/run{nproc}",
                f"model.path={tiny_t2v_dir}", f"ode.trajectories={root}", "ode.num_trajectories=6", *SMALL]
        if nproc == 1:  # this process (the build writes the trajectories)
            trainer_for(load_train_config(args[0], args[1:]))
        else:
            launch(args, nproc, tmp_path, script=str(script))
        shards[nproc] = read_shards(root)
        index = json.loads((root / "index.json").read_text())
        assert [s["file"] for s in index["shards"]] == sorted(shards[nproc]) and len(index["shards"]) == 3
        shards[nproc]["index"] = index
    one, two = shards[1], shards[2]
    assert one["index"] == two["index"]  # same prompt rows, counts, sigmas, prompt digest
    for name in sorted(k for k in one if k != "index"):
        assert one[name]["meta"] == two[name]["meta"]
        torch.testing.assert_close(two[name]["states"], one[name]["states"], rtol=1e-4, atol=1e-5)


def write_pairs(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        imageio.imwrite(root / f"img{i}.png", rng.integers(0, 255, size=(32, 40, 3), dtype=np.uint8))
        rows.append({"caption": f"a picture number {i}", "image": f"img{i}.png"})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_i2v_ode_from_image_files_with_a_prompt_column_and_the_store(tmp_path, tiny_i2v_dir, one_thread):
    pairs = write_pairs(tmp_path)
    cfg = load_train_config(REPO / "configs/train/tiny/t2v_ode.yaml",
                            [f"run_dir={tmp_path}/run", f"model.path={tiny_i2v_dir}", "data.source=prompts",
                             f"data.prompt_path={pairs}", "data.prompt_column=caption",
                             f"data.text_store={tmp_path}/store", f"ode.trajectories={tmp_path}/traj",
                             "ode.num_trajectories=4", *SMALL])
    trainer = trainer_for(cfg)
    assert isinstance(trainer.text, PromptStore)
    prompts = [f"a picture number {i}" for i in range(4)]
    for path in sorted((tmp_path / "traj").glob("shard_*.safetensors")):
        with safe_open(str(path), "pt") as f:
            meta, y = f.metadata(), f.get_tensor("y")
            assert {"states", "y", "clip_fea"} <= set(f.keys())
        rows, stored = json.loads(meta["rows"]), json.loads(meta["prompts"])
        assert stored == [prompts[r] for r in rows]  # the caption column, by row
        assert (y[:, :4, 0] == 1).all() and (y[:, :4, 1:] == 0).all()  # first-frame mask
    logs = trainer.train_step(1)
    assert np.isfinite(float(logs["loss"]))
    # a changed prompt list makes the stored rows meaningless: an error naming it
    pairs.write_text(pairs.read_text().replace("number 3", "number three"))
    with pytest.raises(ValueError, match="another prompt list"):
        trainer_for(load_train_config(REPO / "configs/train/tiny/t2v_ode.yaml",
                                      [f"run_dir={tmp_path}/run", f"model.path={tiny_i2v_dir}",
                                       "data.source=prompts", f"data.prompt_path={pairs}",
                                       "data.prompt_column=caption", f"ode.trajectories={tmp_path}/traj",
                                       "ode.num_trajectories=4", *SMALL]))


def test_state_columns_pick_a_sub_list_of_the_bank_sigmas():
    from distill.ode import state_columns

    bank = [1.0, 0.9375, 0.8333, 0.625]  # the 4-step list at shift 5
    assert state_columns(bank, [1.0, 0.8333]) == [0, 2, 4]  # 2-step [1000, 500] + the clean endpoint (column 4)
    assert state_columns(bank, [1.0]) == [0, 4]
    assert state_columns(bank, bank) == [0, 1, 2, 3, 4]
    assert state_columns(bank, [1.0, 0.7]) is None  # 0.7 was never stored


def test_a_bank_made_for_more_steps_serves_a_sub_list(tmp_path, tiny_t2v_dir, one_thread):
    """The 1-step student reads the 2-step student's bank (no new teacher solves): the columns of its sigma and of
    the endpoint; a student sigma the bank lacks is an error naming both lists."""
    from distill.ode import TrajectoryBank

    root = tmp_path / "traj"
    base = [str(REPO / "configs/train/tiny/t2v_ode.yaml"), f"model.path={tiny_t2v_dir}", f"ode.trajectories={root}",
            "ode.num_trajectories=2", *SMALL]
    two = trainer_for(load_train_config(base[0], [*base[1:], f"run_dir={tmp_path}/r2",
                                                 "distill.denoising_step_list=[1000,500]"]))
    stored = read_shards(root)["shard_00000.safetensors"]["states"]
    assert stored.shape[1] == 3
    one = trainer_for(load_train_config(base[0], [*base[1:], f"run_dir={tmp_path}/r1",
                                                 "distill.denoising_step_list=[1000]"]))
    assert sorted(p.name for p in root.glob("shard_*")) == ["shard_00000.safetensors"]  # nothing regenerated
    assert one.bank.columns == [0, 2]
    torch.testing.assert_close(one.bank.get([0, 1], "states"), stored[:, [0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(two.bank.get([0, 1], "states"), stored, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"student uses \[1\.0, 0\.9375.*not a sub-list"):
        TrajectoryBank(root, [1.0, 0.9375], json.loads((root / "index.json").read_text())["prompts"])
