"""`train --dry-run`'s per-GPU memory and time estimates (ponder_pt/engine/estimate.py).

The memory estimate is checked against a real model on the CPU: activations as autograd's
saved tensors at the end of forward (as benchmarks/bench_ponder.py measures `saved MiB`:
saved_tensors_hooks over unique storages, parameters excluded), parameters and gradients from
the model, optimizer state from a real torch AdamW after one step.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _model_helpers import single_process  # noqa: E402,F401  (pytest fixture)

from ponder_pt.config import load_config  # noqa: E402
from ponder_pt.config.schema import Config, ModelConfig, PonderConfig  # noqa: E402
from ponder_pt.engine import estimate as E  # noqa: E402
from ponder_pt.engine.flops import param_count  # noqa: E402


def tiny_config(arch: str, K: int, ckpt: str, chunk: int = 0) -> Config:
    cfg = Config()
    llama = dict(rotary_pct=1.0, parallel_residual=False) if arch == "llama" else {}
    cfg.model = ModelConfig(arch=arch, num_layers=2, hidden_size=128, num_heads=4,
                            vocab_size=1024, max_seq_len=64, activation_checkpointing=ckpt,
                            vocab_chunk=chunk, **llama)
    cfg.ponder = PonderConfig(steps=K)
    cfg.data.seq_len = 64
    cfg.train.micro_batch = cfg.train.global_batch = 4
    cfg.train.precision = "fp32"
    cfg.parallel.zero_stage = 0
    return cfg


def measure(cfg: Config) -> dict:
    """Bytes of parameters, gradients, AdamW state (after one step) and saved activations."""
    from ponder_pt.models import PonderLM

    torch.manual_seed(0)
    model = PonderLM(cfg.model, cfg.ponder).train()
    b, s = cfg.train.micro_batch, cfg.data.seq_len
    ids = torch.randint(0, cfg.model.vocab_size, (b, s))
    with E.saved_for_backward(model) as saved:
        loss = model(ids, labels=torch.roll(ids, -1, dims=1))
    loss.backward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return {
        "parameters": nbytes(model.parameters()),
        "gradients": nbytes(p.grad for p in model.parameters()),
        "optimizer state": nbytes(t for st in opt.state.values() for t in st.values()
                                  if torch.is_tensor(t) and t.dim() > 0),
        "activations": sum(saved.values()),
    }


@pytest.mark.parametrize("arch,K,ckpt", [("gpt_neox", 2, "none"), ("gpt_neox", 2, "full"),
                                         ("llama", 0, "selective")])
def test_memory_estimate_matches_cpu_measurement(single_process, arch, K, ckpt):
    cfg = tiny_config(arch, K, ckpt)
    measured = measure(cfg)
    est = {name: nbytes for name, nbytes, _ in E.memory_estimate(cfg, 1)["rows"]}
    for name, value in measured.items():
        assert est[name] == pytest.approx(value, rel=0.25), (name, est[name], value)
    weights_and_acts = sum(est[k] for k in measured)
    assert weights_and_acts == pytest.approx(sum(measured.values()), rel=0.25)


def step_peak_bytes(step, trace_path) -> int:
    """Peak of the CPU bytes allocated during `step()`: the largest "Total Allocated" of the
    profiler trace's memory events, which counts from the start of profiling (parameters and
    optimizer state are not included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    prof.export_chrome_trace(str(trace_path))
    with open(trace_path) as fh:
        events = json.load(fh)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})]
    # the locked torch writes them; without them this check would measure nothing
    assert totals, "the profiler trace has no CPU memory totals ([memory] events)"
    return max(totals)


@pytest.mark.parametrize("K,ckpt,chunk", [(0, "none", 0), (2, "none", 0), (2, "full", 0),
                                          (2, "selective", 0), (2, "none", 1024),
                                          (2, "full", 1024), (0, "full", 1024)])
