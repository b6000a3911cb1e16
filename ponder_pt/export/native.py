"""Read a training checkpoint (any TP / PP / ZeRO 0-3 layout) into one unsharded state dict.

    cfg, full, tag = read_checkpoint("runs/x/ckpt")   # full: our parameter names, fp32

The run config comes from `checkpoint.dir/run_config.yaml`, written by the trainer; where
the weights live for each layout: `ponder_pt.weights.native`.
"""

from __future__ import annotations

from typing import Optional

from ..config import Config, load_run_config
from ..weights.files import checkpoint_dir
from ..weights.native import read_weights


def read_checkpoint(ckpt_dir: str, tag: Optional[str] = None, unsafe_unpickle: bool = False
                    ) -> tuple[Config, dict, str]:
    """(run config, full fp32 state dict in our naming, tag) of a training checkpoint.

    Files are unpickled with torch's weights_only loader, DeepSpeed's checkpoint types
    allow-listed (weights.native.load_checkpoint_file); `unsafe_unpickle` lifts that for
    checkpoints you trust that hold other objects."""
    ckpt_dir = checkpoint_dir(ckpt_dir)  # a run directory: its checkpoints/
    cfg = load_run_config(ckpt_dir)
    full, tag = read_weights(ckpt_dir, cfg, tag, unsafe_unpickle)
    return cfg, full, tag
