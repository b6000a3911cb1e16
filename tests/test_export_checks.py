"""Exports and checkpoints are checked when loaded: weights that do not match config.json (or a
checkpoint's run_config.yaml) and bad config.json values are refused, naming the files, keys
and what to change, by `ponder-pt generate` / `eval`, by the export's own from_pretrained
(both ends of the transformers range: hf_compat) and by our own config.json / weights readers.
The untouched export and checkpoint still load and generate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from _ee_helpers import pondering_export
from _export_helpers import run_stock, trained  # noqa: F401
from zygote import ponder

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _keys(path: str) -> dict:
    """name -> shape of the tensors in a safetensors file (read independently of our code)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as fh:
        return {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}


def _variant(src: str, dst: str, config: dict | None = None, tensors=None) -> str:
    """A copy of the export `src` with config.json keys replaced and/or its tensors edited."""
    shutil.copytree(src, dst)
    if config:
        with open(os.path.join(dst, "config.json")) as fh:
            raw = json.load(fh)
        raw.update(config)
        with open(os.path.join(dst, "config.json"), "w") as fh:
            json.dump(raw, fh, indent=1)
    if tensors:
        from safetensors.torch import load_file, save_file

        path = os.path.join(dst, "model.safetensors")
        sd = load_file(path)
        tensors(sd)
        save_file(sd, path, metadata={"format": "pt"})
    return dst


EXTRA = "gpt_neox.layers.0.mlp.extra.weight"
RESHAPED = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"


def _add_extra(sd):
    import torch

    sd[EXTRA] = torch.zeros(3)


def _reshape(sd):
    import torch

    rows, cols = sd[RESHAPED].shape
    sd[RESHAPED] = torch.zeros(rows, cols + 1)


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory):  # noqa: F811
    """The pondering checkpoint's HF export, and copies corrupted one way each: config.json
    says one more layer; an extra tensor; a tensor of another shape; ponder_steps "three"."""
    from ponder_pt.export import checkpoint_to_hf

    root = tmp_path_factory.mktemp("checks")
    clean = str(root / "clean")
    checkpoint_to_hf(trained["ponder"], clean, progress=False)
    with open(os.path.join(clean, "config.json")) as fh:
        layers = json.load(fh)["num_hidden_layers"]
    return {"clean": clean, "layers": layers,
            "more_layers": _variant(clean, str(root / "more_layers"),
                                    {"num_hidden_layers": layers + 1}),
            "extra": _variant(clean, str(root / "extra"), tensors=_add_extra),
            "reshaped": _variant(clean, str(root / "reshaped"), tensors=_reshape),
            "three": _variant(clean, str(root / "three"), {"ponder_steps": "three"})}


def _check_messages(msg: dict, d: dict) -> None:
    """Each corrupt export's error names the files, the first keys (the rest counted) and the
    fix; `msg[name]` is the error text for export `name`."""
    clean_keys = _keys(os.path.join(d["clean"], "model.safetensors"))
    for name in ("more_layers", "extra", "reshaped"):
        assert f"{os.path.join(d[name], 'model.safetensors')} does not match " \
               f"{os.path.join(d[name], 'config.json')}" in msg[name], (name, msg[name])
        assert "ponder-pt convert to-hf" in msg[name], msg[name]
    # a layer's tensors are missing: the first three named, the rest counted, the key to fix
    per_layer = sorted(k for k in clean_keys if k.startswith("gpt_neox.layers.0."))
    assert per_layer, clean_keys
    first = sorted(k.replace("layers.0.", f"layers.{d['layers']}.") for k in per_layer)[:3]
    m = msg["more_layers"]
    assert f"{len(per_layer)} tensors that config.json describes are missing" in m, m
    assert all(k in m for k in first) and f"and {len(per_layer) - 3} more" in m, m
    assert (f"config.json's num_hidden_layers is {d['layers'] + 1} but the weights hold "
            f"{d['layers']} layers: set config.json's num_hidden_layers to {d['layers']}") in m, m
    assert f"1 tensor in the weights has no place in the model config.json describes ({EXTRA})" \
        in msg["extra"], msg["extra"]
    rows, cols = clean_keys[RESHAPED]
    assert (f"1 tensor of the wrong shape (the weights' vs config.json's: {RESHAPED} "
            f"{rows}x{cols + 1} vs {rows}x{cols})") in msg["reshaped"], msg["reshaped"]
    assert msg["three"] == ("config.json: ponder_steps must be an integer >= 0, got 'three' "
                            f"({os.path.join(d['three'], 'config.json')})"), msg["three"]


