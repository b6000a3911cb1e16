"""The results store: each section's Part (OUT/parts/NAME.json), merged into
OUT/gpu_results.json and OUT/gpu_results.md after every change; `record` turns one
measurement (or its exception) into an entry."""

from __future__ import annotations

import glob
import json
import math
import os
import time
import traceback

from .common import log, md_cell, md_table


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
    """One section's results, in OUT/parts/NAME.json; every change rewrites the merged
    OUT/gpu_results.json and .md."""

    def __init__(self, out: str, name: str, order: int, **fields):
        self.out, self.path = out, os.path.join(out, "parts", f"{name}.json")
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
        write_results(self.out)


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


def write_results(out: str) -> dict:
    parts = load_parts(out)
    meta = parts.pop("meta", {})
    env = parts.pop("env", {}).get("env", {})
    throughput = [e for name, p in parts.items() if name.startswith("throughput")
                  for e in p.get("entries", [])]
    counts = {}
    for p in parts.values():
        for e in p.get("entries", []):
            counts[e.get("status", "?")] = counts.get(e.get("status", "?"), 0) + 1
    res = {"suite": "ponder-pt benchmarks/gpu_suite.py", "smoke": meta.get("smoke"),
           "argv": meta.get("argv"), "started": meta.get("started_at"),
           "finished": meta.get("finished_at"), "wall_s": meta.get("wall_s"),
           "budget_s": meta.get("budget_s"), "status_counts": counts, "env": env,
           "sections": parts, "throughput": throughput}
    atomic_write(os.path.join(out, "gpu_results.json"), json.dumps(json_safe(res), indent=1))
    atomic_write(os.path.join(out, "gpu_results.md"), render_md(res))
    return res


def render_md(res: dict) -> str:
    # each section module renders its own part of the report, in this order
    from . import gen, generate, profiling, sdpa, throughput, train, trainer_scale

    env, secs = res.get("env", {}), res.get("sections", {})
    out = ["# ponder-pt GPU suite" + (" (smoke: CPU, toy shapes)" if res.get("smoke") else ""),
           "", f"wall {md_cell(res.get('wall_s'))} s of a {md_cell(res.get('budget_s'))} s "
           f"budget; entries by status: {res.get('status_counts')}", "", "## Environment", ""]
    out.append(md_table(["key", "value"], [[k, v] for k, v in env.items()]))
    out += ["", "## Sections", ""]
    out.append(md_table(["section", "status", "wall s", "entries"],
                        [[n, p.get("status"), p.get("wall_s"), len(p.get("entries", []))]
                         for n, p in secs.items()]))
    for module in (sdpa, train, generate, gen, trainer_scale, throughput, profiling):
        out += module.markdown(res)
    errs = [(n, e) for n, p in secs.items() for e in p.get("entries", [])
            if e.get("status") == "error"]
    if errs:
        out += ["", "## Errors", ""]
        for n, e in errs:
            out.append(f"- {n} / {e['name']}: {e.get('error', '')[:300]}")
    return "\n".join(out) + "\n"


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
