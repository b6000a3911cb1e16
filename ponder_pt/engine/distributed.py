"""Process groups: torch.distributed from the launcher's environment, megatron-core's
parallel_state for TP x PP x DP, and the `mpu` view of it that DeepSpeed expects."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def adopt_slurm_env() -> None:
    """`srun python -m ponder_pt.train` (one task per GPU): take rank and size from SLURM.
    This launch mode lets SLURM's preemption signal reach every worker directly."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")


_BANNER = re.compile(r"DeepSpeed \S+ built successfully")


def quiet_deepspeed(rank: int) -> None:
    """DeepSpeed's start-up messages once per run, not once per rank: before DeepSpeed is
    imported (its logger keeps a filter set now), ranks other than 0 let only its errors
    through; its warnings and notes repeat rank 0's ("Setting accelerator to CPU", ...)."""
    if rank != 0:
        logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)


@contextlib.contextmanager
def _no_build_banner(rank: int):
    """On ranks other than 0, drop the line DeepSpeed prints (a bare print) when it has
    loaded its comm op; anything else printed meanwhile still goes out."""
    if rank == 0:
        yield
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        sys.stdout.write("".join(line for line in buf.getvalue().splitlines(True)
                                 if not _BANNER.match(line)))


def env_world_size() -> int:
    adopt_slurm_env()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(tp: int, pp: int, timeout: float = 600.0) -> World:
    """Start (or join) the process group named by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT
    (set by deepspeed, torchrun or `ponder-pt train`) and lay out TP x PP x DP. `timeout`
    (dist.timeout): seconds any collective, and the rendezvous, waits for a peer."""
    import datetime

    from megatron.core import parallel_state as ps

    from .ds_ops import build_op
    from .ext_locks import warn_stale_locks

    from ..models.parallel import free_port
    from .rendezvous import set_rendezvous

    adopt_slurm_env()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    quiet_deepspeed(int(os.environ["RANK"]))
    import deepspeed

    set_rendezvous(os.environ, free_port)  # before any process group: fails fast, naming the fix
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # before DeepSpeed's first JIT build (its CPU comm op is built in init_distributed, GPU
    # ops in deepspeed.initialize), which would hang on a lock a killed build left behind
    warn_stale_locks()
    if not dist.is_initialized():
        build_op("ShareMemCommBuilder")  # safe from preemption signals (ds_ops)
        with _no_build_banner(int(os.environ["RANK"])):
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                       timeout=datetime.timedelta(seconds=timeout))
    if not ps.model_parallel_is_initialized():
        # its groups get torch's default timeout otherwise (30 min for gloo); it makes a
        # timedelta of these minutes, so a fraction keeps the seconds
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp,
                                     distributed_timeout_minutes=timeout / 60)
    return World(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, tp=tp,
        pp=pp, dp=ps.get_data_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
        device=device)


_PLACES: list = []  # rank -> (host name, its address[, (tp, pp, dp) ranks]), from describe_world
_MAX_HOST_LINES = 32  # larger worlds list their first and last hosts' ranks only


def _address(host: str) -> str:
    import socket

    try:
        return socket.gethostbyname(host)
    except OSError:
        return "?"


def _grid_ranks() -> Optional[tuple]:
    """This rank's (tp, pp, dp) ranks once parallel_state has laid them out, else None."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_data_parallel_rank())


def _host_lines(places: list) -> list[str]:
    """One line per host: its address and its ranks with their (tp, pp, dp) ranks, so the log
    shows which TP group or pipeline stage each node holds."""
    by_host: dict = {}
    for rank, (host, addr, grid) in enumerate(places):
        by_host.setdefault((host, addr), []).append(f"{rank} (tp {grid[0]} pp {grid[1]} "
                                                    f"dp {grid[2]})")
    lines = [f"  {host} ({addr}): rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}"
             for (host, addr), ranks in by_host.items()]
    if len(lines) > _MAX_HOST_LINES:
        lines = [*lines[:4], f"  ... {len(lines) - 6} hosts more", *lines[-2:]]
    return lines


def describe_world(places: Optional[list] = None) -> str:
    """Where the ranks run and met: the (host, address) of every rank, `places` or gathered
    from the ranks (a collective, which also gathers each rank's TP / PP / DP ranks), and the
    rendezvous address they resolved; for the run's log, a line for the world and, when the
    grid ranks are known, one per host naming its ranks. Also what `explain_comm_error` needs
    to name a lost peer."""
    import socket

    if places is None:
        host = socket.gethostname()
        places = [None] * dist.get_world_size()
        dist.all_gather_object(places, (host, _address(host), _grid_ranks()))
    _PLACES[:] = places
    hosts = [p[0] for p in places]
    names = list(dict.fromkeys(hosts))  # in rank order
    addr = os.environ.get("MASTER_ADDR", "")
    resolved = _address(addr)
    shown = ", ".join(names if len(names) <= 8 else [*names[:4], "...", *names[-2:]])
    line = (f"{len(hosts)} ranks on {len(names)} host{'s' if len(names) > 1 else ''} ({shown}); "
            f"rendezvous {addr}:{os.environ.get('MASTER_PORT', '')}"
            + (f" = {resolved}" if resolved != addr else ""))
    if all(len(p) > 2 and p[2] is not None for p in places):
        line = "\n".join([line, *_host_lines(places)])
    return line


class PeerLost(RuntimeError):
    """A collective failed because a peer rank died, hung or became unreachable."""


def _unreachable(hosts: dict, wait: float) -> list[str]:
    """The hosts of `hosts` ({name: address}) that no TCP connection attempt reaches within
    `wait` seconds. A host that is up and linked answers one at once, accepting it or refusing
    it (the port needs no listener), so silence means its node or its link is down, which a
    hung process cannot tell apart from in a collective's timeout."""
    import errno
    import socket
    from concurrent.futures import ThreadPoolExecutor

    def silent(addr: str) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(wait)
            try:
                code = sock.connect_ex((addr, 9))  # discard: nothing needs to listen there
            except (socket.timeout, OSError):
                return True
        return code in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT,
                        errno.EAGAIN, errno.EINPROGRESS)

    if not hosts:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        quiet = list(pool.map(silent, hosts.values()))
    return [host for host, q in zip(hosts, quiet) if q]


