"""The files of a native checkpoint directory (`checkpoint.dir`), read and written without
DeepSpeed or a model:

    run_config.yaml           the resolved run config (written by the trainer / convert from-hf)
    step_00000100/            DeepSpeed's files (model/optimizer shards) + rng_rankNNNNN.pt
    step_00000100/ponder_meta.json   written last, after every file of the tag: lists each
                                     file with its size (the "complete" marker), the step,
                                     the layout and the trainer's state
    latest                    the newest complete tag (DeepSpeed's format)

Every write here is atomic (a temporary file renamed into place), so a crash leaves the old
version or the new one, never half a file. Standard library only: the config layer reads
checkpoint directories through it without loading torch (the tensors: `native`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

META = "ponder_meta.json"
LATEST = "latest"
RUN_CONFIG = "run_config.yaml"
CHECKPOINTS = "checkpoints"  # a run directory's checkpoint.dir unless set otherwise
_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointLoadError(RuntimeError):
    """A checkpoint cannot be used for this run, and falling back was not asked for (or would
    not help); the message says why and what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def file_sizes(root: str) -> dict[str, int]:
    """Every file under a tag directory (but the meta file itself) with its size in bytes."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name == META:
                continue
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = os.path.getsize(full)
    return out


def write_meta(ckpt_dir: str, tag: str, meta: dict) -> None:
    """Mark `tag` complete (`meta` lists its files: `file_sizes`) and make it `latest`."""
    atomic_write(os.path.join(ckpt_dir, tag, META), json.dumps(meta, indent=1))
    atomic_write(os.path.join(ckpt_dir, LATEST), tag)


def list_tags(ckpt_dir: str) -> list[str]:
    """Step tags present on disk, newest first (complete or not)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted((t for t in os.listdir(ckpt_dir) if _TAG.match(t)), reverse=True)


class Unverified(str):
    """`verify`'s reason why a tag is not known to be intact, with its `kind`:

    - "incomplete": no ponder_meta.json, a save that did not finish (never a checkpoint:
      skipped, and no failure);
    - "damaged": a file the meta lists is missing or has another size (provably broken:
      skipped for an older tag, and reported);
    - "unchecked": the meta cannot be read (an I/O or permission error), is no JSON object,
      or lists no files. The tag may be intact and the cause may pass, so this is a load
      failure: a resume stops on it unless checkpoint.fallback_to_older."""

    def __new__(cls, reason: str, kind: str):
        self = super().__new__(cls, reason)
        self.kind = kind
        return self


def verify(ckpt_dir: str, tag: str) -> Optional[Unverified]:
    """None when `tag` is complete and intact, else the reason it is not (`Unverified`)."""
    root = os.path.join(ckpt_dir, tag)
    try:
        meta = read_meta(ckpt_dir, tag)
    except FileNotFoundError:
        return Unverified("incomplete (no ponder_meta.json: the save did not finish)",
                          "incomplete")
    except (OSError, ValueError) as exc:
        return Unverified(f"cannot read its {META} ({type(exc).__name__}: {exc})",
                          "unchecked")
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return Unverified(f"its {META} lists no files: the tag cannot be checked",
                          "unchecked")
    for rel, size in files.items():
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            return Unverified(f"missing file {rel}", "damaged")
        if os.path.getsize(path) != size:
            return Unverified(f"truncated or altered file {rel} ({os.path.getsize(path)} != "
                              f"{size} bytes)", "damaged")
    return None


def read_meta(ckpt_dir: str, tag: str) -> dict:
    """`tag`'s ponder_meta.json: FileNotFoundError when there is none, another OSError when
    it cannot be read, ValueError when it is no JSON object."""
    path = os.path.join(ckpt_dir, tag, META)
    with open(path, encoding="utf-8") as fh:
        meta = json.load(fh)
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a JSON {type(meta).__name__}, not an object")
    return meta


def resolve_tag(ckpt_dir: str, tag: Optional[str] = None) -> str:
    """`tag`, else the newest complete tag (the one `latest` names when it is intact)."""
    if tag is not None:
        if not os.path.isdir(os.path.join(ckpt_dir, tag)):
            there = list_tags(ckpt_dir)
            raise ValueError(f"{ckpt_dir}: no tag {tag}; "
                             + (f"these exist: {', '.join(there)}" if there
                                else "it holds no step_NNNNNNNN tags"))
        reason = verify(ckpt_dir, tag)
        if reason is not None:
            raise ValueError(f"{ckpt_dir}/{tag}: {reason}")
        return tag
    for candidate in list_tags(ckpt_dir):
        if verify(ckpt_dir, candidate) is None:
            return candidate
    raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint (step_NNNNNNNN/ with "
                            "ponder_meta.json)")


def run_config_path(ckpt_dir: str) -> str:
    """`ckpt_dir`'s run_config.yaml; FileNotFoundError naming what is missing."""
    path = os.path.join(ckpt_dir, RUN_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the checkpoint directory needs the run "
                                "config the trainer writes next to the checkpoints")
    return path


def hf_source(path: str) -> Optional[str]:
    """The Hugging Face directory `path`'s weights came from: `path` itself when it is one,
    else the `source` that `convert from-hf` recorded in a tag's meta; None otherwise."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    for tag in list_tags(path):
        if verify(path, tag) is None:
            return read_meta(path, tag).get("source")
    return None


def newest_complete(ckpt_dir: str) -> Optional[str]:
    """The newest tag of `ckpt_dir` that is complete and intact, or None."""
    return next((t for t in list_tags(ckpt_dir) if verify(ckpt_dir, t) is None), None)


def checkpoint_dir(path: str) -> str:
    """The checkpoint directory a user means by `path`: `path` itself when it holds step tags,
    else a run directory's `checkpoints/` (`ponder-pt train --out DIR`) when that holds tags
    or a run config; `path` unchanged otherwise (the caller reports what is missing)."""
    inner = os.path.join(path, CHECKPOINTS)
    if (not list_tags(path) and os.path.isdir(inner)
            and (list_tags(inner) or os.path.exists(os.path.join(inner, RUN_CONFIG)))):
        return inner
    return path


def resume_source(ckpt_dir: str, load_dir: Optional[str]) -> str:
    """Where a run resumes from: `checkpoint.load` until `ckpt_dir` holds an intact checkpoint
    of the run's own, then `ckpt_dir` (a preempted, requeued or restarted run continues from
    its own progress, not from the checkpoint it started from)."""
    if not load_dir or os.path.realpath(load_dir) == os.path.realpath(ckpt_dir):
        return ckpt_dir
    if newest_complete(ckpt_dir) is not None:
        return ckpt_dir
    return checkpoint_dir(load_dir)
