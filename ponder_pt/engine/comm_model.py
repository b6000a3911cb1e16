"""What one optimizer step sends between nodes, and how long the links take to carry it.

For `train --dry-run` (the time-to-train estimate's interconnect term) and
benchmarks/bench_multinode.py, which checks it against simulated nodes on shaped links.

Placement: ranks fill nodes in order (`ranks_per_node` each, as srun's block distribution
does), and megatron-core numbers them TP fastest, then DP, then PP (its default order
"tp-cp-ep-dp-pp"). Every collective is a ring over its group in rank order, as gloo's and
NCCL's ring algorithms are: a ring all-reduce of S bytes over N ranks sends 2(N-1)/N * S from
each rank to the next in 2(N-1) steps; a reduce-scatter or an all-gather half of that. Only
the ring edges between two nodes load a node's link; traffic inside a node (NVLink, shared
memory) is taken as free.

Per optimizer step, with P parameters per model-parallel rank of `grad_bytes` each, `ga`
micro-batches and K pondering passes:
- DP, ZeRO-0: one all-reduce of the gradients (2(N-1)/N * P). ZeRO-1: DeepSpeed all-reduces
  the gradients too, then all-gathers the updated parameter partitions (3(N-1)/N * P in all;
  benchmarks/bench_multinode.py measured 605.4 MiB per step at N = 4 against the 604.5 MiB
  this predicts).
  ZeRO-2: the same reduction for every micro-batch ((2 ga + 1)(N-1)/N * P). ZeRO-3: per
  micro-batch the parameters gathered for each pass's forward and backward and the gradients
  reduce-scattered ((2(K+1) + 1) ga (N-1)/N * P), counting only parameters above DeepSpeed's
  persistence threshold (smaller ones stay whole on every rank).
- TP: per layer, pass and micro-batch two all-reduces of the activations forward and two
  backward (sequence parallelism moves the same bytes as reduce-scatter + all-gather).
- PP: per stage boundary, pass and micro-batch the activations forward and their gradient
  back, plus, for pondering, the fed-back embedding from the last stage to the first.

Time: each node's link carries its bytes at `gbps` (full duplex, so the busier direction
counts), plus `latency_us` per sequential ring step. No overlap with compute is assumed, so
the estimate is an upper bound where DeepSpeed overlaps the gradient reduction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config.schema import Config
from .flops import param_count

# name -> (Gbit/s per node, one-way latency in microseconds)
FABRICS = {
    "ib-8x400": (3200.0, 5.0),  # 8 x NDR InfiniBand per node (DGX H100 / H200)
    "ib-8x200": (1600.0, 5.0),  # 8 x HDR (DGX A100)
    "ib-400": (400.0, 5.0),     # one NDR port per node
    "roce-400": (400.0, 10.0),
    "eth-100": (100.0, 30.0),
    "eth-25": (25.0, 50.0),
    "eth-10": (10.0, 50.0),
}
DEFAULT_FABRIC = "ib-8x400"
PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default


@dataclass
class Collective:
    what: str         # "DP", "TP", "PP"
    kind: str         # e.g. "all-reduce of the gradients"
    group: list       # ranks, in ring order
    nbytes: float     # bytes each rank sends along its ring per call
    steps: int        # sequential ring steps per call
    calls: float      # calls per optimizer step


@dataclass
class CommEstimate:
    node_bytes: dict = field(default_factory=dict)  # node -> bytes it sends per step
    by_kind: dict = field(default_factory=dict)     # "DP"/"TP"/"PP" -> inter-node bytes/step
    latency_steps: float = 0.0                       # sequential ring steps that cross nodes
    nodes: int = 1

    @property
    def max_node_bytes(self) -> float:
        return max(self.node_bytes.values(), default=0.0)

    def seconds(self, gbps: float, latency_us: float) -> float:
        """Per optimizer step, on links of `gbps` Gbit/s per node and `latency_us`."""
        return self.max_node_bytes * 8 / (gbps * 1e9) + self.latency_steps * latency_us * 1e-6


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    return tp_rank + tp * (dp_rank + dp * pp_rank)


def _dtype_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def collectives(cfg: Config, world_size: int) -> list[Collective]:
    """Every collective of one optimizer step (module docstring), with its group."""
    m, par, tr = cfg.model, cfg.parallel, cfg.train
    tp, pp = par.tp, par.pp
    dp = world_size // (tp * pp)
    ga = tr.global_batch // (tr.micro_batch * dp)
    passes = cfg.ponder.steps + 1
    b = _dtype_bytes(tr.precision)
    params = param_count(m, m.vocab_size)["total"] / (tp * pp)
    act = tr.micro_batch * cfg.data.seq_len * m.hidden_size * b  # one activation tensor
    out: list[Collective] = []
    if dp > 1:
        ring = 2 * (dp - 1) / dp
        half = (dp - 1) / dp
        gather = ("all-gather of the updated parameters", half * params * b, dp - 1, 1)
        if par.zero_stage == 0:
            spec = [("all-reduce of the gradients", ring * params * b, 2 * (dp - 1), 1)]
        elif par.zero_stage == 1:
            spec = [("all-reduce of the gradients", ring * params * b, 2 * (dp - 1), 1), gather]
        elif par.zero_stage == 2:
            spec = [("all-reduce of the gradients (each micro-batch)", ring * params * b,
                     2 * (dp - 1), ga), gather]
        else:
            big = _partitioned_params(cfg) / (tp * pp)
            spec = [("all-gather of the parameters (each pass, forward and backward)",
                     half * big * b, dp - 1, 2 * passes * ga),
                    ("reduce-scatter of the gradients", half * params * b, dp - 1, ga)]
        for p in range(pp):
            for t in range(tp):
                group = [rank_of(t, d, p, tp, dp) for d in range(dp)]
                out += [Collective("DP", kind, group, nb, st, calls)
                        for kind, nb, st, calls in spec]
    if tp > 1:
        layers = m.num_layers / pp
        calls = 4 * layers * passes * ga
        for p in range(pp):
            for d in range(dp):
                group = [rank_of(t, d, p, tp, dp) for t in range(tp)]
                out.append(Collective("TP", "all-reduce of the activations", group,
                                      2 * (tp - 1) / tp * act, 2 * (tp - 1), calls))
    if pp > 1:
        for d in range(dp):
            for t in range(tp):
                chain = [rank_of(t, d, p, tp, dp) for p in range(pp)]
                for a, c in zip(chain, chain[1:]):  # activations forward, gradients back
                    out.append(Collective("PP", "activations between stages", [a, c], act, 1,
                                          2 * passes * ga))
                if passes > 1:  # the fed-back embedding: last stage to the first, and back
                    out.append(Collective("PP", "fed-back embedding", [chain[-1], chain[0]],
                                          act, 1, 2 * (passes - 1) * ga))
    return out


def _partitioned_params(cfg: Config) -> float:
    """Parameters ZeRO-3 partitions and gathers (those above the persistence threshold)."""
    m = cfg.model
    h, f, v = m.hidden_size, m.ffn_size, m.vocab_size
    kv = m.kv_heads * m.head_dim
    mats = [h * (h + 2 * kv), h * h, (2 if m.arch == "llama" else 1) * h * f, f * h]
    per_layer = sum(x for x in mats if x >= PERSISTENCE_THRESHOLD)
    emb = v * h if v * h >= PERSISTENCE_THRESHOLD else 0
    return m.num_layers * per_layer + emb * (1 if m.tie_embeddings else 2)


def estimate(cfg: Config, world_size: int, ranks_per_node: int) -> CommEstimate:
    """Inter-node bytes per node and sequential inter-node ring steps of one optimizer step."""
    node = lambda r: r // ranks_per_node  # noqa: E731
    est = CommEstimate(nodes=max(1, -(-world_size // ranks_per_node)))
    for c in collectives(cfg, world_size):
        group = c.group
        if len(group) == 2 and c.what == "PP":
            edges = [(group[0], group[1]), (group[1], group[0])]  # each way (half the calls)
            per_edge_calls = c.calls / 2
        else:
            edges = list(zip(group, group[1:] + group[:1]))
            per_edge_calls = c.calls
        crossing = [(a, z) for a, z in edges if node(a) != node(z)]
        for a, _ in crossing:
            est.node_bytes[node(a)] = est.node_bytes.get(node(a), 0.0) + c.nbytes * per_edge_calls
            est.by_kind[c.what] = est.by_kind.get(c.what, 0.0) + c.nbytes * per_edge_calls
        if crossing:
            est.latency_steps += c.steps * per_edge_calls
    return est


def parse_interconnect(value: str | None) -> tuple[float, float, str]:
    """(Gbit/s per node, latency in µs, name) from `--interconnect`: a fabric name from
    FABRICS, a number of Gbit/s, or "GBPS@LATENCY_US"; None is DEFAULT_FABRIC."""
    value = value or DEFAULT_FABRIC
    if value in FABRICS:
        gbps, lat = FABRICS[value]
        return gbps, lat, value
    try:
        gbps_text, _, lat_text = value.partition("@")
        gbps, lat = float(gbps_text), float(lat_text or 10.0)
    except ValueError:
        raise ValueError(f"--interconnect {value!r}: a fabric ({', '.join(FABRICS)}), Gbit/s "
                         "per node (e.g. 100) or GBPS@LATENCY_US (e.g. 100@20)") from None
    if gbps <= 0 or lat < 0:
        raise ValueError(f"--interconnect {value!r}: bandwidth must be > 0, latency >= 0")
    return gbps, lat, f"{gbps:g} Gbit/s, {lat:g} µs"


def format_comm(est: CommEstimate, compute_s: float, gbps: float, latency_us: float,
                fabric: str) -> list[str]:
    """The dry-run's lines: bytes per step by kind, the time they take, and the scaling
    efficiency compute / (compute + communication) per step."""
    if est.nodes <= 1:
        return ["# interconnect", "one node: no traffic between nodes"]
    comm = est.seconds(gbps, latency_us)
    kinds = ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in sorted(est.by_kind.items()))
    eff = compute_s / (compute_s + comm) if compute_s + comm > 0 else 1.0
    return ["# interconnect (estimate; engine/comm_model.py)",
            f"between nodes per step: {kinds or 'nothing'}; busiest node sends "
            f"{est.max_node_bytes / 2**20:,.1f} MiB",
            f"on {fabric} per node: {comm * 1e3:,.1f} ms per step for communication next to "
            f"{compute_s * 1e3:,.1f} ms of compute (no overlap assumed)",
            f"scaling efficiency at {est.nodes} nodes: {100 * eff:.0f} % "
            f"(compute / (compute + communication))"]
