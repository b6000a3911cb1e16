"""One inference face over a native training checkpoint and an exported HF directory.

    lm = load_model(DIR)            # checkpoint.dir (run_config.yaml) or an HF directory
    lm.logits(ids)                  # [b, s, V] float32, V = padded vocabulary rows
    lm.generate(prompt_ids, 20)     # new token ids (K+1 KV caches for pondering models)

Generation never emits padded vocabulary rows (ids >= the tokenizer's size, `<pause>`
included): they are masked out of the logits.
"""

from __future__ import annotations

import abc
import logging
import os
from typing import Optional, Sequence

import torch

from ..config.validate import halt_q_problem
from ..sdpa_backends import varying_shape_method
from .decode import Decoder
from .device import resolve_device
from .sampling import pick_token
from .speculative import (SpeculativeStats, generate_speculative_batch, parse_speculative,
                          speculative_problem)


def _decode_mode(cuda_graph: Optional[bool]) -> Optional[str]:
    """generate_cached's cuda_graph flag as a `Decoder` mode (None: the device decides)."""
    return None if cuda_graph is None else ("graph" if cuda_graph else "eager")


@torch.no_grad()
def generate_cached(model, prompt: Sequence[int], max_new_tokens: int, *,
                    vocab_rows: Optional[int] = None, eos_id: Optional[int] = None,
                    greedy: bool = True, temperature: float = 1.0, top_k: int = 0,
                    generator: Optional[torch.Generator] = None,
                    ponder_steps: Optional[int] = None, on_token=None,
                    cuda_graph: Optional[bool] = None, halt_q: Optional[float] = None,
                    passes: Optional[list] = None) -> list[int]:
    """Batch-1 decoding of a `PonderLM` with K+1 KV caches (one per pass, preallocated for
    prompt + new tokens): a prefill of the prompt, then one one-token step (K+1 one-token
    passes) per new token, replayed from a CUDA graph on a GPU (`decode.Decoder`; cuda_graph
    False turns that off). Rows >= vocab_rows are never emitted; stops after eos_id (None:
    never). ponder_steps overrides the model's K (0: plain decoding). on_token(i, token) is
    called after each new token (benchmarks time lengths with it). `NativeModel.generate`
    and benchmarks' generation-speed section both run this loop. Adaptive pondering: halt_q
    overrides `ponder.halting.q`, and `passes` (a list) receives the passes each new token's
    logits took."""
    report = None if on_token is None else (lambda i, tokens: on_token(i, tokens[0]))
    rows: Optional[list] = None if passes is None else []
    out = generate_cached_batch(model, [prompt], max_new_tokens, vocab_rows=vocab_rows,
                                eos_id=eos_id, greedy=greedy, temperature=temperature,
                                top_k=top_k, generators=[generator], ponder_steps=ponder_steps,
                                on_token=report, cuda_graph=cuda_graph, halt_q=halt_q,
                                passes=rows)[0]
    if passes is not None:
        passes.extend(rows[0])
    return out


@torch.no_grad()
def generate_cached_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                          vocab_rows: Optional[int] = None, eos_id: Optional[int] = None,
                          greedy: bool = True, temperature: float = 1.0, top_k: int = 0,
                          generators: Optional[Sequence[Optional[torch.Generator]]] = None,
                          ponder_steps: Optional[int] = None, on_token=None,
                          cuda_graph: Optional[bool] = None, halt_q: Optional[float] = None,
                          passes: Optional[list] = None) -> list[list[int]]:
    """`generate_cached` for several prompts at once (left-padded into one batch; each row
    decodes as it would alone). Sampling draws row i's tokens from generators[i] only, so a
    row's sample is the one it gets alone with that generator. A row's output ends after its
    eos_id; decoding stops when every row has ended or after max_new_tokens. on_token(i,
    tokens) is called after each step's picks (one per row). `passes` (a list) receives one
    list per row: the passes each of its new tokens took (adaptive pondering; K+1 each
    otherwise)."""
    if max_new_tokens <= 0 or not prompts:
        return [[] for _ in prompts]
    if not greedy and generators is not None and len(generators) != len(prompts):
        raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts")
    gens = list(generators) if generators is not None else [None] * len(prompts)
    dec = Decoder(model, max(len(p) for p in prompts) + max_new_tokens - 1, ponder_steps,
                  vocab_rows, _decode_mode(cuda_graph), batch=len(prompts), halt_q=halt_q)
    z = dec.prefill(prompts)
    outs: list[list[int]] = [[] for _ in prompts]
    used: list[list[int]] = [[] for _ in prompts]
    K = model.ponder_cfg.steps if ponder_steps is None else ponder_steps
    done = [False] * len(prompts)
    for i in range(max_new_tokens):
        if greedy:
            picked = z.argmax(-1).tolist()
        else:  # an ended row draws nothing, as it would not alone
            picked = [outs[row][-1] if done[row] else
                      pick_token(z[row], False, temperature, top_k, gens[row])
                      for row in range(len(prompts))]
        for row, tok in enumerate(picked):
            if not done[row]:
                outs[row].append(tok)
                used[row].append(dec.passes[row] if dec.adaptive else K + 1)
                done[row] = eos_id is not None and tok == eos_id
        if on_token is not None:
            on_token(i, picked)
        if all(done) or i + 1 == max_new_tokens:
            break
        z = dec.step(picked)
    if passes is not None:
        passes.extend(used)
    return outs


