"""`data prepare`: tokens read back through megatron-core's own IndexedDataset, reject reports."""

import json
import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from ponder_pt.cli import main
from ponder_pt.data.prepare import DataError, merge, prepare, unrecorded
from ponder_pt.tokenizer import load_tokenizer


def _expected(tok, texts):
    return [tok.encode(t) + [tok.eod_id] for t in texts]


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
@pytest.mark.parametrize("workers", [1, 2])
def test_indexed_dataset_holds_exact_tokens(kind, workers, corpus, corpus_texts, bpe_dir, sp_dir, tmp_path):
    tok_dir = bpe_dir if kind == "bpe" else sp_dir
    prefix = str(tmp_path / "out")
    stats = prepare([corpus], tok_dir, prefix, workers=workers, progress=False, chunk_docs=7)
    tok = load_tokenizer(tok_dir)
    ds = IndexedDataset(prefix)  # megatron-core's own reader
    expected = _expected(tok, corpus_texts)
    assert len(ds) == len(expected) == stats.documents_written == stats.documents_in
    for i in range(len(ds)):
        assert ds[i].tolist() == expected[i]
    assert list(ds.document_indices) == list(range(len(expected) + 1))
    assert stats.tokens == sum(map(len, expected)) and stats.rejected == 0
    record = _record(prefix)
    assert record["max_token_id"] == max(map(max, expected)) == stats.max_token_id
    assert (record["documents"], record["tokens"]) == (len(expected), stats.tokens)
    assert record["tokenizer"]["vocab_size"] == tok.vocab_size
    assert ds.index.dtype == np.uint16  # vocab < 65500: Megatron's optimal dtype
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def _write_planted(path):
    lines = [
        json.dumps({"text": "A good first document."}).encode(),
        b'{"text": "broken json',                               # line 2
        json.dumps({"body": "no text key"}).encode(),           # line 3
        json.dumps({"text": "   "}).encode(),                   # line 4: empty
        b'{"text": "bad \xff\xfe utf8"}',                        # line 5
        json.dumps({"text": "Second good document."}).encode(),
        json.dumps([1, 2]).encode(),                            # line 7: not an object
        json.dumps({"text": 42}).encode(),                      # line 8: not a string
        b"",                                                    # blank line: not a record
        json.dumps({"text": "Third good document."}).encode(),  # line 10
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_rejects_are_counted_and_reported_with_file_and_line(bpe_dir, tmp_path):
    src = tmp_path / "planted.jsonl"
    _write_planted(src)
    prefix = str(tmp_path / "out")
    stats = prepare([str(src)], bpe_dir, prefix, progress=False)
    assert (stats.documents_in, stats.documents_written, stats.rejected) == (9, 3, 6)
    assert stats.documents_in == stats.documents_written + stats.rejected
    rejects = [json.loads(x) for x in open(prefix + ".rejects.jsonl")]
    assert [r["line"] for r in rejects] == [2, 3, 4, 5, 7, 8]
    assert all(r["file"] == str(src) for r in rejects)
    reasons = [r["reason"] for r in rejects]
    assert reasons[0].startswith("broken JSON") and reasons[1] == "missing text key 'text'"
    assert reasons[2] == "empty text" and reasons[3].startswith("invalid UTF-8")
    assert "not an object" in reasons[4] and "not a string" in reasons[5]
    on_disk = json.load(open(prefix + ".stats.json"))
    assert on_disk["rejected"] == 6 and sum(on_disk["rejected_by_reason"].values()) == 6
    tok = load_tokenizer(bpe_dir)
    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(3)] == _expected(
        tok, ["A good first document.", "Second good document.", "Third good document."])


def test_strict_stops_at_first_bad_line_and_writes_nothing(bpe_dir, tmp_path):
    src = tmp_path / "planted.jsonl"
    _write_planted(src)
    prefix = str(tmp_path / "out")
    with pytest.raises(DataError, match=r"planted.jsonl:2: broken JSON"):
        prepare([str(src)], bpe_dir, prefix, strict=True, progress=False)
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_txt_parquet_arrow_and_saved_dataset_inputs(bpe_dir, tmp_path):
    import datasets

    tok = load_tokenizer(bpe_dir)
    (tmp_path / "a.txt").write_text("First paragraph\nstill first.\n\nSecond paragraph.\n\n\nThird.\n")
    rows = {"text": ["parquet one", "", "parquet three"]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "b.parquet"))
    saved = datasets.Dataset.from_dict({"text": ["saved doc"]})
    saved.save_to_disk(str(tmp_path / "saved"))
    prefix = str(tmp_path / "out")
    stats = prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.parquet"), str(tmp_path / "saved")],
                    bpe_dir, prefix, progress=False)
    texts = ["First paragraph\nstill first.", "Second paragraph.", "Third.", "parquet one",
             "parquet three", "saved doc"]
    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == _expected(tok, texts)
    assert (stats.documents_in, stats.rejected) == (7, 1)
    reject = json.loads(open(prefix + ".rejects.jsonl").readline())
    assert reject["file"].endswith("b.parquet") and reject["line"] == 2 and reject["reason"] == "empty text"


