"""Speculative decoding over the pondering passes (`ponder_pt.inference.speculative`): greedy
output against ordinary fixed-K decoding on every architecture and on left-padded batches whose
rows accept different lengths, the caches after a rejected draft against ordinary decoding's,
sampling against the exact distribution of the model's own full forward (a chi-square test,
with a broken acceptance rule as the control it must reject), the refusals, the draft loss
against plain pondering written on HF models and through the trainer at TP 2, and
`generate --speculative` on a trained checkpoint."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch
from _export_helpers import trained  # noqa: F401
from _model_helpers import (batch, masked_ce, ponder_reference, random_hf_model,  # noqa: F401
                            single_process, tiny_model_config)

from ponder_pt.config.schema import HaltingConfig, PonderConfig, ThoughtsConfig
from ponder_pt.inference import speculative as spec
from ponder_pt.inference.decode import Decoder
from ponder_pt.inference.model import generate_cached_batch
from ponder_pt.models import PonderLM, load_hf_state_dict
from ponder_pt.models.layers import StaticKVCache
from zygote import ponder

pytestmark = pytest.mark.usefixtures("single_process")

PROMPTS = [[7], [3, 9, 4], [5, 9, 11, 3, 7], [2, 8, 6, 1, 5, 5, 9, 30]]
PONDER = {"K3": PonderConfig(steps=3), "looped-K2": PonderConfig(steps=2, feedback="hidden"),
          "K2-top4": PonderConfig(steps=2, top_k=4)}


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gpt2"])
def test_greedy_equals_ordinary_decoding(arch, monkeypatch):
    """Every (d, n) on three pondering variants: the left-padded batch's speculative greedy
    tokens are ordinary fixed-K greedy decoding's, token for token, with an end-of-text id
    ending rows early; on GPT-NeoX and LLaMA rows accept different lengths in one round
    (hidden columns) and the caches fill up and are squeezed (`compact`)."""
    compactions = []
    original = StaticKVCache.compact

    def counted(self):
        compactions.append(self.length)
        return original(self)

    monkeypatch.setattr(StaticKVCache, "compact", counted)
    mixed = 0
    for name, ponder in PONDER.items():
        model = PonderLM(tiny_model_config(arch), ponder, seed=6).eval()
        for eos in ((None, 17) if name == "K3" else (None,)):
            ref = generate_cached_batch(model, PROMPTS, 14, eos_id=eos, vocab_rows=120)
            for d, n in itertools.product(range(1, ponder.steps + 1), (1, 4)):
                stats, rounds = spec.SpeculativeStats(), []
                got = spec.generate_speculative_batch(model, PROMPTS, 14, d, n, eos_id=eos,
                                                      vocab_rows=120, stats=stats,
                                                      on_round=rounds.append)
                assert got == ref, (name, eos, d, n)
                assert stats.emitted == sum(len(r) for r in ref) - len(ref)
                assert 0 <= stats.accepted <= stats.drafted and stats.verify_steps > 0
                mixed += sum(len({len(row) for row in emitted if row}) > 1
                             for emitted in rounds)
    if arch != "gpt2":  # a random GPT-2's passes agree on every token: it accepts everything
        assert mixed > 0 and compactions


def test_rolled_back_caches_equal_ordinary_decoding():
    """After rounds with rejected drafts, every pass's cache holds, column for column, what
    ordinary decoding wrote for the same tokens (the rejected columns rolled back)."""
    model = PonderLM(tiny_model_config("llama"), PonderConfig(steps=3), seed=6).eval()
    prompt, tokens = [5, 9, 11, 3, 7], []
    dec = spec.SpeculativeDecoder(model, 40, draft_passes=1, draft_tokens=4)
    with torch.no_grad():
        pending = int(dec.prefill([prompt])[0].argmax())
        rejected = 0
        for _ in range(4):
            ys = [pending]
            for i in range(5):
                zq = dec.draft([ys[-1]])
                if i < 4:
                    ys.append(int(zq[0].argmax()))
            zp = dec.verify()[0]
            kept = 0
            while kept < 4 and int(zp[kept].argmax()) == ys[kept + 1]:
                kept += 1
            rejected += kept < 4
            tokens += ys[:kept + 1]
            dec.commit([kept + 1])
            pending = int(zp[kept].argmax())
        assert rejected > 0
        ordinary = Decoder(model, 40)
        ordinary.prefill([prompt])
        for tok in tokens:
            ordinary.step([tok])
    assert dec.caches[0].valid is None  # one row: nothing hidden
    for mine, theirs in zip(dec.caches, ordinary.caches):
        assert mine.length == theirs.length == len(prompt) + len(tokens)
        for a, b in zip(mine.keys + mine.values, theirs.keys + theirs.values):
            torch.testing.assert_close(a[:, :, :mine.length], b[:, :, :theirs.length],
                                       atol=2e-5, rtol=1e-4)


def test_compact_keeps_each_rows_visible_columns_in_order():
    """`StaticKVCache.compact` against the per-row list of visible columns."""
    cache = StaticKVCache(1, 3, 1, 2, 12, torch.float32, "cpu")
    cache.keys[0].copy_(torch.arange(3 * 12 * 2, dtype=torch.float32).view(3, 1, 12, 2))
    cache.values[0].copy_(-cache.keys[0])
    cache.set_valid(torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]], dtype=torch.bool))
    cache.length = 8
    cache.hide(3, torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]],
                               dtype=torch.bool))
    visible = [[c for c in range(8) if bool(cache.valid[r, c])] for r in range(3)]
    before = cache.keys[0].clone()
    cache.compact()
    assert cache.length == max(len(v) for v in visible) == 7
    for r, cols in enumerate(visible):
        pad = cache.length - len(cols)
        assert cache.valid[r, :cache.length].tolist() == [False] * pad + [True] * len(cols)
        torch.testing.assert_close(cache.keys[0][r, :, pad:cache.length], before[r][:, cols])
        torch.testing.assert_close(cache.values[0][r, :, pad:cache.length], -before[r][:, cols])
    assert bool(cache.valid[:, cache.length:].all())


def _sampling_model():
    """A LLaMA with 8 vocabulary rows (6 real) whose head is scaled up, so pass 0's draft is
    far from the final distribution (total variation about 0.4): a wrong acceptance rule
    shows."""
    model = PonderLM(tiny_model_config("llama", vocab_size=8), PonderConfig(steps=2),
                     seed=6).eval()
    with torch.no_grad():
        model.output.weight.mul_(3.0)
    return model


def _exact_joint(model, prompt, rows, temperature, top_k):
    """P(t1, t2, t3) of fixed-K sampling from the model's full forward without caches."""
    seqs = [prompt + [a, b] for a in range(rows) for b in range(rows)]
    with torch.no_grad():
        z = model(torch.tensor(seqs), gather_logits=True).float()[:, len(prompt) - 1:]
    z[..., rows:] = float("-inf")
    p = spec.sampling_probs(z, temperature, top_k)  # [rows^2, 3, V]
    joint = torch.zeros(rows, rows, rows, dtype=torch.float64)
    for i, (a, b) in enumerate(itertools.product(range(rows), range(rows))):
        joint[a, b] = p[i, 0, a] * p[i, 1, b] * p[i, 2, :rows]
    return joint


