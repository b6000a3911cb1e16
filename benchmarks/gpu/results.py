"""The results store: each section's Part (OUT/parts/NAME.json), handed to its `on_save`
after every change (the driver merges the parts into OUT/gpu_results.json and .md there:
`report.write_results`); `record` turns one measurement (or its exception) into an entry."""

from __future__ import annotations

import glob
import json
import math
import os
import time
import traceback
from typing import Callable, Optional

from .common import log


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def json_safe(x):
    """JSON-safe: NaN/inf become strings (so a reader can still see them)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


class Part:
    """One section's results, in OUT/parts/NAME.json; every change is saved and then passed
    to `on_save(out)`."""

    def __init__(self, out: str, name: str, order: int,
                 on_save: Optional[Callable[[str], object]] = None, **fields):
        self.out, self.path = out, os.path.join(out, "parts", f"{name}.json")
        self.on_save = on_save
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.data = {"name": name, "order": order, "status": "running",
                     "started": time.time(), "entries": [], **fields}
        self.save()

    def add(self, entry: dict) -> dict:
        self.data["entries"].append(entry)
        self.save()
        return entry

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.save()

    def finish(self, status: str = "done") -> None:
        self.data.update(status=status, wall_s=round(time.time() - self.data["started"], 1))
        self.save()

    def save(self) -> None:
        atomic_write(self.path, json.dumps(json_safe(self.data), indent=1))
        if self.on_save is not None:
            self.on_save(self.out)


def load_parts(out: str) -> dict:
    parts = {}
    for path in glob.glob(os.path.join(out, "parts", "*.json")):
        try:
            with open(path, encoding="utf-8") as fh:
                part = json.load(fh)
        except (OSError, json.JSONDecodeError):
            continue
        parts[part["name"]] = part
    return dict(sorted(parts.items(), key=lambda kv: (kv[1].get("order", 99), kv[0])))


def record(part: Part, name: str, fn, **fields) -> dict:
    """Run one measurement; its dict (or the exception) becomes an entry. Never raises."""
    t = time.perf_counter()
    log(f"{part.data['name']}: {name} ...")
    try:
        res = fn() or {}
        entry = {"name": name, **fields, "status": "ok", **res}
    except Exception as exc:  # noqa: BLE001 - every failure becomes an entry
        entry = {"name": name, **fields, "status": "error",
                 "error": f"{type(exc).__name__}: {exc}"[:3000],
                 "traceback": traceback.format_exc()[-4000:]}
    entry["seconds"] = round(time.perf_counter() - t, 2)
    part.add(entry)
    extra = entry.get("error") or entry.get("reason") or ""
    log(f"{part.data['name']}: {name} -> {entry['status']} ({entry['seconds']}s) {extra[:300]}")
    return entry
