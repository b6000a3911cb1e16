"""benchmarks/gpu_suite.py --smoke: every section of the GPU suite runs its real code path at
toy shapes on CPU (so the one-shot GPU run does not die of a typo), and writes a complete,
finite gpu_results.json / .md."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace as NS

import pytest
import zygote

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from _json_helpers import _numbers  # noqa: E402
from benchmarks.gpu.profiling import (CATEGORIES, device_rows, categorize, markdown,  # noqa: E402
                                      rederive, rederived_markdown, summarize, top_ops)


def test_profile_categories_from_kernel_names_and_callers():
    """GPU kernel names (H100, torch 2.11) land in the category the profile table reports."""
    cases = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1": "gemm",
        "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT": "gemm",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>": "gemm",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64": "attention",
        "void cudnn::fusion::compute_dot_do_o_specialized<true, 256>(void const*)": "attention",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<256, 64>>": "attention",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)":
            "attention",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>":
            "norm",
        "void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernel<c10::BFloat16>":
            "norm",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>": "softmax_ce",
        "void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float>":
            "softmax_ce",
        "void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor<float>>":
            "optimizer",
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)":
            "communication",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>":
            "elementwise",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>":
            "elementwise",
        "Memcpy DtoD (Device -> Device)": "elementwise",
        "void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16>": "other",
        "aten::addmm": "gemm",
        "aten::_fused_adamw_": "optimizer",
        "aten::native_layer_norm_backward": "norm",
        "aten::gelu": "elementwise",
    }
    for name, want in cases.items():
        assert categorize(name) == want, (name, categorize(name))
        assert want in CATEGORIES
    # a generic kernel takes the category of the op that launched it (or of its callers)
    exp = "void at::native::vectorized_elementwise_kernel<4, at::native::exp_kernel_cuda>"
    assert categorize(exp) == "elementwise"
    assert categorize(exp, ["aten::exp", "_VocabParallelCrossEntropy"]) == "softmax_ce"
    assert categorize(exp, ["aten::mul_", "Optimizer.step#AdamW.step"]) == "optimizer"
    gemm = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n"
    assert categorize(gemm, ["aten::mm", "_VocabParallelCrossEntropy"]) == "gemm"


ADAM = "void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor<float>>"
COPY = "void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda::{lambda()#3}>"
GEMM = "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NTT"
ANNOT = "Optimizer.step#AdamW.step"


def _gpu_events(annotation_flag=True):
    """A fake torch.profiler event list (the FunctionEvent fields device_rows reads), with the
    double listings torch produces: the profiler's own "Activity Buffer Request" record nested
    in fused AdamW carries the op's correlation id, so torch gives it the op's kernels too; and
    the record_function around the optimizer step is mirrored on the GPU as an annotation that
    spans its kernels (and is listed as a kernel of the CPU range)."""
    from torch.autograd import DeviceType

    def cpu(name, id, start, end, kernels=(), parent=None):
        return NS(device_type=DeviceType.CPU, name=name, id=id, cpu_parent=parent,
                  time_range=NS(start=start, end=end),
                  kernels=[NS(name=n, duration=d) for n, d in kernels])

    def gpu(name, start, end, **kw):
        return NS(device_type=DeviceType.CUDA, name=name, id=0, cpu_parent=None, kernels=[],
                  time_range=NS(start=start, end=end), **kw)

    step = cpu(ANNOT, 1, 100, 200, [(ANNOT, 60)])
    adam = [(ADAM, 20), (ADAM, 20)]
    fused = cpu("aten::_fused_adamw_", 2, 110, 190, adam, step)
    cpus = [step, fused,
            cpu("Activity Buffer Request", 2, 150, 151, adam, fused),
            cpu("aten::copy_", 4, 191, 195, [(COPY, 5)], step),
            cpu("aten::mm", 3, 10, 20, [(GEMM, 30)]),
            cpu("aten::copy_", 5, 30, 40, [(COPY, 15)]),
            cpu("triton_poi_fused_add_0", 6, 50, 55)]  # inductor's CPU range for its kernel
    flag = {"is_user_annotation": False} if annotation_flag else {}
    gpus = [gpu(ANNOT, 300, 360, **({"is_user_annotation": True} if annotation_flag else {})),
            gpu(ADAM, 300, 320, **flag), gpu(ADAM, 320, 340, **flag),
            gpu(COPY, 340, 345, **flag), gpu(GEMM, 200, 230, **flag),
            gpu(COPY, 250, 265, **flag), gpu("Memset (Device)", 400, 402, **flag),
            gpu("triton_poi_fused_add_0", 500, 503, **flag)]
    return cpus + gpus


@pytest.mark.parametrize("annotation_flag", [True, False])
def test_profile_device_time_counts_each_kernel_once(annotation_flag):
    """Kernel time and calls come from the device-side events, each once; the CPU ops that
    launched a kernel only split it over categories; a GPU user annotation is no kernel."""
    events = _gpu_events(annotation_flag)
    rows = device_rows(events, on_gpu=True)
    by = {(n, c): (calls, us) for n, c, calls, us in rows}
    assert ANNOT not in {n for n, _ in by}
    work = [e for e in events if e.device_type.name == "CUDA" and e.name != ANNOT]
    assert sum(us for *_, us in rows) == pytest.approx(
        sum(e.time_range.end - e.time_range.start for e in work))
    assert sum(calls for _, _, calls, _ in rows) == pytest.approx(len(work))
    assert by[(ADAM, "optimizer")] == (2, 40)  # not also under the overhead record
    assert by[(GEMM, "gemm")] == (1, 30)
    # one copy kernel name, launched under the optimizer step and elsewhere: its calls and time
    # split as each category's launches claim them
    assert by[(COPY, "optimizer")] == (1, 5)
    assert by[(COPY, "elementwise")] == (1, 15)
    assert by[("Memset (Device)", "elementwise")] == (1, 2)  # no CPU op claimed it: by name
    assert by[("triton_poi_fused_add_0", "elementwise")] == (1, 3)  # named like a CPU range,
    # but it spans no other kernel: work, not an annotation

    # per launching aten op (and input shapes: none recorded here), each launch once
    ops = {o["op"]: o for o in top_ops(events, on_gpu=True, steps=1)}
    assert set(ops) == {"aten::_fused_adamw_", "aten::copy_", "aten::mm"}
    assert [(ops[k]["calls_per_step"], ops[k]["ms_per_step"]) for k in sorted(ops)] == [
        (1, pytest.approx(0.04)), (2, pytest.approx(0.02)), (1, pytest.approx(0.03))]

    res = summarize(rows, steps=1, step_ms=0.2, profiled_ms=0.25)
    assert res["device_ms"] == pytest.approx(0.095)
    assert sum(res["categories_ms"].values()) == pytest.approx(res["device_ms"])
    assert res["categories_ms"]["optimizer"] == pytest.approx(0.045)
    assert res["device_over_step"] == pytest.approx(0.38) and not res["accounting_suspect"]


def test_profile_markdown_flags_device_time_over_the_wall_step():
    """An entry whose device time exceeds the profiled wall step is flagged, also in results
    written before the field existed."""
    rows = [(GEMM, "gemm", 64, 300e3), (ADAM, "optimizer", 98, 13e3)]
    bad = summarize(rows, steps=2, step_ms=120.0, profiled_ms=122.0)  # 156.5 ms of kernels
    good = summarize(rows, steps=2, step_ms=180.0, profiled_ms=170.0)
    assert bad["device_over_step"] == pytest.approx(156.5 / 122) and bad["accounting_suspect"]
    assert good["device_over_step"] == pytest.approx(156.5 / 170)
    assert not good["accounting_suspect"]
    old = {k: v for k, v in bad.items() if k not in ("device_over_step", "accounting_suspect")}
    entries = [dict(e, status="ok", impl=impl, K=0) for e, impl in ((good, "hf"), (old, "ours"))]
    md = "\n".join(markdown({"sections": {"profile": {"entries": entries}}}))
    assert md.count("accounting suspect") == 2  # under the side-by-side table and the entry
    assert "**ours K=0: accounting suspect**" in md and "HF GPTNeoX K=0: accounting" not in md
    assert "device / profiled step" in md


def _saved(cats, step, profiled, kernels):
    """A profile entry as the first GPU runs wrote it (categories and top kernels per step)."""
    return {"status": "ok", "impl": "ours", "K": 3, "micro_batch": 2, "step_ms": step,
            "step_ms_profiled": profiled, "categories_ms": dict.fromkeys(CATEGORIES, 0.0) | cats,
            "top_kernels": [{"name": n, "category": c, "calls_per_step": k, "ms_per_step": ms}
                            for n, c, k, ms in kernels]}


def test_profile_rederived_from_saved_entries():
    """Saved entries re-derived by code: the optimizer step's GPU annotation, which the old
    accounting summed as a kernel, comes out of its category and the device time exactly; an
    entry still above its profiled step gets the annotation's span as its optimizer time, or
    none when the rest was inflated too; kernel names with '#' are kernels."""
    lam = "void at::native::elementwise_kernel<128, 4, copy_kernel_cuda::{lambda()#3}>"
    # ours K=3 of the gen,profile run: 6.43 ms annotation + 6.35 ms of 49 AdamW kernels
    k3 = _saved({"gemm": 125.0, "elementwise": 5.0, "optimizer": 12.78}, 150.0, 155.0,
                [(GEMM, "gemm", 263, 125.0), (ANNOT, "optimizer", 1, 6.43),
                 (ADAM, "optimizer", 49, 6.35), (lam, "elementwise", 10, 5.0)])
    d = rederive(k3)
    assert d["raw"]["device_ms"] == pytest.approx(142.78)
    assert d["corrected"]["categories_ms"]["optimizer"] == pytest.approx(6.35)
    assert d["corrected"]["categories_ms"]["elementwise"] == 5.0  # '#' in a kernel name
    assert d["corrected"]["device_ms"] == pytest.approx(136.35)
    assert d["corrected"]["gap_ms"] == pytest.approx(150.0 - 136.35)
    assert d["corrected"]["removed"] == [ANNOT]
    assert d["reconstructed"] is None and d["reconstruction"] == "not needed"
    # K=0: AdamW's kernels listed 18 times over; the annotation spans the real ones
    k0 = _saved({"gemm": 115.0, "optimizer": 127.16}, 122.0, 124.0,
                [(ADAM, "optimizer", 882, 120.38), (GEMM, "gemm", 65, 115.0),
                 (ANNOT, "optimizer", 1, 6.78)])
    d = rederive(k0)
    assert d["corrected"]["device_ms"] == pytest.approx(115.0 + 120.38)
    assert d["reconstruction"] == "rebuilt"
    assert d["reconstructed"]["categories_ms"]["optimizer"] == 6.78
    assert d["reconstructed"]["device_ms"] == pytest.approx(121.78)
    # the gemm kernels inflated as well: the optimizer's span cannot bring it under the step
    bad = _saved({"gemm": 150.0, "optimizer": 127.16}, 122.0, 124.0,
                 [(ADAM, "optimizer", 882, 120.38), (ANNOT, "optimizer", 1, 6.78)])
    d = rederive(bad)
    assert d["reconstructed"] is None and d["reconstruction"] == "not recoverable"
    md = "\n".join(rederived_markdown(
        {"sections": {"profile": {"entries": [k0, k3, bad], "timed": "t"}}}, "x.json"))
    for kind in ("raw", "corrected", "reconstructed"):
        assert f"| ms per step, {kind} |" in md
    assert "| reconstruction | rebuilt | not needed | not recoverable |" in md
    assert "| **device total** | 242 | 143 | 277 |" in md  # raw, as written


def _smoke_env() -> dict:
    """The smoke's environment: its section and trainer children forked from the test zygote
    ($PONDER_JOB_PYTHON, tests/zygote_client.py) instead of new interpreters."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.pop("WORLD_SIZE", None)
    # what the suite's parent sets for its children, here already: libraries read some of it
    # when imported, so the server that forks them must import with the same
    env.update(CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
               PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))
    if zygote.ENABLED:
        env["PONDER_ZYGOTE_SOCKET"] = zygote.server_socket(env)
        env["PONDER_JOB_PYTHON"] = os.path.join(REPO, "tests", "zygote_client.py")
    return env