class InferenceModel(abc.ABC):
    """Common attributes: tokenizer (encode/decode), eos_id, pause_id, default_pauses,
    vocab_rows (the tokenizer's real ids), max_len, ponder_steps."""

    kind = "?"
    eos_id: Optional[int] = None
    pause_id: Optional[int] = None
    default_pauses: int = 0
    vocab_rows: int = 0
    max_len: int = 2048
    ponder_steps: int = 0
    adaptive: bool = False
    """A halting head decides per token how many passes it takes (adaptive pondering)."""
    halt_q: Optional[float] = None
    """Q-exit threshold of an adaptive model (None: the one it was trained with)."""
    last_passes: Optional[list] = None
    """Passes each token of the last `generate` took (adaptive models)."""
    passes_seen: Optional[list] = None
    """[passes, tokens] summed over `logits` calls (adaptive models): mean passes per token."""

    def set_halt_q(self, q: Optional[float], name: str = "--halt-q") -> None:
        """Decode and score at Q-exit threshold q (None: keep the model's own); refused
        outside (0, 1] and on a model without a halting head."""
        if q is None:
            return
        problem = halt_q_problem(q, name)
        if problem:
            raise ValueError(problem)
        if not self.adaptive:
            raise ValueError(f"{name} needs an adaptive pondering model (trained with "
                             "ponder.halting.mode palbert or pondernet); this one has no "
                             "halting head")
        self.halt_q = q

    thoughts: int = 0
    """Latent thoughts per token (M; 0 = none)."""
    speculative: Optional[tuple] = None
    """(d, n) of speculative decoding over the passes (`set_speculative`), else None."""
    speculative_stats: Optional[SpeculativeStats] = None
    """Acceptance counts summed over the generations since `set_speculative`."""

    def set_speculative(self, spec) -> None:
        """Generate with the first d passes drafting n tokens per verify step: spec "d:n" or
        (d, n) (None: ordinary decoding). Refused where the model cannot
        (`speculative_problem`), and for HF directories."""
        if spec is None:
            return
        d, n = parse_speculative(spec) if isinstance(spec, str) else spec
        self._check_speculative(d, n)
        self.speculative, self.speculative_stats = (d, n), SpeculativeStats()

    def _check_speculative(self, d: int, n: int) -> None:
        raise ValueError(
            "--speculative: speculative decoding runs on native checkpoints. An HF export "
            "decodes through transformers' generate(), whose assisted decoding runs the draft "
            "as a second model with its own cache: the draft's passes would run again in the "
            "verifier, where ours keeps their keys/values. Point --model at the training "
            "checkpoint")

    def set_thought_prefill(self, mode: Optional[str]) -> None:
        """How prompts' thoughts are computed: "exact" or "jacobi" (None: the model's own);
        refused for a model without latent thoughts."""
        if mode is None:
            return
        if not self.thoughts:
            raise ValueError("--thought-prefill needs a latent-thoughts model (trained with "
                             "thoughts.count > 0); this one has none")
        self._set_prefill(mode)

    def _set_prefill(self, mode: str) -> None:
        if mode != "exact":
            raise ValueError(f"--thought-prefill {mode}: an HF export computes thoughts "
                             "exactly only; Jacobi prefill runs on the native checkpoint")

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Implemented by NativeModel and HFModel."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Implemented by NativeModel and HFModel."""

    @abc.abstractmethod
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Implemented by NativeModel and HFModel."""

    @abc.abstractmethod
    def generate(self, prompt: Sequence[int], max_new_tokens: int, greedy: bool = True,
                 temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                 stop_at_eos: bool = True) -> list[int]:
        """New token ids after `prompt` (pauses, if any, already appended by the caller)."""

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       stop_at_eos: bool = True, batch_size: int = 16, greedy: bool = True,
                       temperature: float = 1.0, top_k: int = 0,
                       seeds: Optional[Sequence[int]] = None) -> list[list[int]]:
        """`generate` of each prompt, in the given order (each output as `generate` gives it,
        sampled ones with seed seeds[i], up to rounding), decoded `batch_size` at a time as
        left-padded batches of similar lengths."""
        if not greedy and (seeds is None or len(seeds) != len(prompts)):
            raise ValueError("sampling a batch needs one seed per prompt")
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list = [None] * len(prompts)
        for start in range(0, len(order), max(1, batch_size)):
            chunk = order[start:start + max(1, batch_size)]
            sampling = None if greedy else (temperature, top_k, [seeds[i] for i in chunk])
            rows = self._generate_rows([prompts[i] for i in chunk], max_new_tokens, stop_at_eos,
                                       sampling)
            for i, row in zip(chunk, rows):
                out[i] = row
        return out

    def _generate_rows(self, prompts, max_new_tokens: int, stop_at_eos: bool,
                       sampling: Optional[tuple] = None) -> list:
        """One batch of `generate_batch` (sampling: None for greedy, else (temperature, top_k,
        seeds)); one prompt at a time unless a subclass batches."""
        if sampling is None:
            return [self.generate(p, max_new_tokens, greedy=True, stop_at_eos=stop_at_eos)
                    for p in prompts]
        temperature, top_k, seeds = sampling
        return [self.generate(p, max_new_tokens, greedy=False, temperature=temperature,
                              top_k=top_k, seed=seed, stop_at_eos=stop_at_eos)
                for p, seed in zip(prompts, seeds)]


class PonderLMModel(InferenceModel):
    """A TP=1 `PonderLM` in this process (`self.model`, `self.tok`, `self.device`)."""

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([i for i in ids if i < self.vocab_rows])

    def _set_prefill(self, mode: str) -> None:
        self.model.thoughts_cfg.prefill = mode

    @torch.no_grad()
    @varying_shape_method
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        if self.thoughts:  # through a cache: the prompt's thoughts as thoughts.prefill says
            return self.model(ids.to(self.device), caches=self.model.new_caches(),
                              gather_logits=True).float()
        if not self.adaptive:
            return self.model(ids.to(self.device), gather_logits=True).float()
        logits, exits = self.model(ids.to(self.device), gather_logits=True, halt_q=self.halt_q,
                                   return_exits=True)
        seen = self.passes_seen or [0, 0]
        self.passes_seen = [seen[0] + int(exits.sum()) + exits.numel(), seen[1] + exits.numel()]
        return logits.float()

    def _check_speculative(self, d: int, n: int) -> None:
        problem = speculative_problem(self.model, d, n, halt_q=self.halt_q)
        if problem:
            raise ValueError(problem)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def generate(self, prompt, max_new_tokens, greedy=True, temperature=1.0, top_k=0, seed=0,
                 stop_at_eos=True):
        self.last_passes = []
        if self.speculative is not None:  # every token takes the K+1 passes
            sampling = None if greedy else (temperature, top_k, [seed])
            new = self._generate_rows([prompt], max_new_tokens, stop_at_eos, sampling)[0]
            self.last_passes = [self.ponder_steps + 1] * len(new)
            return new
        return generate_cached(self.model, prompt, max_new_tokens, vocab_rows=self.vocab_rows,
                               eos_id=self.eos_id if stop_at_eos else None, greedy=greedy,
                               temperature=temperature, top_k=top_k,
                               generator=self._generator(seed), halt_q=self.halt_q,
                               passes=self.last_passes)

    def _generate_rows(self, prompts, max_new_tokens, stop_at_eos, sampling=None):
        temperature, top_k, seeds = sampling or (1.0, 0, None)
        if self.speculative is not None:
            return generate_speculative_batch(
                self.model, prompts, max_new_tokens, *self.speculative,
                vocab_rows=self.vocab_rows, eos_id=self.eos_id if stop_at_eos else None,
                greedy=sampling is None, temperature=temperature, top_k=top_k,
                halt_q=self.halt_q, stats=self.speculative_stats,
                generators=None if seeds is None else [self._generator(s) for s in seeds])
        return generate_cached_batch(
            self.model, prompts, max_new_tokens, vocab_rows=self.vocab_rows,
            eos_id=self.eos_id if stop_at_eos else None, greedy=sampling is None,
            temperature=temperature, top_k=top_k, halt_q=self.halt_q,
            generators=None if seeds is None else [self._generator(s) for s in seeds])


class NativeModel(PonderLMModel):
    """A training checkpoint, rebuilt as a TP=1 `PonderLM` in one process (CPU or CUDA)."""

    kind = "native"

    def __init__(self, ckpt_dir: str, tag: Optional[str] = None, device: str = "auto",
                 unsafe_unpickle: bool = False):
        from ..export.native import read_checkpoint
        from ..export.to_hf import pause_fields
        from ..models import PonderLM, init_single_process
        from ..tokenizer import load_tokenizer

        init_single_process()
        cfg, full, self.tag = read_checkpoint(ckpt_dir, tag, unsafe_unpickle=unsafe_unpickle)
        cfg.parallel.tp, cfg.model.activation_checkpointing = 1, "none"
        self.cfg, self.device = cfg, torch.device(resolve_device(device))
        self.model = PonderLM(cfg.model, cfg.ponder, thoughts=cfg.thoughts,
                              pause=cfg.pause).eval()
        _check_native_weights(self.model, full, ckpt_dir, self.tag)
        self.model.load_state_dict(full, strict=False)  # strict but for _extra_state
        self.model.to(self.device)
        self.tok = load_tokenizer(cfg.data.tokenizer)
        self.eos_id, self.vocab_rows = self.tok.eod_id, self.tok.vocab_size
        pf = pause_fields(cfg)
        self.pause_id, self.default_pauses = pf.get("pause_token_id"), pf.get("default_pauses", 0)
        self.max_len, self.ponder_steps = cfg.model.max_seq_len, cfg.ponder.steps
        self.adaptive = self.model.halting is not None
        self.halt_q = cfg.ponder.halting.q if self.adaptive else None
        self.thoughts = cfg.thoughts.count



def _check_native_weights(model, full: dict, ckpt_dir: str, tag: str) -> None:
    """The checkpoint's tensors against the model its run_config.yaml builds:
    WeightsMismatchError naming the files, keys and the config key to fix."""
    from ..weights.files import checkpoint_dir, run_config_path
    from ..weights.mismatch import check_weights
    from ..weights.native import model_files

    ckpt_dir = checkpoint_dir(ckpt_dir)  # a run directory: its checkpoints/, as read_checkpoint
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not k.endswith("_extra_state")}
    c = model.cfg
    check_weights(expected, {k: tuple(v.shape) for k, v in full.items()},
                  weights=model_files(ckpt_dir, tag), config=run_config_path(ckpt_dir),
                  layer_key="model.num_layers",
                  sizes={"model.hidden_size": c.hidden_size, "model.ffn_hidden_size": c.ffn_size,
                         "model.vocab_size": c.vocab_size, "model.max_seq_len": c.max_seq_len},
                  fix="point --model at the checkpoint.dir that wrote these weights")


class _DropLoadReport(logging.Filter):
    """transformers' table of missing / unexpected / reshaped keys: check_loading_info says
    the same in the error that follows it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


