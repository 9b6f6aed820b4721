#!/usr/bin/env python3
"""What SQLite alone can store on this disk: the ceiling under the intake throughput figures.

    taskset -c 1 python3 bench/sqlite_ceiling.py [--rows-per-tx 160] [--tx 1000]
        [--keys random|sequential] [--migrations 4]
    taskset -c 1 python3 bench/sqlite_ceiling.py --inbox 6000 --rows-per-tx 16 --tx 2000

Builds a fresh store from the service's own SQLite migrations (the first N of them), then
inserts alerts shaped like bench/lua/payload.lua's in transactions of --rows-per-tx rows, each
committed with WAL + synchronous=FULL (an fsync per commit, as the service does), with one
multi-row upsert per transaction and nothing else: no HTTP, no JSON, no Rust. Prints rows/s.
--keys random gives every alert a hash-like fingerprint, as Alertmanager does; sequential
fingerprints (as the wrk scripts send) land in index order. Compare --migrations 3 (before
issue 10's key change) with 4.

--inbox BYTES measures the design the service does not use (docs/benchmarks.md): one row per
webhook delivery holding its raw body of BYTES (a 10-alert notification of bench/lua/payload.lua
is about 6,000), the alerts to be expanded and deduplicated later; it prints deliveries/s.
"""

import argparse
import json
import os
import sqlite3
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIGRATIONS = os.path.join(ROOT, "src", "store", "migrations", "sqlite")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows-per-tx", type=int, default=160)
    ap.add_argument("--tx", type=int, default=1000)
    ap.add_argument("--keys", choices=["random", "sequential"], default="random")
    ap.add_argument("--migrations", type=int, default=len(os.listdir(MIGRATIONS)))
    ap.add_argument("--inbox", type=int, metavar="BYTES", help="one row per delivery of this many bytes")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="rr-sqlite-ceiling.") as work:
        db = sqlite3.connect(os.path.join(work, "store.db"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        try:
            if a.inbox:
                inbox(db, a)
            else:
                alerts(db, a, os.path.join(work, "store.db"))
        finally:
            db.close()


def alerts(db, a, path):
    for name in sorted(os.listdir(MIGRATIONS))[: a.migrations]:
        with open(os.path.join(MIGRATIONS, name)) as f:
            db.executescript(f.read())

    labels = json.dumps({"alertname": "HighErrorRate", "env": "prod", "instance": "10.0.0.1:8080",
                         "job": "svc-1", "service": "svc-1", "severity": "critical"})
    annotations = json.dumps({"description": "5xx ratio above 5% on svc-1 for the last 5 minutes",
                              "runbook_url": "https://runbooks.example.com/svc-1/high-error-rate",
                              "summary": "svc-1 high error rate"})
    generator = "http://prometheus.example.com:9090/graph?g0.expr=job%3A5xx_ratio%3Arate5m+%3E+0.05&g0.tab=1"
    group_key = '{}:{alertname="HighErrorRate", service="svc-1"}'
    sql = ("INSERT INTO alerts (fingerprint, starts_at, ends_at, status, alertname, labels, annotations, "
           "generator_url, group_key, external_url, received_at, updated_at, pending) VALUES "
           + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)"] * a.rows_per_tx)
           + " ON CONFLICT (fingerprint, starts_at) DO NOTHING")
    # Arguments built before the clock starts: only SQLite is measured.
    batches = []
    n = 0
    for _ in range(a.tx):
        args = []
        for _ in range(a.rows_per_tx):
            n += 1
            fp = os.urandom(8).hex() if a.keys == "random" else f"{n:016x}"
            starts_at = 1_764_000_000_000 + n  # "now", as a new alert's startsAt is
            args += [fp, starts_at, None, "firing", "HighErrorRate", labels, annotations, generator,
                     group_key, "http://alertmanager.example.com:9093", starts_at, starts_at]
        batches.append(args)
    t = time.perf_counter()
    for args in batches:
        db.execute("BEGIN")
        db.execute(sql, args)
        db.execute("COMMIT")
    dt = time.perf_counter() - t
    size = os.path.getsize(path)
    print(json.dumps({"migrations": a.migrations, "keys": a.keys, "rows_per_tx": a.rows_per_tx,
                      "rows_per_s": round(n / dt), "tx_per_s": round(a.tx / dt),
                      "db_mb": round(size / 1e6, 1), "sqlite": sqlite3.sqlite_version}))


def inbox(db, a):
    db.execute("CREATE TABLE inbox (id INTEGER PRIMARY KEY, received_at BIGINT NOT NULL, body TEXT NOT NULL)")
    body = ("x" * a.inbox)
    sql = "INSERT INTO inbox (received_at, body) VALUES " + ", ".join(["(?, ?)"] * a.rows_per_tx)
    args = [v for i in range(a.rows_per_tx) for v in (i, body)]
    t = time.perf_counter()
    for _ in range(a.tx):
        db.execute("BEGIN")
        db.execute(sql, args)
        db.execute("COMMIT")
    dt = time.perf_counter() - t
    print(json.dumps({"inbox_body_bytes": a.inbox, "deliveries_per_tx": a.rows_per_tx,
                      "deliveries_per_s": round(a.rows_per_tx * a.tx / dt), "tx_per_s": round(a.tx / dt),
                      "sqlite": sqlite3.sqlite_version}))


if __name__ == "__main__":
    main()
