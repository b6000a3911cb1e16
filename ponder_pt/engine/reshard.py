"""Elastic resume: a checkpoint saved at one layout (TP x PP x DP, ZeRO stage) resumed at another,
keeping the weights, Adam's moments, the LR schedule and the data position.

DeepSpeed re-partitions optimizer state across layouts only through its universal checkpoint.
We use its converter, `deepspeed.checkpoint.ds_to_universal`, to read the ZeRO 1/2/3 shards
(its fragment maps are the one reader of that format), one model-parallel rank at a time, and
merge the tensor-parallel slices ourselves with the same rule the exporter uses
(`weights.layout.tp_spec`), under our own parameter names. The result sits next to the shards:

    <tag>/universal/zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt   {"param": full tensor}
                                                               (DeepSpeed's universal layout)
    <tag>/universal/universal_meta.json   source layout, optimizer step, LR scheduler state,
                                          engine counters; written last: the "complete" marker

A checkpoint from another run (`checkpoint.load`, perhaps read-only) is converted into this
run's own `checkpoint.dir` instead (`<dir>/.converted/<tag>-<hash of the source path>/`, removed
once this run has saved a checkpoint of its own), so the source is never written to.

It is built in a temporary directory and renamed into place, so a crash during conversion
leaves the checkpoint itself untouched (its own files are only read) and leaves no half-written
`universal/` behind. The new engine then takes it in two parts: the weights go into the freshly
built model before `deepspeed.initialize` (every ZeRO stage partitions them from there), and
after it each parameter's fp32 master and moments go in through DeepSpeed's
`safe_set_full_fp32_param` / `safe_set_full_optimizer_state`, which re-partition them for the
new layout (TP slices cut with the parameter's own megatron partition attributes).

Limits: the source must have been saved with ZeRO >= 1 (ZeRO-0 keeps a plain optimizer in the
model-state files, which DeepSpeed's converter does not read; a ZeRO-0 run still resumes at a new
DP size, as its optimizer is not partitioned). DeepSpeed's pipeline engine takes ZeRO 0/1 only,
so PP runs convert from and to ZeRO-1.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import io
import json
import os
import shutil
import tempfile
from typing import Callable, Optional

import torch

from ..weights.layout import full_name, tp_spec, unshard
from ..weights.native import load_checkpoint_file

UNIVERSAL = "universal"
CONVERTED = ".converted"
UMETA = "universal_meta.json"
STATES = ("fp32", "exp_avg", "exp_avg_sq")
LAYOUT_KEYS = ("tp", "pp", "dp", "zero_stage")


class FullNameView:
    """A training module seen under our unsharded parameter names, for loaders written for
    `PonderLM` (`models.hf.load_initial_weights`): a pipeline stage's tied modules
    appear as `layers.<i>.*` and the shared weights by their own names; `cfg` is the model
    config. Everything else is the module's."""

    def __init__(self, module: torch.nn.Module, cfg):
        self._module, self.cfg = module, cfg

    def named_parameters(self, *args, **kwargs):
        for name, p in self._module.named_parameters(*args, **kwargs):
            yield full_name(name), p

    def __getattr__(self, item):
        return getattr(self._module, item)


def describe(layout: dict) -> str:
    return (f"TP={layout['tp']} PP={layout['pp']} DP={layout['dp']} "
            f"ZeRO-{layout['zero_stage']}")


def universal_dir(src: str, tag: str, run_dir: Optional[str] = None) -> str:
    """Where `src`'s `tag` is converted: inside the tag, or for a checkpoint of another run
    (`run_dir` given and not `src`) under `run_dir`, leaving `src` untouched."""
    if run_dir is None or os.path.realpath(run_dir) == os.path.realpath(src):
        return os.path.join(src, tag, UNIVERSAL)
    digest = hashlib.sha1(os.path.realpath(src).encode()).hexdigest()[:10]
    return os.path.join(run_dir, CONVERTED, f"{tag}-{digest}")


def is_converted(udir: str) -> bool:
    return os.path.exists(os.path.join(udir, UMETA))


# ------------------------------------------------------------------ conversion (one process)

