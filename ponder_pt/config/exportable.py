"""Can a model config be exported to its stock Hugging Face class? The one list of rules.

Our blocks are more general than the stock transformers classes they export to (a LLaMA with
partial rotary or a GPT-NeoX with grouped-query attention trains fine here, but
LlamaForCausalLM / GPTNeoXForCausalLM cannot hold it). Every run must be exportable, so these
rules are applied twice from this one place:

* `config.validate.problems` refuses the config before launch (any command reading a config);
* `models.hf.hf_config_from` (every export: `convert to-hf`, the trainer's HF files, tests)
  refuses to write a directory that would load into a different model.

Checked against transformers 5.17-5.25 (the tested range): GPTNeoXConfig takes
partial_rotary_factor and both residual layouts, but no GQA; LlamaRotaryEmbedding always
rotates the whole head (`partial_rotary_factor` is ignored by Llama's default rope and its
apply_rotary_pos_emb), so LLaMA exports need rotary_pct=1; GPT2LMHeadModel has learned
absolute positions, sequential blocks, a tied head and plain multi-head attention.

Each message names the dotted key and what to set, like the rest of validation.
"""

from __future__ import annotations

from .schema import ModelConfig

ROTARY_ARCHS = ("gpt_neox", "llama")


def export_problems(m: ModelConfig) -> list[str]:
    """Why `m` cannot be exported to its arch's stock HF class ([] = it can)."""
    out: list[str] = []
    gqa = m.num_kv_heads is not None and m.num_kv_heads != m.num_heads
    if m.arch in ROTARY_ARCHS and not 0.0 < m.rotary_pct <= 1.0:
        out.append(f"model.rotary_pct: must be in (0, 1] for model.arch={m.arch} (rotary "
                   f"position embeddings), got {m.rotary_pct}")
    if m.arch == "gpt_neox" and gqa:
        out.append(f"model.num_kv_heads={m.num_kv_heads}: GPT-NeoX (GPTNeoXForCausalLM) has no "
                   f"grouped-query attention; set model.num_kv_heads=null (= num_heads "
                   f"{m.num_heads}) or use model.arch=llama")
    if m.arch == "llama":
        if 0.0 < m.rotary_pct < 1.0:
            out.append(f"model.rotary_pct={m.rotary_pct}: LLaMA (LlamaForCausalLM) rotates every "
                       "head dimension and cannot export partial rotary; set "
                       "model.rotary_pct=1.0, or use model.arch=gpt_neox for partial rotary")
        if m.parallel_residual:
            out.append("model.parallel_residual: LLaMA blocks are sequential; set it to false")
    if m.arch == "gpt2":
        if m.rotary_pct != 0.0:
            out.append(f"model.rotary_pct={m.rotary_pct}: GPT-2 uses learned absolute position "
                       "embeddings, no rotary; set model.rotary_pct=0 (or pick a gpt2-* "
                       "model.preset)")
        if m.parallel_residual:
            out.append("model.parallel_residual: GPT-2 blocks are sequential "
                       "(GPT2LMHeadModel); set it to false")
        if not m.tie_embeddings:
            out.append("model.tie_embeddings: GPT-2 ties its output head to the input "
                       "embedding (GPT2LMHeadModel); set it to true")
        if gqa:
            out.append(f"model.num_kv_heads={m.num_kv_heads}: GPT-2 has no grouped-query "
                       f"attention; set model.num_kv_heads=null (= num_heads {m.num_heads}) "
                       "or use model.arch=llama")
    return out
