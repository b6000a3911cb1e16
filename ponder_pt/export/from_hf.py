"""Hugging Face directory -> ponder-pt checkpoint (`ponder-pt convert from-hf`).

Design: a fresh run starts from given weights through one config key,
`checkpoint.init_from` (an HF directory or a checkpoint.dir). The trainer loads those weights
into the freshly built model (this rank's TP shards, `models.hf.load_initial_weights`) before
DeepSpeed wraps it, so every ZeRO stage and TP degree works and no optimizer state is faked;
resuming from `checkpoint.dir` always wins over it. `convert from-hf` writes OUT as a
checkpoint.dir:

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

import os
import shutil
from typing import Optional, Sequence

from ..config import Config, fill_vocab, load_config, write_run_config
from ..tokenizer import load_tokenizer, pad_vocab_size
from ..weights.files import file_sizes, tag_for, write_meta
from ..weights.hf_config import model_config_from_hf, read_hf_config
from ..weights.hf_weights import hf_to_full, read_hf_weights
from ..weights.layout import pad_vocab
from ..weights.native import write_tp_shards


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
    hf_cfg, extra = read_hf_config(hf_dir)
    defaults = []
    if extra.get("ponder_steps"):
        defaults += [f"ponder.steps={extra['ponder_steps']}",
                     f"ponder.scale_embeds={extra.get('ponder_scale_embeds', True)}",
                     f"ponder.scale_initial_by_steps="
                     f"{extra.get('ponder_scale_initial_by_steps', False)}",
                     f"ponder.top_k={extra.get('ponder_top_k', 0)}",
                     f"ponder.feedback={extra.get('ponder_feedback') or 'embedding'}"]
        if (extra.get("ponder_halting") or "off") != "off":  # adaptive pondering
            defaults += [f"ponder.halting.mode={extra['ponder_halting']}",
                         f"ponder.halting.q={extra.get('ponder_halt_q', 0.5)}"]
    if extra.get("thought_count"):  # latent thoughts
        defaults += [f"thoughts.count={extra['thought_count']}",
                     f"thoughts.scale_embeds={extra.get('thought_scale_embeds', True)}"]
    if extra.get("pause_token_id") is not None:
        defaults += [f"pause.token_id={extra['pause_token_id']}",
                     f"pause.inference_pauses={extra.get('default_pauses', 10)}"]
    if extra.get("pause_every_token"):  # PonderLM-2's pause baseline
        defaults += ["pause.mode=every_token", f"pause.per_token={extra['pause_every_token']}"]
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
        fill_vocab(cfg, tok)  # pause.token_id with pauses on; the rows are HF's (above)
        if cfg.pause.token_id is not None:
            rows = max(rows, pad_vocab_size(cfg.pause.token_id + 1,
                                            cfg.model.make_vocab_size_divisible_by, tp))
    cfg.model.vocab_size = rows
    cfg.checkpoint.init_from = os.path.abspath(out)
    full = pad_vocab(hf_to_full(read_hf_weights(hf_dir), cfg.model), rows)

    tag = tag_for(0)
    write_tp_shards(out, tag, full, cfg.model, tp, progress)
    write_meta(out, tag, {"tag": tag, "step": 0, "world_size": tp, "dp": 1, "zero_stage": 0,
                          "layout": {"tp": tp, "pp": 1, "dp": 1, "zero_stage": 0},
                          "state": {"step": 0}, "files": file_sizes(os.path.join(out, tag)),
                          "source": os.path.abspath(hf_dir)})
    write_run_config(cfg, out)
    return cfg


def cmd_from_hf(args) -> int:
    cfg = hf_to_checkpoint(args.hf, args.out, args.overrides, args.tp, args.pp,
                           progress=not args.quiet)
    print(f"wrote {args.out} ({cfg.model.arch}, {cfg.model.num_layers} layers, ponder.steps="
          f"{cfg.ponder.steps}, tp={args.tp}); train from it with --config "
          f"{os.path.join(args.out, 'run_config.yaml')} (checkpoint.init_from is set)")
    return 0
