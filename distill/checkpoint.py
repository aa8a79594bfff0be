"""Training checkpoints: everything needed to resume, written atomically, the last K kept.

Layout: `<run_dir>/checkpoints/step_00001000/` holding one `<name>.safetensors` per network (generator,
critic, ema, ...), `optim.pt` (optimizer states, tensors only), `state.json` (step, data position) and
`rng.pt` (torch/numpy/python RNG states). A checkpoint is written into a temporary sibling folder and renamed
into place, so a run killed mid-write leaves the previous checkpoint intact and never a half one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step_"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "state.json").is_file())


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    """RNG states as tensors/lists only, so they load with `torch.load(weights_only=True)` (no pickled code)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def staging_dir(root: str | Path, step: int, fresh: bool = False) -> Path:
    """The temporary folder checkpoint `step` is written into before the rename (`fresh`: emptied first).

    Sharded engines (distill/engines.py) let every rank write its shards here, then `save_checkpoint(...,
    staged=True)` adds the rest on rank 0 and renames."""
    root = Path(root)
    tmp = root / f".tmp_{_step_dir(root, step).name}"
    if fresh:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(root: str | Path, step: int, networks: dict[str, dict[str, torch.Tensor]],
                    optimizers: dict[str, dict], state: dict[str, Any], keep: int, staged: bool = False) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep` ones (`staged`: keep what the
    ranks already wrote into `staging_dir`)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = _step_dir(root, step)
    tmp = staging_dir(root, step, fresh=not staged)
    for name, sd in networks.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
    torch.save(optimizers, tmp / "optim.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    if final.exists():  # re-saving the same step (e.g. final == periodic): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, network_names: list[str]) -> tuple[dict, dict, dict[str, Any]]:
    """Read (networks, optimizer states, state) of a checkpoint folder; restores the RNG states."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"not a complete checkpoint (no state.json): {path}")
    networks = {}
    for name in network_names:
        f = path / f"{name}.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {f.name}; it holds "
                                    f"{sorted(p.name for p in path.iterdir())}")
        networks[name] = load_file(str(f))
    optim = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=True))
    return networks, optim, json.loads((path / "state.json").read_text())
