"""Layer-by-layer execution of Hugging Face backbones, for early exit.

An exit rule needs the pooled hidden state after every layer and must be able to stop
computing for samples that have exited. Hugging Face models run all layers in one call, so
this module re-runs their forward in pieces, calling the model's own modules exactly as its
forward does (transformers 5.x):

    state = backbone.start(input_ids, attention_mask)    # embeddings (+ pondering passes)
    for i in range(backbone.num_layers):
        state = backbone.layer(i, state)
        pooled = backbone.pooled(state)                   # [B, hidden_size]
        ...
        state = backbone.select(state, still_running)     # drop exited rows

Pooled vector: encoders (ALBERT, BERT, RoBERTa) take the model's pooler (dense + tanh) on the
first ([CLS]) token; decoders (GPT-NeoX, LLaMA, GPT-2) take the final norm of the last non-pad
token.

Pondering decoders (ponder-pt's remote-code exports, config.ponder_steps = K > 0) run the K
full pondering passes inside `start()` to build e_K; the layer-by-layer pass then runs on e_K,
so the exit happens inside the final pass. K = 0 behaves exactly like a stock decoder.

Masks (`masking_utils.create_*_mask`) and rotary embeddings (`model.rotary_emb`; GPT-2: its
learned `wpe` added to the embeddings) come from transformers itself and follow
config._attn_implementation, which is forced to eager or sdpa.
"""

from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

ENCODERS = ("albert", "bert", "roberta")
DECODERS = ("gpt_neox", "llama", "gpt2")
# model_type -> kind; the ponder_* types are our remote-code exports (`ponder-pt convert to-hf`)
MODEL_TYPES = {"albert": "albert", "bert": "bert", "roberta": "roberta",
               "gpt_neox": "gpt_neox", "llama": "llama", "gpt2": "gpt2",
               "ponder_gpt_neox": "gpt_neox", "ponder_llama": "llama", "ponder_gpt2": "gpt2"}


def _kind_of(config, what: str) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{what}: model type {model_type!r} is not supported for early exit. Supported: "
            f"encoders {', '.join(ENCODERS)}; decoders {', '.join(DECODERS)} (stock, or "
            "ponder-pt pondering exports ponder_gpt_neox / ponder_llama / ponder_gpt2). Use a "
            "checkpoint of one of these types (e.g. albert-base-v2, bert-base-uncased, "
            "roberta-base, a Pythia, LLaMA or GPT-2 model, or the output of `ponder-pt convert "
            "to-hf`).")
    return MODEL_TYPES[model_type]


@dataclass
class LayerState:
    """Everything needed to run the next layer; every tensor is batch-first."""

    hidden: torch.Tensor          # [B, T, H] last layer output (embeddings before layer 0)
    attention_mask: torch.Tensor  # [B, T] the user's mask: 1 = token, 0 = pad
    extras: dict = field(default_factory=dict)  # per-architecture tensors (layer masks, rotary...)
    seq_dims: dict = field(default_factory=dict)  # extras key -> its sequence axes (select trims)


def _take(t, index: torch.Tensor, batch: int):
    if not torch.is_tensor(t):
        return t
    if t.shape[0] != batch:  # a broadcast leading dim: make it real before indexing
        t = t.expand(batch, *t.shape[1:])
    return t.index_select(0, index)