# ------------------------------------------------------------------ ponder-pt generate / eval

DRIVER = r"""
import contextlib, io, json, sys
from ponder_pt.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
        except BaseException as exc:  # the real CLI would print a traceback
            rc = f"uncaught {type(exc).__name__}: {exc}"
    out.append({"rc": rc, "stderr": err.getvalue(), "stdout": std.getvalue()})
print(json.dumps(out))
"""


def _native_variant(ckpt: str, dst: str) -> str:
    """A copy of the checkpoint.dir whose run_config.yaml says one more layer."""
    shutil.copytree(ckpt, dst)
    path = os.path.join(dst, "run_config.yaml")
    with open(path) as fh:
        cfg = yaml.safe_load(fh)
    cfg["model"]["num_layers"] += 1
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh)
    return dst


# eval builds its tasks before it loads the model: one that reads a local file
TASK = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
"""


def test_generate_and_eval_refuse_mismatched_weights(exports, trained, tmp_path):  # noqa: F811
    """One launch runs the CLI's main() on every case (each model load is fast once torch and
    transformers are imported), one more is the user's own `python -m ponder_pt generate`.
    The pondering classes here are the export's template (the hf_compat test below runs it at
    both ends of the transformers range)."""
    d = exports
    native_bad = _native_variant(trained["ponder"], str(tmp_path / "ckpt_more_layers"))
    (tmp_path / "tiny.jsonl").write_text('{"text": "Open the file"}\n')
    (tmp_path / "tiny_ppl.yaml").write_text(TASK.format(data=tmp_path / "tiny.jsonl"))
    gen = ["generate", "--prompt", "Open the", "--max-new-tokens", "3", "--greedy",
           "--device", "cpu", "--json", "--model"]
    names = ["more_layers", "extra", "reshaped", "three"]
    runs = ([gen + [d[n]] for n in names]
            + [gen + [native_bad], gen + [d["clean"]], gen + [trained["ponder"]],
               ["eval", "--model", d["more_layers"], "--tasks", "tiny_ppl", "--include-path",
                str(tmp_path), "--device", "cpu"]])
    env = dict(ENV, HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"))
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(res) == len(runs)
    errors = {}
    for name, r in zip(names + ["native", "clean", "native_clean", "eval"], res):
        if name in ("clean", "native_clean"):  # the check passes on what was exported
            assert r["rc"] == 0, (name, r)
            assert len(json.loads(r["stdout"])["token_ids"]) == 3, r
            continue
        assert r["rc"] == 2, (name, r)  # reported as a user error, not an uncaught exception
        line = r["stderr"].strip().splitlines()[-1]
        assert line.startswith("ponder-pt: error: ") and "Traceback" not in r["stderr"], r
        errors[name] = line.removeprefix("ponder-pt: error: ")
    _check_messages(errors, d)
    assert errors["eval"] == errors["more_layers"]
    m = errors["native"]
    assert (f"{os.path.join(native_bad, 'step_00000002', 'mp_rank_00_model_states.pt')} does "
            f"not match {os.path.join(native_bad, 'run_config.yaml')}") in m, m
    n = d["layers"]  # the export's layers are the checkpoint's
    assert (f"run_config.yaml's model.num_layers is {n + 1} but the weights hold {n} layers: "
            f"set model.num_layers to {n} in run_config.yaml") in m and f"layers.{n}." in m, m
    # the user's own launch: exit 2, one line, no traceback, and not transformers' table of
    # missing keys (its log handler writes to the real stderr, which only this launch sees)
    proc = ponder([*gen, d["more_layers"]],
                  timeout=300, env=ENV)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"ponder-pt: error: {errors['more_layers']}"
    assert "Traceback" not in proc.stderr and "LOAD REPORT" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------ the export's own code

STOCK = r"""
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM
transformers.logging.set_verbosity_error()
out = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                     dtype=torch.float32)
        with torch.no_grad():
            ids = model.generate(torch.tensor([[5, 17, 300]]), max_new_tokens=3,
                                 do_sample=False, pad_token_id=0)
        out[name] = {"ok": ids.shape[1] - 3, "module": type(model).__module__}
    except Exception as exc:
        out[name] = {"error": str(exc), "type": [c.__name__ for c in type(exc).__mro__]}
