"""Latent thoughts (PonderLM-2) against a plain reference written on HF models.

The reference computes DESIGN.md's definitions directly on an HF base model (no cache, no
code of ours): the sequential one (each slot a forward over the whole interleaved prefix,
its input the previous slot's last hidden state) and training's Jacobi iterations (growing
passes, n parallel updates, a final pass). Our model carries the same random weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from _model_helpers import (batch, masked_ce, random_hf_model, single_process,  # noqa: F401
                            tiny_model_config)

from ponder_pt.config.schema import PauseConfig, ThoughtsConfig
from ponder_pt.inference.decode import Decoder
from ponder_pt.inference.model import generate_cached_batch
from ponder_pt.models import PonderLM, load_hf_state_dict

pytestmark = pytest.mark.usefixtures("single_process")

ARCHS = ["gpt_neox", "llama", "gpt2"]


PAUSE_ID = 127  # the tiny vocabulary's last row


def _models(arch: str, count: int, seed: int = 0, pauses: int = 0, **thoughts):
    """(random HF model, our model with its weights): latent thoughts (count) or every-token
    pauses (pauses)."""
    cfg = tiny_model_config(arch)
    hf = random_hf_model(cfg, seed=seed)
    pause = (PauseConfig(mode="every_token", per_token=pauses, token_id=PAUSE_ID) if pauses
             else None)
    model = PonderLM(cfg, thoughts=ThoughtsConfig(count=count, **thoughts), pause=pause).eval()
    load_hf_state_dict(model, hf.state_dict())
    return hf, model


def _scaled_embeds(hf, ids):
    w = hf.get_input_embeddings().weight
    return w[ids] * math.sqrt(2.5 * w.shape[1])


def _hidden(hf, inputs, positions):
    """The base model's final-norm hidden states [b, n, h] of slot inputs [b, n, h]."""
    return hf.base_model(inputs_embeds=inputs, position_ids=positions).last_hidden_state


def reference_sequential(hf, ids, count):
    """Logits [b, L, V] of the exact definition: slot after slot, each a forward over the
    whole interleaved prefix (no cache)."""
    e = _scaled_embeds(hf, ids)
    b, L = ids.shape
    inputs, positions, out = [], [], []
    for t in range(L):
        x = e[:, t]
        for _ in range(count + 1):
            inputs.append(x)
            positions.append(t)
            pos = torch.tensor(positions).unsqueeze(0).expand(b, -1)
            x = _hidden(hf, torch.stack(inputs, 1), pos)[:, -1]
        out.append(hf.lm_head(x))
    return torch.stack(out, 1)


def reference_jacobi(hf, ids, count, iters):
    """Logits [b, L, V] of training's forward: M growing passes, n Jacobi iterations, the
    final pass, over explicitly interleaved sequences."""
    e = _scaled_embeds(hf, ids)
    b, L, h = e.shape

    def run(thoughts):
        slots = len(thoughts) + 1
        seq = torch.zeros(b, L * slots, h)
        seq[:, 0::slots] = e
        for j, z in enumerate(thoughts, 1):
            seq[:, j::slots] = z
        pos = torch.arange(L).repeat_interleave(slots).unsqueeze(0).expand(b, -1)
        return _hidden(hf, seq, pos), slots

    thoughts = []
    for k in range(count):
        out, slots = run(thoughts)
        thoughts.append(out[:, k::slots])
    for _ in range(iters):
        out, slots = run(thoughts)
        thoughts = [out[:, j::slots] for j in range(count)]
    out, slots = run(thoughts)
    return hf.lm_head(out[:, count::slots])


