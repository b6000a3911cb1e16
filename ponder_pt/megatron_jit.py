"""megatron-core's fused kernels compiled on first use instead of at import.

`megatron.core.jit.jit_fuser` is `torch.compile`, and megatron-core decorates a dozen fused
kernels with it while `import megatron.core` runs (bias-GeLU, SwiGLU, MoE routing, ...). Each
decoration imports torch's dynamo and inductor, about 1.5 s of every process that touches
megatron-core (each rank, each `ponder-pt` command), although ponder-pt calls none of those
kernels. Here the module is loaded as it is, and a `jit_fuser` that is `torch.compile` is
replaced by a decorator that calls `torch.compile` on the kernel's first call: the same
compiled kernel, when and if one is used.

`install()` (run by `import ponder_pt`) only registers an import hook; nothing changes where
megatron-core was imported before ponder-pt, and PONDER_EAGER_MEGATRON_JIT=1 turns it off.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys

MODULE = "megatron.core.jit"


def lazy_compile(fn):
    """`torch.compile(fn)`, made at the first call."""
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            import torch

            compiled = torch.compile(fn)
        return compiled(*args, **kwargs)

    call.lazy_compiled = True
    return call


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        import torch

        if getattr(module, "jit_fuser", None) is torch.compile:
            module.jit_fuser = lazy_compile


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> bool:
    """Register the hook (once); False where it cannot act: megatron-core already imported or
    PONDER_EAGER_MEGATRON_JIT=1."""
    if MODULE in sys.modules or os.environ.get("PONDER_EAGER_MEGATRON_JIT") == "1":
        return False
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    return True
