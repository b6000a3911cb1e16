"""Exports are right on every declared transformers or refuse to load, and nothing executable
in a model directory, exit-heads file or checkpoint runs unless the user opts in."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest
import torch
from packaging.specifiers import SpecifierSet
from _ee_helpers import pondering_export
from _export_helpers import run_stock
from _model_helpers import single_process  # noqa: F401
from zygote import ponder

pytestmark = pytest.mark.hf_compat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return ponder([*args], timeout=timeout, env=env)


# ------------------------------------------------------------------ transformers version guard

def test_tested_range_equals_pyproject():
    import tomllib

    from packaging.requirements import Requirement

    from ponder_pt.export.to_hf import TESTED_TRANSFORMERS

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    req = next(Requirement(d) for d in deps if Requirement(d).name == "transformers")
    assert req.specifier == Requirement("transformers" + TESTED_TRANSFORMERS).specifier, (
        "ponder_pt.export.to_hf.TESTED_TRANSFORMERS must equal pyproject's transformers range")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from ponder_pt.early_exit.toy import write_polarity_task

    return write_polarity_task(str(tmp_path_factory.mktemp("polarity") / "polarity"),
                               n_train=16, n_valid=8, negation=0.0)


@pytest.fixture(scope="module")
def export_k2(bpe_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("guard") / "k2")
    return pondering_export(out, bpe_dir, steps=2)


def test_version_guard_package_classes(export_k2, monkeypatch):
    import transformers
    from transformers import AutoModelForCausalLM

    from ponder_pt.export.hf_auto import register_auto_classes
    from ponder_pt.export.to_hf import TESTED_TRANSFORMERS
    from ponder_pt.inference import load_model

    with open(os.path.join(export_k2, "config.json")) as fh:
        assert json.load(fh)["ponder_transformers"] == TESTED_TRANSFORMERS
    load_model(export_k2)  # in range: loads
    register_auto_classes()
    # the first release past the range, and one before it
    upper = next(s.version for s in SpecifierSet(TESTED_TRANSFORMERS) if s.operator == "<")
    for fake in (f"{upper}.0", "5.16.2"):
        monkeypatch.setattr(transformers, "__version__", fake)
        for load in (lambda: load_model(export_k2),
                     lambda: AutoModelForCausalLM.from_pretrained(export_k2)):
            with pytest.raises(ValueError) as err:
                load()
            msg = str(err.value)
            assert fake in msg and TESTED_TRANSFORMERS in msg and "re-export" in msg


def test_version_guard_remote_code(export_k2):
    """The directory's own copy (users without ponder-pt) refuses too."""
    script = r"""
import json, sys
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.dynamic_module_utils import get_class_from_dynamic_module
path = sys.argv[1]
# import the directory's code first (transformers re-binds its lazy module meanwhile), then fake
cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)
get_class_from_dynamic_module(cfg.auto_map["AutoModelForCausalLM"], path)
sys.modules["transformers"].__version__ = "5.30.0"
try:
    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    print(json.dumps({"error": None}))
except Exception as exc:
    print(json.dumps({"error": str(exc), "type": type(exc).__name__}))
"""
    res = run_stock(script, export_k2)
    assert res["error"] and "5.30.0" in res["error"] and ">=5.17" in res["error"], res


# ------------------------------------------------------------------ exported generate() is exact

CASES = [  # (arch, ponder settings, pause-trained)
    ("gpt_neox", {"steps": 1}, True),
    ("llama", {"steps": 2, "feedback": "hidden"}, False),
    ("gpt_neox", {"steps": 3, "top_k": 7}, True),
    ("gpt_neox", {"steps": 2, "feedback": "hidden"}, True),
]


