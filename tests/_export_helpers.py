"""Shared fixtures for test_export / test_generate / test_eval: tiny real training checkpoints
(plain, pondering, TP=2, ZeRO-3, PP=2) and random pondering HF exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import shared_dir
from train_utils import run_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (extra overrides, nproc)
RUNS = {
    "plain": (["ponder.steps=0", "pause.rate=0"], 1),
    "ponder": ([], 1),  # ponder.steps=2 + pause tokens (TINY)
    "tp2": (["parallel.tp=2"], 2),
    "zero3": (["parallel.zero_stage=3", "ponder.steps=1", "pause.rate=0"], 2),
    "pp2": (["parallel.pp=2", "parallel.zero_stage=1", "ponder.steps=1"], 2),
}


class _Runs:
    """name -> checkpoint.dir, each run trained on first use (then cached for the test run,
    across xdist workers too)."""

    def __init__(self, tmp_path_factory, prefix, tokenizer):
        self.factory, self.prefix, self.tokenizer, self.done = tmp_path_factory, prefix, tokenizer, {}

    def _train(self, name: str, run_dir: str) -> None:
        extra, nproc = RUNS[name]
        run_train(run_dir, self.prefix, self.tokenizer,
                  [f"checkpoint.dir={os.path.join(run_dir, 'ckpt')}", "train.iters=2",
                   "checkpoint.interval=2", *extra], nproc=nproc)

    def __getitem__(self, name: str) -> str:
        if name not in self.done:
            run_dir = shared_dir(self.factory, f"export_run_{name}",
                                 lambda out: self._train(name, out))
            self.done[name] = os.path.join(run_dir, "ckpt")
        return self.done[name]


@pytest.fixture(scope="session")
def trained(prepared, bpe_dir, tmp_path_factory):
    """Lazily trained 2-step tiny runs: trained["ponder"] -> its checkpoint.dir."""
    return _Runs(tmp_path_factory, prepared, bpe_dir)


def run_stock(script: str, *args, timeout: int = 300) -> dict:
    """Run `script` in a fresh interpreter that must not import ponder_pt; returns its JSON."""
    guard = ("import sys\n"
             "class _Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'ponder_pt' or name.startswith('ponder_pt.'):\n"
             "            raise ImportError('ponder_pt must not be imported here')\n"
             "sys.meta_path.insert(0, _Block())\n")
    # PYTHONPATH is kept: the compat run puts an older transformers on it, and the stock process
    # must load that one too (stock_check asserts it); the guard above keeps ponder_pt out
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", guard + script, *args], capture_output=True,
                          text=True, timeout=timeout, cwd="/", env=env)
    if proc.returncode != 0:
        raise AssertionError(f"stock script failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# per job {"path", "rows", "n_new"}: logits on rows[0], KV-cached generate() of the left-padded
# batch vs a cache-free greedy loop, each row alone, and a sampled batch
STOCK_SCRIPT = r"""
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM
results = []
for job in json.loads(sys.argv[1]):
    path, rows, n_new = job["path"], job["rows"], job["n_new"]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    out = {"class": type(model).__name__, "module": type(model).__module__,
           "transformers": transformers.__version__}
    with torch.no_grad():
        out["logits"] = model(torch.tensor([rows[0]]), use_cache=False).logits[0].tolist()
        width, pad = max(len(r) for r in rows), 0
        inp = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        cached = model.generate(inp, attention_mask=mask, max_new_tokens=n_new,
                                do_sample=False, pad_token_id=pad)[:, width:]
        seq, m = inp.clone(), mask.clone()
        for _ in range(n_new):
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            z = model(seq, attention_mask=m, position_ids=pos, use_cache=False).logits[:, -1]
            nxt = z.argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
        out["cached"], out["nocache"] = cached.tolist(), seq[:, width:].tolist()
        out["single"] = [model.generate(torch.tensor([r]), max_new_tokens=n_new, do_sample=False,
                                        pad_token_id=pad)[0, len(r):].tolist() for r in rows]
        torch.manual_seed(0)
        s = model.generate(inp, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=20,
                           pad_token_id=pad)
        out["sampled_shape"] = list(s.shape)
    results.append(out)
print(json.dumps(results))
"""


# per job {"path", "prompts", "native", "n_new" (default 8)}: greedy generate() of the
# left-padded prompts with the export's own code (trust_remote_code, ponder_pt not importable)
# against the native model's tokens
STOCK_GENERATE_PADDED = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
same = []
for job in json.loads(sys.argv[1]):
    m = AutoModelForCausalLM.from_pretrained(job["path"], trust_remote_code=True,
                                             dtype=torch.float32).eval()
    m.generation_config.eos_token_id = None
    rows = job["prompts"]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    out = m.generate(ids, attention_mask=mask, do_sample=False,
                     max_new_tokens=job.get("n_new", 8), pad_token_id=0)
    same.append(out[:, width:].tolist() == job["native"])
print(json.dumps({"same": same}))
"""


def stock_check(jobs: list[dict]) -> list[dict]:
    import transformers

    results = run_stock(STOCK_SCRIPT, json.dumps(jobs))
    for res in results:  # the stock process ran the transformers this test session runs
        assert res["transformers"] == transformers.__version__
    return results