def _chi_square_p(model, temperature, top_k, samples):
    from scipy.stats import chisquare

    prompt, rows = [1, 2, 3], 6
    counts = torch.zeros(rows, rows, rows, dtype=torch.float64)
    for start in range(0, samples, 1000):
        gens = [torch.Generator().manual_seed(start + i) for i in range(1000)]
        out = spec.generate_speculative_batch(model, [prompt] * 1000, 4, 1, 2, vocab_rows=rows,
                                              greedy=False, temperature=temperature,
                                              top_k=top_k, generators=gens)
        for seq in out:
            counts[tuple(seq[:3])] += 1
    want = (_exact_joint(model, prompt, rows, temperature, top_k) * samples).flatten()
    got = counts.flatten()
    big = want >= 5  # cells expected under 5 times are pooled into one
    obs = torch.cat([got[big], got[~big].sum().view(1)])
    exp = torch.cat([want[big], want[~big].sum().view(1)])
    assert int(big.sum()) >= 12
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


def test_sampling_is_distributed_as_fixed_k_sampling(monkeypatch):
    """2000 speculative samples (d = 1, n = 2: the 2nd and 3rd tokens pass the acceptance test
    or come from the residual) of the first three new tokens against the exact joint
    probabilities of the model's full forward, at temperature 1 and at 0.8 with top-4:
    chi-square p-values above 0.001. The control, keeping every draft (sampling from pass 0),
    is rejected at 1e-6 with 1000 samples."""
    model = _sampling_model()
    assert _chi_square_p(model, 1.0, 0, 2000) > 1e-3
    assert _chi_square_p(model, 0.8, 4, 2000) > 1e-3
    monkeypatch.setattr(spec, "accept_draft", lambda p, q, token, gen: True)
    assert _chi_square_p(model, 1.0, 0, 1000) < 1e-6


