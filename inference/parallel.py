"""Multi-GPU inference: sequence parallelism over the video tokens and CFG parallelism, on a torch.distributed group.

    torchrun --nproc_per_node 8 infer.py --config cfg.json --prompt "..." --save_result_path out.mp4
    cfg.json: {..., "parallel": {"seq_p_size": 4, "seq_p_attn_type": "ulysses", "cfg_p_size": 2}}

Ranks: `rank = cfg_rank * seq_p_size + seq_rank`. The `seq_p_size` ranks of one CFG branch form a sequence group;
the `cfg_p_size` ranks with the same seq_rank form a CFG group.

Sequence parallelism (`SequenceParallel`, installed in the DiT by `attach`): after the patch embedding every rank
keeps one contiguous shard of ceil(L / P) tokens (the last shard padded with zeros, so any token count works) and
the rows of the RoPE table for its own global positions. Every per-token layer (norms, modulation, FFN, the head)
runs on the shard as it is; cross-attention runs the shard's queries against the whole (replicated) text / CLIP
context. Only self-attention mixes tokens:
- "ulysses" (DeepSpeed-Ulysses, Jacobs et al. 2023): one all-to-all turns [tokens / P, all heads] into [all tokens,
  heads / P] for q, k, v; exact attention over the real tokens (the pad is cut off); a second all-to-all brings the
  output back. Heads must divide by P.
- "ring" (Ring Attention, Liu et al. 2023): the queries stay; the key/value shards travel around the ring (P - 1
  send/receive steps, the next one in flight while a block is computed); block outputs are merged exactly with
  their log-sum-exp. Works for any head count; computes each block's softmax explicitly in fp32.
The head's output shards are all-gathered and the pad is trimmed, so every rank ends with the full velocity.

CFG parallelism (`ParallelState.cfg_denoiser`): CFG rank 0 runs the conditional branch, rank 1 the unconditional
one; an all-gather in the CFG group gives both to every rank, which combines them with standard CFG
`uncond + w (cond - uncond)`. Unguided steps (a guidance interval) run on CFG rank 0 and are broadcast.

Every rank draws the same noise and steps the scheduler on the same gathered tensors, so all ranks hold the same
latent; rank 0 alone decodes it (docs/parallel_inference.md says why) and writes files. Collectives go through
torch.distributed: gloo on a CPU, NCCL on GPUs; small control messages (cancel flags, server requests) use a gloo
group. Inference only: the collectives carry no gradients.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from inference.config import InferConfig, ParallelConfig
from inference.guidance import combine
from models.attention import attention

log = logging.getLogger(__name__)
Rope = tuple[Tensor, Tensor]
# Followers of a server wait on the control group between requests for as long as the server is idle.
CONTROL_TIMEOUT = datetime.timedelta(days=365)


# ---- launch checks ------------------------------------------------------------------------------------------------
def launch_world_size() -> int:
    """Processes of this launch: torchrun's WORLD_SIZE (1 without a distributed launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def model_num_heads(folder: str | Path) -> int:
    """The DiT's attention heads, from a model folder's config, without loading any weight: `config.json`
    (official layout, num_heads) or `transformer/config.json` (diffusers layout, num_attention_heads)."""
    folder = Path(folder)
    for path, key in ((folder / "config.json", "num_heads"),
                      (folder / "transformer" / "config.json", "num_attention_heads")):
        if path.is_file():
            return int(json.loads(path.read_text())[key])
    raise FileNotFoundError(f"no DiT config in {folder}: expected config.json (official layout) or "
                            "transformer/config.json (diffusers layout)")


