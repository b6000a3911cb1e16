"""Registry of named model shapes and named run configs.

Model shapes follow the published configs: Pythia from EleutherAI's gpt-neox
`configs/pythia/*.yml` (all: rotary_pct 0.25, parallel residual, untied embeddings,
seq 2048, ffn 4 x hidden, 2M-token batches of 1024 x 2048, 143k iters, min_lr 0.1 x lr),
LLaMA from the HF configs of TinyLlama-1.1B and Llama-2-7B, GPT-2 from OpenAI's GPT-2 configs
(n_positions 1024, learned positions, tied embeddings, GELU tanh, LayerNorm eps 1e-5, init
std 0.02 with residual projections scaled by 1/sqrt(2L); vocabulary 50257 padded by the
tokenizer layout, 50304 at TP <= 2).
"""

from __future__ import annotations

_PYTHIA_SHAPES = {
    # name: (layers, hidden, heads, lr)
    "pythia-14m": (6, 128, 4, 1.0e-3),
    "pythia-31m": (6, 256, 8, 1.0e-3),
    "pythia-70m": (6, 512, 8, 1.0e-3),
    "pythia-160m": (12, 768, 12, 6.0e-4),
    "pythia-410m": (24, 1024, 16, 3.0e-4),
    "pythia-1b": (16, 2048, 8, 3.0e-4),
    "pythia-1.4b": (24, 2048, 16, 2.0e-4),
    "pythia-2.8b": (32, 2560, 32, 1.6e-4),
    "pythia-6.9b": (32, 4096, 32, 1.2e-4),
    "pythia-12b": (36, 5120, 40, 1.2e-4),
}

MODEL_PRESETS: dict[str, dict] = {
    name: dict(
        arch="gpt_neox",
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=None,
        ffn_hidden_size=4 * hidden,
        max_seq_len=2048,
        rotary_pct=0.25,
        rotary_base=10000.0,
        parallel_residual=True,
        tie_embeddings=False,
        norm_eps=1e-5,
    )
    for name, (layers, hidden, heads, _) in _PYTHIA_SHAPES.items()
}

MODEL_PRESETS["tinyllama-1.1b"] = dict(
    arch="llama",
    num_layers=22,
    hidden_size=2048,
    num_heads=32,
    num_kv_heads=4,
    ffn_hidden_size=5632,
    max_seq_len=2048,
    rotary_pct=1.0,
    rotary_base=10000.0,
    parallel_residual=False,
    tie_embeddings=False,
    norm_eps=1e-5,
)
MODEL_PRESETS["llama2-7b"] = dict(
    arch="llama",
    num_layers=32,
    hidden_size=4096,
    num_heads=32,
    num_kv_heads=32,
    ffn_hidden_size=11008,
    max_seq_len=4096,
    rotary_pct=1.0,
    rotary_base=10000.0,
    parallel_residual=False,
    tie_embeddings=False,
    norm_eps=1e-5,
)
# A few-million-parameter Pythia shape for CPU demos and the miniature study.
MODEL_PRESETS["pythia-tiny"] = dict(
    MODEL_PRESETS["pythia-14m"], num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=256,
    max_seq_len=256,
)

# name: (layers, hidden, heads, lr) -- lr from the GPT-3 paper's table for the same sizes
_GPT2_SHAPES = {
    "gpt2-small": (12, 768, 12, 6.0e-4),
    "gpt2-medium": (24, 1024, 16, 3.0e-4),
    "gpt2-large": (36, 1280, 20, 2.5e-4),
    "gpt2-xl": (48, 1600, 25, 2.0e-4),
}
_GPT2_MODEL = dict(arch="gpt2", num_kv_heads=None, max_seq_len=1024, rotary_pct=0.0,
                   parallel_residual=False, tie_embeddings=True, norm_eps=1e-5,
                   init_method_std=0.02)
for _name, (_l, _h, _a, _) in _GPT2_SHAPES.items():
    MODEL_PRESETS[_name] = dict(_GPT2_MODEL, num_layers=_l, hidden_size=_h, num_heads=_a,
                                ffn_hidden_size=4 * _h)
# A tiny GPT-2 shape for CPU tests and demos.
MODEL_PRESETS["gpt2-tiny"] = dict(_GPT2_MODEL, num_layers=2, hidden_size=64, num_heads=4,
                                  ffn_hidden_size=256, max_seq_len=256)

