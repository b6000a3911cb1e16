"""megatron-core's tensor-parallel linears, with a plain `F.linear` forward at TP = 1.

At TP = 1 megatron's forward is `matmul` then `+ bias` inside its own autograd.Function
(written for the TP > 1 communication), with a tp-group lookup and a deprecation warning per
call. `F.linear` is the same arithmetic in one call: the bias rides in the GEMM (cuBLAS
epilogue / addmm, one pass less over the output), autograd uses torch's own linear backward, and
the Python cost per call drops several-fold, which is what one-token decoding is made of.
Parameters, their TP attributes, init and state-dict keys are megatron's, untouched; only the
forward differs, and only where megatron's would add nothing (TP = 1, no fused gradient
accumulation, no deferred embedding wgrad, no activation offloading).
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from . import parallel as par


def _plain_ok(layer) -> bool:
    cfg = layer.config
    return (par.tp_size() == 1 and not layer.gradient_accumulation_fusion
            and not cfg.defer_embedding_wgrad_compute and not cfg.cpu_offloading
            and not getattr(layer, "explicit_expert_comm", False))


class ColumnLinear(ColumnParallelLinear):
    """ColumnParallelLinear; `F.linear` at TP = 1 (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plain = _plain_ok(self)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not self.plain:
            return super().forward(input_, weight, runtime_gather_output)
        w = self.weight if weight is None else weight
        if w is None:
            raise RuntimeError("ColumnLinear built with skip_weight_param_allocation needs "
                               "`weight`")
        if self.skip_bias_add:
            return F.linear(input_, w), self.bias
        return F.linear(input_, w, self.bias), None


class RowLinear(RowParallelLinear):
    """RowParallelLinear; `F.linear` at TP = 1 (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plain = _plain_ok(self)

    def forward(self, input_):
        if not self.plain:
            return super().forward(input_)
        if self.skip_bias_add:
            return F.linear(input_, self.weight), self.bias
        return F.linear(input_, self.weight, self.bias), None
