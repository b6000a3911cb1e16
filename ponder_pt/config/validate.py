"""Reject impossible configurations before any process group starts.

Every message names the dotted key and says what to change.
"""

from __future__ import annotations

from typing import Optional

from .errors import ConfigError
from .exportable import ROTARY_ARCHS, export_problems
from .init_source import init_from_problems
from .schema import Config, parse_blend

ARCHS = ("gpt_neox", "llama", "gpt2")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("torch", "deepspeed")
CHECKPOINTING = ("none", "full", "selective")
LR_DECAYS = ("cosine", "linear", "constant")
PONDER_FEEDBACKS = ("embedding", "hidden")
HALTING_MODES = ("off", "pondernet", "palbert")
TRAIN_EXITS = ("dense", "frozen")
THOUGHT_PREFILLS = ("exact", "jacobi")
PAUSE_MODES = ("random", "every_token")


def _divisors_hint(n: int) -> str:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(str(d) for d in divs[:12])


def problems(cfg: Config, world_size: Optional[int] = None,
             vocab_size: Optional[int] = None) -> list[str]:
    """All problems found in `cfg`; `world_size` and the padded `vocab_size` when known."""
    out: list[str] = []
    m, par, tr, d = cfg.model, cfg.parallel, cfg.train, cfg.data

    if m.arch not in ARCHS:
        out.append(f"model.arch: {m.arch!r} is not one of {ARCHS}")
    for key in ("num_layers", "hidden_size", "num_heads"):
        if getattr(m, key) < 1:
            out.append(f"model.{key}: must be >= 1, got {getattr(m, key)}")
    if m.num_heads >= 1 and m.hidden_size % m.num_heads:
        out.append(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads="
                   f"{m.num_heads}; choose num_heads among {_divisors_hint(m.hidden_size)}")
    if m.num_kv_heads is not None and (m.num_kv_heads < 1 or m.num_heads % m.num_kv_heads):
        out.append(f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}")
    if m.num_heads >= 1 and m.hidden_size % m.num_heads == 0 and m.arch in ROTARY_ARCHS:
        rot = int(m.head_dim * m.rotary_pct)
        if 0.0 < m.rotary_pct <= 1.0 and rot % 2:  # the range: export_problems below
            out.append(f"model.rotary_pct={m.rotary_pct} gives {rot} rotary dims of head_dim "
                       f"{m.head_dim}; it must be even: adjust rotary_pct or the head size")
    if m.arch in ARCHS:  # every config that trains must export (config/exportable.py)
        out.extend(export_problems(m))
    if m.activation_checkpointing not in CHECKPOINTING:
        out.append(f"model.activation_checkpointing: {m.activation_checkpointing!r} is not one of "
                   f"{CHECKPOINTING}")
    if m.make_vocab_size_divisible_by < 1:
        out.append("model.make_vocab_size_divisible_by: must be >= 1")
    if m.vocab_chunk < 0:
        out.append(f"model.vocab_chunk: must be >= 0 (0 = off, else vocabulary rows per chunk "
                   f"of the loss and the pondering softmax, e.g. 4096), got {m.vocab_chunk}")
    if not 0.0 <= m.dropout < 1.0:
        out.append(f"model.dropout: must be in [0, 1), got {m.dropout}")

    # parallel layout
    if par.tp < 1 or par.pp < 1:
        out.append(f"parallel.tp/pp: must be >= 1, got tp={par.tp} pp={par.pp}")
    else:
        if m.num_heads % par.tp:
            out.append(f"model.num_heads={m.num_heads} is not divisible by parallel.tp={par.tp}; "
                       f"use tp in {_divisors_hint(m.num_heads)}")
        if m.kv_heads % par.tp:
            out.append(f"model.num_kv_heads={m.kv_heads} is not divisible by parallel.tp={par.tp}; "
                       f"use tp in {_divisors_hint(m.kv_heads)}")
        if m.ffn_size % par.tp:
            out.append(f"model.ffn_hidden_size={m.ffn_size} is not divisible by parallel.tp={par.tp}")
        if m.num_layers < par.pp:
            out.append(f"parallel.pp={par.pp} exceeds model.num_layers={m.num_layers}; "
                       f"use pp <= {m.num_layers}")
        if par.sequence_parallel and par.tp == 1:
            out.append("parallel.sequence_parallel needs parallel.tp > 1; set it to false or raise tp")
        if par.sequence_parallel and d.seq_len % par.tp:
            out.append(f"data.seq_len={d.seq_len} must be divisible by parallel.tp={par.tp} "
                       "with sequence parallelism")
    if par.zero_stage not in (0, 1, 2, 3):
        out.append(f"parallel.zero_stage: must be 0, 1, 2 or 3, got {par.zero_stage}")
    elif par.pp > 1 and par.zero_stage >= 2:
        out.append(f"parallel.zero_stage={par.zero_stage} cannot be combined with pipeline "
                   f"parallelism (parallel.pp={par.pp}); DeepSpeed's pipeline engine supports "
                   "ZeRO 0/1 and ponder-pt runs it on ZeRO-1: set parallel.zero_stage=1 or "
                   "parallel.pp=1")
    elif par.pp > 1 and par.zero_stage == 0:
        # the pipeline path (training, checkpoints, their export) is built and tested on ZeRO-1
        out.append(f"parallel.pp={par.pp} needs parallel.zero_stage=1 (pipeline runs, their "
                   "checkpoints and their export are supported on ZeRO-1)")
    if par.cpu_offload and par.zero_stage == 0:
        out.append("parallel.cpu_offload needs ZeRO >= 1; set parallel.zero_stage")

    world = world_size if world_size is not None else par.world_size
    if world is not None and par.tp >= 1 and par.pp >= 1:
        mp = par.tp * par.pp
        if world % mp:
            out.append(f"world size {world} is not divisible by parallel.tp x parallel.pp = {mp}")
        else:
            dp = world // mp
            if tr.micro_batch >= 1 and tr.global_batch % (tr.micro_batch * dp):
                out.append(f"train.global_batch={tr.global_batch} is not divisible by "
                           f"train.micro_batch x data-parallel size = {tr.micro_batch} x {dp}; "
                           f"use a global batch that is a multiple of {tr.micro_batch * dp}")

    # training
    if tr.iters < 1:
        out.append(f"train.iters: must be >= 1, got {tr.iters}")
    if tr.micro_batch < 1:
        out.append(f"train.micro_batch: must be >= 1, got {tr.micro_batch}")
    elif tr.global_batch < tr.micro_batch:
        out.append(f"train.global_batch={tr.global_batch} is smaller than train.micro_batch="
                   f"{tr.micro_batch}")
    if tr.lr <= 0:
        out.append(f"train.lr: must be > 0, got {tr.lr}")
    elif tr.min_lr_value > tr.lr or tr.min_lr_value < 0:
        out.append(f"train.min_lr={tr.min_lr_value} must be in [0, train.lr={tr.lr}]")
    if tr.warmup < 0 or tr.warmup_iters > tr.iters:
        out.append(f"train.warmup={tr.warmup} gives {tr.warmup_iters} warmup iterations, more than "
                   f"train.iters={tr.iters}; use a fraction < 1 or fewer iterations")
    if tr.lr_decay not in LR_DECAYS:
        out.append(f"train.lr_decay: {tr.lr_decay!r} is not one of {LR_DECAYS}")
    if tr.optimizer not in OPTIMIZERS:
        out.append(f"train.optimizer: {tr.optimizer!r} is not one of {OPTIMIZERS}")
    if tr.precision not in PRECISIONS:
        out.append(f"train.precision: {tr.precision!r} is not one of {PRECISIONS}")
    if tr.eval_interval < 1 or tr.eval_iters < 0:
        out.append("train.eval_interval must be >= 1 and train.eval_iters >= 0")
    if tr.compile and (par.tp > 1 or par.pp > 1):
        out.append(f"train.compile=true is supported at parallel.tp=1 and parallel.pp=1 only "
                   f"(got tp={par.tp} pp={par.pp}); set train.compile=false or tp=pp=1")

    # methods
    p = cfg.ponder
    if p.steps < 0:
        out.append(f"ponder.steps: must be >= 0 (0 = off), got {p.steps}")
    if p.top_k < 0:
        out.append(f"ponder.top_k: must be >= 0 (0 = full vocabulary), got {p.top_k}")
    if p.feedback not in PONDER_FEEDBACKS:
        out.append(f"ponder.feedback: {p.feedback!r} is not one of {PONDER_FEEDBACKS} "
                   "(embedding = PonderingLM's probability-weighted embedding, hidden = the "
                   "looped baseline feeding back the final-norm hidden state)")
    elif p.feedback == "hidden" and p.top_k > 0:
        out.append(f"ponder.top_k={p.top_k} has no effect with ponder.feedback=hidden (no "
                   "softmax is fed back); set ponder.top_k=0")
    out.extend(halting_problems(cfg))
    out.extend(draft_loss_problems(cfg))
    out.extend(thoughts_problems(cfg))
    if not 0.0 <= cfg.pause.rate < 1.0:
        out.append(f"pause.rate: must be in [0, 1) (0 = off), got {cfg.pause.rate}")
    out.extend(every_token_problems(cfg))
    if cfg.pause.inference_pauses < 0:
        out.append("pause.inference_pauses: must be >= 0")
    vocab = vocab_size if vocab_size is not None else m.vocab_size
    if vocab is not None:
        if vocab % par.tp:
            out.append(f"vocabulary size {vocab} is not divisible by parallel.tp={par.tp}")
        if p.top_k >= vocab:
            out.append(f"ponder.top_k={p.top_k} must be smaller than the vocabulary ({vocab})")
        tid = cfg.pause.token_id
        if tid is not None and not 0 <= tid < vocab:
            out.append(f"pause.token_id={tid} is outside the vocabulary [0, {vocab}); leave it "
                       "unset to use the tokenizer's reserved <pause> row")

    # data
    if d.seq_len < 2:
        out.append(f"data.seq_len: must be >= 2, got {d.seq_len}")
    if d.seq_len > m.max_seq_len:
        out.append(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
                   + ("GPT-2 has model.max_seq_len learned positions (n_positions): shorten "
                      "data.seq_len or raise model.max_seq_len (a new model only)"
                      if m.arch == "gpt2" else
                      "raise model.max_seq_len or shorten data.seq_len"))
    try:
        parts = [float(x) for x in d.split.replace("/", ",").split(",")]
        if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0 or parts[0] <= 0:
            raise ValueError
    except ValueError:
        out.append(f"data.split={d.split!r}: expected three non-negative weights "
                   "train,valid,test with train > 0, e.g. '969,30,1'")
    for key in ("train", "valid", "test"):
        try:
            parse_blend(getattr(d, key), f"data.{key}")
        except ValueError as exc:
            out.append(str(exc))
    if d.num_workers < 0:
        out.append("data.num_workers: must be >= 0")
    if cfg.checkpoint.interval < 1 or cfg.checkpoint.keep_last < 1:
        out.append("checkpoint.interval and checkpoint.keep_last must be >= 1")
    if not cfg.dist.timeout >= 10:
        out.append(f"dist.timeout={cfg.dist.timeout}: must be at least 10 seconds (a "
                   "collective that waits less fails on ordinary start-up delays)")
    if cfg.checkpoint.init_from:  # the source's shape against ours (config/init_source.py)
        out.extend(init_from_problems(cfg, vocab))
    return out


