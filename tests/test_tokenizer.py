"""Tokenizer training and the one loader for both kinds; padded vocab and the <pause> row."""

import pytest

from ponder_pt.cli import main
from ponder_pt.tokenizer import VocabLayout, load_tokenizer, pad_vocab_size


def test_bpe_tokenizer_round_trip(bpe_dir, corpus_texts):
    tok = load_tokenizer(bpe_dir)
    assert tok.kind == "bpe" and tok.vocab_size == 600 and tok.eod_id == 0 and tok.pad_id == 1
    text = corpus_texts[0]
    assert tok.decode(tok.encode(text)) == text  # byte-level BPE is lossless
    assert tok.encode_batch([text, "x"]) == [tok.encode(text), tok.encode("x")]


def test_sentencepiece_tokenizer(sp_dir, corpus_texts):
    tok = load_tokenizer(sp_dir)
    assert tok.kind == "sentencepiece" and tok.eod_id == 2 and tok.vocab_size >= 600
    ids = tok.encode(corpus_texts[1])
    assert ids and max(ids) < tok.vocab_size
    # LLaMA's settings: identity normalisation, whitespace kept, byte fallback -> lossless
    assert all(tok.decode(tok.encode(t)) == t for t in corpus_texts)
    for text in ("a\n\n  b\t c   d", " leading", "ｆｕｌｌ ①", "日本 😀", "x\r\n"):
        assert tok.decode(tok.encode(text)) == text
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    with open(tok.path, "rb") as fh:
        proto.ParseFromString(fh.read())
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    assert norm.name == "identity" and not norm.precompiled_charsmap and norm.add_dummy_prefix
    assert not norm.remove_extra_whitespaces
    assert trainer.byte_fallback and trainer.split_digits and trainer.allow_whitespace_only_pieces
    assert trainer.model_type == pb.TrainerSpec.BPE


def test_describe_padded_vocab_and_pause_row(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    info = tok.describe()
    assert info["padded_vocab_size"] == 640 and info["pause_id"] == 600
    assert tok.describe(tp=2)["padded_vocab_size"] == 768  # multiple of 128 x TP
    assert tok.describe(tp=2)["pause_id"] == 600


def test_pad_rule_matches_megatron_and_pythia():
    assert pad_vocab_size(50277) == 50304  # GPT-NeoX-20B tokenizer -> Pythia's 50304 rows
    assert pad_vocab_size(50277, 128, 2) == 50432
    assert pad_vocab_size(32000, 128, 1) == 32000


def test_pause_reservation_when_no_padding_is_free():
    lay = VocabLayout.build(32000, 128, 1, need_pause=True)
    assert lay.pause_id == 32000 and lay.padded_vocab_size == 32128
    lay = VocabLayout.build(32000, 128, 1, need_pause=False)
    assert lay.pause_id is None and lay.padded_vocab_size == 32000
    lay = VocabLayout.build(500, 128, 1, pause_id=7)  # the tokenizer's own <pause> wins
    assert lay.pause_id == 7 and lay.padded_vocab_size == 512


def test_loader_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_cli_tokenizer_train_both_kinds(corpus, tmp_path, capsys):
    assert main(["tokenizer", "train", "--input", corpus, "--vocab-size", "300", "--type", "bpe",
                 "--out", str(tmp_path / "b")]) == 0
    assert '"vocab_size": 300' in capsys.readouterr().out
    assert main(["tokenizer", "train", "--input", corpus, "--vocab-size", "400",
                 "--type", "sentencepiece", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "tokenizer.model").exists()
    assert main(["tokenizer", "info", str(tmp_path / "s"), "--tp", "4"]) == 0
    assert '"padded_vocab_size": 512' in capsys.readouterr().out
