"""Config: presets, YAML + --set layering, type coercion, and validation messages."""

import pytest
import yaml

from ponder_pt.cli import main
from ponder_pt.config import (MODEL_PRESETS, RUN_PRESETS, ConfigError, check, load_config,
                              parse_blend)


def test_pythia_2_8b_shape_and_recipe():
    cfg = load_config("pythia-2.8b")
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_heads) == (32, 2560, 32)
    assert m.rotary_pct == 0.25 and m.parallel_residual and not m.tie_embeddings
    assert m.ffn_size == 4 * 2560 and cfg.data.seq_len == 2048
    assert cfg.train.lr == pytest.approx(1.6e-4) and cfg.train.min_lr_value == pytest.approx(1.6e-5)
    assert cfg.ponder.steps == 0 and cfg.pause.rate == 0


@pytest.mark.parametrize("name,shape", [
    ("pythia-14m", (6, 128, 4)), ("pythia-70m", (6, 512, 8)), ("pythia-160m", (12, 768, 12)),
    ("pythia-410m", (24, 1024, 16)), ("pythia-1b", (16, 2048, 8)), ("pythia-1.4b", (24, 2048, 16)),
    ("pythia-6.9b", (32, 4096, 32)), ("pythia-12b", (36, 5120, 40)),
])
def test_pythia_suite_shapes(name, shape):
    m = load_config(name).model
    assert (m.num_layers, m.hidden_size, m.num_heads) == shape


def test_llama_presets():
    tl = load_config("tinyllama-1.1b").model
    assert (tl.arch, tl.num_layers, tl.hidden_size, tl.kv_heads, tl.ffn_size) == ("llama", 22, 2048, 4, 5632)
    assert tl.rotary_pct == 1.0 and not tl.parallel_residual
    l7 = load_config("llama2-7b").model
    assert (l7.num_layers, l7.hidden_size, l7.num_heads, l7.kv_heads, l7.ffn_size) == (32, 4096, 32, 32, 11008)


def test_method_variants_of_every_size():
    for size in ("70m", "160m", "410m", "1b", "1.4b", "2.8b"):
        assert load_config(f"ponderpythia-{size}").ponder.steps == 3
        assert load_config(f"pausepythia-{size}").pause.rate == pytest.approx(0.1)
    assert set(MODEL_PRESETS) >= {"pythia-70m", "tinyllama-1.1b", "llama2-7b"}
    assert "demo" in RUN_PRESETS


def test_overrides_coerce_types_and_keep_preset_fields():
    cfg = load_config("ponderpythia-70m", ["train.lr=3e-4", "ponder.steps=2", "model.num_layers=3",
                                           "ponder.scale_embeds=false", "data.train=[0.3, a, 0.7, b]"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.ponder.steps == 2 and cfg.ponder.scale_embeds is False
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 512  # rest from the preset
    assert parse_blend(cfg.data.train) == [("a", 0.3), ("b", 0.7)]


def test_yaml_file_with_base_and_override_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"base": "pausepythia-160m", "train": {"lr": 1e-4, "iters": 10},
                                    "model": {"num_layers": 4}}))
    cfg = load_config(str(path), ["train.iters=20"])
    assert cfg.pause.rate == pytest.approx(0.1) and cfg.model.hidden_size == 768
    assert cfg.model.num_layers == 4 and cfg.train.lr == pytest.approx(1e-4) and cfg.train.iters == 20


def _problems(*overrides, **kw):
    with pytest.raises(ConfigError) as exc:
        cfg = load_config("pythia-70m", overrides, validate=False)
        check(cfg, **kw)
    return str(exc.value)


def test_unknown_keys_get_suggestions():
    msg = _problems("model.hiden_size=3", "trian.lr=1")
    assert "model.hiden_size: unknown key (did you mean 'hidden_size'" in msg
    assert "trian: unknown key (did you mean 'train'?)" in msg


def test_bad_types_name_the_key():
    assert "train.lr: expected float, got 'fast'" in _problems("train.lr=fast")
    assert "model.num_layers: expected int" in _problems("model.num_layers=2.5")


