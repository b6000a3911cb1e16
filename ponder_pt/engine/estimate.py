"""Per-GPU memory and time-to-train estimates from the config alone, for `train --dry-run`.

Memory (bytes per rank, reported for the pipeline stage that needs the most):
* model states, DeepSpeed ZeRO accounting (ZeRO paper, section 3): bf16/fp16 keep 2-byte
  params and grads plus fp32 master weights and two fp32 Adam moments (12 B/param of
  optimizer state); fp32 keeps 4-byte params and grads and 8 B of moments. ZeRO-1 shards the
  optimizer state over DP, ZeRO-2 also the grads, ZeRO-3 also the params; CPU offload moves
  the optimizer state off the GPU. Params per rank: TP-sharded matrices / tp, replicated
  norms and row-parallel biases whole; under PP a stage holds one copy of every block it runs
  in any pondering pass and of the shared embedding/head if it runs any of them (the tied
  copies of `ponder_pt/models/pipeline.py`).
* activations kept for backward per micro-batch, counted tensor by tensor from our model
  code (`models/layers.py`, `models/model.py`) for the checkpointing mode, all K+1 passes,
  and the vocabulary-sized tensors of each pass (`model.vocab_chunk`); times the micro-batches
  a pipeline stage holds in flight (1F1B: stage s keeps min(pp - s, grad-accum)).
* the backward transient: the most that backward adds on top of those activations (a
  [tokens, V] gradient, one recomputed block under full checkpointing, one vocabulary chunk's
  buffers), net of the activations that the layers after it have already freed.
Allocator overhead/fragmentation, communication buffers and other temporaries come on top.
Checked against CPU measurements (tests/test_estimate.py) and the peaks of the GPU suite's
throughput runs (tests/test_estimate_gpu.py: within a few % of torch.cuda.max_memory_allocated).

Time: train.iters x tokens/step x FLOPs/token (`flops.py`, all K+1 passes) / (GPUs x peak x
MFU), with the MFU measured by `benchmarks/gpu_suite.py` (a gpu_results.json) when one is
found, else 40 %.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
from typing import Iterator, Optional

from ..config.schema import Config, ModelConfig
from .flops import (PEAK_TFLOPS, param_count, peak_tflops, run_flops_per_token,
                    thought_pass_slots)

GiB = 2**30
DEFAULT_MFU = 0.40
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------ parameters per rank
def block_params(m: ModelConfig, tp: int = 1) -> int:
    """Parameters of one block on one TP rank (layers.py: column-parallel weights and biases
    and row-parallel weights are split over TP; row-parallel biases and norms are whole)."""
    h, f, kv = m.hidden_size, m.ffn_size, m.kv_heads * m.head_dim
    qkv, dense = h * (h + 2 * kv), h * h
    if m.arch == "llama":  # no biases, SwiGLU (gate+up fused), two RMSNorm weights
        return (qkv + dense + 3 * h * f) // tp + 2 * h
    sharded = qkv + (h + 2 * kv) + dense + h * f + f + f * h  # column biases are split too
    return sharded // tp + h + h + 4 * h  # dense / fc2 biases, two LayerNorms (w + b)


def shared_params(m: ModelConfig, vocab: int, tp: int = 1) -> int:
    """W_in, the output head (unless tied), GPT-2's replicated position table and the final
    norm on one TP rank."""
    head = 0 if m.tie_embeddings else vocab * m.hidden_size
    positions = m.max_seq_len * m.hidden_size if m.arch == "gpt2" else 0
    return (vocab * m.hidden_size + head) // tp + positions + (
        m.hidden_size if m.arch == "llama" else 2 * m.hidden_size)


# ------------------------------------------------------------------ activations per token
def block_activation_bytes(m: ModelConfig, ckpt: str, a: int, tp: int = 1,
                           sp: bool = False) -> float:
    """Bytes one block keeps for backward per token (a = activation bytes: 2 bf16, 4 fp32).
    Residual-stream tensors are a sequence shard (/tp) under sequence parallelism; the norm
    outputs are all-gathered before the TP linears, which keep the gathered copy."""
    h, f, kv = m.hidden_size, m.ffn_size, m.kv_heads * m.head_dim
    r = tp if sp else 1
    if ckpt == "full":  # torch checkpoint keeps only the block input
        return a * h / r
    if m.arch == "llama":
        # RMSNorm (fp32 math): fp32 input, normalised x, output kept by the next linear; x2
        norms = 2 * ((4 + a) * h / r + a * h)
        mlp = a * 4 * f / tp  # fc1 out (gate|up), silu(gate), silu*up kept by fc2
    else:
        # LayerNorm keeps its input x (shared by ln1/ln2: parallel residual), outputs kept
        # by qkv and fc1
        norms = a * h / r + 2 * a * h
        mlp = a * 2 * f / tp  # fc1 out kept by GELU, GELU out kept by fc2
    qkv = a * (h + 2 * kv) / tp  # q, v views and k of the fused output
    dense_in = a * h / tp  # the [s, b, h] copy of the attention output kept by dense
    # rotated q, k and the SDPA output (flash: no s x s), and its fp32 logsumexp [b, heads, s]
    core = (a * (2 * h + kv) + 4 * m.num_heads) / tp
    if ckpt == "selective":  # rotary + SDPA recomputed: their inputs are views of qkv
        core = 0.0
    return norms + qkv + dense_in + core + mlp


def vocab_layer_bytes(m: ModelConfig, vocab: int, a: int, tp: int, sp: bool, last: bool,
                      feedback: str, top_k: int, bf16: bool = False) -> float:
    """Bytes per token kept at the end of one pass (final norm and what follows it); bf16:
    the activations are bf16 (not fp16), which the TP = 1 loss keeps as they are."""
    h, r = m.hidden_size, (tp if sp else 1)
    norm = (a * h / r) if m.arch != "llama" else (4 + a) * h / r  # final norm's input
    if not last and feedback == "hidden":  # looped baseline: e + final_norm(x)
        return norm
    norm += a * h  # its (gathered) output, kept by the head / the chunked functions
    chunked = m.vocab_chunk > 0 and (last or top_k == 0)
    if chunked:  # per-token statistics; the chunked feedback keeps its fp32 share [., h]
        return norm + 8 + (0 if last else 4 * h)
    v = vocab / tp
    if last and tp == 1 and bf16:  # the bf16 CE keeps the logits and the targets' log-probs
        return norm + a * v + 4
    if last:  # megatron CE keeps the fp32 softmax (in place of the fp32 logits)
        return norm + 4 * v
    if tp == 1 and top_k <= 0:  # torch's softmax keeps its output, which p . W_in keeps too
        return norm + a * v
    # feedback: fp32 probabilities kept by the softmax, their cast kept by p . W_in
    return norm + 4 * v + (a * v if a != 4 else 0)


# ------------------------------------------------------------------ pipeline stages
def pipeline_stages(num_layers: int, steps: int, pp: int) -> list[list[tuple[str, int]]]:
    """The unrolled chain (pipeline.py) cut as DeepSpeed's partition_method="type:BlockLayer"
    cuts it: [("embed"|"feedback"|"head", -1) or ("block", i), ...] per stage."""
    chain = [("embed", -1)]
    for k in range(steps + 1):
        chain += [("block", i) for i in range(num_layers)]
        chain.append(("feedback" if k < steps else "head", -1))
    if pp == 1:
        return [chain]
    weights = [1 if kind == "block" else 0 for kind, _ in chain]
    try:
        from deepspeed.runtime.utils import partition_balanced

        parts = [int(x) for x in partition_balanced(weights, pp)]
    except ImportError:  # same block counts, boundaries may differ by a zero-weight layer
        total, cuts, seen = sum(weights), [0], 0
        for idx, w in enumerate(weights):
            seen += w
            if len(cuts) < pp and seen >= total * len(cuts) / pp:
                cuts.append(idx + 1)
        parts = cuts + [len(chain)]
    return [chain[parts[s]:parts[s + 1]] for s in range(pp)]


# ------------------------------------------------------------------ memory
def memory_estimate(cfg: Config, world_size: int) -> dict:
    """Per-rank memory in bytes: {"rows": [(name, bytes, note)], "total", "stage", ...}."""
    m, par, tr = cfg.model, cfg.parallel, cfg.train
    vocab, tp, pp = m.vocab_size, par.tp, par.pp
    dp = max(1, world_size // (tp * pp))
    sp = par.sequence_parallel and tp > 1
    zero, K = par.zero_stage, cfg.ponder.steps
    a = 4 if tr.precision == "fp32" else 2  # params and activations in the training dtype
    # bytes/param: (params, grads, optimizer state)
    pb, gb, ob = (4, 4, 8) if tr.precision == "fp32" else (2, 2, 12)
    tokens = tr.micro_batch * cfg.data.seq_len
    grad_accum = max(1, tr.global_batch // (tr.micro_batch * dp))
    per_block = block_activation_bytes(m, m.activation_checkpointing, a, tp, sp)
    # latent thoughts: every pass's blocks keep activations for all its slots (the most
    # Jacobi iterations drawn); every-token pauses: one pass over M+1 slots; pondering's
    # passes are the chain of pipeline_stages
    thoughts = cfg.thoughts
    slots = (sum(thought_pass_slots(thoughts.count, max(thoughts.train_iters)))
             if thoughts.count else cfg.pause.every_token + 1)

    best = None
    for s, layers in enumerate(pipeline_stages(m.num_layers, K, pp)):
        blocks = {i for kind, i in layers if kind == "block"}
        n = len(blocks) * block_params(m, tp)
        if any(kind != "block" for kind, _ in layers):
            n += shared_params(m, vocab, tp)
        act = 0.0
        for kind, _ in layers:
            if kind == "block":
                act += per_block * slots
            elif kind in ("feedback", "head"):
                act += vocab_layer_bytes(m, vocab, a, tp, sp, kind == "head",
                                         cfg.ponder.feedback, cfg.ponder.top_k,
                                         bf16=tr.precision == "bf16")
        in_flight = min(pp - s, grad_accum)
        act *= tokens * in_flight
        transient, why = _largest_transient(cfg, layers, per_block, a, tp, sp, tokens)
        states = [n * pb / (dp if zero >= 3 else 1), n * gb / (dp if zero >= 2 else 1),
                  0.0 if par.cpu_offload else n * ob / (dp if zero >= 1 else 1)]
        total = sum(states) + act + transient
        if best is None or total > best["total"]:
            best = dict(stage=s, params=n, states=states, act=act, in_flight=in_flight,
                        transient=transient, transient_why=why, total=total,
                        cpu_optimizer=n * ob / (dp if zero >= 1 else 1) if par.cpu_offload
                        else 0.0)
    def split(stage: int) -> str:  # the ZeRO stage from which a state is split over DP
        return f" / dp {dp} (ZeRO-{stage}+)" if zero >= stage and dp > 1 else ""

    passes = (f"latent thoughts: {slots} slots per token over the passes" if thoughts.count
              else f"{slots} slots per token (every-token pauses)" if slots > 1
              else f"{K + 1} pass{'es' if K else ''}")
    acc = (f"{m.activation_checkpointing} checkpointing, {passes}, "
           f"micro-batch {tr.micro_batch} x seq {cfg.data.seq_len}, vocab_chunk {m.vocab_chunk}"
           + (f", sequence parallel / tp {tp}" if sp else "")
           + (f", x {best['in_flight']} micro-batches in flight" if pp > 1 else ""))
    moments = "fp32 master + 2 Adam moments" if ob == 12 else "2 fp32 Adam moments"
    rows = [
        ("parameters", best["states"][0], f"{best['params']:,} params/rank x {pb} B{split(3)}"),
        ("gradients", best["states"][1], f"x {gb} B{split(2)}"),
        ("optimizer state", best["states"][2],
         f"CPU offload: {best['cpu_optimizer'] / GiB:.2f} GiB/rank in host memory"
         if par.cpu_offload else f"x {ob} B, {moments}{split(1)}"),
        ("activations", best["act"], acc),
        ("backward transient", best["transient"], best["transient_why"]),
    ]
    return {"rows": rows, "total": best["total"], "stage": best["stage"], "pp": pp,
            "tp": tp, "dp": dp, "zero_stage": zero}


def _largest_transient(cfg, layers, per_block, a, tp, sp, tokens) -> tuple[float, str]:
    """The most that backward adds on top of the saved activations, per micro-batch.

    Backward runs the stage's layers in reverse and frees each layer's saved tensors as it
    goes, so a layer's own buffers count only beyond what the layers after it have already
    released. Without checkpointing the head's logits gradient, at the very start, is the
    peak; with it (or vocab chunking) a recomputed block or a feedback's softmax backward
    can be, once the head's vocabulary tensors are gone."""
    m = cfg.model
    feedback, top_k = cfg.ponder.feedback, cfg.ponder.top_k
    best, freed = (0.0, "-"), 0.0
    for kind, _ in reversed(layers):
        own, fixed, why, kept = 0.0, 0.0, "", 0.0
        if kind == "block":
            kept = per_block
            if m.activation_checkpointing == "full":
                own = block_activation_bytes(m, "none", a, tp, sp)
                why = "one block recomputed (full checkpointing)"
        elif kind in ("feedback", "head"):
            last = kind == "head"
            kept = vocab_layer_bytes(m, m.vocab_size, a, tp, last=last, sp=sp,
                                     feedback=feedback, top_k=top_k,
                                     bf16=cfg.train.precision == "bf16")
            if last or feedback != "hidden":
                own, fixed, why = _vocab_backward(m, a, tp, last, top_k)
        extra = (own - freed) * tokens + fixed
        if extra > best[0]:
            best = (extra, why + (", net of activations already freed" if freed else ""))
        freed += kept
    return best


