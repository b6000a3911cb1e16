"""`--device auto` of generate / eval / finetune: the resolver and the parsers' defaults."""

import pytest
import torch

from ponder_pt.cli import build_parser
from ponder_pt.inference.device import resolve_device


def test_auto_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device(None) == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_default_resolves_here():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device() == want


def test_auto_is_cuda_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("AUTO") == "cuda"
    assert resolve_device("cuda") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("cpu") == "cpu"  # explicit cpu still wins
    with pytest.raises(ValueError, match="2 CUDA"):
        resolve_device("cuda:2")


def test_bad_device_is_a_value_error():
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "m", "--prompt", "x"],
    ["eval", "--model", "m", "--tasks", "t"],
    ["finetune", "--backbone", "b", "--task", "rte"],
])
def test_cli_defaults_to_auto(argv):
    parser = build_parser()
    assert parser.parse_args(argv).device == "auto"
    assert parser.parse_args(argv + ["--device", "cuda:1"]).device == "cuda:1"


def test_finetune_training_device(monkeypatch):
    from ponder_pt.inference.device import training_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device("auto") == "cpu" and training_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert training_device("auto") == "cuda" and training_device("cuda:0") == "cuda:0"
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        training_device("cpu")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=1"):
        training_device("cuda:1")
