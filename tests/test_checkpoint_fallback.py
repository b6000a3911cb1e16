"""Which checkpoint a resume takes when the newest one is not usable.

Provably broken tags (a save cut short, a listed file missing or truncated) are skipped for
the previous one. A tag that cannot be checked (ponder_meta.json unreadable or listing no
files) and a complete tag that fails to load or to convert stop the run with the reason, the
tag's path and the opt-in, unless checkpoint.fallback_to_older is set; so does a tag whose
ponder_meta.json records no layout. The engine here is a stand-in whose load fails on demand;
test_train and test_elastic_resume run the same paths with DeepSpeed's real files.
"""

from __future__ import annotations

import builtins
import errno
import json
import os

import pytest

from ponder_pt.engine import reshard
from ponder_pt.engine.checkpoint import CheckpointLoadError, CheckpointManager
from ponder_pt.weights import files
from ponder_pt.weights.files import META, file_sizes, tag_for, verify, write_meta

LAYOUT = {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 1}


def _save(ckpt: str, step: int, layout=LAYOUT, meta_extra=None) -> str:
    tag = tag_for(step)
    root = os.path.join(ckpt, tag)
    os.makedirs(root)
    with open(os.path.join(root, "mp_rank_00_model_states.pt"), "wb") as fh:
        fh.write(b"x" * 64)
    meta = {"tag": tag, "step": step, "world_size": 1, "state": {"step": step},
            "files": file_sizes(root), **({"layout": layout} if layout else {}),
            **(meta_extra or {})}
    write_meta(ckpt, tag, meta)
    return tag


class Engine:
    """DeepSpeed's load_checkpoint, failing for the tags in `fails`."""

    def __init__(self, fails=()):
        self.fails, self.loaded = dict(fails), []

    def load_checkpoint(self, src, tag):
        if tag in self.fails:
            raise self.fails[tag]
        self.loaded.append(tag)
        return os.path.join(src, tag), {"ponder_state": {"step": int(tag[-8:])}}


def _manager(ckpt, logs, **kw):
    return CheckpointManager(str(ckpt), 3, 0, 1, barrier=lambda: None, log=logs.append,
                             zero_stage=1, **kw)


def test_a_complete_tag_that_fails_to_load_stops_unless_fallback_is_asked(tmp_path):
    ckpt = tmp_path / "ckpt"
    _save(str(ckpt), 2)
    newest = _save(str(ckpt), 4)
    logs = []
    engine = Engine({newest: OSError("Input/output error")})
    with pytest.raises(CheckpointLoadError) as err:
        _manager(ckpt, logs).resume(engine)
    msg = str(err.value)
    assert os.path.join(str(ckpt), newest) in msg and "OSError: Input/output error" in msg
    assert "checkpoint.fallback_to_older=true" in msg and engine.loaded == []

    state = _manager(ckpt, logs, fallback_to_older=True).resume(engine)
    assert state == {"step": 2} and engine.loaded == ["step_00000002"]
    assert any("fallback_to_older" in line and newest in line for line in logs)


def _eio_on(monkeypatch, path: str) -> None:
    """Reading `path` fails as a disk or network file system fails (root ignores chmod 000)."""
    def failing_open(file, *args, **kwargs):
        if os.fspath(file) == path:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(files, "open", failing_open, raising=False)


@pytest.mark.parametrize("case", ["EIO", "a directory", "no file list"])
def test_a_tag_that_cannot_be_checked_stops_unless_fallback_is_asked(tmp_path, monkeypatch,
                                                                      case):
    """Its ponder_meta.json cannot be read, or lists no files: the tag may well be intact (the
    error may pass), so it is no provably broken tag to skip but a load failure; a pruning
    save keeps it."""
    ckpt = tmp_path / "ckpt"
    _save(str(ckpt), 2)
    newest = _save(str(ckpt), 4)
    meta = os.path.join(str(ckpt), newest, META)
    if case == "EIO":
        _eio_on(monkeypatch, meta)
        why = "cannot read its ponder_meta.json (OSError: [Errno 5] Input/output error"
    elif case == "a directory":
        os.remove(meta)
        os.makedirs(meta)
        why = "cannot read its ponder_meta.json (IsADirectoryError"
    else:
        with open(meta) as fh:
            content = json.load(fh)
        del content["files"]
        with open(meta, "w") as fh:
            json.dump(content, fh)
        why = "its ponder_meta.json lists no files"
    assert verify(str(ckpt), newest).kind == "unchecked"
    engine = Engine()
    for call in (lambda m: m.resume(engine), lambda m: m.prepare_resume(None, model_cfg=None)):
        with pytest.raises(CheckpointLoadError) as err:
            call(_manager(ckpt, []))
        msg = str(err.value)
        print(msg)
        assert msg.startswith(f"checkpoint {os.path.join(str(ckpt), newest)}: {why}"), msg
        assert "checkpoint.fallback_to_older=true" in msg and engine.loaded == []

    logs = []
    manager = _manager(ckpt, logs, fallback_to_older=True)
    assert manager.prepare_resume(None, model_cfg=None) is None  # the older tag: no conversion
    assert manager.resume(engine) == {"step": 2} and engine.loaded == ["step_00000002"]
    assert any(f"checkpoint {newest}: cannot be checked; checkpoint.fallback_to_older" in line
               for line in logs), logs

    class Saver:
        def save_checkpoint(self, where, tag, client_state, save_latest):
            os.makedirs(os.path.join(where, tag))
            with open(os.path.join(where, tag, "mp_rank_00_model_states.pt"), "wb") as fh:
                fh.write(b"y" * 64)

    manager.save(Saver(), 6, {"step": 6})
    assert sorted(os.listdir(ckpt)) == ["latest", "step_00000002", newest, "step_00000006"]


