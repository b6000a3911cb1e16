"""ponder_pt.early_exit.backbones: layer-by-layer HF backbones match the models' own forward,
are padding-invariant, select() drops rows exactly, pondering exports run their K passes in
start(), and load_backbone reads saved directories (and refuses unsupported types clearly)."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

from ponder_pt.early_exit.backbones import (LayerwiseBackbone, LayerState, load_backbone,
                                            wrap_backbone)
from ponder_pt.early_exit.toy import word_tokenizer

sys.path.insert(0, os.path.dirname(__file__))
from _ee_helpers import pondering_export  # noqa: E402

# hf_compat: CI runs these again at the oldest declared transformers
pytestmark = pytest.mark.hf_compat

VOCAB = 100
LENGTHS = [9, 5, 7, 3]  # padded batch of mixed lengths, right padding
TOL = 1e-5
ARCHS = ["albert", "bert", "roberta", "gpt_neox", "llama", "gpt2"]
DECODER_ARCHS = ("gpt_neox", "llama", "gpt2")


def _randomise(model, seed):
    """Weights far from init (norms around 1) so every layer visibly changes the states."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = ("norm" in name.lower() or ".ln_" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm else 0.1 * noise)
    return model.eval()


def build(arch: str, attn: str = "sdpa", seed: int = 0, cls=None):
    """A tiny random HF model of `arch` (base model for encoders, *ForCausalLM for decoders)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
    if arch == "albert":
        cfg = tf.AlbertConfig(**common, embedding_size=16, num_hidden_layers=4,
                              num_hidden_groups=2, pad_token_id=0)  # groups: layers 0,1 | 2,3
    elif arch == "bert":
        cfg = tf.BertConfig(**common, num_hidden_layers=3, pad_token_id=0)
    elif arch == "roberta":
        common["max_position_embeddings"] = 66
        cfg = tf.RobertaConfig(**common, num_hidden_layers=3, pad_token_id=1)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_head=4, n_inner=64, n_positions=64,
                            n_layer=3, pad_token_id=0)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(**common, num_hidden_layers=3, pad_token_id=0,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.25})
    else:
        cfg = tf.LlamaConfig(**common, num_hidden_layers=3, num_key_value_heads=2,
                             pad_token_id=0)
    cfg._attn_implementation = attn
    if cls is None:
        cls = {"albert": tf.AlbertModel, "bert": tf.BertModel, "roberta": tf.RobertaModel,
               "gpt_neox": tf.GPTNeoXForCausalLM, "llama": tf.LlamaForCausalLM,
               "gpt2": tf.GPT2LMHeadModel}[arch]
    torch.manual_seed(seed)
    return _randomise(cls(cfg), seed)


def padded_batch(pad_id: int, lengths=LENGTHS, seed: int = 1, left: bool = False):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        ids[b, cols] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[b, cols] = 1
    return ids, mask


def _pad(model):
    return model.config.pad_token_id


def _close(a, b, tol=TOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs().max().item()
    assert diff <= tol, diff


def reference_pooled(model, arch, ids, mask):
    """Per-layer pooled vectors from HF's own forward(output_hidden_states=True)."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hs = out.hidden_states
    if arch in ("albert", "bert", "roberta"):
        if arch == "albert":
            pool = lambda h: model.pooler_activation(model.pooler(h[:, 0]))  # noqa: E731
        else:
            pool = model.pooler
        ref = [pool(h) for h in hs[1:]]
        _close(ref[-1], out.pooler_output, 0)
        return ref
    base = model.base_model
    norm = {"gpt_neox": "final_layer_norm", "gpt2": "ln_f"}.get(arch, "norm")
    norm = getattr(base, norm)
    rows, last = torch.arange(ids.shape[0]), mask.sum(-1) - 1
    n = len(hs) - 1
    # HF's last hidden state is already normed: the logits are lm_head of it
    _close(model.get_output_embeddings()(hs[n]), out.logits, 1e-6)
    return [norm(h[rows, last]) for h in hs[1:n]] + [hs[n][rows, last]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_layerwise_matches_hf_forward(arch, attn):
    model = build(arch, attn)
    bb = wrap_backbone(model)
    assert bb.kind == arch and bb.is_decoder == (arch in DECODER_ARCHS)
    assert bb.num_layers == model.config.num_hidden_layers and bb.hidden_size == 32
    assert not bb.training and not bb.ponder
    ids, mask = padded_batch(_pad(model))
    with torch.no_grad():
        got = bb(ids, mask)
        ref = reference_pooled(model, arch, ids, mask)
    assert len(got) == bb.num_layers == len(ref)
    for g, r in zip(got, ref):
        _close(g, r)
    # layers really differ (so a wrong layer index would be caught)
    assert (got[0] - got[-1]).abs().max().item() > 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_padding_invariance(arch, attn):
    model = build(arch, attn, seed=2)
    bb = wrap_backbone(model)
    ids, mask = padded_batch(_pad(model), seed=3)
    with torch.no_grad():
        batch = bb(ids, mask)
        for b, n in enumerate(LENGTHS):
            alone = bb(ids[b:b + 1, :n], mask[b:b + 1, :n])
            for i in range(bb.num_layers):
                _close(alone[i][0], batch[i][b])
        if bb.is_decoder:  # left padding (positions count real tokens) gives the same
            lids, lmask = padded_batch(_pad(model), seed=3, left=True)
            assert not torch.equal(lids, ids)
            for g, r in zip(bb(lids, lmask), batch):
                _close(g, r)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_select_drops_rows_exactly(arch, attn):
    model = build(arch, attn, seed=4)
    bb = wrap_backbone(model)
    ids, mask = padded_batch(_pad(model), seed=5)
    j = 1  # layers 0..j on the full batch, then continue on rows 3 and 1 (lengths 3, 5)
    with torch.no_grad():
        state = bb.start(ids, mask)
        for i in range(j + 1):
            state = bb.layer(i, state)
        for index in (torch.tensor([3, 1]), torch.tensor([False, True, False, True])):
            sub = LayerwiseBackbone.select(state, index)
            assert isinstance(sub, LayerState)
            assert sub.hidden.shape[:2] == (2, 5) and sub.attention_mask.shape == (2, 5)
            rows = index if index.dtype == torch.long else index.nonzero().squeeze(1)
            alone = bb(ids[rows, :5], mask[rows, :5])
            got = [bb.pooled(sub)]
            for i in range(j + 1, bb.num_layers):
                sub = bb.layer(i, sub)
                got.append(bb.pooled(sub))
            for g, r in zip(got, alone[j:]):
                _close(g, r)
        # selecting every row keeps the full width and the same result
        full = bb.select(state, torch.arange(4))
        assert full.hidden.shape == state.hidden.shape
        _close(bb.pooled(full), bb.pooled(state), 0)


def test_wrap_heads_and_missing_pooler():
    """*ForMaskedLM / *ForSequenceClassification wrap to their base model; a model built
    without a pooler gets a fresh one (warned) and still runs."""
    import transformers as tf

    with pytest.warns(UserWarning, match="no pooler"):
        bb = wrap_backbone(build("roberta", cls=tf.RobertaForMaskedLM))
    assert type(bb.model).__name__ == "RobertaModel" and bb.base.pooler is not None
    with pytest.warns(UserWarning, match="no pooler"):
        bb = wrap_backbone(build("albert", cls=tf.AlbertForMaskedLM))
    ids, mask = padded_batch(0)
    with torch.no_grad():
        assert [t.shape for t in bb(ids, mask)] == [(4, 32)] * 4
    clf = build("bert", cls=tf.BertForSequenceClassification)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # has a pooler: no warning
        bb = wrap_backbone(clf)
    with torch.no_grad():
        _close(bb(ids, mask)[-1], clf.bert(ids, attention_mask=mask).pooler_output, 0)


def test_unsupported_types_raise_clear_error(tmp_path):
    import transformers as tf

    tiny = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                ffn_dim=32, word_embed_proj_dim=16)
    with pytest.raises(ValueError, match=r"'opt' is not supported.*albert, bert, roberta"):
        wrap_backbone(tf.OPTModel(tf.OPTConfig(**tiny)))
    tf.T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                d_kv=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'t5' is not supported.*gpt_neox, llama"):
        load_backbone(str(tmp_path))


