"""Read a training checkpoint (any TP / PP / ZeRO 0-3 layout) into one unsharded state dict.

    cfg, full, tag = read_checkpoint("runs/x/ckpt")   # full: our parameter names, fp32

Where the weights live in `checkpoint.dir/<tag>/`:
* TP (PP=1), ZeRO 0-2: `mp_rank_XX_model_states.pt["module"]`, one file per TP rank (XX);
  the TP shards are concatenated back with the same rule megatron's init splits them.
* ZeRO-3: parameters are partitioned over DP in `zero_pp_rank_D_mp_rank_XX_*` files; each TP
  rank's slice is rebuilt with DeepSpeed's `zero_to_fp32` (which assumes one model-parallel
  rank, so it is run on that rank's files only), then TP-merged as above.
* PP (any TP, ZeRO >= 1): the unrolled chain of `ponder_pt.models.pipeline`. DeepSpeed writes
  per-layer files only for the BlockLayers; the SharedParams (embedding, final norm, output
  head) are bound to the layer chain through `forward_fn` and appear in no layer file, so every
  stage's fp32 master copy is rebuilt with `zero_to_fp32` (names `tied_modules.block<i>.block.*`
  and `tied_modules.shared.*`).

The run config comes from `checkpoint.dir/run_config.yaml`, written by the trainer.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import tempfile
from typing import Optional

import torch

from ..config import Config, load_config
from ..engine.checkpoint import list_tags, load_checkpoint_file, read_meta, verify
from ..models import parallel as par

RUN_CONFIG = "run_config.yaml"


def load_run_config(ckpt_dir: str) -> Config:
    path = os.path.join(ckpt_dir, RUN_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the checkpoint directory needs the run "
                                "config the trainer writes next to the checkpoints")
    return load_config(path, validate=False)


def resolve_tag(ckpt_dir: str, tag: Optional[str] = None) -> str:
    """`tag`, else the newest complete tag (the one `latest` names when it is intact)."""
    if tag is not None:
        reason = verify(ckpt_dir, tag)
        if reason is not None:
            raise ValueError(f"{ckpt_dir}/{tag}: {reason}")
        return tag
    for candidate in list_tags(ckpt_dir):
        if verify(ckpt_dir, candidate) is None:
            return candidate
    raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint (step_NNNNNNNN/ with "
                            "ponder_meta.json)")


def tp_spec(name: str, cfg) -> Optional[tuple[int, int]]:
    """(dim, stride) of the TP split of parameter `name` (our naming), None = replicated."""
    if name in ("embed.weight", "output.weight"):
        return 0, 1
    if re.search(r"attn\.qkv\.(weight|bias)$", name):
        return 0, 1
    if re.search(r"mlp\.fc1\.(weight|bias)$", name):
        return 0, 2 if cfg.arch == "llama" else 1
    if re.search(r"(attn\.dense|mlp\.fc2)\.weight$", name):
        return 1, 1
    return None


def merge_tp(parts: list[dict], cfg) -> dict:
    """Per-TP-rank state dicts (rank order) -> full tensors."""
    full = {}
    for name in parts[0]:
        spec = tp_spec(name, cfg)
        tensors = [p[name] for p in parts]
        full[name] = par.unshard(tensors, *spec) if spec and len(parts) > 1 else tensors[0]
    return full


def _load(path: str, unsafe_unpickle: bool = False) -> dict:
    return load_checkpoint_file(path, unsafe_unpickle)


def _clean(sd: dict) -> dict:
    return {k: v.detach().float() for k, v in sd.items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


def _zero_fp32(root: str, mp_rank: int, unsafe_unpickle: bool = False) -> dict:
    """DeepSpeed's fp32 reconstruction restricted to one model-parallel rank's files.

    zero_to_fp32 unpickles with weights_only=False, so every file is first opened with the
    restricted unpickler (memory-mapped: the tensor data is not read) and refused there if it
    holds anything else; only files that pass reach DeepSpeed."""
    from deepspeed.utils import zero_to_fp32

    pattern = f"*mp_rank_{mp_rank:02d}_"
    files = [f for f in glob.glob(os.path.join(root, pattern + "*.pt"))
             if f.endswith(("_model_states.pt", "_optim_states.pt"))]
    if not any(f.endswith("_optim_states.pt") for f in files):
        raise ValueError(f"{root}: no ZeRO optimizer files for model-parallel rank {mp_rank}")
    if not unsafe_unpickle:
        for f in files:
            load_checkpoint_file(f, mmap=True)
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            dst = os.path.join(tmp, os.path.basename(f))
            if f.endswith("_model_states.pt") and os.path.basename(f).startswith("mp_rank"):
                state = _load(f, unsafe_unpickle)  # small; the pipeline engine saves module=None
                if state.get("module") is None:
                    state["module"] = {}
                    torch.save(state, dst)
                    continue
            os.symlink(os.path.abspath(f), dst)
        with contextlib.redirect_stdout(io.StringIO()):
            sd = zero_to_fp32._get_fp32_state_dict_from_zero_checkpoint(tmp, False)
            sd = zero_to_fp32.to_torch_tensor(sd)
    return _clean(sd)


def _pipeline_full(root: str, cfg: Config, meta: dict, unsafe_unpickle: bool) -> dict:
    """TP x PP: DeepSpeed's model-parallel rank of (stage, TP rank) is stage * TP + TP rank;
    each TP rank's weights are gathered over the stages, then the TP shards merged."""
    if int(meta.get("zero_stage", cfg.parallel.zero_stage)) == 0:
        raise ValueError("pipeline checkpoint saved with ZeRO-0: DeepSpeed writes no file "
                         "holding the shared embedding / head weights (see ponder_pt.export."
                         "native); train PP runs with parallel.zero_stage=1 to export them")
    tp = cfg.parallel.tp
    parts = [{} for _ in range(tp)]
    for stage in range(cfg.parallel.pp):
        for tp_rank in range(tp):
            full = parts[tp_rank]
            for name, t in _zero_fp32(root, stage * tp + tp_rank, unsafe_unpickle).items():
                m = re.match(r"tied_modules\.block(\d+)\.block\.(.+)$", name)
                if m:
                    full[f"layers.{m.group(1)}.{m.group(2)}"] = t
                elif name.startswith("tied_modules.shared."):
                    full[name[len("tied_modules.shared."):]] = t
    return merge_tp(parts, cfg.model)


