"""Where a training step's time goes: torch.profiler over forward + backward + fused AdamW
steps of HF GPTNeoXForCausalLM and of our model (built and timed as the throughput section
does) at one shape and micro-batch. Per model: the wall step time (unprofiled), device time
per step by kernel category, the top kernels, and the gap between summed kernel time and the
wall step time (launch / CPU-bound idle). Device time sums the device-side kernel / memcpy
events, each once; the CPU op that launched a kernel only picks its category. A device time above
the profiled wall step is flagged: on one stream it means double counting, not work.

On --smoke (CPU) the "kernels" are aten ops and their time is the ops' self CPU time, so the
gap is the framework's Python / dispatch overhead instead of GPU idle time."""

from __future__ import annotations

import re
import time
from bisect import bisect_left

from .common import cleanup, device_name, init_process_group, log, md_cell, md_table, sync
from .results import Part, record
from .throughput import Throughput

PROFILE_SHAPE = {"gpu": "pythia-1b", "smoke": "toy"}
PROFILED_STEPS = 2
TOP_KERNELS = 15
TOP_OPS = 15
# summed device time above this share of the profiled wall step cannot be real on one stream
SUSPECT_OVER = 1.05
CATEGORIES = ("gemm", "attention", "norm", "elementwise", "softmax_ce", "optimizer",
              "communication", "other")

# (category, lower-case substrings of a CUDA kernel or aten op name); the first rule that
# matches wins. Order matters: cuDNN's SDPA kernels carry gemm-like tile names (wgmma), fused
# AdamW runs in multi_tensor_apply kernels, "addmm" contains "add", and the embedding's
# gather / sort / scatter kernels would otherwise count as elementwise.
_RULES = (
    ("communication", ("nccl", "all_reduce", "allreduce", "all_gather", "allgather",
                       "reduce_scatter", "c10d", "gloo")),
    ("optimizer", ("adam", "multi_tensor_apply", "_foreach_", "optimizer.step")),
    ("attention", ("flash", "fmha", "sdpa", "scaled_dot_product", "attention", "cudnn",
                   "dot_do_o")),
    ("softmax_ce", ("softmax", "cross_entropy", "crossentropy", "nll_loss", "nllloss")),
    ("norm", ("layer_norm", "layernorm", "gammabeta", "rowwisemoments", "rms_norm",
              "rmsnorm")),
    ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "cublas", "xmma", "splitkreduce",
              "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm",
              "aten::matmul", "aten::linear")),
    ("other", ("embedding", "index", "gather", "scatter", "sort", "segment", "unique")),
    ("elementwise", ("elementwise", "gelu", "add", "mul", "sub", "div", "neg", "pow", "sqrt",
                     "exp", "tanh", "sin", "cos", "where", "masked", "copy", "memcpy", "memset",
                     "fill", "zero", "clone", "cat", "_to_copy", "cast", "rotary", "bias",
                     "reduce", "sum", "mean", "triu", "tril")),
)
# torch's own record_function ranges (an optimizer hook's, the profiler's step marker). On the
# GPU timeline each is mirrored as an annotation spanning the kernels launched inside it: no
# work of its own. Names only: kernel names carry '#' too ({lambda()#3}), never this shape.
_RANGE_NAME = re.compile(r"^(Optimizer\.\w+#\w+\.\w+|ProfilerStep#\d+)$")
# a generic kernel (a copy, an exp, a reduction) takes the category of the op that launched it
# when that op or one of its callers says what it is: megatron's vocab-parallel cross-entropy
# is plain max / sub / exp / sum kernels under a _VocabParallelCrossEntropy op, and fused
# AdamW's bookkeeping runs under Optimizer.step
_CONTEXT = ("communication", "optimizer", "attention", "softmax_ce", "norm")


def _by_name(name: str, categories=None):
    low = name.lower()
    for category, keys in _RULES:
        if (categories is None or category in categories) and any(k in low for k in keys):
            return category
    return None


def categorize(name: str, context=()) -> str:
    """Category of a kernel / op `name`; context: the names of the op that launched it and of
    its callers, innermost first."""
    category = _by_name(name) or "other"
    if category in ("elementwise", "other"):
        for op in context:
            found = _by_name(op, _CONTEXT)
            if found:
                return found
    return category


