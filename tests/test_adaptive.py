"""Adaptive pondering in one process: incremental decoding against the cache-free frozen-KV
reference, q = 1 against fixed-K pondering, the halting loss against its formula written
plainly, vocab-chunked against unchunked, and the config checks. (TP = 2 +- SP: test_model_tp.py;
ZeRO-3 and head-only runs: test_adaptive_train.py.)"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from _model_helpers import batch, tiny_model_config

from ponder_pt.config.schema import HaltingConfig, PonderConfig
from ponder_pt.models import PonderLM, init_single_process
from ponder_pt.inference.model import generate_cached_batch

init_single_process()


def adaptive_model(arch: str, K: int, mode: str = "palbert", q: float = 0.5, seed: int = 3,
                   **model_over) -> PonderLM:
    """A tiny adaptive model whose halting head is spread out enough that tokens exit at
    different passes (a freshly initialised head gives lambda ~ 0.5 for every token)."""
    cfg = tiny_model_config(arch, **model_over)
    model = PonderLM(cfg, PonderConfig(steps=K, halting=HaltingConfig(mode=mode, q=q)),
                     seed=seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        model.halting.proj.weight.copy_(torch.randn(model.halting.proj.weight.shape,
                                                    generator=gen) * 0.3)
    return model.eval()


class SkipCounter:
    """Counts the passes incremental decoding skipped (cache copies instead of a pass)."""

    def __init__(self, caches):
        self.skipped = 0
        for cache in caches:
            original = cache.copy_new_from

            def counted(other, n, _original=original):
                self.skipped += 1
                return _original(other, n)

            cache.copy_new_from = counted


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gpt2"])
def test_incremental_decoding_equals_cache_free_reference(arch):
    """K = 1..3, a batch of 3 rows whose tokens exit at different passes; growing and
    preallocated caches; prefill of 5 tokens then one token at a time."""
    ids, _, _ = batch(b=3, s=14, seed=2)
    skipped = 0
    for K in (1, 2, 3):
        model = adaptive_model(arch, K, mode="pondernet" if K == 2 else "palbert")
        with torch.no_grad():
            ref, exits = model(ids, gather_logits=True, return_exits=True)
            counts = torch.bincount(exits.flatten(), minlength=K + 1)
            assert (counts > 0).sum() >= 2, counts  # tokens really exit at different passes
            assert any(len(set(exits[:, t].tolist())) > 1 for t in range(5, 14))  # per step
            for caches in (model.new_caches(), model.new_caches(capacity=16, batch=3)):
                counter = SkipCounter(caches)
                got, got_exits = [], []
                for a, b in [(0, 5)] + [(t, t + 1) for t in range(5, 14)]:
                    z, e = model(ids[:, a:b], caches=caches, gather_logits=True,
                                 return_exits=True)
                    got.append(z)
                    got_exits.append(e)
                assert torch.equal(torch.cat(got_exits, 1), exits), (arch, K)
                assert (torch.cat(got, 1) - ref).abs().max().item() <= 1e-5, (arch, K)
                skipped += counter.skipped
    assert skipped > 0  # some steps ran fewer than K+1 passes: skipped, not recomputed


def test_greedy_generation_follows_the_reference():
    """Batched greedy decoding (left-padded rows of different lengths): every new token is the
    argmax of the cache-free reference over the row's own text, and the reported passes are
    the reference's exit passes + 1."""
    model = adaptive_model("llama", 3)
    prompts = [[5, 9, 11, 3], [7, 8], [20, 21, 22, 23, 24, 25]]
    passes: list = []
    outs = generate_cached_batch(model, prompts, 8, passes=passes)
    seen = set()
    for prompt, new, used in zip(prompts, outs, passes):
        full = torch.tensor([prompt + new])
        with torch.no_grad():
            z, exits = model(full, gather_logits=True, return_exits=True)
        start = len(prompt) - 1
        assert new == z[0, start:start + len(new)].argmax(-1).tolist()
        assert used == (exits[0, start:start + len(new)] + 1).tolist()
        seen.update(used)
    assert len(seen) > 1