def check_parallel(par: ParallelConfig | None, world_size: int, num_heads: int | None) -> None:
    """The launch rules of a `parallel` block, checked before any model work; ValueError naming the rule.

    world_size: processes launched (torchrun); num_heads: the DiT's attention heads (needed for ulysses).
    """
    if par is None or par.world_size == 1:
        if world_size > 1:
            raise ValueError(f"launched as {world_size} processes but the config has no parallel block that uses "
                             f"them: add \"parallel\": {{\"seq_p_size\": {world_size}}} (world size = cfg_p_size x "
                             "seq_p_size)")
        return
    if world_size == 1:
        raise ValueError(f"the parallel block (cfg_p_size {par.cfg_p_size} x seq_p_size {par.seq_p_size}) needs a "
                         f"distributed launch of {par.world_size} processes: torchrun --nproc_per_node "
                         f"{par.world_size} infer.py ...")
    if world_size % par.seq_p_size:
        raise ValueError(f"parallel.seq_p_size {par.seq_p_size} does not divide the world size {world_size}")
    if world_size != par.world_size:
        raise ValueError(f"the world size {world_size} must equal cfg_p_size x seq_p_size = {par.cfg_p_size} x "
                         f"{par.seq_p_size} = {par.world_size}")
    if par.seq_p_attn_type == "ulysses" and par.seq_p_size > 1:
        if num_heads is None:
            raise ValueError("ulysses sequence parallelism needs the DiT's num_heads to check the head split")
        if num_heads % par.seq_p_size:
            raise ValueError(f"ulysses splits the {num_heads} attention heads over seq_p_size {par.seq_p_size} "
                             f"ranks: num_heads must be divisible by seq_p_size; use \"seq_p_attn_type\": \"ring\" "
                             f"or a seq_p_size that divides {num_heads}")


# ---- attention over a sequence shard -----------------------------------------------------------------------------
def shard_bounds(length: int, size: int, rank: int) -> tuple[int, int]:
    """(start, valid count) of `rank`'s shard when `length` tokens are padded to size * ceil(length / size)."""
    per = -(-length // size)
    start = rank * per
    return start, max(0, min(per, length - start))


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, valid_len: int) -> Tensor:
    """Exact self-attention over a token-sharded sequence by two all-to-alls over heads.

    q, k, v: [B, S, H, D], this rank's S = ceil(L / P) tokens (pad at the end of the last shard); H % P == 0;
    valid_len: L, the real tokens. Returns [B, S, H, D] (zeros at pad rows).
    """
    size = dist.get_world_size(group)
    b, s, h, d = q.shape
    qkv = torch.stack([q, k.to(q.dtype), v.to(q.dtype)])  # [3, B, S, H, D]
    send = qkv.unflatten(3, (size, h // size)).permute(3, 0, 1, 2, 4, 5).contiguous()  # [P, 3, B, S, H/P, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: rank j's tokens, my head group
    full = recv.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)  # [3, B, P*S, H/P, D], global token order
    fq, fk, fv = full[:, :, :valid_len].unbind(0)
    out = F.pad(attention(fq, fk, fv), (0, 0, 0, 0, 0, size * s - valid_len))  # [B, P*S, H/P, D]
    send = out.unflatten(1, (size, s)).transpose(0, 1).contiguous()  # [P, B, S, H/P, D]: rank j's tokens
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: my tokens, head group j
    return recv.permute(1, 2, 0, 3, 4).flatten(2, 3)  # [B, S, H, D]


# Queries per explicit-softmax chunk of a ring block: bounds its fp32 scores to B x H x 1024 x S x 4 bytes
# (Wan2.1-14B, 40 heads, 720p on 8 ranks: S = 9,450 -> 1.5 GB) instead of growing with S^2.
RING_QUERY_CHUNK = 1024


def attention_lse(q: Tensor, k: Tensor, v: Tensor, chunk: int = RING_QUERY_CHUNK) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(D)) v and its log-sum-exp, in fp32, `chunk` queries at a time.

    q: [B, Lq, H, D], k, v: [B, Lk, H, D] -> out [B, Lq, H, D], lse [B, Lq, H, 1].
    """
    kf, vf = k.float(), v.float()
    outs, lses = [], []
    for qc in q.float().split(chunk, dim=1):
        scores = torch.einsum("bqhd,bkhd->bhqk", qc, kf) * q.shape[-1] ** -0.5
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [B, H, chunk, 1]
        outs.append(torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse), vf))
        lses.append(lse.permute(0, 2, 1, 3))
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def merge_attention(out: Tensor | None, lse: Tensor | None, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two attentions of the same queries over disjoint key sets (exact, by their log-sum-exps)."""
    if out is None:
        return out_b, lse_b
    new = torch.logaddexp(lse, lse_b)
    return out * torch.exp(lse - new) + out_b * torch.exp(lse_b - new), new


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, valid_len: int) -> Tensor:
    """Exact self-attention over a token-sharded sequence, passing key/value shards around a ring.

    q, k, v: [B, S, H, D], this rank's shard (S = ceil(L / P), pad at the end); any H.
    valid_len: L. Returns [B, S, H, D] in q's dtype.
    """
    size, me = dist.get_world_size(group), dist.get_rank(group)
    nxt, prv = dist.get_global_rank(group, (me + 1) % size), dist.get_global_rank(group, (me - 1) % size)
    kv = torch.stack([k.to(q.dtype), v.to(q.dtype)]).contiguous()  # [2, B, S, H, D]
    out = lse = None
    for step in range(size):
        works, incoming = [], None
        if step + 1 < size:  # start the next transfer before computing on the block we hold
            incoming = torch.empty_like(kv)
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, nxt, group),
                                            dist.P2POp(dist.irecv, incoming, prv, group)])
        _, n = shard_bounds(valid_len, size, (me - step) % size)  # real keys of the shard we hold
        if n > 0:
            out, lse = merge_attention(out, lse, *attention_lse(q, kv[0, :, :n], kv[1, :, :n]))
        for work in works:
            work.wait()
        if incoming is not None:
            kv = incoming
    return out.to(q.dtype)