def summarize(rows, steps: int, step_ms: float, profiled_ms: float = None) -> dict:
    """rows: (name, category, calls, microseconds) over `steps` profiled steps -> per-step
    figures by category, the top kernels, and the gap to the wall step time `step_ms`.
    profiled_ms: the wall step time under the profiler, which the device time (on one stream)
    cannot exceed; device_over_step above SUSPECT_OVER marks the accounting as broken."""
    per_cat = dict.fromkeys(CATEGORIES, 0.0)
    for _, category, _, us in rows:
        per_cat[category] += us / 1e3 / steps
    device_ms = sum(us for _, _, _, us in rows) / 1e3 / steps
    top = sorted(rows, key=lambda r: -r[3])[:TOP_KERNELS]
    gap_ms = step_ms - device_ms
    over = device_ms / profiled_ms if profiled_ms else None
    return {
        "step_ms": step_ms, "device_ms": device_ms, "gap_ms": gap_ms,
        "step_ms_profiled": profiled_ms, "device_over_step": over,
        "accounting_suspect": over is not None and over > SUSPECT_OVER,
        "gap_share": gap_ms / step_ms, "device_share": device_ms / step_ms,
        "categories_ms": per_cat,
        "category_share": {c: v / step_ms for c, v in per_cat.items()},
        "kernel_calls_per_step": sum(r[2] for r in rows) / steps,
        "distinct_kernels": len({r[0] for r in rows}),
        "top_kernels": [{"name": n[:200], "category": c, "calls_per_step": k / steps,
                         "ms_per_step": us / 1e3 / steps,
                         "share_of_device": us / 1e3 / steps / device_ms if device_ms else 0.0}
                        for n, c, k, us in top],
    }


def _callers(fe) -> list:
    names = []
    while fe is not None and len(names) < 40:
        names.append(fe.name)
        fe = fe.cpu_parent
    return names


def _span(fe) -> float:
    return fe.time_range.end - fe.time_range.start


def _gpu_work(events, DeviceType) -> list:
    """The device-side events that are GPU work (kernels, memcpys, memsets), each once.

    A record_function range (Optimizer.step#AdamW.step, ProfilerStep#N) is mirrored on the GPU
    timeline as a CUDA-typed gpu_user_annotation event spanning the kernels launched inside it,
    so counting it counts those kernels twice. torch flags it is_user_annotation (kineto's
    GPU_USER_ANNOTATION activity); failing the flag, an event named like a CPU-side event that
    also spans another device event is one. Neither sign alone would do: kernel names carry '#'
    ({lambda()#3}), and inductor names a CPU range after each triton kernel it launches."""
    dev = [fe for fe in events if fe.device_type == DeviceType.CUDA]
    cpu_names = {fe.name for fe in events if fe.device_type == DeviceType.CPU}
    spans = sorted((fe.time_range.start, fe.time_range.end, i) for i, fe in enumerate(dev))
    starts = [s for s, _, _ in spans]

    def spans_another(i, fe):
        for n in range(bisect_left(starts, fe.time_range.start), len(spans)):
            start, end, j = spans[n]
            if start > fe.time_range.end:
                break
            if j != i and end <= fe.time_range.end:
                return True
        return False

    return [fe for i, fe in enumerate(dev)
            if not getattr(fe, "is_user_annotation", False)
            and not (fe.name in cpu_names and spans_another(i, fe))]


def _launchers(events, DeviceType) -> list:
    """Per correlation id, the CPU event whose `kernels` list is read: the widest of those
    carrying the id (the op itself; see `device_rows` for the others)."""
    owner = {}
    for fe in events:
        if fe.device_type == DeviceType.CPU and fe.kernels:
            if fe.id not in owner or _span(fe) > _span(owner[fe.id]):
                owner[fe.id] = fe
    return list(owner.values())


