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
- DP, ZeRO-0: one all-reduce of the gradients (2(N-1)/N * P). ZeRO-1: DeepSpeed reduces the
  gradients (stage_1_and_2.py's average_tensor: each partition reduced to its owner, taken
  as an all-reduce's bytes), then every rank all-gathers the updated partitions
  (`all_gather_dp_groups` at the end of its `step`): 3(N-1)/N * P in all.
  ZeRO-2: the same reduction for every micro-batch ((2 ga + 1)(N-1)/N * P). ZeRO-3: per
  micro-batch the parameters gathered for each pass's forward and backward and the gradients
  reduce-scattered ((2(K+1) + 1) ga (N-1)/N * P), counting only parameters above DeepSpeed's
  persistence threshold (smaller ones stay whole on every rank).
- TP: per block, pass and micro-batch two all-reduces of the activations forward (the
  row-parallel outputs) and two backward (the column-parallel inputs' gradients); per
  micro-batch one more forward for megatron's vocab-parallel embedding, one backward per
  head (the output layer's input gradient) and one forward per fed-back p . W_in (its
  vocabulary shards summed). Sequence parallelism moves the same bytes as reduce-scatter +
  all-gather (the embedding's and p . W_in's reduction become a reduce-scatter: half). The
  vocab-parallel cross-entropy's reductions ([tokens] floats) are left out.
- PP (models/pipeline.py, DeepSpeed's pipeline engine): the passes are unrolled along one
  chain of stages, so per stage boundary and micro-batch the two activation tensors (x, e)
  go forward and their gradients back; and once per step DeepSpeed all-reduces the
  gradients of every tied layer held by several stages (the shared embedding / head layer,
  which the first and the last stage both hold, and each block that passes run on
  different stages).

Time: each node's link carries its bytes at `gbps` (full duplex, so the busier direction
counts), plus `latency_us` per sequential ring step. Nothing is overlapped with compute
(ponder-pt's DeepSpeed config sets overlap_comm off) and traffic inside a node is taken as
free, so where the link reaches its rate this is an upper bound on the time communication
adds to a step: part of that traffic already took time inside one node, and the other
ranks' compute goes on while one waits. benchmarks/bench_multinode.py measures both the
bytes and that extra time per layout on shaped links (benchmarks/README.md, Multi-node).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config.schema import Config
from .estimate import block_params, pipeline_stages, shared_params
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
    p2p: bool = False  # a send between two ranks, `calls` split over both directions


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
        stages = pipeline_stages(m.num_layers, cfg.ponder.steps, pp)
        for p, layers in enumerate(stages):
            blocks = sum(kind == "block" for kind, _ in layers)
            # per micro-batch: 4 per block (see the docstring); megatron's embedding
            # all-reduces its output (a reduce-scatter under SP: half); every head's
            # column-parallel output layer all-reduces its input's gradient; every feedback's
            # p . W_in sums the vocabulary shards (parallel.soft_embedding; SP: half)
            half = 0.5 if par.sequence_parallel else 1.0
            n = (4 * blocks + sum(kind in ("feedback", "head") for kind, _ in layers)
                 + half * sum(kind in ("embed", "feedback") for kind, _ in layers))
            for d in range(dp):
                group = [rank_of(t, d, p, tp, dp) for t in range(tp)]
                out.append(Collective("TP", "all-reduce of the activations", group,
                                      2 * (tp - 1) / tp * act, 2 * (tp - 1), n * ga))
    if pp > 1:
        # models/pipeline.py unrolls the passes along one chain, so a micro-batch crosses
        # each stage boundary once, with two tensors (x, e), and their gradients come back
        # (DeepSpeed's PipelineEngine sends every tensor of the tuple)
        stages = pipeline_stages(m.num_layers, cfg.ponder.steps, pp)
        tied = {"shared": ([s for s, layers in enumerate(stages)
                            if any(kind != "block" for kind, _ in layers)],
                           shared_params(m, m.vocab_size, tp))}
        for i in range(m.num_layers):
            tied[f"block{i}"] = ([s for s, layers in enumerate(stages) if ("block", i) in layers],
                                 block_params(m, tp))
        for d in range(dp):
            for t in range(tp):
                chain = [rank_of(t, d, p, tp, dp) for p in range(pp)]
                for a, c in zip(chain, chain[1:]):  # activations forward, gradients back
                    out.append(Collective("PP", "activations (x, e) between stages", [a, c],
                                          2 * act, 1, 2 * ga, p2p=True))
                # a TiedLayerSpec held by several stages (the shared embedding / head, and a
                # block that several passes run on different stages): DeepSpeed all-reduces
                # its gradients among them once per step (PipelineEngine's reduce_tied_grads)
                for holders, n in tied.values():
                    if len(holders) > 1:
                        out.append(Collective(
                            "PP", "all-reduce of tied weights' gradients between stages",
                            [chain[s] for s in holders],
                            2 * (len(holders) - 1) / len(holders) * n * b,
                            2 * (len(holders) - 1), 1))
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
        if c.p2p:
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
    """The dry-run's lines: bytes per step by kind, the most time they add, and the least
    scaling efficiency, compute / (compute + communication) per step."""
    if est.nodes <= 1:
        return ["# interconnect", "one node: no traffic between nodes"]
    comm = est.seconds(gbps, latency_us)
    kinds = ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in sorted(est.by_kind.items()))
    eff = compute_s / (compute_s + comm) if compute_s + comm > 0 else 1.0
    # a pipeline's stages also stall waiting for the other node's micro-batch, which the
    # bytes do not count: measured above the link's time (benchmarks/README.md)
    staged = est.by_kind.get("PP", 0.0) > 0
    most, least = ("about", "about") if staged else ("at most", "at least")
    return ["# interconnect (estimate; engine/comm_model.py)",
            f"between nodes per step: {kinds or 'nothing'}; busiest node sends "
            f"{est.max_node_bytes / 2**20:,.1f} MiB",
            f"on {fabric} per node: {most} {comm * 1e3:,.1f} ms per step added by "
            f"communication, next to {compute_s * 1e3:,.1f} ms of compute (the link's time "
            "for these bytes with nothing overlapped: an upper bound where the link reaches "
            "its rate"
            + ("; with pipeline stages across nodes more, as their stalls waiting for each "
               "other are not counted" if staged else "")
            + "; benchmarks/README.md, Multi-node)",
            f"scaling efficiency at {est.nodes} nodes: {least} {100 * eff:.0f} % "
            f"(compute / (compute + communication))"]
