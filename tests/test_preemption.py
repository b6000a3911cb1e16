"""Preemption signals during startup: held back while DeepSpeed builds its C++ ops, and a build
that a signal broke is built again, the signal then reaching the training loop's handler."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest


@pytest.fixture
def usr1_seen():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    yield seen
    signal.signal(signal.SIGUSR1, previous)


def test_held_signal_spares_children_and_arrives_after(usr1_seen):
    from ponder_pt.engine.preemption import signals_held

    with signals_held():
        child = subprocess.Popen(["sleep", "0.5"])
        for pid in (child.pid, os.getpid()):  # as SLURM signals every process of a step
            os.kill(pid, signal.SIGUSR1)
        assert child.wait() == 0  # inherited the block: not killed
    # (another thread of this process may have taken it meanwhile; it arrives once either way)
    assert usr1_seen == [signal.SIGUSR1]


class _Builder:
    """An op builder whose first `failures` loads fail the way a compiler killed by the signal
    fails them (after signalling this process, as SLURM signals every process)."""
    NAME = "ponder_test_op"

    def __init__(self, failures: int, signal_first: bool = True):
        self.failures, self.signal_first, self.loads = failures, signal_first, 0

    def load(self):
        self.loads += 1
        if self.loads <= self.failures:
            if self.signal_first:
                os.kill(os.getpid(), signal.SIGUSR1)
            raise RuntimeError("Error building extension 'ponder_test_op'")
        return "the op"


@pytest.fixture
def fake_builder(monkeypatch):
    """name -> the builder `create_op_builder(name)` gives; "fresh" lists the names built in a
    new interpreter (a real one would import DeepSpeed and build there)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    from ponder_pt.engine import ds_ops

    made = {"fresh": []}
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, _Builder.NAME, True)
    monkeypatch.setattr(type(get_accelerator()), "create_op_builder",
                        lambda self, name: made[name])
    monkeypatch.setattr(ds_ops, "build_in_fresh_process", made["fresh"].append)
    return made


def test_build_broken_by_a_signal_is_built_again(fake_builder, usr1_seen, capfd):
    from ponder_pt.engine.ds_ops import build_op

    builder = fake_builder["Fake"] = _Builder(failures=1)
    assert build_op("Fake") == "the op"
    assert builder.loads == 2 and usr1_seen == [signal.SIGUSR1]  # delivered once built
    # torch would only import an op this process failed to build: the retry builds elsewhere
    assert fake_builder["fresh"] == ["Fake"]
    assert "building it again (2/3)" in capfd.readouterr().err


def test_build_failing_on_its_own_is_not_retried(fake_builder, usr1_seen):
    from ponder_pt.engine.ds_ops import build_op

    builder = fake_builder["Fake"] = _Builder(failures=1, signal_first=False)
    with pytest.raises(RuntimeError, match="Error building extension"):
        build_op("Fake")
    assert builder.loads == 1
    builder = fake_builder["Fake"] = _Builder(failures=5)  # a signal every time: gives up
    with pytest.raises(RuntimeError):
        build_op("Fake", attempts=3)
    # each signal arrives, though those left pending in the held main thread merge into one
    assert builder.loads == 3 and set(usr1_seen) == {signal.SIGUSR1} and len(usr1_seen) <= 3
