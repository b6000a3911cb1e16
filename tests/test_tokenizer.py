"""Tokenizer training and the one loader for both kinds; padded vocab and the <pause> row."""

import hashlib
import json
import os

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


def test_identity_is_the_vocabulary_not_the_file(bpe_dir, sp_dir, tmp_path):
    """A re-saved tokenizer.json (other formatting, same tokens) keeps its vocabulary hash;
    a tokenizer whose ids mean other tokens does not."""
    tok = load_tokenizer(bpe_dir)
    with open(tok.path) as fh:
        data = json.load(fh)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data, indent=1))
    copy = load_tokenizer(str(tmp_path))
    ident, ident_copy = tok.identity(), copy.identity()
    assert ident["vocab_sha256"] == ident_copy["vocab_sha256"]
    assert ident["files_sha256"] != ident_copy["files_sha256"]
    with open(tok.path, "rb") as fh:
        assert ident["files_sha256"] == {"tokenizer.json": hashlib.sha256(fh.read()).hexdigest()}
    assert ident["vocab_size"] == tok.vocab_size and ident["path"] == os.path.abspath(tok.path)
    sp = load_tokenizer(sp_dir).identity()
    assert sp["vocab_size"] == ident["vocab_size"] and sp["vocab_sha256"] != ident["vocab_sha256"]
    # two ids swapped: the same tokens, other ids, another vocabulary
    vocab = data["model"]["vocab"]
    a, b = (next(k for k, v in vocab.items() if v == i) for i in (300, 301))
    vocab[a], vocab[b] = 301, 300
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert load_tokenizer(str(tmp_path)).identity()["vocab_sha256"] != ident["vocab_sha256"]


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


def test_sentencepiece_learns_from_long_documents(tmp_path, capsys):
    """Whole-document jsonl lines longer than sentencepiece's 4192-byte sentence limit are cut
    at line ends / spaces instead of being dropped by its trainer: a word that appears only in
    long documents still becomes one piece. Unusable lines are reported with file:line."""
    import json

    from ponder_pt.tokenizer import sentence_chunks, train_tokenizer

    filler = " ".join(f"w{i % 50}" for i in range(1200))  # ~6 KB, one line
    docs = [f"{filler}\nzyxquvat zyxquvat zyxquvat {filler}\nend" for _ in range(40)]
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
        fh.write("{not json\n")
        fh.write(json.dumps({"body": "x"}) + "\n")
    chunks = list(sentence_chunks(docs[:1], 4192))
    assert "".join(chunks) == docs[0] and max(len(c.encode()) for c in chunks) <= 4192
    model = train_tokenizer([str(path)], 300, str(tmp_path / "sp"), kind="sentencepiece")
    err = capsys.readouterr().err
    assert "skipped 2 unusable line(s)" in err and "docs.jsonl:41: not JSON" in err
    assert "docs.jsonl:42: no string 'text' field" in err
    tok = load_tokenizer(model)
    assert len(tok.encode(" zyxquvat")) <= 2  # learned; unseen it would be ~8 byte/char pieces
    assert tok.decode(tok.encode(docs[0])) == docs[0]


def test_sentence_chunks_cut_long_lines_at_spaces_and_inside_words():
    from ponder_pt.tokenizer import sentence_chunks

    text = "é" * 3000 + " " + "ab " * 2000
    chunks = list(sentence_chunks([text], 1000))
    assert "".join(chunks) == text
    assert all(len(c.encode()) <= 1000 for c in chunks)