def halt_q_problem(q: float, name: str = "ponder.halting.q") -> Optional[str]:
    """The problem with Q-exit threshold `q` (config key or option `name`), or None."""
    if 0.0 < q <= 1.0:
        return None
    return (f"{name}={q}: must be in (0, 1] (a token exits at the first pass whose cumulative "
            "exit probability reaches q; 1 = never early)")


def halting_problems(cfg: Config) -> list[str]:
    """`ponder.halting.*` (adaptive pondering) against the rest of the run."""
    h = cfg.ponder.halting
    if h.mode not in HALTING_MODES:
        return [f"ponder.halting.mode: {h.mode!r} is not one of {HALTING_MODES}"]
    out = [p for p in [halt_q_problem(h.q)] if p]
    if h.mode == "off":
        if h.head_only:
            out.append("ponder.halting.head_only=true needs a halting head: set "
                       "ponder.halting.mode=palbert or pondernet")
        return out
    if cfg.ponder.steps < 1:
        out.append(f"ponder.halting.mode={h.mode} needs pondering passes to halt over: set "
                   f"ponder.steps >= 1 (got {cfg.ponder.steps}) or ponder.halting.mode=off")
    if h.beta < 0:
        out.append(f"ponder.halting.beta={h.beta}: must be >= 0 (weight of the KL to the prior)")
    if not 0.0 < h.prior < 1.0:
        out.append(f"ponder.halting.prior={h.prior}: must be in (0, 1) (lambda_p of the "
                   "geometric prior over passes)")
    if h.train_exits not in TRAIN_EXITS:
        out.append(f"ponder.halting.train_exits: {h.train_exits!r} is not one of {TRAIN_EXITS}")
    if h.head_only and not cfg.checkpoint.init_from:
        out.append("ponder.halting.head_only=true trains only the halting head, so the backbone "
                   "must come from somewhere: set checkpoint.init_from to a trained checkpoint "
                   "or HF directory with the same ponder.steps")
    if cfg.parallel.pp > 1 and h.train_exits == "frozen":
        out.append(f"ponder.halting.train_exits=frozen is not supported with pipeline "
                   f"parallelism (parallel.pp={cfg.parallel.pp}): later passes would need every "
                   "layer's keys/values of the earlier ones on other stages. Use "
                   "train_exits=dense with PP, or parallel.tp and ZeRO (parallel.pp=1)")
    return out


