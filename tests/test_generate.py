"""Generation: native K+1 KV caches vs recomputing the prefix, `ponder-pt generate --json` on a
native checkpoint and on its HF export, pause tokens at inference."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _export_helpers import trained  # noqa: F401

from ponder_pt.inference.pauses import append_pauses, resolve_pauses
from zygote import ponder

# hf_compat: CI runs these again at the oldest declared transformers
pytestmark = pytest.mark.hf_compat


def _cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = ponder([*args], timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_append_pauses_exactly_m():
    assert append_pauses([1, 2, 3], 4, 99) == [1, 2, 3, 99, 99, 99, 99]
    assert append_pauses([1, 2], 0, None) == [1, 2]
    assert resolve_pauses(None, 10, 99) == 10 and resolve_pauses(2, 10, 99) == 2
    with pytest.raises(ValueError):
        resolve_pauses(3, 0, None)  # not a pause-trained model


def test_native_cached_generation_equals_recompute(trained):  # noqa: F811
    """Greedy decoding with the K+1 caches == argmax of a full forward over the growing
    sequence (the reference approach), on a real pondering checkpoint (K=2)."""
    from ponder_pt.inference import NativeModel

    lm = NativeModel(trained["ponder"])
    assert lm.ponder_steps == 2
    prompt = lm.encode("Return the number of")
    new = lm.generate(prompt, 16, stop_at_eos=False)
    seq = list(prompt)
    for _ in range(16):
        z = lm.logits(torch.tensor([seq]))[0, -1]
        z[lm.vocab_rows:] = float("-inf")
        seq.append(int(z.argmax()))
    assert new == seq[len(prompt):]


def test_generate_pauses_and_json_native_vs_hf(trained, tmp_path):  # noqa: F811
    """`--json` on the native checkpoint and on its export give the same greedy tokens; the
    pause-trained model appends its recorded M pauses (or --pauses M) and ignores their
    outputs."""
    from ponder_pt.export import checkpoint_to_hf
    from ponder_pt.inference import NativeModel, generate_text

    ckpt = trained["ponder"]
    hf = str(tmp_path / "hf")
    checkpoint_to_hf(ckpt, hf, progress=False)
    outs = []
    for model in (ckpt, hf):
        out = json.loads(_cli("generate", "--model", model, "--prompt", "The file is",
                              "--max-new-tokens", "6", "--greedy", "--json", "--pauses", "3"))
        assert set(out) == {"token_ids", "text"} and len(out["token_ids"]) <= 6
        outs.append(out)
    assert outs[0] == outs[1]

    lm = NativeModel(ckpt)
    prompt = lm.encode("The file is")
    for m, expect in ((None, lm.default_pauses), (3, 3), (0, 0)):
        res = generate_text(lm, "The file is", 4, greedy=True, pauses=m)
        assert res["prompt_ids"] == prompt + [lm.pause_id] * expect
        assert res["pauses"] == expect
        assert lm.pause_id not in res["token_ids"]
    res3 = generate_text(lm, "The file is", 6, greedy=True, pauses=3)
    assert res3["token_ids"] == outs[0]["token_ids"]


def test_generate_sampling_is_seeded(trained):  # noqa: F811
    from ponder_pt.inference import NativeModel, generate_text

    lm = NativeModel(trained["plain"])
    a = generate_text(lm, "import os", 8, greedy=False, seed=3, top_k=20)
    b = generate_text(lm, "import os", 8, greedy=False, seed=3, top_k=20)
    assert a == b and a["pauses"] == 0
    assert all(0 <= t < lm.vocab_rows for t in a["token_ids"])


def test_generate_batch_equals_one_at_a_time_native_and_hf(trained, tmp_path,  # noqa: F811
                                                           monkeypatch):
    """`generate_batch` (left-padded batches of similar lengths, `sft` evaluation and lm-eval
    `generate_until` use it) returns, in the given order, what `generate` gives each prompt:
    on the pondering checkpoint (K+1 static caches) and on its HF export (HF generate() with an
    attention mask), with EOS stops and a batch size that splits the prompts. The HF model's
    generation and scoring (a new attention shape per call) run under `varying_shapes`."""
    import contextlib

    from ponder_pt.export import checkpoint_to_hf
    from ponder_pt.inference import HFModel, NativeModel
    from ponder_pt import sdpa_backends

    entered = []

    @contextlib.contextmanager
    def record(device):
        entered.append(str(device))
        yield

    monkeypatch.setattr(sdpa_backends, "varying_shapes", record)

    ckpt = trained["ponder"]
    hf_dir = str(tmp_path / "hf")
    checkpoint_to_hf(ckpt, hf_dir, progress=False)
    texts = ["The file is", "Return", "import os and the number of lines in", "if x"]
    for lm in (NativeModel(ckpt, device="cpu"), HFModel(hf_dir, device="cpu")):
        prompts = [lm.encode(t) for t in texts]
        one = [lm.generate(p, 10, greedy=True) for p in prompts]
        assert lm.generate_batch(prompts, 10, batch_size=3) == one, lm.kind
        free = [lm.generate(p, 10, greedy=True, stop_at_eos=False) for p in prompts]
        assert lm.generate_batch(prompts, 10, stop_at_eos=False) == free, lm.kind
        # sampled: prompt i with its own seed, as alone (HF: one prompt at a time)
        seeds = [11, 12, 13, 14]
        alone = [lm.generate(p, 10, greedy=False, temperature=0.9, top_k=20, seed=seed)
                 for p, seed in zip(prompts, seeds)]
        assert lm.generate_batch(prompts, 10, batch_size=3, greedy=False, temperature=0.9,
                                 top_k=20, seeds=seeds) == alone, lm.kind
        assert len({tuple(a) for a in alone}) > 1
        with pytest.raises(ValueError, match="one seed per prompt"):
            lm.generate_batch(prompts, 10, greedy=False, seeds=seeds[:2])
        lm.logits(torch.tensor([prompts[0]]))
    # HF: 8 greedy generate() calls, 2 + 1 greedy batches, 2 sampled batches and their 8
    # generate() calls, 1 logits; native: logits only (Decoder: own test)
    assert entered.count("cpu") == 1 + 8 + 3 + 2 + 8 + 1, entered


def test_generate_prompts_file(trained, tmp_path):  # noqa: F811
    """`generate --prompts-file`: one JSON line per prompt, in order, each what `--prompt`
    gives that prompt (decoded in batches; sampled ones with seed + their index); a bad jsonl line fails before the
    model loads, naming file and line."""
    from ponder_pt.inference import NativeModel, generate_text
    from ponder_pt.inference.generate import generate_many

    prompts = ["The file is", "Return", "import os and the number of lines in"]
    lm = NativeModel(trained["ponder"])
    one = [generate_text(lm, p, 6, greedy=True, pauses=2) for p in prompts]
    assert generate_many(lm, prompts, 6, greedy=True, pauses=2, batch_size=2) == one
    sampled = [generate_text(lm, p, 6, pauses=2, temperature=1.5, seed=5 + i)
               for i, p in enumerate(prompts)]
    assert generate_many(lm, prompts, 6, pauses=2, temperature=1.5, seed=5,
                         batch_size=2) == sampled

    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join([prompts[0], "", prompts[1], prompts[2]]) + "\n")
    out = tmp_path / "out.jsonl"
    _cli("generate", "--model", trained["ponder"], "--prompts-file", str(txt), "--greedy",
         "--max-new-tokens", "6", "--pauses", "2", "--output", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert [r["token_ids"] for r in rows] == [o["token_ids"] for o in one]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    proc = ponder(["generate", "--model",
                   trained["ponder"], "--prompts-file", str(bad)],
                  timeout=120)
    assert proc.returncode == 2 and 'bad.jsonl:2: expected {"prompt": "..."}' in proc.stderr

