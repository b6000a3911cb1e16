"""Data and tokenizer agree, or `ponder-pt train` does not start: data prepared with one
tokenizer and trained with another is refused before any process group starts (by the
tokenizer record `data prepare` writes beside the .idx, or by a scan of data prepared
elsewhere), as are empty and missing prefixes; `data prepare` and `tokenizer train` fail on
inputs that give them nothing; `train --dry-run` says what it lacks and what it assumed.
Every check drives the CLI in a subprocess, as a user does."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest

from train_utils import train_cmd
from zygote import ponder


def _cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return ponder([*args], env=env,
                  timeout=timeout)


def _train(tmp_path, tokenizer, train, valid=(), test=(), nproc=1):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    extra = []
    if valid:
        extra.append(f"data.valid=[{','.join(valid)}]")
    if test:
        extra.append(f"data.test=[{','.join(test)}]")
    cmd = train_cmd(str(tmp_path / "run"), ",".join(train), tokenizer, extra, nproc=nproc)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _tokens(prefix):
    """The token ids of PREFIX.bin, read without our code (uint16: vocab < 65500)."""
    return np.fromfile(prefix + ".bin", dtype=np.uint16)


def _copy_unrecorded(prefix, dst):
    """The prefix as another tool (e.g. Megatron's preprocess_data.py) would leave it."""
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, dst + ext)
    assert not os.path.exists(dst + ".tokenizer-id.json")
    return dst


def _empty_prefix(dst):
    """A prefix of no documents, written as megatron-core's .idx format lays it out: header,
    version 1, dtype code 8 (uint16), 0 sequences, 1 document index (0), and an empty .bin."""
    with open(dst + ".idx", "wb") as fh:
        fh.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
                 + struct.pack("<Q", 0) + struct.pack("<Q", 1) + struct.pack("<q", 0))
    open(dst + ".bin", "wb").close()
    return dst


@pytest.fixture(scope="module")
def small_tok(corpus, tmp_path_factory):
    """A BPE of a smaller vocabulary (400) than the one `prepared` was made with (600)."""
    from ponder_pt.tokenizer import train_tokenizer

    out = str(tmp_path_factory.mktemp("small_tok"))
    return train_tokenizer([corpus], 400, out, show_progress=False)


