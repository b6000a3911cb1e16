"""The training loop: DeepSpeed engine over our model, megatron-core process groups, step-indexed
data, validation, checkpoints, preemption, metrics. Knows nothing of file formats or launchers.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..config import Config, config_to_dict, write_run_config
from ..weights.files import tag_for
from . import distributed as D
from .batches import StepBatchSampler, loader
from .checkpoint import CheckpointLoadError, CheckpointManager
from .ds_config import build_ds_config
from .ds_ops import build_adam_op
from .flops import peak_tflops, run_flops_per_token
from .metrics import MetricsLogger
from .preemption import (EXIT_INTERRUPTED, EXIT_REQUEUE, PreemptionFlag, announce_requeue,
                         marker_path, signal_name, write_marker)
from .schedule import lr_at, make_scheduler

EXIT_DIVERGED = 3


def freeze_all_but_halting(model: torch.nn.Module) -> int:
    """`ponder.halting.head_only`: only the halting head trains. Returns the frozen count."""
    frozen = 0
    for name, p in model.named_parameters():  # PonderLM's halting.*, a stage's *.halting.*
        if "halting" not in name.split("."):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors), as in gpt-neox/Megatron."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    def __init__(self, cfg: Config, tokenizer, world: D.World, log=print):
        from ..data.samples import datasets_for_config

        self.cfg, self.tok, self.world = cfg, tokenizer, world
        self.halting_rows: list = []  # adaptive pondering's stats, kept per micro-batch
        self.draft_rows: list = []  # the draft loss's CE, kept per micro-batch
        self.log = log if world.is_main else (lambda *a, **k: None)
        tr = cfg.train
        self.ga = tr.global_batch // (tr.micro_batch * world.dp)
        torch.manual_seed(tr.seed)
        self.ckpt, self.universal = None, None
        if cfg.checkpoint.dir:
            self.ckpt = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_last,
                                          world.rank, world.world_size, D.barrier, self.log,
                                          dp=world.dp, zero_stage=cfg.parallel.zero_stage,
                                          extra=self._checkpoint_extra(), tp=world.tp,
                                          pp=world.pp,
                                          fallback_to_older=cfg.checkpoint.fallback_to_older)
            # a checkpoint saved at another layout: converted now, its weights go into the
            # model before DeepSpeed partitions it, its optimizer state in train()
            self.universal = self.ckpt.prepare_resume(cfg.checkpoint.load, cfg.model,
                                                      cfg.checkpoint.unsafe_unpickle)
        self.stop_signal: Optional[int] = None  # the signal that stopped training early
        self.last_saved: Optional[str] = None  # the tag of the last checkpoint written
        self.last_step = 0

        self.engine = self._build_engine(build_ds_config(cfg, world.dp, cfg.parallel.ds_config))
        self.device = self.engine.device
        self.on_cuda = torch.device(self.device).type == "cuda"

        valid_samples = tr.eval_iters * tr.global_batch if tr.eval_iters else 0
        self.train_ds, self.valid_ds, _ = datasets_for_config(
            cfg, tokenizer, (tr.iters * tr.global_batch, valid_samples, 0))
        if self.valid_ds is None and tr.eval_iters:
            self.log("note: no validation split (data.split / data.valid); validation is off")
        self.flops_per_token = run_flops_per_token(cfg)
        peak = cfg.log.peak_tflops
        if peak is None and torch.cuda.is_available():
            peak = peak_tflops(torch.cuda.get_device_name())
        self.peak_tflops = peak

    # ------------------------------------------------------------------ pieces
    def _build_engine(self, ds_cfg: dict):
        import deepspeed

        from ..models import build_model

        model = build_model(self.cfg)
        self._initial_weights(model)
        self._head_only(model)
        if self.cfg.train.compile:
            model.compile_blocks()  # before DeepSpeed wraps it; compiles on the first step
        build_adam_op(self.cfg)
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, self.cfg.train.weight_decay),
            config=ds_cfg, mpu=D.MegatronMPU(),
            lr_scheduler=lambda opt: make_scheduler(opt, self.cfg.train))
        return engine

    def _initial_weights(self, model: torch.nn.Module) -> None:
        """checkpoint.init_from, then (winning over it) a checkpoint converted from another
        layout. `model` is this rank's piece: a PonderLM, or a PipelineModule stage."""
        from .reshard import FullNameView, load_weights, unused_params

        if self.cfg.checkpoint.init_from and not self.universal:
            from ..models.hf import load_initial_weights

            target = model if hasattr(model, "cfg") else FullNameView(model, self.cfg.model)
            load_initial_weights(target, self.cfg.checkpoint.init_from,
                                 unsafe_unpickle=self.cfg.checkpoint.unsafe_unpickle)
            self.log(f"initial weights from {self.cfg.checkpoint.init_from}")
        if self.universal:
            loaded = D.gather_union(load_weights(model, self.universal))
            unused = unused_params(self.universal, loaded)
            if unused:
                shown = ", ".join(unused[:6]) + (f" and {len(unused) - 6} more"
                                                 if len(unused) > 6 else "")
                raise CheckpointLoadError(
                    f"the checkpoint converted in {self.universal} holds parameters this model "
                    f"lacks ({shown}): it was trained with another model; resume with that "
                    "model's settings (its run_config.yaml)")

    def _head_only(self, model: torch.nn.Module) -> None:
        """`ponder.halting.head_only`: freeze everything but the halting head."""
        if self.cfg.ponder.halting.head_only:
            frozen = freeze_all_but_halting(model)
            self.log(f"ponder.halting.head_only: training the halting head only "
                     f"({frozen:,} backbone parameters frozen on this rank)")

    def _checkpoint_extra(self):
        """(save, load) of state DeepSpeed's checkpoint misses; None for the plain engine."""
        return None

    def _train_step(self, batches) -> float:
        """One optimizer step over this rank's micro-batches; the global mean loss."""
        losses, self.halting_rows = [], []
        for _ in range(self.ga):
            loss = self._forward(self._to_device(next(batches)))
            self._keep_halting_stats()
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed applies the update at the accumulation boundary
            losses.append(loss.detach())
        return self._dp_mean(torch.stack(losses).mean())

    def _keep_halting_stats(self) -> None:
        """Adaptive pondering: the last forward's expected passes and exit histogram; the
        draft loss (`ponder.draft_loss`): the last training forward's draft CE."""
        module = self.engine.module
        stats = getattr(module, "halting_stats", None)
        if stats is not None:
            self.halting_rows.append(torch.cat([stats["expected_passes"].view(1),
                                                stats["exit_hist"]]))
            module.halting_stats = None
        draft = getattr(module, "draft_stats", None)
        if draft is not None:
            self.draft_rows.append(draft.float())
            module.draft_stats = None

    def _draft_record(self) -> dict:
        """draft_ce: the mean over micro-batches and data-parallel ranks of pass d-1's CE,
        the draft of speculative decoding (`ponder.draft_loss`)."""
        if not self.draft_rows:
            return {}
        value = torch.stack(self.draft_rows).mean()
        self.draft_rows = []
        return {"draft_ce": self._dp_mean(value)}

    def _halting_record(self) -> dict:
        """Mean over micro-batches and data-parallel ranks of the kept halting stats:
        halt_expected_passes (sum_k (k+1) p_k), halt_passes (passes by Q-exit at
        ponder.halting.q, what decoding pays) and halt_exit_frac_k (tokens exiting at pass k)."""
        if not self.halting_rows:
            return {}
        row = torch.stack(self.halting_rows).mean(0)
        if self.world.dp > 1:
            from megatron.core import parallel_state as ps

            dist.all_reduce(row, group=ps.get_data_parallel_group())
            row = row / self.world.dp
        self.halting_rows = []
        hist = row[1:].tolist()
        out = {"halt_expected_passes": float(row[0]),
               "halt_passes": sum((k + 1) * f for k, f in enumerate(hist))}
        out.update({f"halt_exit_frac_{k}": f for k, f in enumerate(hist)})
        return out

    def _eval_sums(self, batches) -> torch.Tensor:
        """[sum of loss x tokens, tokens] over this rank's validation micro-batches."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in batches:
            batch = self._to_device(batch)
            tokens = batch["loss_mask"].sum()
            sums += torch.stack([self._forward(batch).double() * tokens, tokens.double()])
            self._keep_halting_stats()
        return sums

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _forward(self, batch: dict) -> torch.Tensor:
        return self.engine(batch["tokens"], batch["position_ids"], batch["labels"],
                           batch["loss_mask"])

    def _dp_mean(self, value: torch.Tensor) -> float:
        return float(D.dp_mean(value, self.world).item())

    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        """Token-weighted loss over the fixed validation set (pause targets excluded)."""
        from megatron.core import parallel_state as ps

        tr = self.cfg.train
        if self.valid_ds is None or not tr.eval_iters:
            return None
        self.engine.eval()
        sampler = StepBatchSampler(0, tr.eval_iters, tr.global_batch, tr.micro_batch,
                                   self.world.dp_rank, self.world.dp)
        self.halting_rows = []
        sums = self._eval_sums(iter(loader(self.valid_ds, sampler, 0)))
        if self.world.dp > 1:
            dist.all_reduce(sums, group=ps.get_data_parallel_group())
        self.engine.train()
        loss = float(sums[0] / sums[1].clamp(min=1))
        # adaptive pondering: the loss is each token's exit-pass CE at ponder.halting.q
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(sums[1]),
                **self._halting_record()}

    def _save(self, step: int, extra: dict) -> None:
        if self.ckpt is not None and self.last_saved != tag_for(step):
            t = time.perf_counter()
            self.last_saved = self.ckpt.save(self.engine, step, {"step": step, **extra})
            self.log(f"saved checkpoint {self.last_saved} ({time.perf_counter() - t:.1f}s)")

    def _record_run_config(self) -> None:
        """run_config.yaml once the resume (if any) loaded: a resume refused or failed leaves
        the record of what was trained as it was."""
        if self.world.is_main:
            for where in {self.cfg.checkpoint.dir, self.cfg.run.dir} - {None}:
                write_run_config(self.cfg, where)

    def _stop(self, done: int, extra: dict, preempt: PreemptionFlag) -> int:
        """A stop signal reached some rank: every rank saves step `done`; the exit code."""
        cfg = self.cfg
        # the signal may have reached another rank only: theirs decides for everyone
        interrupted = D.any_true(preempt.received == signal.SIGINT)
        self.stop_signal = signal.SIGINT if interrupted else (preempt.received or signal.SIGTERM)
        what = signal_name(self.stop_signal)
        if self.ckpt is None:
            self.log(f"{what}: stopping at step {done}; checkpoint.save=false, nothing saved")
            return EXIT_INTERRUPTED if interrupted else EXIT_REQUEUE
        self.log(f"signal received: saving at step {done}, then exiting ({what})")
        self._save(done, extra)
        if self.world.is_main:
            write_marker(cfg.checkpoint.dir, done, self.stop_signal)
            announce_requeue(done)  # for the sbatch script, every rank saved
        return EXIT_INTERRUPTED if interrupted else EXIT_REQUEUE

    # ------------------------------------------------------------------ loop
    def train(self) -> int:
        cfg, tr, world = self.cfg, self.cfg.train, self.world
        start_step, state = 0, {}
        if self.ckpt is not None:
            state = self.ckpt.resume(self.engine, cfg.checkpoint.load, D.all_true) or {}
            start_step = int(state.get("step", 0))
            if world.is_main and os.path.exists(marker_path(self.ckpt.dir)):
                os.remove(marker_path(self.ckpt.dir))  # this run is the requeued one
        self._record_run_config()
        self.last_step = start_step
        preempt = PreemptionFlag()
        if D.any_true(preempt.received == signal.SIGINT):  # Ctrl-C during start-up
            self.stop_signal = signal.SIGINT
            self.log(f"stopped before step {start_step + 1}: nothing new to save")
            preempt.restore()
            return EXIT_INTERRUPTED
        metrics = MetricsLogger(cfg.log, enabled=world.is_main, run_config=config_to_dict(cfg),
                                resume=start_step)  # drops rows past it
        tokens_per_step = tr.global_batch * cfg.data.seq_len
        bad_in_a_row, skipped = int(state.get("bad_in_a_row", 0)), int(state.get("skipped", 0))
        sampler = StepBatchSampler(start_step, tr.iters, tr.global_batch, tr.micro_batch,
                                   world.dp_rank, world.dp)
        batches = iter(loader(self.train_ds, sampler, cfg.data.num_workers))
        self.log(f"training steps {start_step}..{tr.iters}: world {world.world_size} = "
                 f"tp {world.tp} x pp {world.pp} x dp {world.dp}, grad accumulation {self.ga}, "
                 f"{tokens_per_step:,} tokens/step")
        t_start, exit_code = time.perf_counter(), 0
        try:
            for step in range(start_step, tr.iters):
                t0 = time.perf_counter()
                lr = lr_at(step, tr)
                begin = getattr(self.engine.module, "begin_step", None)
                # latent thoughts draw the step's Jacobi iterations (None without them)
                thought_iters = None if begin is None else begin(step)
                loss = self._train_step(batches)
                gnorm = self.engine.get_global_grad_norm()  # None where DeepSpeed has none
                gnorm = None if gnorm is None else float(gnorm)
                finite = math.isfinite(loss) and (gnorm is None or math.isfinite(gnorm))
                if not finite:
                    bad_in_a_row += 1
                    skipped += 1
                else:
                    bad_in_a_row = 0
                dt = time.perf_counter() - t0
                done = self.last_step = step + 1
                tok_s = tokens_per_step / dt
                tflops = self.flops_per_token * tok_s / world.world_size / 1e12
                record = {"loss": loss, "lr": lr, "grad_norm": gnorm, "tokens": done * tokens_per_step,
                          "step_time": dt, "tokens_per_s": tok_s, "tflops_per_gpu": tflops,
                          "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
                          "skipped_steps": skipped, **self._halting_record(),
                          **self._draft_record()}
                if thought_iters is not None:
                    record["thought_iters"] = thought_iters
                if self.on_cuda:  # this rank's allocator peak so far (the dry run estimates it)
                    record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                metrics.log(done, record)
                if done % cfg.log.interval == 0 or done == tr.iters:
                    elapsed = time.perf_counter() - t_start
                    eta = elapsed / (done - start_step) * (tr.iters - done)
                    halting = (f" | passes {record['halt_passes']:.2f}"
                               if "halt_passes" in record else "")
                    self.log(f"step {done:>6}/{tr.iters} | loss {loss:7.4f}{halting} | lr {lr:.2e} | "
                             f"gnorm {'n/a' if gnorm is None else f'{gnorm:6.3f}'} | {tok_s:,.0f} tok/s"
                             + (f" | {tflops:.3g} TFLOP/s/gpu" if self.on_cuda else "")
                             + (f" | MFU {record['mfu']:.1%}" if record["mfu"] else "")
                             + (f" | mem {record['peak_mem_gib']:.1f} GiB"
                                if "peak_mem_gib" in record else "")
                             + f" | eta {eta / 60:.1f} min", flush=True)
                if bad_in_a_row >= tr.max_bad_steps:
                    self.log(f"error: {bad_in_a_row} steps in a row with non-finite loss or "
                             f"gradients (step {done}); stopping. Lower train.lr, raise "
                             "train.warmup, or use bf16 instead of fp16, and resume from the "
                             "last checkpoint.", file=sys.stderr)
                    exit_code = EXIT_DIVERGED
                    break
                if done % tr.eval_interval == 0 or done == tr.iters:
                    ev = self.evaluate()
                    if ev is not None:
                        metrics.log(done, ev, prefix="valid_")
                        self.log(f"validation at step {done}: loss {ev['loss']:.4f} | "
                                 f"ppl {ev['ppl']:.2f}")
                extra = {"bad_in_a_row": bad_in_a_row, "skipped": skipped,
                         "consumed_samples": done * tr.global_batch}
                if D.any_true(preempt.set):
                    exit_code = self._stop(done, extra, preempt)
                    break
                if done % cfg.checkpoint.interval == 0 or done == tr.iters:
                    self._save(done, extra)
        finally:
            del batches  # its workers stop now, not at exit (they ignore SIGTERM)
            preempt.restore()
            metrics.close()
        if world.is_main and exit_code == 0:
            from .plot import plot_runs

            png = plot_runs([cfg.log.dir], os.path.join(cfg.log.dir, "loss.png"))
            self.log(f"loss curve: {png}")
        return exit_code