def test_q_one_is_fixed_k_bit_for_bit():
    for arch in ("gpt_neox", "gpt2"):
        model = adaptive_model(arch, 2, q=1.0)
        fixed = PonderLM(model.cfg, PonderConfig(steps=2), seed=3).eval()
        missing = fixed.load_state_dict(model.state_dict(), strict=False)
        assert missing.unexpected_keys == ["halting.proj.weight", "halting.proj.bias"]
        ids, labels, mask = batch(seed=4)
        with torch.no_grad():
            assert torch.equal(model(ids, gather_logits=True), fixed(ids, gather_logits=True))
            assert torch.equal(model(ids, labels=labels, loss_mask=mask),
                               fixed(ids, labels=labels, loss_mask=mask))
        prompts = [[1, 2, 3], [4, 5, 6, 7]]
        passes: list = []
        assert (generate_cached_batch(model, prompts, 6, passes=passes)
                == generate_cached_batch(fixed, prompts, 6))
        assert passes == [[3] * 6, [3] * 6]
    off = PonderLM(tiny_model_config(), PonderConfig(steps=2), seed=3)
    assert off.halting is None and not any(k.startswith("halting") for k in off.state_dict())
    # off, an export's config.json carries no halting fields: fixed-K exports stay as they were
    from ponder_pt.config import load_config
    from ponder_pt.export.to_hf import build_hf_config

    cfg = load_config(None, ["ponder.steps=2"], validate=False)
    cfg.model = tiny_model_config()
    assert not [k for k in build_hf_config(cfg).to_dict() if "halt" in k]
    cfg.ponder.halting.mode = "palbert"
    assert build_hf_config(cfg).to_dict()["ponder_halting"] == "palbert"


def _plain_objective(model, ids, labels, mask, beta, lambda_p):
    """DESIGN.md's loss from independent pieces: CE_k from fixed-k forwards (pass k of a K-step
    model is the last pass of a k-step one), lambda_k captured from the head, the formula in
    Python loops."""
    K = model.ponder_cfg.steps
    lambdas = []
    hook = model.halting.register_forward_hook(lambda mod, args, out: lambdas.append(out))
    loss = model(ids, labels=labels, loss_mask=mask)
    hook.remove()
    ce = []
    with torch.no_grad():
        e0 = model.embed.weight[ids] * math.sqrt(model.cfg.hidden_size)  # (a 0-step model
        for k in range(K + 1):  # would not scale its embeddings)
            z = model(inputs_embeds=e0, ponder_steps=k, halt_q=1.0, gather_logits=True)
            ce.append(F.cross_entropy(z.flatten(0, 1), labels.flatten(), reduction="none")
                      .view(labels.shape))
    prior = [lambda_p * (1 - lambda_p) ** k for k in range(K + 1)]
    prior = [x / sum(prior) for x in prior]
    total, count = 0.0, 0
    for i in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if not mask[i, t]:
                continue
            lam = [float(lambdas[k][t, i].detach()) for k in range(K)] + [1.0]
            p, survive = [], 1.0
            for k in range(K + 1):
                p.append(lam[k] * survive)
                survive *= 1 - lam[k]
            total += sum(p[k] * float(ce[k][i, t]) for k in range(K + 1))
            total += beta * sum(pk * math.log(pk / pr) for pk, pr in zip(p, prior) if pk > 0)
            count += 1
    return loss, total / count


