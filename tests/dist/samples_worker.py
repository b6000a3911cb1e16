"""Run under torchrun: build the datasets in a real process group and dump this rank's
data-parallel share of global sample indices, to compare with a single-process build."""

import json
import os
import sys

import torch.distributed as dist

from ponder_pt.data.samples import build_datasets


def main(prefix: str, cache_dir: str, out_dir: str, n: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    train, _, _ = build_datasets([(prefix, 1.0)], seq_len=32, seed=7, num_samples=(n, 0, 0),
                                 eod_id=0, vocab_size=600, split="1,0,0", pause_id=600,
                                 pause_rate=0.1, cache_dir=cache_dir)
    mine = {idx: {k: v.tolist() for k, v in train[idx].items()} for idx in range(rank, n, world)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(mine, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