@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
    out = tmp_path / "gpu"
    env = _smoke_env()
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "gpu_suite.py"), "--smoke",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((out / "gpu_results.json").read_text())
    md = (out / "gpu_results.md").read_text()
    log = proc.stdout[-6000:]

    assert res["smoke"] is True and res["finished"]
    env_ = res["env"]
    for key in ("torch", "transformers", "deepspeed", "megatron_core", "python", "device",
                "peak_tflops", "vocab_chunk_available"):
        assert key in env_, key
    assert env_["device"] == "cpu"

    secs = res["sections"]
    assert set(secs) >= {"sdpa", "train", "generate", "gen", "profile", "throughput-toy"}, \
        list(secs)
    assert "trainer" not in secs  # opt-in: only with --sections trainer
    for name, part in secs.items():
        assert part["status"] == "done", (name, part["status"], log)
        assert part["entries"], name
        for e in part["entries"]:
            assert e["status"] != "error", (name, e.get("name"), e.get("error"),
                                            e.get("traceback"))
            # a failed check is only tolerated for generation equality (test_export owns it)
            assert e["status"] != "fail" or name == "generate", (name, e)
    for where, value in _numbers(res):
        assert math.isfinite(value), where

    sdpa = {e["case"]: e for e in secs["sdpa"]["entries"]}
    assert set(sdpa) == {"train", "prefill_mask", "decode", "bare_hd256", "growing_keys"}
    grow = sdpa.pop("growing_keys")
    assert grow["status"] == "ok" and grow["lengths"] == 4
    assert grow["ms_per_call_default"] > 0 and grow["ms_per_call_varying_shapes"] > 0
    assert grow["backend_default"] == grow["backend_varying_shapes"]  # CPUs: left alone
    assert all(e["backend"].startswith("cpu (") for e in sdpa.values())

    train = secs["train"]["entries"][-1]
    assert train["status"] == "ok" and train["loss_falling"] and train["loss_finite"]
    assert train["steps"] == 6 and train["tokens_per_s"] > 0
    assert os.path.exists(os.path.join(train["checkpoint_dir"], "latest"))

    gen = secs["generate"]["entries"]
    assert len(gen) == 4 and all(isinstance(e.get("equal"), bool) for e in gen[1:])
    assert all(e["n_tokens"] == 16 for e in gen[1:])

    speed = {e["case"]: e for e in secs["gen"]["entries"]}
    assert secs["gen"]["K"] == 3 and secs["gen"]["new_tokens"] == 32
    for case in ("build", "k3_cached", "k0_cached", "ratio"):
        assert speed[case]["status"] == "ok", (case, speed[case])
    assert speed["k3_cached"]["n_tokens"] == speed["k0_cached"]["n_tokens"] == 32
    assert speed["k3_cached"]["ms_per_token"] > 0 and speed["ratio"]["ratio"] > 0
    # ok, or skipped late
    for case in ("recompute", "hf_generate", "adaptive", "thoughts", "speculative"):
        assert speed[case]["status"] in ("ok", "skipped"), (case, speed[case])
    if speed["adaptive"]["status"] == "ok":  # adaptive decoding: passes per token measured
        assert 1.0 <= speed["adaptive"]["mean_passes"] <= 4.0
        assert speed["adaptive"]["ratio_to_fixed"] > 0
    if speed["thoughts"]["status"] == "ok":  # latent thoughts: 2 slots per token, timed
        assert speed["thoughts"]["slots"] == 2 and speed["thoughts"]["ms_per_token"] > 0
        assert speed["thoughts"]["ratio_to_plain_graph"] > 0
    if speed["speculative"]["status"] == "ok":  # the tokens of eager fixed-K decoding
        assert speed["speculative"]["same_tokens"] is True
        assert 0.0 <= speed["speculative"]["acceptance_rate"] <= 1.0
        assert speed["speculative"]["tokens_per_verify"] >= 1.0
    if speed["recompute"]["status"] == "ok":  # fp math on CPU: same greedy tokens
        assert speed["recompute"]["n_tokens"] == 16
    thr = {(e["impl"], e["K"], e["ckpt"], e["chunked"]): e for e in res["throughput"]}
    want = [("hf", 0, c, False) for c in ("none", "full")] + [
        ("ours", K, c, False) for K in range(4) for c in ("none", "full")]
    for key in want:
        e = thr[key]
        assert e["status"] == "ok", (key, e)
        assert e["tokens_per_s"] > 0 and e["tflops"] > 0 and e["micro_batch"] == 2
        assert e["mfu"] is None and e["peak_gib"] is None  # CPU: no peak, no CUDA memory
    assert thr[("hf", 0, "none", False)]["oom_tried"] == [4]  # the injected OOM halved it
    chunk = thr[("ours", 3, "none", True)]
    assert chunk["status"] == ("ok" if env_["vocab_chunk_available"] else "skipped")
    prof = {e["case"]: e for e in secs["profile"]["entries"]}
    assert secs["profile"]["shape"] == "toy"
    for case in ("hf_k0", "ours_k0", "ours_k3"):  # K=3 only if the busy CPU left time for it
        e = prof[case]
        if case == "ours_k3" and e["status"] == "skipped":
            continue
        assert e["status"] == "ok", (case, e)
        cats = e["categories_ms"]
        assert set(cats) == set(CATEGORIES)
        assert all(math.isfinite(v) and v >= 0 for v in cats.values()), (case, cats)
        assert sum(cats.values()) == pytest.approx(e["device_ms"], rel=1e-6), (case, cats)
        assert e["device_ms"] > 0 and e["step_ms"] > 0 and e["step_ms_profiled"] > 0
        assert e["gap_ms"] == pytest.approx(e["step_ms"] - e["device_ms"])
        assert cats["gemm"] > 0 and cats["attention"] > 0 and cats["optimizer"] > 0, cats
        assert 0 < len(e["top_kernels"]) <= 15
        assert all(k["ms_per_step"] > 0 and k["calls_per_step"] > 0 for k in e["top_kernels"])
        assert e["micro_batch"] == prof["hf_k0"]["micro_batch"] or case == "ours_k3"
    assert prof["ours_k0"]["categories_ms"]["softmax_ce"] > 0  # megatron's CE, by its caller
    for heading in ("## Environment", "## SDPA kernels", "## Training through the real trainer",
                    "## Generation", "## Generation speed", "## Training throughput",
                    "## Profile", "### Side by side"):
        assert heading in md