def _vocab_backward(m: ModelConfig, a: int, tp: int, last: bool,
                    top_k: int) -> tuple[float, float, str]:
    """Backward buffers of the loss (last) or of a softmax feedback beyond what they keep:
    (bytes per token, bytes per micro-batch, what)."""
    v, h = m.vocab_size / tp, m.hidden_size
    cast = a if a != 4 else 0  # an fp32 tensor's copy in the activation dtype
    if m.vocab_chunk > 0 and (last or top_k == 0):
        # the previous chunk's fp32 buffers (dz; the feedback also p) are still alive while
        # the next chunk's logits are recomputed (matmul output and its fp32 copy); dh
        # accumulates in fp32; the feedback also holds its whole-shard dW_out and dW_in
        # before they join the grads
        c = min(m.vocab_chunk, v)
        logits = 4 + cast
        return (((4 if last else 8) + logits) * c + 4 * h, 0.0 if last else 2 * a * v * h,
                "one vocab chunk's buffers")
    if last:  # the bf16 CE allocates the gradient; megatron's CE writes the fp32 gradient
        # into the saved softmax, then casts it
        return cast * v, 0.0, "[tokens, V] logits gradient"
    if tp == 1 and top_k <= 0:  # p's gradient, then the logits' (both in the activation
        # dtype) while p itself is still kept
        return 2 * a * v, 0.0, "[tokens, V] feedback softmax backward"
    # the matmul's backward frees p's cast first; then the fp32 gradient of p and two fp32
    # temporaries of the softmax backward
    return 12 * v - cast * v, 0.0, "[tokens, V] feedback softmax backward"