def test_a_sampled_row_in_a_batch_is_the_row_alone():
    """Row i's draws come from its own generator only: batched speculative samples equal each
    prompt sampled alone with the same seed."""
    model = PonderLM(tiny_model_config("gpt_neox"), PonderConfig(steps=2), seed=5).eval()
    seeds = [3, 4, 5, 6]
    both = spec.generate_speculative_batch(
        model, PROMPTS, 10, 1, 3, greedy=False, temperature=0.9,
        generators=[torch.Generator().manual_seed(s) for s in seeds])
    alone = [spec.generate_speculative_batch(
        model, [p], 10, 1, 3, greedy=False, temperature=0.9,
        generators=[torch.Generator().manual_seed(s)])[0] for p, s in zip(PROMPTS, seeds)]
    assert both == alone


def test_refusals_name_what_is_missing():
    plain = PonderLM(tiny_model_config(), PonderConfig(steps=0), seed=1)
    assert "needs a pondering model" in spec.speculative_problem(plain, 1, 2)
    k2 = PonderLM(tiny_model_config(), PonderConfig(steps=2), seed=1)
    assert "d must be in 1..2" in spec.speculative_problem(k2, 3, 2)
    assert "n >= 1" in spec.speculative_problem(k2, 1, 0)
    assert spec.speculative_problem(k2, 2, 4) is None
    thoughts = PonderLM(tiny_model_config(), None, thoughts=ThoughtsConfig(count=1), seed=1)
    assert "first slot cannot draft" in spec.speculative_problem(thoughts, 1, 2)
    adaptive = PonderLM(tiny_model_config(),
                        PonderConfig(steps=2, halting=HaltingConfig(mode="palbert")), seed=1)
    assert "--halt-q 1" in spec.speculative_problem(adaptive, 1, 2, halt_q=0.5)
    assert spec.speculative_problem(adaptive, 1, 2, halt_q=1.0) is None
    with pytest.raises(ValueError, match="expected d:n"):
        spec.parse_speculative("1-3")
    assert spec.parse_speculative("2:5") == (2, 5)


@pytest.mark.parametrize("arch,chunk", [("gpt_neox", 0), ("llama", 0), ("llama", 48)])
def test_draft_loss_against_plain_pondering_on_hf(arch, chunk):
    """Training mode: loss = CE(K passes) + w * CE(pass d-1's logits), the two terms written
    plainly on the HF model (pass d-1's logits are a (d-1)-step forward's); gradients match.
    Eval mode: the final CE alone. Vocabulary-chunked (`model.vocab_chunk`) too."""
    cfg = tiny_model_config(arch, vocab_chunk=chunk)
    hf = random_hf_model(cfg, seed=2)
    ponder = PonderConfig(steps=3, draft_loss=0.5, draft_passes=2)
    model = PonderLM(cfg, ponder)
    load_hf_state_dict(model, hf.state_dict())
    ids, labels, mask = batch(2, 12, seed=4)

    def hf_ce(K):
        logits = ponder_reference(hf.get_input_embeddings().weight,
                                  lambda e: hf(inputs_embeds=e).logits, ids, K)
        return masked_ce(logits, labels, mask)

    model.train()
    loss = model(ids, labels=labels, loss_mask=mask)
    want = hf_ce(3) + 0.5 * hf_ce(1)
    torch.testing.assert_close(loss, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(model.draft_stats, hf_ce(1).detach(), atol=2e-5, rtol=1e-5)
    loss.backward()
    want.backward()
    ours = model.embed.weight.grad
    theirs = hf.get_input_embeddings().weight.grad
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, labels=labels, loss_mask=mask), hf_ce(3),
                                   atol=2e-5, rtol=1e-5)


