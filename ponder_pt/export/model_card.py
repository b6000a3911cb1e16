"""The model card (`README.md`) of every HF export: the Hub's YAML metadata, rendered by
`huggingface_hub` (`ModelCardData`), above a description of the model.

Metadata: `library_name: transformers`, `pipeline_tag: text-generation`, `tags` (ponder-pt,
pondering when K > 0, pause-tokens when the model uses a `<pause>` token), `base_model` when
the weights came from a Hub model (`checkpoint.init_from`, or `convert from-hf`, naming a
directory of the Hub cache: `.../models--ORG--NAME/snapshots/REV`; the Hub accepts only model
ids there, so a plain local directory is named in the text instead), and after
`ponder-pt eval --write-card` the `model-index` of the results.

Text: the architecture and K (and its feedback; for adaptive pondering, the halting head that
decides each token's passes, its mode and q), the pause token and the M the model appends
or was fine-tuned with, the training steps and tokens and the data prefixes, the tokenizer
check of the export, the ponder-pt version, how to load it, and the evaluation results, which
`update_results` rewrites in place between the EVAL_BEGIN / EVAL_END markers.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from .. import __version__
from ..config import Config, parse_blend
from ..weights.files import hf_source

CARD = "README.md"
LIBRARY = "transformers"
PIPELINE = "text-generation"
EVAL_BEGIN = "<!-- ponder-pt eval results -->"
EVAL_END = "<!-- /ponder-pt eval results -->"
NO_RESULTS = ("No evaluation yet: `ponder-pt eval --model DIR --tasks ... --write-card` adds "
              "the results here and to the metadata.")
ARCH_NAMES = {"gpt_neox": "GPT-NeoX (Pythia)", "llama": "LLaMA", "gpt2": "GPT-2"}
_HUB_CACHE = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")
# lm-eval tasks reading local files name a `datasets` builder, not a dataset, as their path
_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def hub_model_id(path: str) -> Optional[str]:
    """ORG/NAME of a directory in the Hugging Face cache (`models--ORG--NAME/snapshots/REV`)."""
    m = _HUB_CACHE.search(os.path.abspath(path).replace(os.sep, "/"))
    return f"{m.group(1)}/{m.group(2)}" if m else None


def base_model_of(cfg: Config) -> Optional[str]:
    """The HF directory `checkpoint.init_from` (directly, or through `convert from-hf`'s
    checkpoint) took its weights from, if it is still there to ask."""
    path = cfg.checkpoint.init_from
    if not path or not os.path.isdir(path):
        return None
    return hf_source(path)


def tags_of(cfg: Config, pause_id: Optional[int]) -> list[str]:
    tags = ["ponder-pt"]
    if cfg.ponder.steps > 0:
        tags.append("pondering")
    if cfg.thoughts.count:
        tags.append("latent-thoughts")
    if pause_id is not None:
        tags.append("pause-tokens")
    return tags


def _model_lines(cfg: Config) -> list[str]:
    m, p = cfg.model, cfg.ponder
    shape = (f"{ARCH_NAMES.get(m.arch, m.arch)}: {m.num_layers} layers, hidden size "
             f"{m.hidden_size}, {m.num_heads} attention heads"
             + (f" ({m.kv_heads} key/value heads)" if m.kv_heads != m.num_heads else "")
             + f", FFN {m.ffn_size}, {m.max_seq_len} positions, {m.vocab_size} vocabulary rows")
    lines = [f"- Architecture: {shape}"]
    if p.steps > 0:
        feedback = ("the probability-weighted embedding (PonderingLM)" if p.feedback == "embedding"
                    else "the final hidden state (the looped baseline)")
        lines.append(f"- Pondering: K = {p.steps} extra passes, each feeding back {feedback}"
                     + (f", top-{p.top_k} probabilities" if p.top_k else "")
                     + (f"; up to K + 1 = {p.steps + 1} transformer passes per token"
                        if p.adaptive else
                        f"; K + 1 = {p.steps + 1} transformer passes per token"))
        if p.adaptive:
            lines.append(f"- {_halting_text(p.halting, p.steps)}")
    elif cfg.thoughts.count:
        t = cfg.thoughts
        lines.append(f"- Latent thoughts (PonderLM-2): after every token the model writes "
                     f"M = {t.count} thought{'s' if t.count > 1 else ''}, each the final hidden "
                     f"state of the slot before, at the token's position; the next token is "
                     f"predicted from the last. Trained with Jacobi iterations drawn from "
                     f"{t.train_iters} per step; this export computes the thoughts exactly, "
                     f"M + 1 = {t.count + 1} one-slot forwards per token through a KV cache "
                     f"{t.count + 1}x as long")
    else:
        lines.append("- Pondering: none (K = 0), one transformer pass per token")
    return lines


def _halting_text(h, steps: int) -> str:
    """How an adaptive model (`ponder.halting`) decides a token's passes."""
    head = {"pondernet": "from each pass's final hidden state (PonderNet)",
            "palbert": "from each pass's final hidden state and the previous pass's halting "
                       "probability (PALBERT's Lambda layer)"}.get(h.mode, f"(`{h.mode}`)")
    return (f"Adaptive pondering: a halting head (`{h.mode}`) decides each token's passes "
            f"{head}; the token exits at the first pass whose cumulative exit probability "
            f"reaches q = {h.q:g} (`ponder.halting.q`; `--halt-q` of `ponder-pt generate` / "
            f"`eval`, or `halt_q=` of `generate()`, overrides it; q = 1 runs all {steps + 1} "
            "passes). Later passes read an exited token's frozen keys and values")


