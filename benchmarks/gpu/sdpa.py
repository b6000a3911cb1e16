"""Which SDPA kernel really runs: torch.profiler over a training forward + backward of our
model (is_causal path), a KV-cache prefill (boolean-mask path), a one-token decode, and a
bare SDPA call at Pythia-1B's head_dim 256. Then what a new shape per call costs: one-token
attention over a key length that grows by one per call (decoding), with SDPA's default kernel
choice and with `ponder_pt.sdpa_backends.varying_shapes` (no cuDNN)."""

from __future__ import annotations

from .common import cleanup, device_name, init_process_group, md_table, shape_config, sync
from .results import Part, record


def _profile(fn, dev: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    fn()  # warm-up (lazy init, cuBLAS handles)
    sync(dev)
    with profile(activities=acts) as prof:
        fn()
        sync(dev)
    from torch.autograd import DeviceType

    avgs = prof.key_averages()
    names = {e.key for e in avgs}
    gpu_names = {e.key for e in avgs if getattr(e, "device_type", None) == DeviceType.CUDA}
    aten = sorted(n for n in names if n.startswith("aten::")
                  and ("scaled_dot_product" in n or "attention" in n.lower()))
    pat = ("flash", "fmha", "efficient_attention", "cudnn", "attention", "sdpa", "attn")
    kernels = sorted(n for n in (gpu_names or names - set(aten))
                     if any(p in n.lower() for p in pat))

    def classify(text: str):
        for key, label in (("cudnn", "cudnn"), ("flash", "flash"), ("efficient", "efficient"),
                           ("fmha", "efficient")):
            if key in text:
                return label
        return None

    if dev != "cuda":
        fused = [a for a in aten if "_scaled_dot_product_" in a and "math" not in a]
        backend = "cpu (" + (fused[0].replace("aten::_scaled_dot_product_", "") if fused
                             else "math") + ")"
    else:  # the aten op names which kernel family ran; kernel names are the evidence
        backend = (classify(" ".join(aten).lower()) or classify(" ".join(kernels).lower())
                   or "math")
    return {"backend": backend, "aten_ops": aten, "kernels": [k[:200] for k in kernels[:12]],
            "fused_kernel": backend in ("flash", "efficient", "cudnn")}


def section_sdpa(args, part: Part) -> None:
    import torch

    from ponder_pt.config.schema import PonderConfig
    from ponder_pt.models import PonderLM

    dev = device_name(args.smoke)
    init_process_group(dev)
    shape, seq, batch = ("toy", 64, 2) if args.smoke else ("pythia-160m", 2048, 1)
    cfg = shape_config(shape, seq)
    dtype = torch.bfloat16
    model = PonderLM(cfg, PonderConfig(steps=1), params_dtype=dtype).to(dev)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(dev)
    part.update(shape=shape, seq=seq, batch=batch, dtype="bf16", device=dev,
                sdp_flags=_sdp_flags())

    def strict(res):
        if dev == "cuda" and not res["fused_kernel"]:
            res["status"] = "fail"
            res["note"] = "no flash / efficient / cudnn kernel ran: math fallback"
        return res

    def train_step():
        model.train()
        loss = model(ids, labels=torch.roll(ids, -1, 1), ponder_steps=1)
        loss.backward()
        model.zero_grad(set_to_none=True)

    record(part, f"train fwd+bwd, is_causal ({shape}, K=1, head_dim {cfg.head_dim})",
           lambda: strict(_profile(train_step, dev)), case="train", head_dim=cfg.head_dim)

    def prefill():
        model.eval()
        with torch.no_grad():
            model(ids[:1], caches=model.new_caches(1), ponder_steps=1)

    # informational: a boolean mask excludes flash; efficient/cudnn/math may run
    record(part, f"KV-cache prefill, boolean mask ({shape}, K=1)",
           lambda: _profile(prefill, dev), case="prefill_mask")

    def decode():
        model.eval()
        with torch.no_grad():
            caches = model.new_caches(1)
            model(ids[:1, :-1], caches=caches, ponder_steps=1)
            model(ids[:1, -1:], caches=caches, ponder_steps=1)

    record(part, "KV-cache decode, one token after the prefill", lambda: _profile(decode, dev),
           case="decode")
    del model
    cleanup(dev)

    hd, heads = (64, 2) if args.smoke else (256, 8)  # pythia-1b: 8 heads of 256

    def bare():
        import torch.nn.functional as F

        q, k, v = (torch.randn(batch, heads, seq, hd, device=dev, dtype=dtype,
                               requires_grad=True) for _ in range(3))

        def run():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        return strict(_profile(run, dev))

    record(part, f"bare SDPA fwd+bwd, is_causal, head_dim {hd} (pythia-1b)", bare,
           case="bare_hd256", head_dim=hd)

    lengths = 4 if args.smoke else 24
    record(part, f"growing keys: one-token SDPA at {lengths} new key lengths, default kernels "
                 f"vs varying_shapes", lambda: _growing(dev, cfg, lengths),
           case="growing_keys", lengths=lengths)


def _growing(dev: str, cfg, lengths: int) -> dict:
    """ms per call of one-token attention whose key length grows by one each call (what eager
    decoding does), under SDPA's default choice and under `varying_shapes`; a plan built per
    new shape shows as the difference."""
    import contextlib
    import time

    import torch
    import torch.nn.functional as F

    from ponder_pt.sdpa_backends import varying_shapes

    heads, hd, start = cfg.num_heads, cfg.head_dim, 512
    q = torch.randn(1, heads, 1, hd, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(1, heads, start + 2 * lengths, hd, device=dev, dtype=torch.bfloat16)
            for _ in range(2))

    def run(first: int, ctx) -> float:
        with ctx:
            F.scaled_dot_product_attention(q, k[:, :, :first - 1], v[:, :, :first - 1])
            sync(dev)
            t = time.perf_counter()
            for n in range(first, first + lengths):
                F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n])
            sync(dev)
        return 1e3 * (time.perf_counter() - t) / lengths

    # disjoint lengths, so neither run finds plans the other built
    default_ms = run(start, contextlib.nullcontext())
    varying_ms = run(start + lengths, varying_shapes(dev))

    def one():
        F.scaled_dot_product_attention(q, k[:, :, :start], v[:, :, :start])

    backend_default = _profile(one, dev)["backend"]
    with varying_shapes(dev):
        backend_varying = _profile(one, dev)["backend"]
    return {"ms_per_call_default": default_ms, "ms_per_call_varying_shapes": varying_ms,
            "default_over_varying": default_ms / varying_ms if varying_ms else None,
            "backend_default": backend_default, "backend_varying_shapes": backend_varying,
            "start_length": start}


