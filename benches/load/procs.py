#!/usr/bin/env python3
"""Who else used the CPU during a run (benches/load.sh's noise diagnostics).

usage: procs.py snap FILE          -- save utime+stime of every process
       procs.py diff FILE EXCLUDE  -- top 3 other consumers since FILE, as JSON
EXCLUDE is a space-separated list of pids (proxy, mock, wrk, this script's parents).
Processes that started and ended within the run are not seen.
"""
import json
import os
import sys


def snapshot():
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        out[pid] = (comm, ticks)
    return out


def main():
    if sys.argv[1] == "snap":
        with open(sys.argv[2], "w") as f:
            json.dump(snapshot(), f)
        return
    with open(sys.argv[2]) as f:
        before = json.load(f)
    exclude = set(sys.argv[3].split())
    hz = os.sysconf("SC_CLK_TCK")
    deltas = []
    for pid, (comm, ticks) in snapshot().items():
        if pid in exclude:
            continue
        d = ticks - (before.get(pid, (comm, 0))[1] if pid in before else 0)
        if d > 0:
            deltas.append((d / hz, f"{comm}[{pid}]"))
    deltas.sort(reverse=True)
    print(json.dumps([{"process": p, "cpu_s": round(s, 2)} for s, p in deltas[:3]]))


if __name__ == "__main__":
    main()
