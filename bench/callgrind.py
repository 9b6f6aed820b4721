#!/usr/bin/env python3
"""Instructions per webhook delivery, counted by callgrind: the service against the floor.

    python3 bench/callgrind.py --bin target/release/rollback-responder \
        --floor target/release/bench-floor [--alerts 1 10 100] [--kinds new repeated] [--keep DIR]

Run by bench/callgrind.sh (which builds both). Unlike wall-clock figures, instruction counts
do not move with whatever else the machine is doing, so they are the figure to steer by.

For every kind (new: alerts never seen before; repeated: the same groups re-sent) and size
(alerts per delivery), each server runs under `valgrind --tool=callgrind` twice, once for N
deliveries and once for M, on a fresh SQLite file; (I_M - I_N) / (M - N) is the cost of one
delivery, with start-up, migrations and shutdown removed. Deliveries go one at a time over one
keep-alive connection, so nothing depends on how requests happen to overlap.

Three servers:
  floor     bench/floor: parses the same payload into the same typed structs and answers 200.
  to 2xx    the service with `workers.decide: false`: authenticate, parse, store durably
            (the 2xx after the fdatasync of its commit), answer. Nothing is decided.
  decided   the service as it runs: the same, and every alert decided (a policy matches: the
            first alert of each service opens an incident awaiting approval, the others join
            it; timeline event per alert). Measured once no alert is pending.

Under valgrind the service runs some 50 times slower, so its decision batches, which end after
2 ms, would end after one alert; `workers.decision_batch_budget=1s` makes them end on count
(32 alerts, or 8 when deliveries are waiting), as they do natively. The worker tick is set to
an hour, so time-driven work (due incidents, orphaned work, once a second) does not grow with
the slower run. The client waits for the listening socket in /proc/net/tcp, not by requests,
and reads the store for "nothing pending" from the SQLite file, not through the service: no
instruction of the waiting is charged to a server.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

TOKEN = "bench-callgrind-token"
SERVICES = 10
# (N, M) deliveries per size: enough that the difference dwarfs run-to-run noise, few enough
# that the whole run takes a couple of minutes under valgrind.
COUNTS = {1: (100, 300), 10: (100, 300), 100: (10, 30)}

ALERT = (
    '{{"status":"firing","labels":{{"alertname":"HighErrorRate","env":"prod",'
    '"instance":"10.0.{a}.{b}:8080","job":"{svc}","service":"{svc}","severity":"critical"}},'
    '"annotations":{{"description":"5xx ratio above 5% on {svc} for the last 5 minutes",'
    '"runbook_url":"https://runbooks.example.com/{svc}/high-error-rate","summary":"{svc} high error rate"}},'
    '"startsAt":"{starts}","endsAt":"0001-01-01T00:00:00Z",'
    '"generatorURL":"http://prometheus.example.com:9090/graph?g0.expr=job%3A5xx_ratio%3Arate5m+%3E+0.05&g0.tab=1",'
    '"fingerprint":"{fp}"}}'
)
NOTIFICATION = (
    '{{"receiver":"rollback-responder","status":"firing","alerts":[{alerts}],'
    '"groupLabels":{{"alertname":"HighErrorRate","service":"{svc}"}},'
    '"commonLabels":{{"alertname":"HighErrorRate","env":"prod","job":"{svc}","service":"{svc}","severity":"critical"}},'
    '"commonAnnotations":{{}},"externalURL":"http://alertmanager.example.com:9093","version":"4",'
    '"groupKey":"{{}}:{{alertname=\\"HighErrorRate\\", service=\\"{svc}\\"}}","truncatedAlerts":0}}'
)

POLICY = """name: svc-{i}
service: svc-{i}
matchers: ['service="svc-{i}"']
target:
  alb:
    listener_arn: arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/svc-{i}/1234567890123456/1234567890123456
    stable_target_group_arn: arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/svc-{i}-stable/1234567890123456
triggers:
  - name: errors
    matchers: ['alertname="HighErrorRate"']
    for: 0s
    mode: manual
approval:
  approvers:
    slack_groups: [S0BENCH]
  timeout: 1h
  on_timeout: escalate
