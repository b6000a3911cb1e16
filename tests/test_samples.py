"""Packed samples with pause tokens: counts, positions, masks, order, and determinism across
seeds, sample indices and world sizes; `data inspect --json`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import free_port
from ponder_pt.cli import main
from ponder_pt.data.pause import make_sample, num_pauses, pause_positions
from ponder_pt.data.samples import build_datasets

PAUSE = 600
L = 32


def _datasets(prefix, cache, rate=0.1, n=64, seed=7, **kw):
    return build_datasets([(prefix, 1.0)], seq_len=L, seed=seed, num_samples=(n, 0, 0), eod_id=0,
                          vocab_size=600, split="1,0,0", pause_id=PAUSE, pause_rate=rate,
                          cache_dir=str(cache), **kw)


def test_pause_count_mask_and_order(prepared, tmp_path):
    paused, = _datasets(prepared, tmp_path / "c1")[:1]
    plain, = _datasets(prepared, tmp_path / "c2", rate=0.0)[:1]
    n = num_pauses(0.1, L)
    assert n == 3  # round(0.1 * 32)
    for idx in range(20):
        s, p = paused[idx], plain[idx]
        full = np.concatenate([s["tokens"].numpy(), s["labels"].numpy()[-1:]])
        assert (full == PAUSE).sum() == n
        # non-pause tokens, in order, are the un-paused sample's prefix
        unpaused = np.concatenate([p["tokens"].numpy(), p["labels"].numpy()[-1:]])
        kept = full[full != PAUSE]
        assert (kept == unpaused[: len(kept)]).all() and len(kept) == L + 1 - n
        # loss mask is zero exactly where the target is a pause
        assert ((s["loss_mask"].numpy() == 0) == (s["labels"].numpy() == PAUSE)).all()
        assert (s["labels"][:-1] == s["tokens"][1:]).all()
        assert s["position_ids"].tolist() == list(range(L))
        assert (p["loss_mask"].numpy() == 1).all()


def test_positions_vary_with_sample_and_seed_but_are_reproducible():
    a = pause_positions(seed=1, index=5, seq_len=2048, rate=0.1)
    assert len(a) == 205 and len(set(a.tolist())) == 205 and a.min() >= 0 and a.max() <= 2048
    assert (a == pause_positions(seed=1, index=5, seq_len=2048, rate=0.1)).all()
    assert not np.array_equal(a, pause_positions(seed=1, index=6, seq_len=2048, rate=0.1))
    assert not np.array_equal(a, pause_positions(seed=2, index=5, seq_len=2048, rate=0.1))
    assert not np.array_equal(a, pause_positions(seed=1, index=5, seq_len=2048, rate=0.1, split="valid"))
    # uniform: every slot is used about equally often over many samples
    counts = np.bincount(np.concatenate([pause_positions(0, i, 63, 0.25) for i in range(4000)]),
                         minlength=64)
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def test_eod_mask_loss_only_when_asked():
    text = np.array([5, 6, 0, 7, 8, 0, 9, 10, 11])
    s = make_sample(text, pause_id=None, pause_rate=0.0, seed=0, index=0, eod_id=0)
    assert s["loss_mask"].tolist() == [1] * 8
    s = make_sample(text, pause_id=None, pause_rate=0.0, seed=0, index=0, eod_id=0, eod_mask_loss=True)
    assert s["loss_mask"].tolist() == [1, 1, 0, 1, 1, 0, 1, 1]
    with pytest.raises(ValueError, match="pause token id"):
        make_sample(text, pause_id=None, pause_rate=0.1, seed=0, index=0)


def test_same_sample_on_any_world_size(prepared, tmp_path):
    """Two torchrun processes building the datasets themselves give every global index the
    same tokens, labels and masks as one process."""
    n = 24
    out = tmp_path / "dist"
    out.mkdir()
    worker = os.path.join(os.path.dirname(__file__), "dist", "samples_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), worker, prepared, str(tmp_path / "cache_dist"),
           str(out), str(n)]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    merged = {}
    for rank in range(2):
        merged.update(json.load(open(out / f"rank{rank}.json")))
    single, = _datasets(prepared, tmp_path / "cache_single", n=n)[:1]
    assert len(merged) == n
    for idx in range(n):
        ref = {k: v.tolist() for k, v in single[idx].items()}
        assert merged[str(idx)] == ref


def test_blend_is_deterministic_and_mixes_both_prefixes(prepared, tmp_path):
    kw = dict(seq_len=L, seed=3, num_samples=(200, 0, 0), eod_id=0, vocab_size=600, split="1,0,0")
    a, _, _ = build_datasets([(prepared, 0.25), (prepared, 0.75)], cache_dir=str(tmp_path / "a"), **kw)
    b, _, _ = build_datasets([(prepared, 0.25), (prepared, 0.75)], cache_dir=str(tmp_path / "b"), **kw)
    assert len(a) >= 200
    ids = [a.packed[i]["dataset_id"] for i in range(200)]
    assert 0.15 < np.mean(np.array(ids) == 0) < 0.35
    for i in range(0, 200, 17):
        assert a[i]["tokens"].tolist() == b[i]["tokens"].tolist()


def test_train_valid_split_and_missing_prefix(prepared, tmp_path):
    tr, va, te = build_datasets([(prepared, 1.0)], seq_len=L, seed=1, num_samples=(10, 5, 0),
                                eod_id=0, vocab_size=600, split="90,10,0", cache_dir=str(tmp_path))
    assert len(tr) >= 10 and len(va) >= 5 and te is None
    with pytest.raises(FileNotFoundError, match="run `ponder-pt data prepare`"):
        build_datasets([(str(tmp_path / "nope"), 1.0)], seq_len=L, seed=1, num_samples=(1, 0, 0),
                       eod_id=0, vocab_size=600)



def test_split_with_no_documents_is_dropped_or_refused(prepared, tmp_path):
    """A share of data.split too small for the corpus (megatron-core would loop forever on it):
    dropped when nothing is asked of it, with the other splits' documents unchanged; refused
    with the split and the prefix named when samples are asked of it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    n = len(IndexedDataset(prepared, mmap=True))
    tiny = 1 / (4 * n)  # a share that rounds to no document
    split = f"{1 - 0.1 - tiny},0.1,{tiny}"
    kw = dict(seq_len=L, seed=1, eod_id=0, vocab_size=600, split=split, cache_dir=str(tmp_path))
    tr, va, te = build_datasets([(prepared, 1.0)], num_samples=(10, 5, 0), **kw)
    assert te is None and len(tr) >= 10 and len(va) >= 5
    with pytest.raises(ValueError, match=f"the test split gets none of the {n} documents"):
        build_datasets([(prepared, 1.0)], num_samples=(10, 5, 2), **kw)


