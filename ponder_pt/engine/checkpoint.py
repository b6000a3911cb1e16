"""Checkpoints that survive crashes and preemption.

Layout under `checkpoint.dir` (`ponder_pt.weights.files`):
    step_00000100/            DeepSpeed's files (model/optimizer shards) + rng_rankNNNNN.pt
    step_00000100/ponder_meta.json   written by rank 0 only after every rank finished saving;
                                     lists each file with its size: the "complete" marker
    latest                    the newest complete tag, replaced atomically (DeepSpeed format)

A directory without ponder_meta.json (a save cut short) is never loaded, and a tag whose
listed files are missing or truncated is skipped for the previous one: both are provably broken.
A tag that cannot be checked (its ponder_meta.json unreadable, or listing no files) or that
fails to load or to convert (an I/O error, memory, a bug) stops the run with the error, since
the cause may pass and falling back would discard the steps since the previous tag;
`checkpoint.fallback_to_older=true` takes the previous tag instead.

ponder_meta.json records the layout (TP, PP, DP, ZeRO stage). Resuming at the same layout is
DeepSpeed's exact load. Resuming at another one (fewer or more GPUs, another TP or PP size)
converts the newest intact checkpoint into `step_N/universal/` (engine.reshard, built in a
temporary directory and renamed into place; the shards are only read) and carries the weights,
Adam's moments and step, the LR schedule and the data position over.
"""

from __future__ import annotations

import datetime
import os
import shutil
from typing import Callable, Optional

import torch

from ..weights.files import (META, CheckpointLoadError, file_sizes, list_tags,
                             newest_complete, read_meta, resume_source, tag_for, verify,
                             write_meta)
from . import reshard
from .failures import one_line

