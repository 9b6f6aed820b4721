#!/usr/bin/env python3
"""Turns bench/results/raw/ into the results table (stdout) and bench/results/latest.md.

    python3 bench/report.py bench/results/raw bench/results/latest.md

Every throughput figure is a ratio to the floor measured in the same run (same scenario, rounds
alternating floor, service). Numbers are printed as measured: no rounding beyond the shown
digits, and a target is "met" only if the measured value is on the right side of it.
"""

import json
import os
import sys
from statistics import mean

# 100 MB taken strictly as 10^8 bytes; VmHWM is in KiB.
RSS_LIMIT_KIB = 100_000_000 / 1024
MONITOR = []  # bench/monitor.py samples: CPU used by processes outside the benchmark


def foreign(windows, key="foreign_cpu_pct"):
    """Mean and max of a monitor figure (% of one core) over the samples inside the windows."""
    vals = [m.get(key, 0) for m in MONITOR for w in windows if w and w[0] <= m["t"] <= w[1]]
    if not vals:
        return "n/a"
    return f"{mean(vals):.0f} / {max(vals):.0f}"


def load(raw):
    runs = []
    path = os.path.join(raw, "runs.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            runs = [json.loads(line) for line in f if line.strip()]
    extra = {}
    for name in ("storm", "storm-burst", "ttr"):
        p = os.path.join(raw, f"{name}.json")
        if os.path.exists(p):
            with open(p) as f:
                extra[name] = json.load(f)
    mon = []
    mp = os.path.join(raw, "monitor.jsonl")
    if os.path.exists(mp):
        with open(mp) as f:
            mon = [json.loads(line) for line in f if line.strip()]
    MONITOR[:] = mon
    machine = open(os.path.join(raw, "machine.txt")).read().strip() if os.path.exists(os.path.join(raw, "machine.txt")) else ""
    return runs, extra, machine


def rps(w, ok_only=True):
    secs = w["duration_us"] / 1e6
    n = w["requests"] - (w["non2xx"] if ok_only else 0)
    return n / secs if secs else 0.0


def ms(us):
    return f"{us / 1000:.2f}"


def throughput(runs):
    rows, ratios = [], {}
    keys = []
    for r in runs:
        if r["section"] == "throughput":
            k = (r["backend"], r["kind"], r["alerts"])
            if k not in keys:
                keys.append(k)
    for backend, kind, alerts in keys:
        sel = [r for r in runs if r["section"] == "throughput" and (r["backend"], r["kind"], r["alerts"]) == (backend, kind, alerts)]
        floor = {r["round"]: r for r in sel if r["server"] == "floor"}
        svc = {r["round"]: r for r in sel if r["server"] == "service"}
        f_rps = [rps(floor[k]["wrk"]) for k in sorted(floor)]
        s_rps = [rps(svc[k]["wrk"]) for k in sorted(svc)]
        per_round = [rps(svc[k]["wrk"]) / rps(floor[k]["wrk"]) for k in sorted(svc) if k in floor]
        ratio = mean(s_rps) / mean(f_rps) if f_rps and s_rps else float("nan")
        ratios[(backend, kind, alerts)] = ratio
        last = svc[max(svc)]
        errors = sum(r["wrk"]["non2xx"] + r["wrk"]["timeouts"] + r["wrk"]["read_errors"] + r["wrk"]["connect_errors"]
                     for r in svc.values())
        stops = ",".join(sorted({r["run"]["stop"] for r in svc.values()}))
        rows.append(
            f"| {kind} | {backend} | {alerts} | {' / '.join(f'{x:,.0f}' for x in f_rps)} | "
            f"{' / '.join(f'{x:,.0f}' for x in s_rps)} | **{ratio:.3f}** ({' / '.join(f'{x:.3f}' for x in per_round)}) | "
            f"{mean(s_rps) * alerts:,.0f} | {ms(last['wrk']['p50_us'])} / {ms(last['wrk']['p99_us'])} | {errors} | "
            f"{last['store']['stored']:,} / {last['store']['pending']:,} | {last['vm_hwm_kb'] / 1024:.1f} | "
            f"{stops} {max(r['run']['stop_ms'] for r in svc.values()) / 1000:.1f} s | {foreign([r.get('window') for r in sel])} |")
    head = ("| kind | store | alerts per notification | floor req/s (per round) | service req/s, 2xx (per round) | "
            "service / floor (per round) | service alerts/s | service p50 / p99 ms (last round) | service errors | "
            "alerts stored / still unprocessed at the end (last round) | service VmHWM MiB | stop (SIGTERM/kill), slowest | "
            "foreign CPU % mean / max |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows), ratios


def fixed(runs):
    sel = [r for r in runs if r["section"] == "fixed"]
    rows = []
    for r in sel:
        l = r["load"]
        store = r.get("store") or {}
        rows.append(
            f"| {r['server']} | {r['kind']} | {l['rate']:.0f} | {l['achieved_rps']:,.0f} | {ms(l['p50_us'])} | "
            f"{ms(l['p90_us'])} | **{ms(l['p99_us'])}** | {ms(l['p999_us'])} | {ms(l['max_us'])} | "
            f"{l['ok']:,} / {l['non2xx']} / {l['errors']} | {ms(l['send_lag_p99_us'])} | "
            f"{(str(store.get('stored', '-')) + ' / ' + str(store.get('pending', '-'))) if store else '-'} | "
            f"{foreign([r.get('window')])} |")
    head = ("| server | kind | target notif/s | achieved | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | "
            "2xx / non-2xx / errors | send lag p99 ms | alerts stored / unprocessed at the end | foreign CPU % mean / max |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows), {(r["server"], r["kind"]): r["load"] for r in sel}


def main():
    raw, out_md = sys.argv[1], sys.argv[2]
    runs, extra, machine = load(raw)
    parts = ["# rollback-responder benchmark results", "", "Generated by `bash bench/run.sh`; see docs/benchmarks.md.", "",
             "```", machine, "```", ""]
    verdicts = []

    def verdict(name, ok, detail):
        verdicts.append(f"| {name} | {'met' if ok else '**MISSED**'} | {detail} |")

    ratios, fixed_loads = {}, {}
    if any(r["section"] == "throughput" for r in runs):
        table, ratios = throughput(runs)
        parts += ["## Throughput (wrk -t1, closed loop; service on a fresh SQLite file per run, WAL; each 2xx after the fdatasync of its commit)",
                  "", table, "",
                  "`sqlite-tmpfs` is a diagnostic, not durable: the SQLite file on /dev/shm, where fsync costs nothing. "
                  "`postgres` (if present): PostgreSQL 127.0.0.1:5432, its server processes not pinned. "
                  "Ratios are mean(service) / mean(floor) over the rounds; per-round ratios in brackets.", ""]
        r = ratios.get(("sqlite", "new", 10))
        if r is not None:
            verdict("new alerts, 10-alert payloads >= 0.5 x floor", r >= 0.5, f"{r:.3f} x floor")
        r = ratios.get(("sqlite", "repeated", 10))
        if r is not None:
            verdict("repeated notifications >= 0.7 x floor (10-alert payloads)", r >= 0.7, f"{r:.3f} x floor")
    if any(r["section"] == "fixed" for r in runs):
        table, fixed_loads = fixed(runs)
        parts += ["## Fixed rate (bench-loadgen, open loop, latency from the scheduled send time)", "", table, ""]
        l = fixed_loads.get(("service", "new"))
        if l is not None:
            ok = l["p99_us"] < 5000 and l["non2xx"] == 0 and l["errors"] == 0 and l["achieved_rps"] >= 0.98 * l["rate"]
            verdict(f"p99 < 5 ms at {l['rate']:.0f} notifications/s, 10 alerts, new alerts", ok,
                    f"p99 {ms(l['p99_us'])} ms, achieved {l['achieved_rps']:,.0f}/s, {l['non2xx']} non-2xx, {l['errors']} errors")
        l = fixed_loads.get(("service", "repeated"))
        if l is not None:
            ok = l["p99_us"] < 5000 and l["non2xx"] == 0 and l["errors"] == 0 and l["achieved_rps"] >= 0.98 * l["rate"]
            verdict(f"p99 < 5 ms at {l['rate']:.0f} notifications/s, 10 alerts, repeated", ok,
                    f"p99 {ms(l['p99_us'])} ms, achieved {l['achieved_rps']:,.0f}/s")
    windows = {r["name"]: r["window"] for r in runs if r["section"] == "window"}
    for name, title in (("storm", "100 notifications x 100 alerts, ~1 s, open loop"),
                        ("storm-burst", "the same, released within 0.1 s")):
        s = extra.get(name)
        if not s:
            continue
        hwm_kib = int(s["vm_hwm"].split()[0])
        parts += [f"## {'Storm' if name == 'storm' else 'Storm, burst'}: 10,000 distinct alerts for one service ({title})", "",
                  "| measure | value |", "|---|---|"]
        for k in ("alerts_sent", "notifications", "notifications_2xx", "send_seconds", "webhook_p50_ms", "webhook_p99_ms",
                  "webhook_max_ms", "alerts_stored", "alerts_still_pending", "incidents", "audit_rows", "timeline_events",
                  "modify_listener_calls", "listener_reverted", "storm_start_to_modify_s",
                  "storm_start_to_all_processed_s", "send_end_to_all_processed_s", "rss_before", "vm_hwm", "vm_rss_after",
                  "db_bytes"):
            v = s.get(k)
            parts.append(f"| {k} | {f'{v:.3f}' if isinstance(v, float) else v} |")
        parts.append(f"| foreign CPU % mean / max | {foreign([windows.get('storm')])} |")
        parts.append("")
        verdict(f"{name}: exactly one rollback", s["modify_listener_calls"] == 1 and s["incidents"] == 1,
                f"{s['modify_listener_calls']} ModifyListener, {s['incidents']} incident(s)")
        verdict(f"{name}: nothing lost", s["alerts_stored"] == s["alerts_sent"] and s["notifications_2xx"] == s["notifications"],
                f"{s['alerts_stored']:,} of {s['alerts_sent']:,} stored, {s['notifications_2xx']}/{s['notifications']} 2xx")
        done = s.get("storm_start_to_all_processed_s")
        verdict(f"{name}: every alert decided < 1 s from its start", done is not None and done < 1.0,
                f"{done:.3f} s from the start (sending took {s['send_seconds']:.3f} s; deciding trailed the last "
                f"delivery by {s.get('send_end_to_all_processed_s') or 0:.3f} s)" if done is not None else "never")
        verdict(f"{name}: peak RSS < 100 MB", hwm_kib < RSS_LIMIT_KIB, f"VmHWM {hwm_kib:,} KiB = {hwm_kib * 1024 / 1e6:.1f} MB")
    t = extra.get("ttr")
    if t:
        parts += [f"## Time to rollback ({t['measured']} incidents measured, after one warm-up incident)", "",
                  "webhook sent -> ModifyListener at the proxy; AWS = time inside ELBv2 calls before it (moto + proxy); "
                  "responder = the difference.", "",
                  "| ms | p50 | p99 | max | min |", "|---|---|---|---|---|"]
        for k, name in (("ttr_ms", "time to rollback"), ("aws_ms", "inside ELBv2 calls (moto + proxy)"),
                        ("own_ms", "**responder's own share**"), ("webhook_ms", "webhook round trip (part of the share)"),
                        ("to_first_call_ms", "webhook sent -> first ELBv2 call (part of the share)"),
                        ("modify_ms", "the ModifyListener call itself (after, not included)")):
            v = t[k]
            parts.append(f"| {name} | {v['p50']:.2f} | {v['p99']:.2f} | {v['max']:.2f} | {v['min']:.2f} |")
        parts += ["", f"ELBv2 calls before each ModifyListener: {'; '.join(t['calls_before_modify'])}. "
                      f"ModifyListener calls: {t['modify_listener_calls']} for {t['incidents']} incidents; "
                      f"listeners reverted: {t['listeners_reverted']}; incidents verified: {t['incidents_verified']}. "
                      f"Foreign CPU % mean / max: {foreign([windows.get('ttr')])}.", ""]
        verdict("responder's own share of time to rollback p99 < 10 ms", t["own_ms"]["p99"] < 10,
                f"p99 {t['own_ms']['p99']:.2f} ms (time to rollback p99 {t['ttr_ms']['p99']:.2f} ms)")
    if MONITOR:
        all_w = [r.get("window") for r in runs if r.get("window")]
        parts.insert(7, f"During the measurements (% of one core, mean / max of 1 s samples): processes outside the "
                        f"benchmark {foreign(all_w)}; kernel threads {foreign(all_w, 'kernel_cpu_pct')}; "
                        f"steal {foreign(all_w, 'steal_pct')}.\n")
    if verdicts:
        parts += ["## Targets", "", "| target | verdict | measured |", "|---|---|---|"] + verdicts + [""]
    text = "\n".join(parts)
    with open(out_md, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
