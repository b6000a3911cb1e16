"""The lock files agree with pyproject.toml (a range changed without `make lock` fails here),
and the installed environment is the locked one."""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
import tomllib

import pytest

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from lock import transformers_lower_bound  # noqa: E402
from overlay import pins  # noqa: E402

LOCK = os.path.join(ROOT, "requirements", "lock.txt")
OLDEST = os.path.join(ROOT, "requirements", "lock-transformers-oldest.txt")


def _declared() -> list[Requirement]:
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    reqs = [Requirement(d) for d in project["dependencies"]]
    reqs += [Requirement(d) for extra in project["optional-dependencies"].values() for d in extra]
    env = default_environment()
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def test_every_declared_dependency_is_locked_within_its_range():
    for lock in (LOCK, OLDEST):
        locked = pins(lock)
        for req in _declared():
            if req.name == "torch":
                assert "torch" not in locked  # the site's torch is kept
                continue
            assert req.name.lower() in locked, f"{req.name} missing from {lock}: run make lock"
            assert req.specifier.contains(locked[req.name.lower()], prereleases=True), \
                f"{lock}: {req.name}=={locked[req.name.lower()]} outside {req.specifier}"


def test_lock_ends_of_the_transformers_range():
    low = tuple(int(x) for x in transformers_lower_bound(os.path.join(ROOT, "pyproject.toml"))
                .split("."))
    oldest = tuple(int(x) for x in pins(OLDEST)["transformers"].split("."))
    assert oldest[:len(low)] == low and not any(oldest[len(low):])
    assert tuple(int(x) for x in pins(LOCK)["transformers"].split(".")) > oldest
    # no torch CUDA runtime in the lock: it would fight a cluster's CUDA torch
    for lock in (LOCK, OLDEST):
        assert not [n for n in pins(lock) if n.startswith("nvidia-") or n == "triton"]


def test_installed_versions_are_the_locked_ones():
    if os.environ.get("PONDER_EXPECT_TRANSFORMERS") or os.environ.get("PONDER_UNLOCKED"):
        pytest.skip("make test-compat / test-latest install other versions on purpose")
    locked = pins(LOCK)
    for req in _declared():
        name = req.name.lower()
        if name == "torch":
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            continue  # an extra that is not installed (wandb)
        assert have == locked[name], f"{req.name} {have} installed, lock has {locked[name]}"
