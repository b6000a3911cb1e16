"""Shared fixtures: a small real-prose corpus and tokenizers trained on it, built once per run
(once per run across pytest-xdist workers too), and the suite's time bookkeeping: files run
slowest first (by tests/durations.json) so the workers finish together, and every run writes
its per-test durations to .pytest-durations.json for tools/suite_time.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


def pytest_report_header(config):
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def pytest_sessionstart(session):
    # make test-compat puts another transformers in front of the venv's: make sure it is the
    # one imported, or the second run would silently test the first one's version again
    want = os.environ.get("PONDER_EXPECT_TRANSFORMERS")
    if want:
        import transformers

        if transformers.__version__ != want:
            raise pytest.UsageError(f"expected transformers {want} (PONDER_EXPECT_TRANSFORMERS), "
                                    f"imported {transformers.__version__} from "
                                    f"{transformers.__file__}")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(REPO, "tests", "durations.json")
# where this run's durations go: make test-compat names its own file, so the last full run's
# stay for tools/suite_time.py
LAST_RUN = os.environ.get("PONDER_DURATIONS_FILE") or os.path.join(REPO, ".pytest-durations.json")
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... under `pytest -n N`


_DURATIONS: dict = {}  # nodeid -> setup + call + teardown seconds
_T0 = time.time()


def pytest_configure(config):
    if WORKER and "OMP_NUM_THREADS" not in os.environ:
        # each worker has a core's share: torch's default of one thread per core would make
        # the workers' in-process tests fight over both cores
        import torch

        torch.set_num_threads(1)


def _file_weights() -> dict:
    try:
        with open(BASELINE) as fh:
            tests = json.load(fh)["tests"]
    except (OSError, ValueError, KeyError):
        return {}
    weights = {}
    for nodeid, secs in tests.items():
        path = nodeid.split("::")[0]
        weights[path] = weights.get(path, 0.0) + secs
    return weights


def pytest_collection_modifyitems(config, items):
    # longest files first (a file not in the baseline counts as longest): with `--dist loadfile`
    # the workers then take the long files early and end within a short file of each other
    weights = _file_weights()
    order = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        order.setdefault(path, -weights.get(path, float("inf")))
    items.sort(key=lambda item: order[item.nodeid.split("::")[0]])  # stable inside a file

    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    # on the xdist controller this sees every worker's reports
    if not WORKER:
        _DURATIONS[report.nodeid] = _DURATIONS.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if WORKER or not _DURATIONS:
        return
    out = {"wall_s": round(time.time() - _T0, 1),
           "workers": getattr(config.option, "numprocesses", None) or 0,
           "args": list(config.invocation_params.args), "exitstatus": int(exitstatus),
           "tests": {k: round(v, 2) for k, v in sorted(_DURATIONS.items())}}
    tmp = LAST_RUN + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(out, fh, indent=0)
    os.replace(tmp, LAST_RUN)


def shared_dir(tmp_path_factory, name: str, build) -> str:
    """A directory that `build(path)` fills once per test run. Under pytest-xdist the first
    worker to ask builds it under a file lock and the others wait and reuse it (each worker's
    session fixtures would otherwise build their own copy)."""
    if not WORKER:
        path = tmp_path_factory.mktemp(name)
        build(str(path))
        return str(path)
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / "shared"  # common to this run's workers
    root.mkdir(exist_ok=True)
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # a build that failed in another worker
            path.mkdir()
            build(str(path))
            done.touch()
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """~150 KB of stdlib docstrings as jsonl."""
    from ponder_pt.data.corpus import write_corpus

    def build(out):
        write_corpus(os.path.join(out, "corpus.jsonl"), max_bytes=150_000)

    return os.path.join(shared_dir(tmp_path_factory, "corpus", build), "corpus.jsonl")


@pytest.fixture(scope="session")
def corpus_texts(corpus) -> list[str]:
    with open(corpus, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


@pytest.fixture(scope="session")
def bpe_dir(corpus, tmp_path_factory) -> str:
    from ponder_pt.tokenizer import train_tokenizer

    return shared_dir(tmp_path_factory, "bpe", lambda out: train_tokenizer(
        [corpus], 600, out, kind="bpe", show_progress=False))


@pytest.fixture(scope="session")
def sp_dir(corpus, tmp_path_factory) -> str:
    from ponder_pt.tokenizer import train_tokenizer

    return shared_dir(tmp_path_factory, "sp", lambda out: train_tokenizer(
        [corpus], 600, out, kind="sentencepiece"))


@pytest.fixture(scope="session")
def prepared(corpus, bpe_dir, tmp_path_factory) -> str:
    """The corpus as an indexed dataset prefix (BPE)."""
    from ponder_pt.data.prepare import prepare

    out = shared_dir(tmp_path_factory, "data", lambda out: prepare(
        [corpus], bpe_dir, os.path.join(out, "corpus"), progress=False))
    return os.path.join(out, "corpus")
