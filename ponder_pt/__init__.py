"""ponder-pt: pretraining language models that think longer per token."""

import warnings

# megatron-core announces on import that the optional CUDA fusions are absent; on CPU and in
# our own layers that is expected, so keep it out of every command's output.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

__version__ = "0.1.0"

from .megatron_jit import install as _install_megatron_jit  # noqa: E402

# megatron-core's import compiles kernels ponder-pt never calls: defer that to their first call
_install_megatron_jit()
