#!/usr/bin/env python3
"""The two scenarios that end at AWS: the storm and time to rollback.

    python rollback_bench.py storm --bin target/release/rollback-responder --moto $MOTO_SERVER \
        --loadgen target/release/bench-loadgen --out bench/results/raw/storm.json
    python rollback_bench.py ttr --bin ... --moto ... --out bench/results/raw/ttr.json

Run with the moto venv's python (it has boto3). Everything listens on 127.0.0.1.

    service (taskset -c 1) --ELBv2--> counting proxy (this process) --> moto_server (taskset -c 0)

The proxy records every ELBv2 call: action, listener ARN, when it arrived and how long it took to
answer (moto's time, plus the proxy's own forwarding, which is thereby not charged to the
responder). Webhooks are sent from this process too, so arrival times and the proxy's records are
on one clock (time.perf_counter).

storm: 10,000 distinct alerts for one service within about a second (100 notifications of 100
       alerts, open loop, by bench-loadgen; --spread 0.1 releases them within 0.1 s, a burst). Checks: exactly one ModifyListener, every alert
       stored (rows in the alerts table), peak RSS (VmHWM) of the service.
ttr:   100 incidents, one at a time, each for its own policy and listener. Time to rollback =
       ModifyListener arriving at the proxy - webhook sent; the responder's share = that minus the
       time spent inside the ELBv2 calls before it.
"""

import argparse
import http.client
import http.server
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import boto3

TOKEN = "bench-webhook-token"
CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, deadline_s=30, method="GET", proc=None):
    end = time.monotonic() + deadline_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{url}: the process exited with {proc.returncode} before answering")
        try:
            req = urllib.request.Request(url, method=method)
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status < 300:
                    return
        except Exception:
            pass
        if time.monotonic() > end:
            raise SystemExit(f"{url} not ready after {deadline_s}s")
        time.sleep(0.05)