def activation_estimate(model: ModelConfig, steps: int, micro_batch: int, seq: int,
                        precision: str = "bf16", feedback: str = "embedding",
                        top_k: int = 0) -> dict:
    """Activations and backward transient in bytes for one GPU without any parallelism
    (`model.activation_checkpointing` and `model.vocab_chunk` as set), and the parameter
    count: what a single-GPU benchmark adds to its own model states (bf16 params, grads and
    AdamW moments: 8 B/param)."""
    cfg = Config()
    cfg.model = model
    cfg.ponder.steps, cfg.ponder.feedback, cfg.ponder.top_k = steps, feedback, top_k
    cfg.data.seq_len = seq
    cfg.train.micro_batch = cfg.train.global_batch = micro_batch
    cfg.train.precision = precision
    cfg.parallel.tp = cfg.parallel.pp = 1
    cfg.parallel.zero_stage, cfg.parallel.cpu_offload = 0, False
    mem = memory_estimate(cfg, 1)
    rows = {name: nbytes for name, nbytes, _ in mem["rows"]}
    return {"activations": rows["activations"], "transient": rows["backward transient"],
            "params": param_count(model, model.vocab_size)["total"]}


# ------------------------------------------------------------------ time to train
def device_peak(cfg: Config) -> tuple[float, str, str]:
    """(peak TFLOP/s per GPU, its source, GPU name used for matching measurements)."""
    name = None
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
    except Exception:  # no torch / broken driver: a dry run on a login node
        name = None
    if cfg.log.peak_tflops:
        return cfg.log.peak_tflops, "log.peak_tflops", name or "H100"
    if name and peak_tflops(name):
        return peak_tflops(name), f"{name} (engine/flops.py table)", name
    where = f"{name}: not in the table" if name else "no GPU on this machine"
    return PEAK_TFLOPS["H100"], f"{where}; assuming H100 dense bf16", "H100"