def explain_comm_error(exc: BaseException, timeout: float) -> Optional[str]:
    """What a failed collective means, naming the peer's ranks and host where the transport's
    message gives its address (a closed or reset connection: the process or its node died),
    or dist.timeout where the peer never answered (hung, stopped, or a link gone silent). On a
    timeout inside a running world, the other hosts are probed (`_unreachable`) and the ones
    that do not answer on the network are named with their ranks. None for an error that is
    not about a peer."""
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    lost = re.search(r"(closed by peer|reset by peer|Connection refused|Broken pipe|"
                     r"Connection timed out|No route to host)", text, re.I)
    if lost:
        ips = list(dict.fromkeys(re.findall(r"\[?(\d{1,3}(?:\.\d{1,3}){3})\]?:\d+", text)))
        ranks = [r for r, p in enumerate(_PLACES) if p[1] in ips]
        if ranks:
            hosts = sorted({_PLACES[r][0] for r in ranks})
            return (f"lost contact with rank{'s' if len(ranks) > 1 else ''} "
                    f"{', '.join(map(str, ranks))} on {', '.join(hosts)} ({', '.join(ips)}): "
                    f"that process or its node is gone ({first})")
        return f"lost contact with a peer rank ({first})"
    if re.search(r"timed out|timeout", text, re.I) and not isinstance(exc, TimeoutError):
        hosts = ", ".join(dict.fromkeys(p[0] for p in _PLACES)) or "?"
        waited = f"a peer rank did not answer within dist.timeout={timeout:g} s"
        if not (_PLACES and dist.is_initialized()):  # no world of ours to probe
            return f"{waited}: one of the ranks on {hosts} is hung, stopped or cut off ({first})"
        mine = _PLACES[dist.get_rank()][0]
        others = {p[0]: p[1] for p in _PLACES if p[0] != mine and p[1] != "?"}
        wait = min(5.0, max(1.0, timeout / 10))
        gone = _unreachable(others, wait)
        if not gone:
            return (f"{waited}: one of the ranks on {hosts} is hung or stopped (every other "
                    f"host answers on the network) ({first})")
        named = []
        for host in gone:
            ranks = [str(r) for r, p in enumerate(_PLACES) if p[0] == host]
            named.append(f"{host} ({others[host]}; rank{'s' if len(ranks) > 1 else ''} "
                         f"{', '.join(ranks)})")
        return (f"{waited}, and {'; '.join(named)} {'is' if len(named) == 1 else 'are'} "
                f"unreachable from {mine} (no answer on the network within {wait:g} s): that "
                f"node or its link is down ({first})")
    return None


class MegatronMPU:
    """megatron-core's parallel_state under the names DeepSpeed asks an `mpu` for
    ("model parallel" = tensor parallel, as in Megatron-DeepSpeed)."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()


def all_true(flag: bool) -> bool:
    """True only if every rank's flag is True."""
    if not dist.is_initialized():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def dp_mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """A detached float copy of `value` averaged over the data-parallel group (what a
    1-process run would compute for the whole batch); on `world.device`."""
    from megatron.core import parallel_state as ps

    value = value.detach().float().to(world.device).clone()
    if world.dp > 1:
        dist.all_reduce(value, group=ps.get_data_parallel_group())
        value /= world.dp
    return value


def any_true(flag: bool) -> bool:
    return not all_true(not flag)


def from_main(value):
    """Rank 0's `value`, on every rank (itself when there is no process group)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_union(items: set) -> set:
    """The union of every rank's `items` (a set of picklable values)."""
    if not dist.is_initialized():
        return set(items)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, sorted(items))
    return set().union(*map(set, parts))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown(clean: bool = True) -> None:
    """barrier + destroy: gloo may abort at exit otherwise. After a failure (`clean` False)
    no barrier, which would fail or wait on the peers that are gone, and nothing raised: the
    failure that got us here is the one to report."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return
    try:
        if clean:
            dist.barrier()
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()
    except Exception:
        if clean:
            raise
