"""The looped baseline (`ponder.feedback="hidden"`, PonderingLM's ablation) against an
independent re-implementation of its formula on stock HF models, the pipeline chain, the HF
export, and the config key's validation (TP=2 (+SP) = TP=1: tests/test_model_tp.py).

e_0 = W_in[x] * s; for k = 1..K: h_k = final-norm hidden of a full pass on e_{k-1};
e_k = e_{k-1} + h_k; logits = head(final pass on e_K).
"""

from __future__ import annotations

import math

import pytest
import torch
from _model_helpers import (batch, masked_ce, random_hf_model, single_process,  # noqa: F401
                            tiny_model_config)

from ponder_pt.config.schema import PonderConfig


def looped_reference(hf, ids, K, *, scale_embeds=True):
    """The looped formula written plainly on an HF model: final-pass logits [b, s, V]."""
    w_in = hf.get_input_embeddings().weight
    backbone = getattr(hf, hf.base_model_prefix)
    s = math.sqrt(w_in.shape[1]) if scale_embeds else 1.0
    e = w_in[ids] * (s if K > 0 else 1.0)
    for _ in range(K):
        # last_hidden_state is after the final norm (GPT-NeoX final_layer_norm, LLaMA norm)
        e = e + backbone(inputs_embeds=e).last_hidden_state
    return hf.get_output_embeddings()(backbone(inputs_embeds=e).last_hidden_state)


def _models(arch, ponder, seed=0, **over):
    from ponder_pt.models import PonderLM, load_hf_state_dict

    cfg = tiny_model_config(arch, **over)
    hf = random_hf_model(cfg, seed=seed)
    model = PonderLM(cfg, ponder)
    load_hf_state_dict(model, hf.state_dict())
    return hf, model


@pytest.mark.usefixtures("single_process")
@pytest.mark.parametrize("arch,K,scale_embeds", [("gpt_neox", 1, True), ("gpt_neox", 3, True),
                                                 ("gpt_neox", 2, False), ("llama", 2, True)])
def test_looped_matches_reference(arch, K, scale_embeds):
    ponder = PonderConfig(steps=K, scale_embeds=scale_embeds, feedback="hidden")
    hf, model = _models(arch, ponder)
    ids, labels, mask = batch(b=2, s=12, seed=K)
    ref = masked_ce(looped_reference(hf, ids, K, scale_embeds=scale_embeds), labels, mask)
    ours = model(ids, labels=labels, loss_mask=mask)
    assert abs(ours.item() - ref.item()) <= 1e-5
    ref.backward()
    ours.backward()
    ours_p, hf_p = dict(model.named_parameters()), dict(hf.named_parameters())
    if arch == "gpt_neox":
        embed, norm = "gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm.weight"
    else:
        embed, norm = "model.embed_tokens.weight", "model.norm.weight"
    pairs = {"embed.weight": embed, "output.weight": "lm_head.weight", "final_norm.weight": norm}
    for mine, theirs in pairs.items():
        a, b = ours_p[mine].grad, hf_p[theirs].grad
        assert a.abs().max() > 0, mine
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), mine


@pytest.mark.usefixtures("single_process")
def test_looped_differs_from_pondering_and_decodes_incrementally():
    """Same weights: looped != pondering logits; K+1 KV caches reproduce the full forward."""
    from ponder_pt.models import PonderLM

    cfg = tiny_model_config()
    looped = PonderLM(cfg, PonderConfig(steps=2, feedback="hidden"), seed=4).eval()
    pondering = PonderLM(cfg, PonderConfig(steps=2), seed=4).eval()
    ids, _, _ = batch(b=1, s=10, seed=3)
    with torch.no_grad():
        full = looped(ids)
        assert (full - pondering(ids)).abs().max().item() > 1e-3
        caches = looped.new_caches()
        steps = [looped(ids[:, :4], caches=caches)]
        steps += [looped(ids[:, t:t + 1], caches=caches) for t in range(4, ids.shape[1])]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_flops_of_looped_passes():
    """The looped passes skip the output head and p.W_in: fewer FLOPs than pondering, more
    than plain, and exactly (K+1) x the blocks + one head."""
    from ponder_pt.engine.flops import flops_per_token

    m, V, s = tiny_model_config(), 1024, 64
    plain = flops_per_token(m, V, s, 0)
    head = 3 * 2 * m.hidden_size * V
    for K in (1, 3):
        looped = flops_per_token(m, V, s, K, "hidden")
        assert looped == pytest.approx((K + 1) * (plain - head) + head)
        assert plain < looped < flops_per_token(m, V, s, K)


