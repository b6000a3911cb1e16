"""The backbone of `ponder-pt sft`: our own `PonderLM` at TP = 1, whatever the source.

A training checkpoint.dir is read as is (any TP/PP/ZeRO layout, `export.native`); an HF
directory (a `convert to-hf` export: plain, pondering, looped or pause-trained, or a stock
GPT-NeoX/LLaMA model) is first converted by the launching process into OUT/backbone with
`convert from-hf`'s code, so every worker reads a checkpoint.dir and pondering (K > 0) trains
natively. OUT/final is written with `export.export_full`, recording the pause id and M.

The pause id: the backbone's own (`pause.token_id`, `pause_token_id` in config.json) when it
is pause-trained; else, when M > 0, the tokenizer's reserved row (`Tokenizer.layout`), the
embedding and head grown with zero rows if the padded vocabulary lacks it.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from ..config import load_run_config

BACKBONE_DIR = "backbone"


def is_hf_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json"))


def pause_id_for(tok, recorded: Optional[int], pauses: int) -> Optional[int]:
    """The <pause> id sft uses: the recorded one, else (M > 0) the tokenizer's reserved row."""
    if recorded is not None:
        return int(recorded)
    if pauses > 0:
        return tok.pause_row
    return None


def backbone_meta(path: str, pauses: int) -> dict:
    """Tokenizer, pause id, max_seq_len and K of a backbone without reading its weights."""
    from ..tokenizer import load_tokenizer

    if is_hf_dir(path):
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            raw = json.load(fh)
        tok = load_tokenizer(path)
        recorded, max_len = raw.get("pause_token_id"), raw.get("max_position_embeddings", 2048)
        steps = int(raw.get("ponder_steps", 0) or 0)
    else:
        cfg = load_run_config(path)
        tok = load_tokenizer(cfg.data.tokenizer)
        recorded, max_len, steps = cfg.pause.token_id, cfg.model.max_seq_len, cfg.ponder.steps
    return {"tokenizer": tok, "pause_id": pause_id_for(tok, recorded, pauses),
            "max_seq_len": int(max_len), "ponder_steps": steps}


def native_backbone(path: str, out: str) -> str:
    """`path` when it is a checkpoint.dir; an HF directory converted to OUT/backbone."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path}: no such directory")
    if not is_hf_dir(path):
        load_run_config(path)  # a clear error when it is neither
        return path
    from ..export.from_hf import hf_to_checkpoint

    dst = os.path.join(out, BACKBONE_DIR)
    shutil.rmtree(dst, ignore_errors=True)
    hf_to_checkpoint(path, dst, progress=False)
    return dst


def load_backbone(ckpt_dir: str, pauses: int, unsafe_unpickle: bool = False):
    """(run Config set up for fine-tuning, full fp32 state dict, Tokenizer, pause id)."""
    import torch

    from ..export.native import read_checkpoint
    from ..tokenizer import load_tokenizer, pad_vocab_size
    from ..weights.layout import pad_vocab

    cfg, full, _ = read_checkpoint(ckpt_dir, unsafe_unpickle=unsafe_unpickle)
    if not cfg.data.tokenizer:
        raise ValueError(f"{ckpt_dir}: its run config names no data.tokenizer")
    tok = load_tokenizer(cfg.data.tokenizer)
    divisible = cfg.model.make_vocab_size_divisible_by
    pause_id = pause_id_for(tok, cfg.pause.token_id, pauses)
    if pause_id is not None and pause_id >= cfg.model.vocab_size:
        cfg.model.vocab_size = pad_vocab_size(pause_id + 1, divisible, 1)
        tied = cfg.model.tie_embeddings
        pad_vocab(full, cfg.model.vocab_size)
        if tied:
            full.pop("output.weight", None)
    cfg.pause.token_id, cfg.pause.rate, cfg.pause.inference_pauses = pause_id, 0.0, pauses
    cfg.parallel.tp = cfg.parallel.pp = 1
    cfg.parallel.sequence_parallel = False
    cfg.parallel.cpu_offload = False
    cfg.parallel.ds_config = None
    cfg.model.activation_checkpointing = "none"
    full = {k: v.to(torch.float32) for k, v in full.items()}
    return cfg, full, tok, pause_id
