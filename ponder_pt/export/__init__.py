"""Hugging Face export and import: `checkpoint_to_hf` (convert to-hf), `hf_to_checkpoint`
(convert from-hf), `read_checkpoint` (any TP/PP/ZeRO training checkpoint -> full weights)."""

from .from_hf import hf_to_checkpoint
from .native import read_checkpoint
from .to_hf import checkpoint_to_hf, export_full

__all__ = ["checkpoint_to_hf", "export_full", "hf_to_checkpoint", "read_checkpoint"]
