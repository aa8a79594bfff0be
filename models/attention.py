"""Multi-head attention kernel shared by the networks.

`attention(q, k, v)` takes the token-major layout of Wan (and of flash-attn): q [B, Lq, H, D],
k/v [B, Lk, H, D], and returns softmax(q k^T / sqrt(D)) v as [B, Lq, H, D]. No mask: Wan's DiT attends
over full, equally sized sequences (text is zero-padded to `text_len` on purpose, the padding rows take part
in attention).

flash-attn 2 (`flash_attn_func`) is used when it is importable and the tensors are CUDA fp16/bf16; otherwise
PyTorch's `scaled_dot_product_attention` (which picks its own flash / memory-efficient / math kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional fast path, never required
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

_HALF = (torch.float16, torch.bfloat16)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Scaled dot-product attention, Attention(Q, K, V) = softmax(Q K^T / sqrt(D)) V.

    q: [B, Lq, H, D], k and v: [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype (k, v are cast to it).
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention expects q [B,Lq,H,D], k = v [B,Lk,H,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    k, v = k.to(q.dtype), v.to(q.dtype)
    if flash_attn_func is not None and q.is_cuda and q.dtype in _HALF:
        return flash_attn_func(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
