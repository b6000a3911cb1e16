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
A wrong value in any of them (`"ponder_steps": "three"`) is refused when the config is built,
naming the key (and config.json, when loaded from a directory): PonderConfigError.
"""

import dataclasses
import os

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


class PonderConfigError(ValueError):
    """A field of a pondering config.json has a value the model cannot use."""

    def __init__(self, problem: str, path: str | None = None):
        self.problem, self.path = problem, path
        super().__init__(f"config.json: {problem}" + (f" ({path})" if path else ""))


def config_file(name_or_path) -> str:
    """The config.json that `from_pretrained(name_or_path)` reads (a directory's, or the
    name itself: a file, or a Hub repository)."""
    name_or_path = os.fspath(name_or_path)
    return (os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path)
            else name_or_path)


def config_error_at(exc: Exception, name_or_path) -> "PonderConfigError | None":
    """`exc` (raised while building a config) as a PonderConfigError naming the file, or None
    when it is no config-value problem. transformers' own fields are checked by its strict
    dataclasses (huggingface_hub's StrictDataclassError, which is no ValueError)."""
    if isinstance(exc, PonderConfigError):
        return PonderConfigError(exc.problem, config_file(name_or_path))
    if any(c.__name__ == "StrictDataclassError" for c in type(exc).__mro__):
        return PonderConfigError(" ".join(str(exc).split()), config_file(name_or_path))
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def ponder_field_problem(key: str, value) -> str | None:
    """What is wrong with config.json's pondering field `key` = `value`, or None. None stands
    for the default where the model reads `value or default` (steps, top-k, pauses, feedback,
    halting)."""
    if key in ("ponder_steps", "ponder_top_k", "default_pauses", "thought_count",
               "pause_every_token"):
        if value is None or (_is_int(value) and value >= 0):
            return None
        return f"{key} must be an integer >= 0, got {value!r}"
    if key == "thought_scale_embeds" and value is None:  # absent (no latent thoughts)
        return None
    if key in ("ponder_scale_embeds", "ponder_scale_initial_by_steps", "thought_scale_embeds"):
        return None if isinstance(value, bool) else f"{key} must be true or false, got {value!r}"
    if key in ("ponder_feedback", "ponder_halting"):
        allowed = (("embedding", "hidden") if key == "ponder_feedback"
                   else ("off", "pondernet", "palbert"))
        if value is None or value in allowed:
            return None
        return f"{key} must be one of {', '.join(allowed)}, got {value!r}"
    if key == "ponder_halt_q":  # absent from fixed-K exports
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and 0 < value <= 1):
            return None
        return f"{key} must be a number in (0, 1], got {value!r}"
    if key == "pause_token_id":
        if value is None or (_is_int(value) and value >= 0):
            return None
        return f"{key} must be an integer >= 0 or null, got {value!r}"
    if key == "ponder_transformers":
        if value is None:
            return None
        from packaging.specifiers import InvalidSpecifier, SpecifierSet  # transformers needs it

        try:
            SpecifierSet(value)
            return None
        except (InvalidSpecifier, TypeError):
            return f"{key} must be a version range such as '>=5.17,<5.26', got {value!r}"
    return None


PONDER_FIELDS = ("ponder_steps", "ponder_scale_embeds", "ponder_scale_initial_by_steps",
                 "ponder_top_k", "ponder_feedback", "ponder_halting", "ponder_halt_q",
                 "pause_token_id", "default_pauses", "ponder_transformers", "thought_count",
                 "thought_scale_embeds", "pause_every_token")


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

    def __post_init__(self, **kwargs):
        # ponder_halting / ponder_halt_q, the latent thoughts' thought_count /
        # thought_scale_embeds and pause_every_token are no fields (other exports'
        # config.json must not gain them): they arrive in kwargs and become attributes here
        super().__post_init__(**kwargs)
        for key in PONDER_FIELDS:
            problem = ponder_field_problem(key, getattr(self, key, None))
            if problem:
                raise PonderConfigError(problem)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' from_pretrained; a bad value is reported with the file it is in."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as exc:
            named = config_error_at(exc, pretrained_model_name_or_path)
            if named is None:
                raise
            raise named from None


class PonderGPTNeoXConfig(PonderFields, GPTNeoXConfig):
    model_type = "ponder_gpt_neox"


class PonderLlamaConfig(PonderFields, LlamaConfig):
    model_type = "ponder_llama"


class PonderGPT2Config(PonderFields, GPT2Config):
    model_type = "ponder_gpt2"