def device_rows(events, on_gpu: bool) -> list:
    """(name, category, calls, microseconds) of the CUDA kernels / memcpys (GPU), or of the
    aten ops' self CPU time (CPU: profiler annotations and autograd wrappers are overhead)."""
    from torch.autograd import DeviceType

    acc = {}  # (name, category) -> [calls, us]

    def add(name, category, calls, us):
        slot = acc.setdefault((name, category), [0, 0.0])
        slot[0] += calls
        slot[1] += us

    if not on_gpu:
        for fe in events:
            if fe.device_type == DeviceType.CPU and fe.name.startswith("aten::"):
                us = fe.self_cpu_time_total
                if us > 0:
                    add(fe.name, categorize(fe.name, _callers(fe.cpu_parent)), 1, us)
        return [(n, c, calls, us) for (n, c), (calls, us) in acc.items() if us > 0]

    # time and calls come from the device-side events alone; a CPU event's `kernels` list only
    # says which op launched a kernel. torch hands a kernel to every CPU event carrying its op's
    # correlation id, and the profiler's own overhead records (CUPTI "Activity Buffer Request",
    # "Lazy Function Loading") inherit the id of the op they nest in: a CPU far ahead of the GPU
    # counted fused AdamW's kernels many times over. All CPU events of one id hold the same list,
    # so per id only the widest (the op itself) is read.
    total = {}  # kernel name -> [calls, us]
    for fe in _gpu_work(events, DeviceType):
        slot = total.setdefault(fe.name, [0, 0.0])
        slot[0] += 1
        slot[1] += _span(fe)
    linked = {}  # kernel name -> {category: [calls, us]}: how its true calls / time are split
    for fe in _launchers(events, DeviceType):
        context = _callers(fe)
        for k in fe.kernels:
            if k.name in total:
                slot = linked.setdefault(k.name, {}).setdefault(
                    categorize(k.name, context), [0, 0.0])
                slot[0] += 1
                slot[1] += k.duration
    for name, (calls, us) in total.items():
        split = linked.get(name) or {categorize(name): [1, 1.0]}  # unclaimed: by name alone
        n, t = sum(c for c, _ in split.values()), sum(u for _, u in split.values())
        for category, (c, u) in split.items():
            add(name, category, calls * c / n, us * (u / t if t > 0 else c / n))
    return [(n, c, calls, us) for (n, c), (calls, us) in acc.items() if us > 0]


def top_ops(events, on_gpu: bool, steps: int) -> list:
    """The aten ops that cost the most, per (op, input shapes): on a GPU the device time of the
    kernels each launched (one launching op per correlation id, as in `device_rows`), on the
    CPU their self time. Shapes need the profiler's record_shapes. Kernel names alone cannot
    say which add or copy is the expensive one; the shapes do."""
    from torch.autograd import DeviceType

    acc = {}  # (op, shapes) -> [calls, us, category]
    if on_gpu:
        # aten ops only: a record_function range lists its GPU annotation as a "kernel"
        timed = [(fe, sum(k.duration for k in fe.kernels))
                 for fe in _launchers(events, DeviceType) if fe.name.startswith("aten::")]
    else:
        timed = [(fe, fe.self_cpu_time_total) for fe in events
                 if fe.device_type == DeviceType.CPU and fe.name.startswith("aten::")]
    for fe, us in timed:
        if us <= 0:
            continue
        key = (fe.name, str(getattr(fe, "input_shapes", None) or [])[:160])
        slot = acc.setdefault(key, [0, 0.0, categorize(fe.name, _callers(fe.cpu_parent))])
        slot[0] += 1
        slot[1] += us
    top = sorted(acc.items(), key=lambda kv: -kv[1][1])[:TOP_OPS]
    return [{"op": op, "input_shapes": shapes, "category": cat, "calls_per_step": n / steps,
             "ms_per_step": us / 1e3 / steps} for (op, shapes), (n, us, cat) in top]