def test_draft_loss_config_refusals():
    from ponder_pt.config.schema import Config
    from ponder_pt.config.validate import draft_loss_problems

    cfg = Config()
    cfg.ponder.steps, cfg.ponder.draft_loss = 2, 0.3
    assert draft_loss_problems(cfg) == []
    cfg.ponder.draft_passes = 3
    assert "1..ponder.steps" in " ".join(draft_loss_problems(cfg))
    cfg.ponder.draft_passes, cfg.ponder.halting.mode = 1, "palbert"
    assert "already trains every pass" in " ".join(draft_loss_problems(cfg))
    cfg.ponder.halting.mode, cfg.parallel.pp = "off", 2
    assert "pipeline parallelism" in " ".join(draft_loss_problems(cfg))
    cfg.parallel.pp, cfg.ponder.draft_loss = 1, -1.0
    assert ">= 0" in " ".join(draft_loss_problems(cfg))


def test_draft_loss_trains_alike_at_tp2_and_logs_draft_ce(prepared, bpe_dir, tmp_path):
    """`ponder.draft_loss` through the trainer: a TP = 2 run (pass 0's vocab-parallel CE)
    equals the one-process run, step for step, in the loss and in `draft_ce`; the validation
    loss is the final pass's alone, so it differs from the training objective."""
    from train_utils import run_train

    extra = ["ponder.draft_loss=0.5", "ponder.draft_passes=1"]
    rows = {}
    for name, over, nproc in (("one", [], 1), ("tp2", ["parallel.tp=2"], 2)):
        run_dir = tmp_path / name
        run_train(str(run_dir), prepared, bpe_dir, extra + over, nproc=nproc)
        with open(run_dir / "metrics.jsonl") as fh:
            rows[name] = [json.loads(line) for line in fh]
    one = [r for r in rows["one"] if "loss" in r]
    tp2 = [r for r in rows["tp2"] if "loss" in r]
    assert len(one) == len(tp2) == 4
    for a, b in zip(one, tp2):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-4)
        assert a["draft_ce"] == pytest.approx(b["draft_ce"], abs=2e-4)
        assert a["loss"] > a["draft_ce"] * 0.5  # the objective holds the final CE too
    valid = [r["valid_loss"] for r in rows["one"] if "valid_loss" in r]
    assert valid and all(v < one[-1]["loss"] - 0.25 * one[-1]["draft_ce"] for v in valid)


def test_generate_cli_and_api(trained, tmp_path):  # noqa: F811
    """`--speculative d:n` on the K=2 checkpoint: the greedy tokens of ordinary decoding for
    one prompt (`--json` adds the acceptance counts) and for a prompts file decoded as one
    left-padded batch (the counts on stderr); the Python API too; d beyond K and an HF
    export are refused with what to do."""
    from ponder_pt.inference import NativeModel, generate_text
    from ponder_pt.inference.generate import generate_many

    prompts = ["The file is", "Return", "import os and the number of lines in"]
    lm = NativeModel(trained["ponder"])
    one = [generate_text(lm, p, 8, greedy=True) for p in prompts]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = ponder(["generate", "--model", trained["ponder"], "--prompt", prompts[2],
                   "--max-new-tokens", "8", "--greedy", "--json", "--speculative", "1:3"],
                  timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["token_ids"] == one[2]["token_ids"]
    counts = out["speculative"]
    assert counts["verify_steps"] > 0 and 0 <= counts["accepted"] <= counts["drafted"]
    assert counts["tokens_per_verify"] == pytest.approx(
        (len(one[2]["token_ids"]) - 1) / counts["verify_steps"])

    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join(prompts) + "\n")
    proc = ponder(["generate", "--model", trained["ponder"], "--prompts-file", str(txt),
                   "--greedy", "--max-new-tokens", "8", "--speculative", "2:2", "--out",
                   str(tmp_path / "out.jsonl")], timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["token_ids"] for r in rows] == [o["token_ids"] for o in one]
    assert "speculative decoding:" in proc.stderr and "tokens per verify step" in proc.stderr

    lm.set_speculative("1:2")
    assert generate_many(lm, prompts, 8, greedy=True, batch_size=3) == one
    assert lm.speculative_stats.verify_steps > 0
    with pytest.raises(ValueError, match=r"d must be in 1\.\.2"):
        lm.set_speculative("3:1")
    from ponder_pt.inference.model import HFModel

    with pytest.raises(ValueError, match="runs on native checkpoints"):
        HFModel.__new__(HFModel).set_speculative("1:2")  # before any loading: no directory
