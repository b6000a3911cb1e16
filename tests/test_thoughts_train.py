"""Latent thoughts under DeepSpeed: ZeRO-3 and TP 2 with sequence parallelism and vocabulary
chunks reproduce the single-process run, whose Jacobi iterations are drawn per step; a resume
draws them again as the uninterrupted run did. The dry run counts the passes."""

import shutil

import pytest

from train_utils import metrics, run_train
from zygote import ponder

REL = 2e-5  # fp32, different reduction orders
THOUGHTS = ["ponder.steps=0", "pause.rate=0", "thoughts.count=1", "thoughts.train_iters=[1,2]",
            "thoughts.jacobi_iters=2"]


def _rows(run_dir):
    import json

    with open(f"{run_dir}/metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def thought_run(prepared, bpe_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("thoughts_ref")
    run_train(str(run), prepared, bpe_dir, [*THOUGHTS, f"checkpoint.dir={run}/ckpt",
                                            "checkpoint.interval=2"])
    return run


def _assert_same(got, ref, rel=REL):
    (train, valid), (ref_train, ref_valid) = got, ref
    assert sorted(train) == sorted(ref_train) == [1, 2, 3, 4]
    for step, loss in ref_train.items():
        assert train[step] == pytest.approx(loss, rel=rel), (step, train, ref_train)
    assert valid[4] == pytest.approx(ref_valid[4], rel=rel)


def test_single_process_draws_iters_and_learns(thought_run):
    rows = [r for r in _rows(thought_run) if "loss" in r]
    assert {r["thought_iters"] for r in rows} == {1, 2}  # the draw varies by step
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.parametrize("layout", [
    ["parallel.zero_stage=3"],
    ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2",
     "model.vocab_chunk=200"],
], ids=["zero3", "tp2_sp_chunk"])
def test_layouts_match_single_process(layout, thought_run, prepared, bpe_dir, tmp_path):
    run_train(str(tmp_path), prepared, bpe_dir, [*THOUGHTS, *layout], nproc=2)
    _assert_same(metrics(str(tmp_path)), metrics(str(thought_run)))
    assert ([r.get("thought_iters") for r in _rows(tmp_path)]
            == [r.get("thought_iters") for r in _rows(thought_run)])


def test_resume_draws_the_same_iters(thought_run, prepared, bpe_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(thought_run / "ckpt", ckpt)
    shutil.rmtree(ckpt / "step_00000004")  # as if the run died after step 3
    (ckpt / "latest").write_text("step_00000002")
    out = run_train(str(tmp_path), prepared, bpe_dir,
                    [*THOUGHTS, f"checkpoint.dir={ckpt}", "checkpoint.interval=2"]).stdout
    assert "training steps 2..4" in out
    resumed, ref = _rows(tmp_path), _rows(thought_run)
    for step in (3, 4):
        got = next(r for r in resumed if r.get("step") == step and "loss" in r)
        want = next(r for r in ref if r.get("step") == step and "loss" in r)
        assert got["thought_iters"] == want["thought_iters"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)


def test_bad_combinations_are_refused_before_any_process(prepared, bpe_dir, tmp_path):
    proc = run_train(str(tmp_path), prepared, bpe_dir,
                     ["thoughts.count=1", "ponder.steps=2", "pause.rate=0.1", "parallel.pp=2",
                      "pause.mode=every_token"], nproc=2, check=False)
    assert proc.returncode != 0
    err = proc.stderr
    for needle in ("thoughts.count=1 with ponder.steps=2",
                   "thoughts.count=1 with pause.rate=0.1",
                   "thoughts.count=1 is not supported with pipeline parallelism",
                   "pause.mode=every_token with pause.rate=0.1",
                   "pause.mode=every_token with thoughts.count=1",
                   "pause.mode=every_token is not supported with pipeline parallelism"):
        assert needle in err, err[-3000:]
    assert "training steps" not in proc.stdout


def test_dry_run_counts_the_passes():
    out = ponder(["train", "--config", "tiny", "--dry-run", "--set", "thoughts.count=1",
                  "--set", "ponder.steps=0", "--set", "thoughts.train_iters=[3]"])
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "# latent thoughts" in text
    assert "n = 3: [1, 2, 2, 2, 2] slots per token" in text
    assert "2 one-slot passes per token" in text and "(2x plain)" in text


def test_gap_report_scores_jacobi_and_exact_on_the_same_windows(thought_run):
    """experiments/thought_gap.py on the trained run: Jacobi with as many iterations as
    positions is the exact loss; none differs from it; every asked row is reported."""
    from experiments.thought_gap import gap, table

    res = gap(str(thought_run / "ckpt"), [0, 32], windows=4, batch=2)
    rows = {(r["mode"], r["iters"]): r["loss"] for r in res["rows"]}
    assert set(rows) == {("jacobi", 0), ("jacobi", 32), ("exact", None)}
    assert rows["jacobi", 32] == pytest.approx(rows["exact", None], abs=1e-5)
    assert abs(rows["jacobi", 0] - rows["exact", None]) > 1e-4
    assert res["tokens"] > 0 and "| Jacobi, n = 0 |" in table(res)


def test_every_token_pauses_train_and_load(prepared, bpe_dir, tmp_path):
    """`pause.mode=every_token`: the trainer gives the model the tokenizer's <pause> row, the
    data stays free of pauses, and the checkpoint loads for generation with nothing appended
    to prompts."""
    from ponder_pt.inference.generate import generate_text
    from ponder_pt.inference.model import load_model

    run_train(str(tmp_path), prepared, bpe_dir,
              ["ponder.steps=0", "pause.rate=0", "pause.mode=every_token", "pause.per_token=1",
               f"checkpoint.dir={tmp_path}/ckpt"])
    train, _ = metrics(str(tmp_path))
    assert sorted(train) == [1, 2, 3, 4] and train[4] < train[1]
    lm = load_model(str(tmp_path / "ckpt"), device="cpu")
    assert lm.model.pause_slots == 1 and lm.model.pause_id == lm.pause_id
    assert lm.default_pauses == 0
    out = generate_text(lm, "the", max_new_tokens=3, greedy=True)
    assert out["pauses"] == 0 and len(out["token_ids"]) == 3
    assert all(t < lm.vocab_rows for t in out["token_ids"])


def test_generate_cli_prefill_modes(thought_run, tmp_path):
    """`generate --thought-prefill exact|jacobi` on the trained run: both give tokens (the
    prompt's thoughts differ only by training's approximation); a model without thoughts
    refuses the option, naming it."""
    import json

    outs = {}
    for mode in ("exact", "jacobi"):
        proc = ponder(["generate", "--model", str(thought_run / "ckpt"), "--prompt", "the cat",
                       "--greedy", "--max-new-tokens", "4", "--json", "--thought-prefill", mode])
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["token_ids"]
        assert len(outs[mode]) == 4
    plain = tmp_path / "plain"
    shutil.copytree(thought_run / "ckpt", plain)
    cfg = (plain / "run_config.yaml").read_text().replace("count: 1", "count: 0")
    (plain / "run_config.yaml").write_text(cfg)
    proc = ponder(["generate", "--model", str(plain), "--prompt", "the", "--thought-prefill",
                   "jacobi"])
    assert proc.returncode != 0
    assert "--thought-prefill needs a latent-thoughts model" in proc.stderr