def _pause_lines(cfg: Config, pause_id: Optional[int], finetune: Optional[dict]) -> list[str]:
    if pause_id is None:
        return ["- Pause tokens: none"]
    m = int(cfg.pause.inference_pauses)
    lines = [f"- Pause token: `<pause>` = id {pause_id}"]
    if cfg.pause.every_token:
        k = cfg.pause.every_token
        return lines + [f"- Every-token pauses (PonderLM-2's pause baseline): the model itself "
                        f"puts M = {k} `<pause>` slot{'s' if k > 1 else ''} after every token, "
                        f"at the token's position, and predicts the next token from the last "
                        "one; nothing is appended to prompts"]
    if cfg.pause.rate > 0:
        lines.append(f"- Pretrained with pause tokens: {cfg.pause.rate:g} of each sample's "
                     "positions")
    if finetune is not None:
        lines.append(f"- Fine-tuned with M = {m} pauses after each prompt")
    lines.append(f"- At inference, M = {m} pauses are appended to each prompt (`ponder-pt "
                 "generate` / `eval` do it; `--pauses` overrides M); outputs before the last "
                 "pause are ignored")
    return lines


def _training_lines(cfg: Config, checkpoint: Optional[dict], finetune: Optional[dict],
                    base: Optional[str]) -> list[str]:
    lines = []
    if base:
        hub = hub_model_id(base)
        lines.append(f"- Initialised from: {f'[{hub}](https://huggingface.co/{hub})' if hub else ''}"
                     f"{' ' if hub else ''}`{base}`")
    if checkpoint is not None:
        if checkpoint["steps"]:
            lines.append(f"- Trained with ponder-pt: {checkpoint['steps']:,} steps, "
                         f"{checkpoint['tokens']:,} tokens ({cfg.train.global_batch} sequences "
                         f"of {cfg.data.seq_len} tokens per step); exported from "
                         f"`{checkpoint['tag']}`")
        else:
            lines.append(f"- No training steps: the weights of `{checkpoint['tag']}` as "
                         "converted (`ponder-pt convert from-hf`)")
    try:
        blend = parse_blend(list(cfg.data.train))
    except ValueError:
        blend = []
    if blend:
        lines.append("- " + ("Pretraining" if finetune else "Training") + " data (prefixes): "
                     + ", ".join(f"`{prefix}`" + (f" (weight {w:g})" if len(blend) > 1 else "")
                                 for prefix, w in blend))
    if finetune is not None:
        lines.append(f"- Fine-tuned with `{finetune['method']}` on `{finetune['task']}`: "
                     f"{finetune['steps']:,} steps, best validation at step "
                     f"{finetune['best_step']:,}, from `{finetune['backbone']}`")
    return lines or ["- No training record (exported from a state dict)"]


def _tokenizer_lines(check: Optional[dict]) -> list[str]:
    if check is None:
        return ["No tokenizer was exported with these weights."]
    result = ("identical ids" if check.get("exact") else
              f"DIFFERENT ids on {check['checked'] - check['matching']} texts (exported with the "
              "mismatch allowed: prompts are not encoded as in training)")
    return [f"The exported tokenizer ({check.get('hf_class')}, from the {check.get('kind')} "
            f"tokenizer of training) was loaded back with `AutoTokenizer` and compared with the "
            f"training tokenizer on {check['checked']} texts (the run's training documents where "
            f"at hand, and probe texts): {result}. Details: `ponder_pt_tokenizer_check.json`."]