def read_checkpoint(ckpt_dir: str, tag: Optional[str] = None, unsafe_unpickle: bool = False
                    ) -> tuple[Config, dict, str]:
    """(run config, full fp32 state dict in our naming, tag) of a training checkpoint.

    Files are unpickled with torch's weights_only loader, DeepSpeed's checkpoint types
    allow-listed (engine.checkpoint.load_checkpoint_file); `unsafe_unpickle` lifts that for
    checkpoints you trust that hold other objects."""
    cfg = load_run_config(ckpt_dir)
    tag = resolve_tag(ckpt_dir, tag)
    root = os.path.join(ckpt_dir, tag)
    meta = read_meta(ckpt_dir, tag)
    tp = cfg.parallel.tp
    # a pipeline engine's checkpoint (`convert from-hf --pp N` writes plain TP shards)
    if (glob.glob(os.path.join(root, "layer_*-model_states.pt"))
            or int((meta.get("layout") or {}).get("pp", 1)) > 1):
        full = _pipeline_full(root, cfg, meta, unsafe_unpickle)
    elif int(meta.get("zero_stage", cfg.parallel.zero_stage)) == 3:
        full = merge_tp([_zero_fp32(root, r, unsafe_unpickle) for r in range(tp)], cfg.model)
    else:
        parts = []
        for r in range(tp):
            path = os.path.join(root, f"mp_rank_{r:02d}_model_states.pt")
            module = _load(path, unsafe_unpickle)["module"]
            parts.append(_clean(module))
        full = merge_tp(parts, cfg.model)
    if cfg.model.tie_embeddings:
        full.pop("output.weight", None)
    return cfg, full, tag
