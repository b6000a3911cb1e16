"""Shared fixtures: a small real-prose corpus and tokenizers trained on it, built once per run."""

from __future__ import annotations

import json
import os
import socket
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


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """~150 KB of stdlib docstrings as jsonl."""
    from ponder_pt.data.corpus import write_corpus

    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    write_corpus(str(path), max_bytes=150_000)
    return str(path)


@pytest.fixture(scope="session")
def corpus_texts(corpus) -> list[str]:
    with open(corpus, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


@pytest.fixture(scope="session")
def bpe_dir(corpus, tmp_path_factory) -> str:
    from ponder_pt.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("bpe")
    train_tokenizer([corpus], 600, str(out), kind="bpe", show_progress=False)
    return str(out)


@pytest.fixture(scope="session")
def sp_dir(corpus, tmp_path_factory) -> str:
    from ponder_pt.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("sp")
    train_tokenizer([corpus], 600, str(out), kind="sentencepiece")
    return str(out)


@pytest.fixture(scope="session")
def prepared(corpus, bpe_dir, tmp_path_factory) -> str:
    """The corpus as an indexed dataset prefix (BPE)."""
    from ponder_pt.data.prepare import prepare

    prefix = str(tmp_path_factory.mktemp("data") / "corpus")
    prepare([corpus], bpe_dir, prefix, progress=False)
    return prefix
