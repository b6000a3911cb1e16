"""Resuming at another layout keeps the optimizer; TP x PP checkpoints export and initialise runs.

Elastic resume: a run saved at step 3 at layout A resumes at layout B and trains to step 6. The
reference is one uninterrupted single-process ZeRO-1 run of the same seed and global batch (in
fp32 every layout reproduces it up to reduction order, test_train), so B's losses at steps 4-6
must equal it, and B's final weights, Adam moments, step and LR must equal the reference's final
ones. Moments restarted at step 3 would leave exp_avg_sq short by beta2^3 * v_3, which the test
shows to be far beyond its tolerance. DeepSpeed's pipeline engine takes ZeRO 0/1 only, so PP
runs are checked with ZeRO-1 (ZeRO-2/3 with PP > 1 is refused at config time).
"""

import json
import os
import shutil

import pytest
import torch

from _export_helpers import stock_check
from train_utils import metrics, run_train

REL = 2e-5  # fp32 losses, different reduction orders
COMMON = ["train.iters=6", "train.eval_interval=100", "checkpoint.interval=3"]
TAG3, TAG6 = "step_00000003", "step_00000006"


def _run(run_dir, prepared, bpe_dir, ckpt, extra, nproc):
    return run_train(str(run_dir), prepared, bpe_dir, [*COMMON, f"checkpoint.dir={ckpt}", *extra],
                     nproc=nproc)


@pytest.fixture(scope="module")
def reference(prepared, bpe_dir, tmp_path_factory):
    """The uninterrupted run: 1 process, ZeRO-1; checkpoints at steps 3 and 6."""
    run = tmp_path_factory.mktemp("elastic_ref")
    _run(run, prepared, bpe_dir, run / "ckpt", ["parallel.zero_stage=1"], 1)
    return metrics(str(run))[0], str(run / "ckpt")


def _universal(ckpt, tag):
    """{name: {state: full tensor}} and the meta of a checkpoint, via engine.reshard."""
    from ponder_pt.engine import reshard
    from ponder_pt.config import load_run_config

    with open(os.path.join(ckpt, tag, "ponder_meta.json")) as fh:
        layout = json.load(fh)["layout"]
    udir = reshard.convert(ckpt, tag, layout, load_run_config(ckpt).model, log=lambda *a: None)
    meta = reshard.read_meta(udir)
    return {n: {s: reshard.read_full(udir, n, s) for s in reshard.STATES
                if os.path.exists(os.path.join(udir, "zero", n, f"{s}.pt"))}
            for n in meta["params"]}, meta


def _copy_step3(src, dst):
    """checkpoint.dir `dst` holding `src`'s step 3 only (as saved: no conversion)."""
    dst.mkdir()
    shutil.copytree(os.path.join(src, TAG3), dst / TAG3,
                    ignore=shutil.ignore_patterns("universal*"))
    shutil.copy(os.path.join(src, "run_config.yaml"), dst / "run_config.yaml")
    (dst / "latest").write_text(TAG3)


def _layout(tp=1, pp=1, zero=1):
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.zero_stage={zero}"]


def _desc(nproc, tp=1, pp=1, zero=1):
    return f"TP={tp} PP={pp} DP={nproc // (tp * pp)} ZeRO-{zero}"


# name -> ((layout A, nproc A), (layout B, nproc B)); the core matrix runs in CI, the rest slow
CORE = {
    "dp2to1-zero3": ((dict(zero=3), 2), (dict(zero=3), 1)),
    "dp1to2-zero1": ((dict(zero=1), 1), (dict(zero=1), 2)),  # A: the reference's own step 3
    "tp2to1-zero2": ((dict(tp=2, zero=2), 2), (dict(zero=2), 1)),
    "pp2to1-zero1": ((dict(pp=2, zero=1), 2), (dict(zero=1), 1)),
}
MORE = {
    "dp2to1-zero1": ((dict(zero=1), 2), (dict(zero=1), 1)),
    "dp2to1-zero2": ((dict(zero=2), 2), (dict(zero=2), 1)),
    "dp1to2-zero2": ((dict(zero=2), 1), (dict(zero=2), 2)),
    "dp1to2-zero3": ((dict(zero=3), 1), (dict(zero=3), 2)),
    "tp2to1-zero1": ((dict(tp=2, zero=1), 2), (dict(zero=1), 1)),
    "tp2to1-zero3": ((dict(tp=2, zero=3), 2), (dict(zero=3), 1)),
    "tp2pp2to1-zero1": ((dict(tp=2, pp=2, zero=1), 4), (dict(zero=1), 1)),
    "pp1to2-zero1": ((dict(zero=1), 1), (dict(pp=2, zero=1), 2)),  # into the pipeline engine
}
CASES = [pytest.param(k, *v, id=k) for k, v in CORE.items()] + [
    pytest.param(k, *v, id=k, marks=pytest.mark.slow) for k, v in MORE.items()]