def test_config_rejects_unknown_feedback():
    from ponder_pt.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="ponder.feedback: 'looped' is not one of"):
        load_config("pythia-14m", ["ponder.steps=2", "ponder.feedback=looped"])
    with pytest.raises(ConfigError, match="ponder.top_k=5 has no effect"):
        load_config("pythia-14m", ["ponder.steps=2", "ponder.feedback=hidden", "ponder.top_k=5"])
    cfg = load_config("pythia-14m", ["ponder.steps=2", "ponder.feedback=hidden"])
    assert cfg.ponder.feedback == "hidden"


@pytest.mark.hf_compat  # CI runs it again at the oldest declared transformers
def test_looped_export_matches_native(bpe_dir, tmp_path):
    """The exported remote-code class (ponder_feedback="hidden") matches native logits, its
    KV-cached generate() equals a cache-free loop, and from-hf reads the field back."""
    from _export_helpers import stock_check

    from ponder_pt.config import Config
    from ponder_pt.weights.hf_config import read_hf_config
    from ponder_pt.export.to_hf import export_full
    from ponder_pt.models import PonderLM, full_state_dict, init_single_process

    init_single_process()
    ids = [5, 17, 300, 42, 599, 7, 8, 120, 64, 3]
    cfg = Config()
    cfg.model = tiny_model_config("gpt_neox", vocab_size=640, max_seq_len=128)
    cfg.ponder.steps, cfg.ponder.feedback = 2, "hidden"
    model = PonderLM(cfg.model, cfg.ponder, seed=2).eval()
    out = str(tmp_path / "looped")
    export_full(cfg, full_state_dict(model), out, tokenizer_path=bpe_dir, progress=False)
    assert read_hf_config(out)[1]["ponder_feedback"] == "hidden"
    with torch.no_grad():
        native = model(torch.tensor([ids]), gather_logits=True)[0]
    (res,) = stock_check([{"path": out, "rows": [ids, ids[:4]], "n_new": 6}])
    assert (torch.tensor(res["logits"]) - native).abs().max().item() <= 1e-5
    assert res["cached"] == res["nocache"]


# TP=2 vs TP=1 (with and without sequence parallelism): the looped cases are in
# _model_helpers.TP_CASES, checked by tests/test_model_tp.py.


def test_pp2_looped_training_matches_single_process(prepared, bpe_dir, tmp_path):
    """The unrolled pipeline chain's hidden feedback: PP=2 reproduces a 1-process run."""
    from train_utils import metrics, run_train

    extra = ["ponder.feedback=hidden"]
    run_train(str(tmp_path / "ref"), prepared, bpe_dir, extra)
    run_train(str(tmp_path / "pp2"), prepared, bpe_dir, [*extra, "parallel.pp=2"], nproc=2)
    (ref_train, ref_valid), (train, valid) = metrics(str(tmp_path / "ref")), metrics(
        str(tmp_path / "pp2"))
    assert sorted(train) == sorted(ref_train) == [1, 2, 3, 4]
    for step, loss in ref_train.items():
        assert train[step] == pytest.approx(loss, rel=2e-5), (step, train, ref_train)
    assert valid[4] == pytest.approx(ref_valid[4], rel=2e-5)
    # and it is not the pondering model: a K=2 embedding-feedback run differs
    run_train(str(tmp_path / "emb"), prepared, bpe_dir)
    assert metrics(str(tmp_path / "emb"))[0][4] != pytest.approx(ref_train[4], rel=1e-4)
