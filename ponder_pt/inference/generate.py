"""`ponder-pt generate`: text in, new tokens out, on a native checkpoint or an HF directory."""

from __future__ import annotations

import json
from typing import Optional

from .model import InferenceModel, load_model
from .pauses import append_pauses, resolve_pauses


def generate_text(lm: InferenceModel, prompt: str, max_new_tokens: int = 32,
                  greedy: bool = False, pauses: Optional[int] = None, temperature: float = 1.0,
                  top_k: int = 0, seed: int = 0) -> dict:
    """{"token_ids", "text", "pauses", "prompt_ids"}: only the tokens after the last pause."""
    m = resolve_pauses(pauses, lm.default_pauses, lm.pause_id)
    ids = append_pauses(lm.encode(prompt), m, lm.pause_id)
    if not ids:
        ids = [lm.eos_id]  # an empty prompt starts from the end-of-document token
    new = lm.generate(ids, max_new_tokens, greedy=greedy, temperature=temperature,
                      top_k=top_k, seed=seed)
    return {"token_ids": new, "text": lm.decode(new), "pauses": m, "prompt_ids": ids}


def cmd_generate(args) -> int:
    lm = load_model(args.model, device=args.device, trust_remote_code=args.trust_remote_code,
                    unsafe_unpickle=args.unsafe_unpickle)
    res = generate_text(lm, args.prompt, args.max_new_tokens, args.greedy, args.pauses,
                        args.temperature, args.top_k, args.seed)
    if args.json:
        print(json.dumps({"token_ids": res["token_ids"], "text": res["text"]}))
    else:
        print(args.prompt + res["text"])
    return 0
