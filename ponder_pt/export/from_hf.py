"""Hugging Face directory -> ponder-pt checkpoint (`ponder-pt convert from-hf`), and the
trainer's `checkpoint.init_from`.

Design: a fresh run starts from given weights through one config key,
`checkpoint.init_from` (an HF directory or a checkpoint.dir). The trainer loads those weights
into the freshly built model (this rank's TP shards) before DeepSpeed wraps it, so every ZeRO
stage and TP degree works and no optimizer state is faked; resuming from `checkpoint.dir`
always wins over it. `convert from-hf` writes OUT as a checkpoint.dir:

    OUT/run_config.yaml         model shape from the HF config, --set overrides (ponder.*,
                                pause.*, ...), parallel.tp/pp, data.tokenizer = OUT/tokenizer,
                                checkpoint.init_from = OUT
    OUT/tokenizer/              the HF directory's tokenizer.json / tokenizer.model
    OUT/step_00000000/          mp_rank_XX_model_states.pt (DeepSpeed's file naming, "module" =
                                TP rank XX's shards) + ponder_meta.json; OUT/latest

so `ponder-pt generate/eval/convert to-hf` read it like any training checkpoint, and
`ponder-pt train --config OUT/run_config.yaml --set data.train=... --set checkpoint.dir=RUN`
trains from it. A pondering model can be made from a plain one (`--set ponder.steps=3`); a
`<pause>` row is reserved when `--set pause.rate=...` is given (zero-initialised when new).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Optional, Sequence

import torch

from ..config import Config, load_config
from ..models import parallel as par
from ..models.hf import hf_to_full, load_full_state_dict, model_config_from_hf
from .native import read_checkpoint, tp_spec

_PONDER_KEYS = ("ponder_steps", "ponder_scale_embeds", "ponder_scale_initial_by_steps",
                "ponder_top_k", "ponder_feedback", "pause_token_id", "default_pauses",
                "ponder_transformers", "auto_map")


def read_hf_config(path: str):
    """(stock GPTNeoXConfig/LlamaConfig/GPT2Config, our extra fields) of an HF dir (ponder
    exports too)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        raw = json.load(fh)
    extra = {k: raw.pop(k) for k in _PONDER_KEYS if k in raw}
    kind = raw.get("model_type", "").removeprefix("ponder_")
    classes = {"gpt_neox": GPTNeoXConfig, "llama": LlamaConfig, "gpt2": GPT2Config}
    if kind not in classes:
        raise ValueError(f"{path}: unsupported model_type {raw.get('model_type')!r} "
                         "(gpt_neox, llama or gpt2)")
    raw["model_type"] = kind
    raw.pop("architectures", None)
    return classes[kind].from_dict(raw), extra


def read_hf_weights(path: str) -> dict:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        from safetensors.torch import load_file

        sd = {}
        for f in files:
            sd.update(load_file(f))
        return sd
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not bins:
        raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    sd = {}
    for f in bins:
        sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def _pad_vocab(full: dict, rows: int) -> dict:
    for name in ("embed.weight", "output.weight"):
        if name in full:
            t = full[name]
            if t.shape[0] > rows:
                raise ValueError(f"{name}: source has {t.shape[0]} vocabulary rows, the model "
                                 f"{rows}")
            if t.shape[0] < rows:
                full[name] = torch.cat([t, t.new_zeros((rows - t.shape[0], t.shape[1]))])
    return full


def load_initial_weights(model: torch.nn.Module, path: str, unsafe_unpickle: bool = False
                         ) -> None:
    """Copy the weights of an HF dir or a checkpoint.dir into `model` (this rank's shards).
    Vocabulary rows beyond the source's (TP padding, a new <pause>) are zero. A checkpoint.dir
    is read without running code from it unless `unsafe_unpickle`
    (checkpoint.unsafe_unpickle, see engine.checkpoint.load_checkpoint_file)."""
    cfg = model.cfg
    if os.path.exists(os.path.join(path, "config.json")):
        full = hf_to_full(read_hf_weights(path), cfg)
    else:
        src_cfg, full, _ = read_checkpoint(path, unsafe_unpickle=unsafe_unpickle)
        for key in ("arch", "num_layers", "hidden_size", "num_heads", "kv_heads", "ffn_size",
                    "tie_embeddings"):
            if getattr(src_cfg.model, key) != getattr(cfg, key):
                raise ValueError(f"checkpoint.init_from {path}: model.{key} is "
                                 f"{getattr(src_cfg.model, key)} there, {getattr(cfg, key)} here")
        _pad_vocab(full, cfg.vocab_size)
    load_full_state_dict(model, full, source=f"checkpoint.init_from {path}")