@pytest.mark.parametrize("name,a,b", CASES)
def test_resume_at_another_layout_keeps_optimizer(name, a, b, reference, prepared, bpe_dir,
                                                  tmp_path):
    from ponder_pt.weights.files import verify

    ref_losses, ref_ckpt = reference
    (lay_a, n_a), (lay_b, n_b) = a, b
    ckpt = tmp_path / "ckpt"
    if (lay_a, n_a) == (dict(zero=1), 1):  # the reference run is layout A
        _copy_step3(ref_ckpt, ckpt)
    else:
        _run(tmp_path / "a", prepared, bpe_dir, ckpt, _layout(**lay_a), n_a)
        shutil.rmtree(ckpt / TAG6)  # as if layout A died after step 5
    before = {p.name: p.stat().st_size for p in (ckpt / TAG3).iterdir()}

    out = _run(tmp_path / "b", prepared, bpe_dir, ckpt, _layout(**lay_b), n_b).stdout
    assert f"saved at {_desc(n_a, **lay_a)}, resuming at {_desc(n_b, **lay_b)}" in out, out[-3000:]
    assert "training steps 3..6" in out
    losses = metrics(str(tmp_path / "b"))[0]
    assert sorted(losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert losses[step] == pytest.approx(ref_losses[step], rel=REL), (step, losses, ref_losses)

    # the saved checkpoint is intact, its shards untouched; the conversion sits beside them
    assert verify(str(ckpt), TAG3) is None
    assert {p.name: p.stat().st_size for p in (ckpt / TAG3).iterdir() if p.name != "universal"
            } == before
    assert not [p for p in (ckpt / TAG3).iterdir() if p.name.startswith("universal.tmp")]

    # after 3 more steps at layout B: the uninterrupted run's moments, step, LR and weights
    got, got_meta = _universal(str(ckpt), TAG6)
    ref, ref_meta = _universal(ref_ckpt, TAG6)
    saved3, _ = _universal(str(ckpt), TAG3)
    assert sorted(got) == sorted(ref)
    assert float(got_meta["step"] or got_meta["global_steps"]) == 6.0
    assert (got_meta["lr_scheduler"]["_last_lr"]
            == pytest.approx(ref_meta["lr_scheduler"]["_last_lr"]))
    beta2 = 0.95
    for n in ref:
        assert got[n].keys() == ref[n].keys() >= {"fp32"}, n
        for state in set(ref[n]) & {"exp_avg", "exp_avg_sq"}:
            scale = ref[n][state].abs().max().item()
            assert (got[n][state] - ref[n][state]).abs().max().item() <= 1e-4 * scale, (n, state)
        if ref[n]["fp32"].ndim >= 2:  # (Adam turns the key bias's zero gradient into noise)
            scale = ref[n]["fp32"].abs().max().item()
            assert (got[n]["fp32"] - ref[n]["fp32"]).abs().max().item() <= 1e-4 * scale, n
    # what restarting Adam at step 3 would have lost is far beyond that tolerance
    n = "layers.0.mlp.fc1.weight"
    lost = (beta2 ** 3 * saved3[n]["exp_avg_sq"]).abs().max().item()
    assert lost > 100 * 1e-4 * ref[n]["exp_avg_sq"].abs().max().item()


def test_resume_from_another_runs_checkpoint_then_from_its_own(reference, prepared, bpe_dir,
                                                               tmp_path):
    """checkpoint.load = another run's checkpoint (ZeRO-1, DP=1) resumed at DP=2: converted into
    this run's own checkpoint.dir, the source left byte for byte as it was, losses equal to the
    uninterrupted run's; once this run has saved, a restart continues from its own
    checkpoint.dir, not from checkpoint.load, and the conversion is gone."""
    from ponder_pt.weights.files import verify

    ref_losses, ref_ckpt = reference
    theirs, own = tmp_path / "theirs", tmp_path / "ckpt"
    _copy_step3(ref_ckpt, theirs)
    before = {str(p.relative_to(theirs)): p.read_bytes() for p in theirs.rglob("*")
              if p.is_file()}
    load = [*_layout(zero=1), f"checkpoint.load={theirs}"]
    out = _run(tmp_path / "b", prepared, bpe_dir, own, load, 2).stdout
    assert f"saved at {_desc(1)}, resuming at {_desc(2)}" in out, out[-3000:]
    losses = metrics(str(tmp_path / "b"))[0]
    assert sorted(losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert losses[step] == pytest.approx(ref_losses[step], rel=REL), (step, losses)
    assert {str(p.relative_to(theirs)): p.read_bytes() for p in theirs.rglob("*")
            if p.is_file()} == before
    assert verify(str(own), TAG6) is None and not (own / ".converted").exists()

    out = _run(tmp_path / "c", prepared, bpe_dir, own, [*load, "train.iters=7"], 2).stdout
    assert f"checkpoint.dir holds {TAG6}: resuming from it" in out, out[-3000:]
    assert f"resumed from {own / TAG6}" in out
    assert sorted(metrics(str(tmp_path / "c"))[0]) == [7]


def test_crash_during_conversion_leaves_checkpoint_intact(reference, monkeypatch, tmp_path):
    """A conversion that dies half-way leaves no universal/ and an untouched checkpoint; the
    next attempt converts from scratch."""
    from ponder_pt.engine import reshard
    from ponder_pt.weights.files import verify

    _, ref_ckpt = reference
    ckpt = tmp_path / "ckpt"
    _copy_step3(ref_ckpt, ckpt)
    before = {p.name: p.read_bytes() for p in (ckpt / TAG3).iterdir()}
    (ckpt / TAG3 / "universal.tmpKILLED").mkdir()  # left by a conversion killed outright

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(reshard, "_engine_state", crash)
    with pytest.raises(OSError):
        _universal(str(ckpt), TAG3)
    assert sorted(p.name for p in (ckpt / TAG3).iterdir()) == sorted(before)
    assert all((ckpt / TAG3 / k).read_bytes() == v for k, v in before.items())
    assert verify(str(ckpt), TAG3) is None
    monkeypatch.undo()
    full, meta = _universal(str(ckpt), TAG3)
    assert meta["step"] == 3.0 and "layers.0.attn.qkv.weight" in full


def test_optimizer_shards_without_adams_step_stop_the_resume(reference, tmp_path):
    """The newest checkpoint's ZeRO shard lost Adam's step (its sizes re-recorded, so it is
    not provably corrupt): converting it for DP=2 is an error naming the tag, not step 0; with
    checkpoint.fallback_to_older the previous tag is converted instead."""
    from ponder_pt.config import load_run_config
    from ponder_pt.engine.checkpoint import CheckpointLoadError, CheckpointManager
    from ponder_pt.weights.files import file_sizes

    _, ref_ckpt = reference
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ref_ckpt, ckpt, ignore=shutil.ignore_patterns("universal*"))
    shard = ckpt / TAG6 / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    sd = torch.load(shard, weights_only=False)
    for state in sd["optimizer_state_dict"]["base_optimizer_state"]["state"].values():
        state.pop("step")
    torch.save(sd, shard)
    meta_path = ckpt / TAG6 / "ponder_meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "files": file_sizes(str(ckpt / TAG6))}))

    model = load_run_config(str(ckpt)).model
    for fallback in (False, True):
        manager = CheckpointManager(str(ckpt), 3, 0, 2, barrier=lambda: None,
                                    log=lambda *a: None, dp=2, zero_stage=1,
                                    fallback_to_older=fallback)
        if not fallback:
            with pytest.raises(CheckpointLoadError) as err:
                manager.prepare_resume(None, model)
            assert f"{ckpt / TAG6}: cannot convert it" in str(err.value)
            assert "record no Adam step" in str(err.value)
        else:
            manager.prepare_resume(None, model)
            assert manager.elastic[1] == TAG3


# ------------------------------------------------------------------ export / init at TP x PP

@pytest.fixture(scope="module")
def tp2pp2(prepared, bpe_dir, tmp_path_factory):
    """The reference run at TP=2 x PP=2 (4 processes): its checkpoint.dir."""
    run = tmp_path_factory.mktemp("tp2pp2")
    _run(run, prepared, bpe_dir, run / "ckpt", _layout(tp=2, pp=2, zero=1), 4)
    return str(run / "ckpt")


def test_tp2_pp2_checkpoint_exports_with_native_logits(tp2pp2, reference, tmp_path):
    from ponder_pt.export import checkpoint_to_hf
    from ponder_pt.export.native import read_checkpoint
    from ponder_pt.inference import NativeModel

    ids = [5, 17, 300, 42, 599, 7, 8, 120, 64, 3, 11, 250]
    cfg, full, tag = read_checkpoint(tp2pp2)
    assert (cfg.parallel.tp, cfg.parallel.pp, tag) == (2, 2, TAG6)
    _, single, _ = read_checkpoint(reference[1])  # 1 process, same seed and data
    assert full.keys() == single.keys()
    for k in full:  # TP shards merged in the right order: the 1-process run's weights
        assert full[k].shape == single[k].shape
        if full[k].ndim >= 2:  # (Adam turns the key bias's zero gradient into noise)
            assert (full[k] - single[k]).abs().max().item() < 1e-4, k
    out = str(tmp_path / "hf")
    checkpoint_to_hf(tp2pp2, out, progress=False)
    res = stock_check([{"path": out, "rows": [ids, ids[3:9]], "n_new": 4}])[0]
    native = NativeModel(tp2pp2).logits(torch.tensor([ids]))[0]
    assert (torch.tensor(res["logits"]) - native).abs().max().item() <= 1e-5


def test_init_from_into_pp2_gives_single_process_first_loss(tp2pp2, reference, prepared,
                                                            bpe_dir, tmp_path):
    ref_losses, _ = reference
    extra = ["train.iters=1", "train.eval_interval=100", f"checkpoint.init_from={tp2pp2}"]
    run_train(str(tmp_path / "one"), prepared, bpe_dir, extra)
    run_train(str(tmp_path / "pp2"), prepared, bpe_dir, extra + _layout(pp=2), nproc=2)
    one, pp2 = metrics(str(tmp_path / "one"))[0], metrics(str(tmp_path / "pp2"))[0]
    assert pp2[1] == pytest.approx(one[1], rel=REL)
    assert abs(one[1] - ref_losses[1]) > 1e-3  # the trained weights, not the seeded init