def _stage_mp_rank(root: str, mp: int, stage: str, unsafe_unpickle: bool) -> None:
    """A directory DeepSpeed's converter reads as a 1-rank model-parallel checkpoint: the
    ZeRO files of model-parallel rank `mp` (symlinked, renamed to rank 0) and its model-state
    file(s) with non-tensor module entries (megatron's `_extra_state`) dropped and the
    recorded TP x PP degree set to 1."""
    from deepspeed.checkpoint.constants import (CHECKPOINT_PARALLEL_DIMS, CHECKPOINT_PP_DEGREE,
                                                CHECKPOINT_TP_DEGREE)

    os.makedirs(stage)
    files = [f for f in glob.glob(os.path.join(root, f"*mp_rank_{mp:02d}_*.pt"))
             if f.endswith(("_model_states.pt", "_optim_states.pt"))]
    if not any(f.endswith("_optim_states.pt") for f in files):
        raise ValueError(f"{root}: no ZeRO optimizer files for model-parallel rank {mp}")
    for f in files:
        dst = os.path.join(stage, os.path.basename(f).replace(f"mp_rank_{mp:02d}", "mp_rank_00"))
        if f.endswith("_model_states.pt"):
            sd = load_checkpoint_file(f, unsafe_unpickle)
            if sd.get("module"):
                sd["module"] = {k: v for k, v in sd["module"].items() if torch.is_tensor(v)}
            if CHECKPOINT_PARALLEL_DIMS in sd:
                sd[CHECKPOINT_PARALLEL_DIMS] = {CHECKPOINT_PP_DEGREE: 1, CHECKPOINT_TP_DEGREE: 1}
            sd["mp_world_size"] = 1
            torch.save(sd, dst)
        else:
            if not unsafe_unpickle:  # refuse anything beyond tensors before DeepSpeed unpickles
                load_checkpoint_file(f, mmap=True)
            os.symlink(os.path.abspath(f), dst)


def _param_shapes(stage: str) -> dict:
    shapes = {}
    for f in sorted(glob.glob(os.path.join(stage, "*_model_states.pt"))):
        sd = torch.load(f, map_location="cpu", weights_only=False)  # our own staged copy
        for group in sd.get("param_shapes") or []:
            shapes.update({k: tuple(v) for k, v in group.items()})
    return shapes


