"""Training throughput per Pythia shape: our PonderLM at TP=1 (K = 0..3, activation
checkpointing none / full) and HF GPTNeoXForCausalLM (sdpa) at the same shape and
micro-batch: forward + backward + fused AdamW step, bf16 parameters. At 1B (GPU only) also
ours with torch.compile'd blocks (`train.compile`), K = 0 and 3, after everything else."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

from .common import (cleanup, device_name, has_vocab_chunk, init_process_group, log, md_table,
                     peak_for, shape_config, sync)
from .results import Part, record

VOCAB_CHUNK = {"gpu": 8192, "smoke": 128}  # rows per chunk of model.vocab_chunk
STATE_BYTES = 8  # per parameter: bf16 params, grads and the two AdamW moments
MEM_SLACK = 1.1  # the caching allocator's rounding and fragmentation over the estimate
MEM_USE = 0.9  # of the GPU's memory
# The first step of compiled blocks: Dynamo tracing, Inductor, Triton autotuning/compiles.
COMPILE_S = 90.0
COMPILED_SHAPES = ("pythia-1b",)  # where the elementwise share of the step is largest


def estimated_peak(model, K: int, micro_batch: int, seq: int, precision: str = "bf16",
                   top_k: int = 0) -> float:
    """Bytes a throughput entry of our model should peak at: model states (STATE_BYTES/param)
    + activations + backward transient of the framework's own estimate
    (ponder_pt/engine/estimate.py; tests/test_estimate_gpu.py checks it against these runs'
    measured peaks)."""
    from ponder_pt.engine.estimate import activation_estimate

    est = activation_estimate(model, K, micro_batch, seq, precision=precision, top_k=top_k)
    return STATE_BYTES * est["params"] + est["activations"] + est["transient"]


def largest_micro_batch(peak_bytes, mem_bytes: float, cap: int = 32) -> int:
    """Largest power-of-two micro-batch (<= cap, >= 1) whose `peak_bytes(mb)` estimate, x
    MEM_SLACK, fits in MEM_USE of the GPU's memory."""
    mb = cap
    while mb > 1 and MEM_SLACK * peak_bytes(mb) > MEM_USE * mem_bytes:
        mb //= 2
    return mb


def _mb_estimate(cfg, seq: int, K: int, ckpt: str, mem_bytes: float, cap: int = 32) -> int:
    """`largest_micro_batch` by `estimated_peak`: the unchunked model's estimate, so that
    chunked entries run at the unchunked entries' micro-batch (side by side); HF entries take
    ours at K = 0, the micro-batch they are compared at."""
    model = dataclasses.replace(cfg, activation_checkpointing=ckpt, vocab_chunk=0)
    return largest_micro_batch(lambda mb: estimated_peak(model, K, mb, seq), mem_bytes, cap)