def test_backward_peak_on_cpu(single_process, tmp_path, K, ckpt, chunk):
    """One bf16 training step, as the GPU suite's throughput runs it: the allocation peak lies
    between the saved activations + backward transient and that plus all the gradients (which
    backward allocates as it goes)."""
    from ponder_pt.models import PonderLM

    cfg = tiny_config("gpt_neox", K, ckpt, chunk)
    cfg.model.vocab_size = 4096
    cfg.train.precision = "bf16"
    torch.manual_seed(0)
    model = PonderLM(cfg.model, cfg.ponder, params_dtype=torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    b, s = cfg.train.micro_batch, cfg.data.seq_len
    ids = torch.randint(0, cfg.model.vocab_size, (b, s))

    def step():
        model(ids, labels=torch.roll(ids, -1, dims=1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW state exists before the measured step
    peak = step_peak_bytes(step, tmp_path / "trace.json")
    est = {name: nbytes for name, nbytes, _ in E.memory_estimate(cfg, 1)["rows"]}
    low = est["activations"] + est["backward transient"]
    assert 0.95 * low <= peak <= 1.05 * (low + est["gradients"]), (peak, low, est["gradients"])


def test_vocab_chunk_and_checkpointing_shrink_activations():
    acts = {}
    for ckpt in ("none", "selective", "full"):
        for chunk in (0, 256):
            rows = E.memory_estimate(tiny_config("gpt_neox", 3, ckpt, chunk), 1)["rows"]
            acts[ckpt, chunk] = dict((r[0], r[1]) for r in rows)["activations"]
    assert acts["full", 0] < acts["selective", 0] < acts["none", 0]
    assert acts["full", 256] < acts["full", 0] / 2  # logits dominate under full checkpointing


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_params_per_rank_add_up(arch):
    m = tiny_config(arch, 0, "none").model
    total = m.num_layers * E.block_params(m) + E.shared_params(m, m.vocab_size)
    assert total == param_count(m, m.vocab_size)["total"]
    # TP shards the matrices, not the replicated norms / row-parallel biases
    assert m.num_layers * E.block_params(m, 2) + E.shared_params(m, m.vocab_size, 2) > total / 2


def test_zero_stages_and_offload_partition_states():
    cfg = load_config("ponderpythia-1b", ["model.vocab_size=50304"], validate=False)

    def states(zero, offload=False):
        cfg.parallel.zero_stage, cfg.parallel.cpu_offload = zero, offload
        return [r[1] for r in E.memory_estimate(cfg, 8)["rows"][:3]]

    n = param_count(cfg.model, 50304)["total"]
    assert states(0) == [2 * n, 2 * n, 12 * n]
    assert states(1) == [2 * n, 2 * n, 12 * n / 8]
    assert states(2) == [2 * n, 2 * n / 8, 12 * n / 8]
    assert states(3) == [2 * n / 8, 2 * n / 8, 12 * n / 8]
    assert states(1, offload=True)[2] == 0


def test_pipeline_stages_hold_tied_copies():
    stages = E.pipeline_stages(num_layers=4, steps=3, pp=2)
    blocks = [[i for kind, i in st if kind == "block"] for st in stages]
    assert [len(b) for b in blocks] == [8, 8]  # 16 blocks of the unrolled chain, balanced
    assert all(set(b) == set(range(4)) for b in blocks)  # each stage runs every block
    assert sum(len(st) for st in stages) == 1 + 4 * 5
    cfg = load_config("ponderpythia-1b", ["model.vocab_size=50304", "parallel.pp=2",
                                          "parallel.zero_stage=1"], validate=False)
    mem = E.memory_estimate(cfg, 8)
    assert mem["rows"][0][1] == 2 * param_count(cfg.model, 50304)["total"]  # all of it


def test_mfu_from_closest_measurement(tmp_path):
    entry = dict(status="ok", impl="ours", chunked=False, seq=2048, micro_batch=8)
    data = {"env": {"gpu": "NVIDIA H100 80GB HBM3"}, "throughput": [
        dict(entry, name="a", shape="pythia-160m", K=3, ckpt="full", mfu=0.2),
        dict(entry, name="b", shape="pythia-1b", K=0, ckpt="full", mfu=0.3),
        dict(entry, name="c", shape="pythia-1b", K=3, ckpt="none", mfu=0.4),
        dict(entry, name="d", shape="pythia-1b", K=3, ckpt="full", mfu=0.35),
        dict(entry, name="e", shape="pythia-1b", K=3, ckpt="full", mfu=0.5, impl="hf")]}
    path = tmp_path / "gpu_results.json"
    path.write_text(json.dumps(data))
    cfg = load_config("ponderpythia-1b", ["model.vocab_size=50304",
                                          "model.activation_checkpointing=full"],
                      validate=False)
    t = E.time_estimate(cfg, 8, mfu_from=str(path))
    assert t["mfu"] == 0.35 and "d (" in t["mfu_source"]
    tokens = cfg.train.iters * cfg.train.global_batch * cfg.data.seq_len
    assert t["seconds"] == pytest.approx(t["flops"] / (8 * t["peak_tflops"] * 1e12 * 0.35))
    assert t["tokens"] == tokens
    path.write_text(json.dumps({"throughput": []}))
    t = E.time_estimate(cfg, 8, mfu_from=str(path))
    assert t["mfu"] == E.DEFAULT_MFU and "assumed" in t["mfu_source"]


def test_mfu_prefers_entries_with_the_same_compile_setting(tmp_path):
    entry = dict(status="ok", impl="ours", chunked=False, seq=2048, micro_batch=8,
                 shape="pythia-1b", K=3, ckpt="none")
    data = {"env": {"gpu": "NVIDIA H100 80GB HBM3"}, "throughput": [
        dict(entry, name="eager", mfu=0.4), dict(entry, name="compiled", mfu=0.5, compiled=True)]}
    path = tmp_path / "gpu_results.json"
    path.write_text(json.dumps(data))
    for compile_, want in ((False, 0.4), (True, 0.5)):
        cfg = load_config("ponderpythia-1b", ["model.vocab_size=50304", "ponder.steps=3",
                                              "model.activation_checkpointing=none",
                                              f"train.compile={str(compile_).lower()}"],
                          validate=False)
        assert E.time_estimate(cfg, 8, mfu_from=str(path))["mfu"] == want


def test_dry_run_prints_estimates(capsys, tmp_path):
    from ponder_pt.cli import main

    assert main(["train", "--config", "ponderpythia-1b", "--dry-run", "--nproc", "8"]) == 0
    out = capsys.readouterr().out
    assert "# memory per GPU" in out and "optimizer state" in out and "allocator" in out
    assert "# time to train" in out and "MFU" in out
    assert main(["train", "--config", "ponderpythia-1b", "--dry-run",
                 "--mfu-from", str(tmp_path / "missing.json")]) == 2


def test_mfu_from_the_newest_of_equally_close_measurements(tmp_path):
    """Two runs measured the same setting: the newer run (the code that will train) wins,
    whatever the files' names."""
    entry = dict(status="ok", impl="ours", chunked=False, seq=2048, micro_batch=8,
                 shape="pythia-1b", K=3, ckpt="none", name="k3")
    files = []
    for name, started, mfu in (("a_new", "2026-11-26T15:38:05+0000", 0.413),
                               ("b_old", "2026-11-26T06:32:31+0000", 0.400)):
        path = tmp_path / name / "gpu_results.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"started": started, "env": {"gpu": "NVIDIA H100"},
                                    "throughput": [dict(entry, mfu=mfu)]}))
        files.append(str(path))
    cfg = load_config("ponderpythia-1b", ["model.vocab_size=50304", "ponder.steps=3",
                                          "model.activation_checkpointing=none"],
                      validate=False)
    for order in (files, files[::-1]):
        assert E.pick_mfu(cfg, order, "H100")["mfu"] == 0.413