def test_cli_inspect_json(prepared, bpe_dir, tmp_path, capsys):
    argv = ["data", "inspect", "--data", prepared, "--seq-len", str(L), "--pause-rate", "0.1",
            "--pause-id", str(PAUSE), "--num-samples", "3", "--seed", "7", "--json",
            "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 3
    ref, = _datasets(prepared, tmp_path / "ref", n=3)[:1]
    for i, rec in enumerate(records):
        assert set(rec) >= {"tokens", "labels", "loss_mask"}
        assert all(len(rec[k]) == L for k in ("tokens", "labels", "loss_mask"))
        assert rec["tokens"] == ref[i]["tokens"].tolist()
        assert rec["loss_mask"] == [int(x) for x in ref[i]["loss_mask"].tolist()]
        assert sum(t == PAUSE for t in rec["tokens"] + rec["labels"][-1:]) == 3
    # human view decodes text and shows pauses
    assert main(["data", "inspect", "--data", prepared, "--seq-len", str(L), "--pause-rate", "0.1",
                 "--tokenizer", bpe_dir, "--num-samples", "1", "--cache-dir", str(tmp_path / "c")]) == 0
    assert "⏸" in capsys.readouterr().out
    assert main(["data", "inspect", "--data", prepared, "--seq-len", str(L), "--pause-rate", "0.1"]) == 2
    assert "--pause-id" in capsys.readouterr().err


def test_cli_inspect_from_run_config(prepared, bpe_dir, tmp_path, capsys):
    assert main(["data", "inspect", "--config", "demo", "--set", f"data.train=[{prepared}]",
                 "--set", f"data.tokenizer={bpe_dir}", "--set", "data.seq_len=32",
                 "--set", f"data.cache_dir={tmp_path}", "--num-samples", "2", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 2 and all(len(r["tokens"]) == 32 for r in records)
    assert sum(r["tokens"].count(600) + r["labels"][-1:].count(600) for r in records) == 2 * 3
