"""Parameter counts and training FLOPs per token, from the config alone (no model needed),
so `--dry-run` can report them for a 12B model on a laptop.

FLOPs follow the Megatron convention (matmuls only, 2 flops per multiply-add, backward = 2 x
forward, full attention score matrix, no recomputation): MFU, not HFU.
"""

from __future__ import annotations

from typing import Sequence

from ..config.schema import ModelConfig

# dense bf16/fp16 peak TFLOPs per device, for MFU when log.peak_tflops is not set
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
               "A10": 125.0, "L40": 181.0, "V100": 125.0, "GH200": 989.0, "B200": 2250.0}


def _block_weights(m: ModelConfig) -> int:
    h, f, kv = m.hidden_size, m.ffn_size, m.kv_heads * m.head_dim
    attn = h * (h + 2 * kv) + h * h
    mlp = (3 if m.arch == "llama" else 2) * h * f
    return attn + mlp


def param_count(m: ModelConfig, vocab_size: int) -> dict:
    """Exact parameter counts of our GPT-NeoX / LLaMA / GPT-2 definitions (GPT-2's position
    table counts as embedding)."""
    h, f, kv = m.hidden_size, m.ffn_size, m.kv_heads * m.head_dim
    per_layer = _block_weights(m)
    if m.arch == "llama":
        per_layer += 2 * h  # two RMSNorm weights
        final_norm = h
    else:
        per_layer += (h + 2 * kv) + h + f + h  # qkv, dense, mlp-in, mlp-out biases
        per_layer += 4 * h  # two LayerNorms (weight + bias)
        final_norm = 2 * h
    embed = vocab_size * h + (m.max_seq_len * h if m.arch == "gpt2" else 0)
    head = 0 if m.tie_embeddings else vocab_size * h
    total = embed + head + m.num_layers * per_layer + final_norm
    return {"total": total, "embedding": embed, "output": head,
            "non_embedding": total - embed - head}


def thought_pass_slots(count: int, iters: int) -> list[int]:
    """Slots per token of each pass of a latent-thoughts training forward: the M growing
    passes (1, 2, .., M), then n Jacobi iterations and the final pass (M + 1 each)."""
    return [k + 1 for k in range(count)] + [count + 1] * (iters + 1)


def flops_per_token(m: ModelConfig, vocab_size: int, seq_len: int, ponder_steps: int = 0,
                    feedback: str = "embedding", thoughts: int = 0,
                    thought_iters: Sequence[int] = (0,)) -> float:
    """Training (forward + backward) FLOPs per token, counting all K+1 pondering passes and
    the K soft-embedding products p . W_in. With feedback "hidden" (the looped baseline) the
    K extra passes feed back the final-norm hidden state: no output head and no p . W_in on
    them. Latent thoughts (`thoughts` = M > 0): the passes of `thought_pass_slots`, averaged
    over the Jacobi iterations drawn (`thought_iters`); a pass over s slots per token runs
    the blocks s times per token and attends over s x seq_len slots; the head runs on the
    last slots only (M = 1, n = 3 costs about 9x a plain forward)."""
    h = m.hidden_size
    if thoughts:
        return sum(slot_flops_per_token(m, vocab_size, seq_len, thought_pass_slots(thoughts, n))
                   for n in thought_iters) / len(thought_iters)
    blocks = (2 * m.num_layers * _block_weights(m)  # weight matmuls
              + 4 * m.num_layers * seq_len * h)  # QK^T and attention x V
    head = 2 * h * vocab_size  # output head
    if feedback == "hidden":
        forward = (ponder_steps + 1) * blocks + head
    else:
        forward = (ponder_steps + 1) * (blocks + head) + ponder_steps * 2 * vocab_size * h
    return 3.0 * forward


def slot_flops_per_token(m: ModelConfig, vocab_size: int, seq_len: int,
                         pass_slots: Sequence[int]) -> float:
    """Training FLOPs per token of passes over several slots per token (`pass_slots`: slots
    per token of each pass): a pass over s slots runs the blocks s times per token and
    attends over s x seq_len slots; the head runs once per token, on its last slot."""
    weights = 2 * m.num_layers * _block_weights(m)
    attention = 4 * m.num_layers * seq_len * m.hidden_size
    forward = sum(s * weights + s * s * attention for s in pass_slots)
    return 3.0 * (forward + 2 * m.hidden_size * vocab_size)


def run_flops_per_token(cfg) -> float:
    """`flops_per_token` of a run `Config`: its pondering, latent thoughts or every-token
    pauses (one pass over M+1 slots per token)."""
    m = cfg.model
    if cfg.pause.every_token:
        return slot_flops_per_token(m, m.vocab_size, cfg.data.seq_len,
                                    [cfg.pause.every_token + 1])
    return flops_per_token(m, m.vocab_size, cfg.data.seq_len, cfg.ponder.steps,
                           cfg.ponder.feedback, cfg.thoughts.count, cfg.thoughts.train_iters)


def decode_flops_per_token(m: ModelConfig, vocab_size: int, context: int, passes: float,
                           feedback: str = "embedding", thoughts: int = 0) -> float:
    """Forward FLOPs of decoding one token that runs `passes` of the K+1 passes (adaptive
    pondering's mean; K+1 for fixed K) over `context` cached positions: every pass runs the
    blocks (attention over the context) and the output head (the feedback and the halting
    decision need each pass's logits), and all passes but the last add p . W_in (none for
    the looped baseline, whose head runs on the last pass only). Latent thoughts (M > 0,
    `passes` ignored): M + 1 one-slot passes over (M + 1) x context cached slots, the head on
    the last."""
    h = m.hidden_size
    if thoughts:
        context, passes, feedback = context * (thoughts + 1), thoughts + 1, "hidden"
    blocks = 2 * m.num_layers * _block_weights(m) + 4 * m.num_layers * context * h
    head = 2 * h * vocab_size
    if feedback == "hidden":
        return passes * blocks + head
    return passes * (blocks + head) + max(passes - 1.0, 0.0) * 2 * vocab_size * h


def peak_tflops(device_name: str) -> float | None:
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in device_name.upper():
            return PEAK_TFLOPS[key]
    return None
