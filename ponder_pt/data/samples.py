"""Training samples: megatron-core's GPTDataset/BlendedDataset for packing, splitting,
shuffling and blending (document/sample/shuffle indices cached on disk), then pause insertion
and label/loss-mask construction keyed by the sample's global index.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset

from .pause import make_sample

SPLITS = ("train", "valid", "test")


class PackedGPTDataset(GPTDataset):
    """megatron-core's GPTDataset, returning the raw packed L+1 tokens of each sample."""

    def __getitem__(self, idx: Optional[int]) -> dict:
        text, _ = self._query_document_sample_shuffle_indices(0 if idx is None else idx)
        return {"text": text}


@dataclass(frozen=True)
class TokenizerInfo:
    """What megatron-core's dataset code reads from a tokenizer (and hashes into cache names)."""

    eod: int
    vocab_size: int

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "ponder_pt.TokenizerInfo", "eod": self.eod, "vocab_size": self.vocab_size}


class PretrainDataset(torch.utils.data.Dataset):
    """A top-level megatron dataset with pauses, labels and masks applied per sample index."""

    def __init__(self, packed, split: str, seed: int, eod_id: int, pause_id: Optional[int] = None,
                 pause_rate: float = 0.0, eod_mask_loss: bool = False):
        if pause_rate > 0 and pause_id is None:
            raise ValueError("pause.rate > 0 needs a pause token id (pause.token_id or a "
                             "tokenizer with a free padded row)")
        self.packed, self.split, self.seed = packed, split, seed
        self.eod_id, self.pause_id, self.pause_rate = eod_id, pause_id, pause_rate
        self.eod_mask_loss = eod_mask_loss

    def __len__(self) -> int:
        return len(self.packed)

    def raw(self, idx: int) -> np.ndarray:
        return np.asarray(self.packed[idx]["text"], dtype=np.int64)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = make_sample(self.raw(idx), pause_id=self.pause_id, pause_rate=self.pause_rate,
                             seed=self.seed, index=int(idx), split=self.split, eod_id=self.eod_id,
                             eod_mask_loss=self.eod_mask_loss)
        return {k: torch.from_numpy(v) for k, v in sample.items()}


def _blend(pairs: Sequence[tuple[str, float]]):
    if not pairs:
        return None
    paths = [p for p, _ in pairs]
    weights = [w for _, w in pairs]
    return paths, (None if len(set(weights)) == 1 else weights)


def check_prefixes(pairs: Sequence[tuple[str, float]], key: str) -> None:
    import os

    missing = [p for p, _ in pairs if not (os.path.exists(p + ".bin") and os.path.exists(p + ".idx"))]
    if missing:
        raise FileNotFoundError(f"{key}: no indexed dataset at {', '.join(missing)} "
                                "(expected PREFIX.bin and PREFIX.idx; run `ponder-pt data prepare`)")


@contextlib.contextmanager
def _process_group_for_megatron():
    """megatron-core's blend cache asks torch.distributed for the rank; outside a launched job
    (inspect, tests, the demo's data stage) give it a one-process group for the duration."""
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0,
                                         world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _drop_empty_splits(config, prefixes: Sequence[str],
                       num_samples: tuple[Optional[int], Optional[int], Optional[int]],
                       split: str) -> None:
    """A split that `data.split` gives a share but that gets no documents of some prefix (a
    small corpus: 969,30,1 of 50 documents leaves test empty) makes megatron-core loop forever
    counting epochs. Drop such a split when nothing is asked of it (its bounds are kept, so the
    other splits keep exactly their documents); refuse it when samples are asked of it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    matrix = config.split_matrix
    for prefix in prefixes:
        n = len(IndexedDataset(prefix, mmap=True))
        for i, bounds in enumerate(matrix):
            if bounds is None or int(round(bounds[0] * n)) < int(round(bounds[1] * n)):
                continue
            if num_samples[i] or i == 0:
                raise ValueError(
                    f"data.split={split}: the {SPLITS[i]} split gets none of the {n} documents "
                    f"of {prefix}; give it a larger share (e.g. data.split=95,5,0), name its data "
                    f"(data.{SPLITS[i]}), or prepare more documents")
            matrix[i] = None


def build_datasets(train: Sequence[tuple[str, float]], *, seq_len: int, seed: int,
                   num_samples: tuple[Optional[int], Optional[int], Optional[int]],
                   eod_id: int, vocab_size: int, valid: Sequence[tuple[str, float]] = (),
                   test: Sequence[tuple[str, float]] = (), split: str = "969,30,1",
                   pause_id: Optional[int] = None, pause_rate: float = 0.0,
                   eod_mask_loss: bool = False, cache_dir: Optional[str] = None,
                   is_built_on_rank: Callable[[], bool] = lambda: True,
                   ) -> list[Optional[PretrainDataset]]:
    """[train, valid, test] datasets (None where a split is empty or its size is 0/None)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    check_prefixes(train, "data.train")
    check_prefixes(valid, "data.valid")
    check_prefixes(test, "data.test")
    common = dict(
        random_seed=seed, sequence_length=seq_len, tokenizer=TokenizerInfo(eod_id, vocab_size),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, path_to_cache=cache_dir, mmap_bin_files=True,
    )
    if valid or test:
        config = GPTDatasetConfig(
            blend_per_split=[_blend(train), _blend(valid), _blend(test)], **common)
    else:
        config = GPTDatasetConfig(blend=_blend(train), split=split, **common)
        _drop_empty_splits(config, [p for p, _ in train], num_samples, split)
    # megatron-core: a None size means "one full epoch", which blends (weights) do not allow
    sizes = [n if n else 0 for n in num_samples]
    with _process_group_for_megatron():
        built = BlendedMegatronDatasetBuilder(PackedGPTDataset, sizes, is_built_on_rank,
                                              config).build()
    return [
        None if ds is None else PretrainDataset(ds, name, seed, eod_id, pause_id, pause_rate,
                                                eod_mask_loss)
        for name, ds in zip(SPLITS, built)
    ]


def datasets_for_config(cfg, tokenizer, num_samples, is_built_on_rank=lambda: True):
    """build_datasets() from a `Config` and a loaded `Tokenizer` (a config not yet resolved
    gets its vocabulary fields here, `config.fill_vocab`)."""
    from ..config import fill_vocab, parse_blend

    fill_vocab(cfg, tokenizer)
    d = cfg.data
    return build_datasets(
        parse_blend(d.train, "data.train"), valid=parse_blend(d.valid, "data.valid"),
        test=parse_blend(d.test, "data.test"), split=d.split, seq_len=d.seq_len,
        seed=cfg.train.seed, num_samples=num_samples, eod_id=tokenizer.eod_id,
        vocab_size=tokenizer.vocab_size, pause_id=cfg.pause.token_id, pause_rate=cfg.pause.rate,
        eod_mask_loss=d.eod_mask_loss, cache_dir=d.cache_dir, is_built_on_rank=is_built_on_rank)
