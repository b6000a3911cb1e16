"""Which global sample indices each rank reads at each step.

Step s consumes global indices [s*G, (s+1)*G). DP rank r takes the contiguous slice
[s*G + r*G/dp, s*G + (r+1)*G/dp) and cuts it into micro-batches of `micro_batch`. The
micro-batches of a step are therefore the same sets of samples for every DP size, which is
what makes a 2-process run match a 1-process run, and the data position after a resume is just
the step number (a global quantity, so the DP size may change between runs).
"""

from __future__ import annotations

import atexit
import multiprocessing
from typing import Iterator

import torch

from .preemption import ignore_stop_signals


def step_micro_batches(step: int, global_batch: int, micro_batch: int, dp_rank: int,
                       dp: int) -> list[list[int]]:
    per_rank = global_batch // dp
    start = step * global_batch + dp_rank * per_rank
    return [list(range(start + j * micro_batch, start + (j + 1) * micro_batch))
            for j in range(per_rank // micro_batch)]


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches for steps [start_step, end_step), in order."""

    def __init__(self, start_step: int, end_step: int, global_batch: int, micro_batch: int,
                 dp_rank: int, dp: int):
        self.start_step, self.end_step = start_step, end_step
        self.args = (global_batch, micro_batch, dp_rank, dp)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.end_step):
            yield from step_micro_batches(step, *self.args)

    def __len__(self) -> int:
        global_batch, micro_batch, _, dp = self.args
        return (self.end_step - self.start_step) * (global_batch // dp // micro_batch)


def _kill_workers_left() -> None:
    """At exit, multiprocessing stops its daemonic children with SIGTERM and then joins them:
    workers that ignore SIGTERM (and are still running because their iterator was not freed,
    e.g. held by a traceback) would make the rank wait forever. Registered after
    multiprocessing's own exit handler, this runs first and kills them."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


_KILL_AT_EXIT: list = []


def loader(dataset, sampler: StepBatchSampler, num_workers: int) -> torch.utils.data.DataLoader:
    """Workers ignore stop signals: Ctrl-C or a SIGTERM to the process group reaches them too,
    and the rank, which decides when to stop, still needs their batches to finish the step.
    Any still running when the rank exits are killed (`_kill_workers_left`)."""
    if num_workers and not _KILL_AT_EXIT:
        atexit.register(_kill_workers_left)
        _KILL_AT_EXIT.append(True)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=False,
                                       worker_init_fn=ignore_stop_signals if num_workers else None)
