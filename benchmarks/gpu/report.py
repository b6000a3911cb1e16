"""The suite's report: every section's Part merged into OUT/gpu_results.json and
OUT/gpu_results.md, each section module rendering its own part of the markdown."""

from __future__ import annotations

import json
import os

from . import gen, generate, profiling, sdpa, throughput, train, trainer_scale
from .common import md_cell, md_table
from .results import atomic_write, json_safe, load_parts


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
