"""lm-evaluation-harness on ponder-pt models (`ponder-pt eval`).

`PonderEvalLM` is an `lm_eval.api.model.LM` over an `InferenceModel` (native checkpoint or HF
directory, pondering and pause models included; HFLM knows neither pondering checkpoints nor
pauses). Log-likelihood requests are scored `batch_size` at a time, longest first, in
right-padded batches (causal attention: padding after a row's tokens cannot change their
logits, so no mask is needed), at most `batch_tokens` positions per batch; greedy
`generate_until` requests are decoded `batch_size` at a time as left-padded batches.

Pauses (M = --pauses or the model's recorded default): `loglikelihood` scores the
continuation after context + M pauses (the first continuation token is predicted at the last
pause); `generate_until` generates after context + M pauses. `loglikelihood_rolling`
(perplexity of whole documents) has no prompt to append pauses to and uses none.

The tasks are built (their datasets read) before the model loads, so an unknown task name or
a hub dataset out of reach (no network, HF_DATASETS_OFFLINE=1 with nothing cached) stops the
command at once with one line, as `sft` and `finetune` do for their hub tasks.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from tqdm import tqdm

from ..data.hub import HubUnavailable, hub_error_line, hub_unreachable
from ..export.hf_auto import refuse_remote_code
from .model import InferenceModel, load_model
from .pauses import append_pauses, resolve_pauses
from .speculative import describe_stats

OFFLINE_HINT = ("--include-path DIR with a task YAML that reads local files (dataset_path: json, "
                "dataset_kwargs: {data_files: ...}), or run once where the Hub is reachable so "
                "the datasets cache (HF_DATASETS_CACHE) holds the task's data")


class PonderEvalLM(LM):
    def __init__(self, lm: InferenceModel, pauses: Optional[int] = None,
                 max_gen_toks: int = 64, progress: bool = True, batch_size: int = 16,
                 batch_tokens: int = 8192):
        super().__init__()
        self.lm = lm
        self.pauses = resolve_pauses(pauses, lm.default_pauses, lm.pause_id)
        self.max_gen_toks = max_gen_toks
        self.progress = progress
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens

    # ---------------------------------------------------------------- helpers
    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, encoded jointly where the context's own
        encoding is a prefix (so a leading space stays attached as in training text)."""
        ctx = self.lm.encode(context)
        whole = self.lm.encode(context + continuation)
        if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, self.lm.encode(continuation)

    def _sequence(self, ctx: list[int], cont: list[int]) -> list[int]:
        """context + M pauses + continuation, cut from the left to the model's length + 1."""
        ctx = append_pauses(ctx or [self.lm.eos_id], self.pauses, self.lm.pause_id)
        return (ctx + cont)[-(self.lm.max_len + 1):]

    def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        return self._score_batch([(self._sequence(ctx, cont), len(cont))])[0]

    def _score_batch(self, jobs: list) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) of the last n tokens of each (ids, n), in one
        right-padded forward."""
        width = max(len(ids) - 1 for ids, _ in jobs)
        pad = self.lm.eos_id if self.lm.eos_id is not None else 0
        inp = torch.tensor([ids[:-1] + [pad] * (width - len(ids) + 1) for ids, _ in jobs])
        logits = self.lm.logits(inp)
        out = []
        for row, (ids, n) in enumerate(jobs):
            end = len(ids) - 1
            logp = F.log_softmax(logits[row, end - n:end], dim=-1)
            target = torch.tensor(ids[-n:], device=logp.device)
            out.append((float(logp.gather(1, target[:, None]).sum()),
                        bool((logp.argmax(-1) == target).all())))
        return out

    # ---------------------------------------------------------------- LM api
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        jobs = []
        for req in requests:
            ctx, cont = self._split(*req.args)
            jobs.append((self._sequence(ctx, cont), len(cont)))
        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0]))  # longest first
        out: list = [None] * len(jobs)
        bar = tqdm(total=len(jobs), desc="loglikelihood",
                   disable=disable_tqdm or not self.progress)
        start = 0
        while start < len(order):
            width = len(jobs[order[start]][0])  # the batch's longest row
            rows = max(1, min(self.batch_size, self.batch_tokens // max(width, 1)))
            chunk = order[start:start + rows]
            for i, res in zip(chunk, self._score_batch([jobs[i] for i in chunk])):
                out[i] = res
            bar.update(len(chunk))
            start += len(chunk)
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling",
                        disable=disable_tqdm or not self.progress):
            (text,) = req.args[:1]
            ids = self.lm.encode(text)
            total = 0.0
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=ids, prefix_token=self.lm.eos_id, max_seq_len=self.lm.max_len,
                context_len=1))
            for ctx, cont in windows:
                inp = torch.tensor([(ctx + cont)[:-1]])
                logp = F.log_softmax(self.lm.logits(inp)[0, -len(cont):], dim=-1)
                target = torch.tensor(cont, device=logp.device)
                total += float(logp.gather(1, target[:, None]).sum())
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        jobs = [self._generation_job(req) for req in requests]
        out: list = [None] * len(jobs)
        bar = tqdm(total=len(jobs), desc="generate_until",
                   disable=disable_tqdm or not self.progress)
        greedy: dict = {}  # max_new -> request indices, decoded in batches of similar lengths
        for i, job in enumerate(jobs):
            if job["greedy"]:
                greedy.setdefault(job["max_new"], []).append(i)
            else:
                new = self.lm.generate(job["ids"], job["max_new"], greedy=False,
                                       temperature=job["temperature"])
                out[i] = self._until(new, job["until"])
                bar.update(1)
        for max_new, idx in greedy.items():
            idx.sort(key=lambda i: len(jobs[i]["ids"]))
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                news = self.lm.generate_batch([jobs[i]["ids"] for i in chunk], max_new,
                                              batch_size=self.batch_size)
                for i, new in zip(chunk, news):
                    out[i] = self._until(new, jobs[i]["until"])
                bar.update(len(chunk))
        bar.close()
        return out

    def _generation_job(self, req) -> dict:
        context, kwargs = req.args
        kwargs = dict(kwargs or {})
        until = kwargs.get("until") or []
        max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        ids = append_pauses(self.lm.encode(context) or [self.lm.eos_id], self.pauses,
                            self.lm.pause_id)
        room = self.lm.max_len - max_new
        return {"ids": ids[-room:] if room > 0 else ids[-1:], "max_new": max_new,
                "until": [until] if isinstance(until, str) else list(until),
                "greedy": not kwargs.get("do_sample", False) or kwargs.get("temperature", 1.0) == 0,
                "temperature": float(kwargs.get("temperature", 1.0) or 1.0)}

    def _until(self, new: list, until: list) -> str:
        text = self.lm.decode(new)
        for stop in until:
            if stop and stop in text:
                text = text[:text.index(stop)]
        return text


def load_tasks(tasks: list[str], include_path: Optional[str] = None):
    """An lm-eval TaskManager whose tasks are built now, datasets included; `simple_evaluate`
    then uses these instead of building them again. An unknown name or an unreachable hub
    dataset is a ValueError of one line (HubUnavailable for the latter)."""
    from lm_eval.tasks import TaskManager

    if include_path and not os.path.isdir(include_path):
        raise FileNotFoundError(f"--include-path {include_path}: no such directory")
    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    try:
        loaded = tm.load(tasks)
    except KeyError as exc:
        raise ValueError(f"--tasks: {exc.args[0] if exc.args else exc}; `lm-eval ls tasks` "
                         "lists the known ones, --include-path DIR adds your own YAMLs") from None
    except Exception as exc:  # noqa: BLE001 - classified here, re-raised unless unreachable
        if hub_unreachable(exc):
            raise HubUnavailable(hub_error_line(f"lm-eval task {', '.join(tasks)}",
                                                OFFLINE_HINT, exc)) from None
        raise
    tm.load = lambda task_list: loaded  # simple_evaluate asks for exactly these tasks
    return tm


def run_eval(model_dir: str, tasks: list[str], pauses: Optional[int] = None,
             include_path: Optional[str] = None, limit: Optional[float] = None,
             num_fewshot: Optional[int] = None, device: str = "auto", progress: bool = True,
             seed: int = 1234, trust_remote_code: bool = False,
             unsafe_unpickle: bool = False, batch_size: int = 16,
             halt_q: Optional[float] = None, thought_prefill: Optional[str] = None,
             speculative: Optional[str] = None) -> dict:
    """lm_eval.simple_evaluate on our wrapper; returns its results dict. device: "auto"
    (cuda when available, else cpu), "cpu", "cuda" or "cuda:N". halt_q: adaptive pondering's
    Q-exit threshold (None: the model's own); adaptive models add "mean_passes" (passes per
    scored token) to the results dict. thought_prefill: latent-thoughts models' "exact" or
    "jacobi" prompt thoughts (None: the model's own). speculative: "d:n" generations decoded
    speculatively (`inference.speculative`), adding "speculative" (the acceptance counts)."""
    import lm_eval

    if not os.path.exists(model_dir):
        raise FileNotFoundError(f"--model {model_dir}: no such directory")
    refuse_remote_code(model_dir, trust_remote_code)  # a safety refusal comes first
    tm = load_tasks(tasks, include_path)  # before the model: a task that cannot load fails fast
    model = load_model(model_dir, device=device, trust_remote_code=trust_remote_code,
                       unsafe_unpickle=unsafe_unpickle)
    model.set_halt_q(halt_q)
    model.set_thought_prefill(thought_prefill)
    model.set_speculative(speculative)
    lm = PonderEvalLM(model, pauses, progress=progress, batch_size=batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=tm, log_samples=False, random_seed=seed,
                                  numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    if res is not None:
        res["pauses"] = lm.pauses  # the M every request was scored with
        if model.adaptive and model.passes_seen:
            res["mean_passes"] = model.passes_seen[0] / max(1, model.passes_seen[1])
            res["halt_q"] = model.halt_q
        if model.speculative_stats is not None:
            res["speculative"] = model.speculative_stats.as_dict()
    return res


def cmd_eval(args) -> int:
    if args.write_card and not os.path.exists(os.path.join(args.model, "config.json")):
        raise ValueError(f"--write-card: {args.model} is not an HF export (no config.json); the "
                         "card belongs to an export: `ponder-pt convert to-hf` first")
    tasks = [t for item in args.tasks for t in item.split(",") if t]
    limit = args.limit
    if limit is not None and float(limit).is_integer():
        limit = int(limit)
    res = run_eval(args.model, tasks, args.pauses, args.include_path, limit, args.num_fewshot,
                   args.device, progress=not args.quiet,
                   trust_remote_code=args.trust_remote_code,
                   unsafe_unpickle=args.unsafe_unpickle, batch_size=args.batch_size,
                   halt_q=args.halt_q, thought_prefill=args.thought_prefill,
                   speculative=args.speculative)
    results = res.get("results", {}) if res else {}
    extra = {key: res[key] for key in ("mean_passes", "halt_q", "speculative")
             if res and key in res}
    if args.json:
        print(json.dumps({"results": results, **extra}, default=str))
    else:
        from lm_eval.utils import make_table

        print(make_table(res))
        if "mean_passes" in extra:
            print(f"adaptive pondering: {extra['mean_passes']:.3f} passes per token")
        if "speculative" in extra:
            print(f"speculative decoding: {describe_stats(extra['speculative'])}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump({"results": results, "config": res.get("config")}, fh, indent=1,
                      default=str)
    if args.write_card and res:
        from ..export.model_card import update_results

        path = update_results(args.model, res, res.get("pauses"), limit)
        print(f"eval: results added to {path}", file=sys.stderr)
    return 0