def test_dense_objective_matches_the_formula_and_chunked_equals_unchunked():
    ids, labels, mask = batch(seed=5)
    for arch, mode in (("gpt_neox", "palbert"), ("llama", "pondernet")):
        model = adaptive_model(arch, 3, mode=mode).train()
        loss, want = _plain_objective(model, ids, labels, mask, 0.1, 0.3)
        assert loss.item() == pytest.approx(want, rel=1e-5)
        assert set(model.halting_stats) == {"expected_passes", "exit_hist"}
        assert 1.0 <= float(model.halting_stats["expected_passes"]) <= 4.0
        assert float(model.halting_stats["exit_hist"].sum()) == pytest.approx(1.0)
    # vocab_chunk: per-pass CE from the hidden state by chunks, dense and frozen exits
    for exits in ("dense", "frozen"):
        results = []
        for chunk in (0, 24):
            model = adaptive_model("gpt_neox", 2, vocab_chunk=chunk).train()
            model.ponder_cfg.halting.train_exits = exits
            loss = model(ids, labels=labels, loss_mask=mask)
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in
                                            model.named_parameters()}))
        (l0, g0), (l1, g1) = results
        assert (l0 - l1).abs().item() <= 1e-5, exits
        assert max((g0[n] - g1[n]).abs().max().item() for n in g0) <= 1e-5, exits
        assert g0["halting.proj.weight"].abs().sum() > 0


def test_frozen_training_runs_the_inference_semantics():
    """Evaluation with labels scores each token's exit-pass CE under the frozen keys/values
    rule; train_exits=frozen runs every training pass under that rule, with the exits
    inference takes."""
    ids, labels, mask = batch(seed=6)
    model = adaptive_model("llama", 3)
    with torch.no_grad():
        scored = model(ids, labels=labels, loss_mask=mask)  # eval mode: CE at the exit pass
        ref, exits = model(ids, gather_logits=True, return_exits=True)
        # imposing those very exits (the random-exit baseline's API) gives the same logits
        assert torch.equal(model(ids, gather_logits=True, exit_at=exits), ref)
    picked = F.cross_entropy(ref.flatten(0, 1), labels.flatten(), reduction="none")
    m = mask.flatten().float()
    assert scored.item() == pytest.approx(float((picked * m).sum() / m.sum()), rel=1e-5)
    model.train()
    model.ponder_cfg.halting.train_exits = "frozen"
    seen: list = []  # the (layer, FrozenPass) argument of layer 0's attention, per pass
    hook = model.layers[0].attn.register_forward_hook(
        lambda mod, args, out: seen.append(args[4] if len(args) > 4 else None))
    model(ids, labels=labels, loss_mask=mask)
    hook.remove()
    assert len(seen) == 4 and all(v is not None for v in seen)  # every pass, frozen rule
    # the last pass freezes exactly the tokens inference exits earlier (same detached lambdas)
    assert torch.equal(seen[-1][1].exited, exits < 3)
    assert bool((exits < 3).any())


def test_halting_configs_are_refused_with_the_fix(tmp_path):
    from ponder_pt.config import load_config
    from ponder_pt.config.validate import problems

    def found(*sets):
        return " | ".join(problems(load_config("demo", list(sets), validate=False)))

    assert "ponder.halting.q=1.5: must be in (0, 1]" in found("ponder.halting.mode=palbert",
                                                            "ponder.halting.q=1.5")
    assert "ponder.halting.q=0.0" in found("ponder.halting.mode=palbert", "ponder.halting.q=0")
    assert "set ponder.steps >= 1" in found("ponder.halting.mode=pondernet", "ponder.steps=0")
    assert "set checkpoint.init_from" in found("ponder.halting.mode=palbert",
                                               "ponder.halting.head_only=true")
    assert "is not one of" in found("ponder.halting.mode=act")
    assert "is not one of" in found("ponder.halting.mode=palbert",
                                    "ponder.halting.train_exits=sparse")
    assert "pipeline parallelism" in found("ponder.halting.mode=palbert", "parallel.pp=2",
                                           "parallel.zero_stage=1",
                                           "ponder.halting.train_exits=frozen")
    assert found("ponder.halting.mode=palbert", "parallel.pp=2", "parallel.zero_stage=1") == ""
    assert "needs a halting head" in found("ponder.halting.head_only=true")
    assert found("ponder.halting.mode=palbert") == ""