GRAD_PAIRS = {  # ours -> HF's
    "gpt_neox": {"embed.weight": "gpt_neox.embed_in.weight",
                 "layers.0.ln1.weight": "gpt_neox.layers.0.input_layernorm.weight",
                 "final_norm.weight": "gpt_neox.final_layer_norm.weight"},
    "llama": {"embed.weight": "model.embed_tokens.weight",
              "layers.0.ln1.weight": "model.layers.0.input_layernorm.weight",
              "final_norm.weight": "model.norm.weight"},
    "gpt2": {"embed.weight": "transformer.wte.weight", "pos_embed.weight": "transformer.wpe.weight",
             "final_norm.weight": "transformer.ln_f.weight"},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_reference(arch):
    """Training's Jacobi forward (n = 1 and n = 2) and its loss and gradients equal the
    reference; after L iterations it equals the sequential definition, and so does the
    exact cached computation."""
    hf, model = _models(arch, count=1, seed=1)
    ids, labels, mask = batch(b=2, s=7, seed=2)
    with torch.no_grad():
        exact = reference_sequential(hf, ids, 1)
        for n in (1, 2):
            ref = reference_jacobi(hf, ids, 1, n)
            ours = model(ids, thought_iters=n, gather_logits=True)
            assert (ours - ref).abs().max() <= 1e-5, n
            assert (ours - exact).abs().max() > 1e-4  # a few iterations are not yet exact
        converged = model(ids, thought_iters=ids.shape[1], gather_logits=True)
        cached = model(ids, caches=model.new_caches(), gather_logits=True)
    assert (converged - exact).abs().max() <= 1e-5
    assert (cached - exact).abs().max() <= 1e-5
    # the training loss at n = 2, with gradients through every pass
    model.train()
    model.zero_grad()
    loss = model(ids, labels=labels, loss_mask=mask, thought_iters=2)
    ref = masked_ce(reference_jacobi(hf, ids, 1, 2), labels, mask)
    assert abs(loss.item() - ref.item()) <= 1e-5
    loss.backward()
    ref.backward()
    ours, theirs = dict(model.named_parameters()), dict(hf.named_parameters())
    for name, hf_name in GRAD_PAIRS[arch].items():
        got, want = ours[name].grad, theirs[hf_name].grad
        assert got.abs().max() > 0, name
        assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max())), name


@pytest.mark.parametrize("arch", ARCHS)
def test_two_thoughts_and_exact_cached_decoding(arch):
    """M = 2: Jacobi after L x M iterations (each makes at least the earliest inexact thought
    exact), one prefill plus one-token steps through the cache (growing and preallocated),
    all equal the sequential definition at every position."""
    hf, model = _models(arch, count=2, seed=3)
    ids, _, _ = batch(b=2, s=6, seed=4)
    with torch.no_grad():
        exact = reference_sequential(hf, ids, 2)
        assert (model(ids, thought_iters=12, gather_logits=True) - exact).abs().max() <= 1e-5
        for caches in (model.new_caches(), model.new_caches(capacity=6, batch=2)):
            steps = [model(ids[:, :3], caches=caches, gather_logits=True)]
            steps += [model(ids[:, t:t + 1], caches=caches, gather_logits=True)
                      for t in range(3, 6)]
            assert caches[0].length == 6 * 3  # M+1 columns per token
            assert (torch.cat(steps, 1) - exact).abs().max() <= 1e-5


def test_jacobi_prefill_equals_training_forward():
    """`prefill: jacobi` through a cache gives training's Jacobi logits, and the cache then
    holds the final pass's keys/values: the next token decodes as after a cache-free
    recompute of that final pass."""
    hf, model = _models("llama", count=1, seed=5, prefill="jacobi", jacobi_iters=2)
    ids, _, _ = batch(b=2, s=9, seed=6)
    with torch.no_grad():
        want = model(ids[:, :8], thought_iters=2, gather_logits=True)
        for caches in (model.new_caches(), model.new_caches(capacity=9, batch=2)):
            got = model(ids[:, :8], caches=caches, gather_logits=True)
            assert (got - want).abs().max() <= 1e-5
            assert caches[0].length == 16
            nxt = model(ids[:, 8:], caches=caches, gather_logits=True)
            assert torch.isfinite(nxt).all() and nxt.shape == (2, 1, 128)


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_decodes_each_row_as_alone(arch):
    """Left-padded prompts of different lengths: each row's greedy tokens and logits equal
    its decoding alone, and the tokens follow the reference's argmax at every step."""
    hf, model = _models(arch, count=1, seed=7)
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 120, (n,), generator=gen).tolist() for n in (5, 2, 4)]
    together = generate_cached_batch(model, prompts, 4, vocab_rows=120)
    for prompt, row in zip(prompts, together):
        assert row == generate_cached_batch(model, [prompt], 4, vocab_rows=120)[0]
        seq = list(prompt)
        with torch.no_grad():
            for tok in row:
                logits = reference_sequential(hf, torch.tensor([seq]), 1)[0, -1, :120]
                assert tok == int(logits.argmax())
                seq.append(tok)


