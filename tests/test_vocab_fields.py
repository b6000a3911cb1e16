"""A run config's vocabulary fields (model.vocab_size, pause.token_id) come from its tokenizer
through one function, `config.fill_vocab`: what it fills and keeps, and that `config show`,
`train`'s resolution and the data sets agree on them."""

from __future__ import annotations

import yaml

from ponder_pt.config import fill_vocab, load_config
from ponder_pt.tokenizer import load_tokenizer


def test_fill_vocab_fills_only_what_is_unset(bpe_dir):
    tok = load_tokenizer(bpe_dir)  # 600 tokens, no <pause> of its own
    assert tok.vocab_size == 600 and tok.own_pause_id is None and tok.pause_row == 600
    cfg = load_config(None, ["pause.rate=0.1", "parallel.tp=2"], validate=False)
    layout = fill_vocab(cfg, tok)
    assert (cfg.model.vocab_size, cfg.pause.token_id) == (768, 600)  # a multiple of 128 x 2
    assert layout.padded_vocab_size == 768
    cfg.model.vocab_size, cfg.pause.token_id = 1024, 700  # set explicitly: kept
    fill_vocab(cfg, tok)
    assert (cfg.model.vocab_size, cfg.pause.token_id) == (1024, 700)
    off = load_config(None, [], validate=False)  # no pauses: no pause id
    fill_vocab(off, tok)
    assert (off.model.vocab_size, off.pause.token_id) == (640, None)


def test_config_show_train_and_the_data_sets_agree(bpe_dir, prepared, capsys):
    from ponder_pt.cli import main
    from ponder_pt.data.samples import datasets_for_config
    from ponder_pt.train import resolve

    sets = ["pause.rate=0.1", f"data.tokenizer={bpe_dir}", f"data.train=[{prepared}]",
            "data.seq_len=32"]
    assert main(["config", "show", "--config", "tiny", *[a for s in sets
                                                          for a in ("--set", s)]]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    cfg, tok = resolve("tiny", sets, 1)
    assert (shown["model"]["vocab_size"], shown["pause"]["token_id"]) == (
        cfg.model.vocab_size, cfg.pause.token_id) == (640, tok.pause_row)
    raw = load_config("tiny", sets, validate=False)  # not resolved: the data sets fill it
    train, _, _ = datasets_for_config(raw, tok, (4, 0, 0))
    assert train.pause_id == cfg.pause.token_id and raw.model.vocab_size == 640