class SequenceParallel:
    """The DiT's hook for sequence parallelism over one process group (see the module docstring).

    `shard` is called by WanModel.forward after the patch embedding and records the token count of that forward;
    the self-attention layers call `attention`; `gather` reassembles the head's output.
    """

    def __init__(self, group: dist.ProcessGroup, attn_type: str) -> None:
        self.group, self.attn_type = group, attn_type
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.valid_len = 0

    def shard(self, tokens: Tensor, rope: Rope) -> tuple[Tensor, Rope]:
        """tokens [B, L, D], RoPE (cos, sin) [L, 1, d] -> this rank's [B, S, D] and RoPE rows [S, 1, d]."""
        length = tokens.shape[1]
        per = -(-length // self.size)
        pad, start = per * self.size - length, self.rank * per
        self.valid_len = length
        tokens = F.pad(tokens, (0, 0, 0, pad))[:, start:start + per].contiguous()
        cos, sin = (F.pad(t, (0, 0, 0, 0, 0, pad))[start:start + per] for t in rope)
        return tokens, (cos, sin)

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Self-attention of the whole sequence for this rank's queries: [B, S, H, D] each -> [B, S, H, D]."""
        if self.attn_type == "ulysses":
            return ulysses_attention(q, k, v, self.group, self.valid_len)
        return ring_attention(q, k, v, self.group, self.valid_len)

    def gather(self, x: Tensor) -> Tensor:
        """[B, S, C] per rank -> [B, L, C], the real tokens of every rank in order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)[:, :self.valid_len]


# ---- the process groups and CFG parallelism ----------------------------------------------------------------------
class ParallelState:
    """This rank's place in a `cfg_p_size x seq_p_size` launch: groups, the sequence hook and CFG parallelism.

    Needs torch.distributed initialised with world size cfg_p_size * seq_p_size (`init_parallel` does it).
    """

    def __init__(self, par: ParallelConfig) -> None:
        self.cfg = par
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        s, c = par.seq_p_size, par.cfg_p_size
        self.seq_rank, self.cfg_rank = self.rank % s, self.rank // s
        # new_group must be called by every rank for every group, in the same order.
        seq_groups = [dist.new_group([ci * s + si for si in range(s)]) for ci in range(c)]
        cfg_groups = [dist.new_group([ci * s + si for ci in range(c)]) for si in range(s)]
        self.seq_group, self.cfg_group = seq_groups[self.cfg_rank], cfg_groups[self.seq_rank]
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self.seq = SequenceParallel(self.seq_group, par.seq_p_attn_type) if s > 1 else None

    @property
    def is_main(self) -> bool:
        """Rank 0 decodes, writes files and serves requests."""
        return self.rank == 0

    def sync_cancel(self, cancel: Callable[[], bool] | None) -> Callable[[], bool]:
        """A cancel poll that every rank calls once per step and that returns rank 0's answer on all ranks."""

        def synced() -> bool:
            flag = torch.tensor([int(self.is_main and cancel is not None and bool(cancel()))], dtype=torch.int32)
            dist.broadcast(flag, src=0, group=self.control)
            return bool(flag.item())

        return synced

    def cfg_denoiser(self, pipe, cond: Tensor, uncond: Tensor | None, guide: float, clip_fea: Tensor | None,
                     y: Tensor | None, guided: Sequence[bool] | None) -> Callable[[Tensor, Tensor], Tensor]:
        """v(x, t) with the two CFG branches on the two CFG ranks (WanPipeline.make_denoiser's contract).

        NFE counts the whole group's DiT evaluations, as one process would (2B per guided step)."""
        steps = iter(guided) if guided is not None else None
        mine = uncond if uncond is not None and self.cfg_rank == 1 else cond
        src = dist.get_global_rank(self.cfg_group, 0)

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            if uncond is not None and (steps is None or next(steps)):
                pipe.timings.nfe += 2 * x.shape[0]
                v = pipe.dit(x.to(pipe.dtype), t, mine, clip_fea=clip_fea, y=y)
                parts = [torch.empty_like(v) for _ in range(self.cfg.cfg_p_size)]
                dist.all_gather(parts, v.contiguous(), group=self.cfg_group)
                v_cond, v_uncond = parts
                return combine(v_cond, v_uncond, guide)
            pipe.timings.nfe += x.shape[0]
            if self.cfg_rank == 0:
                v = pipe.dit(x.to(pipe.dtype), t, cond, clip_fea=clip_fea, y=y).contiguous()
            else:  # the DiT returns fp32 of the latent's shape
                v = torch.empty(x.shape, dtype=torch.float32, device=x.device)
            dist.broadcast(v, src=src, group=self.cfg_group)
            return v

        return denoise


def attach(pipe, state: ParallelState) -> None:
    """Run `pipe` (a WanPipeline) on the group: CFG parallelism in its denoiser, the sequence hook in its DiT."""
    pipe.parallel = state
    pipe.dit.seq_parallel = state.seq  # None (cfg_p_size only): the DiT runs whole sequences
    for block in pipe.dit.blocks:
        block.self_attn.seq_parallel = state.seq


def init_parallel(cfg: InferConfig, model_folder: str | Path) -> ParallelState | None:
    """Check the launch against cfg.parallel (before any weight is read), then join the torchrun group.

    Returns None for a one-process run without a parallel block. GPUs: NCCL, device LOCAL_RANK; CPU: gloo.
    """
    from inference.loader import resolve_device

    world = launch_world_size()
    par = cfg.parallel
    heads = model_num_heads(model_folder) if par is not None and par.seq_p_size > 1 else None
    check_parallel(par, world, heads)
    if world == 1:
        return None
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy_group)
    return ParallelState(par)


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def load_pipeline_launched(cfg: InferConfig, model_path: str | Path | None = None):
    """`load_pipeline`, on the torchrun group when launched as one (then `pipe.parallel` is set).

    Without a distributed launch and without a parallel block it is exactly `load_pipeline(cfg, model_path)`.
    """
    from inference.loader import load_pipeline, resolve_device, resolve_model_path

    folder = resolve_model_path(cfg, model_path)
    state = init_parallel(cfg, folder)
    if state is not None and resolve_device(cfg.device).type == "cuda":
        cfg = cfg.replace(device=f"cuda:{torch.cuda.current_device()}")  # this rank's GPU (LOCAL_RANK), by index
    pipe = load_pipeline(cfg, folder)
    if state is not None:
        attach(pipe, state)
    return pipe


