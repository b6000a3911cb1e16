"""GLUE in its original distribution layout (tests/fixtures/glue/<TASK>/, written exactly as
GLUE's download script lays the files out: each task's own columns and label strings, MRPC's
BOM and quote characters, headerless CoLA, MNLI's dev_matched/dev_mismatched, QQP's malformed
rows), label ids as HF's `nyu-mll/glue` numbers them, and the one-line hub fallback."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from ponder_pt.early_exit.tasks import GLUE, load_task, resolve_task
from zygote import ponder

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "glue")

# task dir: (spec name, train labels, validation labels, test rows). Label ids follow
# nyu-mll/glue: RTE/QNLI entailment=0 not_entailment=1; WNLI 1 = entailment; MNLI
# entailment=0 neutral=1 contradiction=2; MRPC/QQP/SST-2/CoLA 0/1 as in the files.
EXPECTED = {
    "RTE": ("rte", [0, 1, 1, 0, 0, 1, 0, 1], [0, 1, 0, 1], 3),
    "QNLI": ("qnli", [0, 1, 0, 1, 0, 1], [1, 0, 1], 2),
    "WNLI": ("wnli", [1, 0, 1, 0, 1], [1, 0], 2),
    "MNLI": ("mnli", [0, 2, 1, 0, 2, 1], [0, 2, 1], 2),
    "MRPC": ("mrpc", [1, 0, 1, 0, 1], [1, 0], 3),
    "CoLA": ("cola", [1, 0, 1, 0, 1], [0, 1, 0], 2),
    "QQP": ("qqp", [1, 0, 1, 0, 1], [1, 0, 1], 2),
    "SST-2": ("sst2", [1, 0, 1, 0, 1, 0], [1, 0, 1], 2),
    "STS-B": ("stsb", [5.0, 3.8, 0.0, 4.2, 0.25], [0.0, 4.2, 0.25], 2),
}


@pytest.mark.parametrize("folder", sorted(EXPECTED))
def test_every_original_layout_loads_with_hub_label_ids(folder):
    name, train, valid, n_test = EXPECTED[folder]
    task = load_task(os.path.join(FIXTURES, folder), with_test=True)
    assert task.spec is GLUE[name]
    assert [r["label"] for r in task.train] == pytest.approx(train)
    assert [r["label"] for r in task.validation] == pytest.approx(valid)
    assert len(task.test) == n_test and all(r["label"] is None for r in task.test)
    width = len(task.spec.text_keys)
    assert all(len(r["texts"]) == width and all(r["texts"]) for r in task.train + task.test)
    if folder not in ("RTE", "QQP"):
        assert task.rejected == []


def test_text_columns_quotes_and_headerless_cola():
    mrpc = load_task(os.path.join(FIXTURES, "MRPC"))
    # the BOM does not hide the Quality column; an unbalanced quote stays inside its field
    assert mrpc.train[1]["texts"] == ('He called the plan "a disaster and left the room .',
                                      "The plan was approved by a wide margin .")
    mnli = load_task(os.path.join(FIXTURES, "MNLI"))
    assert mnli.train[0]["texts"] == ("The library extended its opening hours.",
                                      "The library is open longer.")
    cola = load_task(os.path.join(FIXTURES, "CoLA"), with_test=True)
    assert cola.train[1]["texts"] == ("They drank the pub.",)
    assert cola.test[0]["texts"] == ("Bill whistled past the house.",)


def test_planted_bad_rows_are_reported_with_file_and_line():
    rte = load_task(os.path.join(FIXTURES, "RTE"))
    assert [(os.path.relpath(r["file"], FIXTURES), r["line"]) for r in rte.rejected] == \
        [(os.path.join("RTE", "train.tsv"), 6)]
    assert "'maybe'" in rte.rejected[0]["reason"]
    assert "entailment, not_entailment" in rte.rejected[0]["reason"]
    qqp = load_task(os.path.join(FIXTURES, "QQP"))  # a malformed (short) row, as in GLUE's
    assert [(os.path.basename(r["file"]), r["line"]) for r in qqp.rejected] == [("train.tsv", 4)]
    assert "question2" in qqp.rejected[0]["reason"]


def test_mnli_mismatched_and_layout_detection(tmp_path):
    mm = load_task(os.path.join(FIXTURES, "MNLI"), task_format="mnli-mm", with_test=True)
    assert mm.spec.name == "mnli_mismatched" and [r["label"] for r in mm.validation] == [0, 2]
    assert len(mm.test) == 1
    # a folder not named after its task: MNLI/MRPC/QQP/STS-B/QNLI columns identify themselves
    for folder, name in (("MNLI", "mnli"), ("MRPC", "mrpc"), ("QQP", "qqp"), ("STS-B", "stsb")):
        dst = tmp_path / f"data_{name}"
        shutil.copytree(os.path.join(FIXTURES, folder), dst)
        assert load_task(str(dst)).spec is GLUE[name]
    # RTE and WNLI share their columns: the folder name or --task-format decides
    rte = tmp_path / "entail"
    shutil.copytree(os.path.join(FIXTURES, "RTE"), rte)
    with pytest.raises(ValueError, match="--task-format"):
        load_task(str(rte))
    assert load_task(str(rte), task_format="rte").spec is GLUE["rte"]
    # hub-style files (field names, numeric labels) keep working next to the original layout
    hub = tmp_path / "RTE"
    hub.mkdir()
    (hub / "train.jsonl").write_text(json.dumps({"sentence1": "a", "sentence2": "b",
                                                 "label": 1}) + "\n")
    (hub / "validation.jsonl").write_text(json.dumps({"sentence1": "c", "sentence2": "d",
                                                      "label": "entailment"}) + "\n")
    task = load_task(str(hub))
    assert [r["label"] for r in task.train + task.validation] == [1, 0]


def test_unreachable_hub_is_one_line(monkeypatch):
    import datasets

    from ponder_pt.data.hub import HubUnavailable, hub_unreachable

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(HubUnavailable) as info:
        resolve_task("rte")
    msg = str(info.value)
    assert "\n" not in msg and "nyu-mll/glue/rte" in msg and "--task DIR" in msg
    assert "RTE" in msg and "dev.tsv" in msg
    assert not hub_unreachable(KeyError("label"))

    def missing(*args, **kwargs):  # any other error is not hidden
        raise KeyError("label")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(KeyError):
        resolve_task("rte")


def test_finetune_without_hub_fails_in_one_line_before_any_process(tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "ds"))
    env.pop("WORLD_SIZE", None)
    proc = ponder(["finetune", "--backbone",
                   str(tmp_path / "no_backbone"), "--task", "rte", "--nproc", "2",
                   "--out", str(tmp_path / "out")],
                  timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "cannot reach the Hugging Face Hub" in lines[0], proc.stderr
    assert "--task DIR" in lines[0] and "Traceback" not in proc.stderr


def test_finetune_on_original_layout(tmp_path):
    from ponder_pt.early_exit.toy import tiny_encoder

    backbone = tiny_encoder("albert", str(tmp_path / "albert"), layers=2, hidden=32)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "ft"
    proc = ponder(
        ["finetune", "--backbone", backbone, "--task",
         os.path.join(FIXTURES, "RTE"), "--exit", "pabee", "--out", str(out),
         "--set", "train.batch_size=4", "--set", "train.max_steps=2", "--set",
         "eval.batch_size=4", "--set", "eval.batch1=false", "--set", "train.lr=1e-3"],
        timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "1 rows rejected" in proc.stderr and "RTE/train.tsv:6" in proc.stderr
    with open(out / "eval.json") as fh:
        doc = json.load(fh)
    assert doc["num_samples"] == 4 and doc["rejected_rows"] == 1
    with open(out / "rejects.jsonl") as fh:
        assert json.loads(fh.readline())["line"] == 6
    with open(out / "predictions.jsonl") as fh:
        assert sorted(json.loads(x)["label"] for x in fh) == [0, 0, 1, 1]
