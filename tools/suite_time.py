#!/usr/bin/env python
"""Where the test suite's time goes, against a committed baseline (`make test` runs it last).

    python tools/suite_time.py                 # the last run (.pytest-durations.json) vs
                                               # tests/durations.json: the tests that grew
    python tools/suite_time.py --update        # make the last full run the new baseline

tests/conftest.py writes .pytest-durations.json at the end of every pytest run: each test's
setup + call + teardown seconds, the run's wall time and its xdist worker count. The budget is
a fresh-clone `.ci/run` within 25 minutes on a quiet 2-core machine, installs included, so
`make test` itself must stay well under it. This is a report, never a test failure: timings on
a shared machine vary, and a test that grew for a reason is still right.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(REPO, "tests", "durations.json")
LAST_RUN = os.path.join(REPO, ".pytest-durations.json")
BUDGET_S = 25 * 60  # the whole .ci/run


def load(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def by_file(tests: dict) -> dict:
    files: dict = {}
    for nodeid, secs in tests.items():
        path = nodeid.split("::")[0]
        files[path] = files.get(path, 0.0) + secs
    return files


def grown(base: dict, last: dict, ratio: float, min_s: float) -> list:
    """(nodeid, base s, last s) of tests that take `ratio` times and `min_s` seconds more."""
    rows = [(k, base[k], v) for k, v in last.items()
            if k in base and v > ratio * base[k] and v - base[k] > min_s]
    return sorted(rows, key=lambda r: r[1] - r[2])


def report(base: dict, last: dict, ratio: float, min_s: float, top: int) -> list[str]:
    bt, lt = base["tests"], last["tests"]
    full = set(bt) <= set(lt)
    lines = [f"suite time: {len(lt)} tests, wall {last['wall_s'] / 60:.1f} min with "
             f"{last.get('workers') or 1} worker(s), {sum(lt.values()) / 60:.1f} min summed"
             + ("" if full else f" (a partial run: {len(set(bt) - set(lt))} baseline tests "
                                f"did not run)")]
    if full:
        lines.append(f"  baseline: wall {base['wall_s'] / 60:.1f} min, "
                     f"{sum(bt.values()) / 60:.1f} min summed; budget for the whole .ci/run "
                     f"(installs included): {BUDGET_S / 60:.0f} min")
    rows = grown(bt, lt, ratio, min_s)
    if rows:
        lines.append(f"  grew by more than {ratio:g}x and {min_s:g} s:")
        lines += [f"    {b:7.1f} s -> {v:7.1f} s  {k}" for k, b, v in rows]
    new = sorted(((v, k) for k, v in lt.items() if k not in bt and v > min_s), reverse=True)
    if new:
        lines.append(f"  new since the baseline, over {min_s:g} s:")
        lines += [f"    {v:7.1f} s  {k}" for v, k in new]
    if not rows and not new:
        lines.append(f"  no test grew by more than {ratio:g}x and {min_s:g} s")
    bf, lf = by_file(bt), by_file(lt)
    lines.append(f"  slowest files (summed seconds; baseline in brackets):")
    for path, secs in sorted(lf.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {secs:7.1f} s ({bf.get(path, 0.0):7.1f})  {path}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--last", default=LAST_RUN)
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--ratio", type=float, default=1.5, help="report tests this many times slower")
    ap.add_argument("--min-s", type=float, default=5.0, help="...and at least this much slower")
    ap.add_argument("--top", type=int, default=10, help="how many files to list")
    ap.add_argument("--update", action="store_true",
                    help="write the last run as the baseline (only a full, passing run)")
    args = ap.parse_args(argv)
    if not os.path.exists(args.last):
        print(f"suite time: no {os.path.relpath(args.last, REPO)} yet (run make test)")
        return 0
    last = load(args.last)
    if args.update:
        if last.get("exitstatus") != 0 or "-m" in last.get("args", []):
            print("suite time: the last run failed or selected tests with -m; not a baseline",
                  file=sys.stderr)
            return 2
        with open(args.baseline, "w") as fh:
            json.dump({k: last[k] for k in ("wall_s", "workers", "tests")}, fh, indent=0)
            fh.write("\n")
        print(f"suite time: {os.path.relpath(args.baseline, REPO)} now holds "
              f"{len(last['tests'])} tests, wall {last['wall_s'] / 60:.1f} min")
        return 0
    if not os.path.exists(args.baseline):
        print(f"suite time: no baseline at {args.baseline}; make one with --update")
        return 0
    print("\n".join(report(load(args.baseline), last, args.ratio, args.min_s, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