class LayerwiseBackbone(nn.Module, abc.ABC):
    """Base class: one subclass per architecture family implements start / layer / pooled.

    `self.model` is the Hugging Face module that owns every weight used (the base model for
    encoders, the causal LM for decoders so pondering can use its head); `save_pretrained`
    writes it as a normal HF directory that `load_backbone` reads back."""

    kind: str
    ponder_steps: int = 0

    def __init__(self, model, kind: str):
        super().__init__()
        self.model = model
        self.kind = kind
        cfg = model.config
        self.num_layers = int(cfg.num_hidden_layers)
        self.hidden_size = int(cfg.hidden_size)
        self.is_decoder = kind in DECODERS
        self.train(model.training)  # an nn.Module starts in train mode; follow the model

    @property
    def config(self):
        return self.model.config

    @property
    def base(self):
        """The bare transformer (BertModel, GPTNeoXModel, ...), whatever head it came with."""
        return self.model.base_model

    @property
    def ponder(self) -> bool:
        return self.ponder_steps > 0

    @property
    def max_positions(self):
        """The longest input the model can embed, when its positions are a learned table
        (longer inputs index past it and crash); None for rotary positions."""
        return None

    def save_pretrained(self, out_dir: str, **kwargs) -> None:
        self.model.save_pretrained(out_dir, **kwargs)

    # ------------------------------------------------------------------ per family

    @abc.abstractmethod
    def start(self, input_ids, attention_mask, token_type_ids=None) -> LayerState:
        """Embeddings (and, for pondering decoders, the K pondering passes): the input of
        layer 0."""

    @abc.abstractmethod
    def layer(self, i: int, state: LayerState) -> LayerState:
        """Apply layer i (0-based)."""

    @abc.abstractmethod
    def pooled(self, state: LayerState) -> torch.Tensor:
        """[B, hidden_size]: the vector the exit heads read after the last layer run."""

    # ------------------------------------------------------------------ shared

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> list[torch.Tensor]:
        """Pooled vectors after each layer 1..N: N tensors [B, hidden_size]."""
        state = self.start(input_ids, attention_mask, token_type_ids)
        out = []
        for i in range(self.num_layers):
            state = self.layer(i, state)
            out.append(self.pooled(state))
        return out

    @staticmethod
    def select(state: LayerState, index: torch.Tensor) -> LayerState:
        """Keep rows `index` (LongTensor, or a bool mask) of every batch-first tensor, then
        trim trailing columns that are padding in every kept row. Exact: no kept token attends
        to a pad key (masked, weight exactly 0) and pooling never reads those columns."""
        index = index.to(state.hidden.device)
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        batch = state.hidden.shape[0]
        hidden = state.hidden.index_select(0, index)
        mask = state.attention_mask.index_select(0, index)
        extras = {k: _take(v, index, batch) for k, v in state.extras.items()}
        used = mask.any(0).nonzero()
        width = int(used.max()) + 1 if used.numel() else 1
        if width < mask.shape[1]:
            hidden, mask = hidden[:, :width], mask[:, :width]
            for key, dims in state.seq_dims.items():
                t = extras.get(key)
                if torch.is_tensor(t):
                    for d in dims:
                        t = t.narrow(d, 0, min(width, t.shape[d]))
                    extras[key] = t
        return LayerState(hidden, mask, extras, dict(state.seq_dims))


# --------------------------------------------------------------------------- encoders


class EncoderBackbone(LayerwiseBackbone):
    """BERT / RoBERTa: embeddings (word + position + token type, LayerNorm), then
    encoder.layer[i](hidden, attention_mask=bidirectional 4-D mask); pooler on [CLS]."""

    def __init__(self, model, kind: str):
        super().__init__(model, kind)
        if getattr(self.config, "is_decoder", False):
            raise ValueError(f"{kind} with config.is_decoder=True is not supported: early exit "
                             "uses encoders bidirectionally; set is_decoder=False")
        self._ensure_pooler()

    def _ensure_pooler(self) -> None:
        """*ForMaskedLM models are built without a pooler: add a fresh one (it is fine-tuned
        with the exit heads) so the pooled vector is always pooler(hidden[:, 0])."""
        if self.base.pooler is not None:
            return
        from transformers.models.bert.modeling_bert import BertPooler  # == RobertaPooler

        warnings.warn(f"{type(self.model).__name__} has no pooler: using a freshly "
                      "initialised one (it is trained with the exit heads)", stacklevel=3)
        self.base.pooler = BertPooler(self.config)
        self._init_linear(self.base.pooler.dense)

    def _init_linear(self, lin: nn.Linear) -> None:
        ref = self.base.embeddings.word_embeddings.weight
        lin.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            lin.weight.normal_(0.0, self.config.initializer_range)
            lin.bias.zero_()

    @property
    def max_positions(self) -> int:
        emb = self.base.embeddings
        # RoBERTa numbers positions from padding_idx + 1
        offset = emb.padding_idx + 1 if self.kind == "roberta" else 0
        return emb.position_embeddings.num_embeddings - offset

    def _embed(self, input_ids, token_type_ids):
        # RoBERTa derives position ids from the pad id inside its embeddings: call them as is
        return self.base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def start(self, input_ids, attention_mask, token_type_ids=None) -> LayerState:
        from transformers.masking_utils import create_bidirectional_mask

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self._embed(input_ids, token_type_ids)
        layer_mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden,
                                               attention_mask=attention_mask)
        return LayerState(hidden, attention_mask, {"layer_mask": layer_mask},
                          {"layer_mask": (2, 3)})

    def _layer_module(self, i: int) -> nn.Module:
        return self.base.encoder.layer[i]

    def layer(self, i: int, state: LayerState) -> LayerState:
        hidden = self._layer_module(i)(state.hidden, attention_mask=state.extras["layer_mask"])
        return LayerState(hidden, state.attention_mask, state.extras, state.seq_dims)

    def pooled(self, state: LayerState) -> torch.Tensor:
        return self.base.pooler(state.hidden)  # BertPooler: tanh(dense(hidden[:, 0]))


