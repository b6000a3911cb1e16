"""experiments/adaptive_report.py: the adaptive study's verdicts on crafted scorings (a win only
where the paired interval over the windows lies below 0), a report that uses every planned run
and random draw or fails naming the missing one, the stage failing before it trains anything
while a fixed-K seed is untrained, and the README block rendered from the json (the committed
one included)."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from types import SimpleNamespace

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from experiments import adaptive_report as ar  # noqa: E402
from experiments.adaptive import stage_adaptive  # noqa: E402
from experiments.study import load_study_config, plan_runs  # noqa: E402

W = 40  # windows of the crafted scorings


def _noise(seed: int, scale: float) -> list:
    rng = random.Random(seed)
    return [rng.gauss(0.0, scale) for _ in range(W)]


def _point(q: float, diff: list, hist=(0.5, 0.5), base: float = 4.0, draws: int = 3) -> dict:
    """A scored q: random windows around `base`, halting = random + diff (per window)."""
    rand = [base + x for x in _noise(int(q * 100), 0.3)]
    loss = [r + d for r, d in zip(rand, diff)]
    mean = sum(rand) / W
    return {"q": q, "passes": 1.0 + sum(k * h for k, h in enumerate(hist)),
            "loss": sum(loss) / W, "hist": list(hist), "loss_windows": loss,
            "random_windows": rand, "random_draws": [mean - 0.001, mean, mean + 0.001][:draws]}


def _by_exit() -> list:
    return [{"pass": 1, "tokens": 60, "ce_sum": 60 * 3.5, "fixed_k_ce_sum": 60 * 3.6},
            {"pass": 2, "tokens": 40, "ce_sum": 40 * 4.5, "fixed_k_ce_sum": 40 * 4.6}]


def _doc(curve: list, extra_seed_curve: list | None = None) -> dict:
    """A format-2 adaptive.json with K = 1: fixed K = 0 (2 seeds) and K = 1 (3 seeds), one
    adaptive group (a second seed when `extra_seed_curve` is given)."""
    fixed = {"plain": (0, 1, 4.3), "plain.s2": (0, 2, 4.4), "ponder_k1": (1, 1, 4.0),
             "ponder_k1.s2": (1, 2, 4.1), "ponder_k1.s3": (1, 3, 4.2)}
    runs = {"adaptive_x": dict(group="adaptive_x", variant="palbert_dense", seed=1, iters=4,
                               fixed_k_loss=4.2, curve=curve, by_exit_q=0.5, by_exit=_by_exit())}
    if extra_seed_curve is not None:
        runs["adaptive_x.s2"] = dict(runs["adaptive_x"], seed=2, curve=extra_seed_curve)
    return {"format": ar.FORMAT, "K": 1, "scale": "cpu", "windows": W, "tokens": W * 8,
            "settings": {"q": 0.5, "random_draws": 3, "by_exit_q": 0.5},
            "bootstrap": {"resamples": 2000, "seed": 0, "level": 0.95},
            "planned": {"fixed": list(fixed), "runs": list(runs)},
            "stage": {"started": "2026-12-07 10:00:00", "wall_s": 1242.0, "train_wall_s": 1100.0,
                      "trained": sorted(runs), "jobs": 2, "threads_per_job": 1,
                      "load_1min": {"start": 2.1, "end": 2.3}, "cpus": 2},
            "fixed": {n: {"group": n.split(".")[0], "K": k, "seed": s, "loss": v}
                      for n, (k, s, v) in fixed.items()},
            "runs": runs}


def test_verdicts_on_crafted_curves():
    win = _point(0.1, [-0.05 + x for x in _noise(1, 0.01)])       # clearly below random
    loss = _point(0.2, [0.05 + x for x in _noise(2, 0.01)])       # clearly above
    tie = _point(0.3, [x - sum(_noise(3, 0.05)) / W for x in _noise(3, 0.05)])  # mean 0, noisy
    zero = _point(0.4, [0.0] * W)                                 # identical, exits differ
    same = _point(0.5, [0.0] * W, hist=(1.0, 0.0))                # one exit pass for all
    g = ar.summarise(_doc([win, loss, tie, zero, same]))["summary"]["adaptive_x"]
    by_q = {c["q"]: c for c in g["curve"]}
    assert [by_q[q]["verdict"] for q in (0.1, 0.2, 0.3, 0.4, 0.5)] == \
        ["win", "loss", "tie", "tie", "same exits"]
    assert by_q[0.1]["vs_random"]["hi"] < 0 < by_q[0.2]["vs_random"]["lo"]
    assert by_q[0.3]["vs_random"]["lo"] < 0 < by_q[0.3]["vs_random"]["hi"]
    assert by_q[0.4]["vs_random"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "rows": W}
    assert by_q[0.1]["vs_random"]["diff"] == pytest.approx(win["loss"] - 4.0 - (
        sum(win["random_windows"]) / W - 4.0))
    assert g["tally"] == {"win": [0.1], "loss": [0.2], "tie": [0.3, 0.4], "same exits": [0.5]}
    assert g["beats_random"] is False
    line = ar.verdict(ar.summarise(_doc([win, loss, tie, zero, same])))[0]
    assert "beats random exits at q = 0.1 only" in line and "worse than random at q = 0.2" in line
    assert "within noise (the interval includes 0) at q = 0.3, 0.4" in line

    # every q where the exits differ is a win: the claim holds, the same-exit q is named apart
    g = ar.summarise(_doc([win, same]))["summary"]["adaptive_x"]
    assert g["beats_random"] is True
    line = ar.verdict(ar.summarise(_doc([win, same])))[0]
    assert "beats random exits at every q where tokens exit at different passes (q = 0.1)" in line
    assert "at q = 0.5 every token exits at one pass" in line
    # ties and exact zeros are no wins; same exits alone compare nothing
    assert ar.summarise(_doc([tie, zero]))["summary"]["adaptive_x"]["beats_random"] is False
    assert "does not beat random exits at any q" in ar.verdict(ar.summarise(_doc([tie, zero])))[0]
    assert ar.summarise(_doc([same]))["summary"]["adaptive_x"]["beats_random"] is None
    # an empty curve passes nothing
    with pytest.raises(ValueError, match="empty curve"):
        ar.tally([])
    with pytest.raises(SystemExit, match="adaptive_x was scored at no q"):
        ar.summarise(_doc([]))


def test_seeds_are_averaged_per_window_and_every_fixed_seed_counts():
    a = _point(0.5, [-0.05] * W)
    b = dict(_point(0.5, [0.05] * W))  # the second seed is as much worse: the mean is a tie
    doc = ar.summarise(_doc([a], [b]))
    c = doc["summary"]["adaptive_x"]["curve"][0]
    assert c["vs_random"]["diff"] == pytest.approx(0.0, abs=1e-12) and c["verdict"] == "tie"
    assert c["loss_std"] > 0 and doc["summary"]["adaptive_x"]["seeds"] == [1, 2]
    fs = doc["fixed_summary"]
    assert fs[1]["n"] == 3 and fs[1]["seeds"] == [1, 2, 3]
    assert fs[1]["loss"] == pytest.approx(4.1) and fs[1]["std"] == pytest.approx(0.1)
    assert fs[0]["n"] == 2
    # the by-exit table pools both seeds' tokens
    assert doc["summary"]["adaptive_x"]["by_exit"][0] == {
        "pass": 1, "share": 0.6, "tokens": 120, "loss": 3.5, "fixed_k_loss": pytest.approx(3.6)}
    md = ar.section(doc)
    assert "| 1 | 2 | 4.1000 ± 0.1000 | 3 (1, 2, 3) |" in md


def test_report_fails_naming_what_is_missing():
    doc = _doc([_point(0.5, [-0.05] * W)])
    del doc["fixed"]["ponder_k1.s2"]  # a fixed-K seed the plan asked for
    with pytest.raises(SystemExit, match=r"fixed-K run\(s\) ponder_k1.s2, .*--stages runs "
                                         r"--only ponder_k1.s2"):
        ar.summarise(doc)
    doc = _doc([_point(0.5, [-0.05] * W)], [_point(0.5, [-0.05] * W)])
    del doc["runs"]["adaptive_x.s2"]  # a variant's seed
    with pytest.raises(SystemExit, match=r"adaptive run\(s\) adaptive_x.s2.*--stages adaptive"):
        ar.summarise(doc)
    doc = _doc([_point(0.5, [-0.05] * W, draws=2)])  # fewer draws than the settings
    with pytest.raises(SystemExit, match="2 random draws, the settings ask for 3"):
        ar.summarise(doc)
    doc = _doc([_point(0.5, [-0.05] * W)])
    doc["runs"]["adaptive_x"]["curve"][0]["loss_windows"].pop()
    with pytest.raises(SystemExit, match="39 / 40 window losses for 40 windows"):
        ar.summarise(doc)
    doc = _doc([_point(0.5, [-0.05] * W)])
    doc["fixed"]["ponder_k1.s9"] = dict(doc["fixed"]["ponder_k1"], seed=9)
    with pytest.raises(SystemExit, match="ponder_k1.s9 that its plan"):
        ar.summarise(doc)
    old = _doc([_point(0.5, [-0.05] * W)])
    del old["format"]  # what the stage wrote before the plan and the windows were recorded
    with pytest.raises(SystemExit, match="format None.*rerun the stage"):
        ar.summarise(old)


def test_stage_fails_before_training_while_a_fixed_seed_is_untrained(tmp_path):
    sc = load_study_config("toy")
    logged = []
    study = SimpleNamespace(sc=sc, runs=plan_runs(sc), out=str(tmp_path),
                            work=str(tmp_path / "work"), only=["plain"], log=logged.append,
                            run_dir=lambda r: str(tmp_path / "work" / "runs" / r["name"]))
    for name in ("plain", "plain.s99", "ponder_k1", "ponder_k3"):  # trained: step 4 saved
        (tmp_path / "work" / "runs" / name / "ckpt").mkdir(parents=True)
        (tmp_path / "work" / "runs" / name / "ckpt" / "latest").write_text("step_00000004")
    with pytest.raises(SystemExit) as e:
        stage_adaptive(study)
    msg = str(e.value)
    assert "ponder_k3.s99 is not trained" in msg and "plain," not in msg
    assert (f"--scale toy --out {tmp_path} --stages runs --only ponder_k3.s99" in msg)
    assert logged == [] and not (tmp_path / "work" / "runs" / "adaptive_calibrated").exists()
    for key, value, hint in (("qs", [], "adaptive.qs=\\[0.3,0.6\\]"),
                             ("qs", [0.5, 1.0], "each in \\(0, 1\\)"),
                             ("random_draws", 0, "adaptive.random_draws=8")):
        study.sc = load_study_config("toy", [f"adaptive.{key}={json.dumps(value)}"])
        with pytest.raises(SystemExit, match=hint):
            stage_adaptive(study)


def test_readme_block_written_checked_and_hand_edits_caught(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    win = _point(0.5, [-0.05 + x for x in _noise(1, 0.01)], hist=(0.8, 0.2))  # 1.2 passes
    (tmp_path / "results" / "adaptive.json").write_text(json.dumps(_doc([win])))
    readme = tmp_path / "README.md"
    readme.write_text("# e\n\n<!-- adaptive-table results/adaptive.json -->\nold\n"
                      "<!-- /adaptive-table -->\nafter\n")
    assert ar.main(["--readme", str(readme), "--check"]) == 1
    assert "is not what its json says" in capsys.readouterr().err
    assert ar.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.endswith("<!-- /adaptive-table -->\nafter\n")
    assert ("took 20.7 min: 1 of its 1 runs trained there (2 at a time, 18.3 min), then the "
            "scoring; 1-minute load average 2.1 at the start, 2.3 at the end, on 2 CPUs") in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| palbert_dense |"))
    iv = ar.summarise(_doc([win]))["summary"]["adaptive_x"]["curve"][0]["vs_random"]
    assert row.split(" | ")[1:4] == ["1", "0.5", "1.20"]
    assert f"{iv['diff']:+.4f} [{iv['lo']:+.4f}, {iv['hi']:+.4f}] | win |" in row
    assert "4.1000 ± 0.1000 (3)" in row and "K = 1: 4.1000 ± 0.1000 (3)" in row
    assert "- adaptive_x (1 seed): halting beats random exits at every q" in text
    assert ar.main(["--readme", str(readme), "--check"]) == 0
    readme.write_text(text.replace("(3) |", "(1) |", 1))  # a hand-edited seed count
    assert ar.main(["--readme", str(readme), "--check"]) == 1
    readme.write_text(text.replace("results/adaptive.json -->", "results/gone.json -->"))
    with pytest.raises(SystemExit, match="results/gone.json .* does not exist"):
        ar.main(["--readme", str(readme), "--check"])
    # --render writes the report and splices the section into an existing results.md
    (tmp_path / "results" / "results.md").write_text("# R\n\n## A\n\nx\n")
    ar.main(["--render", str(tmp_path / "results")])
    md = (tmp_path / "results" / "adaptive.md").read_text()
    assert md.startswith(ar.HEADING) and "| 0.5 | 1.20 |" in md and "| win |" in md
    assert md.strip() in (tmp_path / "results" / "results.md").read_text()


def test_committed_adaptive_outputs_are_the_render_of_the_committed_json(tmp_path, capsys):
    """experiments/README.md's adaptive block, results/adaptive.md and the results.md section
    are what the committed adaptive.json renders to; without a committed adaptive.json, no
    adaptive numbers are shown: no README block and no results.md section."""
    results = os.path.join(REPO, "experiments", "results")
    with open(os.path.join(results, "results.md"), encoding="utf-8") as fh:
        results_md = fh.read()
    with open(ar.README, encoding="utf-8") as fh:
        readme = fh.read()
    if not os.path.exists(os.path.join(results, "adaptive.json")):
        assert ar.HEADING.strip() not in results_md
        assert not ar.BLOCK.search(readme)
        assert not os.path.exists(os.path.join(results, "adaptive.md"))
        return
    assert ar.main(["--readme", ar.README, "--check"]) == 0, capsys.readouterr().err
    for name in ("adaptive.json", "results.md"):
        shutil.copy(os.path.join(results, name), tmp_path / name)
    ar.render(str(tmp_path))
    for name in ("adaptive.md", "results.md"):
        with open(os.path.join(results, name), encoding="utf-8") as fh:
            assert (tmp_path / name).read_text() == fh.read(), name