def _comm_cfg(tp=1, pp=1, zero=1, K=0, precision="fp32", micro=1, global_batch=8):
    cfg = load_config("ponderpythia-70m", [f"parallel.tp={tp}", f"parallel.pp={pp}",
                                           f"parallel.zero_stage={zero}", f"ponder.steps={K}",
                                           f"train.precision={precision}",
                                           f"train.micro_batch={micro}",
                                           f"train.global_batch={global_batch}",
                                           "data.seq_len=128", "model.vocab_size=50304"])
    return cfg


def test_comm_model_counts_the_ring_edges_between_nodes():
    """DP = 4 on 2 nodes x 2 ranks: the ring 0-1-2-3 crosses between 1 and 2 and between 3 and
    0. ZeRO-0 all-reduces the fp32 gradients (2(N-1)/N of them over each edge); ZeRO-1 then
    all-gathers the updated parameters ((N-1)/N more); inside a node nothing counts."""
    from ponder_pt.engine import comm_model as C

    grads = param_count(_comm_cfg().model, 50304)["total"] * 4
    zero0 = C.estimate(_comm_cfg(zero=0), 4, 2)
    assert zero0.nodes == 2 and set(zero0.node_bytes) == {0, 1}
    assert zero0.node_bytes[0] == pytest.approx(1.5 * grads)
    assert zero0.latency_steps == 6  # 2(N-1) sequential steps of one all-reduce
    # 1 Gbit/s: bytes x 8 / 1e9, plus the latency of the ring's steps
    assert zero0.seconds(1.0, 100.0) == pytest.approx(1.5 * grads * 8 / 1e9 + 6 * 100e-6)
    zero1 = C.estimate(_comm_cfg(), 4, 2)
    assert zero1.node_bytes[0] == pytest.approx(2.25 * grads) and zero1.latency_steps == 9
    assert C.estimate(_comm_cfg(), 4, 4).node_bytes == {}  # one node
    # ZeRO-2 reduces every micro-batch (ga = 2 here), then all-gathers once
    assert C.estimate(_comm_cfg(zero=2), 4, 2).node_bytes[0] == pytest.approx(
        (2 * 1.5 + 0.75) * grads)
    # bf16 halves the bytes
    assert C.estimate(_comm_cfg(precision="bf16"), 4, 2).node_bytes[0] == pytest.approx(
        1.125 * grads)


