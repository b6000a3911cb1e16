"""Tiny ponder-pt Hugging Face exports (random weights, local tokenizer) for early-exit tests."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def pondering_export(out_dir: str, tokenizer_path: str, *, arch: str = "gpt_neox",
                     seed: int = 1, **ponder) -> str:
    """`ponder-pt convert to-hf`-style directory of a tiny random model with ponder.* set."""
    from _model_helpers import random_hf_model, tiny_model_config

    from ponder_pt.config import Config
    from ponder_pt.export import export_full
    from ponder_pt.weights.hf_weights import hf_to_full

    cfg = Config()
    cfg.model = tiny_model_config(arch, vocab_size=640, max_seq_len=64)
    for key, value in ponder.items():
        setattr(cfg.ponder, key, value)
    hf = random_hf_model(cfg.model, seed=seed)
    export_full(cfg, hf_to_full(hf.state_dict(), cfg.model), out_dir,
                tokenizer_path=tokenizer_path, progress=False)
    return out_dir
