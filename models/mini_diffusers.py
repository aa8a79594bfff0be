"""Write a mini model in the diffusers layout with diffusers' and transformers' own classes and
`save_pretrained`, so the folder is exactly what `WanPipeline.from_pretrained` /
`WanImageToVideoPipeline.from_pretrained` read. Needs diffusers and transformers (test dependencies).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from models.convert import (
    clip_to_transformers_state_dict,
    diffusers_config,
    to_diffusers_state_dict,
    to_diffusers_vae_state_dict,
    umt5_to_transformers_state_dict,
)

if TYPE_CHECKING:
    from models.mini import MiniModel

# Sharded variant: about three shards for the mini transformer (diffusers splits by byte size).
_MINI_SHARD_SIZE = "200KB"


def _import():
    try:
        import diffusers
        import transformers
    except ImportError as e:  # pragma: no cover - both are test dependencies
        raise ImportError("writing the diffusers layout needs diffusers and transformers "
                          "(pip install diffusers transformers)") from e
    return diffusers, transformers


def _strict_load(module, state: dict, what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    # transformers ties the UMT5 input embedding to `shared`; that key is expected to be absent
    missing = [k for k in missing if k != "encoder.embed_tokens.weight"]
    if missing or unexpected:
        raise KeyError(f"{what}: converted keys do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")


def transformer_of(model: MiniModel):
    """diffusers `WanTransformer3DModel` holding the mini DiT's weights."""
    diffusers, _ = _import()
    net = diffusers.WanTransformer3DModel(**diffusers_config(model.dit.config))
    _strict_load(net, to_diffusers_state_dict(model.dit.state_dict()), "transformer")
    return net.eval()


def vae_of(model: MiniModel):
    """diffusers `AutoencoderKLWan` holding the mini VAE's weights."""
    diffusers, _ = _import()
    cfg = model.vae.config
    net = diffusers.AutoencoderKLWan(
        base_dim=cfg["dim"], z_dim=cfg["z_dim"], dim_mult=cfg["dim_mult"], num_res_blocks=cfg["num_res_blocks"],
        attn_scales=cfg["attn_scales"], temperal_downsample=cfg["temporal_downsample"], dropout=cfg["dropout"],
        latents_mean=cfg["latent_mean"], latents_std=cfg["latent_std"])
    _strict_load(net, to_diffusers_vae_state_dict(model.vae.state_dict()), "vae")
    return net.eval()


def text_encoder_of(model: MiniModel):
    """transformers `UMT5EncoderModel` holding the mini umT5's weights."""
    _, transformers = _import()
    c = model.text_encoder.config
    config = transformers.UMT5Config(
        vocab_size=c["vocab_size"], d_model=c["dim"], d_kv=c["dim_attn"] // c["num_heads"], d_ff=c["dim_ffn"],
        num_heads=c["num_heads"], num_layers=c["num_layers"], relative_attention_num_buckets=c["num_buckets"],
        relative_attention_max_distance=c["max_distance"], feed_forward_proj="gated-gelu",
        layer_norm_epsilon=c["eps"], dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
    net = transformers.UMT5EncoderModel(config)
    _strict_load(net, umt5_to_transformers_state_dict(model.text_encoder.state_dict()), "text_encoder")
    return net.eval()


def image_encoder_of(model: MiniModel):
    """transformers `CLIPVisionModel` holding the mini CLIP tower's weights (no projection, as diffusers' Wan
    I2V stores it)."""
    _, transformers = _import()
    c = model.image_encoder.config
    config = transformers.CLIPVisionConfig(
        hidden_size=c["dim"], intermediate_size=int(c["dim"] * c["mlp_ratio"]), num_hidden_layers=c["num_layers"],
        num_attention_heads=c["num_heads"], image_size=c["image_size"], patch_size=c["patch_size"],
        hidden_act="gelu", layer_norm_eps=c["eps"], projection_dim=c["out_dim"], attention_dropout=0.0)
    net = transformers.CLIPVisionModel(config)
    state = clip_to_transformers_state_dict(model.image_encoder.state_dict())
    if not any(k.startswith("vision_model.") for k in net.state_dict()):  # transformers >= 5 names
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    _strict_load(net, state, "image_encoder")
    return net.eval()


def _tokenizer(model: MiniModel, transformers, folder: Path):
    from models.mini import write_tokenizer_folder

    write_tokenizer_folder(folder, model.tokenizer)
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def write_diffusers(out: Path, model: MiniModel, sharded: bool = False) -> Path:
    """model_index.json + one folder per component, through the pipeline's own `save_pretrained`."""
    diffusers, transformers = _import()
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  num_train_timesteps=1000, flow_shift=3.0)
    parts = dict(tokenizer=_tokenizer(model, transformers, out / "tokenizer"), text_encoder=text_encoder_of(model),
                 vae=vae_of(model), scheduler=scheduler, transformer=transformer_of(model))
    if model.task == "i2v":
        size = model.image_encoder.config["image_size"]
        parts["image_encoder"] = image_encoder_of(model)
        parts["image_processor"] = transformers.CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        pipe = diffusers.WanImageToVideoPipeline(**parts)
    else:
        pipe = diffusers.WanPipeline(**parts)
    pipe.save_pretrained(str(out), safe_serialization=True)
    if sharded:  # the transformer alone, as in the 14B folders
        shutil.rmtree(out / "transformer")
        parts["transformer"].save_pretrained(str(out / "transformer"), safe_serialization=True,
                                             max_shard_size=_MINI_SHARD_SIZE)
    index = json.loads((out / "model_index.json").read_text())
    if "transformer" not in index:
        raise RuntimeError(f"diffusers wrote no transformer entry in {out / 'model_index.json'}")
    return out
