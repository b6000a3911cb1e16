"""Generation speed, batch 1, greedy, bf16: ponder_pt's K+1-KV-cache decoding (CUDA-graph
replay on a GPU) vs plain K=0 cached decoding of the same model, vs the same decoding without
the graph, vs recomputing the whole prefix per token (the reference loop), and the HF export's
generate(). The K=3 / (4 x K=0) ratio is set against its goal and against the floor that
reading the weights puts under it (`ponder_pt.inference.decode.weight_read_ratio`)."""

from __future__ import annotations

import os
import statistics
import time
import warnings

from .common import cleanup, device_name, init_process_group, log, md_table, shape_config, sync
from .results import Part, record

GEN_K = 3
GEN_PROMPT = 16
GEN_GOAL = 1.1  # K=3 cached per token <= GOAL x (K+1) x plain cached per token
GEN_FLOOR_SLACK = 1.05  # ...or within 5 % of the weight-read floor where that is above GOAL
GEN_EAGER_TOKENS = 64  # the graph-free comparison decodes this many tokens
GEN_SHAPES = {"gpu": ["pythia-160m", "pythia-410m", "pythia-1b"], "smoke": ["toy"]}


def _gen_marks(n: int) -> list:
    """Lengths (new tokens) at which the decoding loops note the clock."""
    return sorted({m for m in (16, 32, 64, 128, 256, 512, 1024, 2048) if m <= n} | {n})


def _gen_timing(times: dict, n: int) -> dict:
    """times: {tokens done: seconds since the start (after a sync)} -> per-token figures."""
    done = max(times)
    total = times[done]
    marks = sorted(times)
    seg = {}
    prev = 0
    for m in marks:
        if m > prev:
            seg[str(m)] = 1e3 * (times[m] - times.get(prev, 0.0)) / (m - prev)
        prev = m
    first = marks[0]
    return {"n_tokens": done, "requested_tokens": n, "total_s": total,
            "ms_per_token": 1e3 * total / done, "tokens_per_s": done / total,
            "ms_per_token_segment": seg,  # mean ms/token over (previous mark, mark]
            "ms_per_token_first": 1e3 * times[first] / first,
            # steady state: without the prefill and the CUDA-graph capture (first tokens)
            "ms_per_token_after_first": (1e3 * (total - times[first]) / (done - first)
                                         if done > first else None)}


def section_gen(args, part: Part) -> None:
    """Generation speed: K=3 with K+1 KV caches (ponder_pt.inference.generate_cached, what
    `ponder-pt generate` runs on a checkpoint) vs plain K=0 cached decoding of the same
    model, vs recomputing the whole prefix per token (the reference PonderingLM loop: all K+1
    passes over the prefix for every new token), and the HF export's generate()."""
    import torch

    dev = device_name(args.smoke)
    init_process_group(dev)
    n_new = 32 if args.smoke else args.gen_tokens
    n_rec = 16 if args.smoke else 256  # recompute first to here, extended later if time allows
    shapes = GEN_SHAPES["smoke" if args.smoke else "gpu"]
    part.update(device=dev, K=GEN_K, new_tokens=n_new, prompt_tokens=GEN_PROMPT, batch=1,
                dtype="bf16", decoding="greedy, no EOS stop", goal_ratio=GEN_GOAL,
                shapes=shapes)
    prev = None
    for i, shape in enumerate(shapes):
        left = args.deadline - time.time()
        if i > 0 and left < 25:
            part.add({"name": f"{shape} (all)", "shape": shape, "status": "skipped",
                      "reason": f"time budget: {left:.0f}s left"})
            log(f"gen: {shape} -> skipped ({left:.0f}s left)")
            continue
        n = n_new
        if i > 0 and prev and prev.res.get(f"K{GEN_K}"):
            # a bigger shape: its full length only if ~2.2x the first shape's cached runs fit
            k3 = prev.res[f"K{GEN_K}"]["total_s"] * n_new / prev.res[f"K{GEN_K}"]["n_tokens"]
            if left < 2.2 * 1.3 * k3 + 15:
                n = min(n_new, 256)
        # the baselines (recompute, HF generate) at the first shape only: the ratio and the
        # graph's effect at every shape come first
        prev = GenBench(args, part, shape, dev, n, min(n_rec, n), baselines=i == 0)
        prev.run()
        prev.model = None
        cleanup(dev)


