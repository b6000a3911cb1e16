"""Which SDPA kernels may run where attention shapes change from call to call: decoding with a
growing KV cache, cache-free generation, scoring batches of different widths.

On an H100 with torch 2.11, SDPA prefers cuDNN's fused attention for every case the GPU suite
profiled (training, masked prefill, one-token decode). cuDNN builds an execution plan for each
new shape, which costs tens to hundreds of milliseconds. Training meets one shape, so the plan
is built once and cuDNN's kernels are the fast choice there. A decoder that grows its cache by
a column per token meets a new shape every token: on that H100, eager K = 3 decoding at the
Pythia-160M shape took 80-95 ms per token, nearly independent of model size (410M: 113 ms),
against 4.2 ms for the same step replayed from a CUDA graph at one fixed shape. So where
shapes vary, flash and memory-efficient attention (no per-shape plan) are allowed, and cuDNN
is not. CPUs are left alone.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# in preference order; math only for what neither fused kernel supports
VARYING_SHAPE_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH)


@contextlib.contextmanager
def varying_shapes(device):
    """Inside: SDPA on CUDA picks among VARYING_SHAPE_BACKENDS (no cuDNN); elsewhere no-op."""
    if torch.device(device).type != "cuda":
        yield
        return
    with sdpa_kernel(list(VARYING_SHAPE_BACKENDS)):
        yield


def varying_shape_method(fn):
    """Method decorator: run under `varying_shapes(self.device)`."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with varying_shapes(self.device):
            return fn(self, *args, **kwargs)
    return wrapper
