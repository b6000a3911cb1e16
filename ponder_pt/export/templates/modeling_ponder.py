"""PonderingLM for transformers: GPT-NeoX / LLaMA / GPT-2 with K continuous-space pondering
steps.

Written into the export directory by `ponder-pt convert to-hf`; needs only torch and
transformers. Weights and names are the stock model's (`gpt_neox.*` / `model.*` /
`transformer.*`, `lm_head`).

Forward (K = config.ponder_steps, s = sqrt(hidden) if ponder_scale_embeds else 1):
    e_0 = W_in[x] * s (* K if ponder_scale_initial_by_steps)
    for k = 1..K: h = transformer(e_{k-1}); p = softmax(h W_out^T) (top-k renormalised if
                  ponder_top_k > 0); e_k = e_{k-1} + s * p W_in
    logits = transformer(e_K) W_out^T
ponder_feedback="hidden" (the looped baseline) instead feeds back the final-norm hidden state
of each extra pass, unscaled: e_k = e_{k-1} + h_k (h_k = the backbone's last_hidden_state).
Pass k at position t attends only to pass-k keys/values of positions <= t, so generation
keeps K+1 KV caches, one per pass: the cache `generate()` hands in is the last pass's, and it
carries the K others as `cache.ponder_passes`. Each new token costs K+1 one-token forwards.
Attention masks (left padding) and position ids are applied identically in every pass.
GPT-2: the backbone (GPT2Model) adds its learned positions `wpe` to the inputs_embeds of every
pass; e_k holds token embeddings only (ponder-pt trains it the same way).

Adaptive pondering (config.ponder_halting "palbert" / "pondernet"): after pass k a halting
head `ponder_halting` gives lambda_k = sigmoid(w . h_k + b) (palbert: w . [h_k ; lambda_{k-1}]);
a token exits after the first pass where prod_{j<=k} (1 - lambda_j) <= 1 - q (Q-exit, q =
config.ponder_halt_q, or `halt_q=` given to forward / generate; q >= 1: fixed-K pondering) and
its logits are that pass's. Later passes read an exited token's keys/values of its exit pass:
the token's passes are skipped and its cache columns in later passes are copies. Positions are
run one at a time (a prompt of n tokens costs n one-token steps), which is what makes the
frozen keys/values exact without touching the backbone's attention.

Latent thoughts (config.thought_count M > 0, ponder_steps 0; PonderLM-2): after every token
the model writes M thoughts, each the backbone's last hidden state (final-norm) at the slot
before, in the interleaved layout [x_t, z_t^1..z_t^M], every slot at the token's position id;
the logits of a token are those of its last slot. Token embeddings are scaled by
sqrt(2.5 * hidden) (thought_scale_embeds). This class computes the thoughts exactly: per
position, M+1 one-slot forwards through one cache that holds M+1 columns per token (a prompt
of n tokens costs n (M+1) one-slot steps). generate()'s token-level attention mask is widened
to the slots, and position ids come from it (left padding) when none are given.

Every-token pauses (config.pause_every_token M > 0; PonderLM-2's pause baseline): the same
layout with M `<pause>` slots (pause_token_id's embedding) after every token, unscaled; their
inputs are known, so a call runs all its slots in one forward.

Cache naming differs across the supported transformers: up to 5.23 generate() hands the cache
to forward as `past_key_values` and reads it back from `output.past_key_values`; from 5.24 both
are called `cache` (the old name still works with a deprecation warning). forward accepts
either, and speaks the installed version's name to the backbone and in its output. The model
refuses to load under a transformers outside the range recorded at export
(`config.ponder_transformers`, see configuration_ponder.check_transformers_version).

from_pretrained refuses weights that do not match config.json (WeightsMismatchError): tensors
the config describes that the weights lack (transformers would initialise them at random),
tensors it has no place for, and tensors of another shape (unless ignore_mismatched_sizes=True
is passed). transformers' loading info already leaves out non-persistent buffers (rotary
inv_freq), tied output weights and the class's _keys_to_ignore_on_load_* patterns.
"""

import collections
import dataclasses
import functools
import inspect
import math
import os
import re

import torch
from torch import nn
from transformers import DynamicCache, GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_ponder import (PonderGPT2Config, PonderGPTNeoXConfig, PonderLlamaConfig,
                                   check_transformers_version, config_error_at, config_file)

# the output field holding the cache: `cache` from transformers 5.24, `past_key_values` before
_OUT_CACHE = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
              else "past_key_values")


