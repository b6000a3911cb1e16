"""The miniature study (experiments/) end to end at toy size, its rerun skipping finished runs,
and its config / plan handling."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import zygote  # noqa: E402
from _json_helpers import _numbers  # noqa: E402
from experiments import adaptive_report  # noqa: E402
from experiments.bootstrap import paired_bootstrap  # noqa: E402
from experiments.pause_ft import scale_steps, corpus_rows  # noqa: E402
from experiments.pause_ft_report import (backbone_provenance, render,  # noqa: E402
                                         splice_section, summarize)
from experiments.study import load_study_config, plan_runs  # noqa: E402


def _study(out, *extra, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    if zygote.ENABLED:  # the study's jobs forked from an interpreter with everything imported
        client = os.path.join(REPO, "tests", "zygote_client.py")
        env.update(PONDER_ZYGOTE_SOCKET=zygote.server_socket(env),
                   PONDER_JOB_PYTHON=shlex.join([sys.executable, client]))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "experiments.study", "--toy", "--out", str(out),
                           *extra], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"study exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc.stdout, time.time() - t0


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    stdout, _ = _study(out)
    return out, stdout


@pytest.mark.slow
def test_toy_study_reports_every_run(toy):
    out, stdout = toy
    planned = [r["name"] for r in plan_runs(load_study_config("toy"))]
    for name in ("results.md", "results.json", "loss_curves.png", "pauses.png"):
        assert (out / name).stat().st_size > (1000 if name.endswith(".png") else 100), name
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["runs"]) == sorted(planned)
    assert {r["kind"] for r in res["runs"].values()} == {"plain", "ponder", "looped", "pause",
                                                         "plain_long", "thoughts",
                                                         "pause_every"}
    for name, ev in res["runs"].items():
        numbers = dict(_numbers(ev))
        assert numbers and all(math.isfinite(v) for v in numbers.values()), name
        assert ev["final"]["valid_ppl"] > 1 and ev["curve"], name
        assert ev["curve"][-1]["valid_loss"] == ev["final"]["valid_loss"]  # same windows
        assert ev["task"]["0"]["examples"] > 0
    pause = next(ev for ev in res["runs"].values() if ev["kind"] == "pause")
    assert sorted(pause["task"], key=int) == ["0", "2", "10"]
    assert pause["pause_valid"]["valid_tokens"] < pause["final"]["valid_tokens"]
    # FLOPs: K passes cost more, the looped passes less than pondering's, x2 tokens = 2x plain
    r = res["runs"]
    assert r["ponder_k3"]["final"]["flops"] > r["looped_k3"]["final"]["flops"] > \
        r["plain"]["final"]["flops"]
    assert r["plain_x2"]["final"]["flops"] == pytest.approx(2 * r["plain"]["final"]["flops"])
    # latent thoughts: more FLOPs than pondering K=3, scored exactly and with Jacobi
    th = r["thoughts_m1"]["final"]
    assert th["flops"] > r["ponder_k3"]["final"]["flops"]
    assert math.isfinite(th["valid_loss_jacobi"]) and th["valid_loss_jacobi"] != th["valid_loss"]
    every = r["pause_every_m1"]  # one pass over twice the slots (the head once per token)
    assert every["config"]["pause_every"] == 1 and "pause_valid" not in every
    assert every["final"]["flops"] > 1.5 * r["plain"]["final"]["flops"]
    assert "nan" not in (out / "results.json").read_text().lower()
    md = (out / "results.md").read_text()
    for name in planned:
        assert f"| {name} |" in md, name
    assert "- **Exact thoughts vs training's Jacobi (n=3)**: validation loss" in md
    for section in ("## Equal tokens", "## Equal training FLOPs", "## Pause tokens",
                    "## The papers' claims", "## Early exit", "## Pause fine-tuning"):
        assert section in md
    # the pause paper's 2x2 with `ponder-pt sft` on a synthetic and a corpus task, every 2x2
    # cell scored at M = 0, 2, 5, 10; pondering K = 1 and its equal-FLOPs K = 0 row (toy: one
    # fine-tuning seed, pondering on the first task only)
    pft = res["pause_ft"]
    cells = ["StdPT_StdFT", "StdPT_PauseFT", "PausePT_StdFT", "PausePT_PauseFT"]
    assert [(s["task_name"], s["label"]) for s in pft["summary"]] == [
        *(("addition1", c) for c in [*cells, "K1", "K0x2"]),
        *(("corpus_next6", c) for c in cells)]
    assert len(pft["rows"]) == 10
    for s in pft["summary"]:
        assert s["seeds"] == [0], s["label"]
        if s["group"] == "2x2":
            assert sorted(s["scores"], key=int) == ["0", "2", "5", "10"]
        else:
            assert list(s["scores"]) == ["0"]
        assert s["scores"]["0"]["n"] == 1 and 0 <= s["scores"]["0"]["mean"] <= 1
    first = pft["summary"][0]
    assert first["label"] == "StdPT_StdFT" and first["scores"]["2"]["mean"] is None  # no <pause>
    assert all(s["scores"]["2"]["n"] == 1 for s in pft["summary"][1:4])
    flops = next(s for s in pft["summary"] if s["label"] == "K0x2")
    assert flops["mult"] == 2 and flops["matches_k"] == 1 and flops["run"] in ("plain", "plain_x2")
    assert "equal FLOPs with K=1" in md
    # every unit's score on each test row, its score their mean; pause_ft.json / .md beside
    assert json.loads((out / "pause_ft.json").read_text()) == pft
    lines = [json.loads(x) for x in (out / "pause_ft_scores.jsonl").read_text().splitlines()]
    scored = [(u, m) for u in pft["rows"] for m, v in u["scores"].items() if v is not None]
    assert len(lines) == len(scored) == 10 * 1 + 6 * 3  # M=0 everywhere, 2/5/10 with <pause>
    for u, m in scored:
        (line,) = [x for x in lines if (x["task"], x["label"], x["seed"], x["M"])
                   == (u["task_name"], u["label"], u["seed"], int(m))]
        assert len(line["scores"]) == u["examples"] == 8
        assert sum(line["scores"]) / 8 == pytest.approx(u["scores"][m])
    kinds = [(c["task"], c["kind"]) for c in pft["intervals"]]
    assert kinds.count(("addition1", "2x2")) == 3 and ("addition1", "flops") in kinds
    assert ("corpus_next6", "collapse") in kinds and ("corpus_next6", "ponder") not in kinds
    assert all(c["lo"] <= c["diff"] <= c["hi"] and c["rows"] == 8 for c in pft["intervals"])
    assert pft["bootstrap"] == {"resamples": 10000, "seed": 0, "level": 0.95}
    assert [t["rows"] for t in pft["test_sets"]] == [8, 8]
    assert set(pft["backbones"]) == {"plain", "pause", "ponder_k1", flops["run"]}
    assert pft["backbones"]["ponder_k1"]["pretraining_flops"] == \
        res["runs"]["ponder_k1"]["final"]["flops"]
    report = (out / "pause_ft.md").read_text()
    assert "## Differences with 95 % intervals" in report and "### Differences between cells" in md
    # the report rebuilds from the two saved files alone
    again = out / "rerender"
    again.mkdir()
    for name in ("pause_ft.json", "pause_ft_scores.jsonl"):
        (again / name).write_text((out / name).read_text())
    render(str(again))
    assert (again / "pause_ft.md").read_text() == report
    # early exit on the study's own plain model, exported to HF: every strategy, its sweep
    ee = res["early_exit"]
    assert ee["backbone"] == "plain" and (out / "early_exit.png").stat().st_size > 1000
    assert {r["strategy"] for r in ee["rows"]} == {"palbert", "pabee"}
    assert all(1 <= r["avg_exit_layer"] <= r["num_layers"] for r in ee["rows"])
    # adaptive pondering: a halting run and the head-only calibration of ponder_k3, each
    # swept over q beside fixed K = 0, 1, 3 and random exits on the same windows
    ad = res["adaptive"]
    assert set(ad["summary"]) == {"adaptive_palbert_frozen", "adaptive_calibrated"}
    assert sorted(ad["fixed_summary"], key=int) == ["0", "1", "3"]
    # every seed of the plan in the fixed-K means (two in the toy config)
    assert [ad["fixed_summary"][k]["n"] for k in ("0", "1", "3")] == [2, 1, 2]
    assert sorted(ad["fixed"]) == sorted(ad["planned"]["fixed"]) == \
        ["plain", "plain.s99", "ponder_k1", "ponder_k3", "ponder_k3.s99"]
    assert ad["fixed"]["ponder_k3"]["K"] == 3
    assert sorted(ad["stage"]["trained"]) == sorted(ad["planned"]["runs"])  # the first call
    assert ad["stage"]["wall_s"] >= ad["stage"]["train_wall_s"] > 0
    for name, r in ad["runs"].items():
        for c in r["curve"]:
            assert len(c["random_draws"]) == 2 and len(c["loss_windows"]) == 8, name
    for g in ad["summary"].values():
        assert [c["q"] for c in g["curve"]] == [0.3, 0.6]
        for c in g["curve"]:
            assert 1.0 <= c["passes"] <= 4.0 and math.isfinite(c["random_loss"])
            iv = c["vs_random"]
            assert iv["lo"] <= iv["diff"] <= iv["hi"] and iv["rows"] == 8
            assert c["verdict"] in ("win", "loss", "tie", "same exits")
            assert (c["verdict"] == "win") == (iv["hi"] < 0 and c["verdict"] != "same exits")
        assert sum(b["share"] for b in g["by_exit"]) == pytest.approx(1.0)
    calibrated = ad["runs"]["adaptive_calibrated"]
    # head-only: the backbone is ponder_k3's, so q = 1 scores exactly ponder_k3
    assert calibrated["fixed_k_loss"] == pytest.approx(ad["fixed"]["ponder_k3"]["loss"], rel=1e-6)
    assert "## Adaptive pondering" in md and "**Verdict.**" in md
    assert (out / "adaptive.png").stat().st_size > 1000
    assert (out / "adaptive.md").read_text().strip() in md
    assert "halting − random [95 % interval]" in md
    # the report and a README block rebuild from adaptive.json alone
    again = out / "rerender_adaptive"
    again.mkdir()
    (again / "adaptive.json").write_text((out / "adaptive.json").read_text())
    adaptive_report.render(str(again))
    assert (again / "adaptive.md").read_text() == (out / "adaptive.md").read_text()
    readme = again / "README.md"
    readme.write_text("<!-- adaptive-table adaptive.json -->\n<!-- /adaptive-table -->\n")
    assert adaptive_report.main(["--readme", str(readme)]) == 0
    block = readme.read_text()
    assert "| palbert_frozen | 1 |" in block and "toy scale: a pipeline check" in block
    assert adaptive_report.main(["--readme", str(readme), "--check"]) == 0
    summary = res["summary"]
    assert summary["plain"]["valid_loss"]["n"] == 2  # two seeds in the toy config
    assert all(math.isfinite(v) for _, v in _numbers(summary))
    # only the final checkpoint of each run is kept
    ckpt = out / "work" / "runs" / "plain_x2" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_")) == ["step_00000008"]


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_rewrites_the_report(toy):
    out, _ = toy
    before = (out / "results.md").stat().st_mtime
    stdout, seconds = _study(out)
    n = len(plan_runs(load_study_config("toy")))
    assert f"runs: {n} planned, {n} already done, 0 to run" in stdout
    assert "start " not in stdout
    assert "adaptive: training 2 runs" in stdout and "retraining" not in stdout
    stage = json.loads((out / "adaptive.json").read_text())["stage"]
    assert stage["trained"] == [] and stage["train_wall_s"] <= stage["wall_s"]
    assert (out / "results.md").stat().st_mtime > before
    assert seconds < 120


def test_config_layers_and_overrides():
    toy = load_study_config("toy", ["train.base_iters=6", "runs.seeds=[1, 2, 3]"])
    assert toy["scale"] == "toy" and toy["train"]["base_iters"] == 6
    assert toy["eval"]["device"] == "cpu"  # inherited from cpu.yaml (base: cpu)
    runs = {r["name"]: r for r in plan_runs(toy)}
    assert {"plain", "plain.s2", "plain.s3", "ponder_k1", "ponder_k3", "ponder_k3.s2",
            "looped_k3", "thoughts_m1", "pause_every_m1", "pause", "plain_x2",
            "plain_x4"} <= set(runs)
    assert runs["plain_x4"]["iters"] == 24 and runs["looped_k3"]["feedback"] == "hidden"
    assert runs["pause"]["pause_rate"] == 0.1
    with pytest.raises(SystemExit, match="existing dotted.key"):
        load_study_config("toy", ["train.base_itres=6"])
    with pytest.raises(SystemExit, match="no such config"):
        load_study_config("nope")
    for scale in ("cpu", "gpu", "cluster"):
        sc = load_study_config(scale)
        assert plan_runs(sc) and sc["train"]["overrides"]


def test_every_scale_resolves_to_a_valid_trainer_config():
    """The trainer overrides of every scale are valid `ponder-pt train` configs."""
    from experiments.study import run_overrides

    from ponder_pt.config import load_config, problems

    data = {"padded_vocab_size": 50432, "train_prefix": "/x/train", "tokenizer": "/x/tok"}
    for scale in ("toy", "cpu", "gpu", "cluster"):
        sc = load_study_config(scale)
        sc["train_sets"] = []
        for run in plan_runs(sc):
            cfg = load_config(sc["train"]["config"], run_overrides(sc, run, data, "/x/run"),
                              validate=True)
            assert cfg.ponder.steps == run["ponder_steps"]
            assert cfg.ponder.feedback == run["feedback"]
            assert cfg.train.iters == run["iters"]
        # the adaptive stage's runs too (the calibration's init_from source is not there:
        # its shape check is the trainer's, tested elsewhere)
        from types import SimpleNamespace

        from experiments.adaptive import plan

        study = SimpleNamespace(sc=sc, runs=plan_runs(sc),
                                run_dir=lambda r: f"/x/runs/{r['name']}")
        adaptive = plan(study)
        assert {r["group"] for r in adaptive} >= {"adaptive_calibrated"}
        for run in adaptive:
            overrides = run_overrides(sc, run, data, "/x/run")
            cfg = load_config(sc["train"]["config"], overrides, validate=False)
            found = [p for p in problems(cfg, vocab_size=50432)
                     if "checkpoint.init_from" not in p]
            assert found == [], (scale, run["name"], found)
            assert cfg.ponder.halting.mode in ("palbert", "pondernet") and cfg.ponder.steps == 3
            assert cfg.ponder.halting.head_only == (run["group"] == "adaptive_calibrated")


def test_pause_ft_corpus_task_summary_and_equal_flops_steps():
    texts = ["alpha beta gamma delta alpha epsilon zeta beta theta iota kappa gamma lambda",
             "one two three four five six seven eight nine ten eleven twelve"]
    rows = corpus_rows(texts, 10, 0, 4)
    # next word, found earlier in its 4-word prompt, never "the"
    assert rows and all(r["answer"] in r["prompt"].split() and len(r["prompt"].split()) == 4
                        for r in rows)
    first = corpus_rows(texts, 10, 0, 4, mode="first")
    assert first and all(r["prompt"].endswith(" first:") and
                         r["prompt"].split()[0] == r["answer"] for r in first)
    assert corpus_rows(texts, 10, 0, 4) == rows  # deterministic
    summary = summarize([{"task_name": "t", "group": "2x2", "label": "a", "pt": "p", "ft": "f",
                          "run": "plain", "m": 0, "mult": 1, "K": 0, "matches_k": None,
                          "metric": "exact_match", "seed": s, "scores": {"0": v, "2": None}}
                         for s, v in ((0, 0.5), (1, 0.7), (2, 0.9))], [0, 2])
    (cell,) = summary
    assert cell["scores"]["0"]["mean"] == pytest.approx(0.7)
    assert cell["scores"]["0"]["std"] == pytest.approx(0.2)  # sample std over the seeds
    assert cell["scores"]["2"] == {"mean": None, "std": None, "n": 0}
    args = ["--max-steps", "120", "--eval-every", "60", "--lr", "1e-3"]
    assert scale_steps(args, 4) == ["--max-steps", "480", "--eval-every", "240", "--lr", "1e-3"]
    assert scale_steps(["--epochs", "3"], 2) == ["--epochs", "6"]


def test_paired_bootstrap_interval():
    """Seeded and paired: identical cells give exactly 0; 0/1 rows against zeros give the
    mean difference and an interval of about +-1.96 binomial standard errors."""
    same = [0.0, 1.0, 1.0, 0.5] * 25
    assert paired_bootstrap(same, same, 2000, 0, 0.95) == {"diff": 0.0, "lo": 0.0, "hi": 0.0,
                                                           "rows": 100}
    half = paired_bootstrap([1.0, 0.0] * 50, [0.0] * 100, 10000, 0, 0.95)
    assert half["diff"] == 0.5 and half["rows"] == 100
    assert half["lo"] == pytest.approx(0.5 - 1.96 * 0.05, abs=0.015)
    assert half["hi"] == pytest.approx(0.5 + 1.96 * 0.05, abs=0.015)
    assert paired_bootstrap([1.0, 0.0] * 50, [0.0] * 100, 10000, 0, 0.95) == half
    # pairing: b = a shifted by one everywhere has no spread at all
    a = [float(i % 3) for i in range(60)]
    assert paired_bootstrap([x + 1 for x in a], a, 1000, 3, 0.9)["lo"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-empty"):  # no rows: no interval at all
        paired_bootstrap([], [], 1000, 0, 0.95)


def test_pause_ft_section_spliced_into_results_md():
    md = "# R\n\n## A\n\ntext\n\n## Pause fine-tuning: old\n\nold\n\n### t\n\nx\n"
    new = "## Pause fine-tuning: old\n\nnew\n"
    assert splice_section(md, new) == "# R\n\n## A\n\ntext\n\n## Pause fine-tuning: old\n\nnew\n"
    assert splice_section("# R\n\n## A\n\ntext\n", new) == \
        "# R\n\n## A\n\ntext\n\n## Pause fine-tuning: old\n\nnew\n"
    before = "# R\n\n## Pause fine-tuning: old\n\nold\n\n## Errors\n\n- e\n"
    assert splice_section(before, new) == \
        "# R\n\n## Pause fine-tuning: old\n\nnew\n\n## Errors\n\n- e\n"


def test_pause_ft_section_says_whether_its_backbones_are_the_study_runs():
    doc = {"backbones": {"plain": {"valid_loss": 4.56596, "seed": 1234},
                         "pause": {"valid_loss": 4.70026, "seed": 1234}}}
    same = {"plain": {"final": {"valid_loss": 4.565954}},
            "pause": {"final": {"valid_loss": 4.70026}}}
    text = backbone_provenance(doc, same)
    assert "seed 1234" in text and "equal those of the same runs" in text
    other = {"plain": {"final": {"valid_loss": 4.60}}}
    assert "differ" in backbone_provenance(doc, other)
    assert "`plain`" in backbone_provenance(doc, other)
    assert "equal" not in backbone_provenance(doc, None)  # no study results to compare with
