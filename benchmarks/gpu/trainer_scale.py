"""The real trainer at a throughput shape (`--sections trainer`, not in the default run): what
users launch (`python -m ponder_pt.train`: DeepSpeed ZeRO-1, bf16 with fp32 master weights,
data pipeline, metrics) next to the bare model step of the throughput section (bf16
parameters, fused AdamW) at the same shape, micro-batch and K, timed in the same child one
after the other. Per K: both tokens/s, trainer / bare, and the trainer's allocator peak
(`peak_mem_gib` in metrics.jsonl) against the `--dry-run` estimate it was sized with."""

from __future__ import annotations

import math
import os
import time

from .common import cleanup, device_name, init_process_group, log, md_table
from .results import Part, record
from .throughput import Throughput, largest_micro_batch
from .train import median_of, prepare_corpus, run_trainer

SHAPE = {"gpu": "pythia-1b", "smoke": "toy"}
KS = (0, 3)
ITERS = {"gpu": 14, "smoke": 4}
TRAINER_START_S = 45.0  # imports, DeepSpeed engine, data index, first steps (1B on an H100)


class _Pinned(Throughput):
    """The bare model step at the trainer's micro-batch."""

    micro_batch = 1

    def start_mb(self, K: int, ckpt: str) -> int:
        return self.micro_batch


def trainer_overrides(shape: str, cfg, K: int, mb: int, iters: int) -> list:
    """The trainer at the throughput section's model: same layers, vocabulary rows (the
    corpus tokenizer's ids padded up to them), seq, K, no checkpointing, no saving."""
    model = [f"model.preset={shape}"] if shape != "toy" else [
        f"model.arch={cfg.arch}", f"model.num_layers={cfg.num_layers}",
        f"model.hidden_size={cfg.hidden_size}", f"model.num_heads={cfg.num_heads}"]
    return model + [
        f"model.make_vocab_size_divisible_by={cfg.vocab_size}",
        "model.activation_checkpointing=none", "model.vocab_chunk=0", "model.dropout=0.0",
        f"data.seq_len={cfg.max_seq_len}", f"model.max_seq_len={cfg.max_seq_len}",
        f"ponder.steps={K}", "pause.rate=0.0", f"train.micro_batch={mb}",
        f"train.global_batch={mb}", f"train.iters={iters}", "train.warmup=2",
        "train.lr=1e-4", "train.min_lr=1e-5", "train.precision=bf16",
        f"train.eval_interval={iters}", "train.eval_iters=0", "parallel.zero_stage=1",
        "train.optimizer=torch", "log.interval=1", "log.tensorboard=false"]


def trainer_config(overrides: list, vocab: int, mb: int):
    """The trainer's resolved config at micro-batch (= global batch) `mb`, vocabulary filled
    in as the tokenizer layout would."""
    from ponder_pt.config import load_config

    cfg = load_config("demo", overrides + [f"train.micro_batch={mb}",
                                           f"train.global_batch={mb}"], validate=False)
    cfg.model.vocab_size = vocab
    return cfg


def trainer_micro_batch(overrides: list, vocab: int, mem_bytes, cap: int = 32) -> int:
    """`largest_micro_batch` by the trainer's own `--dry-run` estimate."""
    from ponder_pt.engine.estimate import memory_estimate

    return largest_micro_batch(
        lambda mb: memory_estimate(trainer_config(overrides, vocab, mb), 1)["total"],
        mem_bytes, cap)


SAME = ("arch", "num_layers", "hidden_size", "num_heads", "kv_heads", "ffn_size", "rotary_pct",
        "parallel_residual", "tie_embeddings", "vocab_size", "max_seq_len", "dropout")


