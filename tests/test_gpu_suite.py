"""benchmarks/gpu_suite.py --smoke: every section of the GPU suite runs its real code path at
toy shapes on CPU (so the one-shot GPU run does not die of a typo), and writes a complete,
finite gpu_results.json / .md."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from _json_helpers import _numbers  # noqa: E402
from benchmarks.gpu.profiling import CATEGORIES, categorize  # noqa: E402


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


@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.pop("WORLD_SIZE", None)
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
    assert set(sdpa) == {"train", "prefill_mask", "decode", "bare_hd256"}
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
    for case in ("recompute", "hf_generate"):  # ok, or skipped if the busy CPU ran late
        assert speed[case]["status"] in ("ok", "skipped"), (case, speed[case])
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