CONVERSION_TIMEOUT = datetime.timedelta(hours=6)
FALLBACK_HINT = ("set checkpoint.fallback_to_older=true to resume from the previous checkpoint "
                 "instead (the steps since it are trained again)")


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Save/resume a DeepSpeed engine plus our training state, atomically, keeping the last K."""

    def __init__(self, ckpt_dir: str, keep_last: int, rank: int, world_size: int,
                 barrier: Callable[[], None], log: Callable[[str], None] = print,
                 dp: int = 1, zero_stage: int = 0, extra: Optional[tuple] = None,
                 tp: int = 1, pp: int = 1, fallback_to_older: bool = False):
        """extra: (save(tag_dir), load(tag_dir)) for state DeepSpeed does not checkpoint.
        fallback_to_older: checkpoint.fallback_to_older (the module docstring)."""
        self.extra, self.fallback_to_older = extra, fallback_to_older
        self.dir, self.keep_last = ckpt_dir, keep_last
        self.rank, self.world_size = rank, world_size
        self.dp, self.zero_stage = dp, zero_stage
        self.tp, self.pp = tp, pp
        self.barrier, self.log = barrier, log
        self.elastic: Optional[tuple[str, str, str]] = None  # (src, tag, universal dir)

    @property
    def layout(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "zero_stage": self.zero_stage}

    def saved_layout(self, meta: dict, where: str = META) -> dict:
        """The layout a tag was saved at, from its ponder_meta.json (`where`, for the error).
        One without a layout (written before layouts were recorded) is an error: guessing
        that it matches would load shards into the wrong ranks."""
        layout = meta.get("layout")
        keys = ("tp", "pp", "dp", "zero_stage")
        if not isinstance(layout, dict) or any(k not in layout for k in keys):
            raise CheckpointLoadError(
                f"{where} records no complete layout (TP, PP, DP, ZeRO stage): it was written "
                f"before ponder-pt recorded them. If it was saved at this run's layout, add "
                f'"layout": {{"tp": {self.tp}, "pp": {self.pp}, "dp": {self.dp}, '
                f'"zero_stage": {self.zero_stage}}} to it (otherwise the values it was saved '
                f"at) and run again")
        return {k: int(layout[k]) for k in keys}

    def _needs_conversion(self, saved: dict) -> bool:
        """Whether resuming needs the layout-free conversion (engine.reshard). Only a ZeRO-0
        run changing nothing but DP loads DeepSpeed's files directly: its optimizer state is
        whole in every rank's file."""
        if saved == self.layout:
            return False
        return not (saved["zero_stage"] == self.zero_stage == 0 and saved["tp"] == self.tp
                    and saved["pp"] == self.pp)

    def save(self, engine, step: int, state: dict) -> str:
        tag = tag_for(step)
        root = os.path.join(self.dir, tag)
        if self.rank == 0:
            os.makedirs(self.dir, exist_ok=True)
            if os.path.isdir(root):  # a leftover from a save that was cut short
                shutil.rmtree(root)
        self.barrier()
        engine.save_checkpoint(self.dir, tag=tag, client_state={"ponder_state": state},
                               save_latest=False)
        torch.save(rng_state(), os.path.join(root, f"rng_rank{self.rank:05d}.pt"))
        if self.extra is not None:
            self.extra[0](root)
        self.barrier()  # every rank's files are on disk
        if self.rank == 0:
            write_meta(self.dir, tag, {"tag": tag, "step": step, "world_size": self.world_size,
                                       "dp": self.dp, "zero_stage": self.zero_stage,
                                       "layout": self.layout, "state": state,
                                       "files": file_sizes(root)})
            self._prune()
        self.barrier()
        return tag

    def _prune(self) -> None:
        reasons = {t: verify(self.dir, t) for t in list_tags(self.dir)}
        complete = [t for t, reason in reasons.items() if reason is None]
        for tag in complete[self.keep_last:]:
            shutil.rmtree(os.path.join(self.dir, tag), ignore_errors=True)
        newest = complete[0] if complete else None
        for tag, reason in reasons.items():  # unfinished saves older than the newest good one
            # (not a tag that could not be checked: it may be intact once the error passes)
            if newest and tag < newest and reason is not None and reason.kind == "incomplete":
                shutil.rmtree(os.path.join(self.dir, tag), ignore_errors=True)
        if newest:  # another run's checkpoint converted for resuming: no longer needed
            shutil.rmtree(os.path.join(self.dir, reshard.CONVERTED), ignore_errors=True)

    def resume_source(self, load_dir: Optional[str], quiet: bool = False) -> str:
        """Where to resume from (`weights.files.resume_source`); says so when this run's own
        checkpoint wins over `checkpoint.load`."""
        src = resume_source(self.dir, load_dir)
        if (not quiet and self.rank == 0 and load_dir and src == self.dir
                and os.path.realpath(load_dir) != os.path.realpath(self.dir)):
            self.log(f"checkpoint.dir holds {newest_complete(self.dir)}: resuming from it, not "
                     f"from checkpoint.load ({load_dir})")
        return src

    def prepare_resume(self, load_dir: Optional[str], model_cfg, unsafe_unpickle: bool = False
                       ) -> Optional[str]:
        """Before the engine is built: if the newest usable checkpoint was saved at another
        layout, convert it (rank 0; engine.reshard) and return its universal directory, which
        the trainer loads the weights from before `deepspeed.initialize` and `resume` the
        optimizer from after. None when resume takes DeepSpeed's exact path (or there is
        nothing to resume). A tag that cannot be converted stops every rank with the reason,
        or with checkpoint.fallback_to_older is skipped for the previous one."""
        src = self.resume_source(load_dir)
        choice, error = None, None
        if self.rank == 0:
            try:
                choice = self._choose_conversion(src, model_cfg, unsafe_unpickle)
            except CheckpointLoadError as exc:
                error = str(exc)
        if torch.distributed.is_initialized():
            # the other ranks wait for rank 0's conversion, which for a large model can take
            # longer than dist.timeout allows any one collective: a group of its own
            group = torch.distributed.new_group(backend="gloo", timeout=CONVERSION_TIMEOUT)
            box = [(choice, error)]
            torch.distributed.broadcast_object_list(box, src=0, group=group)
            torch.distributed.destroy_process_group(group)
            choice, error = box[0]
        if error is not None:
            raise CheckpointLoadError(error)
        self.elastic = choice
        return choice[2] if choice else None

    def _choose_conversion(self, src: str, model_cfg, unsafe_unpickle: bool
                           ) -> Optional[tuple[str, str, str]]:
        """(src, tag, universal dir) of the newest intact tag, converted, when it was saved at
        another layout; None when it needs no conversion or there is none."""
        for tag in list_tags(src):
            problem = verify(src, tag)
            if problem is not None and problem.kind == "unchecked":
                reason = f"checkpoint {os.path.join(src, tag)}: {problem}"
                if not self.fallback_to_older:
                    raise CheckpointLoadError(f"{reason}; {FALLBACK_HINT}")
                self.log(f"{reason}; checkpoint.fallback_to_older: trying the previous one")
                continue
            if problem is not None:
                continue  # provably broken: resume() reports it
            where = os.path.join(src, tag, META)
            saved = self.saved_layout(read_meta(src, tag), where)
            if not self._needs_conversion(saved):
                return None
            try:
                udir = reshard.convert(src, tag, saved, model_cfg, unsafe_unpickle,
                                       self.log, reshard.universal_dir(src, tag, self.dir))
            except Exception as exc:
                reason = (f"checkpoint {os.path.join(src, tag)}: cannot convert it from "
                          f"{reshard.describe(saved)} to {reshard.describe(self.layout)} "
                          f"({type(exc).__name__}: {exc})")
                if not self.fallback_to_older:
                    raise CheckpointLoadError(f"{reason}; {FALLBACK_HINT}") from exc
                self.log(f"{reason}; checkpoint.fallback_to_older: trying the previous one")
                continue
            self.log(f"checkpoint {tag}: saved at {reshard.describe(saved)}, resuming "
                     f"at {reshard.describe(self.layout)} (weights, optimizer moments, "
                     "LR schedule and data position carried over)")
            return src, tag, udir
        return None

    def _load(self, engine, src: str, tag: str, meta: dict):
        saved = self.saved_layout(meta, os.path.join(src, tag, META))
        if self._needs_conversion(saved):
            raise RuntimeError(f"saved at {reshard.describe(saved)}, now "
                               f"{reshard.describe(self.layout)}; only "
                               "the newest usable checkpoint is converted to a new layout")
        return engine.load_checkpoint(src, tag=tag)

    def _load_elastic(self, engine) -> dict:
        src, tag, udir = self.elastic
        reshard.load_optimizer(engine, udir)
        meta = read_meta(src, tag)
        self.log(f"resumed from {os.path.join(src, tag)} (converted from "
                 f"{reshard.describe(self.saved_layout(meta, os.path.join(src, tag, META)))})")
        return meta["state"]

    def resume(self, engine, load_dir: Optional[str] = None, all_ok: Callable[[bool], bool] = None
               ) -> Optional[dict]:
        """Load the newest intact checkpoint into `engine`; returns its saved state, or None
        when there is no checkpoint at all.

        `all_ok(flag)` must return True only if every rank's flag is True (an all-reduce), so
        the ranks agree when one of them cannot load a tag: all stop with the error, or with
        checkpoint.fallback_to_older all take the previous tag. If there are checkpoints but
        none loads, that is an error, never a silent fresh start.
        """
        src = self.resume_source(load_dir, quiet=True)
        if self.elastic is not None:
            return self._load_elastic(engine)
        failures = []
        for tag in list_tags(src):
            reason = verify(src, tag)
            if reason is not None and reason.kind != "unchecked":  # provably broken
                self.log(f"checkpoint {tag}: skipped, {reason}")
                if reason.kind != "incomplete":
                    failures.append(f"{tag}: {reason}")
                continue
            # every rank must have checked the tag before any loads it (the load's collectives)
            checked = reason is None
            if all_ok is not None:
                checked = all_ok(checked)
            if not checked:
                why = reason or "another rank could not check it (its log says why)"
                if reason is not None and self.world_size > 1:
                    print(f"rank {self.rank}: checkpoint {os.path.join(src, tag)}: {reason}",
                          flush=True)
                if not self.fallback_to_older:
                    raise CheckpointLoadError(f"checkpoint {os.path.join(src, tag)}: {why}; "
                                              f"{FALLBACK_HINT}")
                self.log(f"checkpoint {tag}: cannot be checked; checkpoint.fallback_to_older: "
                         "trying the previous one")
                failures.append(f"{tag}: {why}")
                continue
            meta = read_meta(src, tag)
            other_model = False  # the weights do not fit this model (not a damaged file)
            try:
                path, client = self._load(engine, src, tag, meta)
                ok = path is not None
                reason = "DeepSpeed found nothing to load"
            except CheckpointLoadError:
                raise  # no layout recorded: the same on every rank, and no older tag helps
            except Exception as exc:
                ok, reason = False, f"{type(exc).__name__}: {exc}"
                other_model = "loading state_dict" in str(exc)
                print(f"rank {self.rank}: checkpoint {os.path.join(src, tag)} failed to load "
                      f"({one_line(reason, 1000)})", flush=True)
            mine = ok
            if all_ok is not None:
                ok = all_ok(ok)
                other_model = not all_ok(not other_model)
            if other_model:  # every tag of a run holds the same model: no fallback helps
                raise CheckpointLoadError(
                    f"checkpoint {os.path.join(src, tag)} holds another model than this run's "
                    f"({one_line(reason, 300) if not mine else 'see the rank that says so'}); "
                    "resume with the model settings it was trained with (its run_config.yaml)")
            if not ok:
                if not self.fallback_to_older:
                    who = (reason if not mine
                           else "another rank failed to load it (its log says why)")
                    raise CheckpointLoadError(f"checkpoint {os.path.join(src, tag)} is complete "
                                              f"but did not load: {who}; {FALLBACK_HINT}")
                self.log(f"checkpoint {tag}: failed to load; checkpoint.fallback_to_older: "
                         "trying the previous one")
                failures.append(f"{tag}: {reason}")
                continue
            if self.extra is not None:
                self.extra[1](os.path.join(src, tag))
            rng_path = os.path.join(src, tag, f"rng_rank{self.rank:05d}.pt")
            if meta.get("world_size") == self.world_size and os.path.exists(rng_path):
                set_rng_state(torch.load(rng_path, weights_only=False))
            self.log(f"resumed from {os.path.join(src, tag)}")
            return client.get("ponder_state", meta["state"]) if client else meta["state"]
        if failures:
            raise RuntimeError(f"{src} holds checkpoints but none could be loaded:\n  "
                               + "\n  ".join(failures)
                               + "\nfix or remove them (or set checkpoint.dir elsewhere)")
        return None
