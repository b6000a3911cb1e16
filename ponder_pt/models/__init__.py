"""Models: GPT-NeoX / LLaMA / GPT-2 on megatron-core TP layers, pondering, weights in and out
of a built model (HF's names for ours: `ponder_pt.weights.hf_weights`)."""

from .hf import (full_state_dict, hf_config_from, load_full_state_dict, load_hf_state_dict,
                 load_initial_weights, to_hf_state_dict)
from .layers import KVCache, StaticKVCache
from .model import PonderLM
from .parallel import (allreduce_sequence_parallel_grads, gather_full, gather_vocab,
                       init_single_process, soft_embedding, tp_rank, tp_size,
                       vocab_parallel_softmax)


def build_model(cfg, **kwargs) -> PonderLM:
    """PonderLM from a full run `Config` (model + ponder + thoughts + pause +
    parallel.sequence_parallel + seed)."""
    kwargs.setdefault("sequence_parallel", cfg.parallel.sequence_parallel)
    kwargs.setdefault("seed", cfg.train.seed)
    kwargs.setdefault("thoughts", cfg.thoughts)
    kwargs.setdefault("pause", cfg.pause)
    return PonderLM(cfg.model, cfg.ponder, **kwargs)


__all__ = [
    "KVCache", "PonderLM", "StaticKVCache", "allreduce_sequence_parallel_grads", "build_model",
    "full_state_dict", "gather_full", "gather_vocab", "hf_config_from", "init_single_process",
    "load_full_state_dict", "load_hf_state_dict", "load_initial_weights", "soft_embedding",
    "to_hf_state_dict", "tp_rank", "tp_size", "vocab_parallel_softmax",
]
