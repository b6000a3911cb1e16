"""The DeepSpeed config for a run: built from our Config (the one source of truth for batch
sizes, precision, ZeRO stage and optimizer), with an optional user JSON (`parallel.ds_config`,
e.g. one of ds_configs/*.json) merged on top for DeepSpeed-specific tuning."""

from __future__ import annotations

import json
from typing import Optional

import torch

from ..config import Config, ConfigError


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def adam_op(cfg: Config) -> Optional[str]:
    """The DeepSpeed op builder of the AdamW that `_adam_impl` picks, if it is a JIT-built op."""
    if cfg.parallel.cpu_offload:
        return "CPUAdamBuilder"
    if cfg.train.optimizer == "deepspeed" and torch.cuda.is_available():
        return "FusedAdamBuilder"
    return None


def _adam_impl(cfg: Config) -> dict:
    """DeepSpeed's AdamW params that pick the implementation (train.optimizer)."""
    if cfg.parallel.cpu_offload:
        return {}  # DeepSpeedCPUAdam
    cuda = torch.cuda.is_available()
    if cfg.train.optimizer == "deepspeed" and cuda:
        return {}  # FusedAdam (JIT-compiled); it needs CUDA, so CPU falls through to torch
    # torch.optim.AdamW with its fused multi-tensor kernel on CUDA
    return {"torch_adam": True, **({"fused": True} if cuda else {})}


def build_ds_config(cfg: Config, dp: int, user_json: Optional[str] = None) -> dict:
    tr, par = cfg.train, cfg.parallel
    ga = tr.global_batch // (tr.micro_batch * dp)
    zero: dict = {"stage": par.zero_stage}
    if par.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True,
                    reduce_bucket_size=int(5e8), allgather_bucket_size=int(5e8))
    if par.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds = {
        "train_batch_size": tr.global_batch,
        "train_micro_batch_size_per_gpu": tr.micro_batch,
        "gradient_accumulation_steps": ga,
        "gradient_clipping": tr.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": tr.precision == "bf16"},
        "fp16": {"enabled": tr.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "optimizer": {"type": "AdamW", "params": {
            "lr": tr.lr, "betas": [tr.adam_beta1, tr.adam_beta2], "eps": tr.adam_eps,
            "weight_decay": tr.weight_decay,
            **_adam_impl(cfg)}},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Ignore"},
        # activations cross stages whole: DeepSpeed's TP-partitioned send handles only the
        # first tensor of an activation tuple, and ours are (x, e) pairs
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
    }
    if user_json:
        try:
            with open(user_json, encoding="utf-8") as fh:
                extra = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"parallel.ds_config={user_json!r}: cannot read it ({exc})") from None
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                    "gradient_accumulation_steps"):
            if key in extra and extra[key] != ds[key]:
                raise ConfigError(f"parallel.ds_config sets {key}={extra[key]}, but the run "
                                  f"config implies {ds[key]}; set batch sizes with train.* only")
        stage = extra.get("zero_optimization", {}).get("stage", par.zero_stage)
        if stage != par.zero_stage:
            raise ConfigError(f"parallel.ds_config has ZeRO stage {stage} but parallel.zero_stage="
                              f"{par.zero_stage}; set parallel.zero_stage={stage}")
        for prec in ("bf16", "fp16"):
            enabled = extra.get(prec, {}).get("enabled")
            if enabled is not None and enabled != (tr.precision == prec):
                raise ConfigError(f"parallel.ds_config has {prec}.enabled={enabled} but "
                                  f"train.precision={tr.precision}; make them agree")
        ds = _merge(ds, extra)
    return ds
