"""Our GPT-NeoX / LLaMA forward vs transformers' reference models, HF weights in and out."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import (batch, masked_ce, random_hf_model, single_process,  # noqa: F401
                            tiny_model_config)

from ponder_pt.config.schema import ModelConfig, PonderConfig
from ponder_pt.models import PonderLM, hf_config_from, load_hf_state_dict, to_hf_state_dict
from ponder_pt.models.parallel import small_init_std, wang_init_std
from ponder_pt.weights.hf_config import model_config_from_hf

# hf_compat: CI runs these again at the oldest declared transformers
pytestmark = [pytest.mark.usefixtures("single_process"), pytest.mark.hf_compat]

CASES = {
    "neox_parallel_rot025": ("gpt_neox", {}),
    "neox_sequential": ("gpt_neox", {"parallel_residual": False}),
    "neox_full_rotary_tied": ("gpt_neox", {"rotary_pct": 1.0, "tie_embeddings": True}),
    "llama_gqa": ("llama", {}),
    "llama_mha_tied": ("llama", {"num_kv_heads": None, "tie_embeddings": True}),
}


def _pair(name, seed=0):
    arch, over = CASES[name]
    cfg = tiny_model_config(arch, **over)
    hf = random_hf_model(cfg, seed=seed)
    model = PonderLM(cfg).eval()
    load_hf_state_dict(model, hf.state_dict())
    return cfg, hf, model


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_loss_match_hf(name):
    cfg, hf, model = _pair(name)
    ids, labels, mask = batch(b=2, s=24, seed=1)
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids)
        loss = model(ids, labels=labels, loss_mask=mask)
    assert ours.shape == ref.shape == (2, 24, cfg.vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert abs(loss.item() - masked_ce(ref, labels, mask).item()) <= 1e-5


def test_negative_labels_are_ignored_like_hf():
    _, hf, model = _pair("llama_gqa")
    ids, labels, _ = batch(b=2, s=12, seed=8)
    labels[:, :4] = -100
    with torch.no_grad():
        ref = hf(ids).logits
        loss = model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(ref.reshape(-1, ref.shape[-1]),
                                                 labels.reshape(-1), ignore_index=-100)
    assert abs(loss.item() - expected.item()) <= 1e-5


def test_inputs_embeds_and_position_ids_match_hf():
    cfg, hf, model = _pair("neox_parallel_rot025")
    ids, _, _ = batch(b=1, s=16, seed=4)
    pos = torch.arange(5, 21).unsqueeze(0)
    with torch.no_grad():
        emb = hf.get_input_embeddings()(ids)
        ref = hf(inputs_embeds=emb, position_ids=pos).logits
        ours = model(inputs_embeds=emb, position_ids=pos)
        by_ids = model(ids, position_ids=pos)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert torch.equal(ours, by_ids)


@pytest.mark.parametrize("name", ["neox_parallel_rot025", "llama_gqa", "llama_mha_tied"])
def test_hf_state_dict_roundtrip_tp1(name):
    cfg, hf, model = _pair(name, seed=5)
    sd = hf.state_dict()
    back = to_hf_state_dict(model)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value), key
    # and the exported dict loads into a fresh HF model strictly
    fresh = random_hf_model(cfg, seed=9)
    fresh.load_state_dict(back, strict=True)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_hf_vocab_padded_for_tp_and_trimmed_on_export(arch):
    """HF vocab 100 into a 128-row (TP-padded) model: zero rows appended, dropped on export."""
    from dataclasses import replace

    small = tiny_model_config(arch, vocab_size=100)
    hf = random_hf_model(small, seed=6)
    cfg = replace(small, vocab_size=128)
    model = PonderLM(cfg).eval()
    load_hf_state_dict(model, hf.state_dict())
    assert torch.equal(model.embed.weight[100:], torch.zeros(28, cfg.hidden_size))
    ids, _, _ = batch(b=1, s=10, seed=3, vocab=100)
    with torch.no_grad():
        assert (model(ids)[..., :100] - hf(ids).logits).abs().max().item() <= 1e-5
    back = to_hf_state_dict(model, vocab_size=100)
    assert hf_config_from(cfg, vocab_size=100).vocab_size == 100
    for key, value in hf.state_dict().items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("name", list(CASES))
def test_config_roundtrip(name):
    arch, over = CASES[name]
    cfg = tiny_model_config(arch, **over)
    again = model_config_from_hf(hf_config_from(cfg), ModelConfig())
    for field in ("arch", "num_layers", "hidden_size", "num_heads", "kv_heads", "ffn_size",
                  "rotary_pct", "rotary_base", "parallel_residual", "tie_embeddings",
                  "norm_eps", "vocab_size", "max_seq_len"):
        assert getattr(again, field) == getattr(cfg, field), field


def test_init_is_seeded_and_pythia_like():
    cfg = tiny_model_config("gpt_neox", num_layers=2, hidden_size=64, ffn_hidden_size=256)
    a, b = PonderLM(cfg, seed=11), PonderLM(cfg, seed=11)
    c = PonderLM(cfg, seed=12)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), name
    small, wang = small_init_std(64), wang_init_std(64, 2)
    std = {n: p.std().item() for n, p in a.named_parameters() if p.dim() == 2}
    for name in ("embed.weight", "output.weight", "layers.0.attn.qkv.weight",
                 "layers.1.mlp.fc1.weight"):
        assert abs(std[name] - small) < 0.1 * small, name
    for name in ("layers.0.attn.dense.weight", "layers.1.mlp.fc2.weight"):
        assert abs(std[name] - wang) < 0.1 * wang, name
    assert torch.equal(a.layers[0].attn.qkv.bias, torch.zeros_like(a.layers[0].attn.qkv.bias))
    assert torch.equal(a.final_norm.weight, torch.ones(64))


def test_init_method_std_overrides_small_and_wang_init():
    cfg = tiny_model_config("llama", num_layers=2, init_method_std=0.02)
    model = PonderLM(cfg, seed=1)
    assert abs(model.layers[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(model.layers[1].mlp.fc2.weight.std().item() - 0.01) < 0.001  # 0.02/sqrt(2L)


def test_plain_model_ignores_ponder_scaling():
    """K=0 is the plain model: scale_embeds has no effect without pondering."""
    cfg, hf, model = _pair("neox_parallel_rot025")
    model.ponder_cfg = PonderConfig(steps=0, scale_embeds=True, scale_initial_by_steps=True)
    ids, _, _ = batch(b=1, s=8, seed=3)
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-5