def test_comm_model_places_tp_inside_nodes_and_pp_across():
    from ponder_pt.engine import comm_model as C

    tp_in_node = C.estimate(_comm_cfg(tp=2), 4, 2)
    assert "TP" not in tp_in_node.by_kind and tp_in_node.by_kind["DP"] > 0
    act = 1 * 128 * 512 * 4  # one [seq, micro-batch, hidden] fp32 tensor
    # one rank per node, TP = 2, DP = 2 (ga = 4): per micro-batch and pass 4 all-reduces per
    # block (6 blocks), the embedding's forward one and the output layer's backward one; a
    # 2-rank ring all-reduce sends the whole tensor each way
    tp_across = C.estimate(_comm_cfg(tp=2), 4, 1)
    assert tp_across.by_kind["TP"] == pytest.approx(2 * 2 * 4 * (4 * 6 + 2) * act)
    # K = 3 adds 3 passes of blocks, 3 heads' backward and 3 fed-back p . W_in forward
    tp_k3 = C.estimate(_comm_cfg(tp=2, K=3), 4, 1)
    assert tp_k3.by_kind["TP"] == pytest.approx(2 * 2 * 4 * (4 * 6 * 4 + 1 + 4 + 3) * act)

    # PP = 2 with stage 0 on node 0, stage 1 on node 1, 2 DP pipelines, ga = 4
    ga = 8 // (1 * 2)
    params = param_count(_comm_cfg().model, 50304)["total"] * 4
    pp0 = C.estimate(_comm_cfg(pp=2), 4, 2)
    # K = 0: blocks 0-2 | 3-5; the embedding (stage 0) and the head (stage 1) are one tied
    # layer whose gradients both stages all-reduce: W_in, W_out and the final norm
    shared = (2 * 50304 * 512 + 2 * 512) * 4
    assert pp0.by_kind["PP"] == pytest.approx(2 * (2 * ga * 2 * act + 2 * shared))
    # K = 3: the unrolled chain puts passes 1-2 on stage 0 and 3-4 on stage 1, so every
    # block and the shared layer are on both stages: all the gradients are all-reduced once,
    # and the activations still cross the one boundary once per micro-batch
    pp = C.estimate(_comm_cfg(pp=2, K=3), 4, 2)
    assert pp.by_kind["PP"] == pytest.approx(2 * (2 * ga * 2 * act + 2 * params))
    assert "DP" not in pp.by_kind  # both DP groups stay inside a node


def test_interconnect_argument():
    from ponder_pt.engine import comm_model as C

    assert C.parse_interconnect("eth-25")[:2] == (25.0, 50.0)
    assert C.parse_interconnect("100@20")[:2] == (100.0, 20.0)
    assert C.parse_interconnect(None)[2] == C.DEFAULT_FABRIC
    with pytest.raises(ValueError, match="a fabric"):
        C.parse_interconnect("fast")


def test_dry_run_prints_the_interconnect_term(capsys, monkeypatch):
    """One node: nothing between nodes. 4 nodes of 8: the efficiency falls with the fabric."""
    from ponder_pt.cli import main

    assert main(["train", "--config", "ponderpythia-1b", "--dry-run", "--nproc", "8"]) == 0
    assert "one node: no traffic between nodes" in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "32")
    for fabric, lo, hi in (("ib-8x400", 90, 100), ("eth-10", 1, 60)):
        assert main(["train", "--config", "ponderpythia-1b", "--dry-run",
                     "--interconnect", fabric, "--ranks-per-node", "8"]) == 0
        out = capsys.readouterr().out
        eff = int(out.split("scaling efficiency at 4 nodes: at least ")[1].split(" %")[0])
        assert lo <= eff <= hi, (fabric, eff)
        assert f"on {fabric} (8 ranks per node)" in out
        assert "time to train with communication: at most" in out
        assert "an upper bound where the link reaches its rate" in out
    # pipeline stages across nodes also stall on each other: no bound, an estimate
    assert main(["train", "--config", "ponderpythia-1b", "--dry-run", "--interconnect", "eth-10",
                 "--ranks-per-node", "8", "--set", "parallel.pp=2"]) == 0
    out = capsys.readouterr().out
    assert "per node: about " in out and "their stalls waiting for each other" in out
    assert "scaling efficiency at 4 nodes: about " in out
    assert "time to train with communication: about" in out