def test_heads_not_divisible_by_tp():
    msg = _problems("parallel.tp=3")
    assert "model.num_heads=8 is not divisible by parallel.tp=3" in msg and "use tp in 1, 2, 4, 8" in msg


def test_hidden_not_divisible_by_heads():
    assert "model.hidden_size=512 is not divisible by model.num_heads=7" in _problems("model.num_heads=7")


def test_pause_id_outside_vocab():
    msg = _problems("pause.rate=0.1", "pause.token_id=60000", vocab_size=50304)
    assert "pause.token_id=60000 is outside the vocabulary [0, 50304)" in msg


def test_zero_2_3_with_pipeline_rejected():
    for stage in (2, 3):
        msg = _problems(f"parallel.zero_stage={stage}", "parallel.pp=2")
        assert f"parallel.zero_stage={stage} cannot be combined with pipeline parallelism" in msg
    cfg = load_config("pythia-70m", ["parallel.zero_stage=1", "parallel.pp=2"])
    assert cfg.parallel.pp == 2
    assert "parallel.pp=2 needs parallel.zero_stage=1" in _problems("parallel.zero_stage=0",
                                                                    "parallel.pp=2")


def test_global_batch_vs_micro_batch_times_dp():
    msg = _problems("train.global_batch=10", "train.micro_batch=4", "parallel.tp=2", world_size=8)
    assert "train.global_batch=10 is not divisible by train.micro_batch x data-parallel size = 4 x 4" in msg
    assert "world size 6 is not divisible by parallel.tp x parallel.pp = 4" in _problems(
        "parallel.tp=2", "parallel.pp=2", world_size=6)


def test_other_rules():
    assert "parallel.sequence_parallel needs parallel.tp > 1" in _problems("parallel.sequence_parallel=true")
    assert "pause.rate: must be in [0, 1)" in _problems("pause.rate=1.5")
    assert "data.seq_len=4096 exceeds model.max_seq_len=2048" in _problems("data.seq_len=4096")
    assert "data.split='1,2'" in _problems("data.split=1,2")
    assert "model.num_kv_heads=3 must divide model.num_heads=8" in _problems("model.num_kv_heads=3")
    assert "data.train: mixes weights and prefixes" in _problems("data.train=[0.5, a, b]")
    assert "train.warmup" in _problems("train.warmup=500", "train.iters=100")


def test_unknown_named_config_and_missing_file():
    with pytest.raises(ConfigError, match="did you mean 'pythia-70m'"):
        load_config("pythia-70M")
    with pytest.raises(ConfigError, match="no such file"):
        load_config("nope/run.yaml")


def test_cli_config_show_and_error_exit_code(capsys):
    assert main(["config", "show", "--config", "ponderpythia-410m", "--set", "parallel.tp=2",
                 "--world-size", "8"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["ponder"]["steps"] == 3 and shown["parallel"]["tp"] == 2
    assert main(["config", "show", "--config", "pythia-70m", "--set", "parallel.tp=3"]) == 2
    assert "parallel.tp=3" in capsys.readouterr().err


def test_optimizer_choice_in_the_deepspeed_config(monkeypatch):
    """torch's AdamW by default (fused on CUDA: nothing to JIT-compile on a fresh GPU node);
    DeepSpeed's FusedAdam only when asked for and CUDA is there; CPU offload keeps CPU Adam."""
    import torch

    from ponder_pt.engine.ds_config import build_ds_config

    def params(*sets, cuda):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        cfg = load_config("pythia-14m", [*sets, "train.global_batch=8", "train.micro_batch=8"])
        return build_ds_config(cfg, dp=1)["optimizer"]["params"]

    assert params(cuda=False)["torch_adam"] is True and "fused" not in params(cuda=False)
    assert params(cuda=True)["torch_adam"] is True and params(cuda=True)["fused"] is True
    fused = params("train.optimizer=deepspeed", cuda=True)
    assert "torch_adam" not in fused and "fused" not in fused
    assert params("train.optimizer=deepspeed", cuda=False)["torch_adam"] is True
    assert "torch_adam" not in params("parallel.cpu_offload=true", cuda=True)
    with pytest.raises(ConfigError, match="train.optimizer"):
        check(load_config("pythia-14m", ["train.optimizer=sgd"]))
