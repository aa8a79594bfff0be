"""Wan2.1 networks with the official checkpoint keys: the DiT, the causal VAE, umT5 and the CLIP image tower.

The networks know nothing about diffusion (that lives in inference/ and distill/).
"""

from models.clip import CLIPImageEncoder
from models.t5 import UMT5Encoder
from models.vae import WanVAE
from models.wan_model import WanModel

__all__ = ["WanModel", "WanVAE", "UMT5Encoder", "CLIPImageEncoder"]