_PYTHIA_TRAIN = dict(iters=143000, global_batch=1024, warmup=0.01, weight_decay=0.01,
                     adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, grad_clip=1.0)

# Named run configs: nested overrides applied on top of the dataclass defaults.
RUN_PRESETS: dict[str, dict] = {}
for _name, (_l, _h, _a, _lr) in _PYTHIA_SHAPES.items():
    _size = _name.split("-", 1)[1]
    _base = {
        "model": {"preset": _name},
        "data": {"seq_len": 2048},
        "train": dict(_PYTHIA_TRAIN, lr=_lr, min_lr=0.1 * _lr),
    }
    RUN_PRESETS[_name] = dict(_base, name=_name)
    RUN_PRESETS[f"ponderpythia-{_size}"] = dict(_base, name=f"ponderpythia-{_size}",
                                                ponder={"steps": 3})
    RUN_PRESETS[f"pausepythia-{_size}"] = dict(_base, name=f"pausepythia-{_size}",
                                               pause={"rate": 0.1})
    # PonderLM-2's Pythia runs: one latent thought per token, n drawn from {2, 3, 4}
    RUN_PRESETS[f"thoughtpythia-{_size}"] = dict(_base, name=f"thoughtpythia-{_size}",
                                                 thoughts={"count": 1, "train_iters": [2, 3, 4]})
for _name, (_l, _h, _a, _lr) in _GPT2_SHAPES.items():
    _size = _name.split("-", 1)[1]
    # nanoGPT's GPT-2 recipe: 0.5M-token batches (512 x 1024), 600k iters (~300B tokens),
    # 2000 warmup steps, weight decay 0.1; peak lr from the GPT-3 paper for the same sizes
    _base = {
        "model": {"preset": _name},
        "data": {"seq_len": 1024},
        "train": dict(_PYTHIA_TRAIN, iters=600000, global_batch=512, warmup=2000,
                      weight_decay=0.1, lr=_lr, min_lr=0.1 * _lr),
    }
    RUN_PRESETS[_name] = dict(_base, name=_name)
    RUN_PRESETS[f"pondergpt2-{_size}"] = dict(_base, name=f"pondergpt2-{_size}",
                                              ponder={"steps": 3})
RUN_PRESETS["tinyllama-1.1b"] = {
    "name": "tinyllama-1.1b",
    "model": {"preset": "tinyllama-1.1b"},
    "data": {"seq_len": 2048},
    "train": dict(_PYTHIA_TRAIN, lr=4e-4, min_lr=4e-5, weight_decay=0.1, global_batch=1024),
}
RUN_PRESETS["llama2-7b"] = {
    "name": "llama2-7b",
    "model": {"preset": "llama2-7b"},
    "data": {"seq_len": 4096},
    "train": dict(_PYTHIA_TRAIN, lr=3e-4, min_lr=3e-5, weight_decay=0.1, global_batch=1024),
}
RUN_PRESETS["demo"] = {
    "name": "demo",
    "model": {"preset": "pythia-tiny"},
    "ponder": {"steps": 1},
    "pause": {"rate": 0.1},
    "data": {"seq_len": 128, "split": "95,5,0", "num_workers": 0},
    "train": {"iters": 200, "micro_batch": 4, "global_batch": 16, "lr": 3e-3, "min_lr": 3e-4,
              "warmup": 20, "precision": "fp32", "eval_interval": 50, "eval_iters": 4},
    "parallel": {"zero_stage": 1},
    "checkpoint": {"interval": 100},
    "log": {"interval": 10},
}
# The newcomer's run: your own text on a laptop CPU in a few minutes (README, "Your own text").
RUN_PRESETS["tiny"] = {
    "name": "tiny",
    "model": {"preset": "pythia-tiny", "num_layers": 4, "hidden_size": 128,
              "ffn_hidden_size": 512},
    "data": {"seq_len": 128, "split": "98,2,0"},
    "train": {"iters": 300, "micro_batch": 8, "global_batch": 16, "lr": 3e-3, "min_lr": 3e-4,
              "warmup": 0.1, "precision": "fp32", "eval_interval": 100, "eval_iters": 4},
    "checkpoint": {"interval": 100},
    "log": {"interval": 10},
}
