"""Hugging Face Hub datasets with one clear line when the Hub cannot be reached.

`datasets.load_dataset` without network access (or with HF_DATASETS_OFFLINE=1 and nothing
cached) raises a ConnectionError wrapped in retries and tracebacks. Commands that accept a hub
name *or* a local directory (`finetune --task`, `sft --task`) call `load_hub_dataset` before
any process starts, so the user reads one line that names the dataset and the local option:

    from ponder_pt.data.hub import HubUnavailable, load_hub_dataset
    ds = load_hub_dataset("nyu-mll/glue", "rte", split="train",
                          local_hint="--task DIR with GLUE's RTE/train.tsv and dev.tsv")
"""

from __future__ import annotations

from typing import Optional

# exception class names (from datasets, huggingface_hub, requests, httpx, urllib3) that mean
# "the Hub could not be reached", matched by name so no optional package must be imported
_UNREACHABLE = {"ConnectionError", "ConnectTimeout", "ConnectError", "ReadTimeout", "Timeout",
                "TimeoutError", "LocalEntryNotFoundError", "OfflineModeIsEnabled",
                "MaxRetryError", "NewConnectionError", "NameResolutionError", "gaierror"}


class HubUnavailable(ValueError):
    """The Hub could not be reached (offline, no DNS, firewall) and nothing usable is cached.
    A ValueError, so the CLI prints its one-line message and exits with code 2."""


def hub_unreachable(exc: BaseException) -> bool:
    """True when `exc` (or anything in its cause/context chain) says the Hub is unreachable."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _UNREACHABLE for cls in type(exc).__mro__):
            return True
        if "Couldn't reach" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def hub_error_line(dataset: str, local_hint: str, exc: Optional[BaseException] = None) -> str:
    """The one line shown when `dataset` cannot be fetched: what, why, and the local option."""
    reason = ""
    if exc is not None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = f" ({first[:160]})"
    return (f"cannot reach the Hugging Face Hub for {dataset}{reason}; without Hub access use "
            f"a local directory instead: {local_hint}")


def load_hub_dataset(path: str, name: Optional[str] = None, *, split: Optional[str] = None,
                     local_hint: str, **kwargs):
    """`datasets.load_dataset(path, name, split=split, **kwargs)`; raises HubUnavailable with
    `hub_error_line` when the Hub cannot be reached. Cached datasets load offline as usual."""
    import datasets

    try:
        return datasets.load_dataset(path, name, split=split, **kwargs)
    except Exception as exc:  # noqa: BLE001 - classified below, re-raised unless unreachable
        if hub_unreachable(exc):
            label = f"{path}/{name}" if name else path
            raise HubUnavailable(hub_error_line(label, local_hint, exc)) from None
        raise