def _record(prefix):
    with open(prefix + ".tokenizer-id.json") as fh:
        return json.load(fh)


def test_merge_concatenates_prefixes(bpe_dir, sp_dir, corpus, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    prepare([corpus], bpe_dir, a, progress=False)
    (tmp_path / "b.txt").write_text("A short second corpus.\n")
    prepare([str(tmp_path / "b.txt")], bpe_dir, b, progress=False)
    n = merge([a, b], str(tmp_path / "ab"))
    da, db, dab = IndexedDataset(a), IndexedDataset(b), IndexedDataset(str(tmp_path / "ab"))
    assert n == len(dab) == len(da) + 1
    assert dab[len(da)].tolist() == db[0].tolist()
    # the tokenizer record is carried over: the largest id and the counts of both inputs
    ra, rab = _record(a), _record(str(tmp_path / "ab"))
    assert rab["tokenizer"] == ra["tokenizer"] == load_tokenizer(bpe_dir).identity()
    every = np.concatenate([dab[i] for i in range(len(dab))])
    assert rab["max_token_id"] == int(every.max()) and rab["tokens"] == len(every)
    assert rab["documents"] == n
    # another tokenizer: refused, naming both prefixes and tokenizers; nothing written
    c = str(tmp_path / "c")
    prepare([str(tmp_path / "b.txt")], sp_dir, c, progress=False)
    with pytest.raises(DataError, match="different tokenizers") as err:
        merge([a, c], str(tmp_path / "ac"))
    for name in (a, c, load_tokenizer(bpe_dir).path, load_tokenizer(sp_dir).path):
        assert name in str(err.value)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("ac")]
    # an input prepared elsewhere (no record): the merged prefix gets none either
    os.remove(b + ".tokenizer-id.json")
    assert unrecorded([a, b]) == [b]
    merge([a, b], str(tmp_path / "ab"))
    assert not os.path.exists(str(tmp_path / "ab") + ".tokenizer-id.json")


def test_cli_prepare_reports_and_fails_cleanly(bpe_dir, tmp_path, capsys):
    src = tmp_path / "planted.jsonl"
    _write_planted(src)
    out = str(tmp_path / "cli")
    assert main(["data", "prepare", "--input", str(src), "--tokenizer", bpe_dir, "--out", out,
                 "--workers", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "documents in 9 = written 3 + rejected 6" in err and "rejects.jsonl" in err
    assert main(["data", "prepare", "--input", str(src), "--tokenizer", bpe_dir, "--out", out,
                 "--strict", "--quiet"]) == 2
    assert "planted.jsonl:2: broken JSON" in capsys.readouterr().err
    assert main(["data", "prepare", "--input", str(tmp_path / "nope.jsonl"), "--tokenizer",
                 bpe_dir, "--out", out]) == 2
    assert "input(s) not found" in capsys.readouterr().err


def test_cluster_shard_script_array_tasks_then_merge(bpe_dir, corpus_texts, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prepare_shards", os.path.join(os.path.dirname(__file__), "..", "data_prep", "prepare_shards.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shards = []
    for s in range(3):
        path = tmp_path / f"shard{s}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[s::3][:20]))
        shards.append(str(path))
    out = str(tmp_path / "out")
    pattern = str(tmp_path / "shard*.jsonl")
    for task in range(2):  # two array tasks split the shards between them
        assert script.main(["--input", pattern, "--tokenizer", bpe_dir, "--out-dir", out,
                            "--task-index", str(task), "--num-tasks", "2", "--workers", "1"]) == 0
    assert script.main(["--input", pattern, "--tokenizer", bpe_dir, "--out-dir", out,
                        "--task-index", "0", "--num-tasks", "1", "--workers", "1",
                        "--merge-into", str(tmp_path / "all")]) == 0  # resumes: all skipped
    merged = IndexedDataset(str(tmp_path / "all"))
    tok = load_tokenizer(bpe_dir)
    expected = [d for s in range(3) for d in _expected(tok, corpus_texts[s::3][:20])]
    assert [merged[i].tolist() for i in range(len(merged))] == expected