def _other_rank(loaded: bool, mismatch: bool, checked: bool = True):
    """all_ok's all-reduce with one more rank: its answers to 'checked?', 'loaded?' and 'no
    mismatch?'."""
    answers = iter([checked, loaded, not mismatch])
    return lambda mine: mine and next(answers)


def test_another_ranks_failure_stops_every_rank(tmp_path):
    """all_ok is the all-reduce: this rank checked and loaded the tag, another did not (before
    any rank loads it when the other could not check it)."""
    ckpt = tmp_path / "ckpt"
    _save(str(ckpt), 2)
    _save(str(ckpt), 4)
    with pytest.raises(CheckpointLoadError, match="another rank failed to load it"):
        _manager(ckpt, []).resume(Engine(), all_ok=_other_rank(loaded=False, mismatch=False))
    engine = Engine()
    with pytest.raises(CheckpointLoadError, match="another rank could not check it"):
        _manager(ckpt, []).resume(engine, all_ok=_other_rank(True, False, checked=False))
    assert engine.loaded == []


def test_provably_broken_tags_are_skipped_without_the_opt_in(tmp_path):
    ckpt = tmp_path / "ckpt"
    _save(str(ckpt), 2)
    truncated = _save(str(ckpt), 4)
    with open(os.path.join(ckpt, truncated, "mp_rank_00_model_states.pt"), "wb") as fh:
        fh.write(b"x" * 10)
    os.makedirs(ckpt / tag_for(6))  # a save cut short: no ponder_meta.json
    logs = []
    engine = Engine()
    assert _manager(ckpt, logs).resume(engine) == {"step": 2}
    assert any("step_00000004: skipped, truncated" in line for line in logs)
    assert any("step_00000006: skipped, incomplete" in line for line in logs)


def test_a_checkpoint_without_a_recorded_layout_is_not_guessed(tmp_path):
    ckpt = tmp_path / "ckpt"
    tag = _save(str(ckpt), 2, layout=None, meta_extra={"dp": 1, "zero_stage": 1})
    for call in (lambda m: m.prepare_resume(None, model_cfg=None),
                 lambda m: m.resume(Engine())):
        with pytest.raises(CheckpointLoadError) as err:
            call(_manager(ckpt, [], fallback_to_older=True))
        msg = str(err.value)
        assert os.path.join(str(ckpt), tag, "ponder_meta.json") in msg
        assert '"layout": {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 1}' in msg


def test_a_failed_conversion_stops_unless_fallback_is_asked(tmp_path, monkeypatch):
    """Saved at DP=2 ZeRO-1 TP=2, resumed at TP=1: the newest tag's conversion fails."""
    ckpt = tmp_path / "ckpt"
    saved = dict(LAYOUT, tp=2, dp=2)
    older = _save(str(ckpt), 2, saved)
    newest = _save(str(ckpt), 4, saved)

    def convert(src, tag, layout, model_cfg, unsafe, log, out):
        if tag == newest:
            raise MemoryError("cannot allocate")
        return out

    monkeypatch.setattr(reshard, "convert", convert)
    with pytest.raises(CheckpointLoadError) as err:
        _manager(ckpt, []).prepare_resume(None, model_cfg=None)
    msg = str(err.value)
    assert os.path.join(str(ckpt), newest) in msg and "MemoryError: cannot allocate" in msg
    assert "TP=2 PP=1 DP=2 ZeRO-1 to TP=1 PP=1 DP=1 ZeRO-1" in msg
    assert "checkpoint.fallback_to_older=true" in msg

    manager = _manager(ckpt, [], fallback_to_older=True)
    udir = manager.prepare_resume(None, model_cfg=None)
    assert manager.elastic[1] == older and udir == reshard.universal_dir(str(ckpt), older,
                                                                          str(ckpt))


def test_weights_of_another_model_are_named_so_not_damage(tmp_path):
    """A state_dict mismatch (a resume with another model shape) is no damaged file: the
    message says so and offers neither a fallback nor removing the tag, on the rank that saw
    it and on the others (all_ok agrees on it too)."""
    ckpt = tmp_path / "ckpt"
    _save(str(ckpt), 2)
    newest = _save(str(ckpt), 4)
    mismatch = RuntimeError('Error(s) in loading state_dict for PonderLM:\n\tUnexpected key(s) '
                            'in state_dict: "layers.2.ln1.weight"')
    for engine, all_ok in ((Engine({newest: mismatch}), None),
                           (Engine(), _other_rank(loaded=False, mismatch=True))):
        with pytest.raises(CheckpointLoadError) as err:
            _manager(ckpt, [], fallback_to_older=True).resume(engine, all_ok=all_ok)
        msg = str(err.value)
        assert "holds another model than this run's" in msg and "run_config.yaml" in msg
        assert "fallback_to_older" not in msg and "damaged" not in msg
