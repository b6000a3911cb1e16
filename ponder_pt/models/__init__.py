"""Models: GPT-NeoX / LLaMA / GPT-2 on megatron-core TP layers, pondering, HF weights in and
out."""

from .hf import (full_state_dict, full_to_hf, hf_config_from, hf_to_full, load_hf_state_dict,
                 model_config_from_hf, to_hf_state_dict)
from .layers import KVCache, StaticKVCache
from .model import PonderLM
from .parallel import (allreduce_sequence_parallel_grads, gather_full, gather_vocab,
                       init_single_process, soft_embedding, tp_rank, tp_size,
                       vocab_parallel_softmax)


def build_model(cfg, **kwargs) -> PonderLM:
    """PonderLM from a full run `Config` (model + ponder + parallel.sequence_parallel + seed)."""
    kwargs.setdefault("sequence_parallel", cfg.parallel.sequence_parallel)
    kwargs.setdefault("seed", cfg.train.seed)
    return PonderLM(cfg.model, cfg.ponder, **kwargs)


__all__ = [
    "KVCache", "PonderLM", "StaticKVCache", "allreduce_sequence_parallel_grads", "build_model",
    "full_state_dict", "full_to_hf", "gather_full", "gather_vocab", "hf_config_from", "hf_to_full",
    "init_single_process", "load_hf_state_dict", "model_config_from_hf", "soft_embedding",
    "to_hf_state_dict", "tp_rank", "tp_size", "vocab_parallel_softmax",
]