class _StopGen(Exception):
    """Raised from generate_cached's on_token: the section's time is up."""


class GenBench:
    def __init__(self, args, part, shape, dev, n_new, n_rec, baselines=True):
        self.args, self.part, self.shape, self.dev = args, part, shape, dev
        self.n_new, self.n_rec, self.baselines = n_new, n_rec, baselines
        self.model = self.prompt = None
        self.res = {}  # key -> result dict of an ok entry
        self.rec_state = None  # (sequence tensor, times) of the recompute loop, to extend

    def remaining(self) -> float:
        return self.args.deadline - time.time() - 3.0

    def stop_at(self, seconds: float):
        """The clock time a timed loop stops at, `seconds` from now; none in the smoke, which
        checks the loops, not the speed (a loaded CPU must not shorten them)."""
        return None if self.args.smoke else time.time() + seconds

    def fields(self, case, **kw):
        return {"shape": self.shape, "case": case, **kw}

    def skip(self, name, fields, reason):
        self.part.add({"name": name, **fields, "status": "skipped", "reason": reason})
        log(f"gen: {name} -> skipped ({reason})")

    def build(self) -> dict:
        import torch

        from ponder_pt.config.schema import PonderConfig
        from ponder_pt.models import PonderLM

        t = time.perf_counter()
        cfg = shape_config(self.shape, GEN_PROMPT + self.n_new + 8)
        self.cfg = cfg
        self.model = PonderLM(cfg, PonderConfig(steps=GEN_K), params_dtype=torch.bfloat16,
                              seed=0).to(self.dev).eval()
        gen = torch.Generator().manual_seed(0)
        self.prompt = torch.randint(0, cfg.vocab_size, (GEN_PROMPT,), generator=gen).tolist()
        # warm-up: CUDA context, cuBLAS handles, SDPA kernels of prefill and one-token steps
        for K in (GEN_K, 0):
            self.cached(K, 8)
        self.recompute_loop(torch.tensor([self.prompt], device=self.dev), 2, {}, 0.0, None)
        # one plain decode over the whole length: kernels / plans chosen per KV length (cuDNN
        # SDPA graphs, oneDNN primitives on CPU) are built here, not in whichever timed run
        # comes first (that biased K=3 vs K=0); every pass sees the same KV lengths
        warm, _ = self.cached(0, self.n_new, stop_at=self.stop_at(0.15 * self.remaining()))
        sync(self.dev)
        from ponder_pt.engine.flops import param_count

        return {"build_s": time.perf_counter() - t, "warmup_tokens": len(warm),
                "layers": cfg.num_layers,
                "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
                "params": param_count(cfg, cfg.vocab_size)["total"]}

    def cached(self, K: int, n: int, stop_at=None, cuda_graph=None) -> tuple:
        """(new tokens, {tokens done: seconds}) of ponder_pt's cached generation, cut short
        at time.time() >= stop_at. cuda_graph: None = generate_cached's default (graph on
        CUDA); `self.decoding` then says what ran (a fallback warns)."""
        from ponder_pt.inference.model import generate_cached

        marks, times, out = set(_gen_marks(n)), {}, []
        sync(self.dev)
        t0 = time.perf_counter()

        def on_token(i, tok):  # picking the token (.tolist()) has synchronized already
            out.append(tok)
            if i + 1 in marks:
                times[i + 1] = time.perf_counter() - t0
            if stop_at is not None and time.time() >= stop_at:
                raise _StopGen

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            try:
                generate_cached(self.model, self.prompt, n, ponder_steps=K, on_token=on_token,
                                cuda_graph=cuda_graph)
            except _StopGen:
                pass
        fell = [str(w.message) for w in caught if "CUDA-graph" in str(w.message)]
        graph = self.dev.startswith("cuda") and cuda_graph is not False
        self.decoding = ("eager (" + fell[0] + ")" if fell else
                         "cuda graph" if graph else "eager")
        sync(self.dev)
        times[len(out)] = time.perf_counter() - t0
        return out, times

    def recompute_loop(self, seq, n, times, t_before, stop_at):
        """The reference loop: every new token is a full forward (all K+1 passes) over the
        whole sequence. Continues `seq`, adding to `times` (offset t_before); stops at n new
        tokens or at time.time() >= stop_at."""
        import torch

        from ponder_pt.sdpa_backends import varying_shapes

        start = seq.shape[1] - GEN_PROMPT
        marks = set(_gen_marks(self.n_new))
        sync(self.dev)
        t0 = time.perf_counter()
        # a new sequence length every token: run as ponder-pt runs cache-free forwards
        with torch.no_grad(), varying_shapes(self.dev):
            for i in range(start, n):
                z = self.model(seq, gather_logits=True, ponder_steps=GEN_K)[0, -1].float()
                nxt = int(z.argmax())
                seq = torch.cat([seq, torch.tensor([[nxt]], device=seq.device)], 1)
                if i + 1 in marks or i + 1 == n:
                    times[i + 1] = t_before + time.perf_counter() - t0
                if stop_at is not None and time.time() >= stop_at:
                    break
        sync(self.dev)
        done = seq.shape[1] - GEN_PROMPT
        times[done] = t_before + time.perf_counter() - t0
        return seq, times

    # ---- entries
    def e_cached(self, K):
        n = self.n_new
        if K == 0 and f"K{GEN_K}" in self.res:  # the same length as the K=3 run reached
            n = self.res[f"K{GEN_K}"]["n_tokens"]
        # the K=3 run may use at most 45 % of what is left, so that the baselines still fit
        # (on an H200 the first GPU run spent the whole section on K=3 at 73 ms/token)
        share = 0.45 if K == GEN_K else 1.0
        out, times = self.cached(K, n, stop_at=self.stop_at(share * self.remaining()))
        res = _gen_timing(times, n)
        res["tokens_head"], res["decoding"] = out[:16], self.decoding
        self.res[f"K{K}"] = {**res, "tokens": out}
        return res

    def e_ratio(self):
        from ponder_pt.inference.decode import weight_read_ratio

        a, b = self.res.get(f"K{GEN_K}"), self.res.get("K0")
        if not a or not b:
            raise RuntimeError("needs both the K=3 and the K=0 cached entries")
        ratio = a["ms_per_token"] / ((GEN_K + 1) * b["ms_per_token"])
        steady = (a["ms_per_token_after_first"] / ((GEN_K + 1) * b["ms_per_token_after_first"])
                  if a.get("ms_per_token_after_first") and b.get("ms_per_token_after_first")
                  else ratio)
        last = str(max(int(k) for k in a["ms_per_token_segment"]))
        ratio_last = a["ms_per_token_segment"][last] / (
            (GEN_K + 1) * b["ms_per_token_segment"][last])
        # the mean cached length over the run: the KV reads that dilute the W_in reads
        floor = weight_read_ratio(self.model, GEN_K, GEN_PROMPT + a["n_tokens"] // 2)
        res = {"ratio": steady, "ratio_with_first_tokens": ratio,
               "ratio_last_segment": ratio_last, "goal": GEN_GOAL,
               "meets_goal": steady <= GEN_GOAL, "weight_read_floor": floor,
               "ratio_over_floor": steady / floor, "k3_ms_per_token": a["ms_per_token"],
               "k0_ms_per_token": b["ms_per_token"], "n_tokens": a["n_tokens"],
               "decoding": a.get("decoding"),
               "note": f"K={GEN_K} cached ms/token / ({GEN_K + 1} x K=0 cached ms/token) "
                       f"after the first {min(_gen_marks(a['n_tokens']))} tokens (prefill, "
                       f"graph capture); weight-read floor {floor:.3f}"}
        if not self.args.smoke and steady > max(GEN_GOAL, GEN_FLOOR_SLACK * floor):
            res.update(status="fail", note=res["note"] + f": above the {GEN_GOAL} goal and "
                                                         f"{GEN_FLOOR_SLACK} x the floor")
        return res

    def e_eager(self, K):
        """The same decoding without the CUDA graph (eager steps on preallocated caches),
        over the first GEN_EAGER_TOKENS tokens; graph speed-up over the same tokens."""
        n = min(GEN_EAGER_TOKENS, self.n_new)
        out, times = self.cached(K, n, stop_at=self.stop_at(0.5 * self.remaining()),
                                 cuda_graph=False)
        res = _gen_timing(times, n)
        res["decoding"] = self.decoding
        self.res[f"K{K}_eager"] = res
        graph = self.res.get(f"K{K}")
        if graph and res["ms_per_token_after_first"]:  # both without prefill and capture
            first = min(_gen_marks(n))
            res["eager_over_graph"] = (res["ms_per_token_after_first"]
                                       / cached_ms_to(graph, res["n_tokens"], start=first))
            res["same_tokens_as_graph"] = out == graph["tokens"][:len(out)]
        return res

    def e_adaptive(self):
        """Adaptive pondering: the same weights with a random palbert halting head (its logits
        spread so tokens exit at different passes), decoded at q = 0.5 (eagerly: the passes
        differ per token) over the first GEN_EAGER_TOKENS tokens, against the eager fixed-K
        run over the same tokens. Goal: time ratio within 15 % of (mean passes) / (K+1)."""
        import torch

        from ponder_pt.config.schema import HaltingConfig, PonderConfig
        from ponder_pt.inference.model import generate_cached
        from ponder_pt.models import PonderLM

        n = min(GEN_EAGER_TOKENS, self.n_new)
        model = PonderLM(self.cfg, PonderConfig(steps=GEN_K, halting=HaltingConfig(
            mode="palbert", q=0.5)), params_dtype=torch.bfloat16, seed=0)
        model.load_state_dict(self.model.state_dict(), strict=False)  # the head stays random
        with torch.no_grad():
            w = model.halting.proj.weight
            w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
                    * 4.0 / self.cfg.hidden_size ** 0.5)
        model = model.to(self.dev).eval()
        generate_cached(model, self.prompt, 8)  # warm-up
        passes: list = []
        sync(self.dev)
        t0 = time.perf_counter()
        generate_cached(model, self.prompt, n, passes=passes)
        sync(self.dev)
        total = time.perf_counter() - t0
        mean = statistics.fmean(passes)
        res = {"n_tokens": n, "total_s": total, "ms_per_token": 1e3 * total / n,
               "mean_passes": mean, "passes_ratio": mean / (GEN_K + 1)}
        fixed = self.res.get(f"K{GEN_K}_eager")
        if fixed:
            ratio = res["ms_per_token"] / fixed["ms_per_token"]
            ok = abs(ratio - res["passes_ratio"]) <= 0.15 * res["passes_ratio"]
            res.update(ratio_to_fixed=ratio, within_15pct=ok,
                       note=f"adaptive / eager fixed K={GEN_K} ms/token {ratio:.2f} vs mean "
                            f"passes / {GEN_K + 1} = {res['passes_ratio']:.2f}")
        del model
        return res

    def e_speculative(self):
        """Speculative decoding over the passes (d = 1 drafting n = 3 tokens per verify step),
        eager, over the first GEN_EAGER_TOKENS tokens: ms/token against the eager fixed-K run
        (the same tokens, checked), with the acceptance rate. The weights are random, so the
        acceptance says what this model drafts, not what a trained one would."""
        from ponder_pt.inference.model import generate_cached
        from ponder_pt.inference.speculative import (SpeculativeStats,
                                                     generate_speculative_batch)

        n = min(GEN_EAGER_TOKENS, self.n_new)
        ordinary = generate_cached(self.model, self.prompt, n, cuda_graph=False)
        generate_speculative_batch(self.model, [self.prompt], 8, 1, 3)  # warm-up
        stats = SpeculativeStats()
        sync(self.dev)
        t0 = time.perf_counter()
        out = generate_speculative_batch(self.model, [self.prompt], n, 1, 3, stats=stats)[0]
        sync(self.dev)
        total = time.perf_counter() - t0
        res = {"n_tokens": n, "total_s": total, "ms_per_token": 1e3 * total / n,
               "draft_passes": 1, "draft_tokens": 3, "same_tokens": out == ordinary,
               **stats.as_dict()}
        if self.res.get(f"K{GEN_K}_eager"):
            res["ratio_to_k3_eager"] = res["ms_per_token"] / self.res[f"K{GEN_K}_eager"][
                "ms_per_token"]
        return res

    def e_thoughts(self):
        """Latent thoughts: the same weights with M = 1 thought per token (2 one-slot passes
        per token through one cache twice as long), decoded eagerly (no CUDA graph for
        thought slots) over the first GEN_EAGER_TOKENS tokens; ms/token against the plain
        model's graph-replayed and the eager fixed-K runs."""
        import torch

        from ponder_pt.config.schema import ThoughtsConfig
        from ponder_pt.inference.model import generate_cached
        from ponder_pt.models import PonderLM

        n = min(GEN_EAGER_TOKENS, self.n_new)
        model = PonderLM(self.cfg, thoughts=ThoughtsConfig(count=1),
                         params_dtype=torch.bfloat16, seed=0)
        model.load_state_dict(self.model.state_dict())  # thoughts add no weights
        model = model.to(self.dev).eval()
        generate_cached(model, self.prompt, 8)  # warm-up
        sync(self.dev)
        t0 = time.perf_counter()
        generate_cached(model, self.prompt, n)
        sync(self.dev)
        total = time.perf_counter() - t0
        res = {"n_tokens": n, "total_s": total, "ms_per_token": 1e3 * total / n, "slots": 2}
        for key, name in (("K0", "plain_graph"), (f"K{GEN_K}_eager", f"k{GEN_K}_eager")):
            if self.res.get(key):
                res[f"ratio_to_{name}"] = res["ms_per_token"] / self.res[key]["ms_per_token"]
        del model
        return res

    def e_recompute(self, n, extend=False):
        import torch

        if extend:
            seq, times = self.rec_state
            t_before = times[max(times)]
        else:
            seq, times, t_before = torch.tensor([self.prompt], device=self.dev), {}, 0.0
        # the continuation leaves the HF entry its estimated time
        reserve = self.hf_need() if extend and "hf" not in self.res else 0.0
        stop_at = self.stop_at(max(1.0, self.remaining() - reserve))
        seq, times = self.recompute_loop(seq, n, times, t_before, stop_at)
        self.rec_state = (seq, times)
        res = _gen_timing(times, n)
        res["measured_to"], res["sdpa"] = res["n_tokens"], "varying_shapes"
        out = seq[0, GEN_PROMPT:].tolist()
        ref = self.res.get(f"K{GEN_K}", {}).get("tokens")
        if ref:
            m = next((i for i, (u, v) in enumerate(zip(out, ref)) if u != v), None)
            res["same_tokens_as_cached"] = m is None
            res["first_mismatch"] = m  # bf16: cached and full forwards may round apart
        cached = self.res.get(f"K{GEN_K}")
        if cached:
            res["speedup_cached_vs_recompute"] = (res["ms_per_token"]
                                                  / cached_ms_to(cached, res["n_tokens"]))
        if res["n_tokens"] < self.n_new:
            res.update(_extrapolate(times, self.n_new))
        return res

    def e_hf(self):
        import shutil

        import torch
        from transformers import AutoModelForCausalLM

        from ponder_pt.config import Config
        from ponder_pt.export import export_full
        from ponder_pt.export.hf_auto import from_pretrained
        from ponder_pt.models.hf import full_state_dict
        from ponder_pt.sdpa_backends import varying_shapes

        out_dir = os.path.join(self.args.out, "work", f"gen_hf_{self.shape}")
        t = time.perf_counter()
        cfg = Config()
        cfg.model, cfg.ponder.steps = self.cfg, GEN_K
        export_full(cfg, full_state_dict(self.model), out_dir, progress=False)
        hf = from_pretrained(AutoModelForCausalLM, out_dir, False,
                             dtype=torch.bfloat16).to(self.dev).eval()
        shutil.rmtree(out_dir, ignore_errors=True)
        export_s = time.perf_counter() - t
        ids = torch.tensor([self.prompt], device=self.dev)
        hf.generation_config.eos_token_id = None

        def run(n, max_time=None):
            return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                               pad_token_id=0, max_time=max_time)

        with varying_shapes(self.dev):  # as `ponder-pt generate` drives an HF export
            run(8)  # warm-up
            sync(self.dev)
            t0 = time.perf_counter()
            out = run(self.n_new, max_time=max(1.0, self.remaining()))  # stops early if late
            sync(self.dev)
        total = time.perf_counter() - t0
        new = out[0, GEN_PROMPT:].tolist()
        n = len(new)
        res = {"n_tokens": n, "total_s": total, "ms_per_token": 1e3 * total / n,
               "tokens_per_s": n / total, "export_and_load_s": export_s,
               "sdpa": "varying_shapes",
               "hf_class": type(hf).__name__, "tokens_head": new[:16]}
        import transformers

        res["transformers"] = transformers.__version__
        ref = self.res.get(f"K{GEN_K}")
        if ref:
            m = next((i for i, (u, v) in enumerate(zip(new, ref["tokens"])) if u != v), None)
            res.update(same_tokens_as_native=m is None, first_mismatch=m,
                       hf_over_native=res["ms_per_token"] / ref["ms_per_token"])
        del hf
        cleanup(self.dev)
        self.res["hf"] = res
        return res

    def run(self):
        sh = self.shape
        self.part.update(**{f"build_{sh}": "running"})
        b = record(self.part, f"{sh} build PonderLM K={GEN_K} bf16 + warm-up", self.build,
                   **self.fields("build"))
        self.part.update(**{f"build_{sh}": b.get("build_s")})
        if b["status"] != "ok":
            return
        n = self.n_new
        # (name, case, function, rough seconds needed given what was measured)
        plan = [
            (f"{sh} K={GEN_K} cached (K+1 KV caches), {n} new tokens", "k3_cached",
             lambda: self.e_cached(GEN_K), lambda: 0.0),
            (f"{sh} K=0 cached (plain), {n} new tokens", "k0_cached",
             lambda: self.e_cached(0), lambda: self.est("K3", 1 / (GEN_K + 1))),
            (f"{sh} ratio K={GEN_K} cached / ({GEN_K + 1} x K=0 cached)", "ratio",
             self.e_ratio, lambda: 0.0),
            (f"{sh} K={GEN_K} cached without CUDA graph, first {GEN_EAGER_TOKENS} tokens",
             "k3_eager", lambda: self.e_eager(GEN_K), lambda: 0.0),
            (f"{sh} adaptive K={GEN_K} (random palbert head, q=0.5), eager, first "
             f"{min(GEN_EAGER_TOKENS, n)} tokens", "adaptive", self.e_adaptive,
             lambda: self.est(f"K{GEN_K}_eager", 1.0)),
            (f"{sh} latent thoughts M=1, eager, first {min(GEN_EAGER_TOKENS, n)} tokens",
             "thoughts", self.e_thoughts, lambda: self.est(f"K{GEN_K}_eager", 0.6)),
            (f"{sh} speculative K={GEN_K}, draft d=1 n=3 (random weights), eager, first "
             f"{min(GEN_EAGER_TOKENS, n)} tokens", "speculative", self.e_speculative,
             lambda: self.est(f"K{GEN_K}_eager", 1.5)),
            (f"{sh} recompute prefix (reference), K={GEN_K}, {self.n_rec} new tokens",
             "recompute", lambda: self.e_recompute(self.n_rec),
             lambda: self.est("K3", self.n_rec / n)),
            (f"{sh} recompute prefix continued to {n} new tokens", "recompute_full",
             lambda: self.e_recompute(n, extend=True),
             lambda: self.est("K3", 0.25) + self.hf_need()),
            (f"{sh} HF export generate(), K={GEN_K}, {n} new tokens", "hf_generate",
             self.e_hf, self.hf_need),
        ]
        for name, case, fn, need in plan:
            if case == "recompute_full" and (self.rec_state is None
                                             or max(self.rec_state[1]) >= n):
                continue
            if (case in ("recompute", "hf_generate", "adaptive", "thoughts", "speculative")
                    and not self.baselines):
                self.skip(name, self.fields(case), "baselines run at the first shape only")
                continue
            if case == "ratio" and not ("K0" in self.res and f"K{GEN_K}" in self.res):
                self.skip(name, self.fields(case), "needs both cached entries")
                continue
            want = need()
            if self.remaining() < want:
                self.skip(name, self.fields(case), f"time budget: {self.remaining():.0f}s "
                          f"left, ~{want:.0f}s needed")
                continue
            record(self.part, name, fn, **self.fields(case))
        self.model = None

    def hf_need(self) -> float:
        """Rough seconds for the HF entry: export + load, and ~1.3x our K=3 decoding."""
        return self.est(f"K{GEN_K}", 1.3) + (3.0 if self.args.smoke else 12.0)

    def est(self, key, factor) -> float:
        r = self.res.get(key)
        return r["total_s"] * factor if r else 0.0