def draft_loss_problems(cfg: Config) -> list[str]:
    """`ponder.draft_loss` / `ponder.draft_passes` (the draft of speculative decoding)."""
    p = cfg.ponder
    if p.draft_loss < 0:
        return [f"ponder.draft_loss={p.draft_loss}: must be >= 0 (0 = off)"]
    if p.draft_loss == 0:
        return []
    out = []
    if not 1 <= p.draft_passes <= p.steps:
        out.append(f"ponder.draft_passes={p.draft_passes}: the draft runs passes 0..d-1 of the "
                   f"K+1, so d must be in 1..ponder.steps (= {p.steps})")
    if p.adaptive:
        out.append("ponder.draft_loss with ponder.halting.mode="
                   f"{p.halting.mode}: adaptive pondering already trains every pass's logits "
                   "(dense exits); set ponder.draft_loss=0")
    if cfg.parallel.pp > 1:
        out.append(f"ponder.draft_loss is not supported with pipeline parallelism "
                   f"(parallel.pp={cfg.parallel.pp}): the pipeline's chain carries no "
                   "per-pass loss outside adaptive pondering. Use parallel.tp and ZeRO "
                   "(parallel.pp=1), or ponder.draft_loss=0")
    return out


def every_token_problems(cfg: Config) -> list[str]:
    """`pause.mode` / `pause.per_token` against the rest of the run."""
    pz = cfg.pause
    if pz.mode not in PAUSE_MODES:
        return [f"pause.mode: {pz.mode!r} is not one of {PAUSE_MODES}"]
    if pz.mode != "every_token":
        return []
    out = []
    if pz.per_token < 1:
        out.append(f"pause.per_token: must be >= 1 with pause.mode=every_token, got "
                   f"{pz.per_token}")
    if pz.rate > 0:
        out.append(f"pause.mode=every_token with pause.rate={pz.rate}: every-token pauses are "
                   "slots of the model, not tokens of the data; set pause.rate=0")
    if cfg.ponder.steps > 0:
        out.append(f"pause.mode=every_token with ponder.steps={cfg.ponder.steps}: the two do "
                   "not compose here; set ponder.steps=0 or pause.mode=random")
    if cfg.thoughts.count > 0:
        out.append(f"pause.mode=every_token with thoughts.count={cfg.thoughts.count}: both "
                   "add slots after every token; choose one")
    if cfg.parallel.pp > 1:
        out.append(f"pause.mode=every_token is not supported with pipeline parallelism "
                   f"(parallel.pp={cfg.parallel.pp}): the pipeline's stages carry one slot per "
                   "token. Use parallel.tp and ZeRO, parallel.pp=1")
    return out


