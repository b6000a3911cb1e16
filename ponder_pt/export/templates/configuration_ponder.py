"""Configs of ponder-pt pondering models (continuous-space pondering, PonderingLM).

Written into the export directory by `ponder-pt convert to-hf`; needs only transformers.
Fields on top of the stock GPT-NeoX / LLaMA config:
    ponder_steps (K), ponder_scale_embeds, ponder_scale_initial_by_steps, ponder_top_k,
    ponder_feedback ("embedding", or "hidden" for the looped baseline),
    pause_token_id / default_pauses (pause-trained models; None / 0 otherwise).
"""

from transformers import GPTNeoXConfig, LlamaConfig

class PonderGPTNeoXConfig(GPTNeoXConfig):
    model_type = "ponder_gpt_neox"
    ponder_steps: int = 3
    ponder_scale_embeds: bool = True
    ponder_scale_initial_by_steps: bool = False
    ponder_top_k: int = 0
    ponder_feedback: str = "embedding"
    pause_token_id: int | None = None
    default_pauses: int = 0


class PonderLlamaConfig(LlamaConfig):
    model_type = "ponder_llama"
    ponder_steps: int = 3
    ponder_scale_embeds: bool = True
    ponder_scale_initial_by_steps: bool = False
    ponder_top_k: int = 0
    ponder_feedback: str = "embedding"
    pause_token_id: int | None = None
    default_pauses: int = 0