def profile_steps(tp: Throughput, impl: str, model, opt, K: int, mb: int) -> tuple:
    """Run PROFILED_STEPS training steps under torch.profiler: (rows, profiled wall s/step,
    top ops)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    dev = tp.dev
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tp.cfg.vocab_size, (mb, tp.seq), generator=gen).to(dev)
    labels = torch.roll(ids, -1, 1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    sync(dev)
    with profile(activities=acts, record_shapes=True) as prof:
        t = time.perf_counter()
        for _ in range(PROFILED_STEPS):
            tp.train_step(impl, model, opt, ids, labels, K)
        sync(dev)
        wall = (time.perf_counter() - t) / PROFILED_STEPS
    events = prof.events()
    on_gpu = dev == "cuda"
    return device_rows(events, on_gpu), wall, top_ops(events, on_gpu, PROFILED_STEPS)


class _SameBatch(Throughput):
    """Throughput with the micro-batch pinned once the first model has run, so that HF and
    ours K=0 are profiled at the same micro-batch (after any OOM halving)."""

    pinned = None  # K -> micro-batch

    def start_mb(self, K: int, ckpt: str) -> int:
        if self.pinned and K in self.pinned:
            return self.pinned[K]
        return super().start_mb(K, ckpt)


def section_profile(args, part: Part) -> None:
    dev = device_name(args.smoke)
    init_process_group(dev)
    shape = PROFILE_SHAPE["smoke" if args.smoke else "gpu"]
    tp = _SameBatch(args, part, shape)
    tp.pinned = {}
    tp.fake_oom = False  # the throughput section exercises the OOM halving
    tp.iters, tp.spec_cap = 3, 3.0  # enough timed steps for a median; the time is for profiling
    part.update(shape=shape, seq=tp.seq, device=dev, profiled_steps=PROFILED_STEPS,
                categories=list(CATEGORIES), top_kernels=TOP_KERNELS,
                timed=("CUDA kernel / memcpy time, each device event once" if dev == "cuda"
                       else "aten op self CPU time"),
                precision="bf16 params + torch.optim.AdamW(fused=True), no autocast")
    model = opt = None
    built = None
    fresh_build_s = 1.0 if args.smoke else 12.0  # ours at 1B took 9 s to build on an H100
    for impl, K in (("hf", 0), ("ours", 0), ("ours", 3)):
        name = f"{shape} {'HF GPTNeoX' if impl == 'hf' else 'ours'} K={K}"
        fields = {"shape": shape, "impl": impl, "K": K, "case": f"{impl}_k{K}", "seq": tp.seq}
        est = tp.estimate(K, "none", tp.start_mb(K, "none"))
        steps = tp.warmup + tp.iters + PROFILED_STEPS
        need = (2 * est * steps if est else 0.0) + (0.0 if built == impl else fresh_build_s)
        need += 2.0 if args.smoke else 5.0  # profiler start and trace processing
        if built is not None and tp.remaining() < need:
            reason = f"time budget: {tp.remaining():.0f}s left, ~{need:.0f}s needed"
            part.add({"name": name, **fields, "status": "skipped", "reason": reason})
            log(f"profile: {name} -> skipped ({reason})")
            continue
        if built != impl:
            model = opt = None
            cleanup(dev)

        def go(impl=impl, K=K):
            nonlocal model, opt, built
            if built != impl:
                model = tp.build_hf() if impl == "hf" else tp.build_ours()
                opt = tp.optimizer(model)
                built = impl
            timing = tp.measure(impl, model, opt, K, "none")
            mb = timing["micro_batch"]
            tp.pinned.setdefault(K, mb)
            rows, profiled_s, ops = profile_steps(tp, impl, model, opt, K, mb)
            res = summarize(rows, PROFILED_STEPS, 1e3 * timing["step_s"], 1e3 * profiled_s)
            res.update({k: timing[k] for k in ("micro_batch", "tokens_per_step", "tokens_per_s",
                                                "tflops", "mfu", "peak_gib", "loss",
                                                "timed_steps")},
                       build_s=tp.build_s.get(impl), top_ops=ops)
            if timing.get("status") == "fail":
                res.update(status="fail", note=timing.get("note"))
            return res

        entry = record(part, name, go, **fields)
        if entry["status"] == "error":
            model = opt = None
            built = None
            cleanup(dev)
    model = opt = None
    cleanup(dev)


# ============================================================================ report


def _label(e: dict) -> str:
    return f"{'HF GPTNeoX' if e.get('impl') == 'hf' else 'ours'} K={e.get('K')}"


def _pct(x):
    return None if x is None else f"{100 * x:.1f} %"


def _over(e: dict):
    """Device time / profiled wall step (older results lack the field)."""
    over = e.get("device_over_step")
    if over is None and e.get("device_ms") is not None and e.get("step_ms_profiled"):
        over = e["device_ms"] / e["step_ms_profiled"]
    return over


def _suspect(e: dict) -> bool:
    over = _over(e)
    return over is not None and over > SUSPECT_OVER


def _suspect_note(e: dict) -> str:
    return (f"**{_label(e)}: accounting suspect**: device time is {_pct(_over(e))} of the "
            f"profiled wall step; on one stream it cannot exceed it, so kernels were counted more "
            f"than once and these figures are not real work.")


def markdown(res: dict) -> list:
    sec = res.get("sections", {}).get("profile", {})
    ok = [e for e in sec.get("entries", []) if e.get("status") == "ok"]
    if not ok:
        return []
    cats = sec.get("categories") or list(CATEGORIES)
    out = ["", f"## Profile: one training step by kernel category ({sec.get('shape')}, seq "
               f"{sec.get('seq')}, fwd + bwd + fused AdamW, torch.profiler)", "",
           f"Per step, mean of {sec.get('profiled_steps')} profiled steps after warm-up; "
           f"device time is {sec.get('timed')}; step is the median unprofiled wall step time "
           f"(the throughput section's timing); gap = step - device time (launch / CPU-bound "
           f"idle on a GPU); device / profiled step over {SUSPECT_OVER:g} marks an entry whose "
           f"kernels were counted more than once.", ""]
    by = {(e.get("impl"), e.get("K")): e for e in ok}
    ours, hf = by.get(("ours", 0)), by.get(("hf", 0))
    head = ["ms per step"] + [_label(e) for e in ok] + (["ours K=0 / HF"] if ours and hf
                                                         else [])

    def row(label, get):
        vals = [get(e) for e in ok]
        ratio = []
        if ours and hf:
            a, b = get(ours), get(hf)
            ratio = [a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
                     else None]
        return [label] + vals + ratio

    rows = [row(c, lambda e, c=c: e["categories_ms"].get(c)) for c in cats]
    rows += [row("**device total**", lambda e: e.get("device_ms")),
             row("device / profiled step", _over),
             row("gap (step - device)", lambda e: e.get("gap_ms")),
             row("**step (wall)**", lambda e: e.get("step_ms")),
             row("micro-batch", lambda e: e.get("micro_batch")),
             row("tokens/s", lambda e: e.get("tokens_per_s")),
             row("MFU", lambda e: e.get("mfu"))]
    out += ["### Side by side", "", md_table(head, rows)]
    out += [line for e in ok if _suspect(e) for line in ("", _suspect_note(e))]
    for e in ok:
        out += ["", f"### {_label(e)}: micro-batch {e.get('micro_batch')}, step "
                    f"{md_cell(e.get('step_ms'))} ms (profiled {md_cell(e.get('step_ms_profiled'))}"
                    f" ms), device {md_cell(e.get('device_ms'))} ms, gap "
                    f"{md_cell(e.get('gap_ms'))} ms ({_pct(e.get('gap_share'))} of the step), "
                    f"{md_cell(e.get('kernel_calls_per_step'))} kernels per step", ""]
        if _suspect(e):
            out += [_suspect_note(e), ""]
        dev = e.get("device_ms") or 0.0
        out.append(md_table(["category", "ms/step", "% of step", "% of device"],
                            [[c, e["categories_ms"].get(c), _pct(e["category_share"].get(c)),
                              _pct(e["categories_ms"].get(c) / dev if dev else None)]
                             for c in cats]))
        out += ["", md_table(["kernel", "category", "calls/step", "ms/step", "% of device"],
                             [[k["name"][:90].replace("|", "/"), k["category"],
                               k["calls_per_step"], k["ms_per_step"],
                               _pct(k["share_of_device"])] for k in e.get("top_kernels", [])])]
        if e.get("top_ops"):
            out += ["", md_table(["op (launching its kernels)", "input shapes", "category",
                                  "calls/step", "ms/step"],
                                 [[o["op"], o["input_shapes"][:100].replace("|", "/"),
                                   o["category"], o["calls_per_step"], o["ms_per_step"]]
                                  for o in e["top_ops"]])]
    return out


# ============================================================================ saved results


def rederive(e: dict) -> dict:
    """A saved profile entry (gpu_results.json) three ways, each labelled.

    raw: as written. corrected: the GPU annotations of torch's own record_function ranges
    (`_RANGE_NAME`) that its top-kernel list shows, taken out of their category, the device
    time and the gap; exact, since an annotation spans kernels already counted (the code that
    wrote the first GPU runs summed Optimizer.step#AdamW.step as a kernel). reconstructed: only
    where the corrected device time still exceeds the profiled wall step on one stream
    (kernels listed once per CPU record of their op, the optimizer's many times over): the
    optimizer category becomes the span of the optimizer step's annotation, which covers its
    kernels and the idle time between them (an upper bound), everything else as corrected.
    "reconstruction" says which case: not needed, rebuilt, or not recoverable (the other
    categories were inflated too, so that does not bring the device time under the step)."""
    cats = dict(e["categories_ms"])
    ranges = [k for k in e.get("top_kernels", []) if _RANGE_NAME.match(k["name"])]
    raw = _figures(e, cats)
    fixed = dict(cats)
    for k in ranges:
        fixed[k["category"]] -= k["ms_per_step"]
    corrected = _figures(e, fixed, removed=[k["name"] for k in ranges])
    reconstructed, status = None, "not needed"
    step = next((k for k in ranges if k["name"].startswith("Optimizer.step#")), None)
    if _over(corrected) is not None and _over(corrected) > SUSPECT_OVER:
        status = "not recoverable"
        if step:
            rebuilt = _figures(e, dict(fixed, optimizer=step["ms_per_step"]))
            if _over(rebuilt) <= SUSPECT_OVER:
                reconstructed, status = rebuilt, "rebuilt"
    return {"raw": raw, "corrected": corrected, "reconstructed": reconstructed,
            "reconstruction": status}


def _figures(e: dict, cats: dict, removed=()) -> dict:
    device = sum(cats.values())
    return {"categories_ms": cats, "device_ms": device, "step_ms": e.get("step_ms"),
            "step_ms_profiled": e.get("step_ms_profiled"), "gap_ms": e["step_ms"] - device,
            "device_over_step": (device / e["step_ms_profiled"] if e.get("step_ms_profiled")
                                 else None), "removed": list(removed)}


def rederived_markdown(res: dict, source: str) -> list:
    """The profile entries of one saved gpu_results.json: a table per kind (raw / corrected /
    reconstructed), HF vs ours side by side; `source` names the file in the text."""
    sec = res.get("sections", {}).get("profile", {})
    ok = [e for e in sec.get("entries", []) if e.get("status") == "ok"]
    if not ok:
        return [f"{source}: no profile entries"]
    cats = sec.get("categories") or list(CATEGORIES)
    derived = [rederive(e) for e in ok]
    out = [f"Profile entries of `{source}` ({sec.get('shape')}, seq {sec.get('seq')}; device "
           f"time as that run's code summed it: {sec.get('timed')}), re-derived by "
           f"`benchmarks/gpu/profiling.py` (`rederive`):"]
    notes = {"raw": "as written in the JSON",
             "corrected": "torch's record_function annotations taken out (exact)",
             "reconstructed": "only where the corrected device time still exceeds the profiled "
                              "step: optimizer = the span of its step's annotation (an upper "
                              "bound), the rest as corrected; not a measurement"}
    for kind in ("raw", "corrected", "reconstructed"):
        head = [f"ms per step, {kind}"] + [f"{_label(e)} (mb {e.get('micro_batch')})"
                                           for e in ok]
        rows = []
        for c in cats:
            rows.append([c] + [d[kind]["categories_ms"].get(c) if d[kind] else None
                               for d in derived])
        for label, key in (("**device total**", "device_ms"),
                           ("device / profiled step", "device_over_step"),
                           ("gap (step - device)", "gap_ms"), ("**step (wall)**", "step_ms")):
            rows.append([label] + [d[kind][key] if d[kind] else None for d in derived])
        if kind == "reconstructed":
            rows.append(["reconstruction"] + [d["reconstruction"] for d in derived])
        out += ["", f"**{kind}**: {notes[kind]}", "", md_table(head, rows)]
    removed = sorted({n for d in derived for n in d["corrected"]["removed"]})
    out += ["", "Annotations taken out: " + (", ".join(f"`{n}`" for n in removed) or "none")
            + f"; device / profiled step above {SUSPECT_OVER:g} means kernels were counted "
              f"more than once."]
    return out


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Re-derive the profile tables of saved "
                                             "gpu_results.json files (raw / corrected / "
                                             "reconstructed), without a GPU")
    ap.add_argument("--from-raw", nargs="+", required=True, metavar="JSON")
    args = ap.parse_args(argv)
    for path in args.from_raw:
        with open(path, encoding="utf-8") as fh:
            print("\n".join(rederived_markdown(json.load(fh), path)) + "\n")
    return 0
