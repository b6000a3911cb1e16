"""ponder_pt.megatron_jit: importing megatron-core after ponder-pt no longer imports torch's
dynamo and inductor for kernels decorated at import; a kernel is compiled at its first call;
PONDER_EAGER_MEGATRON_JIT=1 (or megatron imported first) leaves megatron-core as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r"""
import json, sys
first = sys.argv[1]
if first == "megatron":
    import megatron.core
import ponder_pt, torch
import megatron.core
from megatron.core import jit
from megatron.core.fusions.fused_bias_gelu import bias_gelu
print(json.dumps({
    "dynamo": "torch._dynamo" in sys.modules, "inductor": "torch._inductor" in sys.modules,
    "lazy": jit.jit_fuser is ponder_pt.megatron_jit.lazy_compile,
    "eager_compile": jit.jit_fuser is torch.compile,
    "attribute": megatron.core.jit is jit,
    "kernel_lazy": getattr(bias_gelu, "lazy_compiled", False),
    "kernel_wraps": getattr(getattr(bias_gelu, "__wrapped__", None), "__name__", None),
}))
"""


def _probe(first="ponder_pt", **env):
    out = subprocess.run([sys.executable, "-c", PROBE, first], capture_output=True, text=True,
                         env=dict(os.environ, **env), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_megatron_imports_without_dynamo_and_kernels_stay_the_same():
    got = _probe()
    assert got == {"dynamo": False, "inductor": False, "lazy": True, "eager_compile": False,
                   "attribute": True, "kernel_lazy": True, "kernel_wraps": "bias_gelu"}
    for first, env in (("ponder_pt", {"PONDER_EAGER_MEGATRON_JIT": "1"}), ("megatron", {})):
        got = _probe(first, **env)
        assert got["eager_compile"] and not got["lazy"] and not got["kernel_lazy"], (first, got)
        assert got["dynamo"]


def test_compiled_at_the_first_call_only(monkeypatch):
    import torch

    from ponder_pt.megatron_jit import lazy_compile

    calls = []

    def fake_compile(fn):
        calls.append(fn)
        return lambda *a, **k: ("compiled", fn(*a, **k))

    monkeypatch.setattr(torch, "compile", fake_compile)

    def kernel(x, y=1):
        return x + y

    wrapped = lazy_compile(kernel)
    assert calls == [] and wrapped.__wrapped__ is kernel and wrapped.__name__ == "kernel"
    assert wrapped(1, y=2) == ("compiled", 3) and calls == [kernel]
    assert wrapped(5) == ("compiled", 6) and calls == [kernel]