def _sdp_flags() -> dict:
    import torch

    b = torch.backends.cuda
    out = {}
    for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "cudnn_sdp_enabled",
                 "math_sdp_enabled", "is_flash_attention_available"):
        fn = getattr(b, name, None)
        try:
            out[name] = bool(fn()) if fn else None
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


def markdown(res: dict) -> list:
    sd = res.get("sections", {}).get("sdpa", {}).get("entries", [])
    if not sd:
        return []
    out = ["", "## SDPA kernels (torch.profiler)", ""]
    kernels = [e for e in sd if e.get("case") != "growing_keys"]
    out.append(md_table(["case", "status", "backend", "aten ops", "kernels (first 3)"],
                        [[e["name"], e["status"], e.get("backend"),
                          ", ".join(e.get("aten_ops", [])),
                          "; ".join(k[:60] for k in e.get("kernels", [])[:3])]
                         for e in kernels]))
    grow = [e for e in sd if e.get("case") == "growing_keys"]
    if grow:
        out += ["", "One-token attention, key length growing by one per call (eager decoding):",
                "", md_table(["status", "lengths", "ms/call default", "backend",
                              "ms/call varying_shapes", "backend", "default / varying"],
                             [[e["status"], e.get("lengths"), e.get("ms_per_call_default"),
                               e.get("backend_default"), e.get("ms_per_call_varying_shapes"),
                               e.get("backend_varying_shapes"), e.get("default_over_varying")]
                              for e in grow])]
    return out
