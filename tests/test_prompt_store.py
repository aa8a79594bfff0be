"""The prompt-embedding store (distill/encode_prompts.py): round trip, resume of a killed encode, stale-store
errors, a 2-process sharded encode against one process, the trainer's batches from the store against the
in-memory cache; and the I2V pairs sources of distill/data.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import distill.encode_prompts as ep
from distill.config import load_train_config
from distill.data import TextCache, load_pairs
from distill.encode_prompts import PromptStore, StaleStoreError, encode_store, make_key
from models.components import load_encoders
from train import trainer_for

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = REPO / "checkpoints" / "tiny-components"
TEXT_LEN = 48
PROMPTS = [f"a {c} {s} moving {d}" for c in ("red", "green", "blue") for s in ("circle", "square")
           for d in ("up", "down", "left")] + ["", "x" * 80]  # 20 prompts: empty and truncated ones too
SMALL = ["data.num_frames=5", "data.height=32", "data.width=32", "num_threads=1", "logging.every=1",
         "logging.sample_prompts=[]", "checkpoint.every=100", "batch_size=3"]


@pytest.fixture(scope="module")
def encoder():
    return load_encoders(COMPONENTS, "t2v", TEXT_LEN)[1]


def key_for(prompts, chunk=6, dtype="bf16", fingerprint="enc-a", text_len=TEXT_LEN):
    return make_key(fingerprint, prompts, text_len, dtype, chunk)


def test_round_trip_is_exact_and_matches_the_encoder(tmp_path, encoder, one_thread):
    key = key_for(PROMPTS)
    store = PromptStore(encode_store(encoder, PROMPTS, tmp_path / "s", key, log=lambda m: None), key)
    assert len(store) == len(PROMPTS) and store.negative_row == len(PROMPTS) - 1
    files = sorted((tmp_path / "s").glob("chunk_*.safetensors"))
    assert len(files) == 4  # 20 prompts in chunks of 6
    _, mask = encoder.tokenizer(PROMPTS, TEXT_LEN)
    assert store.lengths.tolist() == mask.sum(1).tolist()  # trimmed to the real tokens (EOS included)
    for c, f in enumerate(files):  # what is read back is exactly what was written (bf16)
        written = load_file(str(f))
        for j in range(len(written["offsets"]) - 1):
            a, b = written["offsets"][j:j + 2].tolist()
            got = store.embedding(6 * c + j)
            assert got.dtype == torch.bfloat16 and torch.equal(got, written["emb"][a:b])
    # and it is the encoder's output (encoded in other batches: a bf16 tolerance)
    ref = encoder.encode(PROMPTS)
    for i, r in enumerate(ref):
        torch.testing.assert_close(store.embedding(i).float(), r.float(), rtol=1e-2, atol=1e-2)
    rows = store.rows([3, 19, 3])
    assert rows.shape == (3, TEXT_LEN, encoder.dim) and rows.dtype == torch.float32
    assert torch.equal(rows[0], rows[2]) and (rows[0, store.lengths[3]:] == 0).all()


def test_a_killed_encode_continues_with_the_missing_chunks(tmp_path, encoder, monkeypatch, one_thread):
    key, folder = key_for(PROMPTS), tmp_path / "s"
    real_write, written = ep.write_safetensors, []

    def dies_after_two(state, path, **kw):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(Path(path).name)
        return real_write(state, path, **kw)

    monkeypatch.setattr(ep, "write_safetensors", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        encode_store(encoder, PROMPTS, folder, key, log=lambda m: None)
    assert not (folder / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        PromptStore(folder, key)
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("chunk_*.safetensors")}
    assert sorted(before) == written == ["chunk_000000.safetensors", "chunk_000001.safetensors"]

    resumed = []
    monkeypatch.setattr(ep, "write_safetensors",
                        lambda s, p, **kw: resumed.append(Path(p).name) or real_write(s, p, **kw))
    encode_store(encoder, PROMPTS, folder, key, log=lambda m: None)
    # only the missing chunks (then the per-prompt lengths, written with the index)
    assert resumed == ["chunk_000002.safetensors", "chunk_000003.safetensors", "lengths.safetensors"]
    assert {n: (folder / n).stat().st_mtime_ns for n in before} == before
    fresh = encode_store(encoder, PROMPTS, tmp_path / "fresh", key, log=lambda m: None)
    a, b = PromptStore(folder, key), PromptStore(fresh, key)
    assert all(torch.equal(a.embedding(i), b.embedding(i)) for i in range(len(PROMPTS)))


def test_a_stale_store_is_an_error_naming_the_mismatch(tmp_path, encoder, one_thread):
    folder = tmp_path / "s"
    encode_store(encoder, PROMPTS, folder, key_for(PROMPTS), log=lambda m: None)
    with pytest.raises(StaleStoreError, match="text_len: stored 48, wanted 64"):
        PromptStore(folder, key_for(PROMPTS, text_len=64))
    with pytest.raises(StaleStoreError, match="encoder: stored 'enc-a', wanted 'enc-b'"):
        encode_store(encoder, PROMPTS, folder, key_for(PROMPTS, fingerprint="enc-b"), log=lambda m: None)
    with pytest.raises(StaleStoreError, match="prompts: stored"):
        PromptStore(folder, key_for(PROMPTS[:-1] + ["another negative"]))
    # a partial store of another key is caught at its first chunk too
    (folder / "index.json").unlink()
    with pytest.raises(StaleStoreError, match=r"chunk_000000.*dtype: stored 'bf16', wanted 'fp32'"):
        encode_store(encoder, PROMPTS, folder, key_for(PROMPTS, dtype="fp32"), log=lambda m: None)


def test_fingerprint_follows_the_weight_bytes(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(bytes(300_000))
    first = ep.file_fingerprint([f])
    assert ep.file_fingerprint([f]) == first
    data = bytearray(f.read_bytes())
    data[-10] = 1  # a change in the last block (weights stored at the end of the file)
    f.write_bytes(bytes(data))
    assert ep.file_fingerprint([f]) != first
    assert len(ep.encoder_files(COMPONENTS)) == 1  # the byte tokenizer has no file
    with pytest.raises(FileNotFoundError, match="text encoder files"):
        ep.encoder_files(tmp_path)


def store_config(tmp_path: Path, folder: Path, *extra: str) -> list[str]:
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:-2]))
    return [f"model.path={folder}", "data.source=prompts", f"data.prompt_path={tmp_path}/p.txt",
            f"data.text_store={tmp_path}/store", "data.text_store_chunk=4", "distill.negative_prompt=blurry",
            f"run_dir={tmp_path}/run", *SMALL, *extra]


def run_encode(args: list[str], nproc: int, tmp: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(_port())] if nproc > 1 else [sys.executable]
    res = subprocess.run([*launcher, "-m", "distill.encode_prompts", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_encode_with_two_processes_equals_one(tmp_path, tiny_t2v_dir, one_thread):
    """torchrun with 2 (gloo) processes, chunks split between the ranks, against this process alone."""
    config = str(REPO / "configs/train/tiny/t2v_dmd.yaml")
    stores = {}
    for nproc in (1, 2):
        (tmp_path / f"p{nproc}").mkdir()
        overrides = store_config(tmp_path / f"p{nproc}", tiny_t2v_dir)
        cfg = load_train_config(config, overrides)
        prompts = ep.store_prompts(cfg)
        if nproc == 1:
            ep.main(["--config", config, *overrides])
        else:
            run_encode(["--config", config, *overrides], nproc, tmp_path)
        stores[nproc] = PromptStore(cfg.data.text_store, ep.config_key(cfg, prompts, ep.text_len_of(cfg)))
    one, two = stores[1], stores[2]
    assert len(one) == len(two) == len(PROMPTS) - 1  # 18 prompts + the negative, chunks of 4 over 2 ranks
    assert one.key == two.key and one.lengths.tolist() == two.lengths.tolist()
    for i in range(len(one)):
        torch.testing.assert_close(one.embedding(i).float(), two.embedding(i).float(), rtol=1.6e-2, atol=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_trainer_batches_from_the_store_equal_the_in_memory_path(dtype, tmp_path, tiny_t2v_dir, one_thread):
    base = load_train_config(REPO / "configs/train/tiny/t2v_dmd.yaml", store_config(tmp_path, tiny_t2v_dir))
    mem = trainer_for(load_train_config(REPO / "configs/train/tiny/t2v_dmd.yaml",
                                        store_config(tmp_path, tiny_t2v_dir, "data.text_store=null")))
    store = trainer_for(load_train_config(REPO / "configs/train/tiny/t2v_dmd.yaml",
                                          store_config(tmp_path, tiny_t2v_dir, f"data.text_store_dtype={dtype}")))
    assert isinstance(mem.data.text, TextCache) and isinstance(store.data.text, PromptStore)
    assert (Path(base.data.text_store) / "index.json").is_file()  # encoded as the trainer's first step
    # fp32: the same forward in other batches; bf16 (umT5 computed in bf16): relative error per row under 2%
    tol = 1e-5 if dtype == "fp32" else 2e-2
    for step in range(3):
        (c1, u1, p1), (c2, u2, p2) = (t.data.get(step, 0, 1, 3, t.latent_shape) for t in (mem, store))
        assert p1 == p2
        assert c1.context.shape == c2.context.shape == (3, mem.data.text.text_len, 64)
        for a, b in ((c2.context, c1.context), (u2.context, u1.context)):
            assert torch.equal(a.abs().sum(-1) == 0, b.abs().sum(-1) == 0)  # the same padding
            assert ((a - b).norm(dim=-1) <= tol * b.norm(dim=-1) + 1e-6).all()


# ---- I2V pairs sources --------------------------------------------------------------------------------------
def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, size=(24 + 8 * i, 40, 3), dtype=np.uint8) for i in range(n)]


def test_every_pairs_source_gives_the_same_prompts_and_pixels(tmp_path):
    prompts, images = PROMPTS[:3], _images(3)
    folder = tmp_path / "captioned"
    folder.mkdir()
    rows = []
    for i, (p, img) in enumerate(zip(prompts, images)):
        imageio.imwrite(folder / f"{i:03d}.png", img)
        (folder / f"{i:03d}.txt").write_text(p + "\n")
        rows.append({"prompt": p, "image": f"captioned/{i:03d}.png"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "pairs.csv").write_text("prompt,image\n" + "".join(f"{r['prompt']},{r['image']}\n" for r in rows))
    from PIL import Image

    ds = datasets.Dataset.from_dict({"prompt": prompts, "image": [Image.fromarray(a) for a in images]},
                                    features=datasets.Features({"prompt": datasets.Value("string"),
                                                                "image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "ds"))
    for source in ("captioned", "pairs.jsonl", "pairs.csv", "ds"):
        pairs = load_pairs(tmp_path / source)
        assert pairs.prompts == prompts, source
        for i, img in enumerate(images):
            assert np.array_equal(pairs.image(i), img), (source, i)


def test_pairs_source_errors_name_the_problem(tmp_path):
    folder = tmp_path / "captioned"
    folder.mkdir()
    imageio.imwrite(folder / "a.png", _images(1)[0])
    with pytest.raises(FileNotFoundError, match=r"without a \.txt caption.*a\.png"):
        load_pairs(folder)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x", "img": "a.png"}) + "\n")
    with pytest.raises(ValueError, match="no column 'image'"):
        load_pairs(tmp_path / "p.jsonl")
    (tmp_path / "p.txt").write_text("x\n")
    with pytest.raises(ValueError, match="I2V pairs need"):
        load_pairs(tmp_path / "p.txt")


def test_encode_command_rejects_a_config_without_a_store(tmp_path, tiny_t2v_dir, capsys):
    with pytest.raises(SystemExit) as e:
        ep.main(["--config", str(REPO / "configs/train/tiny/t2v_dmd.yaml"), f"model.path={tiny_t2v_dir}"])
    assert e.value.code == 2 and "data.text_store" in capsys.readouterr().err
    with pytest.raises(ValueError, match="data.text_store_dtype must be one of"):
        load_train_config(REPO / "configs/train/tiny/t2v_dmd.yaml", [f"model.path={tiny_t2v_dir}",
                                                                "data.text_store_dtype=int8"])


def test_store_from_an_official_layout_folder_with_the_real_config(tmp_path, one_thread):
    """The real 1.3B config as shipped (only model.path, data paths and sizes overridden) on a mini folder in the
    official layout: umT5 weights file and google/umt5-xxl tokenizer fingerprinted, Wan's negative prompt last."""
    from inference.config import WAN_NEGATIVE_PROMPT
    from models.mini import write_mini

    folder = write_mini(tmp_path / "mini", "t2v", "official")
    (tmp_path / "p.txt").write_text("a cat on a skateboard\na drone shot of waves\n")
    overrides = [f"model.path={folder}", f"data.prompt_path={tmp_path}/p.txt", f"data.text_store={tmp_path}/store",
                 "data.num_frames=5", "data.height=32", "data.width=32"]
    config = str(REPO / "configs/train/wan/t2v_1.3b_dmd.yaml")
    assert ep.main(["--config", config, *overrides]) == 0
    cfg = load_train_config(config, overrides)
    prompts = ep.store_prompts(cfg)
    assert prompts[-1] == WAN_NEGATIVE_PROMPT and len(prompts) == 3
    assert [p.name for p in ep.encoder_files(folder)] == ["models_t5_umt5-xxl-enc-bf16.pth", "umt5-xxl"]
    store = PromptStore(cfg.data.text_store, ep.config_key(cfg, prompts, ep.text_len_of(cfg)))
    encoder = load_encoders(folder, "t2v", ep.text_len_of(cfg))[1]
    _, mask = encoder.tokenizer(prompts, ep.text_len_of(cfg))
    assert store.lengths.tolist() == mask.sum(1).tolist()
    for i, ref in enumerate(encoder.encode(prompts)):  # fp32 reference vs the bf16 encode: per-row relative error
        got = store.embedding(i).float()
        assert ((got - ref).norm(dim=-1) <= 2e-2 * ref.norm(dim=-1) + 1e-6).all()


def test_safetensors_rows_read_exact_slices(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(7, 3, 2).to(torch.bfloat16), "b": torch.arange(10, dtype=torch.int64),
               "c": torch.randn(4, 5)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"x": "y"})
    rows = ep.SafetensorsRows(tmp_path / "t.safetensors")
    assert sorted(rows.keys()) == ["a", "b", "c"] and rows.shape("a") == [7, 3, 2]
    for name, t in tensors.items():
        for a, b in ((0, 1), (2, 4), (0, len(t))):
            got = rows.rows(name, a, b)
            assert got.dtype == t.dtype and torch.equal(got, t[a:b])
    with pytest.raises(IndexError, match="rows 3:6 of c out of range"):
        rows.rows("c", 3, 6)
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-8])  # a file cut short: the last tensor's last row is gone
    last = max(rows.entries, key=lambda k: rows.entries[k][0])
    with pytest.raises(ValueError, match="truncated"):
        rows.rows(last, 0, rows.shape(last)[0])
