"""Inference: generation with K+1 KV caches (native checkpoints and HF exports), pause tokens
at inference, and the lm-evaluation-harness wrapper (`ponder_pt.inference.evaluation`).

Public names (imported lazily, so `ponder-pt --help` stays light): `load_model`,
`NativeModel`, `HFModel`, `InferenceModel`, `generate_text`, `append_pauses`,
`resolve_pauses`, `resolve_device` (`--device auto`), `generate_cached`, and speculative
decoding over the passes: `generate_speculative_batch`, `SpeculativeStats`.
"""

import importlib

_WHERE = {"load_model": "model", "NativeModel": "model", "HFModel": "model",
          "InferenceModel": "model", "generate_text": "generate", "append_pauses": "pauses",
          "resolve_pauses": "pauses",
          "resolve_device": "device", "generate_cached": "model",
          "generate_speculative_batch": "speculative", "SpeculativeStats": "speculative"}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(name)
