"""Stale torch-extensions build locks (ponder_pt.engine.ext_locks): an old lock under
TORCH_EXTENSIONS_DIR is reported once with its age and the fix, a fresh one (a build that may
still be running) is not; drop_stale_locks removes only the locks touched since a time."""

from __future__ import annotations

import os
import time

import pytest

from ponder_pt.engine import ext_locks


@pytest.fixture
def ext_dir(tmp_path, monkeypatch):
    root = tmp_path / "torch_ext"
    now = time.time()
    for op, age in (("deepspeed_shm_comm", 3 * 3600), ("fused_adam", 30)):
        lock = root / op / "lock"
        lock.parent.mkdir(parents=True)
        lock.write_text("")
        os.utime(lock, (now - age, now - age))
    (root / "cpu_adam").mkdir()  # a finished build: no lock
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(ext_locks, "_warned", False)
    return root


def test_only_the_old_lock_is_reported(ext_dir, capsys):
    old = str(ext_dir / "deepspeed_shm_comm" / "lock")
    found = ext_locks.stale_locks()
    assert [lock.path for lock in found] == [old]
    assert 3 * 3600 <= found[0].age_s < 3 * 3600 + 60

    assert [lock.path for lock in ext_locks.warn_stale_locks()] == [old]
    err = capsys.readouterr().err
    assert old in err and "fused_adam" not in err
    assert "3 h 0 min old" in err
    assert f"rm {old}" in err and "TORCH_EXTENSIONS_DIR" in err
    # once per process
    assert ext_locks.warn_stale_locks() == [] and capsys.readouterr().err == ""


def test_other_local_ranks_stay_quiet(ext_dir, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ext_locks.warn_stale_locks() == [] and capsys.readouterr().err == ""


def test_threshold_and_custom_log(ext_dir):
    lines = []
    found = ext_locks.warn_stale_locks(log=lines.append, max_age_s=10)
    assert len(found) == 2 and len(lines) == 1 and "fused_adam" in lines[0]


def test_drop_stale_locks_removes_only_recent_ones(ext_dir):
    since = time.time() - 60
    removed = ext_locks.drop_stale_locks(since)
    assert removed == [str(ext_dir / "fused_adam" / "lock")]
    assert (ext_dir / "deepspeed_shm_comm" / "lock").exists()


def test_default_root_is_torchs(tmp_path, monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = ext_locks.extensions_root()
    assert root.startswith(os.path.realpath(str(tmp_path)))
    assert os.path.dirname(_get_build_directory("some_op", verbose=False)) == root


def test_jit_builds_use_the_locked_ninja(monkeypatch, tmp_path):
    """Every process builds with the environment's ninja, whatever its PATH says: a system
    ninja of another release would rebuild every op the locked one built, and back."""
    import shutil

    import ninja

    from ponder_pt.engine.ds_ops import use_locked_ninja

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert use_locked_ninja() == ninja.BIN_DIR
    assert shutil.which("ninja") == os.path.join(ninja.BIN_DIR, "ninja")
    assert os.environ["PATH"] == f"{ninja.BIN_DIR}:/usr/bin:/bin"
    use_locked_ninja()  # once is enough
    assert os.environ["PATH"].count(ninja.BIN_DIR) == 1
    # a folder named by PONDER_PT_NINJA_DIR wins (e.g. a wrapper around the locked ninja)
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    (wrapper / "ninja").write_text("#!/bin/sh\n")
    monkeypatch.setenv("PONDER_PT_NINJA_DIR", str(wrapper))
    assert use_locked_ninja() == str(wrapper) and os.environ["PATH"].startswith(str(wrapper))