@pytest.mark.slow
def test_gpu_suite_smoke_trainer_section(tmp_path):
    """`--sections trainer`: the real trainer (DeepSpeed, its own process) and the bare model
    step at the same toy shape, micro-batch and K, both timed; the trainer's config is checked
    against the bare model's before either runs, and its estimate reported."""
    out = tmp_path / "gpu"
    env = _smoke_env()
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "gpu_suite.py"), "--smoke",
                           "--sections", "trainer", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((out / "gpu_results.json").read_text())
    assert set(res["sections"]) == {"trainer"}
    entries = {e.get("K"): e for e in res["sections"]["trainer"]["entries"]}
    assert entries[None]["status"] == "ok"  # the corpus
    for K in (0, 3):
        e = entries[K]
        assert e["status"] == "ok", (e.get("error"), e.get("note"), e.get("traceback"))
        assert e["micro_batch"] == e["bare_micro_batch"] == 2 and e["trainer_steps"] == 4
        assert e["trainer_tokens_per_s"] > 0 and e["bare_tokens_per_s"] > 0
        assert e["trainer_over_bare"] == pytest.approx(
            e["trainer_tokens_per_s"] / e["bare_tokens_per_s"])
        assert e["estimate_gib"] > 0 and e["trainer_peak_gib"] is None  # CPU: no CUDA peak
        assert f"ponder.steps={K}" in e["overrides"]
    md = (out / "gpu_results.md").read_text()
    assert "## The real trainer at a throughput shape" in md and "toy K=3" in md
