"""Corrupt or mismatched PREFIX.bin/.idx is refused at startup (train, data inspect) and by
`ponder-pt data verify`, with the file, the expected size and the found size."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from ponder_pt.cli import main as cli
from ponder_pt.data.prepare import DataError
from ponder_pt.data.verify import check_data, verify_prefix

DOCS = [[5, 6, 7, 0], [8, 9, 0], [10, 11, 12, 13, 0], [300, 301, 0]]


def _build(prefix: str, dtype=np.uint16) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in DOCS:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def _copy(src: str, dst: str) -> str:
    for ext in (".bin", ".idx"):
        shutil.copy(src + ext, dst + ext)
    return dst


@pytest.fixture()
def good(tmp_path):
    return _build(str(tmp_path / "good"))


def test_sound_prefix_passes_and_reports_counts(good):
    rep = verify_prefix(good, vocab_size=512, full=True)
    assert rep.ok, rep.problems
    assert (rep.documents, rep.tokens, rep.dtype) == (4, 15, "uint16")
    assert rep.bin_bytes == 30 and rep.max_token == 301


def test_truncated_and_padded_bin_name_file_expected_and_found(good, tmp_path):
    cut = _copy(good, str(tmp_path / "cut"))
    with open(cut + ".bin", "r+b") as fh:
        fh.truncate(20)
    rep = verify_prefix(cut, 512)
    assert len(rep.problems) == 1
    msg = rep.problems[0]
    assert f"{cut}.bin: 20 bytes, expected 30" in msg and "truncated" in msg
    longer = _copy(good, str(tmp_path / "longer"))
    with open(longer + ".bin", "ab") as fh:
        fh.write(b"\0" * 8)
    assert "38 bytes, expected 30" in verify_prefix(longer).problems[0]


def test_mangled_or_truncated_index(good, tmp_path):
    header = _copy(good, str(tmp_path / "header"))
    with open(header + ".idx", "r+b") as fh:
        fh.write(b"NOTANIDX")
    msg = verify_prefix(header).problems[0]
    assert f"{header}.idx: not a readable megatron-core index" in msg and "bad header" in msg
    version = _copy(good, str(tmp_path / "version"))
    with open(version + ".idx", "r+b") as fh:
        fh.seek(9)
        fh.write(struct.pack("<Q", 7))
    assert "bad version" in verify_prefix(version).problems[0]
    short = _copy(good, str(tmp_path / "short"))
    with open(short + ".idx", "r+b") as fh:
        fh.truncate(40)
    assert "probably truncated" in verify_prefix(short).problems[0]
    missing = str(tmp_path / "nothing")
    assert "no such file" in verify_prefix(missing).problems[0]


def test_dtype_and_full_scan_against_the_vocabulary(good):
    rep = verify_prefix(good, vocab_size=70000)
    assert len(rep.problems) == 1 and "uint16 (ids up to 65535)" in rep.problems[0]
    assert verify_prefix(good, vocab_size=256).ok  # the cheap checks do not read tokens
    rep = verify_prefix(good, vocab_size=256, full=True)
    assert "token 300 at position 12 is outside the vocabulary [0, 256)" in rep.problems[0]
    with pytest.raises(DataError, match="token 300"):
        check_data([good], 256, full=True)


def test_data_verify_and_inspect_commands(good, tmp_path, capsys):
    assert cli(["data", "verify", good, "--full", "--vocab-size", "512"]) == 0
    assert capsys.readouterr().out.startswith(f"ok {good}: 4 documents, 15 uint16 tokens")
    cut = _copy(good, str(tmp_path / "cut"))
    with open(cut + ".bin", "r+b") as fh:
        fh.truncate(10)
    assert cli(["data", "verify", good, cut, "--json"]) == 1
    docs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [d["ok"] for d in docs] == [True, False] and "expected 30" in docs[1]["problems"][0]
    # data inspect refuses before reading any sample
    assert cli(["data", "inspect", "--data", cut, "--seq-len", "4", "--json"]) == 2
    err = capsys.readouterr().err
    assert f"{cut}.bin: 10 bytes, expected 30" in err and "Traceback" not in err


def test_train_refuses_corrupt_data_before_any_process(prepared, bpe_dir, tmp_path):
    from train_utils import run_train

    cut = _copy(prepared, str(tmp_path / "cut"))
    size = os.path.getsize(cut + ".bin")
    with open(cut + ".bin", "r+b") as fh:
        fh.truncate(size // 2)
    proc = run_train(str(tmp_path / "run"), cut, bpe_dir, nproc=2, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{cut}.bin: {size // 2:,} bytes, expected {size:,}" in proc.stderr
    assert "torch.distributed" not in proc.stderr and "Traceback" not in proc.stderr




def test_unrecorded_data_is_scanned_within_one_budget_against_the_model_rows(good, tmp_path,
                                                                             capsys):
    """Data without a tokenizer record (built here with megatron-core's own builder, as other
    tools do): scanned for its largest id while the shared budget lasts, the rest named in one
    note with the command that checks them."""
    other = _copy(good, str(tmp_path / "other"))
    with pytest.raises(DataError) as err:
        check_data([("data.train", good), ("data.valid", other)], model_vocab=256,
                   scan_limit=os.path.getsize(good + ".bin"))
    msg = str(err.value)
    assert f"data.train {good}: token ids go up to 301 (scanned" in msg
    assert "model has 256 vocabulary rows (model.vocab_size=256)" in msg and other not in msg
    note = capsys.readouterr().err
    assert note.startswith("note: 1 prefix(es) without a tokenizer record")
    assert f"`ponder-pt data verify --full {other}`" in note
    assert check_data([("data.train", good)], model_vocab=302)[0].ok
