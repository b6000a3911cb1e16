"""`checkpoint.init_from` checked before launch: every shape difference between the source
(an HF directory or a checkpoint.dir) and the run config is listed with its key and fix, and
`model.preset=from_init` takes the shape from the source."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ponder_pt.config import ConfigError, load_config

sys.path.insert(0, os.path.dirname(__file__))
from _model_helpers import tiny_model_config  # noqa: E402
from zygote import ponder


def _hf_dir(path, arch="gpt_neox", weights=False, **over):
    """An HF directory of a tiny model (config.json; weights too when asked)."""
    from ponder_pt.models import hf_config_from

    cfg = tiny_model_config(arch, **over)
    if weights:
        from _model_helpers import random_hf_model

        random_hf_model(cfg).save_pretrained(str(path))
    else:
        hf_config_from(cfg).save_pretrained(str(path))
    return str(path)


def _problems(config, overrides):
    with pytest.raises(ConfigError) as info:
        load_config(config, overrides)
    return info.value.problems


def test_every_mismatch_is_listed_with_key_and_fix(tmp_path):
    src = _hf_dir(tmp_path / "neox3", num_layers=3, hidden_size=32, ffn_hidden_size=64,
                  rotary_pct=0.5, parallel_residual=False)
    found = _problems("pythia-14m", [f"checkpoint.init_from={src}"])
    text = "\n".join(found)
    for key, value in (("model.num_layers", 3), ("model.hidden_size", 32),
                       ("model.ffn_hidden_size", 64), ("model.rotary_pct", 0.5),
                       ("model.parallel_residual", "false")):
        assert f"set --set {key}={value}" in text, text
    assert "model.num_layers=6 differs from checkpoint.init_from" in text
    assert "model.preset=from_init" in text
    assert not any("num_heads" in p or "tie_embeddings" in p for p in found)  # those agree
    assert len(found) == 5


def test_from_init_takes_the_shape(tmp_path):
    src = _hf_dir(tmp_path / "neox3", num_layers=3, hidden_size=32, ffn_hidden_size=64)
    cfg = load_config("pythia-14m", ["model.preset=from_init", f"checkpoint.init_from={src}",
                                     "data.seq_len=64"])
    m = cfg.model
    assert (m.arch, m.num_layers, m.hidden_size, m.num_heads, m.ffn_size, m.rotary_pct,
            m.parallel_residual, m.tie_embeddings) == ("gpt_neox", 3, 32, 4, 64, 0.25, True,
                                                       False)
    # an explicit field still wins, and is then checked like any other
    found = _problems("pythia-14m", ["model.preset=from_init", f"checkpoint.init_from={src}",
                                     "model.num_layers=4", "data.seq_len=64"])
    assert len(found) == 1 and "set --set model.num_layers=3" in found[0]
    assert "from_init to take" not in found[0]
    with pytest.raises(ConfigError, match="checkpoint.init_from, which is not set"):
        load_config("pythia-14m", ["model.preset=from_init"])


@pytest.mark.parametrize("arch,run,expect", [
    ("llama", ["model.arch=llama", "model.num_layers=2", "model.hidden_size=64",
               "model.num_heads=4", "model.num_kv_heads=4", "model.ffn_hidden_size=96",
               "model.rotary_pct=1.0", "model.parallel_residual=false", "model.norm_eps=1e-6"],
     "set --set model.num_kv_heads=2"),
    ("gpt2", ["model.preset=gpt2-tiny", "model.num_layers=3"], "set --set model.num_layers=2"),
])
def test_other_architectures(tmp_path, arch, run, expect):
    src = _hf_dir(tmp_path / arch, arch)
    found = _problems(None, [*run, "data.seq_len=64", f"checkpoint.init_from={src}"])
    assert len(found) == 1 and expect in found[0], found


def test_native_checkpoint_source_and_vocab_rows(tmp_path):
    from ponder_pt.config import write_run_config

    src_cfg = load_config("pythia-14m", ["model.num_layers=2", "model.vocab_size=50304"],
                          validate=False)
    write_run_config(src_cfg, str(tmp_path / "ckpt"))
    found = _problems("pythia-14m", [f"checkpoint.init_from={tmp_path / 'ckpt'}",
                                     "model.vocab_size=1024"])
    assert len(found) == 2
    assert "set --set model.num_layers=2" in found[0]
    assert "the run has 1024 vocabulary rows" in found[1] and "50304" in found[1]
    assert _problems("pythia-14m", [f"checkpoint.init_from={tmp_path / 'nowhere'}"]) == [
        f"checkpoint.init_from={tmp_path / 'nowhere'}: no such directory"]
    # fewer source rows than the run's is fine (extra rows start at zero)
    load_config("pythia-14m", [f"checkpoint.init_from={tmp_path / 'ckpt'}",
                               "model.num_layers=2", "model.vocab_size=65536"])


def test_train_refuses_before_launch_and_from_init_trains(prepared, bpe_dir, tmp_path):
    src = _hf_dir(tmp_path / "neox3", weights=True, num_layers=3, hidden_size=32,
                  ffn_hidden_size=64, vocab_size=640)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = ponder(["train", "--config", "pythia-14m",
                   "--nproc", "2", "--set", f"checkpoint.init_from={src}", "--set",
                   f"data.tokenizer={bpe_dir}", "--set", f"data.train=[{prepared}]"],
                  timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    for key in ("model.num_layers", "model.hidden_size", "model.ffn_hidden_size"):
        assert f"set --set {key}=" in proc.stderr
    assert "torch.distributed" not in proc.stderr and "KeyError" not in proc.stderr
    # the same source with model.preset=from_init trains, its weights loaded
    from train_utils import TINY

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ponder_pt", "train", "--config", "demo"]
    for item in [*(x for x in TINY if not x.startswith("model.")), "model.preset=from_init",
                 "model.vocab_size=768", f"checkpoint.init_from={src}", "train.iters=2",
                 f"data.train=[{prepared}]", f"data.tokenizer={bpe_dir}",
                 f"data.cache_dir={run / 'cache'}", f"log.dir={run}"]:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initial weights from {src}" in proc.stdout + proc.stderr
