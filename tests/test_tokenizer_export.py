"""Exported tokenizers encode exactly like training: id for id, document by document, on the
embedded docstring corpus (newlines, indentation, runs of spaces), loaded back with
AutoTokenizer; user-supplied sentencepiece models are reproduced or refused with a clear message."""

import os

import pytest
from _model_helpers import single_process  # noqa: F401

from ponder_pt.export.to_hf import save_tokenizer
from ponder_pt.export.tokenizer_export import (ALLOW_ENV, CHECK_FILE, PROBE_TEXTS,
                                               TokenizerMismatchError, training_samples)
from ponder_pt.tokenizer import load_tokenizer, text_lines


def _export(tok_path, out, **kw):
    from transformers import AutoTokenizer

    report = save_tokenizer(tok_path, str(out), **kw)
    return report, AutoTokenizer.from_pretrained(str(out))


def _differing(ours, hf, texts):
    return [i for i, t in enumerate(texts) if hf.encode(t, add_special_tokens=False) != ours.encode(t)]


def _train_sp(corpus, out_dir, **settings):
    """A sentencepiece model trained directly with the library (as a user would bring one)."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "user")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text_lines([corpus])),
                                   model_prefix=prefix, vocab_size=600, hard_vocab_limit=False,
                                   minloglevel=2, num_threads=1, **settings)
    return prefix + ".model"


def test_corpus_exercises_whitespace(corpus_texts):
    assert len(corpus_texts) > 200
    assert sum("\n" in t for t in corpus_texts) > 100
    assert sum("\n    " in t for t in corpus_texts) > 20  # indentation
    assert any("  " in line.strip() for t in corpus_texts for line in t.splitlines())


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_export_encodes_every_document_like_training(kind, bpe_dir, sp_dir, corpus_texts, tmp_path):
    tok_dir = bpe_dir if kind == "bpe" else sp_dir
    ours = load_tokenizer(tok_dir)
    report, hf = _export(tok_dir, tmp_path, pause_id=ours.vocab_size)
    assert _differing(ours, hf, corpus_texts) == []
    assert _differing(ours, hf, [t for _, t in PROBE_TEXTS]) == []
    assert report["exact"] and report["matching"] == report["checked"] == len(PROBE_TEXTS)
    assert (tmp_path / CHECK_FILE).exists()
    assert hf.convert_tokens_to_ids("<pause>") == ours.vocab_size
    if kind == "sentencepiece":
        assert (tmp_path / "tokenizer.model").exists() and (tmp_path / "tokenizer.json").exists()
        eos = ours.id_to_token(ours.eod_id)
        assert hf.eos_token_id == ours.eod_id
        assert hf.encode(f"a {eos} b", add_special_tokens=False) == ours.encode(f"a {eos} b")
        for text in corpus_texts[:20]:
            ids = ours.encode(text)
            assert hf.decode(ids) == ours.decode(ids) == text  # lossless both ways


@pytest.mark.parametrize("settings", [
    {},  # the library's defaults: unigram, nmt_nfkc, whitespace collapsed, no byte fallback
    dict(model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
         remove_extra_whitespaces=False),  # ponder-pt's settings before identity normalisation
], ids=["sentencepiece-defaults", "nfkc-bpe"])
def test_user_sentencepiece_model_is_reproduced(settings, corpus, corpus_texts, tmp_path):
    model = _train_sp(corpus, str(tmp_path / "sp"), **settings)
    ours = load_tokenizer(model)
    assert ours.decode(ours.encode(corpus_texts[0])) != corpus_texts[0]  # lossy normalisation
    report, hf = _export(model, tmp_path / "out")
    assert report["exact"]
    assert _differing(ours, hf, corpus_texts) == []
    assert _differing(ours, hf, [t for _, t in PROBE_TEXTS]) == []


def test_unreproducible_model_is_refused_with_the_example(corpus, corpus_texts, tmp_path, monkeypatch):
    # a user-defined symbol matched inside words has no tokenizer.json equivalent here
    model = _train_sp(corpus, str(tmp_path / "sp"), model_type="bpe", byte_fallback=True,
                      user_defined_symbols=["the"])
    samples = [(f"training document {i}", t) for i, t in enumerate(corpus_texts)]
    out = tmp_path / "out"
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(TokenizerMismatchError) as err:
        save_tokenizer(model, str(out), samples=samples)
    msg = str(err.value)
    assert "does not encode like the training tokenizer" in msg and ALLOW_ENV in msg
    assert "First: training document " in msg
    assert "from token" in msg and "export" in msg
    assert sorted(os.listdir(out)) == []  # nothing unchecked left behind

    monkeypatch.setenv(ALLOW_ENV, "1")  # the override: exported, loudly
    with pytest.warns(UserWarning, match="does not encode like"):
        report = save_tokenizer(model, str(out), samples=samples)
    assert not report["exact"] and report["mismatches"][0]["name"].startswith("training document")
    assert (out / "tokenizer.json").exists() and (out / CHECK_FILE).exists()


def test_the_original_llama_export_would_be_refused(corpus, tmp_path, monkeypatch):
    """What the export used to do (transformers' LlamaTokenizer from the .model) is caught."""
    from transformers import LlamaTokenizer

    from ponder_pt.export import tokenizer_export

    model = _train_sp(corpus, str(tmp_path / "sp"), model_type="bpe", byte_fallback=True,
                      remove_extra_whitespaces=False)

    def llama(ours, staging, allow):
        import shutil

        shutil.copy(ours.path, os.path.join(staging, "tokenizer.model"))
        return LlamaTokenizer.from_pretrained(staging, add_bos_token=False, add_eos_token=False)

    monkeypatch.setattr(tokenizer_export, "_hf_from_ours", llama)
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(TokenizerMismatchError, match=r"First: newlines 'First line.\\nSecond"):
        save_tokenizer(model, str(tmp_path / "out"))


def test_training_samples_are_the_prepared_documents(corpus, corpus_texts, sp_dir, tmp_path):
    """decode(what data prepare wrote) is the original text, so the export check on the run's
    own data checks the documents the model was trained on."""
    from ponder_pt.config.schema import Config
    from ponder_pt.data.prepare import prepare

    prefix = str(tmp_path / "data")
    prepare([corpus], sp_dir, prefix, progress=False)
    cfg = Config()
    cfg.data.train = [prefix]
    samples = training_samples(cfg, load_tokenizer(sp_dir), max_docs=50)
    assert [t for _, t in samples] == corpus_texts[:50]
    cfg.data.train = [str(tmp_path / "absent")]
    assert training_samples(cfg, load_tokenizer(sp_dir)) == []


def test_llama_export_through_convert_encodes_like_training(corpus, corpus_texts, sp_dir, tmp_path,
                                                            single_process):  # noqa: F811
    """The issue's path: a LLaMA-shaped model on a sentencepiece tokenizer, exported with
    export_full (what `convert to-hf` runs): the export's tokenizer, as `generate` / `eval` load
    it (HFModel), encodes every corpus document like data prepare did; the check used the run's
    own training documents."""
    import json

    from _model_helpers import tiny_model_config

    from ponder_pt.config.schema import Config
    from ponder_pt.data.prepare import prepare
    from ponder_pt.export import export_full
    from ponder_pt.inference.model import HFModel
    from ponder_pt.models import PonderLM, full_state_dict

    prefix = str(tmp_path / "data")
    prepare([corpus], sp_dir, prefix, progress=False)
    ours = load_tokenizer(sp_dir)
    cfg = Config()
    cfg.model = tiny_model_config("llama", vocab_size=640, max_seq_len=64)
    cfg.ponder.steps, cfg.pause.rate = 0, 0.0
    cfg.data.train, cfg.data.tokenizer = [prefix], sp_dir
    out = str(tmp_path / "hf")
    export_full(cfg, full_state_dict(PonderLM(cfg.model, cfg.ponder, seed=0).eval()), out,
                tokenizer_path=sp_dir, progress=False)
    with open(os.path.join(out, CHECK_FILE)) as fh:
        check = json.load(fh)
    assert check["exact"] and check["checked"] == 200 + len(PROBE_TEXTS)
    lm = HFModel(out)
    assert [i for i, t in enumerate(corpus_texts) if lm.encode(t) != ours.encode(t)] == []