class Throughput:
    def __init__(self, args, part: Part, shape: str):
        import torch

        self.args, self.part, self.shape = args, part, shape
        self.dev = device_name(args.smoke)
        self.seq = 64 if args.smoke else 2048
        self.cfg = shape_config(shape, self.seq)
        self.vocab_chunk_ok = has_vocab_chunk()
        self.peak, _ = peak_for(self.dev)
        self.warmup, self.iters = (1, 2) if args.smoke else (2, 8)
        self.spec_cap = 4.0 if args.smoke else 12.0  # seconds of timed steps per entry
        self.mem = (torch.cuda.get_device_properties(0).total_memory if self.dev == "cuda"
                    else None)
        self.timings = {}  # (impl, K, ckpt) -> (step_s, mb)
        self.fake_oom = args.smoke  # smoke: one injected OOM exercises the halving path
        self.model = self.opt = None
        self.model_compiled = False
        self.build_s = {}
        self.compile_s = None  # the last measured first-step compile, the next one's estimate

    # ---- time / memory planning
    def remaining(self) -> float:
        return self.args.deadline - time.time() - 4.0

    def flops_tok(self, K: int) -> float:
        from ponder_pt.engine.flops import flops_per_token

        return flops_per_token(self.cfg, self.cfg.vocab_size, self.seq, K)

    def start_mb(self, K: int, ckpt: str) -> int:
        if self.dev != "cuda":
            return 4 if self.fake_oom else 2
        return _mb_estimate(self.cfg, self.seq, K, ckpt, self.mem)

    def estimate(self, K: int, ckpt: str, mb: int):
        ref = self.timings.get(("ours", 0, "none")) or self.timings.get(("hf", 0, "none"))
        if ref is None:
            return None
        t0, mb0 = ref
        return t0 * (mb / mb0) * self.flops_tok(K) / self.flops_tok(0) * (
            1.35 if ckpt == "full" else 1.0)

    # ---- models
    def build_hf(self):
        import torch
        from transformers import GPTNeoXForCausalLM

        from ponder_pt.models import hf_config_from

        hc = hf_config_from(self.cfg)
        hc.use_cache = False
        t = time.perf_counter()
        with torch.device(self.dev):
            model = GPTNeoXForCausalLM._from_config(hc, attn_implementation="sdpa",
                                                    dtype=torch.bfloat16)
        model.to(self.dev).train()
        self.build_s["hf"] = time.perf_counter() - t
        return model

    def build_ours(self, chunk: int = 0, compiled: bool = False):
        import torch

        from ponder_pt.config.schema import PonderConfig
        from ponder_pt.models import PonderLM

        cfg = dataclasses.replace(self.cfg)
        if chunk:
            cfg.vocab_chunk = chunk
        t = time.perf_counter()
        model = PonderLM(cfg, PonderConfig(steps=0), params_dtype=torch.bfloat16)
        model.to(self.dev).train()
        self.build_s["ours"] = time.perf_counter() - t
        if compiled:  # as train.compile does; the compile itself happens on the first step
            # static shapes per micro-batch (what training with a fixed micro-batch gets),
            # not one dynamic-batch graph after the second row's recompile
            torch._dynamo.config.automatic_dynamic_shapes = False
            model.compile_blocks()
        return model

    def optimizer(self, model):
        import torch

        return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=True)

    @staticmethod
    def train_step(impl: str, model, opt, ids, labels, K: int):
        """One forward + backward + optimizer step; the detached loss."""
        if impl == "hf":
            loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(ids, labels=labels, ponder_steps=K)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    # ---- one measurement
    def measure(self, impl: str, model, opt, K: int, ckpt: str, chunked: bool = False,
                compiled: bool = False) -> dict:
        import torch

        dev, seq = self.dev, self.seq
        if impl == "hf":
            if ckpt == "full":
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()
        else:
            model.set_activation_checkpointing(ckpt)
        mb = self.start_mb(K, ckpt)
        tried = []
        gen = torch.Generator().manual_seed(0)
        while True:
            ids = torch.randint(0, self.cfg.vocab_size, (mb, seq), generator=gen).to(dev)
            labels = torch.roll(ids, -1, 1)

            def step():
                if self.fake_oom:
                    self.fake_oom = False
                    raise torch.cuda.OutOfMemoryError("injected by --smoke (tests OOM halving)")
                return self.train_step(impl, model, opt, ids, labels, K)

            try:
                compile_s = None
                if compiled:  # compiles (or recompiles for a new micro-batch); not timed
                    sync(dev)
                    t = time.perf_counter()
                    step()
                    sync(dev)
                    compile_s = self.compile_s = time.perf_counter() - t
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync(dev)
                t = time.perf_counter()
                for _ in range(self.warmup):
                    loss = step()
                sync(dev)
                warm = (time.perf_counter() - t) / self.warmup
                n = max(2, min(self.iters, int(self.spec_cap / max(warm, 1e-6))))
                if self.remaining() < warm * n:
                    n = max(1, int(self.remaining() / max(warm, 1e-6)))
                times = []
                for _ in range(n):
                    sync(dev)
                    t = time.perf_counter()
                    loss = step()
                    sync(dev)
                    times.append(time.perf_counter() - t)
                break
            except torch.cuda.OutOfMemoryError:
                tried.append(mb)
                opt.zero_grad(set_to_none=True)
                model.zero_grad(set_to_none=True)
                cleanup(dev)
                if mb == 1:
                    raise
                mb //= 2
                log(f"{self.part.data['name']}: OOM at micro-batch {tried[-1]}; trying {mb}")
        step_s = statistics.median(times)
        tokens = mb * seq
        tok_s = tokens / step_s
        tflops = self.flops_tok(K) * tok_s / 1e12
        self.timings.setdefault((impl, K, ckpt), (step_s, mb))
        lossv = float(loss.float())
        res = {"micro_batch": mb, "oom_tried": tried, "tokens_per_step": tokens,
               "step_s": step_s, "step_s_min": min(times), "timed_steps": len(times),
               "tokens_per_s": tok_s, "flops_per_token": self.flops_tok(K), "tflops": tflops,
               "mfu": tflops / self.peak if self.peak else None,
               "peak_gib": (torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda"
                            else None),
               "loss": lossv}
        if compiled:
            res["compile_s"] = compile_s
        if not math.isfinite(lossv):
            res.update(status="fail", note="non-finite loss")
        if impl == "hf":
            res["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        return res

    # ---- plan
    def plan(self) -> list:
        # (impl, K, ckpt, chunked, compiled) in priority order
        if self.shape in ("pythia-160m", "toy"):
            ours = [(0, "none"), (3, "none"), (1, "none"), (2, "none"), (0, "full"),
                    (3, "full"), (1, "full"), (2, "full")]
        else:
            ours = [(0, "none"), (3, "none"), (3, "full"), (0, "full"), (1, "none"),
                    (2, "none")]
        if self.args.plan == "vocab-chunk":
            # model.vocab_chunk side by side with the unchunked model at the same micro-batch
            # (unchunked first, then chunked: one model build each)
            return [("ours", K, c, chunked, False) for chunked in (False, True)
                    for K, c in ((3, "full"), (3, "none"), (0, "full"))]
        # compiled blocks last (never crowding out the rest), on GPU only: Inductor's CPU
        # code for the bf16 backward fails to build (torch 2.13), and compiling costs minutes
        compiled = ([("ours", 0, "none", False, True), ("ours", 3, "none", False, True)]
                    if self.shape in COMPILED_SHAPES and not self.args.smoke else [])
        return ([("hf", 0, "none", False, False), ("hf", 0, "full", False, False)]
                + [("ours", K, c, False, False) for K, c in ours]
                + [("ours", 3, "full", True, False), ("ours", 3, "none", True, False)]
                + compiled)

    def run(self) -> None:
        from ponder_pt.engine.flops import param_count

        params = param_count(self.cfg, self.cfg.vocab_size)["total"]
        self.part.update(shape=self.shape, seq=self.seq, device=self.dev, params=params,
                         precision="bf16 params + torch.optim.AdamW(fused=True), no autocast",
                         vocab_chunk_available=self.vocab_chunk_ok)
        hf_model = hf_opt = None
        for impl, K, ckpt, chunked, compiled in self.plan():
            fields = {"shape": self.shape, "impl": impl, "K": K, "ckpt": ckpt,
                      "chunked": chunked, "compiled": compiled, "seq": self.seq}
            name = (f"{self.shape} {'HF GPTNeoX' if impl == 'hf' else 'ours'} K={K} "
                    f"ckpt={ckpt}" + (" vocab-chunked" if chunked else "")
                    + (" compiled" if compiled else ""))
            if chunked and not self.vocab_chunk_ok:
                self.skip(name, fields, "not available: ModelConfig has no vocab_chunk yet")
                continue
            # models: HF first (then freed), ours built once (a fresh one for chunked)
            if impl == "ours" and hf_model is not None:
                del hf_model, hf_opt
                hf_model = hf_opt = None
                cleanup(self.dev)
            mb = self.start_mb(K, ckpt)
            est = self.estimate(K, ckpt, mb)
            build = 0.0
            if impl == "hf" and hf_model is None or impl == "ours" and (
                    self.model is None or compiled != self.model_compiled
                    or chunked != bool(getattr(self.model.cfg, "vocab_chunk", 0))):
                build = self.build_s.get(impl, 0.0)
            if compiled:  # every compiled row compiles: a new model or a new micro-batch
                build += self.compile_s or COMPILE_S
            need = (est * (self.warmup + 2) if est else 0.0) + build + 1.0
            if self.remaining() < need:
                self.skip(name, fields, f"time budget: {self.remaining():.0f}s left, "
                          f"~{need:.0f}s needed")
                continue

            def go(impl=impl, K=K, ckpt=ckpt, chunked=chunked, compiled=compiled):
                nonlocal hf_model, hf_opt
                if impl == "hf":
                    if hf_model is None:
                        hf_model = self.build_hf()
                        hf_opt = self.optimizer(hf_model)
                    return self.measure("hf", hf_model, hf_opt, K, ckpt)
                chunk = VOCAB_CHUNK["smoke" if self.args.smoke else "gpu"] if chunked else 0
                if (self.model is None or compiled != self.model_compiled
                        or getattr(self.model.cfg, "vocab_chunk", 0) != chunk):
                    # same seed, so every model starts from the same weights
                    self.model = self.opt = None
                    cleanup(self.dev)
                    self.model = self.build_ours(chunk, compiled)
                    self.model_compiled = compiled
                    self.opt = self.optimizer(self.model)
                res = self.measure("ours", self.model, self.opt, K, ckpt, chunked=chunked,
                                   compiled=compiled)
                if chunked:
                    res["vocab_chunk"] = chunk
                return res

            entry = record(self.part, name, go, **fields)
            if entry["status"] == "error":
                if impl == "hf":
                    hf_model = hf_opt = None
                cleanup(self.dev)
        self.model = self.opt = None
        del hf_model, hf_opt
        cleanup(self.dev)
        self.part.update(build_s={k: round(v, 1) for k, v in self.build_s.items()})

    def skip(self, name, fields, reason):
        self.part.add({"name": name, **fields, "status": "skipped", "reason": reason})
        log(f"{self.part.data['name']}: {name} -> skipped ({reason})")


def section_throughput(args, part: Part) -> None:
    dev = device_name(args.smoke)
    init_process_group(dev)
    Throughput(args, part, args.shape).run()


def markdown(res: dict) -> list:
    thr = res.get("throughput", [])
    if not thr:
        return []
    hf = {(e.get("shape"), e.get("ckpt")): e for e in thr
          if e.get("impl") == "hf" and e.get("status") == "ok"}
    out = ["", "## Training throughput (fwd + bwd + fused AdamW, bf16 params)", ""]
    rows = []
    for e in thr:
        ref = hf.get((e.get("shape"), e.get("ckpt")))
        ratio = (e["tokens_per_s"] / ref["tokens_per_s"]
                 if ref and e.get("tokens_per_s") and e.get("status") == "ok" else None)
        rows.append([e.get("shape"), e.get("impl"), e.get("K"), e.get("ckpt"),
                     e.get("chunked"), e.get("compiled"), e.get("micro_batch"),
                     e.get("tokens_per_s"), e.get("step_s"), e.get("tflops"), e.get("mfu"),
                     e.get("peak_gib"), ratio,
                     e["status"] + (f": {e.get('reason') or e.get('error', '')[:80]}"
                                    if e["status"] != "ok" else "")])
    out.append(md_table(["shape", "impl", "K", "ckpt", "chunked", "compiled", "micro-batch",
                         "tokens/s", "step s", "TFLOP/s", "MFU", "peak GiB", "tok/s x HF",
                         "status"], rows))
    return out
