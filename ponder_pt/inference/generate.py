"""`ponder-pt generate`: text in, new tokens out, on a native checkpoint or an HF directory;
one prompt (`--prompt`) or a file of them (`--prompts-file`, decoded in batches)."""

from __future__ import annotations

import json
import sys
from typing import Optional

from .model import InferenceModel, load_model
from .pauses import append_pauses, resolve_pauses
from .speculative import describe_stats


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
    out = {"token_ids": new, "text": lm.decode(new), "pauses": m, "prompt_ids": ids}
    if lm.adaptive:
        out["passes"] = list(lm.last_passes or [])
    return out


def read_prompts(path: str) -> list[str]:
    """Prompts from a .txt (one per line, blank lines skipped) or .jsonl file ({"prompt": ...}
    per line). A bad jsonl line is an error naming file and line: a prompt file is the input,
    not a sample of it."""
    prompts = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if not path.endswith((".jsonl", ".json")):
                prompts.append(line.rstrip("\n"))
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise ValueError(f"{path}:{number}: expected {{\"prompt\": \"...\"}}")
            prompts.append(rec["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def generate_many(lm: InferenceModel, prompts: list[str], max_new_tokens: int = 32,
                  greedy: bool = False, pauses: Optional[int] = None, temperature: float = 1.0,
                  top_k: int = 0, seed: int = 0, batch_size: int = 16) -> list[dict]:
    """`generate_text` of each prompt, in order (prompt i sampled with seed + i), decoded
    `batch_size` at a time, each as alone (HF directories sample one prompt at a time)."""
    m = resolve_pauses(pauses, lm.default_pauses, lm.pause_id)
    ids = [append_pauses(lm.encode(p), m, lm.pause_id) or [lm.eos_id] for p in prompts]
    news = lm.generate_batch(ids, max_new_tokens, batch_size=batch_size, greedy=greedy,
                             temperature=temperature, top_k=top_k,
                             seeds=[seed + i for i in range(len(prompts))])
    return [{"token_ids": new, "text": lm.decode(new), "pauses": m, "prompt_ids": i}
            for new, i in zip(news, ids)]


def cmd_generate(args) -> int:
    if args.output and not args.prompts_file:
        raise ValueError("--out FILE goes with --prompts-file (one JSON line per prompt); "
                         "with --prompt the text goes to stdout")
    prompts = read_prompts(args.prompts_file) if args.prompts_file else None  # before loading
    lm = load_model(args.model, device=args.device, trust_remote_code=args.trust_remote_code,
                    unsafe_unpickle=args.unsafe_unpickle)
    lm.set_halt_q(args.halt_q)
    lm.set_thought_prefill(args.thought_prefill)
    lm.set_speculative(args.speculative)
    if prompts is not None:
        results = generate_many(lm, prompts, args.max_new_tokens, args.greedy, args.pauses,
                                args.temperature, args.top_k, args.seed, args.batch_size)
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        try:
            for prompt, res in zip(prompts, results):
                out.write(json.dumps({"prompt": prompt, "token_ids": res["token_ids"],
                                      "text": res["text"]}) + "\n")
        finally:
            if args.output:
                out.close()
        if lm.speculative_stats is not None:
            print(f"speculative decoding: {describe_stats(lm.speculative_stats.as_dict())}",
                  file=sys.stderr)
        return 0
    res = generate_text(lm, args.prompt, args.max_new_tokens, args.greedy, args.pauses,
                        args.temperature, args.top_k, args.seed)
    if args.json:
        keys = ("token_ids", "text", "passes") if "passes" in res else ("token_ids", "text")
        out = {key: res[key] for key in keys}
        if lm.speculative_stats is not None:
            out["speculative"] = lm.speculative_stats.as_dict()
        print(json.dumps(out))
    else:
        print(args.prompt + res["text"])
    return 0