def cached_ms_to(res: dict, n: int, start: int = 0) -> float:
    """Mean ms/token of a cached run over its tokens (start, n] (from its marks)."""
    seg = res["ms_per_token_segment"]
    total, covered, prev = 0.0, 0, 0
    for m in sorted(int(k) for k in seg):
        overlap = min(m, n) - max(prev, start)
        if overlap > 0:
            total += seg[str(m)] * overlap
            covered += overlap
        prev = m
    return total / max(covered, 1)


def _extrapolate(times: dict, n: int) -> dict:
    """Recompute stopped before n: least-squares line of per-token ms vs tokens done over the
    measured segments, summed to n. Labelled as an extrapolation."""
    marks = sorted(times)
    xs, ys, prev = [], [], 0
    for m in marks:
        if m > prev:
            xs.append((m + prev) / 2)
            ys.append(1e3 * (times[m] - times.get(prev, 0.0)) / (m - prev))
        prev = m
    if len(xs) < 2:
        a, b = (ys[0] if ys else 0.0), 0.0
    else:
        mx, my = statistics.mean(xs), statistics.mean(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(
            sum((x - mx) ** 2 for x in xs), 1e-9)
        a = my - b * mx
    total_ms = sum(max(a + b * (i + 0.5), 0.0) for i in range(n))
    return {"extrapolated_to": n, "extrapolated_ms_per_token": total_ms / n,
            "extrapolated_note": "linear fit of measured per-token ms vs prefix length, "
                                 "NOT measured"}


def markdown(res: dict) -> list:
    gs = res.get("sections", {}).get("gen", {})
    if not gs.get("entries"):
        return []
    out = ["", f"## Generation speed (batch 1, greedy, bf16, K={gs.get('K')}, prompt "
               f"{gs.get('prompt_tokens')} tokens, {gs.get('new_tokens')} new tokens)", ""]
    rows = []
    for e in gs["entries"]:
        seg = e.get("ms_per_token_segment") or {}
        last = seg[max(seg, key=int)] if seg else None
        rows.append([e.get("shape"), e.get("case"), e["status"], e.get("n_tokens"),
                     e.get("ms_per_token"), last, e.get("tokens_per_s"),
                     e.get("ratio") or e.get("ratio_to_fixed")
                     or e.get("speedup_cached_vs_recompute")
                     or e.get("hf_over_native") or e.get("eager_over_graph"),
                     e.get("extrapolated_ms_per_token"),
                     (e.get("note") or e.get("reason") or e.get("error", ""))[:90]])
    out.append(md_table(["shape", "case", "status", "tokens", "ms/token", "ms/token last "
                         "segment", "tokens/s", "ratio*", "extrapolated ms/token**",
                         "note"], rows))
    out += ["", f"*ratio: for `ratio`, K={gs.get('K')} cached ms/token / (K+1 x K=0 "
                f"cached ms/token), goal <= {gs.get('goal_ratio')} (the note gives the floor "
                f"that reading the weights sets: each pondering pass also reads W_in); for "
                f"`k3_eager`, its ms/token / the graph-replayed run's; for `adaptive`, "
                f"its ms/token / `k3_eager`'s (goal: within 15 % of mean passes / (K+1)); "
                f"for `recompute`, "
                f"recompute ms/token / K={gs.get('K')} cached ms/token over the same "
                f"tokens; for `hf_generate`, HF ms/token / native ms/token. **only where "
                f"the recompute loop stopped early: a linear fit, not a measurement."]
    return out