def test_load_backbone_encoder_dirs(tmp_path):
    import transformers as tf

    texts = ["w1 w2 w3 w4 w5 w6", "w7 w8", "w9 w10 w11 w12"]
    for arch, cls in (("bert", tf.BertModel), ("roberta", tf.RobertaForMaskedLM)):
        out = str(tmp_path / arch)
        build(arch, cls=cls).save_pretrained(out)
        word_tokenizer([f"w{i}" for i in range(40)]).save_pretrained(out)
        if arch == "roberta":  # no pooler weights in a masked-LM checkpoint
            with pytest.warns(UserWarning, match="pooler"):
                bb, tok = load_backbone(out)
        else:
            bb, tok = load_backbone(out)
        assert bb.kind == arch and bb.config._attn_implementation == "sdpa"
        enc = tok(texts, padding=True, return_tensors="pt")
        assert tok.padding_side == "right" and enc["input_ids"][0, 0].item() == 2
        with torch.no_grad():
            got = bb(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
            ref = bb.model(**enc).pooler_output
        _close(got[-1], ref)
        # save_pretrained keeps the pooler (also a fresh one): reloading gives the same
        bb.save_pretrained(out)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            again, _ = load_backbone(out)
        with torch.no_grad():
            _close(again(enc["input_ids"], enc["attention_mask"])[-1], got[-1], 0)


# --------------------------------------------------------------------------- pondering exports


@pytest.fixture(scope="module")
def exports(bpe_dir, tmp_path_factory):
    """ponder-pt HF exports (with tokenizer) of tiny random models: name -> directory."""
    specs = {"neox_k2": ("gpt_neox", dict(steps=2)),
             "llama_k2_top5": ("llama", dict(steps=2, top_k=5)),
             "neox_k0": ("gpt_neox", dict(steps=0)),
             "llama_k2_hidden": ("llama", dict(steps=2, feedback="hidden")),
             "gpt2_k2": ("gpt2", dict(steps=2)), "gpt2_k0": ("gpt2", dict(steps=0))}
    root = tmp_path_factory.mktemp("ee_exports")
    return {name: pondering_export(str(root / name), bpe_dir, arch=arch, seed=seed + 1, **ponder)
            for seed, (name, (arch, ponder)) in enumerate(specs.items())}


TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world",
         "def main(): return 0  # a line of code"]