def _read_mp_rank(root: str, mp: int, work: str, unsafe_unpickle: bool
                  ) -> tuple[dict, Optional[float]]:
    """{name in the training module: {state: tensor}} of one model-parallel rank, DP merged."""
    from deepspeed.checkpoint import ds_to_universal

    stage, out = os.path.join(work, f"stage_{mp:03d}"), os.path.join(work, f"mp_{mp:03d}")
    _stage_mp_rank(root, mp, stage, unsafe_unpickle)
    shapes = _param_shapes(stage)
    args = argparse.Namespace(input_folder=stage, output_folder=out, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    params, step = {}, None
    zero = os.path.join(out, "zero")
    for name in sorted(os.listdir(zero)):
        pdir = os.path.join(zero, name)
        if not os.path.isdir(pdir):
            continue
        entry = {}
        for state in STATES:
            path = os.path.join(pdir, f"{state}.pt")
            if not os.path.exists(path):
                continue
            t = torch.load(path, map_location="cpu", weights_only=False)
            t = t["param"] if isinstance(t, dict) else t
            if name in shapes:
                t = t.reshape(shapes[name])
            entry[state] = t.detach().float().clone()
        if os.path.exists(os.path.join(pdir, "step.pt")) and step is None:
            s = torch.load(os.path.join(pdir, "step.pt"), weights_only=False)
            step = float(s.item() if torch.is_tensor(s) else s)
        params[name] = entry
    shutil.rmtree(stage, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return params, step


def _engine_state(root: str, unsafe_unpickle: bool) -> dict:
    """LR scheduler state and DeepSpeed's step counters (identical in every model-state file)."""
    files = sorted(glob.glob(os.path.join(root, "*mp_rank_00_model_states.pt")))
    sd = load_checkpoint_file(files[0], unsafe_unpickle)
    out = {k: sd.get(k) for k in ("global_steps", "global_samples", "skipped_steps")}
    sched = sd.get("lr_scheduler")
    out["lr_scheduler"] = {k: v for k, v in sched.items() if k != "lr_lambdas"} if sched else None
    return out


def _shard_step(root: str, unsafe_unpickle: bool) -> Optional[float]:
    """Adam's step as the first ZeRO optimizer shard records it (every parameter group of a
    shard holds the same one), or None."""
    files = sorted(glob.glob(os.path.join(root, "*_optim_states.pt")))
    if not files:
        return None
    outer = load_checkpoint_file(files[0], unsafe_unpickle).get("optimizer_state_dict", {})
    # ZeRO 1/2 keep torch's optimizer state under base_optimizer_state, ZeRO-3 under
    # optimizer_state_dict
    inner = outer.get("base_optimizer_state") or outer.get("optimizer_state_dict") or {}
    steps = {float(st["step"]) for st in (inner.get("state") or {}).values()
             if isinstance(st, dict) and "step" in st}
    return steps.pop() if len(steps) == 1 else None


def convert(src: str, tag: str, layout: dict, model_cfg, unsafe_unpickle: bool = False,
            log: Callable[[str], None] = print, out: Optional[str] = None) -> str:
    """Write the layout-free form (see the module docstring) of `<src>/<tag>`, saved at
    `layout`, to `out` (default `<src>/<tag>/universal/`); returns its path. Reuses a complete
    one. Run on one process."""
    out = out or universal_dir(src, tag)
    if is_converted(out):
        return out
    if int(layout["zero_stage"]) < 1:
        raise ValueError(f"{tag} was saved with ZeRO-0 at {describe(layout)}: its optimizer "
                         "state cannot be re-partitioned for another TP or PP size (DeepSpeed's "
                         "universal conversion reads ZeRO >= 1 shards); resume it at TP="
                         f"{layout['tp']} PP={layout['pp']}")
    root = os.path.join(src, tag)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(parent), f"{name}.tmp*")):  # killed ones
        shutil.rmtree(stale, ignore_errors=True)
    tp, pp = int(layout["tp"]), int(layout["pp"])
    work = tempfile.mkdtemp(prefix=f"{name}.tmp", dir=parent)
    try:
        parts: dict[str, dict[int, dict]] = {}  # full name -> tp rank -> states
        step = None
        for mp in range(tp * pp):
            pp_rank, tp_rank = divmod(mp, tp)  # DeepSpeed's model-parallel rank order
            params, s = _read_mp_rank(root, mp, work, unsafe_unpickle)
            step = s if step is None else step
            for name, states in params.items():
                # a block or the shared weights held by several stages: identical copies
                parts.setdefault(full_name(name), {}).setdefault(tp_rank, states)
        if step is None:  # ds_to_universal writes no step.pt for ZeRO-3: read the shards
            step = _shard_step(root, unsafe_unpickle)
        if step is None:
            raise ValueError(f"{tag}: the optimizer shards under {root} record no Adam step "
                             "(step 0 would redo the bias correction of the first steps)")
        names = []
        for name, by_rank in sorted(parts.items()):
            if sorted(by_rank) != list(range(tp)):
                raise ValueError(f"{tag}: {name} is missing on some TP ranks ({sorted(by_rank)})")
            spec = tp_spec(name, model_cfg)
            for state in STATES:
                if any(state not in by_rank[r] for r in range(tp)):
                    # Adam keeps both moments for every parameter it updates under ZeRO:
                    # a missing one is a damaged shard, and zeros would change the run
                    raise ValueError(f"{tag}: the optimizer shards under {root} hold no "
                                     f"{state} for {name}")
                pieces = [by_rank[r][state] for r in range(tp)]
                full = unshard(pieces, *spec) if spec and tp > 1 else pieces[0]
                pdir = os.path.join(work, "zero", name)
                os.makedirs(pdir, exist_ok=True)
                torch.save({"param": full.contiguous()}, os.path.join(pdir, f"{state}.pt"))
            names.append(name)
        meta = {"tag": tag, "source_layout": {k: int(layout[k]) for k in LAYOUT_KEYS},
                "step": step, "params": names, **_engine_state(root, unsafe_unpickle)}
        for leftover in glob.glob(os.path.join(work, "stage_*")) + glob.glob(
                os.path.join(work, "mp_*")):
            shutil.rmtree(leftover, ignore_errors=True)
        with open(os.path.join(work, UMETA), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.isdir(out):  # an older conversion without its marker
            shutil.rmtree(out)
        os.replace(work, out)
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)
    log(f"checkpoint {tag}: converted from {describe(layout)} to layout-free form ({out})")
    return out


# ------------------------------------------------------------------ loading (every rank)

def read_meta(udir: str) -> dict:
    with open(os.path.join(udir, UMETA), encoding="utf-8") as fh:
        return json.load(fh)


def read_full(udir: str, name: str, state: str) -> torch.Tensor:
    """The full (unsharded) `state` tensor (fp32 weights, or an optimizer moment of STATES)
    of parameter `name` in the converted checkpoint `udir`; refuses a parameter the
    checkpoint never had, and a missing file."""
    path = os.path.join(udir, "zero", name, f"{state}.pt")
    if not os.path.isdir(os.path.dirname(path)):  # the checkpoint never had this parameter
        raise ValueError(f"{name}: the model has this parameter, the checkpoint converted in "
                         f"{udir} has not: the model differs from the one it was trained "
                         "with; resume with that model's settings (its run_config.yaml)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: {udir} is damaged; remove it to convert "
                                f"the checkpoint again")
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)["param"]