@pytest.mark.parametrize("arch,ponder,paused", CASES)
def test_package_classes_generate_equals_cache_free_loop(arch, ponder, paused, bpe_dir, tmp_path):
    """With the package's registered classes (what `ponder-pt generate` uses), KV-cached greedy
    generate() after M pauses equals recomputing the whole sequence each step."""
    from ponder_pt.inference import load_model

    out = str(tmp_path / "m")
    pondering_export(out, bpe_dir, arch=arch, seed=len(ponder), **ponder)
    if paused:  # what a pause-trained export records
        with open(os.path.join(out, "config.json")) as fh:
            cfg = json.load(fh)
        cfg.update(pause_token_id=cfg["vocab_size"] - 1, default_pauses=3)
        with open(os.path.join(out, "config.json"), "w") as fh:
            json.dump(cfg, fh)
    lm = load_model(out)
    assert type(lm.model).__module__ == "ponder_pt.export.templates.modeling_ponder"
    ids = lm.encode("Return the number of items")
    if paused:
        ids += [lm.pause_id] * lm.default_pauses
    new = lm.generate(ids, 12, greedy=True, stop_at_eos=False)
    seq = list(ids)
    for _ in range(12):
        z = lm.logits(torch.tensor([seq]))[0, -1]
        z[lm.vocab_rows:] = float("-inf")
        seq.append(int(z.argmax()))
    assert new == seq[len(ids):]


# ------------------------------------------------------------------ remote code is opt-in

def _evil_module(marker: pathlib.Path) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"