@pytest.mark.hf_compat  # CI runs it again at the oldest declared transformers
def test_hf_export_generates_like_the_native_model(tmp_path):
    """An adaptive model exported to HF (ponder-pt's registered classes, and the export's own
    remote code run without ponder-pt by transformers' AutoModel): cache-free logits equal the
    native frozen-KV reference; generate() on a left-padded batch whose rows exit at different
    passes gives the native tokens; convert from-hf brings the halting head back."""
    from transformers import AutoModelForCausalLM

    from ponder_pt.config import load_config
    from ponder_pt.export.from_hf import hf_to_checkpoint
    from ponder_pt.export.hf_auto import from_pretrained
    from ponder_pt.export.native import read_checkpoint
    from ponder_pt.export.to_hf import export_full
    from ponder_pt.models import full_state_dict
    from _export_helpers import STOCK_GENERATE_PADDED, run_stock

    prompts = [[5, 9, 11, 3], [7, 8], [20, 21, 22, 23, 24, 25]]
    jobs = []
    for arch, K in (("gpt_neox", 3), ("llama", 2), ("gpt2", 1)):
        model = adaptive_model(arch, K, mode="pondernet" if arch == "llama" else "palbert")
        cfg = load_config(None, [f"ponder.steps={K}", f"ponder.halting.mode="
                                 f"{model.ponder_cfg.halting.mode}", "ponder.halting.q=0.5"],
                          validate=False)
        cfg.model = model.cfg
        out = str(tmp_path / arch)
        export_full(cfg, full_state_dict(model), out, progress=False)
        check_adaptive_card(out, K, model.ponder_cfg.halting.mode)
        hf = from_pretrained(AutoModelForCausalLM, out, False, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None  # LLaMA's default EOS is id 2: never stop
        ids, _, _ = batch(b=2, s=10, seed=8)
        with torch.no_grad():
            ref, exits = model(ids, gather_logits=True, return_exits=True)
            got = hf(ids, use_cache=False).logits
        assert (got - ref).abs().max().item() <= 1e-5, arch
        assert torch.equal(hf.halt_exits, exits)
        native = generate_cached_batch(model, prompts, 8)
        width = max(map(len, prompts))
        pad = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        new = hf.generate(pad, attention_mask=mask, do_sample=False, max_new_tokens=8,
                          pad_token_id=0)[:, width:].tolist()
        assert new == native, arch
        for q in (0.3, 1.0):  # another q, and q = 1: every pass
            assert (hf.generate(pad, attention_mask=mask, do_sample=False, max_new_tokens=8,
                                pad_token_id=0, halt_q=q)[:, width:].tolist()
                    == generate_cached_batch(model, prompts, 8, halt_q=q)), (arch, q)
        jobs.append({"path": out, "prompts": prompts, "native": native})
        back = hf_to_checkpoint(out, str(tmp_path / f"{arch}_ckpt"), progress=False)
        assert back.ponder.halting.mode == model.ponder_cfg.halting.mode
        _, full, _ = read_checkpoint(str(tmp_path / f"{arch}_ckpt"))
        assert torch.equal(full["halting.proj.weight"], model.halting.proj.weight)
    stock = run_stock(STOCK_GENERATE_PADDED, json.dumps(jobs))
    assert stock["same"] == [True] * len(jobs)


def check_adaptive_card(out: str, K: int, mode: str) -> None:
    """The export's model card says a halting head decides the passes (its mode and q), not
    that every token takes K + 1; eval results written into it carry q and the passes."""
    from ponder_pt.export.model_card import update_results

    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert f"up to K = {K} continuous-space pondering steps, as many as a halting head " \
           f"(`{mode}`, q = 0.5) decides for each token" in card, card
    assert f"; up to K + 1 = {K + 1} transformer passes per token" in card, card
    assert f"Adaptive pondering: a halting head (`{mode}`) decides each token's passes" in card
    assert "reaches q = 0.5 (`ponder.halting.q`" in card, card
    assert f"; K + 1 = {K + 1} transformer passes" not in card
    res = {"results": {"tiny": {"acc,none": 0.25}}, "halt_q": 0.3, "mean_passes": 1.75}
    text = open(update_results(out, res, None), encoding="utf-8").read()
    assert "| task | metric | value | split | few-shot | pauses M | limit | halting q | " \
           "passes per token |" in text, text
    assert "| tiny | acc | 0.25 | - | - | - | - | 0.3 | 1.750 |" in text, text


def test_dry_run_shows_training_and_decode_flops(capsys):
    from ponder_pt.cli import main
    from ponder_pt.config import load_config
    from ponder_pt.engine.flops import decode_flops_per_token, flops_per_token

    assert main(["train", "--config", "ponderpythia-1b", "--dry-run", "--nproc", "8",
                 "--set", "ponder.halting.mode=palbert", "--set", "ponder.halting.q=0.6"]) == 0
    out = capsys.readouterr().out
    assert "# adaptive pondering" in out and "training still pays all 4 passes" in out
    assert "  4.0 passes:" in out and "(100% of fixed K)" in out
    assert "  1.0 passes:" in out
    # the counts: one full pass and no feedback at 1 pass; K+1 passes is the fixed-K forward
    m = load_config("ponderpythia-1b").model
    m.vocab_size = 50304
    one = decode_flops_per_token(m, 50304, 0, 1.0)
    assert decode_flops_per_token(m, 50304, 0, 4.0) == pytest.approx(
        4 * one + 3 * 2 * 50304 * m.hidden_size)
    # training = 3 x (forward of every pass at context seq): the same pieces
    assert flops_per_token(m, 50304, 0, 3) == pytest.approx(
        3 * decode_flops_per_token(m, 50304, 0, 4.0))


def test_pipeline_chain_with_halting_matches_the_model():
    """The unrolled pipeline layers run in order without DeepSpeed (what PP = 2 cuts into
    stages): the halting objective and the head's gradient equal PonderLM's, for a palbert
    head on the soft-embedding feedback (plain and vocab-chunked) and a pondernet head on the
    looped baseline."""
    import dataclasses

    from ponder_pt.models.pipeline import (BlockLayer, SharedParams, embed_layer,
                                           halting_feedback_layer, halting_head_layer,
                                           pipeline_loss)

    ids, labels, mask = batch(seed=9)
    for mode, feedback, chunk in (("palbert", "embedding", 0), ("palbert", "embedding", 24),
                                  ("pondernet", "hidden", 0)):
        cfg = tiny_model_config("gpt_neox", vocab_chunk=chunk)
        ponder = PonderConfig(steps=2, feedback=feedback, halting=HaltingConfig(mode=mode))
        model = PonderLM(cfg, dataclasses.replace(ponder), seed=7).train()
        want = model(ids, labels=labels, loss_mask=mask)
        want.backward()
        shared = SharedParams(cfg, ponder, 7, torch.float32)
        blocks = [BlockLayer(cfg, i, 7, torch.float32) for i in range(cfg.num_layers)]
        xe = embed_layer(shared, (ids, labels, mask))
        for k in range(3):
            for block in blocks:
                xe = block(xe)
            xe = (halting_feedback_layer(shared, xe, k) if k < 2
                  else halting_head_layer(shared, xe))
        got = pipeline_loss(xe, (labels, mask))
        got.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-5), (mode, feedback, chunk)
        ours, theirs = shared.halting.proj.weight.grad, model.halting.proj.weight.grad
        assert (ours - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item() + 1e-7