def _usage(cfg: Config, name: str, pause_id: Optional[int], transformers_range: str
           ) -> list[str]:
    if cfg.ponder.steps > 0 or cfg.thoughts.count:
        kind = "A latent-thoughts model" if cfg.thoughts.count else "A pondering model"
        lines = [
            f"{kind} (`model_type: ponder_{cfg.model.arch}`). With ponder-pt "
            "installed, its classes are registered with transformers and no code from this "
            "directory runs:", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "from ponder_pt.export.hf_auto import from_pretrained",
            "",
            f'model = from_pretrained(AutoModelForCausalLM, "{name}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
            "Without ponder-pt, transformers runs the copy of those classes shipped here "
            "(`configuration_ponder.py`, `modeling_ponder.py`), which needs "
            f"`trust_remote_code=True` and transformers{transformers_range}:", "", "```python",
            f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
            "```"]
    else:
        lines = [
            f"Stock transformers classes (model_type `{cfg.model.arch}`): neither ponder-pt nor "
            "remote code is needed.", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{name}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```"]
    if pause_id is not None:
        lines += ["", f"Append M = {int(cfg.pause.inference_pauses)} `<pause>` tokens (id "
                      f"{pause_id}) to each prompt's ids before generating."]
    lines += ["", f"With ponder-pt: `ponder-pt generate --model {name} --prompt ...`, "
                  f"`ponder-pt eval --model {name} --tasks ... [--write-card]`."]
    return lines


def write_card(out: str, cfg: Config, pause_id: Optional[int], transformers_range: str,
               tokenizer_check: Optional[dict] = None, checkpoint: Optional[dict] = None,
               finetune: Optional[dict] = None) -> str:
    """Write OUT/README.md for the export of `cfg`'s model in OUT; returns its path.

    tokenizer_check: the report of the exported tokenizer's check (tokenizer_export);
    checkpoint: {"tag", "steps", "tokens"} of the training checkpoint exported;
    finetune: {"method", "task", "steps", "best_step", "backbone"} of a fine-tuning run."""
    from huggingface_hub import ModelCard, ModelCardData

    name = os.path.basename(os.path.abspath(out))
    base = base_model_of(cfg)
    data = ModelCardData(library_name=LIBRARY, pipeline_tag=PIPELINE,
                         tags=tags_of(cfg, pause_id),
                         base_model=hub_model_id(base) if base else None)
    body = [f"# {name}", "",
            f"A {ARCH_NAMES.get(cfg.model.arch, cfg.model.arch)} language model "
            + (f"with up to K = {cfg.ponder.steps} continuous-space pondering steps, as many "
               f"as a halting head (`{cfg.ponder.halting.mode}`, q = {cfg.ponder.halting.q:g}) "
               "decides for each token, "
               if cfg.ponder.adaptive else
               f"with K = {cfg.ponder.steps} continuous-space pondering steps "
               if cfg.ponder.steps else
               f"with M = {cfg.thoughts.count} latent thought(s) per token "
               if cfg.thoughts.count else "")
            + f"trained with [ponder-pt](https://pypi.org/project/ponder-pt/) {__version__}.",
            "",
            "## Model", "", *_model_lines(cfg), *_pause_lines(cfg, pause_id, finetune), "",
            "## Training", "", *_training_lines(cfg, checkpoint, finetune, base), "",
            "## Tokenizer", "", *_tokenizer_lines(tokenizer_check), "",
            "## How to load", "", *_usage(cfg, name, pause_id, transformers_range), "",
            "## Evaluation", "", EVAL_BEGIN, NO_RESULTS, EVAL_END, "",
            "## Software", "", f"- ponder-pt {__version__}",
            (f"- transformers{transformers_range} (the versions this export's code is tested "
             "with; it refuses to load under others)" if cfg.ponder.steps or cfg.thoughts.count
             else "- transformers: the stock classes of the model type"), ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    path = os.path.join(out, CARD)
    card.save(path)
    return path


# ------------------------------------------------------------------ evaluation results


def _eval_results(res: dict, pauses: Optional[int], limit) -> list:
    """One `EvalResult` per (task, metric) of an lm-eval results dict; the run's settings
    (few-shot examples, pauses M, example limit) in its `dataset_args`."""
    from huggingface_hub import EvalResult

    out = []
    configs = res.get("configs") or {}
    for task, metrics in sorted((res.get("results") or {}).items()):
        conf = configs.get(task) or {}
        settings = {"num_fewshot": (res.get("n-shot") or {}).get(task, conf.get("num_fewshot")),
                    "pauses": pauses, "limit": limit,
                    # adaptive pondering: the q scored at and the passes it took
                    "halt_q": res.get("halt_q"), "mean_passes": res.get("mean_passes")}
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")
            # metrics are "name,filter"; "sample_len" and the like are counts, not metrics
            if not comma or "_stderr" in metric or isinstance(value, bool) or \
                    not isinstance(value, (int, float)):
                continue
            path = conf.get("dataset_path")
            out.append(EvalResult(
                task_type=PIPELINE, dataset_type=str(path if path not in (None, *_BUILDERS)
                                                     else task),
                dataset_name=task, dataset_config=conf.get("dataset_name") or None,
                dataset_split=conf.get("test_split") or conf.get("validation_split") or None,
                dataset_args={k: v for k, v in settings.items() if v is not None},
                metric_type=metric, metric_config=filt if filt and filt != "none" else None,
                metric_value=float(value)))
    return out


def _results_table(results: list) -> str:
    # an adaptive model's scores depend on the halting threshold: its q and passes per token
    adaptive = any("halt_q" in (r.dataset_args or {}) for r in results)
    rows = ["| task | metric | value | split | few-shot | pauses M | limit |"
            + (" halting q | passes per token |" if adaptive else ""),
            "|---|---|---|---|---|---|---|" + ("---|---|" if adaptive else "")]
    for r in results:
        args = r.dataset_args or {}
        metric = r.metric_type + (f" ({r.metric_config})" if r.metric_config else "")
        value = (f"{r.metric_value:.4g}" if isinstance(r.metric_value, (int, float))
                 else r.metric_value)  # a value edited by hand stays as written
        passes = args.get("mean_passes", "-")
        rows.append(f"| {r.dataset_name} | {metric} | {value} | "
                    f"{r.dataset_split or '-'} | {args.get('num_fewshot', '-')} | "
                    f"{args.get('pauses', '-')} | {args.get('limit', '-')} |"
                    + (f" {args.get('halt_q', '-')} | "
                       f"{f'{passes:.3f}' if isinstance(passes, float) else passes} |"
                       if adaptive else ""))
    return "\n".join(rows)


def update_results(model_dir: str, res: dict, pauses: Optional[int], limit=None) -> str:
    """Merge `ponder-pt eval`'s results into MODEL_DIR/README.md: the metadata's model-index
    and the text between the evaluation markers; a task's metric evaluated again replaces the
    old value, everything else in the card is kept. A directory without a card gets one
    holding only the metadata and the results. Returns the card's path."""
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(model_dir, CARD)
    if os.path.exists(path):
        card = ModelCard.load(path)
    else:
        data = ModelCardData(library_name=LIBRARY, pipeline_tag=PIPELINE)
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n## Evaluation\n\n{EVAL_BEGIN}\n"
                         f"{EVAL_END}\n")
    new = _eval_results(res, pauses, limit)
    fresh = {(r.dataset_name, r.metric_type, r.metric_config) for r in new}
    kept = [r for r in (card.data.eval_results or [])
            if (r.dataset_name, r.metric_type, r.metric_config) not in fresh]
    card.data.eval_results = sorted(kept + new, key=lambda r: (r.dataset_name, r.metric_type,
                                                               r.metric_config or ""))
    card.data.model_name = card.data.model_name or os.path.basename(os.path.abspath(model_dir))
    section = (f"{EVAL_BEGIN}\n`ponder-pt eval` (lm-evaluation-harness):\n\n"
               f"{_results_table(card.data.eval_results)}\n{EVAL_END}")
    if EVAL_BEGIN in card.text and EVAL_END in card.text:
        head, rest = card.text.split(EVAL_BEGIN, 1)
        card.text = head + section + rest.split(EVAL_END, 1)[1]
    else:
        card.text = card.text.rstrip("\n") + f"\n\n## Evaluation\n\n{section}\n"
    card.save(path)
    return path