class AlbertBackbone(EncoderBackbone):
    """ALBERT: embeddings (embedding_size) -> embedding_hidden_mapping_in (hidden_size); layer
    i applies the shared layer group int(i / (N / num_hidden_groups)), as AlbertTransformer."""

    def _ensure_pooler(self) -> None:
        if self.base.pooler is not None:
            return
        warnings.warn(f"{type(self.model).__name__} has no pooler: using a freshly "
                      "initialised one (it is trained with the exit heads)", stacklevel=3)
        self.base.pooler = nn.Linear(self.hidden_size, self.hidden_size)
        self.base.pooler_activation = nn.Tanh()
        self._init_linear(self.base.pooler)

    def _embed(self, input_ids, token_type_ids):
        hidden = self.base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        return self.base.encoder.embedding_hidden_mapping_in(hidden)

    def _layer_module(self, i: int) -> nn.Module:
        cfg = self.config
        group = int(i / (cfg.num_hidden_layers / cfg.num_hidden_groups))
        return self.base.encoder.albert_layer_groups[group]

    def pooled(self, state: LayerState) -> torch.Tensor:
        return self.base.pooler_activation(self.base.pooler(state.hidden[:, 0]))


# --------------------------------------------------------------------------- decoders


class DecoderBackbone(LayerwiseBackbone):
    """GPT-NeoX / LLaMA (stock or pondering): layers[i](hidden, attention_mask=causal 4-D
    mask, position_ids, position_embeddings=(cos, sin)); pooled = final norm of the last
    non-pad token."""

    def __init__(self, model, kind: str):
        super().__init__(model, kind)
        slotted = {key: int(getattr(self.config, key, 0) or 0)
                   for key in ("thought_count", "pause_every_token")}
        if any(slotted.values()):
            raise ValueError(
                f"early exit over the layers of a model with slots after every token "
                f"({', '.join(f'{k}={v}' for k, v in slotted.items() if v)}) is not supported: "
                "each layer's hidden states belong to M+1 slots per token, and the exit "
                "heads read one per token. Fine-tune it with `ponder-pt sft` instead")
        self.ponder_steps = int(getattr(self.config, "ponder_steps", 0) or 0)
        if self.ponder_steps and self.lm_head is None:
            raise ValueError("a pondering decoder needs its LM head: wrap the *ForCausalLM "
                             "model, not the bare backbone")

    @property
    def lm_head(self):
        return self.model.get_output_embeddings()

    @property
    def final_norm(self) -> nn.Module:
        name = {"gpt_neox": "final_layer_norm", "gpt2": "ln_f"}.get(self.kind, "norm")
        return getattr(self.base, name)

    def _ponder_inputs(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """e_K after the K full pondering passes (as the exported model's forward):
        e_0 = W_in[x]·first;  e_k = e_{k-1} + s·softmax(head(h_k)) W_in   (feedback "embedding")
                              e_k = e_{k-1} + h_k                            (feedback "hidden")
        with h_k the backbone's final-norm output of pass k."""
        m, emb = self.model, self.model.get_input_embeddings()
        e = emb(input_ids)
        if not self.ponder_steps:
            return e
        steps, scale, first, top_k = m._ponder_settings()
        feedback = (m._feedback() if hasattr(m, "_feedback")
                    else getattr(self.config, "ponder_feedback", None) or "embedding")
        if feedback not in ("embedding", "hidden"):
            raise ValueError(f"config.ponder_feedback={feedback!r}: expected embedding or hidden")
        e = e * first
        for _ in range(steps):
            h = self.base(inputs_embeds=e, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=False,
                          return_dict=True).last_hidden_state
            if feedback == "hidden":
                e = e + h.to(e.dtype)
            else:
                probs = m._probs(self.lm_head(h), top_k)
                e = e + scale * torch.matmul(probs.to(emb.weight.dtype), emb.weight)
        return e

    def start(self, input_ids, attention_mask, token_type_ids=None) -> LayerState:
        from transformers.masking_utils import create_causal_mask

        # token_type_ids mean nothing to a decoder and are ignored.
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Positions count real tokens (as generate() does), so left padding works too; with
        # right padding they equal the model's default arange for every real token.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        e = self._ponder_inputs(input_ids, attention_mask, position_ids)
        hidden = self.base.emb_dropout(e) if self.kind == "gpt_neox" else e
        # no cache, passed by position: transformers 5.24 renamed that parameter
        # (past_key_values -> cache), and the old keyword now warns
        layer_mask = create_causal_mask(self.config, hidden, attention_mask, None,
                                        position_ids=position_ids)
        cos, sin = self.base.rotary_emb(hidden, position_ids=position_ids)  # [B, T, rot]
        extras = {"layer_mask": layer_mask, "position_ids": position_ids, "cos": cos, "sin": sin}
        seq_dims = {"layer_mask": (2, 3), "position_ids": (1,), "cos": (1,), "sin": (1,)}
        return LayerState(hidden, attention_mask, extras, seq_dims)

    def layer(self, i: int, state: LayerState) -> LayerState:
        x = state.extras
        hidden = self.base.layers[i](state.hidden, attention_mask=x["layer_mask"],
                                     position_ids=x["position_ids"],
                                     position_embeddings=(x["cos"], x["sin"]))
        return LayerState(hidden, state.attention_mask, state.extras, state.seq_dims)

    def pooled(self, state: LayerState) -> torch.Tensor:
        mask = state.attention_mask
        cols = torch.arange(mask.shape[1], device=mask.device)
        last = (cols * (mask != 0)).argmax(-1)  # last real token, right or left padding
        rows = torch.arange(mask.shape[0], device=mask.device)
        return self.final_norm(state.hidden[rows, last])  # the norm is per token


class GPT2Backbone(DecoderBackbone):
    """GPT-2 (stock GPT2LMHeadModel or our pondering export): no rotary; the layer input is
    drop(e + wpe[position_ids]) as GPT2Model builds it (e = e_K for pondering exports, whose
    passes add wpe the same way), then h[i](hidden, attention_mask=causal 4-D mask)."""

    @property
    def max_positions(self) -> int:
        return self.base.wpe.num_embeddings  # config.n_positions

    def start(self, input_ids, attention_mask, token_type_ids=None) -> LayerState:
        from transformers.masking_utils import create_causal_mask

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        e = self._ponder_inputs(input_ids, attention_mask, position_ids)
        hidden = self.base.drop(e + self.base.wpe(position_ids).to(e.dtype))
        layer_mask = create_causal_mask(self.config, hidden, attention_mask, None,
                                        position_ids=position_ids)
        extras = {"layer_mask": layer_mask, "position_ids": position_ids}
        return LayerState(hidden, attention_mask, extras, {"layer_mask": (2, 3),
                                                           "position_ids": (1,)})

    def layer(self, i: int, state: LayerState) -> LayerState:
        x = state.extras
        hidden = self.base.h[i](state.hidden, attention_mask=x["layer_mask"],
                                position_ids=x["position_ids"])
        return LayerState(hidden, state.attention_mask, state.extras, state.seq_dims)


# --------------------------------------------------------------------------- entry points

_ADAPTERS = {"albert": AlbertBackbone, "bert": EncoderBackbone, "roberta": EncoderBackbone,
             "gpt_neox": DecoderBackbone, "llama": DecoderBackbone, "gpt2": GPT2Backbone}


def wrap_backbone(model) -> LayerwiseBackbone:
    """A LayerwiseBackbone over an already built HF model: Albert/Bert/RobertaModel (or any
    of their *For... models: only the base model is kept), GPTNeoX/Llama/GPT2 (*ForCausalLM /
    GPT2LMHeadModel keep the LM head) and our pondering remote-code classes. Attention is
    forced to sdpa unless it is eager already (the layer masks built here must match the attention kernel)."""
    kind = _kind_of(model.config, type(model).__name__)
    if model.config._attn_implementation not in ("eager", "sdpa"):
        model.set_attn_implementation("sdpa")
    if kind in ENCODERS:
        model = model.base_model  # MLM / classification heads are not used
    return _ADAPTERS[kind](model, kind)


def load_backbone(path_or_name: str, *, trust_remote_code: bool = False, dtype=None,
                  attn_implementation: str = "sdpa"):
    """(LayerwiseBackbone, tokenizer) from a HF directory or hub name.

    Encoders load with AutoModel (the pooler kept; freshly initialised, with a warning, when
    the checkpoint has none, e.g. RobertaForMaskedLM); decoders with AutoModelForCausalLM
    (pondering exports need the LM head; they load with ponder-pt's registered classes, and
    code from the directory runs only with trust_remote_code, see ponder_pt.export.hf_auto).
    Decoder tokenizers without a pad token pad with eos (or unk); padding is on the right."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from ..export.hf_auto import from_pretrained

    config = from_pretrained(AutoConfig, path_or_name, trust_remote_code)
    kind = _kind_of(config, str(path_or_name))
    auto = AutoModelForCausalLM if kind in DECODERS else AutoModel
    kw = {"dtype": dtype} if dtype is not None else {}
    model, info = from_pretrained(auto, path_or_name, trust_remote_code, config=config,
                                  attn_implementation=attn_implementation,
                                  output_loading_info=True, **kw)
    if kind in ENCODERS and any("pooler" in k for k in info.get("missing_keys", ())):
        warnings.warn(f"{path_or_name} has no pooler weights: the pooler is freshly "
                      "initialised (it is trained with the exit heads)", stacklevel=2)
    model.eval()
    tok = from_pretrained(AutoTokenizer, path_or_name, trust_remote_code)
    if kind in DECODERS and tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    return wrap_backbone(model), tok