"""


def delivery(kind, alerts, seq):
    """The body of delivery `seq`: new alerts have a fingerprint and startsAt of their own;
    repeated ones cycle through SERVICES fixed groups."""
    if kind == "new":
        svc = f"svc-{seq % SERVICES}"
        starts = f"2026-12-01T10:00:00.{seq:09d}Z"
        fps = [f"{seq:013x}{i:03x}" for i in range(alerts)]
    else:
        g = seq % SERVICES
        svc = f"svc-{g}"
        starts = "2026-12-01T10:00:00.000Z"
        fps = [f"{g:08x}{i:08x}" for i in range(alerts)]
    body = ",".join(
        ALERT.format(a=(i // 256) % 256, b=i % 256, svc=svc, starts=starts, fp=fp) for i, fp in enumerate(fps)
    )
    return NOTIFICATION.format(alerts=body, svc=svc).encode()


def listening(port):
    """Whether something listens on 127.0.0.1:port (read from /proc: costs the server nothing)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(line.split()[1] == want and line.split()[3] == "0A" for line in f.readlines()[1:])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pending(db):
    """Alerts stored and alerts not yet decided, read from the SQLite file."""
    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            stored, waiting = c.execute("SELECT COUNT(*), COALESCE(SUM(pending), 0) FROM alerts").fetchone()
        finally:
            c.close()
        return stored, waiting
    except sqlite3.Error:
        return 0, -1