class HFModel(InferenceModel):
    """An HF directory from `ponder-pt convert to-hf` (or any GPT-NeoX / LLaMA HF model)."""

    kind = "hf"

    def __init__(self, path: str, device: str = "auto", trust_remote_code: bool = False):
        """Pondering exports load with ponder-pt's own classes; code from the directory runs
        only with trust_remote_code (`--trust-remote-code`), see ponder_pt.export.hf_auto.
        Weights that do not match config.json (missing, unexpected or reshaped tensors) are
        refused, stock classes too: WeightsMismatchError, a ValueError naming files and keys."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..export.hf_auto import from_pretrained
        from ..export.templates.modeling_ponder import check_loading_info

        self.device = torch.device(resolve_device(device))
        # mismatched shapes come back in the loading info (else transformers raises a bare
        # RuntimeError pointing at a log table)
        log, quiet = logging.getLogger("transformers.modeling_utils"), _DropLoadReport()
        log.addFilter(quiet)
        try:
            model, info = from_pretrained(AutoModelForCausalLM, path, trust_remote_code,
                                          dtype=torch.float32, output_loading_info=True,
                                          ignore_mismatched_sizes=True)
        finally:
            log.removeFilter(quiet)
        check_loading_info(path, info, model)
        self.model = model.to(self.device).eval()
        self.tok = from_pretrained(AutoTokenizer, path, trust_remote_code)
        c = self.model.config
        self.eos_id = c.eos_token_id if c.eos_token_id is not None else self.tok.eos_token_id
        self.pause_id = getattr(c, "pause_token_id", None)
        self.default_pauses = int(getattr(c, "default_pauses", 0) or 0)
        self.vocab_rows = len(self.tok)
        if self.pause_id is not None and self.pause_id < self.vocab_rows:
            self.vocab_rows = self.pause_id  # <pause> was added to the tokenizer: never emit it
        self.max_len = c.max_position_embeddings
        self.ponder_steps = int(getattr(c, "ponder_steps", 0) or 0)
        self.adaptive = (self.ponder_steps > 0
                         and (getattr(c, "ponder_halting", None) or "off") != "off")
        self.halt_q = float(c.ponder_halt_q) if self.adaptive else None
        self.thoughts = int(getattr(c, "thought_count", 0) or 0)

    def _halt_kwargs(self) -> dict:
        return {"halt_q": self.halt_q} if self.adaptive else {}

    def _passes_hook(self, passes: list):
        """Collect, per forward of generate(), the passes its last position took."""
        def hook(module, args, output):
            passes.append((module.halt_exits[:, -1] + 1).tolist())
        return self.model.register_forward_hook(hook)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([i for i in ids if i < self.vocab_rows])

    @torch.no_grad()
    @varying_shape_method
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids.to(self.device), use_cache=False, **self._halt_kwargs())
        if self.adaptive and hasattr(self.model, "halt_exits") and self.halt_q < 1.0:
            exits = self.model.halt_exits
            seen = self.passes_seen or [0, 0]
            self.passes_seen = [seen[0] + int(exits.sum()) + exits.numel(),
                                seen[1] + exits.numel()]
        return out.logits.float()

    def _suppressed(self) -> Optional[list]:
        """Ids generate() must never emit: padded rows beyond the tokenizer, <pause> too."""
        return list(range(self.vocab_rows, self.model.config.vocab_size)) or None

    @torch.no_grad()
    @varying_shape_method  # HF's caches grow a column per token
    def generate(self, prompt, max_new_tokens, greedy=True, temperature=1.0, top_k=0, seed=0,
                 stop_at_eos=True):
        torch.manual_seed(seed)
        ids = torch.tensor([list(prompt)], device=self.device)
        kw = dict(do_sample=not greedy, max_new_tokens=max_new_tokens,
                  suppress_tokens=self._suppressed(),
                  attention_mask=torch.ones_like(ids), pad_token_id=self.eos_id,
                  eos_token_id=self.eos_id if stop_at_eos else None)
        if not greedy:
            kw.update(temperature=temperature, top_k=top_k or None)
        steps: list = []
        early = self.adaptive and self.halt_q < 1.0  # q = 1: every pass, no exits to record
        hook = self._passes_hook(steps) if early else None
        try:
            out = self.model.generate(ids, **kw, **self._halt_kwargs())
        finally:
            if hook is not None:
                hook.remove()
        new = out[0, ids.shape[1]:].tolist()
        if self.adaptive:
            self.last_passes = ([row[0] if row else self.ponder_steps + 1
                                 for row in steps[:len(new)]] if early
                                else [self.ponder_steps + 1] * len(new))
        return new

    @torch.no_grad()
    @varying_shape_method
    def _generate_rows(self, prompts, max_new_tokens, stop_at_eos, sampling=None):
        if sampling is not None:  # one seed per prompt: HF samples a batch from one generator
            return super()._generate_rows(prompts, max_new_tokens, stop_at_eos, sampling)
        width = max(len(p) for p in prompts)
        pad = self.eos_id if self.eos_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts],
                           device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=self.device)
        eos = self.eos_id if stop_at_eos else None
        out = self.model.generate(ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=max_new_tokens, pad_token_id=pad,
                                  suppress_tokens=self._suppressed(),
                                  eos_token_id=eos, **self._halt_kwargs())
        new = out[:, width:].tolist()  # finished rows are padded with `pad` (= EOS) after it
        return [r[:r.index(eos) + 1] if eos is not None and eos in r else r for r in new]


def is_hf_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json"))


def load_model(path: str, device: str = "auto", tag: Optional[str] = None,
               trust_remote_code: bool = False, unsafe_unpickle: bool = False
               ) -> InferenceModel:
    """A native checkpoint dir (with run_config.yaml) or an HF directory. Nothing executable
    in them runs unless asked: trust_remote_code (HF dirs), unsafe_unpickle (checkpoints).
    device: "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N"."""
    if is_hf_dir(path):
        return HFModel(path, device, trust_remote_code)
    return NativeModel(path, tag, device, unsafe_unpickle)
