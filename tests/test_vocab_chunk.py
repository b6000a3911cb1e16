"""`model.vocab_chunk`: the vocab-chunked loss and pondering feedback equal the unchunked path
(fp32, values and gradients within 1e-5 relative) and keep no [tokens, V] tensor for backward.

TP=1 runs in this process; TP=2 (with and without sequence parallelism) runs in 2 gloo
processes spawned from this file (`python tests/test_vocab_chunk.py --out FILE`); the pipeline
path is checked layer by layer (at TP=2 too, against PonderLM) and through a PP=2 DeepSpeed
training run.
Shapes: V = 384 rows (192 per rank at TP=2) in chunks of 80, so the last chunk is partial;
targets span both ranks' shards; some targets are masked (loss_mask) or -100 (ignored).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _model_helpers import batch, tiny_model_config  # noqa: E402

from ponder_pt.config.schema import PonderConfig  # noqa: E402

V, CHUNK = 384, 80
TOL = 1e-5

# name -> (arch, model overrides, ponder overrides, sequence_parallel)
CASES = {
    "neox_plain": ("gpt_neox", {}, {}, False),
    "neox_plain_sp": ("gpt_neox", {}, {}, True),
    "neox_tied_plain_sp": ("gpt_neox", {"tie_embeddings": True}, {}, True),
    "neox_ponder2": ("gpt_neox", {}, {"steps": 2}, False),
    "neox_ponder2_sp": ("gpt_neox", {}, {"steps": 2}, True),
    "neox_tied_ponder2": ("gpt_neox", {"tie_embeddings": True}, {"steps": 2}, False),
    "llama_tied_ponder2_sp": ("llama", {"tie_embeddings": True}, {"steps": 2}, True),
    "neox_ponder1_ckpt_full_sp": ("gpt_neox", {"activation_checkpointing": "full"},
                                  {"steps": 1}, True),
    # top-k feedback stays unchunked; only the loss is chunked
    "neox_ponder2_top5_sp": ("gpt_neox", {}, {"steps": 2, "top_k": 5}, True),
    # looped baseline: only the loss changes
    "llama_looped2_sp": ("llama", {}, {"steps": 2, "feedback": "hidden"}, True),
}


def _inputs():
    ids, labels, mask = batch(seed=1, vocab=V)
    labels[1, 5] = -100  # ignored like a masked target
    return ids, labels, mask


def _run(spec, chunk):
    """Loss, full gradients, and the shapes autograd saved (parameters excluded)."""
    from ponder_pt.models import PonderLM
    from ponder_pt.models.parallel import gather_tensor, partition_spec

    arch, mover, pover, sp = spec
    cfg = tiny_model_config(arch, vocab_size=V, vocab_chunk=chunk, **mover)
    model = PonderLM(cfg, PonderConfig(**pover), sequence_parallel=sp, seed=7)
    model.train()
    params = {p.data_ptr() for p in model.parameters()}
    shapes = []

    def pack(t):
        if t.data_ptr() not in params:
            shapes.append(tuple(t.shape))
        return t

    ids, labels, mask = _inputs()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=labels, loss_mask=mask)
    loss.backward()
    grads = {n: gather_tensor(p.grad, partition_spec(p)) for n, p in model.named_parameters()}
    return {"loss": loss.item(), "grads": grads, "shapes": shapes,
            "local_vocab": model.embed.weight.shape[0], "sp": model.sequence_parallel}


def _compare(spec):
    ref, got = _run(spec, 0), _run(spec, CHUNK)
    rel = max(((got["grads"][n] - g).abs().max() / g.abs().max().clamp(min=1e-30)).item()
              for n, g in ref["grads"].items())
    vocab_saved = lambda r: sum(r["local_vocab"] in s for s in r["shapes"])  # noqa: E731
    return {"loss_ref": ref["loss"], "loss": got["loss"],
            "loss_rel": abs(got["loss"] - ref["loss"]) / abs(ref["loss"]),
            "grad_rel": rel, "min_grad_norm": min(g.norm().item() for g in got["grads"].values()),
            "vocab_saved_ref": vocab_saved(ref), "vocab_saved": vocab_saved(got),
            "local_vocab": got["local_vocab"], "sp": got["sp"]}


def _check(r, *, feedback_chunked=True):
    assert r["loss_rel"] <= TOL, r
    assert r["grad_rel"] <= TOL, r
    assert r["min_grad_norm"] > 0, r
    assert r["vocab_saved_ref"] > 0  # the unchunked path does keep [tokens, V] tensors...
    if feedback_chunked:
        assert r["vocab_saved"] == 0, r  # ...the chunked one none, in any pass


# --------------------------------------------------------------------------- TP=1


def test_tp1_matches_unchunked(single_process):  # noqa: F811
    for name, spec in CASES.items():
        r = _compare(spec)
        assert r["local_vocab"] == V and not r["sp"]
        _check(r, feedback_chunked="top5" not in name)


def test_chunk_larger_than_vocab_is_one_chunk(single_process):  # noqa: F811
    from ponder_pt.models import vocab_chunk

    assert vocab_chunk.row_chunks(V, 10 * V) == [(0, V)]
    assert vocab_chunk.row_chunks(V, CHUNK)[-1] == (320, V)
    ref, got = _run(CASES["neox_ponder2"], 0), _run(CASES["neox_ponder2"], 10 * V)
    assert abs(got["loss"] - ref["loss"]) <= TOL * abs(ref["loss"])


def test_inference_still_returns_logits(single_process):  # noqa: F811
    from ponder_pt.models import PonderLM

    cfg = tiny_model_config(vocab_size=V)
    ids, _, _ = _inputs()
    out = []
    for chunk in (0, CHUNK):
        model = PonderLM(dataclasses.replace(cfg, vocab_chunk=chunk), PonderConfig(steps=2),
                         seed=7).eval()
        with torch.no_grad():
            out.append(model(ids))
    assert out[1].shape == (2, 16, V)
    assert (out[0] - out[1]).abs().max().item() <= TOL * out[0].abs().max().item()


def _pipeline_chain(cfg, ponder):
    """The unrolled pipeline layers (embedding, blocks, feedback and head stages) run in order
    without DeepSpeed, what PP = 2 cuts into stages. Returns (loss, full gradients under
    PonderLM's parameter names)."""
    from ponder_pt.models.parallel import gather_tensor, partition_spec
    from ponder_pt.models.pipeline import (BlockLayer, SharedParams, embed_layer,
                                           feedback_layer, head_layer, pipeline_loss)

    ids, labels, mask = _inputs()
    shared = SharedParams(cfg, ponder, 7, torch.float32)
    blocks = [BlockLayer(cfg, i, 7, torch.float32) for i in range(cfg.num_layers)]
    xe = embed_layer(shared, ids)
    for k in range(ponder.steps + 1):
        for block in blocks:
            xe = block(xe)
        xe = (feedback_layer if k < ponder.steps else head_layer)(shared, xe)
    loss = pipeline_loss(xe, (labels, mask))
    loss.backward()
    named = [*shared.named_parameters()]
    for i, block in enumerate(blocks):  # block i's weights are PonderLM's layers.i
        named += [(f"layers.{i}.{n[len('block.'):]}", p) for n, p in block.named_parameters()]
    return loss.item(), {n: gather_tensor(p.grad, partition_spec(p)) for n, p in named}


def test_pipeline_chain_matches_unchunked(single_process):  # noqa: F811
    """The pipeline chain: chunked == unchunked, tied and untied."""
    for tied, ponder in ((False, PonderConfig(steps=2)), (True, PonderConfig(steps=1)),
                         (False, PonderConfig(steps=1, top_k=5))):
        res = [_pipeline_chain(tiny_model_config(vocab_size=V, vocab_chunk=chunk,
                                                 tie_embeddings=tied), ponder)
               for chunk in (0, CHUNK)]
        (l0, g0), (l1, g1) = res
        assert abs(l1 - l0) <= TOL * abs(l0)
        for n, g in g0.items():
            assert (g1[n] - g).abs().max() <= TOL * g.abs().max(), (tied, n)


def test_config_key():
    from ponder_pt.config import load_config, problems

    cfg = load_config("pythia-70m", ["model.vocab_chunk=4096"])
    assert cfg.model.vocab_chunk == 4096 and load_config("pythia-70m").model.vocab_chunk == 0
    assert not [p for p in problems(cfg) if "vocab_chunk" in p]
    msgs = problems(load_config("pythia-70m", ["model.vocab_chunk=-1"], validate=False))
    assert any(m.startswith("model.vocab_chunk: must be >= 0") for m in msgs), msgs


def test_pp2_chunked_training_matches_unchunked(prepared, bpe_dir, tmp_path):
    """Through DeepSpeed's pipeline engine (PP=2, K=2, pauses masked): the chunked feedback
    and the (h, W_out, chunk) head output feeding pipeline_loss train like the unchunked
    single process."""
    import pytest
    from train_utils import metrics, run_train

    run_train(str(tmp_path / "ref"), prepared, bpe_dir)
    run_train(str(tmp_path / "pp2"), prepared, bpe_dir,
              ["parallel.pp=2", "model.vocab_chunk=200"], nproc=2)
    (ref, ref_valid), (got, valid) = metrics(str(tmp_path / "ref")), metrics(str(tmp_path / "pp2"))
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for step, loss in ref.items():
        assert got[step] == pytest.approx(loss, rel=2e-5), (step, got, ref)
    assert valid[4] == pytest.approx(ref_valid[4], rel=2e-5)


# --------------------------------------------------------------------------- TP=2


def test_tp2_matches_unchunked(tmp_path):
    """TP = 2: chunked == unchunked for every case; and the pipeline chain's loss and
    gradients equal PonderLM's (tied and untied, chunked and not), the head's backward
    summing dh over the vocabulary shards in both."""
    out = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--out", str(out)],
                          capture_output=True, text=True, timeout=420, env=env)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert sorted(report["cases"]) == sorted(CASES)
    for name, r in report["cases"].items():
        assert r["local_vocab"] == V // 2 and r["sp"] == CASES[name][3], (name, r)
        _check(r, feedback_chunked="top5" not in name)
    assert sorted(report["pipeline"]) == sorted(PIPELINE_TP2)
    for name, r in report["pipeline"].items():
        assert r["loss_rel"] <= TOL and r["grad_rel"] <= TOL, (name, r)
        assert r["params"] > 10 and r["min_grad_norm"] > 0, (name, r)


