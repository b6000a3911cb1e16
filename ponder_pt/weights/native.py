"""The tensors of a native checkpoint: its files unpickled without running code from them
(`load_checkpoint_file`), TP shards written (`write_tp_shards`, what `convert from-hf` makes),
and the weights of a training checkpoint of any TP / PP / ZeRO 0-3 layout read back as one
unsharded state dict in our naming, fp32 (`read_weights`).

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
"""

from __future__ import annotations

import contextlib
import enum
import glob
import io
import os
import pickle
import tempfile
from typing import Optional

import torch

from .files import read_meta, resolve_tag
from .layout import full_name, merge_tp, shard, tp_spec


UNSAFE_UNPICKLE_HINT = ("`--unsafe-unpickle` (convert to-hf, generate, eval) or "
                        "`--set checkpoint.unsafe_unpickle=true` (checkpoint.init_from)")


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled objects beyond tensors and DeepSpeed's own types."""


# The non-tensor types DeepSpeed pickles into model_states / optim_states files, found by
# loading real ZeRO 0-3, TP and PP checkpoints with weights_only=True; all plain data.
DEEPSPEED_SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                          "deepspeed.runtime.zero.config.ZeroStageEnum",
                          "deepspeed.utils.tensor_fragment.fragment_address")


def _enum_member(cls, name):
    """What a pickled `getattr(cls, name)` may do here: name a member of an allow-listed enum.
    Python 3.11.0-3.11.4 (Debian 12's 3.11.2) pickle an enum member that way, so DeepSpeed's
    ZeroStageEnum in every optimizer file written there needs it; any other getattr (a way to
    reach functions from an allowed class) is refused."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"it calls getattr({getattr(cls, '__name__', cls)!r}, "
                                 f"{name!r}), which names no enum member")


def _resolve(name: str):
    import importlib

    module, attr = name.rsplit(".", 1)
    return getattr(importlib.import_module(module), attr)


def load_checkpoint_file(path: str, unsafe_unpickle: bool = False, mmap: bool = False):
    """torch.load a training-checkpoint file on CPU without running code from it.

    Unpickling is restricted (weights_only=True) to tensors, containers and the allow-listed
    DeepSpeed types; a file needing more is refused with UnsafeCheckpointError naming the
    opt-in, `unsafe_unpickle=True`, which unpickles fully (only for files you trust). DeepSpeed
    is imported only when the file names its types (its import prints to stdout)."""
    if unsafe_unpickle:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=False)
    needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    unknown = [n for n in needed if n not in DEEPSPEED_SAFE_GLOBALS and n != "builtins.getattr"]
    allowed = [(_enum_member, n) if n == "builtins.getattr" else _resolve(n) for n in needed]
    try:
        if unknown:
            raise pickle.UnpicklingError(f"it names {', '.join(unknown)}")
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch wraps the unpickler's reason in a paragraph about its weights_only default
        reason = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise UnsafeCheckpointError(
            f"{path}: refusing to unpickle it: it holds objects beyond tensors and DeepSpeed's "
            f"checkpoint types ({reason}), and unpickling those can run "
            f"arbitrary code. If you trust this file, opt in with {UNSAFE_UNPICKLE_HINT}."
        ) from exc


def write_tp_shards(out: str, tag: str, full: dict, model_cfg, tp: int, progress: bool = True
                    ) -> None:
    """`full` (our naming) as TP-sharded DeepSpeed model-state files of `out/tag` ("module" =
    TP rank XX's shards in mp_rank_XX_model_states.pt), the layout a ZeRO-0 engine saves."""
    from tqdm import tqdm

    root = os.path.join(out, tag)
    os.makedirs(root, exist_ok=True)
    for r in tqdm(range(tp), desc="writing TP shards", disable=not progress):
        module = {}
        for name, t in full.items():
            spec = tp_spec(name, model_cfg)
            module[name] = (shard(t, *spec, rank=r, world=tp) if spec else t).clone()
        torch.save({"module": module, "mp_world_size": tp},
                   os.path.join(root, f"mp_rank_{r:02d}_model_states.pt"))


def _clean(sd: dict) -> dict:
    return {k: v.detach().float() for k, v in sd.items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


def zero_fp32(root: str, mp_rank: int, unsafe_unpickle: bool = False) -> dict:
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
                state = load_checkpoint_file(f, unsafe_unpickle)  # the pipeline saves module=None
                if state.get("module") is None:
                    state["module"] = {}
                    torch.save(state, dst)
                    continue
            os.symlink(os.path.abspath(f), dst)
        with contextlib.redirect_stdout(io.StringIO()):
            sd = zero_to_fp32._get_fp32_state_dict_from_zero_checkpoint(tmp, False)
            sd = zero_to_fp32.to_torch_tensor(sd)
    return _clean(sd)


def _pipeline_full(root: str, cfg, meta: dict, unsafe_unpickle: bool) -> dict:
    """TP x PP: DeepSpeed's model-parallel rank of (stage, TP rank) is stage * TP + TP rank;
    each TP rank's weights are gathered over the stages, then the TP shards merged."""
    if int(meta.get("zero_stage", cfg.parallel.zero_stage)) == 0:
        raise ValueError("pipeline checkpoint saved with ZeRO-0: DeepSpeed writes no file "
                         "holding the shared embedding / head weights (see ponder_pt.weights."
                         "native); train PP runs with parallel.zero_stage=1 to export them")
    tp = cfg.parallel.tp
    parts = [{} for _ in range(tp)]
    for stage in range(cfg.parallel.pp):
        for tp_rank in range(tp):
            full = parts[tp_rank]
            for name, t in zero_fp32(root, stage * tp + tp_rank, unsafe_unpickle).items():
                ours = full_name(name)
                if ours != name:  # a block's or the shared weights, under our name
                    full[ours] = t
    return merge_tp(parts, cfg.model)


def model_files(ckpt_dir: str, tag: str) -> str:
    """The files holding `tag`'s weights, as an error message names them: the one model-states
    file, else the tag directory and how many there are."""
    root = os.path.join(ckpt_dir, tag)
    files = sorted(glob.glob(os.path.join(root, "*model_states.pt")))
    if len(files) == 1:
        return files[0]
    return f"{root} ({len(files)} model-state files)" if files else root


def read_weights(ckpt_dir: str, cfg, tag: Optional[str] = None, unsafe_unpickle: bool = False
                 ) -> tuple[dict, str]:
    """(full fp32 state dict in our naming, tag) of `ckpt_dir`'s tag (default: the newest
    complete one); `cfg` is its run config (`cfg.parallel`, `cfg.model`).

    Files are unpickled with torch's weights_only loader, DeepSpeed's checkpoint types
    allow-listed (`load_checkpoint_file`); `unsafe_unpickle` lifts that for checkpoints
    you trust that hold other objects."""
    tag = resolve_tag(ckpt_dir, tag)
    root = os.path.join(ckpt_dir, tag)
    meta = read_meta(ckpt_dir, tag)
    tp = cfg.parallel.tp
    # a pipeline engine's checkpoint (`convert from-hf --pp N` writes plain TP shards)
    if (glob.glob(os.path.join(root, "layer_*-model_states.pt"))
            or int((meta.get("layout") or {}).get("pp", 1)) > 1):
        full = _pipeline_full(root, cfg, meta, unsafe_unpickle)
    elif int(meta.get("zero_stage", cfg.parallel.zero_stage)) == 3:
        full = merge_tp([zero_fp32(root, r, unsafe_unpickle) for r in range(tp)], cfg.model)
    else:
        parts = []
        for r in range(tp):
            path = os.path.join(root, f"mp_rank_{r:02d}_model_states.pt")
            module = load_checkpoint_file(path, unsafe_unpickle)["module"]
            parts.append(_clean(module))
        full = merge_tp(parts, cfg.model)
    if cfg.model.tie_embeddings:
        full.pop("output.weight", None)
    return full, tag