def follow_prompts(pipe, prompts: Sequence[str], batch_size: int, image: Any = None,
                   negative_prompt: str | None = None) -> int:
    """infer.py on a rank other than 0: the same generate calls as rank 0 (its prompts, chunks and seeds), nothing
    written. Returns 0 (the exit status)."""
    for start in range(0, len(prompts), batch_size):
        pipe.generate(list(prompts[start:start + batch_size]), seed=pipe.cfg.seed + start, image=image,
                      negative_prompt=negative_prompt)
    return 0


def is_main(pipe) -> bool:
    """True on the rank that writes files and serves (any single-process pipeline)."""
    state = getattr(pipe, "parallel", None)
    return state is None or state.is_main


# ---- serving on a group: rank 0 serves, the other ranks follow its requests ---------------------------------------
def broadcast_request(state: ParallelState, request: dict[str, Any] | None) -> dict[str, Any] | None:
    """Rank 0 sends `request` (None: stop) to all ranks over the control group; the others receive it."""
    box = [request if state.is_main else None]
    dist.broadcast_object_list(box, src=0, group=state.control)
    return box[0]


def group_task_manager_class():
    """A TaskManager (inference/tasks.py) that announces each task to the follower ranks before running it."""
    from inference.tasks import TaskManager

    class GroupTaskManager(TaskManager):
        """Rank 0's manager: every task is broadcast (prompt, seed, paths, LoRA, overrides) before it runs, so the
        followers repeat the same LoRA switch and generate call; stopping the server stops the followers."""

        def _generate(self, task) -> None:
            broadcast_request(self.pipe.parallel, task_request(task))
            super()._generate(task)

        def stop(self, timeout: float = 60.0) -> None:
            super().stop(timeout)
            if not getattr(self, "_followers_stopped", False):
                self._followers_stopped = True
                broadcast_request(self.pipe.parallel, None)

    return GroupTaskManager