print(json.dumps({"transformers": transformers.__version__, "results": out}))
"""


@pytest.mark.hf_compat  # the transformers API differs across the range
def test_exported_from_pretrained_refuses_mismatched_weights(exports, bpe_dir, tmp_path):
    """The directory's own modeling code (no ponder-pt in the process), at the transformers
    this session runs (the compat run: the oldest declared). A GPT-2 export's tied head is not
    in its file and must not count as missing; rotary inv_freq buffers neither."""
    import transformers

    d = exports
    gpt2 = pondering_export(str(tmp_path / "gpt2"), bpe_dir, arch="gpt2", steps=1)
    with open(os.path.join(gpt2, "config.json")) as fh:
        n_layer = json.load(fh)["n_layer"]
    assert not any(k.startswith("lm_head") for k in _keys(os.path.join(gpt2, "model.safetensors")))
    gpt2_short = _variant(gpt2, str(tmp_path / "gpt2_more"), {"n_layer": n_layer + 1})
    paths = {n: d[n] for n in ("clean", "more_layers", "extra", "reshaped", "three")}
    paths.update(gpt2=gpt2, gpt2_more=gpt2_short)
    out = run_stock(STOCK, json.dumps(paths))
    assert out["transformers"] == transformers.__version__
    res = out["results"]
    for name in ("clean", "gpt2"):
        assert res[name].get("ok") == 3, (name, res[name])
        assert res[name]["module"].startswith("transformers_modules."), res[name]
    errors = {}
    for name in ("more_layers", "extra", "reshaped", "three", "gpt2_more"):
        assert "error" in res[name] and "ValueError" in res[name]["type"], (name, res[name])
        errors[name] = res[name]["error"]
    _check_messages(errors, d)
    assert (f"config.json's n_layer is {n_layer + 1} but the weights hold {n_layer} layers"
            in errors["gpt2_more"]), errors["gpt2_more"]
    assert f"transformer.h.{n_layer}." in errors["gpt2_more"] and "lm_head" not in \
        errors["gpt2_more"], errors["gpt2_more"]


# ------------------------------------------------------------------ config.json values

BAD = [("ponder_steps", "three"), ("ponder_steps", -1), ("ponder_steps", True),
       ("ponder_top_k", 2.5), ("default_pauses", "10"), ("ponder_scale_embeds", "yes"),
       ("ponder_feedback", "logits"), ("ponder_halting", "sometimes"), ("ponder_halt_q", 0),
       ("ponder_halt_q", 1.5), ("pause_token_id", -3), ("ponder_transformers", "5.17+")]
GOOD = [("ponder_steps", 0), ("ponder_steps", 3), ("ponder_top_k", None),
        ("default_pauses", 0), ("ponder_scale_embeds", False), ("ponder_feedback", "hidden"),
        ("ponder_halting", "palbert"), ("ponder_halt_q", 1), ("ponder_halt_q", 0.5),
        ("pause_token_id", None), ("pause_token_id", 600), ("ponder_transformers", ">=5.17,<5.26")]


@pytest.mark.hf_compat
def test_config_values_are_checked_naming_key_and_file(exports, tmp_path):
    """The exported configuration class and our own config.json reader give the same verdict
    on every pondering field (the export carries its own copy of the rules); a bad value in a
    stock field is named too; valid configs load as before."""
    from ponder_pt.export.templates.configuration_ponder import (PonderConfigError,
                                                                 PonderGPTNeoXConfig,
                                                                 ponder_field_problem)
    from ponder_pt.weights import hf_config

    for key, value in BAD:
        ours, theirs = hf_config.ponder_field_problem(key, value), ponder_field_problem(key, value)
        assert ours and ours == theirs and ours.startswith(key) and repr(value) in ours, \
            (key, value, ours, theirs)
        with pytest.raises(PonderConfigError, match=f"^config.json: {key} "):
            PonderGPTNeoXConfig(**{key: value})
    for key, value in GOOD:
        assert hf_config.ponder_field_problem(key, value) is None, (key, value)
        assert ponder_field_problem(key, value) is None, (key, value)
        assert getattr(PonderGPTNeoXConfig(**{key: value}), key) == value
    d = exports
    with pytest.raises(hf_config.HFConfigError) as err:
        hf_config.read_hf_config(d["three"])
    assert str(err.value) == ("config.json: ponder_steps must be an integer >= 0, got 'three' "
                              f"({os.path.join(d['three'], 'config.json')})")
    bad = _variant(d["clean"], str(tmp_path / "bad_stock"), {"hidden_size": "32",
                                                            "rope_parameters": {"rope_theta": -1}})
    with pytest.raises(hf_config.HFConfigError) as err:
        hf_config.read_hf_config(bad)
    assert str(err.value) == ("config.json: hidden_size must be an integer >= 1, got '32'; "
                              "rope_parameters.rope_theta must be a number > 0, got -1 "
                              f"({os.path.join(bad, 'config.json')})")
    # the clean export reads as it did: the stock config and the pondering fields
    stock, extra = hf_config.read_hf_config(d["clean"])
    with open(os.path.join(d["clean"], "config.json")) as fh:
        raw = json.load(fh)
    assert stock.num_hidden_layers == raw["num_hidden_layers"] == d["layers"]
    assert extra == {k: raw[k] for k in hf_config.PONDER_KEYS if k in raw}


@pytest.mark.hf_compat
def test_our_weight_readers_refuse_mismatched_weights(exports, tmp_path):
    """`convert from-hf` (and checkpoint.init_from, which reads HF weights the same way) refuse
    the corrupt exports with the same kind of message, the clean one converts."""
    from ponder_pt.export import hf_to_checkpoint
    from ponder_pt.weights.mismatch import WeightsMismatchError

    d = exports
    errors = {}
    for name in ("more_layers", "extra", "reshaped"):
        with pytest.raises(WeightsMismatchError) as err:
            hf_to_checkpoint(d[name], str(tmp_path / name), progress=False)
        errors[name] = str(err.value)
    m = errors["more_layers"]
    assert f"{os.path.join(d['more_layers'], 'model.safetensors')} does not match " \
           f"{os.path.join(d['more_layers'], 'config.json')}" in m, m
    assert (f"config.json's num_hidden_layers is {d['layers'] + 1} but the weights hold "
            f"{d['layers']} layers") in m and f"gpt_neox.layers.{d['layers']}." in m, m
    assert EXTRA in errors["extra"] and "no place" in errors["extra"], errors["extra"]
    assert RESHAPED in errors["reshaped"] and "wrong shape" in errors["reshaped"]
    cfg = hf_to_checkpoint(d["clean"], str(tmp_path / "clean"), progress=False)
    assert cfg.model.num_layers == d["layers"]