def _preset_params(shape: str) -> Optional[int]:
    from ..config.presets import MODEL_PRESETS

    fields = MODEL_PRESETS.get(shape)
    if fields is None:
        return None
    vocab = 32000 if fields.get("arch", "gpt_neox") == "llama" else 50304
    return param_count(ModelConfig(**fields), vocab)["total"]


def pick_mfu(cfg: Config, files: list[str], gpu: str) -> Optional[dict]:
    """The measured throughput entry closest to this run: our implementation first, then the
    nearest model size, then K, vocab chunking, checkpointing mode, `train.compile`, the GPU
    name, and the newest run (the code measured last is the code that will train)."""
    m, K = cfg.model, cfg.ponder.steps
    size = param_count(m, m.vocab_size)["total"]
    best = None
    for path in files:
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue
        dev = str(data.get("env", {}).get("gpu", ""))
        started = str(data.get("started", ""))  # ISO 8601: compares as text
        for e in data.get("throughput", []):
            if e.get("status") != "ok" or not e.get("mfu") or e.get("K") is None:
                continue
            other = _preset_params(str(e.get("shape")))
            if other is None:
                continue
            score = (e.get("impl") != "ours", round(abs(math.log(other / size)), 3),
                     abs(e["K"] - K), bool(e.get("chunked")) != (m.vocab_chunk > 0),
                     e.get("ckpt") != m.activation_checkpointing,
                     bool(e.get("compiled")) != bool(cfg.train.compile),
                     gpu.upper() not in dev.upper())
            if best is None or score < best[0] or score == best[0] and started > best[2]:
                best = (score, dict(e, file=path, gpu=dev), started)
    return best[1] if best else None