def task_request(task) -> dict[str, Any]:
    """The fields of a Task (inference/tasks.py) that a follower needs to repeat it."""
    return {"prompt": task.prompt, "seed": task.seed, "negative_prompt": task.negative_prompt,
            "image_path": None if task.image_path is None else str(task.image_path),
            "lora_path": None if task.lora_path is None else str(task.lora_path),
            "lora_strength": task.lora_strength, "overrides": dict(task.overrides)}


def follow(manager) -> int:
    """A server follower rank's loop: repeat rank 0's tasks (LoRA switch + generate, no file written) until the
    server stops. A task that fails here fails on rank 0 too (same inputs, same model), so the ranks stay in step.
    Returns the number of tasks followed."""
    from inference.video import read_image

    def run(req: dict[str, Any]) -> None:
        image = None if req["image_path"] is None else read_image(req["image_path"])
        manager._use_lora(None if req["lora_path"] is None else Path(req["lora_path"]), req["lora_strength"])
        manager.pipe.generate(req["prompt"], seed=req["seed"], image=image, negative_prompt=req["negative_prompt"],
                              **req["overrides"])

    return _follow(manager.pipe.parallel, run)


def announce(pipe, request: dict[str, Any] | None) -> None:
    """Web UI on a group: rank 0 sends one generation (or None: stop) to the follower ranks; no-op off a group."""
    if getattr(pipe, "parallel", None) is not None:
        broadcast_request(pipe.parallel, request)


def follow_webui(pipe) -> int:
    """A web UI follower rank's loop: rank 0's LoRA choice and generate call (see `announce`), until it stops.
    Returns the number of calls followed."""
    from inference.webui import set_ui_lora

    def run(req: dict[str, Any]) -> None:
        set_ui_lora(pipe.dit, req["lora"], req["lora_strength"])
        pipe.generate(req["prompt"], seed=req["seed"], image=req["image"], negative_prompt=req["negative_prompt"],
                      **req["overrides"])

    return _follow(pipe.parallel, run)


def _follow(state: ParallelState, run: Callable[[dict[str, Any]], None]) -> int:
    done = 0
    while (req := broadcast_request(state, None)) is not None:
        done += 1
        try:
            run(req)
        except Exception as e:  # noqa: BLE001 - rank 0 reports the failure; the follower waits for the next one
            log.info("rank %d: request failed as on rank 0: %s: %s", state.rank, type(e).__name__, e)
    return done