def section_trainer(args, part: Part) -> None:
    from ponder_pt.engine.estimate import memory_estimate

    dev = device_name(args.smoke)
    init_process_group(dev)
    kind = "smoke" if args.smoke else "gpu"
    shape = SHAPE[kind]
    work = os.path.join(args.out, "work", "train")
    paths = {}
    d = record(part, "corpus -> tokenizer -> data prepare",
               lambda: paths.update(prepare_corpus(args, work)) or {"vocab": paths["vocab"]})
    if d["status"] != "ok":
        return
    bare = _Pinned(args, part, shape)
    bare.fake_oom = False
    vocab = bare.cfg.vocab_size
    part.update(shape=shape, seq=bare.seq, device=dev, vocab=vocab)
    for K in KS:
        name = f"{shape} K={K}: trainer vs bare step"
        probe = trainer_overrides(shape, bare.cfg, K, 1, ITERS[kind])
        mb = trainer_micro_batch(probe, vocab, bare.mem) if bare.mem else 2
        over = trainer_overrides(shape, bare.cfg, K, mb, ITERS[kind])
        ref = bare.timings.get(("ours", 0, "none"))
        need = TRAINER_START_S + (ref[0] * (mb / ref[1]) * bare.flops_tok(K) / bare.flops_tok(0)
                                  * (ITERS[kind] + 12) if ref else 30.0)
        if K and bare.remaining() < need and not args.smoke:  # a smoke run checks every row
            part.add({"name": name, "K": K, "status": "skipped",
                      "reason": f"time budget: {bare.remaining():.0f}s left, ~{need:.0f}s needed"})
            log(f"trainer: {name} -> skipped")
            continue

        def go(K=K, mb=mb, over=over):
            cfg = trainer_config(over, vocab, mb)
            differ = {f: (getattr(cfg.model, f), getattr(bare.cfg, f)) for f in SAME
                      if getattr(cfg.model, f) != getattr(bare.cfg, f)}
            if differ or cfg.data.seq_len != bare.seq:
                raise ValueError(f"trainer and bare model differ (trainer, bare): {differ}, "
                                 f"seq {cfg.data.seq_len} vs {bare.seq}")
            if paths["vocab"] > vocab:
                raise ValueError(f"the corpus tokenizer's {paths['vocab']} ids exceed the "
                                 f"{vocab} vocabulary rows")
            bare.micro_batch = mb
            model = bare.build_ours()
            opt = bare.optimizer(model)
            b = bare.measure("ours", model, opt, K, "none")
            model = opt = None
            cleanup(dev)
            timeout = max(10.0, args.deadline - time.time() - 5)
            code, wall, text, rows = run_trainer(args, os.path.join(work, f"scale_k{K}"), over,
                                                 paths, timeout)
            if code != 0:
                raise RuntimeError(f"trainer exited {code} after {wall:.0f}s; log tail:\n"
                                   f"{text[-2500:]}")
            tok_s = median_of(rows, "tokens_per_s")
            peaks = [r["peak_mem_gib"] for r in rows if "peak_mem_gib" in r]
            losses = [r["loss"] for r in rows if "loss" in r]
            est = memory_estimate(cfg, 1)["total"] / 2**30
            res = {"micro_batch": mb, "bare_micro_batch": b["micro_batch"], "seq": bare.seq,
                   "trainer_tokens_per_s": tok_s, "trainer_mfu": median_of(rows, "mfu"),
                   "trainer_step_s": median_of(rows, "step_time"),
                   "trainer_steps": len(losses), "bare_tokens_per_s": b["tokens_per_s"],
                   "bare_mfu": b["mfu"], "bare_peak_gib": b["peak_gib"],
                   "trainer_over_bare": tok_s / b["tokens_per_s"] if tok_s else None,
                   "trainer_peak_gib": max(peaks) if peaks else None, "estimate_gib": est,
                   "estimate_error": est / max(peaks) - 1 if peaks else None,
                   "run_wall_s": round(wall, 1), "overrides": over}
            if len(losses) < ITERS[kind] or not all(math.isfinite(x) for x in losses):
                res.update(status="fail", note=f"{len(losses)} steps logged, losses {losses}")
            return res

        record(part, name, go, K=K)
        cleanup(dev)


def markdown(res: dict) -> list:
    rows = res.get("sections", {}).get("trainer", {}).get("entries", [])
    rows = [e for e in rows if "K" in e]
    if not rows:
        return []
    out = ["", "## The real trainer at a throughput shape (`--sections trainer`)", "",
           "DeepSpeed ZeRO-1, bf16 with fp32 master weights, one process, vs the bare model "
           "step (bf16 parameters, fused AdamW) at the same micro-batch; the trainer's "
           "allocator peak vs its `--dry-run` estimate.", ""]
    out.append(md_table(
        ["case", "status", "micro-batch", "trainer tokens/s", "bare tokens/s",
         "trainer / bare", "trainer MFU", "trainer peak GiB", "estimate GiB", "est. error",
         "s"],
        [[e["name"], e["status"], e.get("micro_batch"), e.get("trainer_tokens_per_s"),
          e.get("bare_tokens_per_s"), e.get("trainer_over_bare"), e.get("trainer_mfu"),
          e.get("trainer_peak_gib"), e.get("estimate_gib"), e.get("estimate_error"),
          e.get("seconds")] for e in rows]))
    return out
