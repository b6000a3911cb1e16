"""Generation equality: the trained checkpoint exported to HF; greedy generate() with KV
caches vs a cache-free loop, for the HF export and the native checkpoint, and native vs HF."""

from __future__ import annotations

import os

from .common import device_name, init_process_group, md_table
from .results import Part, record


def section_generate(args, part: Part) -> None:
    import torch

    dev = device_name(args.smoke)
    init_process_group(dev)
    ckpt = os.path.join(args.out, "work", "train", "run", "ckpt")
    hf_dir = os.path.join(args.out, "work", "hf")
    n_new = 8 if args.smoke else 32
    state = {}
    part.update(device=dev, new_tokens=n_new, dtype="fp32")

    def export():
        if not os.path.exists(os.path.join(ckpt, "latest")):
            raise FileNotFoundError(f"no trained checkpoint in {ckpt} (train section failed?)")
        from ponder_pt.export import checkpoint_to_hf

        tag = checkpoint_to_hf(ckpt, hf_dir, progress=False)
        return {"tag": tag, "hf_dir": hf_dir}

    if record(part, "export trained checkpoint to HF", export)["status"] != "ok":
        return

    def prompts(lm):
        from ponder_pt.inference import append_pauses

        texts = ["Return the number of", "The default value is"]
        return [append_pauses(lm.encode(t), lm.default_pauses, lm.pause_id) for t in texts]

    def nocache(lm, ids):
        seq = list(ids)
        for _ in range(n_new):
            z = lm.logits(torch.tensor([seq]))[0, -1].float()
            z[lm.vocab_rows:] = float("-inf")
            seq.append(int(z.argmax()))
        return seq[len(ids):]

    def compare(a, b, note=""):
        """a, b: per prompt token lists; first_mismatch = [prompt, position] or None."""
        mism = None
        for p, (x, y) in enumerate(zip(a, b)):
            i = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None)
            if i is None and len(x) != len(y):
                i = min(len(x), len(y))
            if i is not None:
                mism = [p, i]
                break
        res = {"equal": a == b, "n_tokens": sum(len(x) for x in a), "prompts": len(a),
               "first_mismatch": mism, "cached": a,
               "nocache": b, "note": note}
        if a != b:
            res["status"] = "fail"
        return res

    def cached_and_nocache(lm):
        """Greedy tokens of every prompt: the model's cached generate() and the cache-free loop."""
        cached, free = [], []
        for ids in prompts(lm):
            cached.append(lm.generate(ids, n_new, greedy=True, stop_at_eos=False))
            free.append(nocache(lm, ids))
        return cached, free

    def hf_check():
        import transformers

        from ponder_pt.inference.model import HFModel

        lm = HFModel(hf_dir, dev)
        lm.model.generation_config.eos_token_id = None
        state["hf"] = lm
        cached, state["hf_nocache"] = cached_and_nocache(lm)
        return compare(cached, state["hf_nocache"],
                       f"transformers {transformers.__version__}, {type(lm.model).__name__}, "
                       f"{lm.default_pauses} pauses appended, K={lm.ponder_steps}")

    record(part, "HF generate() (KV caches) == cache-free loop", hf_check)

    def native_check():
        from ponder_pt.inference.model import NativeModel

        lm = NativeModel(ckpt, device=dev)
        state["native"] = lm
        cached, state["native_nocache"] = cached_and_nocache(lm)
        return compare(cached, state["native_nocache"],
                       f"native PonderLM, K+1={lm.ponder_steps + 1} caches")

    record(part, "native generate (K+1 KV caches) == cache-free loop", native_check)

    def cross():
        if "hf" not in state or "native" not in state:
            raise RuntimeError("needs both the HF and the native model")
        ids = torch.tensor([prompts(state["native"])[0]])
        a = state["native"].logits(ids).cpu()
        b = state["hf"].logits(ids).cpu()
        v = min(a.shape[-1], b.shape[-1])
        diff = float((a[..., :v] - b[..., :v]).abs().max())
        res = compare(state["native_nocache"], state["hf_nocache"],
                      f"max |logit diff| native vs HF {diff:.2e}")
        res["max_abs_logit_diff"] = diff
        return res

    record(part, "native cache-free == HF cache-free (same weights)", cross)


def markdown(res: dict) -> list:
    ge = res.get("sections", {}).get("generate", {}).get("entries", [])
    if not ge:
        return []
    out = ["", "## Generation: KV-cached vs cache-free greedy", ""]
    out.append(md_table(["case", "status", "equal", "tokens", "first mismatch", "note"],
                        [[e["name"], e["status"], e.get("equal"), e.get("n_tokens"),
                          e.get("first_mismatch"), e.get("note")] for e in ge]))
    return out