# name -> (model overrides, ponder overrides): the pipeline chain against PonderLM at TP = 2
PIPELINE_TP2 = {
    "tied_ponder1": ({"tie_embeddings": True}, {"steps": 1}),
    "tied_ponder1_chunk": ({"tie_embeddings": True, "vocab_chunk": CHUNK}, {"steps": 1}),
    "untied_ponder2_top5": ({}, {"steps": 2, "top_k": 5}),
}


def _pipeline_vs_model(mover, pover) -> dict:
    from ponder_pt.models import PonderLM
    from ponder_pt.models.parallel import gather_tensor, partition_spec

    cfg, ponder = tiny_model_config(vocab_size=V, **mover), PonderConfig(**pover)
    model = PonderLM(cfg, ponder, seed=7).train()
    ids, labels, mask = _inputs()
    want = model(ids, labels=labels, loss_mask=mask)
    want.backward()
    ref = {n: gather_tensor(p.grad, partition_spec(p)) for n, p in model.named_parameters()}
    loss, grads = _pipeline_chain(cfg, ponder)
    return {"loss_rel": abs(loss - want.item()) / abs(want.item()), "params": len(grads),
            "grad_rel": max(((g - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1e-30))
                            .item() for n, g in grads.items()),
            "min_grad_norm": min(g.norm().item() for g in grads.values())}


def _tp2_report() -> dict:
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    report = {"cases": {name: _compare(spec) for name, spec in CASES.items()},
              "pipeline": {name: _pipeline_vs_model(*spec)
                           for name, spec in PIPELINE_TP2.items()}}
    ps.destroy_model_parallel()
    return report


if __name__ == "__main__":
    import argparse

    from _model_helpers import spawn_gloo

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    spawn_gloo(_tp2_report, ap.parse_args().out)
else:
    from _model_helpers import single_process  # noqa: F401  (pytest fixture)