def _copy_tokenizer(hf_dir: str, out: str) -> Optional[str]:
    dst = os.path.join(out, "tokenizer")
    for name in ("tokenizer.json", "tokenizer.model"):
        src = os.path.join(hf_dir, name)
        if os.path.exists(src):
            os.makedirs(dst, exist_ok=True)
            shutil.copy(src, os.path.join(dst, name))
            return dst
    return None


def hf_to_checkpoint(hf_dir: str, out: str, overrides: Sequence[str] = (), tp: int = 1,
                     pp: int = 1, progress: bool = True) -> Config:
    """Write OUT (see the module docstring); returns its run config."""
    from tqdm import tqdm

    from ..engine.checkpoint import META, _atomic_write, _file_sizes, tag_for
    from ..tokenizer import load_tokenizer, pad_vocab_size

    hf_cfg, extra = read_hf_config(hf_dir)
    defaults = []
    if extra.get("ponder_steps"):
        defaults += [f"ponder.steps={extra['ponder_steps']}",
                     f"ponder.scale_embeds={extra.get('ponder_scale_embeds', True)}",
                     f"ponder.scale_initial_by_steps="
                     f"{extra.get('ponder_scale_initial_by_steps', False)}",
                     f"ponder.top_k={extra.get('ponder_top_k', 0)}",
                     f"ponder.feedback={extra.get('ponder_feedback') or 'embedding'}"]
    if extra.get("pause_token_id") is not None:
        defaults += [f"pause.token_id={extra['pause_token_id']}",
                     f"pause.inference_pauses={extra.get('default_pauses', 10)}"]
    cfg = load_config(None, [*defaults, *overrides, f"parallel.tp={tp}", f"parallel.pp={pp}"],
                      validate=False)
    cfg.model = model_config_from_hf(hf_cfg, base=cfg.model)
    os.makedirs(out, exist_ok=True)
    tok_dir = _copy_tokenizer(hf_dir, out)
    # keep the HF rows when TP divides them (exact round trips); else pad like Megatron
    rows = hf_cfg.vocab_size
    if rows % tp:
        rows = pad_vocab_size(rows, cfg.model.make_vocab_size_divisible_by, tp)
    if tok_dir:
        cfg.data.tokenizer = os.path.abspath(tok_dir)
        tok = load_tokenizer(tok_dir)
        if cfg.pause.rate > 0 or cfg.pause.token_id is not None:
            if cfg.pause.token_id is None:
                cfg.pause.token_id = tok.layout(cfg.model.make_vocab_size_divisible_by, tp,
                                                need_pause=True).pause_id
            rows = max(rows, pad_vocab_size(cfg.pause.token_id + 1,
                                            cfg.model.make_vocab_size_divisible_by, tp))
    cfg.model.vocab_size = rows
    cfg.checkpoint.init_from = os.path.abspath(out)
    full = _pad_vocab(hf_to_full(read_hf_weights(hf_dir), cfg.model), rows)

    tag = tag_for(0)
    root = os.path.join(out, tag)
    os.makedirs(root, exist_ok=True)
    for r in tqdm(range(tp), desc="writing TP shards", disable=not progress):
        module = {}
        for name, t in full.items():
            spec = tp_spec(name, cfg.model)
            module[name] = (par.shard(t, *spec, rank=r, world=tp) if spec else t).clone()
        torch.save({"module": module, "mp_world_size": tp},
                   os.path.join(root, f"mp_rank_{r:02d}_model_states.pt"))
    meta = {"tag": tag, "step": 0, "world_size": tp, "dp": 1, "zero_stage": 0,
            "state": {"step": 0}, "files": _file_sizes(root), "source": os.path.abspath(hf_dir)}
    _atomic_write(os.path.join(root, META), json.dumps(meta, indent=1))
    _atomic_write(os.path.join(out, "latest"), tag)
    from ..engine.trainer import write_run_config

    write_run_config(cfg, out)
    return cfg


def cmd_from_hf(args) -> int:
    cfg = hf_to_checkpoint(args.hf, args.out, args.overrides, args.tp, args.pp,
                           progress=not args.quiet)
    print(f"wrote {args.out} ({cfg.model.arch}, {cfg.model.num_layers} layers, ponder.steps="
          f"{cfg.ponder.steps}, tp={args.tp}); train from it with --config "
          f"{os.path.join(args.out, 'run_config.yaml')} (checkpoint.init_from is set)")
    return 0