def pct(values, p):
    """Nearest-rank percentile."""
    if not values:
        return None
    s = sorted(values)
    k = max(1, -(-len(s) * p // 100))
    return s[int(k) - 1]


# ---------------------------------------------------------------- counting proxy in front of moto


class Calls:
    def __init__(self):
        self.lock = threading.Condition()
        self.records = []  # dicts: action, listener, t_in, t_out

    def add(self, rec):
        with self.lock:
            self.records.append(rec)
            self.lock.notify_all()

    def wait_for(self, pred, timeout):
        end = time.perf_counter() + timeout
        with self.lock:
            while True:
                hit = next((r for r in self.records if pred(r)), None)
                if hit is not None:
                    return hit
                left = end - time.perf_counter()
                if left <= 0:
                    return None
                self.lock.wait(left)

    def snapshot(self):
        with self.lock:
            return list(self.records)


def make_proxy(moto_port, calls):
    local = threading.local()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def setup(self):
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def handle_one_request(self):
            # A call arrives when its first bytes do, not when Python has parsed its request
            # line and headers (0.1-0.3 ms per call here, which would be charged to the
            # responder): wait for data, note the time, then let the base class parse.
            try:
                self.rfile.peek(1)
            except OSError:
                pass
            self.t_arrived = time.perf_counter()
            super().handle_one_request()

        def do_POST(self):
            t_in = self.t_arrived
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
            action = form.get("Action", ["?"])[0]
            listener = form.get("ListenerArn", form.get("ListenerArns.member.1", [None]))[0]
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
            conn = getattr(local, "conn", None)
            for attempt in (1, 2):
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection("127.0.0.1", moto_port, timeout=30)
                        local.conn = conn
                    conn.request("POST", self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    break
                except (http.client.HTTPException, OSError):
                    conn = local.conn = None
                    if attempt == 2:
                        raise
            # Status, headers and body in one write on a TCP_NODELAY socket: split writes would
            # meet the client's delayed ACK (Nagle) and add ~40 ms that moto never spent.
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("content-length", "connection", "keep-alive", "transfer-encoding", "server", "date"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self._headers_buffer.append(b"\r\n" + data)
            self.flush_headers()
            calls.add({"action": action, "listener": listener, "t_in": t_in, "t_out": time.perf_counter(),
                       "status": resp.status})

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


# ---------------------------------------------------------------- moto and its ALB


class Moto:
    def __init__(self, binary, cpu="0"):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="bench-moto-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(["taskset", "-c", cpu, binary, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_http(self.url + "/moto-api/reset", method="POST", proc=self.proc)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.unlink(self.log.name)


def forward(stable, canary):
    return [{"Type": "forward", "ForwardConfig": {
        "TargetGroups": [{"TargetGroupArn": stable, "Weight": 75}, {"TargetGroupArn": canary, "Weight": 25}],
        "TargetGroupStickinessConfig": {"Enabled": True, "DurationSeconds": 300}}}]


def build_alb(moto_url, listeners):
    """VPC, two subnets, an ALB, stable (2 instances) and canary (1) target groups, and
    `listeners` listeners (ports 8000+) with a weighted 75/25 sticky forward."""
    ec2 = boto3.client("ec2", endpoint_url=moto_url, **CREDS)
    elb = boto3.client("elbv2", endpoint_url=moto_url, **CREDS)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=c, AvailabilityZone=az)["Subnet"]["SubnetId"]
               for c, az in (("10.0.1.0/24", "us-east-1a"), ("10.0.2.0/24", "us-east-1b"))]
    lb = elb.create_load_balancer(Name="bench", Subnets=subnets)["LoadBalancers"][0]["LoadBalancerArn"]
    tgs = {}
    for name, count, subnet in (("stable", 2, subnets[0]), ("canary", 1, subnets[1])):
        tg = elb.create_target_group(Name=name, Protocol="HTTP", Port=80, VpcId=vpc,
                                     TargetType="instance")["TargetGroups"][0]["TargetGroupArn"]
        ids = [i["InstanceId"] for i in ec2.run_instances(ImageId="ami-12c6146b", MinCount=count, MaxCount=count,
                                                         SubnetId=subnet)["Instances"]]
        elb.register_targets(TargetGroupArn=tg, Targets=[{"Id": i, "Port": 80} for i in ids])
        tgs[name] = tg
    arns = [elb.create_listener(LoadBalancerArn=lb, Protocol="HTTP", Port=8000 + n,
                                DefaultActions=forward(tgs["stable"], tgs["canary"]))["Listeners"][0]["ListenerArn"]
            for n in range(listeners)]
    return elb, tgs["stable"], arns


def reverted(elb, listener, stable):
    """Whether the listener now sends everything to the stable group (weight only there)."""
    actions = elb.describe_listeners(ListenerArns=[listener])["Listeners"][0]["DefaultActions"]
    fwd = next(a for a in actions if a["Type"] == "forward")
    groups = fwd.get("ForwardConfig", {}).get("TargetGroups") or [{"TargetGroupArn": fwd.get("TargetGroupArn")}]
    weighted = [g["TargetGroupArn"] for g in groups if g.get("Weight", 1) > 0]
    return weighted == [stable]


# ---------------------------------------------------------------- the service


POLICY = """name: {name}
service: {name}
matchers: ['service="{name}"']
target:
  alb:
    listener_arn: {listener}
    stable_target_group_arn: {stable}
    min_healthy_targets: 1
triggers:
  - name: errors
    matchers: ['alertname="HighErrorRate"']
    for: 0s
    mode: auto
# Guards that never suppress: the benchmark counts rollbacks, not the guards' refusals.
guards:
  cooldown: 0s
  max_rollbacks: {{count: 100000, per: 1h}}
"""


class Service:
    def __init__(self, binary, policies, proxy_port, workdir, cpu="1"):
        self.port = free_port()
        self.conn = None
        self.db = os.path.join(workdir, "rr.db")
        pdir = os.path.join(workdir, "policies")
        os.makedirs(pdir)
        for name, text in policies.items():
            with open(os.path.join(pdir, name + ".yaml"), "w") as f:
                f.write(text)
        check = subprocess.run([binary, "policy", "check", pdir], capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"generated policies are invalid:\n{check.stdout}{check.stderr}")
        env = dict(os.environ)
        env.update({
            "ROLLBACK_RESPONDER__STORE__URL": f"sqlite://{self.db}",
            "ROLLBACK_RESPONDER__POLICIES_DIR": pdir,
            "ROLLBACK_RESPONDER__WEBHOOK__BEARER_TOKEN": TOKEN,
            "ROLLBACK_RESPONDER__SAFETY__DRY_RUN": "false",
            "ROLLBACK_RESPONDER__SAFETY__MAX_ROLLBACKS__COUNT": "100000",
            # Setting only COUNT fails at start-up ("missing configuration field
            # safety.max_rollbacks.per"): the default's `per` is not merged in.
            "ROLLBACK_RESPONDER__SAFETY__MAX_ROLLBACKS__PER": "1h",
            "ROLLBACK_RESPONDER__AWS__REGION": "us-east-1",
            "ROLLBACK_RESPONDER__AWS__ENDPOINT_URL": f"http://127.0.0.1:{proxy_port}",
            "ROLLBACK_RESPONDER__LOG__LEVEL": "warn",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true",
        })
        self.log = open(os.path.join(workdir, "service.log"), "w")
        # taskset execs the service: self.proc.pid is the service's pid.
        self.proc = subprocess.Popen(["taskset", "-c", cpu, binary, "serve", "--listen", f"127.0.0.1:{self.port}"],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_http(f"http://127.0.0.1:{self.port}/readyz", proc=self.proc)

    def status(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}

    def query(self, sql):
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql).fetchone()[0]
        finally:
            conn.close()

    def post(self, body):
        # One kept-alive connection, as Alertmanager's HTTP client keeps one: a new TCP
        # connection per webhook would charge Python's connection set-up to the responder.
        for attempt in (1, 2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
                    self.conn.connect()
                    self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.conn.request("POST", "/webhook/alertmanager", body=body,
                                  headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
                r = self.conn.getresponse()
                return r.status, r.read()
            except (http.client.HTTPException, OSError):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise

    def stop(self):
        if self.conn is not None:
            self.conn.close()
        self.proc.terminate()
        try:
            self.proc.wait(25)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def alert_body(service, fingerprint):
    now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"
    return json.dumps({
        "receiver": "rollback-responder", "status": "firing", "version": "4", "truncatedAlerts": 0,
        "groupKey": f'{{}}:{{alertname="HighErrorRate", service="{service}"}}',
        "groupLabels": {"alertname": "HighErrorRate", "service": service},
        "commonLabels": {"alertname": "HighErrorRate", "service": service, "severity": "critical"},
        "commonAnnotations": {}, "externalURL": "http://alertmanager.example.com:9093",
        "alerts": [{"status": "firing", "labels": {"alertname": "HighErrorRate", "service": service,
                                                   "severity": "critical"},
                    "annotations": {"summary": f"{service} high error rate"},
                    "startsAt": now, "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "http://prometheus.example.com:9090/graph", "fingerprint": fingerprint}],
    }).encode()


# ---------------------------------------------------------------- scenarios


def run_ttr(args, workdir):
    n = args.incidents
    moto = Moto(args.moto)
    calls = Calls()
    proxy = make_proxy(moto.port, calls)
    svc = None
    try:
        elb, stable, listeners = build_alb(moto.url, n)
        policies = {f"ttr-{i:03d}": POLICY.format(name=f"ttr-{i:03d}", listener=listeners[i], stable=stable)
                    for i in range(n)}
        svc = Service(args.bin, policies, proxy.server_address[1], workdir)
        # One warm-up incident on a listener of its own would need one more policy; instead the
        # first incident is reported separately and excluded from the percentiles.
        rows = []
        for i in range(n):
            listener = listeners[i]
            t0 = time.perf_counter()
            status, data = svc.post(alert_body(f"ttr-{i:03d}", f"{0xbe00 + i:016x}"))
            t_ack = time.perf_counter()
            if status != 200:
                raise SystemExit(f"webhook {i}: {status} {data!r}")
            mod = calls.wait_for(lambda r: r["action"] == "ModifyListener" and r["listener"] == listener, 30)
            if mod is None:
                raise SystemExit(f"incident {i}: no ModifyListener within 30 s; see {svc.log.name}")
            # The read-back after the write ends the incident's ELBv2 traffic; let it commit.
            calls.wait_for(lambda r: r["action"] == "DescribeListeners" and r["listener"] == listener
                           and r["t_in"] > mod["t_in"], 10)
            time.sleep(0.05)
            before = [r for r in calls.snapshot() if t0 <= r["t_in"] < mod["t_in"]]
            in_aws = sum(r["t_out"] - r["t_in"] for r in before)
            ttr = mod["t_in"] - t0
            first_call = before[0]["t_in"] if before else mod["t_in"]
            rows.append({"i": i, "ttr_ms": ttr * 1e3, "to_first_call_ms": (first_call - t0) * 1e3, "aws_ms": in_aws * 1e3, "own_ms": (ttr - in_aws) * 1e3,
                         "webhook_ms": (t_ack - t0) * 1e3, "calls_before": [r["action"] for r in before],
                         # (action, arrival after the webhook was sent, duration), ms
                         "timeline": [(r["action"], round((r["t_in"] - t0) * 1e3, 2), round((r["t_out"] - r["t_in"]) * 1e3, 2))
                                      for r in before + [mod]],
                         "modify_ms": (mod["t_out"] - mod["t_in"]) * 1e3})
        time.sleep(1)
        all_calls = calls.snapshot()
        modifies = [r for r in all_calls if r["action"] == "ModifyListener"]
        n_reverted = sum(1 for arn in listeners if reverted(elb, arn, stable))
        steady = rows[1:]
        out = {
            "incidents": n,
            "measured": len(steady),
            "first_incident": rows[0],
            "modify_listener_calls": len(modifies),
            "listeners_reverted": n_reverted,
            "calls_before_modify": sorted({",".join(r["calls_before"]) for r in rows}),
            "incidents_in_store": svc.query("SELECT COUNT(*) FROM incidents"),
            "incidents_verified": svc.query("SELECT COUNT(*) FROM incidents WHERE phase = 'verified'"),
        }
        for key in ("ttr_ms", "aws_ms", "own_ms", "webhook_ms", "to_first_call_ms", "modify_ms"):
            vals = [r[key] for r in steady]
            out[key] = {"p50": pct(vals, 50), "p99": pct(vals, 99), "max": max(vals), "min": min(vals)}
        out["rows"] = rows
        return out
    finally:
        if svc:
            svc.stop()
        proxy.shutdown()
        moto.stop()


def run_storm(args, workdir):
    moto = Moto(args.moto)
    calls = Calls()
    proxy = make_proxy(moto.port, calls)
    svc = None
    try:
        elb, stable, listeners = build_alb(moto.url, 1)
        svc = Service(args.bin, {"storm-0": POLICY.format(name="storm-0", listener=listeners[0], stable=stable)},
                      proxy.server_address[1], workdir)
        rss_before = svc.status()["VmRSS"]
        per_request, requests = 100, 100
        t0 = time.perf_counter()
        gen = subprocess.run(
            ["taskset", "-c", "0", args.loadgen, "--addr", f"127.0.0.1:{svc.port}", "--mode", "new",
             "--alerts", str(per_request), "--rate", str(requests / args.spread), "--duration", str(args.spread),
             "--warmup", "0",
             "--services", "1", "--service-prefix", "storm-", "--connections", "16", "--token", TOKEN,
             "--label", "storm"], capture_output=True, text=True, check=True)
        t_sent = time.perf_counter()
        load = json.loads(gen.stdout.split("BENCH_JSON ", 1)[1])
        # Wait for the rollback and for every stored alert to be processed (pending = 0).
        mod = calls.wait_for(lambda r: r["action"] == "ModifyListener", args.storm_timeout)
        t_mod = mod["t_in"] if mod else None
        processed_at = None
        end = time.perf_counter() + args.storm_timeout
        while time.perf_counter() < end:
            # Every 10 ms (on the load generator's core): the figure is compared with a second.
            if svc.query("SELECT COUNT(*) FROM alerts WHERE pending = 1") == 0:
                processed_at = time.perf_counter()
                break
            time.sleep(0.01)
        time.sleep(3)  # a second rollback, if any, would show up now
        status = svc.status()
        out = {
            "spread_s": args.spread,
            "alerts_sent": per_request * requests,
            "notifications": load["requests"],
            "notifications_2xx": load["ok"],
            "send_seconds": t_sent - t0,
            "webhook_p50_ms": load["p50_us"] / 1e3,
            "webhook_p99_ms": load["p99_us"] / 1e3,
            "webhook_max_ms": load["max_us"] / 1e3,
            "alerts_stored": svc.query("SELECT COUNT(*) FROM alerts"),
            "alerts_still_pending": svc.query("SELECT COUNT(*) FROM alerts WHERE pending = 1"),
            "incidents": svc.query("SELECT COUNT(*) FROM incidents"),
            # Entries of the timeline: audit rows, and plain joins kept on the alerts' rows
            # (migration 0007; an older build has no such column).
            "audit_rows": svc.query("SELECT COUNT(*) FROM incident_events"),
            "timeline_events": svc.query("SELECT COUNT(*) FROM incident_events")
            + (svc.query("SELECT COUNT(*) FROM alerts WHERE joined IS NOT NULL")
               if svc.query("SELECT COUNT(*) FROM pragma_table_info('alerts') WHERE name = 'joined'") else 0),
            "modify_listener_calls": sum(1 for r in calls.snapshot() if r["action"] == "ModifyListener"),
            "listener_reverted": reverted(elb, listeners[0], stable),
            "storm_start_to_modify_s": (t_mod - t0) if t_mod else None,
            "storm_start_to_all_processed_s": (processed_at - t0) if processed_at else None,
            # The storm is sent open loop over about a second: how long deciding trailed it.
            "send_end_to_all_processed_s": (processed_at - t_sent) if processed_at else None,
            "rss_before": rss_before,
            "vm_hwm": status["VmHWM"],
            "vm_rss_after": status["VmRSS"],
            "db_bytes": sum(os.path.getsize(svc.db + s) for s in ("", "-wal") if os.path.exists(svc.db + s)),
        }
        return out
    finally:
        if svc:
            svc.stop()
        proxy.shutdown()
        moto.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=["storm", "ttr"])
    ap.add_argument("--bin", required=True, help="the release rollback-responder binary")
    ap.add_argument("--moto", required=True, help="moto_server binary")
    ap.add_argument("--loadgen", help="bench-loadgen binary (storm)")
    ap.add_argument("--incidents", type=int, default=101, help="ttr: incidents (the first is a warm-up)")
    ap.add_argument("--storm-timeout", type=float, default=240.0)
    ap.add_argument("--spread", type=float, default=1.0,
                    help="storm: seconds over which its 100 notifications are released (0.1: a burst)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.scenario}-") as workdir:
        try:
            out = run_ttr(args, workdir) if args.scenario == "ttr" else run_storm(args, workdir)
        except BaseException:
            log = os.path.join(workdir, "service.log")
            if os.path.exists(log):
                sys.stderr.write("--- service log (tail) ---\n" + open(log).read()[-4000:])
            raise
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