def test_decoder_logits_and_capacity():
    """The decoder's per-step logits equal the reference; its capacity counts tokens."""
    hf, model = _models("gpt_neox", count=1, seed=9)
    prompt = [5, 9, 11]
    dec = Decoder(model, capacity=5, vocab_rows=128)
    seq = list(prompt)
    with torch.no_grad():
        z = dec.prefill([prompt])
        for tok in (3, 4):
            ref = reference_sequential(hf, torch.tensor([seq]), 1)[0, -1]
            assert (z[0] - ref).abs().max() <= 1e-5
            seq.append(tok)
            z = dec.step([tok])
        assert dec.length == 5
        with pytest.raises(ValueError, match="beyond the KV caches"):
            dec.step([1])


def reference_every_token_pauses(hf, ids, pauses):
    """Logits [b, L, V]: one forward over [x_t, <pause> x M] per token, each slot at the
    token's position, read at the last pause."""
    w = hf.get_input_embeddings().weight
    b, L = ids.shape
    slots = pauses + 1
    seq = w[PAUSE_ID].expand(b, L * slots, -1).clone()
    seq[:, 0::slots] = w[ids]
    pos = torch.arange(L).repeat_interleave(slots).unsqueeze(0).expand(b, -1)
    return hf.lm_head(_hidden(hf, seq, pos)[:, slots - 1::slots])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_token_pauses_match_reference(arch):
    """PonderLM-2's pause baseline: the forward, its loss, and a prefill plus one-token steps
    through a cache equal the reference; a padded batch decodes each row as alone."""
    hf, model = _models(arch, count=0, seed=15, pauses=2)
    ids, labels, mask = batch(b=2, s=6, seed=16)
    with torch.no_grad():
        ref = reference_every_token_pauses(hf, ids, 2)
        assert (model(ids, gather_logits=True) - ref).abs().max() <= 1e-5
        loss = model(ids, labels=labels, loss_mask=mask)
        assert abs(loss.item() - masked_ce(ref, labels, mask).item()) <= 1e-5
        caches = model.new_caches(capacity=6, batch=2)
        steps = [model(ids[:, :4], caches=caches, gather_logits=True)]
        steps += [model(ids[:, t:t + 1], caches=caches, gather_logits=True) for t in (4, 5)]
        assert caches[0].length == 18 and (torch.cat(steps, 1) - ref).abs().max() <= 1e-5
    prompts = [[5, 9, 11, 3], [7, 8]]
    together = generate_cached_batch(model, prompts, 4, vocab_rows=120)
    assert together == [generate_cached_batch(model, [p], 4, vocab_rows=120)[0]
                        for p in prompts]


def test_count_zero_is_the_plain_model():
    cfg = tiny_model_config("gpt_neox")
    plain = PonderLM(cfg).eval()
    off = PonderLM(cfg, thoughts=ThoughtsConfig(count=0)).eval()
    ids, labels, mask = batch(seed=10)
    with torch.no_grad():
        assert torch.equal(plain(ids, gather_logits=True), off(ids, gather_logits=True))
        assert torch.equal(plain(ids, labels=labels, loss_mask=mask),
                           off(ids, labels=labels, loss_mask=mask))