def _evil_hf_dir(root: pathlib.Path, marker: pathlib.Path, like: str) -> str:
    """A decoder directory (tokenizer from `like`) whose config maps to code in the directory;
    importing that code creates `marker`."""
    import shutil

    d = root / "evil"
    shutil.copytree(like, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="evil_lm", architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                         "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (d / name).write_text(_evil_module(marker))
    return str(d)


def test_remote_code_refused_at_every_entry_point(export_k2, task_dir, tmp_path):
    from ponder_pt.early_exit.backbones import load_backbone
    from ponder_pt.inference import load_model

    marker = tmp_path / "ran"
    evil = _evil_hf_dir(tmp_path, marker, export_k2)
    for load in (lambda: load_model(evil), lambda: load_backbone(evil)):
        with pytest.raises(ValueError, match="--trust-remote-code"):
            load()
    for args in (["generate", "--model", evil, "--prompt", "x", "--max-new-tokens", "2"],
                 ["eval", "--model", evil, "--tasks", "lambada_openai", "--limit", "1"],
                 ["finetune", "--backbone", evil, "--task", task_dir, "--exit", "none",
                  "--out", str(tmp_path / "ft")]):
        proc = _cli(*args)
        assert proc.returncode != 0 and "--trust-remote-code" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()


def test_ponder_export_never_runs_its_copy(export_k2, tmp_path):
    """A ponder export loads with the installed classes: a tampered modeling_ponder.py in the
    directory is not imported, with or without --trust-remote-code."""
    import shutil

    from ponder_pt.inference import load_model

    d = tmp_path / "tampered"
    shutil.copytree(export_k2, d)
    marker = tmp_path / "ran"
    for name in ("modeling_ponder.py", "configuration_ponder.py"):
        with open(d / name, "a") as fh:
            fh.write("\n" + _evil_module(marker))
    for trust in (False, True):
        lm = load_model(str(d), trust_remote_code=trust)
        assert type(lm.model).__module__.startswith("ponder_pt.")
    assert not marker.exists()


# ------------------------------------------------------------------ pickles are opt-in

class _Evil:
    """Unpickling this creates `path` (any code could run instead)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_exit_heads_safetensors_and_evil_pt_refused(tmp_path):
    from ponder_pt.early_exit.heads import HEADS_FILE, heads_file, read_heads

    # old format with plain contents still loads (weights_only)
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"heads": {"w": torch.ones(2)}, "num_labels": 2, "step": 3}, old / "exit_heads.pt")
    blob = read_heads(heads_file(str(old)))
    assert blob["num_labels"] == 2 and torch.equal(blob["heads"]["w"], torch.ones(2))
    # an .pt that would run code is refused
    marker = tmp_path / "ran"
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"heads": {}, "num_labels": 2, "x": _Evil(marker)}, bad / "exit_heads.pt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        read_heads(heads_file(str(bad)))
    assert not marker.exists()
    assert HEADS_FILE.endswith(".safetensors")


def test_exit_heads_save_load_round_trip(export_k2, tmp_path):
    from ponder_pt.early_exit.backbones import load_backbone
    from ponder_pt.early_exit.config import ExitConfig
    from ponder_pt.early_exit.heads import ExitModel, heads_file

    bb, tok = load_backbone(export_k2, dtype=torch.float32)
    cfg = ExitConfig()
    cfg.strategy = "pabee"
    model = ExitModel(bb, 3, cfg)
    out = str(tmp_path / "best")
    model.save(out, {"step": 5, "metric": 0.25})
    tok.save_pretrained(out)  # as finetune's best-model save does
    assert os.path.basename(heads_file(out)) == "exit_heads.safetensors"
    again = ExitModel(load_backbone(out, dtype=torch.float32)[0], 3, cfg)
    blob = again.load_heads(heads_file(out))
    assert blob["num_labels"] == 3 and blob["step"] == 5
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("backbone."))


@pytest.fixture()
def evil_checkpoint(export_k2, tmp_path):
    """A checkpoint.dir (convert from-hf) whose model-states file also holds an _Evil object."""
    from ponder_pt.weights.files import META, file_sizes
    from ponder_pt.export import hf_to_checkpoint

    ckpt = tmp_path / "ckpt"
    hf_to_checkpoint(export_k2, str(ckpt), progress=False)
    root = ckpt / "step_00000000"
    path = root / "mp_rank_00_model_states.pt"
    state = torch.load(path, weights_only=True)
    marker = tmp_path / "ran"
    state["evil"] = _Evil(marker)
    torch.save(state, path)
    meta = json.loads((root / META).read_text())
    meta["files"] = file_sizes(str(root))  # keep the checkpoint "intact"
    (root / META).write_text(json.dumps(meta))
    return str(ckpt), marker


def test_checkpoint_pickle_refused_at_every_entry_point(evil_checkpoint, single_process,
                                                        tmp_path):  # noqa: F811
    from ponder_pt.config import load_run_config
    from ponder_pt.export import read_checkpoint
    from ponder_pt.models import PonderLM, load_initial_weights

    ckpt, marker = evil_checkpoint
    with pytest.raises(ValueError, match="--unsafe-unpickle"):
        read_checkpoint(ckpt)
    cfg = load_run_config(ckpt)
    with pytest.raises(ValueError, match="checkpoint.unsafe_unpickle"):
        load_initial_weights(PonderLM(cfg.model, cfg.ponder), ckpt)
    for args in (["convert", "to-hf", "--checkpoint", ckpt, "--out", str(tmp_path / "hf")],
                 ["generate", "--model", ckpt, "--prompt", "x", "--max-new-tokens", "2"]):
        proc = _cli(*args)
        assert proc.returncode != 0 and "--unsafe-unpickle" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()
    # the opt-in unpickles fully (so the file above really was a code-running pickle)
    read_checkpoint(ckpt, unsafe_unpickle=True)
    assert marker.exists()


def test_zero_files_gated_before_deepspeed(tmp_path):
    """zero_to_fp32 unpickles fully; our restricted load refuses an evil optimizer file first."""
    from ponder_pt.weights.native import UnsafeCheckpointError, zero_fp32

    marker = tmp_path / "ran"
    torch.save({"module": {}}, tmp_path / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": _Evil(marker)},
               tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UnsafeCheckpointError, match="--unsafe-unpickle"):
        zero_fp32(str(tmp_path), 0)
    assert not marker.exists()


class _ByGetattr:
    """Pickles as `getattr(cls, name)`: how Python 3.11.0-3.11.4 (Debian 12's 3.11.2) pickle an
    enum member, and how a crafted file could reach a function from an allowed class."""

    def __init__(self, cls, name):
        self.cls, self.name = cls, name

    def __reduce__(self):
        return getattr, (self.cls, self.name)


def test_enum_members_pickled_by_name_load_and_other_getattrs_are_refused(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from ponder_pt.weights.native import UnsafeCheckpointError, load_checkpoint_file

    path = str(tmp_path / "optim_states.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": _ByGetattr(ZeroStageEnum, "weights"),
                                         "exp_avg": torch.ones(2)}}, path)
    assert "builtins.getattr" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    state = load_checkpoint_file(path)["optimizer_state_dict"]
    assert state["zero_stage"] is ZeroStageEnum.weights and state["exp_avg"].sum() == 2

    for cls, name in ((LossScaler, "__init__"), (ZeroStageEnum, "__init__"),
                      (ZeroStageEnum, "_missing_")):
        torch.save({"optimizer_state_dict": {"x": _ByGetattr(cls, name)}}, path)
        with pytest.raises(UnsafeCheckpointError, match="names no enum member"):
            load_checkpoint_file(path)