@pytest.mark.parametrize("name", ["neox_k2", "llama_k2_top5", "llama_k2_hidden", "neox_k0",
                                  "gpt2_k2", "gpt2_k0"])
def test_pondering_export_last_layer_gives_forward_logits(exports, name):
    """start() runs the K pondering passes: lm_head(pooled after the last layer) equals the
    exported model's forward logits at the last real token of a right-padded batch."""
    bb, tok = load_backbone(exports[name], dtype=torch.float32)
    k = int(name.split("_k")[1][0])
    assert bb.is_decoder and bb.ponder_steps == k and bb.ponder == (k > 0)
    assert type(bb.model).__name__.startswith("Ponder") == (k > 0)
    assert tok.pad_token is not None and tok.padding_side == "right"
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask == 0).any()  # really padded
    rows, last = torch.arange(len(TEXTS)), mask.sum(-1) - 1
    with torch.no_grad():
        pooled = bb(ids, mask)
        ref = bb.model(ids, attention_mask=mask, use_cache=False).logits[rows, last]
        _close(bb.lm_head(pooled[-1]), ref)
        for b in range(len(TEXTS)):  # each row alone, no padding
            n = int(mask[b].sum())
            alone = bb.model(ids[b:b + 1, :n], use_cache=False).logits[0, -1]
            _close(bb.lm_head(pooled[-1][b]), alone)
        if k == 0:  # a plain export behaves as the stock decoder, layer by layer
            arch = "gpt_neox" if "neox" in name else "gpt2" if "gpt2" in name else "llama"
            for g, r in zip(pooled, reference_pooled(bb.model, arch, ids, mask)):
                _close(g, r)
        else:  # the pondering passes matter: a stock run of the same weights differs
            base = bb.base(input_ids=ids, attention_mask=mask, use_cache=False)
            stock = bb.lm_head(base.last_hidden_state[rows, last])
            assert (stock - ref).abs().max().item() > 1e-3
