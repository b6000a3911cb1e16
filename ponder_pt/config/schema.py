"""The typed run configuration: one dataclass per section, nested under `Config`.

Every field here is reachable as a dotted key (`model.hidden_size`, `ponder.steps`, ...)
from YAML files and from `--set dotted.key=value` on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelConfig:
    preset: Optional[str] = None
    """Named shape from the registry (pythia-70m, tinyllama-1.1b, ...). Explicit fields win."""
    arch: str = "gpt_neox"
    """gpt_neox (Pythia), llama or gpt2 (learned positions: max_seq_len rows, rotary_pct=0,
    tied embeddings, sequential blocks)."""
    num_layers: int = 6
    hidden_size: int = 512
    num_heads: int = 8
    num_kv_heads: Optional[int] = None
    """Grouped-query attention (LLaMA); None = num_heads."""
    ffn_hidden_size: Optional[int] = None
    """None = 4 x hidden (GPT-NeoX); LLaMA presets set it explicitly."""
    max_seq_len: int = 2048
    rotary_pct: float = 0.25
    """Fraction of each head's dims rotated (gpt_neox: (0, 1], llama: 1, gpt2: 0 = none)."""
    rotary_base: float = 10000.0
    parallel_residual: bool = True
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    vocab_size: Optional[int] = None
    """Padded vocabulary rows; None = derived from the tokenizer (padded like Megatron)."""
    make_vocab_size_divisible_by: int = 128
    init_method_std: Optional[float] = None
    """None = small_init: sqrt(2 / (5 * hidden))."""
    dropout: float = 0.0
    activation_checkpointing: str = "none"
    """none | full | selective."""
    vocab_chunk: int = 0
    """Vocabulary rows per chunk for the training loss and the full-softmax pondering feedback
    (online softmax, recomputed in backward: no [tokens, vocab] tensor is kept for backward);
    0 = off (materialise the logits). Values above the per-rank shard (vocab / tp) act as one
    chunk. Top-k feedback (ponder.top_k > 0) and inference logits are never chunked."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size


@dataclass
class HaltingConfig:
    """Adaptive pondering (DESIGN.md): per token, a halting head after every pass k gives
    lambda_k, exit distribution p_k = lambda_k * prod_{j<k}(1 - lambda_j) (lambda_K = 1)."""
    mode: str = "off"
    """off | pondernet (lambda_k from the pass's final-norm hidden state) | palbert (also from
    lambda_{k-1}: PALBERT's Lambda layer)."""
    q: float = 0.5
    """Q-exit threshold in (0, 1]: a token exits at the first pass whose cumulative p reaches
    q. q = 1 never exits early (exactly fixed-K pondering)."""
    beta: float = 0.1
    """Weight of KL(p || prior) in the loss: sum_k p_k CE_k + beta KL."""
    prior: float = 0.3
    """lambda_p of the geometric prior over passes 0..K (truncated, renormalised)."""
    train_exits: str = "dense"
    """dense: every pass trains for every token; frozen: the training forward runs the
    inference semantics (later passes read an exited token's frozen keys/values; exits from
    the detached lambda by Q-exit at q)."""
    head_only: bool = False
    """Train only the halting head on a frozen backbone (with checkpoint.init_from: turns a
    fixed-K pondering model into an adaptive one)."""


@dataclass
class PonderConfig:
    steps: int = 0
    """K extra passes feeding back the probability-weighted embedding; 0 = off."""
    scale_embeds: bool = True
    """Multiply embeddings by sqrt(hidden) (e_0 and every fed-back p.W_in)."""
    scale_initial_by_steps: bool = False
    top_k: int = 0
    """0 = full-vocabulary softmax; k > 0 = renormalised top-k."""
    feedback: str = "embedding"
    """What each extra pass feeds back: "embedding" (PonderingLM: e_k = e_{k-1} + s * p.W_in)
    or "hidden" (the looped baseline of PonderingLM's ablation: e_k = e_{k-1} + h_k, h_k the
    final-norm hidden state of pass k, the vector the output head would multiply)."""
    halting: HaltingConfig = field(default_factory=HaltingConfig)
    """Adaptive pondering: each token learns how many of the K+1 passes it needs."""
    draft_loss: float = 0.0
    """Weight of an auxiliary cross-entropy on the logits of pass d-1 (d = draft_passes), the
    draft of speculative decoding (`generate --speculative d:n`); 0 = off. Plain pondering
    uses those logits only as feedback, so they draft poorly without it."""
    draft_passes: int = 1
    """d: the passes whose last logits the draft loss trains (1..steps)."""

    @property
    def adaptive(self) -> bool:
        """A halting head over the passes: halting on and at least one pondering step."""
        return self.halting.mode != "off" and self.steps > 0


@dataclass
class ThoughtsConfig:
    """Latent thoughts (PonderLM-2, DESIGN.md): after every token x_t the model writes `count`
    thoughts z_t^1..z_t^M, each the final-norm hidden state of the slot before, in the
    interleaved layout [x_t, z_t^1..z_t^M] (every slot at position t); the next token is
    predicted from the last thought. Training runs Jacobi iterations over all thoughts at
    once; decoding computes them exactly, one slot after another."""
    count: int = 0
    """M thoughts per token; 0 = off (the plain model)."""
    jacobi_iters: int = 3
    """n Jacobi iterations for evaluation (the validation loss) and `prefill: jacobi`."""
    train_iters: list[int] = field(default_factory=lambda: [2, 3])
    """n per training step, drawn from this list with a generator seeded by train.seed and
    the step: the same n on every rank, and again after a resume."""
    prefill: str = "exact"
    """How cached inference computes a prompt's thoughts: exact (one slot after another, as
    decoding does: what the model defines) | jacobi (n = jacobi_iters parallel iterations, as
    in training: faster, approximate beyond the first ~n positions)."""
    scale_embeds: bool = True
    """Multiply token embeddings by sqrt(2.5 * hidden), the reference code's scale: with
    small_init (std sqrt(2 / (5 * hidden)), model.init_method_std unset) token inputs have unit
    RMS, like the final-norm thoughts beside them."""


@dataclass
class PauseConfig:
    mode: str = "random"
    """random: `rate` of each sample's positions become <pause> in the data (Goyal et al.) |
    every_token: `per_token` <pause> slots after every token, each at the token's position,
    the next token predicted from the last (PonderLM-2's pause baseline; the data holds no
    pauses, `rate` stays 0)."""
    per_token: int = 1
    """M <pause> slots after every token (mode every_token)."""
    rate: float = 0.0
    """Fraction of a sample's L positions turned into <pause>; 0 = off."""
    token_id: Optional[int] = None
    """None = the tokenizer's reserved row (first unused padded row)."""
    inference_pauses: int = 10
    """M pauses appended to prompts at inference (recorded in exports; mode random)."""

    @property
    def every_token(self) -> int:
        """<pause> slots after every token: `per_token` in mode every_token, else 0."""
        return self.per_token if self.mode == "every_token" else 0


@dataclass
class DataConfig:
    train: list = field(default_factory=list)
    """Prefixes (PREFIX for PREFIX.bin/.idx), optionally Megatron-style weighted: [0.7, a, 0.3, b]."""
    valid: list = field(default_factory=list)
    """Separate validation prefixes; empty = carve valid/test out of `train` with `split`."""
    test: list = field(default_factory=list)
    split: str = "969,30,1"
    tokenizer: Optional[str] = None
    """Directory or file of a tokenizer.json (HF BPE) or a sentencepiece .model."""
    seq_len: int = 2048
    eod_mask_loss: bool = False
    """Mask the loss of predicting the first token of the next document after an EOD."""
    cache_dir: Optional[str] = None
    """Where megatron-core caches document/sample/shuffle indices; None = next to the data."""
    num_workers: int = 2


@dataclass
class TrainConfig:
    iters: int = 143000
    micro_batch: int = 1
    global_batch: int = 1024
    lr: float = 1e-3
    min_lr: Optional[float] = None
    """None = 0.1 x lr (the Pythia recipe)."""
    warmup: float = 0.01
    """Fraction of iters (< 1) or a number of iterations (>= 1)."""
    lr_decay: str = "cosine"
    """cosine | linear | constant."""
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    optimizer: str = "torch"
    """AdamW implementation: torch (torch.optim.AdamW driven by DeepSpeed, its fused kernel on
    CUDA: nothing to compile) | deepspeed (DeepSpeed's FusedAdam, a CUDA extension JIT-built
    with nvcc on first use: minutes on a fresh node). ZeRO-Offload always uses DeepSpeed's
    CPU Adam."""
    precision: str = "bf16"
    """fp32 | bf16 | fp16 (fp16 is GPU-only)."""
    seed: int = 1234
    eval_interval: int = 1000
    eval_iters: int = 10
    max_bad_steps: int = 10
    """Consecutive NaN/inf steps tolerated (skipped) before training stops."""
    compile: bool = False
    """torch.compile each transformer block (in place, so checkpoint keys are unchanged; the
    K+1 pondering passes reuse the compiled block). TP = PP = 1 only; the first steps pay the
    compile time (Inductor needs a C++ compiler on CPU, Triton on GPU)."""

    @property
    def min_lr_value(self) -> float:
        return 0.1 * self.lr if self.min_lr is None else self.min_lr

    @property
    def warmup_iters(self) -> int:
        return int(round(self.warmup * self.iters)) if self.warmup < 1 else int(self.warmup)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 1
    sequence_parallel: bool = False
    cpu_offload: bool = False
    """ZeRO-Offload: optimizer states and step on the CPU."""
    ds_config: Optional[str] = None
    """A DeepSpeed JSON merged over the generated one (e.g. ds_configs/zero2_bf16.json)."""
    world_size: Optional[int] = None
    """Expected number of processes; None = taken from the launcher at start-up."""


@dataclass
class RunConfig:
    dir: Optional[str] = None
    """The run directory (`ponder-pt train --out DIR`): checkpoints/, metrics.jsonl,
    tensorboard/, loss.png and run_config.yaml. None = a new directory under runs/ named after
    the config and the start time (`log.dir` or `checkpoint.dir`, when set, override their
    part). Starting again with the same DIR resumes from its newest checkpoint."""
    overwrite: bool = False
    """Start afresh in a `run.dir` that holds a run with no checkpoint to resume from (its
    metrics.jsonl is replaced). Off: such a directory is refused, never reused silently."""


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """None = `run.dir`/checkpoints."""
    save: bool = True
    """Save at `interval`, at the end and when a stop signal arrives. false: no checkpoints at
    all (benchmarks); a stop then loses the run."""
    interval: int = 1000
    keep_last: int = 3
    load: Optional[str] = None
    """Resume from this directory (another run's checkpoint.dir, read-only is fine) until
    `dir` holds a checkpoint of this run's own; then from `dir`. Default: `dir`."""
    init_from: Optional[str] = None
    """Initial weights for a fresh run (ignored when resuming): an HF GPT-NeoX/LLaMA/GPT-2 directory
    or a checkpoint.dir (e.g. the output of `ponder-pt convert from-hf`)."""
    unsafe_unpickle: bool = False
    """Read an `init_from` checkpoint.dir with full unpickling (runs any code its files hold).
    Off: only tensors, containers and DeepSpeed's own types load (torch weights_only)."""
    fallback_to_older: bool = False
    """When the newest complete checkpoint fails to load or to convert to this run's layout,
    resume from the previous one (losing the steps since), instead of stopping with the error.
    Off by default: a load can fail for a passing reason (an I/O error, memory) and the run
    should not silently give up progress. Incomplete or truncated checkpoints are skipped
    either way."""


@dataclass
class LogConfig:
    dir: Optional[str] = None
    """metrics.jsonl, tensorboard/ and loss.png; None = `run.dir`."""
    interval: int = 1
    wandb: bool = False
    wandb_project: str = "ponder-pt"
    wandb_mode: str = "offline"
    tensorboard: bool = False
    peak_tflops: Optional[float] = None
    """Per-device peak for MFU; None = looked up from the GPU name (H100/H200: 989 bf16)."""


@dataclass
class DistConfig:
    timeout: float = 600.0
    """Seconds a rank waits in one collective (or the rendezvous) for its peers before it fails
    with the rank and host it waited for. It bounds how long a job whose node died, or whose
    rank stopped, hangs before SLURM can requeue it. Raise it where one rank alone does slow
    work the others wait on (a checkpoint conversion of a large model on rank 0)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ponder: PonderConfig = field(default_factory=PonderConfig)
    pause: PauseConfig = field(default_factory=PauseConfig)
    thoughts: ThoughtsConfig = field(default_factory=ThoughtsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    name: str = "custom"


def parse_blend(items: list, key: str = "data.train") -> list[tuple[str, float]]:
    """[a, b] -> equal weights; Megatron-style [0.7, a, 0.3, b] -> weighted. Raises ValueError."""
    items = [str(x) for x in items]
    if not items:
        return []

    def is_number(text: str) -> bool:
        try:
            float(text)
            return True
        except ValueError:
            return False

    if len(items) % 2 == 0 and all(is_number(items[i]) for i in range(0, len(items), 2)):
        pairs = [(items[i + 1], float(items[i])) for i in range(0, len(items), 2)]
        if any(w <= 0 for _, w in pairs):
            raise ValueError(f"{key}: blend weights must be > 0, got {items}")
        return pairs
    if any(is_number(x) for x in items):
        raise ValueError(f"{key}: mixes weights and prefixes; write [w1, prefix1, w2, prefix2, ...] "
                         f"or just [prefix1, prefix2], got {items}")
    return [(x, 1.0) for x in items]
