#!/usr/bin/env python3
"""Samples, once a second, how much CPU processes *outside* the benchmark use.

    python3 bench/monitor.py OUT.jsonl PGID

The benchmark (bench/run.sh and everything it starts) runs in process group PGID; any other
process is foreign (another build, another test suite). Each line of OUT.jsonl:
{"t": unix time, "foreign_cpu_pct": CPU used by foreign processes over the last second, in % of
one core (200 = both cores), "top": the three biggest foreign users, "kernel_cpu_pct": kernel
threads (writeback, softirq; partly caused by the benchmark itself), "steal_pct": time the
hypervisor gave the VM's CPUs to someone else}. The report shows these for each measurement
window, so a figure taken while the machine was shared says so.
"""

import json
import os
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def steal_ticks():
    with open("/proc/stat") as f:
        cpu = f.readline().split()
    return int(cpu[8])


def sample(own_pgid):
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        # fields[0] is state (field 3); pgrp is field 5, utime 14, stime 15.
        pgid, utime, stime = int(fields[2]), int(fields[11]), int(fields[12])
        # pgid 0: kernel threads (softirq work for our own loopback traffic lands there too).
        if pgid == 0:
            out[int(pid)] = ("[kernel]", utime + stime)
        elif pgid != own_pgid:
            out[int(pid)] = (comm, utime + stime)
    return out


def main():
    path, own = sys.argv[1], int(sys.argv[2])
    prev, prev_t, prev_steal = sample(own), time.monotonic(), steal_ticks()
    with open(path, "a") as f:
        while True:
            time.sleep(1)
            cur, now, st = sample(own), time.monotonic(), steal_ticks()
            used, kernel = [], 0.0
            for pid, (comm, ticks) in cur.items():
                before = prev.get(pid, (comm, ticks if pid in prev else 0))[1]
                delta = (ticks - before) / TICK / (now - prev_t) * 100
                if delta > 0 and comm == "[kernel]":
                    kernel += delta
                elif delta > 0:
                    used.append((delta, comm))
            used.sort(reverse=True)
            f.write(json.dumps({"t": time.time(), "foreign_cpu_pct": round(sum(u for u, _ in used), 1),
                                "top": [f"{c}:{u:.0f}" for u, c in used[:3]], "kernel_cpu_pct": round(kernel, 1),
                                "steal_pct": round((st - prev_steal) / TICK / (now - prev_t) * 100, 1)}) + "\n")
            f.flush()
            prev, prev_t, prev_steal = cur, now, st


if __name__ == "__main__":
    main()
