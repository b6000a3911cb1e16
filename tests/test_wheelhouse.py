"""The offline install path: `make wheelhouse` for this machine's Python, then a fresh venv that
already holds torch (as a cluster's does) installs ponder-pt from it with `--no-index`, and
runs: `ponder-pt --version` and a 2-step CPU training run."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import venv

import pytest

from train_utils import train_cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _site_packages(prefix: str) -> str:
    return glob.glob(os.path.join(prefix, "lib", "python3*", "site-packages"))[0]


# torch's CUDA runtime (the CUDA build's own dependencies): a cluster image has it with torch
CUDA_STACK = ("nvidia-", "cuda-", "triton")


def _cuda_stack(dist_name: str = "torch") -> set:
    """The installed distributions of `dist_name`'s CUDA runtime, transitively, with the extras
    each is asked for (none for the CPU build)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    found, todo = set(), [(dist_name, frozenset())]
    while todo:
        name, extras = todo.pop()
        for line in md.requires(name) or []:
            req = Requirement(line)
            wanted = any(req.marker is None or req.marker.evaluate({"extra": extra})
                         for extra in (extras or {""}))
            if (wanted and req.name.lower().startswith(CUDA_STACK)
                    and req.name.lower() not in found):
                try:
                    md.distribution(req.name)
                except md.PackageNotFoundError:
                    continue
                found.add(req.name.lower())
                todo.append((req.name, frozenset(req.extras)))
    return found


def _give_torch(env_dir: str) -> None:
    """Put this interpreter's torch (package and metadata) and, for a CUDA build, its CUDA
    runtime into the new venv, the way a cluster image already has them: pip must then take
    every other package, torch's pure-Python dependencies included, from the wheelhouse."""
    import importlib.metadata as md

    import torch

    src = os.path.dirname(os.path.dirname(torch.__file__))
    dst = _site_packages(env_dir)
    names = {"torch", "torchgen", "functorch"}
    names |= {os.path.basename(p) for p in glob.glob(os.path.join(src, "torch-*.dist-info"))}
    for dist in _cuda_stack():
        # every top-level entry the distribution installed into site-packages
        names |= {f.parts[0] for f in md.distribution(dist).files or [] if f.parts[0] != ".."}
    for name in sorted(names):
        if os.path.exists(os.path.join(src, name)):
            os.symlink(os.path.join(src, name), os.path.join(dst, name))


@pytest.mark.slow
def test_wheelhouse_installs_offline_and_trains(tmp_path, prepared, bpe_dir):
    house = tmp_path / "wheelhouse"
    build = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "wheelhouse.py"),
                            "--out", str(house)], capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-3000:]
    wheels = os.listdir(house)
    assert all(w.endswith(".whl") for w in wheels)
    assert not any(w.startswith("torch-") for w in wheels)  # clusters bring their own
    assert any(w.startswith("deepspeed-") and w.endswith("py3-none-any.whl") for w in wheels)
    assert any(w.startswith("ponder_pt-") for w in wheels)

    env_dir = str(tmp_path / "venv")
    venv.create(env_dir, with_pip=True)
    _give_torch(env_dir)
    py = os.path.join(env_dir, "bin", "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env["PIP_CONFIG_FILE"] = os.devnull  # no site index or find-links: the wheelhouse alone
    # --no-compile: no .pyc of every installed file up front (most of pip's time here); what
    # the checks below import is compiled as they import it
    inst = subprocess.run([py, "-m", "pip", "install", "--no-index", "--no-compile",
                           "--find-links", str(house), "ponder-pt[eval,wandb]"], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert inst.returncode == 0, inst.stdout[-3000:] + inst.stderr[-3000:]

    # run from outside the checkout, so the installed package is what gets imported
    version = subprocess.run([os.path.join(env_dir, "bin", "ponder-pt"), "--version"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert version.returncode == 0 and version.stdout.startswith("ponder-pt "), version.stderr
    where = subprocess.run([py, "-c", "import ponder_pt, deepspeed, megatron.core, transformers;"
                            "print(ponder_pt.__file__)"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    # (deepspeed prints its accelerator warning on stdout: the path is the last line)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().splitlines()[-1].startswith(env_dir), where.stdout

    run_dir = tmp_path / "run"
    cmd = train_cmd(str(run_dir), prepared, bpe_dir, extra=["train.iters=2"])
    # its own extension cache: DeepSpeed's JIT ops built here name this venv's include paths,
    # and sharing the suite's cache would make every later run rebuild them
    env.update(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.pop("WORLD_SIZE", None)
    train = subprocess.run([py, *cmd[1:]], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=900)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    steps = [line for line in open(run_dir / "metrics.jsonl") if '"loss"' in line]
    assert len(steps) == 2
