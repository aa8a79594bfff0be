"""Inference: schedulers, the T2V/I2V pipeline, video writing (and, later, LoRA, quantization, serving)."""

from inference.loader import load_pipeline

__all__ = ["load_pipeline"]
