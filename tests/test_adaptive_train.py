"""Adaptive pondering under the real trainer: ZeRO-3 and PP = 2 on 2 processes against a single
process, and head-only calibration of a fixed-K checkpoint (the backbone must not move), then the
calibrated checkpoint through `generate --json` and the dry run."""

import json
import os

import pytest
import torch
from _export_helpers import trained  # noqa: F401 - session fixture
from train_utils import metrics, run_train
from zygote import ponder

REL = 2e-5  # fp32, different reduction orders
HALTING = ["ponder.halting.mode=palbert", "ponder.halting.q=0.5", "ponder.halting.beta=0.05"]


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def single(prepared, bpe_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("halt_ref")
    run_train(str(run), prepared, bpe_dir, HALTING)
    return run


def test_zero3_with_halting_matches_single_process(single, prepared, bpe_dir, tmp_path):
    run_train(str(tmp_path), prepared, bpe_dir, HALTING + ["parallel.zero_stage=3"], nproc=2)
    (train, valid), (ref_train, ref_valid) = metrics(str(tmp_path)), metrics(str(single))
    assert sorted(train) == sorted(ref_train) == [1, 2, 3, 4]
    for step, loss in ref_train.items():
        assert train[step] == pytest.approx(loss, rel=REL), (step, train, ref_train)
    assert valid[4] == pytest.approx(ref_valid[4], rel=REL)
    got, want = _rows(tmp_path), _rows(single)
    for a, b in zip(got, want):  # the halting metrics too, train and validation rows
        for key in [k for k in b if "halt_" in k]:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    first = want[0]
    assert 1.0 <= first["halt_expected_passes"] <= 3.0 and 1.0 <= first["halt_passes"] <= 3.0
    assert sum(first[f"halt_exit_frac_{k}"] for k in range(3)) == pytest.approx(1.0)
    assert "valid_halt_passes" in want[-1]


def test_pp2_with_halting_matches_single_process(single, prepared, bpe_dir, tmp_path):
    """The pipeline carries the labels and a per-pass halting state through its stages; the
    training losses equal one process's (validation under PP scores the objective instead)."""
    proc = run_train(str(tmp_path), prepared, bpe_dir,
                     HALTING + ["parallel.pp=2", "parallel.zero_stage=1"], nproc=2)
    assert "adaptive pondering under PP" in proc.stdout
    (train, _), (ref_train, _) = metrics(str(tmp_path)), metrics(str(single))
    assert sorted(train) == sorted(ref_train) == [1, 2, 3, 4]
    for step, loss in ref_train.items():
        assert train[step] == pytest.approx(loss, rel=REL), (step, train, ref_train)


def test_head_only_calibrates_a_fixed_k_checkpoint(trained, prepared, bpe_dir,  # noqa: F811
                                                   tmp_path):
    from ponder_pt.export.native import read_checkpoint

    source = trained["ponder"]  # ponder.steps=2, no halting head
    ckpt = tmp_path / "ckpt"
    proc = run_train(str(tmp_path), prepared, bpe_dir, HALTING + [
        "ponder.halting.head_only=true", "ponder.halting.train_exits=frozen",
        f"checkpoint.init_from={source}", f"checkpoint.dir={ckpt}", "train.lr=0.05",
        "train.iters=3", "train.eval_interval=3"])
    assert "training the halting head only" in proc.stdout
    _, before, _ = read_checkpoint(source)
    _, after, _ = read_checkpoint(str(ckpt))
    assert set(after) - set(before) == {"halting.proj.weight", "halting.proj.bias"}
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name  # no backbone weight moved
    # the head did train: a fresh head has zero bias
    assert after["halting.proj.bias"].abs().item() > 0
    rows = _rows(tmp_path)
    assert all("halt_passes" in r for r in rows if "loss" in r)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = ponder(["generate", "--model", str(ckpt),
                  "--prompt", "The", "--greedy", "--json", "--max-new-tokens", "6",
                  "--halt-q", "0.4"], env=env,
                 timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(res["passes"]) == len(res["token_ids"]) == 6
    assert all(1 <= p <= 3 for p in res["passes"])