def test_training_draws_iters_per_step():
    """n comes from thoughts.train_iters by the step: the same step gives the same loss, and
    the steps of a run see every listed n."""
    _, model = _models("gpt_neox", count=1, seed=11, train_iters=[1, 3])
    model.train()
    ids, labels, mask = batch(seed=12)
    losses = {}
    with torch.no_grad():
        by_n = {n: model(ids, labels=labels, loss_mask=mask, thought_iters=n).item()
                for n in (1, 3)}
        for step in range(12):
            model.begin_step(step)
            losses[step] = model(ids, labels=labels, loss_mask=mask).item()
            model.begin_step(step)
            assert model(ids, labels=labels, loss_mask=mask).item() == losses[step]
    assert set(losses.values()) == set(by_n.values())


@pytest.mark.hf_compat  # CI runs it again at the oldest declared transformers
def test_hf_export_equals_the_native_model(tmp_path):
    """Latent-thoughts models and an every-token-pause model exported to HF (ponder-pt's
    registered classes, and the export's own remote code in a process without ponder-pt):
    logits equal the native exact computation, generate() on a left-padded batch gives the
    native tokens, the card says what the model is, and convert from-hf brings the slots
    back."""
    import json

    from transformers import AutoModelForCausalLM

    from _export_helpers import STOCK_GENERATE_PADDED, run_stock
    from ponder_pt.config import load_config
    from ponder_pt.early_exit.backbones import wrap_backbone
    from ponder_pt.export.from_hf import hf_to_checkpoint
    from ponder_pt.export.hf_auto import from_pretrained
    from ponder_pt.export.to_hf import export_full
    from ponder_pt.models import full_state_dict

    prompts = [[5, 9, 11, 3], [7, 8], [20, 21, 22, 23, 24]]
    jobs = []
    for arch, count, pauses in (("gpt_neox", 1, 0), ("llama", 2, 0), ("gpt2", 1, 0),
                                ("llama", 0, 2)):
        _, model = _models(arch, count=count, seed=13, pauses=pauses)
        cfg = load_config(None, [f"thoughts.count={count}"] + (
            ["pause.mode=every_token", f"pause.per_token={pauses}",
             f"pause.token_id={PAUSE_ID}"] if pauses else []), validate=False)
        cfg.model = model.cfg
        out = str(tmp_path / f"{arch}_{count}_{pauses}")
        export_full(cfg, full_state_dict(model), out, progress=False)
        card = open(f"{out}/README.md", encoding="utf-8").read()
        if pauses:
            assert f"puts M = {pauses} `<pause>` slots after every token" in card
        else:
            assert f"with M = {count} latent thought(s) per token" in card
            assert "computes the thoughts exactly" in card
        hf = from_pretrained(AutoModelForCausalLM, out, False, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None
        ids, _, _ = batch(b=2, s=7, seed=14)
        with torch.no_grad():
            ref = model(ids, caches=model.new_caches(), gather_logits=True)
            got = hf(ids, use_cache=False).logits
        assert (got - ref).abs().max().item() <= 1e-5, arch
        native = generate_cached_batch(model, prompts, 6)
        width = max(map(len, prompts))
        pad = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        new = hf.generate(pad, attention_mask=mask, do_sample=False, max_new_tokens=6,
                          pad_token_id=0)[:, width:].tolist()
        assert new == native, arch
        jobs.append({"path": out, "prompts": prompts, "native": native, "n_new": 6})
        with pytest.raises(ValueError, match="slots after every token .* `ponder-pt sft`"):
            wrap_backbone(hf)  # early-exit fine-tuning refuses, naming what to use
        back = hf_to_checkpoint(out, str(tmp_path / f"{arch}_{count}_{pauses}_ckpt"),
                                progress=False)
        assert back.thoughts.count == count and back.ponder.steps == 0
        assert back.pause.every_token == pauses
    stock = run_stock(STOCK_GENERATE_PADDED, json.dumps(jobs))
    assert stock["same"] == [True] * len(jobs)