class Run:
    """One server under callgrind, from start to exit; `instructions` once it has exited."""

    def __init__(self, args, server, work, label):
        self.port = free_port()
        self.out = os.path.join(work, f"callgrind.{label}.out")
        self.db = os.path.join(work, f"{label}.db")
        self.server = server
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}", "--dump-line=no"]
        env = dict(os.environ)
        if server in ("floor", "floor-alloc"):
            cmd += [args.floor if server == "floor" else args.floor_same_alloc, f"127.0.0.1:{self.port}"]
        else:
            cmd += [args.bin, "serve", "--listen", f"127.0.0.1:{self.port}"]
            env.update(
                {
                    "ROLLBACK_RESPONDER__STORE__URL": f"sqlite://{self.db}",
                    "ROLLBACK_RESPONDER__POLICIES_DIR": args.policies,
                    "ROLLBACK_RESPONDER__WEBHOOK__BEARER_TOKEN": TOKEN,
                    "ROLLBACK_RESPONDER__LOG__LEVEL": "warn",
                    "ROLLBACK_RESPONDER__WORKERS__TICK": "1h",
                    "ROLLBACK_RESPONDER__WORKERS__LEASE": "3h",
                    "ROLLBACK_RESPONDER__WORKERS__DECISION_BATCH_BUDGET": "1s",
                    "ROLLBACK_RESPONDER__WORKERS__DECIDE": "true" if server == "decided" else "false",
                    "ROLLBACK_RESPONDER__SERVER__SHUTDOWN_GRACE": "2s",
                }
            )
        self.log = open(os.path.join(work, f"{label}.log"), "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 120
        while not listening(self.port):
            if self.proc.poll() is not None:
                raise SystemExit(f"{label}: exited with {self.proc.returncode}; see {self.log.name}")
            if time.monotonic() > end:
                raise SystemExit(f"{label}: not listening after 120 s; see {self.log.name}")
            time.sleep(0.05)
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def post(self, body, kind, alerts):
        headers = {"Content-Type": "application/json", "User-Agent": "Alertmanager/0.25.0"}
        if not self.server.startswith("floor"):
            headers["Authorization"] = f"Bearer {TOKEN}"
        self.conn.request("POST", "/webhook/alertmanager", body=body, headers=headers)
        r = self.conn.getresponse()
        text = r.read()
        if r.status != 200:
            raise SystemExit(f"{self.server}: {r.status} {text[:300]!r}")
        if not self.server.startswith("floor") and kind is not None:
            # The service says what it stored: a new delivery must be stored, a repeat not.
            got = json.loads(text)
            key = "stored" if kind == "new" else "duplicates"
            if got[key] != alerts:
                raise SystemExit(f"{self.server}: expected {key}={alerts}, got {got}")

    def wait_decided(self, expected):
        end = time.monotonic() + 600
        while True:
            stored, waiting = pending(self.db)
            if stored >= expected and waiting == 0:
                return
            if time.monotonic() > end:
                raise SystemExit(f"decisions not done after 600 s: {stored} stored, {waiting} pending")
            time.sleep(0.05)

    def stop(self):
        self.conn.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise SystemExit(f"{self.server}: did not stop after SIGTERM")
        self.log.close()
        with open(self.out) as f:
            text = f.read()
        m = re.search(r"^totals:\s+(\d+)", text, re.M) or re.search(r"^summary:\s+(\d+)", text, re.M)
        if not m:
            raise SystemExit(f"no totals in {self.out}")
        return int(m.group(1))


def measure(args, server, kind, alerts, n, work):
    """Total instructions of one run with `n` counted deliveries."""
    label = f"{server}-{kind}-{alerts}-{n}"
    run = Run(args, server, work, label)
    seq = 0
    if kind == "repeated":
        # Every group stored (and decided) once before the counted re-sends, in both runs.
        for g in range(SERVICES):
            run.post(delivery(kind, alerts, g), None, alerts)
        seq = SERVICES
        if server == "decided":
            run.wait_decided(SERVICES * alerts)
    for k in range(n):
        run.post(delivery(kind, alerts, seq + k), kind, alerts)
    if server == "decided":
        run.wait_decided((n if kind == "new" else SERVICES) * alerts)
    total = run.stop()
    if args.keep:
        shutil.copy(run.out, args.keep)
        if os.path.exists(run.db):
            # The store as the run left it (checkpointed at shutdown): what the rows look like.
            shutil.copy(run.db, args.keep)
    for p in (run.db, run.db + "-wal", run.db + "-shm"):
        if os.path.exists(p):
            os.unlink(p)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--floor", required=True)
    ap.add_argument("--floor-same-alloc", metavar="PATH",
                    help="the floor built with the service's allocator (bench/floor --features mimalloc):"
                         " measured too, and the ratios to it printed in a second table")
    ap.add_argument("--alerts", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--kinds", nargs="+", default=["new", "repeated"], choices=["new", "repeated"])
    ap.add_argument("--servers", nargs="+", default=["floor", "to-2xx", "decided"],
                    choices=["floor", "floor-alloc", "to-2xx", "decided"])
    ap.add_argument("--counts", type=int, nargs=2, metavar=("N", "M"),
                    help="deliveries of the two runs for every size (default: per size, see COUNTS)")
    ap.add_argument("--keep", help="copy every callgrind output here (for callgrind_annotate)")
    ap.add_argument("--json", help="append one JSON line per result here")
    args = ap.parse_args()
    if args.floor_same_alloc and "floor-alloc" not in args.servers:
        args.servers.insert(1, "floor-alloc")
    if "floor-alloc" in args.servers and not args.floor_same_alloc:
        raise SystemExit("--servers floor-alloc needs --floor-same-alloc PATH")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is required (Debian: apt-get install -y valgrind)")
    for a in args.alerts:
        if a not in COUNTS:
            raise SystemExit(f"--alerts: one of {sorted(COUNTS)}")
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    work = tempfile.mkdtemp(prefix="rr-callgrind.")
    args.policies = os.path.join(work, "policies")
    os.makedirs(args.policies)
    for i in range(SERVICES):
        with open(os.path.join(args.policies, f"svc-{i}.yaml"), "w") as f:
            f.write(POLICY.format(i=i))
    started = time.monotonic()
    rows = []
    try:
        for kind in args.kinds:
            for alerts in args.alerts:
                n, m = args.counts or COUNTS[alerts]
                per = {}
                for server in args.servers:
                    t0 = time.monotonic()
                    i_n = measure(args, server, kind, alerts, n, work)
                    i_m = measure(args, server, kind, alerts, m, work)
                    per[server] = (i_m - i_n) / (m - n)
                    print(f"[callgrind] {kind:8} {alerts:3} alerts {server:8}: {per[server]:>12,.0f} instructions"
                          f" per delivery (N={n}: {i_n:,}, M={m}: {i_m:,}; {time.monotonic() - t0:.0f} s)",
                          file=sys.stderr, flush=True)
                row = {"kind": kind, "alerts": alerts, "n": n, "m": m, "per_delivery": per}
                rows.append(row)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def ratio(per, server, floor):
        if server not in per or floor not in per:
            return "-"
        return f"**{per[server] / per[floor]:.2f}x**"

    def count(per, server):
        return f"{per[server]:,.0f}" if server in per else "-"

    floors = [("floor", "floor")]
    if "floor-alloc" in args.servers:
        floors.append(("floor-alloc", "floor with the service's allocator"))
    for i, (floor, name) in enumerate(floors):
        if i:
            print()
        print(f"| kind | alerts per delivery | {name}, instructions per delivery | service to the 2xx | / floor"
              " | service to decided | / floor |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            p = r["per_delivery"]
            print(f"| {r['kind']} | {r['alerts']} | {count(p, floor)} | {count(p, 'to-2xx')}"
                  f" | {ratio(p, 'to-2xx', floor)} | {count(p, 'decided')} | {ratio(p, 'decided', floor)} |")
    print("\n(I_M - I_N) / (M - N) per delivery, N/M = "
          + ", ".join(f"{r['alerts']} alerts: {r['n']}/{r['m']}" for r in rows if r["kind"] == rows[0]["kind"])
          + f"; {time.monotonic() - started:.0f} s in all")


if __name__ == "__main__":
    main()
