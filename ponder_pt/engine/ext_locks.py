"""Stale torch-extensions build locks.

DeepSpeed JIT-builds its C++ ops (the CPU shared-memory comm op in `init_distributed`,
FusedAdam and others on GPU) through torch.utils.cpp_extension, which holds
`<root>/<op>/lock` while it compiles. A build killed mid-way leaves the lock behind, and every
later build of that op waits on it forever, silently. A build takes a few minutes, so a lock
much older than that is almost certainly such a leftover: say so, with the fix, before
DeepSpeed starts waiting.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

STALE_AFTER_S = 600.0

_warned = False


@dataclass(frozen=True)
class StaleLock:
    path: str
    age_s: float


def extensions_root() -> str:
    """The folder holding one build directory per op, as torch computes it: TORCH_EXTENSIONS_DIR
    itself, else torch's default root plus `py<XY>_<cuXYZ|rocmX|cpu>`."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return root
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        accelerator = "cu" + torch.version.cuda.replace(".", "")
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{python}_{accelerator}")


def _locks(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(root), "*", "lock")))


def stale_locks(max_age_s: float = STALE_AFTER_S, root: Optional[str] = None,
                now: Optional[float] = None) -> list[StaleLock]:
    """Build locks under `root` (default: extensions_root()) last touched more than
    `max_age_s` seconds ago."""
    now = time.time() if now is None else now
    found = []
    for path in _locks(extensions_root() if root is None else root):
        try:
            age = now - os.path.getmtime(path)
        except OSError:  # removed by the build that held it
            continue
        if age > max_age_s:
            found.append(StaleLock(path, age))
    return found


def _age(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60} min"


def stale_lock_message(locks: list[StaleLock]) -> str:
    lines = [f"warning: {len(locks)} torch-extensions build lock(s) left by an interrupted "
             f"JIT build; DeepSpeed waits on them forever, without a message:"]
    lines += [f"  {lock.path} ({_age(lock.age_s)} old)" for lock in locks]
    paths = " ".join(lock.path for lock in locks)
    lines.append(f"  fix: unless a build is still running, `rm {paths}`, or set "
                 f"TORCH_EXTENSIONS_DIR to a fresh directory")
    return "\n".join(lines)


def warn_stale_locks(log: Optional[Callable[[str], None]] = None,
                     max_age_s: float = STALE_AFTER_S) -> list[StaleLock]:
    """Warn (stderr, or `log`) about stale locks, once per process; returns them. Every
    process on a node shares the cache, so only LOCAL_RANK 0 speaks."""
    global _warned
    if _warned or int(os.environ.get("LOCAL_RANK", "0") or 0) != 0:
        return []
    _warned = True
    try:
        locks = stale_locks(max_age_s)
    except Exception:  # a diagnostic only: never the reason a run fails
        return []
    if locks:
        message = stale_lock_message(locks)
        if log is None:
            print(message, file=sys.stderr, flush=True)
        else:
            log(message)
    return locks


def drop_stale_locks(since: float, root: Optional[str] = None,
                     log: Optional[Callable[[str], None]] = None) -> list[str]:
    """Remove the build locks touched at or after `since` (a time.time()): those a child
    process started then and killed mid-build left behind. Returns the removed paths."""
    removed = []
    for path in _locks(extensions_root() if root is None else root):
        try:
            if os.path.getmtime(path) >= since - 1:  # 1 s of slack for coarse mtimes
                os.remove(path)
                removed.append(path)
                if log is not None:
                    log(f"removed stale JIT-build lock {path}")
        except OSError:
            pass
    return removed
