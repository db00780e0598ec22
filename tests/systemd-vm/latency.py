#!/usr/bin/env python3
"""Reads `corral placements` (JSON on stdin) and a pid file; prints the
exec -> confined and exec -> in-unit latencies (p50, p99, in us) of those
pids as one JSON object, and how many were missing."""
import json
import sys

placements = json.load(sys.stdin)
pids = {int(l) for l in open(sys.argv[1]) if l.strip()}
by_pid = {p["pid"]: p for p in placements if p["pid"] in pids}


def pct(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(p / 100 * len(values) + 0.5)) - 1))]


confined = [(p["placed_ns"] - p["exec_ns"]) / 1000 for p in by_pid.values()]
joined = [(p["joined_ns"] - p["exec_ns"]) / 1000 for p in by_pid.values() if p.get("joined_ns")]
print(json.dumps({
    "n": len(pids),
    "placed": len(by_pid),
    "joined": len(joined),
    "confined_p50_us": pct(confined, 50),
    "confined_p99_us": pct(confined, 99),
    "in_unit_p50_us": pct(joined, 50),
    "in_unit_p99_us": pct(joined, 99),
}))