def time_estimate(cfg: Config, world_size: int, mfu_from: Optional[str] = None) -> dict:
    tr = cfg.train
    fpt = run_flops_per_token(cfg)
    tokens = tr.iters * tr.global_batch * cfg.data.seq_len
    peak, peak_src, gpu = device_peak(cfg)
    if mfu_from:
        files = [mfu_from]
        if not os.path.exists(mfu_from):
            raise FileNotFoundError(f"--mfu-from {mfu_from}: no such file")
    else:
        files = sorted(glob.glob(os.path.join(REPO, "benchmarks", "results", "*",
                                              "gpu_results.json")))
    entry = pick_mfu(cfg, files, gpu)
    if entry:
        mfu = entry["mfu"]
        mfu_src = (f"measured: {entry['name']} (micro-batch {entry.get('micro_batch')}, "
                   f"{entry['gpu'] or 'GPU ?'}, one GPU) in "
                   f"{os.path.relpath(entry['file'])}")
    else:
        mfu, mfu_src = DEFAULT_MFU, ("assumed (no gpu_results.json found)" if not files
                                     else "assumed (no usable throughput entry)")
    seconds = tokens * fpt / (world_size * peak * 1e12 * mfu)
    return {"seconds": seconds, "tokens": tokens, "flops": tokens * fpt, "gpus": world_size,
            "gpu": gpu, "peak_tflops": peak, "peak_source": peak_src, "mfu": mfu,
            "mfu_source": mfu_src}


# ------------------------------------------------------------------ report
def format_duration(seconds: float) -> str:
    days, rest = divmod(seconds, 86400)
    if days:
        return f"{days:.0f} d {rest / 3600:.1f} h"
    if seconds < 60:
        return f"{seconds:.2g} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def format_estimate(mem: dict, tim: dict) -> list[str]:
    """The memory and time sections of `train --dry-run`. Both are for GPUs, whatever this
    machine is (a dry run is for planning the cluster run), and the headings say so."""
    where = (f"pipeline stage {mem['stage']} of {mem['pp']} (the largest)"
             if mem["pp"] > 1 else "every rank")
    hours = tim["gpus"] * tim["seconds"] / 3600
    lines = [f"# memory per GPU (estimate, {where}; tp {mem['tp']}, dp {mem['dp']}, "
             f"ZeRO-{mem['zero_stage']})",
             f"{'component':<20} {'GiB':>8}  from"]
    for name, nbytes, note in mem["rows"]:
        lines.append(f"{name:<20} {nbytes / GiB:>8.2f}  {note}")
    lines += [f"{'total':<20} {mem['total'] / GiB:>8.2f}  + allocator overhead/fragmentation, "
              "communication buffers and other temporaries come on top",
              f"# time to train (GPU estimate: {tim['gpus']} x {tim.get('gpu') or 'GPU'})",
              f"{format_duration(tim['seconds'])} on {gpus(tim['gpus'])} = "
              f"{tim['flops']:.3g} FLOPs / ({tim['gpus']} x {tim['peak_tflops']:g} TFLOP/s x "
              f"MFU {100 * tim['mfu']:.1f} %); "
              + (f"{hours:,.0f}" if hours >= 10 else f"{hours:.2g}") + " GPU-hours",
              f"peak: {tim['peak_source']}",
              f"MFU: {tim['mfu_source']}"]
    return lines


@contextlib.contextmanager
def saved_for_backward(model) -> Iterator[dict]:
    """What the activation estimate predicts, measured: inside the block, the unique storages
    autograd saves for backward (parameters excluded) are recorded as {storage: bytes}.

        with saved_for_backward(model) as saved:
            loss = model(ids, labels=labels)
        activation_bytes = sum(saved.values())
    """
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved
