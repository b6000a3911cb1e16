"""Pondering vs an independent plain implementation of DESIGN.md's formula (on HF models)."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import (batch, masked_ce, ponder_reference, random_hf_model,  # noqa: F401
                            single_process, tiny_model_config)

from ponder_pt.config.schema import PonderConfig
from ponder_pt.models import PonderLM, load_hf_state_dict

pytestmark = pytest.mark.usefixtures("single_process")


def _models(arch="gpt_neox", ponder=None, seed=0, **over):
    cfg = tiny_model_config(arch, **over)
    hf = random_hf_model(cfg, seed=seed)
    model = PonderLM(cfg, ponder)
    load_hf_state_dict(model, hf.state_dict())
    return cfg, hf, model


def _hf_loss(hf, ids, labels, mask, K, **kw):
    logits = ponder_reference(hf.get_input_embeddings().weight,
                              lambda e: hf(inputs_embeds=e).logits, ids, K, **kw)
    return masked_ce(logits, labels, mask)


GRAD_PAIRS = {  # ours -> HF GPT-NeoX
    "embed.weight": "gpt_neox.embed_in.weight",
    "output.weight": "lm_head.weight",
    "layers.0.attn.qkv.weight": "gpt_neox.layers.0.attention.query_key_value.weight",
    "layers.1.mlp.fc2.weight": "gpt_neox.layers.1.mlp.dense_4h_to_h.weight",
    "final_norm.weight": "gpt_neox.final_layer_norm.weight",
}


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("scale_embeds", [True, False])
@pytest.mark.parametrize("top_k", [0, 5])
def test_ponder_matches_reference(K, scale_embeds, top_k):
    ponder = PonderConfig(steps=K, scale_embeds=scale_embeds, top_k=top_k)
    _, hf, model = _models(ponder=ponder)
    ids, labels, mask = batch(b=2, s=12, seed=K)
    ref = _hf_loss(hf, ids, labels, mask, K, scale_embeds=scale_embeds, top_k=top_k)
    ours = model(ids, labels=labels, loss_mask=mask)
    assert abs(ours.item() - ref.item()) <= 1e-5
    ref.backward()
    ours.backward()
    hf_params = dict(hf.named_parameters())
    for mine, theirs in GRAD_PAIRS.items():
        a = dict(model.named_parameters())[mine].grad
        b = hf_params[theirs].grad
        assert a.abs().max() > 0, mine
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), mine


def test_ponder_llama_scale_initial_by_steps():
    ponder = PonderConfig(steps=2, scale_embeds=True, scale_initial_by_steps=True)
    _, hf, model = _models("llama", ponder=ponder, tie_embeddings=True)
    ids, labels, mask = batch(b=2, s=10, seed=5)
    ref = _hf_loss(hf, ids, labels, mask, 2, scale_embeds=True, scale_initial_by_steps=True)
    ours = model(ids, labels=labels, loss_mask=mask)
    assert abs(ours.item() - ref.item()) <= 1e-5


def test_ponder_logits_without_labels():
    ponder = PonderConfig(steps=2)
    _, hf, model = _models(ponder=ponder)
    ids, _, _ = batch(b=1, s=8, seed=6)
    with torch.no_grad():
        ref = ponder_reference(hf.get_input_embeddings().weight,
                               lambda e: hf(inputs_embeds=e).logits, ids, 2)
        assert (model(ids) - ref).abs().max().item() <= 1e-5
        # ponder_steps=0 overrides the config: the plain model again
        assert (model(ids, ponder_steps=0) - hf(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("K", [1, 2, 3])
def test_gradient_reaches_every_pass(K):
    """The final-norm output of each of the K+1 passes receives a non-zero gradient."""
    cfg = tiny_model_config()
    model = PonderLM(cfg, PonderConfig(steps=K), seed=3)
    grads = []

    def hook(module, inputs, output):
        index = len(grads)
        grads.append(None)
        output.register_hook(lambda g: grads.__setitem__(index, g.abs().sum().item()))

    model.final_norm.register_forward_hook(hook)
    ids, labels, mask = batch(b=2, s=8, seed=0)
    model(ids, labels=labels, loss_mask=mask).backward()
    assert len(grads) == K + 1
    assert all(g is not None and g > 0 for g in grads), grads


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_activation_checkpointing_same_loss_and_grads(mode, arch):
    ponder = PonderConfig(steps=2, top_k=4)
    ids, labels, mask = batch(b=2, s=8, seed=2)
    results = []
    for ckpt in ("none", mode):
        model = PonderLM(tiny_model_config(arch, activation_checkpointing=ckpt), ponder, seed=5)
        model.train()
        loss = model(ids, labels=labels, loss_mask=mask)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert abs(l0 - l1) <= 1e-6
    for name in g0:
        assert (g0[name] - g1[name]).abs().max().item() <= 1e-6, name


def _decode_incrementally(model, ids, prefill, capacity=0):
    """Prefill `prefill` tokens, then a 2-token chunk, then one token at a time (growing
    caches, or preallocated ones of `capacity` positions)."""
    caches = model.new_caches(capacity=capacity, batch=ids.shape[0])
    outs = [model(ids[:, :prefill], caches=caches)]
    pos = prefill
    for width in [2] + [1] * (ids.shape[1] - prefill - 2):
        outs.append(model(ids[:, pos:pos + width], caches=caches))
        pos += width
    assert caches[-1].length == ids.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("capacity", [0, 16], ids=["growing", "preallocated"])
@pytest.mark.parametrize("arch,K,top_k", [("gpt_neox", 0, 0), ("gpt_neox", 2, 0),
                                          ("llama", 2, 4), ("llama", 3, 0)])
def test_kv_cache_decoding_matches_full_forward(arch, K, top_k, capacity):
    """K+1 caches (one per pass): incremental logits == full-sequence pondering logits."""
    model = PonderLM(tiny_model_config(arch), PonderConfig(steps=K, top_k=top_k), seed=2).eval()
    ids, _, _ = batch(b=2, s=12, seed=9)
    with torch.no_grad():
        full = model(ids)
        step = _decode_incrementally(model, ids, prefill=5, capacity=capacity)
    assert (full - step).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_attention_backward_writes_the_qkv_gradient_once(arch):
    """The fused QKV output is split once, so its gradient is one cat of the q, k and v
    parts: no QKV-sized zero fill or add per layer (a slice and two selects cost three fills
    and two adds, the largest elementwise traffic of the backward after the loss's)."""
    from torch.profiler import ProfilerActivity, profile

    model = PonderLM(tiny_model_config(arch), PonderConfig(steps=1), seed=0)
    ids, labels, _ = batch(2, 16)
    att = model.layers[0].attn
    qkv = [16, 2, att.kv_local, att.groups + 2, att.head_dim]  # the [s, b, ...] view
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model(ids, labels=labels).backward()
    touched = [e.name for e in prof.events()
               if e.name in ("aten::add", "aten::add_", "aten::zero_", "aten::fill_")
               and e.input_shapes and e.input_shapes[0] == qkv]
    assert touched == [], touched
    parts = [qkv[:3] + [n] + qkv[4:] for n in (att.groups, 1, 1)]
    joins = [e for e in prof.events()
             if e.name == "SplitWithSizesBackward0" and e.input_shapes == parts]
    assert len(joins) == 2 * len(model.layers)  # one per layer and pass