@functools.lru_cache(maxsize=None)
def _cache_arg(backbone_cls) -> str:
    """The keyword the backbone's forward takes its cache by (`cache` or `past_key_values`).
    inspect follows the deprecation wrapper (functools.wraps) to the real signature."""
    params = inspect.signature(backbone_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class WeightsMismatchError(ValueError):
    """An export's weights do not match its config.json."""


REEXPORT = "re-export the checkpoint with `ponder-pt convert to-hf`"
_SHOWN = 3  # keys named per kind of problem; the rest are counted
_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
# a buffer older GPT-2 checkpoints saved that transformers' ignore patterns do not name
_OLD_BUFFER = re.compile(r"\.attn\.masked_bias$")
# config.json keys that size tensors (GPT-2 spells them n_*), for naming the one to fix
_SIZE_KEYS = ("vocab_size", "hidden_size", "n_embd", "intermediate_size", "n_inner",
              "max_position_embeddings", "n_positions")


def weights_file(name_or_path) -> str:
    """The weights file from_pretrained(name_or_path) reads (sharded: its index)."""
    name_or_path = os.fspath(name_or_path)
    if not os.path.isdir(name_or_path):
        return f"{name_or_path} (model.safetensors)"
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        if os.path.exists(os.path.join(name_or_path, name)):
            return os.path.join(name_or_path, name)
    return os.path.join(name_or_path, "model.safetensors")


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _some(keys) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def _dims(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _tensors(n: int) -> str:
    return f"{n} tensor{'s' if n != 1 else ''}"


def _layer(key: str):
    m = _LAYER.search(key)
    return int(m.group(1)) if m else None


def _layers_held(missing, unexpected, model_keys, configured: int):
    """How many layers the weights hold when the only difference is whole layers at the end
    (config.json's layer count is off), else None."""
    per_layer = collections.Counter(_layer(k) for k in model_keys)[0]
    keys = missing or unexpected
    if not per_layer or (missing and unexpected) or any(_layer(k) is None for k in keys):
        return None
    counts = collections.Counter(_layer(k) for k in keys)
    if any(n != per_layer for n in counts.values()):
        return None
    if missing:
        held = min(counts)
        return held if set(counts) == set(range(held, configured)) else None
    held = max(counts) + 1
    return held if set(counts) == set(range(configured, held)) else None


def _what_to_fix(config, missing, unexpected, mismatched, model_keys) -> str:
    if config is None:
        return f"{REEXPORT[0].upper()}{REEXPORT[1:]}."
    layer_key = "n_layer" if getattr(config, "model_type", "").endswith("gpt2") \
        else "num_hidden_layers"
    configured = getattr(config, "num_hidden_layers", None)
    if not mismatched and isinstance(configured, int):
        held = _layers_held(missing, unexpected, model_keys, configured)
        if held is not None:
            return (f"config.json's {layer_key} is {configured} but the weights hold {held} "
                    f"layers: set config.json's {layer_key} to {held}, or {REEXPORT}.")
    sizes = config.to_dict()
    for key, found, wanted in mismatched:
        if len(found) != len(wanted):
            continue
        for have, want in zip(found, wanted):
            keys = [k for k in _SIZE_KEYS if have != want and sizes.get(k) == want]
            if keys:
                return (f"config.json's {keys[0]} is {want} but the weights have {have} there "
                        f"({key}): fix config.json's key {keys[0]}, or {REEXPORT}.")
    return f"Fix config.json to describe these weights, or {REEXPORT}."


def check_loading_info(name_or_path, info: dict, model=None, allow_mismatched: bool = False
                       ) -> None:
    """Raise WeightsMismatchError when from_pretrained's loading info (output_loading_info=
    True) shows weights that do not match config.json: missing, unexpected or (unless
    allow_mismatched) mismatched keys. Names the files, the first keys and what to fix."""
    missing = sorted(info.get("missing_keys") or (), key=_natural)
    unexpected = sorted((k for k in info.get("unexpected_keys") or ()
                         if not _OLD_BUFFER.search(k)), key=_natural)
    mismatched = [] if allow_mismatched else sorted(
        ((k, tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys") or ()),
        key=lambda m: _natural(m[0]))
    if not (missing or unexpected or mismatched):
        return
    found = []
    if missing:
        found.append(f"{_tensors(len(missing))} that config.json describes "
                     f"{'are' if len(missing) > 1 else 'is'} missing from the weights "
                     f"({_some(missing)})")
    if unexpected:
        found.append(f"{_tensors(len(unexpected))} in the weights "
                     f"{'have' if len(unexpected) > 1 else 'has'} no place in the model "
                     f"config.json describes ({_some(unexpected)})")
    if mismatched:
        shapes = [f"{k} {_dims(a)} vs {_dims(b)}" for k, a, b in mismatched]
        found.append(f"{_tensors(len(mismatched))} of the wrong shape (the weights' vs "
                     f"config.json's: {_some(shapes)})")
    config = getattr(model, "config", None)
    model_keys = list(model.state_dict()) if model is not None else []
    raise WeightsMismatchError(
        f"{weights_file(name_or_path)} does not match {config_file(name_or_path)}: "
        f"{'; '.join(found)}. "
        f"{_what_to_fix(config, missing, unexpected, mismatched, model_keys)}")


def _ponder_caches(past_key_values, steps, use_cache):
    """K+1 caches: (pass 1..K caches carried on the last pass's cache, the last one)."""
    if not use_cache:
        return [None] * (steps + 1), None
    main = past_key_values if past_key_values is not None else DynamicCache()
    passes = getattr(main, "ponder_passes", None)
    if passes is None:
        if main.get_seq_length() > 0:
            raise ValueError("this cache was not produced by a pondering model: it lacks the "
                             "caches of the pondering passes")
        passes = [DynamicCache() for _ in range(steps)]
        main.ponder_passes = passes
    if len(passes) != steps:
        raise ValueError(f"cache holds {len(passes)} pondering passes, model has {steps}")
    return list(passes) + [main], main


def _append_last(cache, source, rows=None):
    """Write `source`'s newest column into `cache` for every layer: appended (a skipped
    pass), or with `rows` [b] bool over the column the pass just wrote (exited rows only)."""
    for index, layer in enumerate(source.layers):
        k, v = layer.keys[:, :, -1:], layer.values[:, :, -1:]
        if rows is None:
            cache.update(k.clone(), v.clone(), index)
            continue
        mine = cache.layers[index]
        sel = rows[:, None, None, None]
        mine.keys[:, :, -1:] = torch.where(sel, k, mine.keys[:, :, -1:])
        mine.values[:, :, -1:] = torch.where(sel, v, mine.values[:, :, -1:])


class _PonderMixin:
    def __init__(self, config, *args, **kwargs):
        check_transformers_version(config)
        super().__init__(config, *args, **kwargs)
        mode = self._halting()
        if mode != "off":  # adaptive pondering's halting head (weights from the export)
            self.ponder_halting = nn.Linear(config.hidden_size + (mode == "palbert"), 1)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' from_pretrained, refusing weights that do not match config.json
        (see the module docstring) and naming config.json on a bad value in it."""
        want_info = kwargs.pop("output_loading_info", False)
        allow_mismatched = bool(kwargs.get("ignore_mismatched_sizes", False))
        kwargs["ignore_mismatched_sizes"] = True  # shape mismatches come back in the info
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args,
                                                  output_loading_info=True, **kwargs)
        except Exception as exc:
            named = config_error_at(exc, pretrained_model_name_or_path)
            if named is None:
                raise
            raise named from None
        check_loading_info(pretrained_model_name_or_path, info, model, allow_mismatched)
        return (model, info) if want_info else model

    def _halting(self):
        mode = getattr(self.config, "ponder_halting", None) or "off"
        if mode not in ("off", "pondernet", "palbert"):
            raise ValueError(f"config.ponder_halting={mode!r}: expected off, pondernet or palbert")
        return mode

    def _lambda(self, hidden, previous):
        """lambda [b, n] (float32) from the pass's last hidden state [b, n, h]."""
        x = hidden
        if self._halting() == "palbert":
            prev = (torch.zeros(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
                    if previous is None else previous.to(hidden.dtype))
            x = torch.cat([hidden, prev.unsqueeze(-1)], dim=-1)
        return torch.sigmoid(self.ponder_halting(x).squeeze(-1).float())

    def _backbone(self):
        return getattr(self, self.base_model_prefix)

    def _ponder_settings(self):
        c = self.config
        steps = int(getattr(c, "ponder_steps", 0) or 0)
        scale = math.sqrt(c.hidden_size) if getattr(c, "ponder_scale_embeds", True) else 1.0
        first = scale * (steps if getattr(c, "ponder_scale_initial_by_steps", False) else 1)
        return steps, scale, first, int(getattr(c, "ponder_top_k", 0) or 0)

    def _feedback(self):
        feedback = getattr(self.config, "ponder_feedback", None) or "embedding"
        if feedback not in ("embedding", "hidden"):
            raise ValueError(f"config.ponder_feedback={feedback!r}: expected embedding or hidden")
        return feedback

    def _probs(self, logits, top_k):
        z = logits.float()
        if top_k > 0:
            vals, idx = z.topk(top_k, dim=-1)
            return torch.zeros_like(z).scatter(-1, idx, torch.softmax(vals, dim=-1))
        return torch.softmax(z, dim=-1)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                inputs_embeds=None, past_key_values=None, labels=None, use_cache=None,
                logits_to_keep=0, cache=None, halt_q=None, **kwargs):
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
        past = cache if cache is not None else past_key_values
        if sum(self._slots()) > 0:  # latent thoughts or every-token pauses
            use_cache = self.config.use_cache if use_cache is None else use_cache
            main = past if past is not None else DynamicCache()
            logits = self._slotted(input_ids, inputs_embeds, attention_mask, position_ids,
                                   main, kwargs)
            return self._output(logits, labels, logits_to_keep, main if use_cache else None)
        steps, scale, first, top_k = self._ponder_settings()
        feedback = self._feedback()
        w_in = self.get_input_embeddings().weight
        if inputs_embeds is None:
            e = self.get_input_embeddings()(input_ids)
            if steps > 0:
                e = e * first
        else:
            e = inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        q = float(getattr(self.config, "ponder_halt_q", 0.5) if halt_q is None else halt_q)
        adaptive = steps > 0 and self._halting() != "off" and q < 1.0
        caches, main = _ponder_caches(past, steps, use_cache or adaptive)
        head = self.get_output_embeddings()
        kwargs.pop("return_dict", None)
        backbone = self._backbone()
        cache_arg = _cache_arg(type(backbone))
        if adaptive:
            logits = self._adaptive(e, attention_mask, position_ids, caches, q, kwargs)
            return self._output(logits, labels, logits_to_keep, main if use_cache else None)
        for k in range(steps + 1):
            out = backbone(inputs_embeds=e, attention_mask=attention_mask,
                           position_ids=position_ids, use_cache=use_cache, return_dict=True,
                           **{cache_arg: caches[k]}, **kwargs)
            hidden = out.last_hidden_state
            if k < steps and feedback == "hidden":
                e = e + hidden.to(e.dtype)
            elif k < steps:
                probs = self._probs(head(hidden), top_k)
                e = e + scale * torch.matmul(probs.to(w_in.dtype), w_in)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{_OUT_CACHE: main if use_cache else None})


    def _output(self, logits, labels, logits_to_keep, cache):
        """The output of logits [b, n, V] computed position by position: the kept ones, the
        loss against labels, the cache."""
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = logits[:, keep, :]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_OUT_CACHE: cache})

    def _adaptive(self, e, attention_mask, position_ids, caches, q, kwargs):
        """Adaptive pondering over positions one at a time (see the module docstring):
        logits [b, n, V] of each token's exit pass. `caches` (K+1) continue after their
        filled columns, like generate()'s; `halt_exits` [b, n] (exit passes) is left on self
        for whoever wants to know how many passes each token took."""
        steps, scale, _, top_k = self._ponder_settings()
        feedback = self._feedback()
        w_in = self.get_input_embeddings().weight
        head, backbone = self.get_output_embeddings(), self._backbone()
        cache_arg = _cache_arg(type(backbone))
        past = caches[0].get_seq_length()
        cache_position = kwargs.pop("cache_position", None)
        b, n = e.shape[:2]
        outs, all_exits = [], []
        for t in range(n):
            extra = dict(kwargs)
            if cache_position is not None:
                extra["cache_position"] = cache_position[t:t + 1]
            mask = None if attention_mask is None else attention_mask[:, :past + t + 1]
            pos = None if position_ids is None else position_ids[:, t:t + 1]
            x = e[:, t:t + 1]
            picked, previous, survive = None, None, None
            exited = torch.zeros(b, dtype=torch.bool, device=e.device)
            exits = torch.full((b,), steps, dtype=torch.long, device=e.device)
            for k in range(steps + 1):
                if k > 0 and bool(exited.all()):
                    for j in range(k, steps + 1):  # skipped: the frozen columns
                        _append_last(caches[j], caches[j - 1])
                    break
                out = backbone(inputs_embeds=x, attention_mask=mask, position_ids=pos,
                               use_cache=True, return_dict=True, **{cache_arg: caches[k]},
                               **extra)
                if k > 0 and bool(exited.any()):  # exited rows keep their frozen keys/values
                    _append_last(caches[k], caches[k - 1], exited)
                hidden = out.last_hidden_state
                logits = head(hidden)
                picked = (logits if picked is None
                          else torch.where(exited[:, None, None], picked, logits))
                if k == steps:
                    break
                lam = self._lambda(hidden, previous)
                previous = lam
                survive = (1.0 - lam[:, 0]) * (1.0 if survive is None else survive)
                now = survive <= 1.0 - q
                exits = torch.where(now & ~exited, k, exits)
                exited = exited | now
                if feedback == "hidden":
                    x = x + hidden.to(x.dtype)
                else:
                    probs = self._probs(logits, top_k)
                    x = x + scale * torch.matmul(probs.to(w_in.dtype), w_in)
            outs.append(picked)
            all_exits.append(exits)
        self.halt_exits = torch.stack(all_exits, dim=1)
        return torch.cat(outs, dim=1)


    def _slots(self):
        """(latent thoughts M, every-token pauses M) of the config; at most one is > 0."""
        return (int(getattr(self.config, "thought_count", 0) or 0),
                int(getattr(self.config, "pause_every_token", 0) or 0))

    def _slotted(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, kwargs):
        """Latent thoughts, exactly, or every-token pauses (see the module docstring): logits
        [b, n, V] of each token's last slot, continuing after the slots `cache` holds."""
        count, pauses = self._slots()
        slots = count + pauses + 1
        if inputs_embeds is None:
            e = self.get_input_embeddings()(input_ids)
            if count and getattr(self.config, "thought_scale_embeds", True):
                e = e * math.sqrt(2.5 * self.config.hidden_size)
        else:
            e = inputs_embeds
        b, n = e.shape[:2]
        columns = cache.get_seq_length()
        if columns % slots:
            raise ValueError(f"this cache holds {columns} columns, not {slots} per token: it "
                             "was not produced by this model")
        past = columns // slots
        if position_ids is None:
            if attention_mask is not None:  # left padding: each row counts its own tokens
                counted = attention_mask.long().cumsum(-1) - 1
                position_ids = counted.clamp(min=0)[:, -n:]
            else:
                position_ids = torch.arange(past, past + n, device=e.device).expand(b, n)
        mask = (None if attention_mask is None
                else attention_mask.repeat_interleave(slots, dim=1))  # token -> slot columns
        backbone = self._backbone()
        cache_arg = _cache_arg(type(backbone))
        kwargs = {k: v for k, v in kwargs.items()  # set per slot below
                  if k not in ("cache_position", "return_dict", "use_cache")}
        head, outs = self.get_output_embeddings(), []
        if pauses:  # every slot's input is known: one forward over all of them
            ids = torch.full((b, 1), self.config.pause_token_id, device=e.device)
            pause = self.get_input_embeddings()(ids).to(e.dtype)
            x = torch.stack([e] + [pause.expand_as(e)] * pauses, dim=2).flatten(1, 2)
            out = backbone(inputs_embeds=x,
                           attention_mask=None if mask is None else mask[:, :columns + n * slots],
                           position_ids=position_ids.repeat_interleave(slots, dim=1),
                           use_cache=True, return_dict=True,
                           cache_position=torch.arange(columns, columns + n * slots,
                                                       device=e.device),
                           **{cache_arg: cache}, **kwargs)
            return head(out.last_hidden_state[:, slots - 1::slots])
        for t in range(n):
            x = e[:, t:t + 1]
            for _ in range(slots):
                col = cache.get_seq_length()
                out = backbone(inputs_embeds=x,
                               attention_mask=None if mask is None else mask[:, :col + 1],
                               position_ids=position_ids[:, t:t + 1], use_cache=True,
                               cache_position=torch.tensor([col], device=e.device),
                               return_dict=True, **{cache_arg: cache}, **kwargs)
                x = out.last_hidden_state
            outs.append(head(x))
        return torch.cat(outs, dim=1)


class PonderGPTNeoXForCausalLM(_PonderMixin, GPTNeoXForCausalLM):
    config_class = PonderGPTNeoXConfig


class PonderLlamaForCausalLM(_PonderMixin, LlamaForCausalLM):
    config_class = PonderLlamaConfig


class PonderGPT2ForCausalLM(_PonderMixin, GPT2LMHeadModel):
    config_class = PonderGPT2Config
