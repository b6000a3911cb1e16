"""Configs of ponder-pt pondering models (continuous-space pondering, PonderingLM).

Written into the export directory by `ponder-pt convert to-hf`; needs only transformers.
ponder-pt itself registers these classes with transformers' Auto classes (model types
`ponder_gpt_neox` / `ponder_llama` / `ponder_gpt2`), so with ponder-pt installed an export loads without
running the directory's copy. Fields on top of the stock GPT-NeoX / LLaMA / GPT-2
config:
    ponder_steps (K), ponder_scale_embeds, ponder_scale_initial_by_steps, ponder_top_k,
    ponder_feedback ("embedding", or "hidden" for the looped baseline),
    ponder_halting ("palbert" / "pondernet": adaptive pondering, a halting head
    `ponder_halting` after every pass) and ponder_halt_q (its Q-exit threshold), written only
    by adaptive exports (absent: "off"; a fixed-K export's config.json stays as it was),
    pause_token_id / default_pauses (pause-trained models; None / 0 otherwise),
    ponder_transformers (the transformers versions the export was tested with, e.g.
    ">=5.17,<5.26"; the model refuses to load outside them).
"""

import dataclasses

from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig


class TransformersVersionError(ValueError):
    """The installed transformers is outside the range an export was tested with."""


def check_transformers_version(config) -> None:
    """Refuse to build a pondering model under an untested transformers.

    transformers has changed how generate() hands the KV cache to forward (5.24 renamed
    `past_key_values` to `cache`); a model that misses the cache silently generates wrong
    tokens, so an untested version is an error, never a guess. Exports without the field
    (older ones) are not checked."""
    wanted = getattr(config, "ponder_transformers", None)
    if not wanted:
        return
    import sys

    from packaging.specifiers import SpecifierSet  # a dependency of transformers
    from packaging.version import Version

    # the transformers imported now (sys.modules), not a module object bound at import time
    installed = sys.modules["transformers"].__version__
    if Version(installed) not in SpecifierSet(wanted):
        raise TransformersVersionError(
            f"this pondering export supports transformers{wanted}, but transformers "
            f"{installed} is installed. Install a version in that range (pip install "
            f"'transformers{wanted}'), or re-export the checkpoint with a newer ponder-pt "
            "(`ponder-pt convert to-hf`) that supports this transformers.")


@dataclasses.dataclass(repr=False, eq=False, kw_only=True)
class PonderFields:
    """The fields every pondering config adds to its stock config. transformers makes each
    config class a dataclass, which takes the fields of dataclass bases, so the three classes
    below share these (as the last fields, after the stock ones)."""

    ponder_steps: int = 3
    ponder_scale_embeds: bool = True
    ponder_scale_initial_by_steps: bool = False
    ponder_top_k: int = 0
    ponder_feedback: str = "embedding"
    pause_token_id: int | None = None
    default_pauses: int = 0
    ponder_transformers: str | None = None


class PonderGPTNeoXConfig(PonderFields, GPTNeoXConfig):
    model_type = "ponder_gpt_neox"


class PonderLlamaConfig(PonderFields, LlamaConfig):
    model_type = "ponder_llama"


class PonderGPT2Config(PonderFields, GPT2Config):
    model_type = "ponder_gpt2"
