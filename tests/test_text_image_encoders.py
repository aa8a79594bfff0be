"""umT5 encoder, tokenizers, TextEncoder and the CLIP image tower: parity with transformers on tiny random
weights, real sizes on `meta`, tokenizer behaviour."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from models.clip import CLIP_MEAN, CLIP_STD, CLIPImageEncoder
from models.t5 import ByteTokenizer, HFTokenizer, TextEncoder, UMT5Encoder, clean_text, word_tokenizer

transformers = pytest.importorskip("transformers")

# ---- key tables (transformers -> official Wan) -------------------------------------------------------------

_UMT5_RENAMES = [
    (r"^shared\.weight$", "token_embedding.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight$", r"blocks.\1.attn.\2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$",
     r"blocks.\1.pos_embedding.embedding.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$", r"blocks.\1.norm1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight$", r"blocks.\1.ffn.gate.0.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight$", r"blocks.\1.ffn.fc1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight$", r"blocks.\1.ffn.fc2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$", r"blocks.\1.norm2.weight"),
    (r"^encoder\.final_layer_norm\.weight$", "norm.weight"),
]


def umt5_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in hf_state.items():
        if key == "encoder.embed_tokens.weight":  # tied to shared.weight
            continue
        for pattern, repl in _UMT5_RENAMES:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            raise KeyError(f"unmapped transformers key {key}")
    return out


_CLIP_RENAMES = [
    (r"^embeddings\.patch_embedding\.weight$", "visual.patch_embedding.weight"),
    (r"^pre_layrnorm\.(weight|bias)$", r"visual.pre_norm.\1"),
    (r"^post_layernorm\.(weight|bias)$", r"visual.post_norm.\1"),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)$", r"visual.transformer.\1.norm1.\2"),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)$", r"visual.transformer.\1.norm2.\2"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$", r"visual.transformer.\1.attn.proj.\2"),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)$", r"visual.transformer.\1.mlp.0.\2"),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)$", r"visual.transformer.\1.mlp.2.\2"),
]


def clip_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPVisionModel(WithProjection) state -> `visual.*` keys (q,k,v fused into to_qkv)."""
    state = {k.removeprefix("vision_model."): v for k, v in hf_state.items()
             if not k.endswith("position_ids")}
    out, qkv = {}, {}
    for key, value in state.items():
        if key == "embeddings.class_embedding":
            out["visual.cls_embedding"] = value.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            out["visual.pos_embedding"] = value.unsqueeze(0)
        elif key == "visual_projection.weight":  # Linear(dim, out_dim, bias=False) -> head [dim, out_dim]
            out["visual.head"] = value.t()
        elif m := re.match(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key):
            qkv[(m[1], m[3], m[2])] = value
        else:
            for pattern, repl in _CLIP_RENAMES:
                if re.match(pattern, key):
                    out[re.sub(pattern, repl, key)] = value
                    break
            else:
                raise KeyError(f"unmapped transformers key {key}")
    for layer, kind in sorted({(layer, kind) for layer, kind, _ in qkv}):
        fused = torch.cat([qkv[(layer, kind, p)] for p in "qkv"])
        out[f"visual.transformer.{layer}.attn.to_qkv.{kind}"] = fused
    return out


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights of a useful scale everywhere (reference inits leave norms at 1 and biases at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "layer_norm" in name or "layrnorm" in name:
                p.copy_((1 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise)
            elif p.ndim >= 2 and "embed" not in name and "shared" not in name and "relative" not in name:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.5 * noise)


# ---- umT5 --------------------------------------------------------------------------------------------------

TINY_T5 = dict(vocab_size=300, dim=32, dim_attn=32, dim_ffn=48, num_heads=2, num_layers=2, num_buckets=32)


def _hf_umt5(cfg: dict, eps: float = 1e-6):
    config = transformers.UMT5Config(
        vocab_size=cfg["vocab_size"], d_model=cfg["dim"], d_kv=cfg["dim_attn"] // cfg["num_heads"],
        d_ff=cfg["dim_ffn"], num_heads=cfg["num_heads"], num_layers=cfg["num_layers"],
        relative_attention_num_buckets=cfg["num_buckets"], relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=eps, dropout_rate=0.0)
    assert config.is_gated_act and config.dense_act_fn == "gelu_new"
    config._attn_implementation = "eager"
    return transformers.UMT5EncoderModel(config)


def test_umt5_matches_transformers_with_padding():
    torch.manual_seed(0)
    ref = _hf_umt5(TINY_T5).eval()
    _randomize(ref, 1)
    ours = UMT5Encoder(**TINY_T5).eval()
    ours.load_state_dict(umt5_from_hf(ref.state_dict()), strict=True)

    lengths = [170, 9, 1, 140]  # beyond max_distance 128: the clamped log buckets are exercised
    length = max(lengths)
    ids = torch.randint(3, TINY_T5["vocab_size"], (len(lengths), length))
    mask = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask  # pad id 0
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert got.dtype == torch.float32 and got.shape == (len(lengths), length, TINY_T5["dim"])
    assert (got - expected).abs().max().item() <= 1e-4

    # padding does not change the real tokens: a prompt alone == the same prompt inside a padded batch
    with torch.no_grad():
        alone = ours(ids[1:2, :9], mask[1:2, :9])
    assert (alone[0] - got[1, :9]).abs().max().item() <= 1e-5


def test_umt5_tiny_construction_and_config_round_trip():
    model = UMT5Encoder(**TINY_T5)
    again = UMT5Encoder(**model.config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in again.state_dict().items()} == shapes
    assert model.blocks[0].pos_embedding.embedding.weight.shape == (32, 2)
    assert all(not k.endswith("bias") for k in model.state_dict())


# real umT5-XXL encoder: 1 embedding + 24 x (4 attn + 3 ffn + 2 norms + 1 position bias) + final norm
UMT5_XXL_PARAMS = 5_680_910_336
UMT5_XXL_TENSORS = 242


def test_umt5_xxl_on_meta_matches_transformers():
    with torch.device("meta"):
        ours = UMT5Encoder()
        ref = _hf_umt5(dict(vocab_size=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64,
                            num_layers=24, num_buckets=32))
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == UMT5_XXL_PARAMS
    assert len(shapes) == UMT5_XXL_TENSORS
    assert sum(p.numel() for p in ref.parameters()) == UMT5_XXL_PARAMS
    assert {k: tuple(v.shape) for k, v in umt5_from_hf(ref.state_dict()).items()} == shapes
    assert shapes["blocks.23.pos_embedding.embedding.weight"] == (32, 64)
    assert shapes["blocks.0.ffn.gate.0.weight"] == (10240, 4096)


# ---- tokenizers and TextEncoder ----------------------------------------------------------------------------


def test_clean_text():
    assert clean_text("  a &amp;amp; b\n\t c  ") == "a & b c"
    assert clean_text("\u201cquoted\u201d it\u2019s") == "\"quoted\" it's"


def test_byte_tokenizer_eos_truncation_and_mask():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259
    ids, mask = tok(["ab", "", "abcdef"], max_len=4)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.tolist() == [[100, 101, 1, 0], [1, 0, 0, 0], [100, 101, 102, 1]]  # truncation keeps EOS last
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    ids, mask = tok(["ab"], max_len=8, pad_to_max=True)
    assert ids.shape == (1, 8) and mask.sum().item() == 3
    ids, _ = tok(["é"], max_len=8)  # UTF-8 bytes, not code points
    assert ids[0].tolist() == [0xC3 + 3, 0xA9 + 3, 1]


def test_hf_tokenizer_missing_folder_names_path(tmp_path):
    folder = tmp_path / "google" / "umt5-xxl"
    with pytest.raises(FileNotFoundError) as err:
        HFTokenizer(folder)
    assert str(folder / "tokenizer.json") in str(err.value) and "spiece.model" in str(err.value)


def test_hf_tokenizer_local_file_matches_tokenizers_template(tmp_path):
    """A T5-like tokenizer.json (unigram + metaspace + `$A </s>` template): our manual EOS/truncation
    agrees with the library's own special-token handling."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{w}", -1.0) for w in ("a", "red", "cat", "runs")]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tk = tokenizers.Tokenizer(tokenizers.models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tk.decoder = tokenizers.decoders.Metaspace()
    tk.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>",
                                                                 special_tokens=[("</s>", 1)])
    tk.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tk.save(str(tmp_path / "tokenizer.json"))

    tok = HFTokenizer(tmp_path)
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    texts = ["a red  cat runs", "a cat", "zebra &amp; cat"]
    ids, mask = tok(texts, max_len=64)
    for row, m, text in zip(ids, mask, texts, strict=True):
        assert row[: int(m.sum())].tolist() == tk.encode(clean_text(text)).ids
    tk.enable_truncation(max_length=3)
    ids, mask = tok(texts, max_len=3)
    assert ids[0].tolist() == tk.encode(clean_text(texts[0])).ids and ids[0, -1].item() == 1


def test_word_tokenizer_one_token_per_word_through_a_components_folder(tmp_path):
    """The tiny word vocabulary is saved as tokenizer.json in a components folder, copied with it, and read
    back through the umT5 tokenizer path: one id per word, unknown words -> <unk>, EOS last."""
    from models.codec import PCACodec
    from models.components import copy_components, load_encoders, save_components

    words = "a red square moving left a blue circle moving up".split()
    text = UMT5Encoder(vocab_size=32, dim=16, dim_attn=16, dim_ffn=32, num_heads=2, num_layers=1, num_buckets=8)
    save_components(tmp_path / "src", PCACodec(4, spatial_stride=4), text, None, tokenizer=word_tokenizer(words))
    copy_components(tmp_path / "src", tmp_path / "dst")
    _, enc, _ = load_encoders(tmp_path / "dst", "t2v", text_len=16)
    tok = enc.tokenizer
    assert isinstance(tok, HFTokenizer) and (tok.pad_id, tok.eos_id) == (0, 1)
    vocab = tok.tokenizer.get_vocab()
    assert sorted(vocab, key=vocab.get)[3:] == sorted(set(words))  # after <pad> </s> <unk>
    ids, mask = tok(["A Red square moving LEFT.", "a green square"], max_len=16)
    want = [vocab[w] for w in "a red square moving left".split()]
    assert ids[0, :7].tolist() == want + [2, 1] and int(mask[0].sum()) == 7  # "." is a token of its own: <unk>
    assert ids[1, :4].tolist() == [vocab["a"], 2, vocab["square"], 1]  # green is unknown
    emb = enc.encode(["a red square moving left", "a red circle moving left"])
    diff = (emb[0] - emb[1]).norm(dim=-1)
    assert diff[2] > 3 * diff[[0, 1, 3, 4]].max()  # the shape word's own token carries most of the difference


def test_text_encoder_trims_batches_and_caches():
    torch.manual_seed(0)
    model = UMT5Encoder(**{**TINY_T5, "vocab_size": 259}).eval()
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    enc = TextEncoder(model, ByteTokenizer(), text_len=16)
    prompts = ["a red cat", "", "a very long prompt that is truncated", "a red cat"]
    out = enc.encode(prompts)
    assert calls == [(3, 16)]  # one batched forward over the distinct prompts
    assert [tuple(e.shape) for e in out] == [(10, 32), (1, 32), (16, 32), (10, 32)]
    assert all(e.dtype == torch.float32 and not e.requires_grad for e in out)
    ids, mask = ByteTokenizer()(["a red cat"], 16)
    with torch.no_grad():
        alone = model(ids, mask)[0]
    assert (out[0] - alone).abs().max().item() <= 1e-5
    again = enc.encode(["a red cat", "blue"])
    assert calls[-1] == (1, 5) and torch.equal(again[0], out[0])  # only the new prompt is computed


def test_text_encoder_cache_is_bounded():
    model = UMT5Encoder(**{**TINY_T5, "vocab_size": 259, "num_layers": 1}).eval()
    enc = TextEncoder(model, ByteTokenizer(), text_len=8, cache_size=2)
    enc.encode(["a", "b", "c"])
    assert len(enc._cache) == 3  # never evicts prompts of the current call
    enc.encode(["d"])
    assert list(enc._cache) == ["c", "d"]


# ---- CLIP --------------------------------------------------------------------------------------------------

TINY_CLIP = dict(image_size=32, patch_size=8, dim=32, mlp_ratio=4, out_dim=16, num_heads=2, num_layers=3)


def _hf_clip(cfg: dict, with_projection: bool = True):
    config = transformers.CLIPVisionConfig(
        hidden_size=cfg["dim"], intermediate_size=int(cfg["dim"] * cfg["mlp_ratio"]),
        num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_heads"],
        image_size=cfg["image_size"], patch_size=cfg["patch_size"], hidden_act="gelu", layer_norm_eps=1e-5,
        projection_dim=cfg["out_dim"], attention_dropout=0.0)
    config._attn_implementation = "eager"
    cls = transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
    return cls(config)


def test_clip_tower_matches_transformers_penultimate():
    torch.manual_seed(0)
    ref = _hf_clip(TINY_CLIP).eval()
    _randomize(ref, 2)
    ours = CLIPImageEncoder(**TINY_CLIP).eval()
    ours.load_state_dict(clip_from_hf(ref.state_dict()), strict=True)

    pixels = torch.randn(3, 3, 32, 32)  # already preprocessed
    with torch.no_grad():
        out = ref(pixel_values=pixels, output_hidden_states=True)
        got = ours(pixels)
        full = ours.visual(pixels)
    assert got.shape == (3, 17, 32)
    assert (got - out.hidden_states[-2]).abs().max().item() <= 1e-4
    assert (full - out.last_hidden_state).abs().max().item() <= 1e-4
    # post_norm + head on the class token == transformers' image_embeds (checks the head's orientation)
    embeds = ours.visual.post_norm(full[:, 0]) @ ours.visual.head
    assert (embeds - out.image_embeds).abs().max().item() <= 1e-4


def test_clip_preprocessing_values():
    model = CLIPImageEncoder(**TINY_CLIP)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    img = torch.rand(2, 3, 32, 32) * 2 - 1  # already image_size: the bicubic resize is the identity
    assert torch.allclose(model.preprocess(img), ((img + 1) / 2 - mean) / std, atol=1e-6)
    const = torch.full((1, 3, 45, 70), 0.25)  # any size, no crop: a constant stays constant
    x = model.preprocess(const)
    assert x.shape == (1, 3, 32, 32)
    assert torch.allclose(x, (0.625 - mean) / std * torch.ones_like(x), atol=1e-5)
    img = torch.rand(2, 3, 40, 56) * 2 - 1
    expected = F.interpolate(img, size=(32, 32), mode="bicubic", align_corners=False)
    assert torch.allclose(model.preprocess(img), ((expected + 1) / 2 - mean) / std, atol=1e-6)
    feats = model.encode(img)
    assert feats.shape == (2, 17, 32) and feats.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(feats, model(model.preprocess(img)))


# real ViT-H/14 tower: patch conv + cls + pos + pre_norm + 32 x 12 + post_norm + head
CLIP_H14_PARAMS = 632_076_800
CLIP_H14_TENSORS = 392


def test_clip_vit_h14_on_meta_matches_transformers():
    real = dict(image_size=224, patch_size=14, dim=1280, mlp_ratio=4, out_dim=1024, num_heads=16,
                num_layers=32)
    with torch.device("meta"):
        ours = CLIPImageEncoder()
        ref = _hf_clip(real, with_projection=False)
        ref_proj = _hf_clip(real, with_projection=True)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == CLIP_H14_PARAMS
    assert len(shapes) == CLIP_H14_TENSORS
    # CLIPVisionModel lacks only the projection head [1280, 1024]
    assert sum(p.numel() for p in ref.parameters()) + 1280 * 1024 == CLIP_H14_PARAMS
    assert {k: tuple(v.shape) for k, v in clip_from_hf(ref_proj.state_dict()).items()} == shapes
    assert shapes["visual.head"] == (1280, 1024) and shapes["visual.pos_embedding"] == (1, 257, 1280)
    assert shapes["visual.patch_embedding.weight"] == (1280, 3, 14, 14)
    assert "visual.patch_embedding.bias" not in shapes
    assert ours.num_tokens == 257
