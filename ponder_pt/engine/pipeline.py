"""Pipeline-parallel training: the same loop, with `deepspeed.pipe.PipelineModule` over the
unrolled layer chain of `ponder_pt.models.pipeline` (see there for how the K+1 pondering passes
map onto stages). ZeRO-1 only: DeepSpeed's pipeline engine takes ZeRO 0/1, and config validation
refuses ZeRO-0 with PP."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from . import distributed as D
from .ds_ops import build_adam_op
from .schedule import make_scheduler
from .trainer import Trainer, param_groups


def _pipe_batch(batch: dict, halting: bool = False):
    """(first stage's inputs, last stage's labels); adaptive pondering's per-pass losses need
    the labels from the first stage on (`models.pipeline`)."""
    labels = (batch["labels"], batch["loss_mask"])
    return ((batch["tokens"], *labels) if halting else batch["tokens"]), labels


class PipelineTrainer(Trainer):
    @property
    def _halting(self) -> bool:
        return self.cfg.ponder.adaptive

    def _build_engine(self, ds_cfg: dict):
        import deepspeed
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        from ..models.pipeline import pipeline_layers, pipeline_loss

        cfg, w = self.cfg, self.world
        # same rank order as megatron-core's parallel_state: tp fastest, then dp, then pp
        topo = PipeModelDataParallelTopology(num_pp=w.pp, num_mp=w.tp, num_dp=w.dp)
        module = PipelineModule(
            layers=pipeline_layers(cfg.model, cfg.ponder, cfg.train.seed), loss_fn=pipeline_loss,
            topology=topo, partition_method="type:BlockLayer", activation_checkpoint_interval=0)
        self._initial_weights(module)
        self._head_only(module)
        if self._halting:
            self.log("note: adaptive pondering under PP: validation reports the training "
                     "objective (scoring at the exit passes needs the frozen keys/values of "
                     "parallel.pp=1: `ponder-pt eval`, `generate`), and no halt_* metrics")
        build_adam_op(cfg)
        engine, _, _, _ = deepspeed.initialize(
            model=module, model_parameters=param_groups(module, cfg.train.weight_decay),
            config=ds_cfg, lr_scheduler=lambda opt: make_scheduler(opt, cfg.train))
        return engine

    def _checkpoint_extra(self):
        """DeepSpeed's per-layer pipeline files skip tied layers called through a forward_fn
        (our shared embedding/head), and a resumed run would silently restart them from their
        initial values: save every tied module of this stage ourselves (one file per stage
        and TP rank, written by DP rank 0) and load it back after DeepSpeed's own load."""
        w = self.world

        def path(root: str) -> str:
            return os.path.join(root, f"tied_pp{w.pp_rank:02d}_tp{w.tp_rank:02d}.pt")

        def save(root: str) -> None:
            if w.dp_rank == 0:
                torch.save({key: module.state_dict()
                            for key, module in self.engine.module.tied_modules.items()}, path(root))

        def load(root: str) -> None:
            state = torch.load(path(root), map_location=self.device, weights_only=True)
            for key, module in self.engine.module.tied_modules.items():
                module.load_state_dict(state[key])

        return save, load

    def _train_step(self, batches) -> float:
        # every stage draws the step's micro-batches so all data iterators stay in step
        micro = [_pipe_batch(next(batches), self._halting) for _ in range(self.ga)]
        loss = self.engine.train_batch(data_iter=iter(micro))
        return float(loss.item())  # already averaged over micro-batches and DP, on all stages

    def _eval_sums(self, batches) -> torch.Tensor:
        micro = [_pipe_batch(b, self._halting) for b in batches]
        counts = [float(b[1][1].sum()) for b in micro]
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for start in range(0, len(micro), self.ga):
            chunk = micro[start:start + self.ga]
            losses = self.engine.eval_batch(iter(chunk), reduce_output=None, bcast_loss=False,
                                            num_micro_batches=len(chunk))
            if self.engine.is_last_stage():
                for loss, n in zip(losses, counts[start:start + len(chunk)]):
                    sums += torch.tensor([float(loss) * n, n], dtype=torch.float64,
                                         device=self.device)
        # only last-stage ranks hold sums (TP replicas identical): share them with every stage
        from megatron.core import parallel_state as ps

        if self.world.pp > 1:
            dist.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
        return sums