def _local(param: torch.nn.Parameter, full: torch.Tensor, name: str) -> torch.Tensor:
    """This rank's TP piece of `full`, checked against the parameter's (unpartitioned) shape."""
    from ..models import parallel as par  # megatron: imported only where a model exists

    spec = par.partition_spec(param)
    t = par.shard(full, *spec) if spec else full
    shape = tuple(getattr(param, "ds_shape", param.shape))
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: the checkpoint gives {tuple(t.shape)} for this rank, the model "
                         f"has {shape} (resuming needs the same model shape and vocabulary rows)")
    return t


def load_weights(module: torch.nn.Module, udir: str) -> set:
    """Copy the converted weights into a model before DeepSpeed wraps it; returns the full
    names it loaded (`unused_params` checks them, gathered over the ranks)."""
    loaded = set()
    with torch.no_grad():
        for name, p in module.named_parameters():
            t = _local(p, read_full(udir, full_name(name), "fp32"), name)
            p.copy_(t.to(device=p.device, dtype=p.dtype))
            loaded.add(full_name(name))
    return loaded


def unused_params(udir: str, loaded: set) -> list[str]:
    """Parameters of the converted checkpoint that no rank's model took (`loaded`: every
    rank's `load_weights`): the checkpoint holds a larger or another model."""
    return sorted(set(read_meta(udir).get("params", [])) - set(loaded))


def _step_value(optimizer, group: dict, like: torch.Tensor, step: float):
    """Adam's step count in the form `optimizer` keeps it: torch's a float tensor (on the
    device when fused or capturable), DeepSpeedCPUAdam's a plain int."""
    if type(optimizer).__name__ == "DeepSpeedCPUAdam":
        return int(step)
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(step, dtype=torch.float32, device=like.device if on_device else "cpu")


def _set_group_steps(optimizer, step: float) -> None:
    """FusedAdam counts steps per param group, not per parameter."""
    for group in optimizer.param_groups:
        if "step" in group or type(optimizer).__name__ == "FusedAdam":
            group["step"] = int(step)


def _init_optimizer_state(opt, step: float) -> bool:
    """Create Adam's (lazily made) state on DeepSpeed's flat fp32 partitions so that
    `safe_set_full_optimizer_state` has somewhere to write. False for a plain optimizer."""
    flats = None
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                 "fp32_groups_flat_partition"):
        if hasattr(opt, attr):
            flats = list(getattr(opt, attr))
            break
    if flats is None:
        return False
    inner = opt.optimizer
    group = inner.param_groups[0]
    for flat in flats:
        state = inner.state[flat]
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(flat)
        state["step"] = _step_value(inner, group, flat, step)
    _set_group_steps(inner, step)
    if hasattr(opt, "_hp_optimizer_states_linked"):  # ZeRO 1/2, bf16: link the fragments now
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    return True


def load_optimizer(engine, udir: str) -> dict:
    """After `deepspeed.initialize`: fp32 masters, Adam moments and step, LR scheduler and the
    engine's counters from the converted checkpoint. Returns its universal meta."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    meta = read_meta(udir)
    if meta.get("step") is None:
        raise ValueError(f"{os.path.join(udir, UMETA)} records no Adam step; remove {udir} to "
                         "convert the checkpoint again")
    step = float(meta["step"])
    opt = engine.optimizer
    zero_flat = _init_optimizer_state(opt, step)
    plain = None if zero_flat else getattr(opt, "optimizer", opt)
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:
                continue
            fname = full_name(name)
            if zero_flat:
                safe_set_full_fp32_param(p, _local(p, read_full(udir, fname, "fp32"), name)
                                         .to(p.device, torch.float32))
            for key in ("exp_avg", "exp_avg_sq"):
                value = _local(p, read_full(udir, fname, key), name).to(p.device, torch.float32)
                if zero_flat:
                    safe_set_full_optimizer_state(p, value, key)
                else:  # no ZeRO, fp32: a torch optimizer over the model's own parameters
                    plain.state[p][key] = value.to(p.dtype).clone()
            if not zero_flat:
                group = next((g for g in plain.param_groups if any(q is p for q in g["params"])),
                             None)
                if group is None:
                    raise NotImplementedError(
                        f"resuming at another layout into {type(opt).__name__} (no ZeRO, "
                        "fp16) is not supported: use ZeRO >= 1 or the saved layout")
                plain.state[p]["step"] = _step_value(plain, group, p, step)
    if not zero_flat:
        _set_group_steps(plain, step)
    sched = meta.get("lr_scheduler")
    if sched and engine.lr_scheduler is not None:
        current = engine.lr_scheduler.state_dict()
        engine.lr_scheduler.load_state_dict({**current, **sched})
        for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, sched["_last_lr"]):
            group["lr"] = lr
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if meta.get(key) is not None:
            setattr(engine, key, int(meta[key]))
    return meta