@pytest.fixture(scope="module")
def same_size_tok(corpus_texts, bpe_dir, tmp_path_factory):
    """Another BPE of the same vocabulary size as bpe_dir (trained on other text)."""
    from ponder_pt.tokenizer import load_tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("same_size_tok")
    (out / "half.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[1::2]))
    path = train_tokenizer([str(out / "half.jsonl")], 600, str(out), show_progress=False)
    assert load_tokenizer(path).vocab_size == load_tokenizer(bpe_dir).vocab_size
    return path


def test_train_refuses_data_of_another_tokenizer_and_empty_or_missing_prefixes(
        prepared, bpe_dir, small_tok, tmp_path):
    """Data made with a 600-token BPE, trained with a 400-token one: the model's 768 rows
    (TINY's model.vocab_size) would hide the mismatch, the tokenizer check does not. One
    launch checks the recorded prefix, an unrecorded copy (scanned), an empty and a missing
    prefix, each named with its config key."""
    record = json.load(open(prepared + ".tokenizer-id.json"))
    top = int(_tokens(prepared).max())
    assert 400 <= top < 600 and record["max_token_id"] == top  # the writer saw every token
    copy = _copy_unrecorded(prepared, str(tmp_path / "elsewhere"))
    empty = _empty_prefix(str(tmp_path / "empty"))
    missing = str(tmp_path / "missing")
    proc = _train(tmp_path, small_tok, [prepared, missing], valid=[copy], test=[empty], nproc=2)
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "torch.distributed" not in err and "rank" not in err
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
    bpe_file = os.path.join(bpe_dir, "tokenizer.json")
    # recorded: both tokenizers (path, size, vocabulary hash) and the prefix, and the remedy
    assert f"data.train {prepared} was prepared with another tokenizer than data.tokenizer" in err
    assert (f"prepared with:  {bpe_file} (600 tokens, vocabulary sha256 "
            f"{record['tokenizer']['vocab_sha256'][:12]})") in err
    assert f"data.tokenizer: {small_tok} (400 tokens, vocabulary sha256 " in err
    assert f"its token ids go up to {top}, outside data.tokenizer's vocabulary [0, 400)" in err
    assert f"set data.tokenizer={bpe_file}" in err
    assert f"ponder-pt data prepare --tokenizer {small_tok} --out {prepared}" in err
    # unrecorded (prepared elsewhere): caught by scanning the .bin
    assert f"data.valid {copy}: token ids go up to {top} (scanned" in err
    # empty and missing prefixes, named with their keys
    assert f"data.test: {empty}: empty (0 documents" in err
    assert f"data.train: {missing}.idx, {missing}.bin: no such file" in err


def test_train_refuses_same_size_vocabulary_of_another_tokenizer(
        prepared, bpe_dir, same_size_tok, tmp_path):
    """Same vocabulary size, other tokens: only the vocabulary hash tells; an unrecorded
    copy whose ids fit passes the scan (nothing says it is wrong)."""
    copy = _copy_unrecorded(prepared, str(tmp_path / "elsewhere"))
    proc = _train(tmp_path, same_size_tok, [prepared], valid=[copy])
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    assert f"data.train {prepared} was prepared with another tokenizer" in err
    assert f"{os.path.join(bpe_dir, 'tokenizer.json')} (600 tokens" in err
    assert f"data.tokenizer: {same_size_tok} (600 tokens" in err
    assert "outside data.tokenizer's vocabulary" not in err and "data.valid" not in err


def test_dry_run_warns_of_absent_data_and_tokenizer_and_names_the_vocabulary(
        prepared, bpe_dir, tmp_path):
    proc = _cli("train", "--config", "demo", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    data = out.split("# data\n")[1].split("# launch\n")[0].splitlines()
    assert data == [
        "warning: data.train is not set: a run needs the PREFIX written by `ponder-pt data "
        "prepare` (--set data.train=[PREFIX])",
        "warning: data.tokenizer is not set: a run needs the tokenizer the data was prepared "
        "with (--set data.tokenizer=DIR_OR_FILE)",
        "vocabulary: 50304 assumed (GPT-NeoX-20B padded), no data.tokenizer"]
    assert "vocab_size: 50304" in out  # what the estimates above used
    # with data (one prefix absent) and a re-saved copy of the tokenizer it was prepared with
    resaved = tmp_path / "resaved"
    resaved.mkdir()
    with open(os.path.join(bpe_dir, "tokenizer.json")) as fh:
        json.dump(json.load(fh), open(resaved / "tokenizer.json", "w"), indent=1)
    missing = str(tmp_path / "missing")
    proc = _cli("train", "--config", "demo", "--dry-run", "--set",
                f"data.train=[{prepared},{missing}]", "--set", f"data.tokenizer={resaved}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = proc.stdout.split("# data\n")[1].split("# launch\n")[0]
    assert f"warning: data.train: {missing}.bin and {missing}.idx not found" in data
    padded = -(-600 // 128) * 128
    assert (f"vocabulary: {padded} = data.tokenizer's 600 tokens padded to a multiple of 128 "
            f"({resaved / 'tokenizer.json'})") in data
    assert "same vocabulary: the ids agree" in data and data.count("warning") == 1


def test_prepare_and_tokenizer_train_refuse_inputs_that_give_nothing(bpe_dir, tmp_path):
    content = tmp_path / "content.jsonl"
    content.write_text('{"content": "A first document.", "id": 1}\n'
                       '{"content": "A second one.", "id": 2, "meta": "x"}\n')
    out = str(tmp_path / "out")
    proc = _cli("data", "prepare", "--input", str(content), "--tokenizer", bpe_dir,
                "--out", out, "--quiet")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("no record had the key 'text'; keys seen: content, id, meta - did you mean "
            "--text-key content?") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(out + ".bin") and not os.path.exists(out + ".idx")
    assert not os.path.exists(out + ".tokenizer-id.json")
    # tokenizer training: an empty file and a jsonl without the key, named with the key to use
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = _cli("tokenizer", "train", "--input", str(empty), str(content), "--vocab-size",
                "300", "--out", str(tmp_path / "tok"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"no training text in the input(s) ({empty}: empty file; {content}: 2 line(s)" in \
        proc.stderr
    assert "did you mean --text-key content?" in proc.stderr
    assert not os.path.exists(tmp_path / "tok" / "tokenizer.json")
    proc = _cli("tokenizer", "train", "--input", str(tmp_path / "nope.txt"), str(empty),
                str(tmp_path / "nope2.txt"), "--vocab-size", "300", "--out", str(tmp_path / "t"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (f"tokenizer training input(s) not found: {tmp_path / 'nope.txt'}, "
            f"{tmp_path / 'nope2.txt'}") in proc.stderr