def thoughts_problems(cfg: Config) -> list[str]:
    """`thoughts.*` (latent thoughts) against the rest of the run."""
    t = cfg.thoughts
    out = []
    if t.count < 0:
        out.append(f"thoughts.count: must be >= 0 (0 = off), got {t.count}")
    if t.jacobi_iters < 0:
        out.append(f"thoughts.jacobi_iters: must be >= 0, got {t.jacobi_iters}")
    if not t.train_iters or min(t.train_iters) < 0:
        out.append(f"thoughts.train_iters: a non-empty list of Jacobi iteration counts >= 0 "
                   f"(one is drawn per step), got {t.train_iters}")
    if t.prefill not in THOUGHT_PREFILLS:
        out.append(f"thoughts.prefill: {t.prefill!r} is not one of {THOUGHT_PREFILLS}")
    if t.count <= 0:
        return out
    if cfg.ponder.steps > 0:
        out.append(f"thoughts.count={t.count} with ponder.steps={cfg.ponder.steps}: latent "
                   "thoughts and pondering passes are two ways to spend compute per token and "
                   "do not compose here; set ponder.steps=0 (and ponder.halting.mode=off) or "
                   "thoughts.count=0")
    if cfg.pause.rate > 0:
        out.append(f"thoughts.count={t.count} with pause.rate={cfg.pause.rate}: a <pause> in "
                   "the data would get thoughts of its own and shift the positions the thoughts "
                   "share; set pause.rate=0 or thoughts.count=0")
    if cfg.parallel.pp > 1:
        out.append(f"thoughts.count={t.count} is not supported with pipeline parallelism "
                   f"(parallel.pp={cfg.parallel.pp}): the number of Jacobi passes is drawn per "
                   "step, and DeepSpeed's pipeline engine fixes its chain of layers when it is "
                   "built. Use parallel.tp (with sequence_parallel) and ZeRO, parallel.pp=1")
    return out


def check(cfg: Config, world_size: Optional[int] = None, vocab_size: Optional[int] = None) -> Config:
    found = problems(cfg, world_size=world_size, vocab_size=vocab_size)
    if found:
        raise ConfigError(found)
    return cfg
