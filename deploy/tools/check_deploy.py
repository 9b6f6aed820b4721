#!/usr/bin/env python3
"""Structural checks of deploy/, run by .ci/check-deploy (which installs PyYAML and the tools).

Each subcommand checks one thing and exits non-zero with a list of problems:

  files                 every YAML/JSON file under deploy/ parses
  manifests             Kubernetes manifests and kustomizations are well-formed and complete
  contract              the conventions shared with the Rust service: RBAC rules, ports,
                        probes, secret wiring, metric names, alert names and routes
  policies              deploy/kubernetes/base/policies/ is an exact copy of policies/
  rendered FILE LABEL   what `kubectl kustomize` produced: names resolve, secrets stay out
  dashboard-rules OUT   writes the dashboard's queries as a rules file, for `promtool check rules`
  alertmanager-e2e      runs Alertmanager on loopback and checks the token and routing for real
  prometheusrule [--write]
                        deploy/prometheus/prometheusrule.yaml (prometheus-operator) carries exactly
                        the groups of rules.yml; --write regenerates it from rules.yml
  dockerfile            deploy/Dockerfile parses (BuildKit's parser) and matches the service's
                        conventions; what it copies exists and is not dockerignored
  image-smoke BINARY    runs the image's default command (the example config) on a copy of the
                        image's file layout
  service-smoke BINARY  starts the built service on loopback with the Kubernetes config.yaml and
                        policies (paths pointed at temp copies) and checks probes and auth

Needs PyYAML, and the `dockerfile` package (BuildKit's own parser) for the dockerfile check; the
CI script installs both.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
BASE = K8S / "base"
RULES = DEPLOY / "prometheus" / "rules.yml"
PROMETHEUS_RULE = DEPLOY / "prometheus" / "prometheusrule.yaml"
AM_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD = DEPLOY / "grafana" / "rollback-responder-dashboard.json"

NAMESPACE = "rollback-responder"
TARGET_NAMESPACE = "portal"
WEBHOOK_URL = "http://rollback-responder.rollback-responder.svc:9095/webhook/alertmanager"
AM_TOKEN_FILE = "/etc/alertmanager/secrets/rollback-responder/token"

# The Role's rules themselves are compared with the executor's RBAC_RULES by the Rust test
# tests/api/rbac.rs: one source of truth, next to the code that makes the calls.

# The service's own metrics, as the Rust code exports them. Counters are listed with _total,
# histograms by their base name.
COUNTERS = {
    "rollback_responder_notifications_received_total",
    "rollback_responder_alerts_received_total",
    "rollback_responder_alerts_duplicate_total",
    "rollback_responder_decisions_total",
    "rollback_responder_actions_total",
    "rollback_responder_outbox_delivery_failures_total",
    "rollback_responder_store_errors_total",
    "rollback_responder_policy_reloads_total",
}
HISTOGRAMS = {
    "rollback_responder_action_duration_seconds",
    "rollback_responder_alert_to_action_seconds",
    "rollback_responder_action_to_verified_seconds",
}
GAUGES = {
    "rollback_responder_approvals_pending",
    "rollback_responder_outbox_depth",
    "rollback_responder_frozen",
    "rollback_responder_incidents_open",
    "rollback_responder_policy_files_refused",
}
KNOWN_SERIES = COUNTERS | GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

PORTAL_ALERTS = {
    "HealthCheckFailing", "HighErrorRate", "ElevatedErrorRate", "HighLatency",
    "Anomalous4xxRate", "RateLimitAnomaly", "CircuitBreakerOpen",
}
LATENCY_BUDGETS_MS = {"health": "100", "contacts": "600", "jobs": "800", "files": "1000"}


class Problems(list):
    def need(self, cond: bool, msg: str) -> bool:
        if not cond:
            self.append(msg)
        return cond


def rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def load_docs(p: Path) -> list:
    with p.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def finish(name: str, problems: Problems, ok_detail: str = "") -> int:
    if problems:
        print(f"FAIL {name}:")
        for m in problems:
            print(f"  - {m}")
        return 1
    print(f"ok   {name}{': ' + ok_detail if ok_detail else ''}")
    return 0


# ---------------------------------------------------------------------------------- files
def cmd_files() -> int:
    problems = Problems()
    count = 0
    for p in sorted(DEPLOY.rglob("*")):
        if not p.is_file():
            continue
        try:
            if p.suffix in (".yaml", ".yml"):
                load_docs(p)
            elif p.suffix == ".json":
                json.loads(p.read_text())
            else:
                continue
            count += 1
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            problems.append(f"{rel(p)}: {e}")
    return finish("files", problems, f"{count} YAML/JSON files parse")


# ------------------------------------------------------------------------------ manifests
def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def generator_files(kdir: Path, k: dict) -> set[Path]:
    out = set()
    for gen in (k.get("configMapGenerator") or []) + (k.get("secretGenerator") or []):
        for f in gen.get("files") or []:
            out.add((kdir / f.split("=", 1)[-1]).resolve())
    return out


def cmd_manifests() -> int:
    problems = Problems()
    data_files: set[Path] = set()
    referenced: set[Path] = set()
    kinds_seen = 0

    for kfile in kustomizations():
        kdir = kfile.parent
        k = load_docs(kfile)[0]
        where = rel(kfile)
        problems.need(k.get("apiVersion") == "kustomize.config.k8s.io/v1beta1", f"{where}: apiVersion")
        problems.need(k.get("kind") == "Kustomization", f"{where}: kind")
        for legacy in ("bases", "patchesStrategicMerge", "patchesJson6902", "commonLabels", "vars"):
            problems.need(legacy not in k, f"{where}: deprecated field {legacy}: use resources/patches/labels/replacements")
        for r in k.get("resources") or []:
            target = (kdir / r).resolve()
            if problems.need(target.exists(), f"{where}: resource {r} does not exist"):
                if target.is_dir():
                    problems.need((target / "kustomization.yaml").is_file(),
                                  f"{where}: resource dir {r} has no kustomization.yaml")
                else:
                    referenced.add(target)
            problems.need(not r.endswith(".example.yaml"), f"{where}: {r} is an example and must not be deployed")
        for patch in k.get("patches") or []:
            if "path" in patch:
                target = (kdir / patch["path"]).resolve()
                problems.need(target.is_file(), f"{where}: patch {patch['path']} does not exist")
                referenced.add(target)
        files = generator_files(kdir, k)
        for f in files:
            problems.need(f.is_file(), f"{where}: generator file {rel(f) if f.is_relative_to(REPO) else f} does not exist")
            # Kustomize refuses files outside the kustomization root; catch it before it does.
            problems.need(f.is_relative_to(kdir.resolve()), f"{where}: generator file {f} is outside {rel(kdir)}")
        data_files |= files
        for gen in k.get("secretGenerator") or []:
            problems.append(f"{where}: secretGenerator {gen.get('name')}: secrets are created out of band, not from git")

    for p in sorted(K8S.rglob("*.yaml")):
        if p.name == "kustomization.yaml" or p.resolve() in data_files:
            continue
        for i, doc in enumerate(load_docs(p)):
            where = f"{rel(p)}#{i}"
            if not problems.need(isinstance(doc, dict), f"{where}: not a mapping"):
                continue
            kinds_seen += 1
            problems.need(bool(doc.get("apiVersion")), f"{where}: missing apiVersion")
            problems.need(bool(doc.get("kind")), f"{where}: missing kind")
            problems.need(bool((doc.get("metadata") or {}).get("name")), f"{where}: missing metadata.name")
            if doc.get("kind") == "Secret":
                problems.need(p.name.endswith(".example.yaml"),
                              f"{where}: a Secret manifest outside a *.example.yaml file")
            # The base has no namespace transformer (it would move the executor's Role out of
            # the application namespace), so every namespaced object names its namespace.
            if p.resolve() in referenced and doc.get("kind") != "Namespace":
                problems.need(bool((doc.get("metadata") or {}).get("namespace")),
                              f"{where}: {doc.get('kind')} without metadata.namespace")
        if p.resolve() not in referenced and not p.name.endswith(".example.yaml"):
            problems.append(f"{rel(p)}: not referenced by any kustomization (dead file?)")

    return finish("manifests", problems, f"{len(kustomizations())} kustomizations, {kinds_seen} manifests")


# ------------------------------------------------------------------------------- contract
def find(docs: list, kind: str, name: str | None = None) -> dict | None:
    for d in docs:
        if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name):
            return d
    return None


def metric_names(text: str) -> set[str]:
    return set(re.findall(r"\brollback_responder_[a-z0-9_]+", text))


def check_rules(problems: Problems) -> None:
    groups = {g["name"]: g for g in load_docs(RULES)[0]["groups"]}
    problems.need(set(groups) == {"portal-api-rollback", "rollback-responder"},
                  f"rules.yml: groups are {sorted(groups)}")
    portal = groups.get("portal-api-rollback", {"rules": []})
    names = set()
    for r in portal["rules"]:
        if "alert" not in r:
            continue
        a = r["alert"]
        names.add(a)
        where = f"rules.yml: {a}"
        # The responder's policy holds the "for N minutes"; a `for:` here would count it twice.
        problems.need(r.get("for") in (None, "0s", "0m", 0), f"{where}: has for: {r.get('for')}")
        problems.need("keep_firing_for" not in r, f"{where}: keep_firing_for delays resolves")
        labels = r.get("labels") or {}
        for key in ("severity", "service", "team"):
            problems.need(key in labels, f"{where}: missing label {key}")
        problems.need(labels.get("service") == "portal-api" and labels.get("team") == "platform",
                      f"{where}: service/team labels")
        ann = r.get("annotations") or {}
        for key in ("summary", "description", "runbook_url", "dashboard"):
            problems.need(key in ann, f"{where}: missing annotation {key}")
        problems.need(ann.get("runbook_url") == f"https://runbooks.example.com/portal-api/{a}",
                      f"{where}: runbook_url {ann.get('runbook_url')}")
        problems.need("$value" in ann.get("description", ""), f"{where}: description does not show the value")
        problems.need(str(ann.get("dashboard", "")).startswith("https://grafana.example.com/d/portal-api"),
                      f"{where}: dashboard")
        if a == "HighLatency":
            m = re.search(r'endpoint="(\w+)"', r["expr"])
            ep = m.group(1) if m else None
            problems.need(LATENCY_BUDGETS_MS.get(ep) == labels.get("budget_ms"),
                          f"{where}: endpoint {ep} has budget_ms {labels.get('budget_ms')}")
            problems.need(re.search(rf"\)\s*>\s*{labels.get('budget_ms')}\s*$", r["expr"].strip()) is not None,
                          f"{where} ({ep}): threshold differs from budget_ms")
    problems.need(names == PORTAL_ALERTS, f"rules.yml: portal-api alerts are {sorted(names)}")
    latency = [r for r in portal["rules"] if r.get("alert") == "HighLatency"]
    problems.need(len(latency) == len(LATENCY_BUDGETS_MS), "rules.yml: one HighLatency rule per endpoint")

    for r in groups.get("rollback-responder", {"rules": []})["rules"]:
        labels = r.get("labels") or {}
        problems.need(labels.get("service") == "rollback-responder",
                      f"rules.yml: {r.get('alert')} must carry service=rollback-responder (routed to humans)")

    for m in metric_names(RULES.read_text()):
        problems.need(m in KNOWN_SERIES, f"rules.yml: unknown metric {m}")


def check_alertmanager(problems: Problems) -> None:
    am = load_docs(AM_CONFIG)[0]
    route = am["route"]
    problems.need(route.get("group_by") == ["alertname", "service", "endpoint"], "alertmanager: group_by")
    children = route.get("routes") or []
    rr = [r for r in children if r.get("receiver") == "rollback-responder"]
    if not problems.need(len(rr) == 1, "alertmanager: exactly one route to rollback-responder"):
        return
    r = rr[0]
    problems.need(r.get("continue") is True, "alertmanager: responder route needs continue: true")
    problems.need((r.get("group_wait"), r.get("group_interval"), r.get("repeat_interval")) == ("10s", "1m", "4h"),
                  "alertmanager: responder timings must be 10s/1m/4h")
    matchers = r.get("matchers") or []
    problems.need('service="portal-api"' in matchers, "alertmanager: responder route must match service=portal-api")
    regex = next((m for m in matchers if m.startswith("alertname=~")), None)
    if problems.need(regex is not None, "alertmanager: responder route must match on alertname"):
        listed = set(regex.split("=~", 1)[1].strip('"').split("|"))
        problems.need(listed == PORTAL_ALERTS,
                      f"alertmanager: responder alertnames {sorted(listed)} differ from rules.yml {sorted(PORTAL_ALERTS)}")
    idx = children.index(r)
    later = [c for c in children[idx + 1:] if c.get("receiver") != "rollback-responder"]
    problems.need(any('team="platform"' in (c.get("matchers") or []) or 'service="portal-api"' in (c.get("matchers") or [])
                      for c in later),
                  "alertmanager: no human route after the responder's; continue: true would reach nobody")
    receivers = {x["name"]: x for x in am["receivers"]}
    problems.need(route.get("receiver") in receivers, "alertmanager: default receiver undefined")
    wh = (receivers.get("rollback-responder", {}).get("webhook_configs") or [{}])[0]
    problems.need(wh.get("url") == WEBHOOK_URL, f"alertmanager: webhook url {wh.get('url')}")
    problems.need(wh.get("send_resolved") is True, "alertmanager: send_resolved must be true")
    problems.need(wh.get("max_alerts") == 0, "alertmanager: max_alerts must be 0")
    auth = (wh.get("http_config") or {}).get("authorization") or {}
    problems.need(auth.get("credentials_file") == AM_TOKEN_FILE, "alertmanager: credentials_file")
    problems.need("credentials" not in auth, "alertmanager: inline credentials")


def check_dashboard(problems: Problems) -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    problems.need(len(ids) == len(set(ids)), "dashboard: duplicate panel ids")
    problems.need(dash.get("uid") == "rollback-responder", "dashboard: uid (alerts link to /d/rollback-responder)")
    used = metric_names(DASHBOARD.read_text())
    for m in used:
        problems.need(m in KNOWN_SERIES, f"dashboard: unknown metric {m}")
    covered = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    for m in COUNTERS | GAUGES | HISTOGRAMS:
        problems.need(m in covered, f"dashboard: no panel for {m}")
    for p in dash["panels"]:
        if p["type"] != "row":
            problems.need(bool(p.get("targets")), f"dashboard: panel {p['title']} has no query")


def check_kubernetes(problems: Problems) -> None:
    docs = []
    for p in sorted(BASE.glob("*.yaml")):
        if p.name not in ("kustomization.yaml", "config.yaml"):
            docs += load_docs(p)

    role = find(docs, "Role", "rollback-responder-executor")
    if problems.need(role is not None, "rbac.yaml: Role rollback-responder-executor missing"):
        problems.need(role["metadata"].get("namespace") == TARGET_NAMESPACE, "rbac.yaml: Role must be in namespace portal")
    rbac_kinds = sorted(d["kind"] for d in load_docs(BASE / "rbac.yaml"))
    problems.need(rbac_kinds == ["Role", "RoleBinding"], f"rbac.yaml: holds {rbac_kinds}, expected Role and RoleBinding only")
    rb = find(docs, "RoleBinding", "rollback-responder-executor")
    if problems.need(rb is not None, "rbac.yaml: RoleBinding missing"):
        problems.need(rb["metadata"].get("namespace") == TARGET_NAMESPACE, "rbac.yaml: RoleBinding namespace")
        problems.need(rb["subjects"] == [{"kind": "ServiceAccount", "name": "rollback-responder", "namespace": NAMESPACE}],
                      "rbac.yaml: RoleBinding subject")
        problems.need(rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                        "name": "rollback-responder-executor"}, "rbac.yaml: roleRef")
    problems.need(find(docs, "ClusterRole") is None and find(docs, "ClusterRoleBinding") is None,
                  "base: no cluster-wide RBAC")

    sa = find(docs, "ServiceAccount", "rollback-responder")
    if problems.need(sa is not None, "ServiceAccount missing"):
        problems.need("eks.amazonaws.com/role-arn" in (sa["metadata"].get("annotations") or {}), "ServiceAccount: IRSA annotation")

    svc = find(docs, "Service", "rollback-responder")
    if problems.need(svc is not None, "Service missing"):
        problems.need(svc["spec"]["ports"] == [{"name": "http", "port": 9095, "targetPort": "http", "protocol": "TCP"}],
                      "Service: port must be 9095 named http")

    pdb = find(docs, "PodDisruptionBudget")
    problems.need(pdb is not None and pdb["spec"].get("minAvailable") == 1, "PodDisruptionBudget: minAvailable 1")
    sm = find(docs, "ServiceMonitor")
    problems.need(sm is not None and sm["apiVersion"] == "monitoring.coreos.com/v1"
                  and sm["spec"]["endpoints"][0].get("port") == "http"
                  and sm["spec"]["endpoints"][0].get("path") == "/metrics", "ServiceMonitor: port http, /metrics")

    dep = find(docs, "Deployment", "rollback-responder")
    if not problems.need(dep is not None, "Deployment missing"):
        return
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    problems.need(spec.get("replicas") == 2, "Deployment: 2 replicas in the base")
    problems.need(pod.get("serviceAccountName") == "rollback-responder", "Deployment: serviceAccountName")
    problems.need(pod.get("enableServiceLinks") is False, "Deployment: enableServiceLinks must be false (env prefix clash)")
    problems.need(20 <= (pod.get("terminationGracePeriodSeconds") or 0) <= 60, "Deployment: terminationGracePeriodSeconds ~30")
    problems.need(pod.get("securityContext", {}).get("runAsNonRoot") is True, "Deployment: runAsNonRoot")
    problems.need(bool(pod.get("topologySpreadConstraints")), "Deployment: topologySpreadConstraints")
    c = pod["containers"][0]
    sc = c.get("securityContext") or {}
    problems.need(sc.get("readOnlyRootFilesystem") is True, "Deployment: readOnlyRootFilesystem")
    problems.need(sc.get("allowPrivilegeEscalation") is False, "Deployment: allowPrivilegeEscalation false")
    problems.need(sc.get("capabilities", {}).get("drop") == ["ALL"], "Deployment: drop ALL capabilities")
    problems.need(c.get("args") == ["serve", "--config", "/etc/rollback-responder/config.yaml"], "Deployment: args")
    problems.need({"name": "http", "containerPort": 9095, "protocol": "TCP"} in c.get("ports", []), "Deployment: port 9095/http")
    problems.need(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", "Deployment: liveness /healthz")
    problems.need(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", "Deployment: readiness /readyz")
    problems.need("requests" in c.get("resources", {}) and "limits" in c.get("resources", {}), "Deployment: resources")
    env = {e["name"]: e for e in c.get("env", [])}
    store = env.get("ROLLBACK_RESPONDER__STORE__URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
    problems.need(store == {"name": "rollback-responder", "key": "database-url"},
                  "Deployment: ROLLBACK_RESPONDER__STORE__URL from Secret rollback-responder/database-url")
    for name in env:
        problems.need(name.startswith("ROLLBACK_RESPONDER__") or not name.startswith("ROLLBACK_RESPONDER"),
                      f"Deployment: env {name} looks like a setting but lacks the __ separator")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    cfg = mounts.get("/etc/rollback-responder/config.yaml")
    problems.need(cfg is not None and vols.get(cfg["name"], {}).get("configMap", {}).get("name") == "rollback-responder-config",
                  "Deployment: config.yaml from ConfigMap rollback-responder-config")
    pol = mounts.get("/etc/rollback-responder/policies")
    problems.need(pol is not None and vols.get(pol["name"], {}).get("configMap", {}).get("name") == "rollback-responder-policies",
                  "Deployment: policies from ConfigMap rollback-responder-policies")

    # config.yaml must point at what the Deployment mounts.
    cfgdoc = load_docs(BASE / "config.yaml")[0]
    problems.need((cfgdoc.get("safety") or {}).get("dry_run") is False, "config.yaml: safety.dry_run must be false")
    problems.need(cfgdoc.get("policies_dir") == "/etc/rollback-responder/policies", "config.yaml: policies_dir")
    problems.need("url" not in (cfgdoc.get("store") or {}), "config.yaml: store.url must come from the Secret, not the file")
    secret_mount = next((m for m, v in mounts.items() if vols.get(v["name"], {}).get("secret")), None)
    for key, value in flatten(cfgdoc):
        if key.endswith("_file"):
            problems.need(secret_mount is not None and str(value).startswith(secret_mount + "/"),
                          f"config.yaml: {key}={value} is not under the mounted Secret {secret_mount}")
    example = load_docs(K8S / "secret.example.yaml")
    secret = find(example, "Secret", "rollback-responder")
    if problems.need(secret is not None, "secret.example.yaml: Secret rollback-responder missing"):
        keys = set((secret.get("stringData") or {}))
        problems.need("database-url" in keys, "secret.example.yaml: database-url")
        for key, value in flatten(cfgdoc):
            if key.endswith("_file") and secret_mount and str(value).startswith(secret_mount + "/"):
                problems.need(Path(value).name in keys, f"secret.example.yaml: no key {Path(value).name} for {key}")


def flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def cmd_contract() -> int:
    problems = Problems()
    check_rules(problems)
    check_alertmanager(problems)
    check_dashboard(problems)
    check_kubernetes(problems)
    return finish("contract", problems, "RBAC, Deployment wiring, metric names, alert names and routes agree")


# ------------------------------------------------------------------------------- policies
def cmd_policies() -> int:
    problems = Problems()
    src = REPO / "policies"
    dst = BASE / "policies"
    if not src.is_dir():
        print(f"warn policies: {rel(src) if src.is_relative_to(REPO) else src}/ does not exist yet; "
              f"{rel(dst)}/ holds a placeholder")
        return 0
    a = {p.name: p.read_bytes() for p in src.glob("*.yaml")}
    b = {p.name: p.read_bytes() for p in dst.glob("*.yaml")}
    for name in sorted(set(a) | set(b)):
        problems.need(a.get(name) == b.get(name),
                      f"{name}: deploy copy differs from policies/{name} (run: cp policies/*.yaml {rel(dst)}/ "
                      f"and list new files in {rel(BASE)}/kustomization.yaml)")
    listed = set()
    k = load_docs(BASE / "kustomization.yaml")[0]
    for gen in k.get("configMapGenerator") or []:
        if gen.get("name") == "rollback-responder-policies":
            listed = {Path(f).name for f in gen.get("files") or []}
    problems.need(listed == set(a), f"kustomization: policies generator lists {sorted(listed)}, policies/ has {sorted(a)}")
    return finish("policies", problems, f"{len(a)} policy file(s) identical to policies/")


# ------------------------------------------------------------------------------- rendered
def cmd_rendered(path: str, label: str) -> int:
    problems = Problems()
    docs = load_docs(Path(path))
    names = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs}
    problems.need(not any(d["kind"] == "Secret" for d in docs), f"{label}: renders a Secret")
    cms = {n for k, ns, n in names if k == "ConfigMap" and ns == NAMESPACE}
    for prefix in ("rollback-responder-config-", "rollback-responder-policies-"):
        problems.need(any(n.startswith(prefix) for n in cms), f"{label}: no hashed ConfigMap {prefix}*")
    dep = find(docs, "Deployment", "rollback-responder")
    if problems.need(dep is not None, f"{label}: no Deployment"):
        for v in dep["spec"]["template"]["spec"]["volumes"]:
            if "configMap" in v:
                problems.need(v["configMap"]["name"] in cms,
                              f"{label}: volume {v['name']} refers to {v['configMap']['name']}, not a rendered ConfigMap")
    for d in docs:
        ns = d["metadata"].get("namespace")
        if d["kind"] in ("Role", "RoleBinding"):
            problems.need(ns == TARGET_NAMESPACE, f"{label}: {d['kind']} landed in {ns}")
        elif d["kind"] != "Namespace":
            problems.need(ns == NAMESPACE, f"{label}: {d['kind']}/{d['metadata']['name']} in namespace {ns}")
    return finish(f"rendered {label}", problems, f"{len(docs)} objects, ConfigMap names resolve, no Secret")


# ------------------------------------------------------------------------ dashboard-rules
def cmd_dashboard_rules(out: str) -> int:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            exprs.append((p["title"], t["expr"]))
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            exprs.append((a["name"], a["expr"]))
    subst = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$job": "rollback-responder"}
    rules = []
    for i, (title, e) in enumerate(exprs):
        for k, v in subst.items():
            e = e.replace(k, v)
        problems = re.findall(r"\$\w+", e)
        if problems:
            print(f"FAIL dashboard-rules: panel {title!r} uses unknown variables {problems}")
            return 1
        rules.append({"record": f"dashboard:panel_{i}", "expr": e})
    Path(out).write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}))
    print(f"ok   dashboard-rules: {len(rules)} queries written for promtool")
    return 0


# ----------------------------------------------------------------------- alertmanager-e2e
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd_alertmanager_e2e() -> int:
    """Run the real config (paths and URLs pointed at loopback) and post one abort-criterion
    alert: the responder must receive it with the bearer token, and humans must get it too."""
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if not binary:
        print("FAIL alertmanager-e2e: prometheus-alertmanager not installed")
        return 1
    received: list[tuple[str, dict, dict]] = []

    class Sink(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                payload = json.loads(body)
            except json.JSONDecodeError:
                payload = {}
            received.append((self.path, dict(self.headers), payload))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    sink_url = f"http://127.0.0.1:{sink.server_address[1]}"
    token = "e2e-" + os.urandom(8).hex()

    with tempfile.TemporaryDirectory(prefix="check-deploy-am-") as tmp:
        tmpd = Path(tmp)
        (tmpd / "token").write_text(token + "\n")
        (tmpd / "slack-url").write_text(sink_url + "/slack")
        (tmpd / "pd-key").write_text("0" * 32)
        text = AM_CONFIG.read_text()
        replacements = {
            WEBHOOK_URL: sink_url + "/webhook/alertmanager",
            AM_TOKEN_FILE: str(tmpd / "token"),
            "/etc/alertmanager/secrets/platform-slack/webhook-url": str(tmpd / "slack-url"),
            "/etc/alertmanager/secrets/platform-pagerduty/routing-key": str(tmpd / "pd-key"),
        }
        for old, new in replacements.items():
            if old not in text:
                print(f"FAIL alertmanager-e2e: {old} not found in {rel(AM_CONFIG)}")
                return 1
            text = text.replace(old, new)
        cfg = yaml.safe_load(text)
        # The humans' 30s group_wait only slows this test down; the responder route keeps its own
        # 10s, so the timing that matters is the real one.
        cfg["route"]["group_wait"] = "1s"
        # PagerDuty must never be contacted from CI: point it at the sink as well.
        for r in cfg["receivers"]:
            for pd in r.get("pagerduty_configs", []) or []:
                pd["url"] = sink_url + "/pagerduty"
        (tmpd / "am.yml").write_text(yaml.safe_dump(cfg))
        port = free_port()
        am_url = f"http://127.0.0.1:{port}"
        log = (tmpd / "am.log").open("w")
        proc = subprocess.Popen(
            [binary, f"--config.file={tmpd / 'am.yml'}", f"--storage.path={tmpd / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", f"--web.external-url={am_url}",
             "--cluster.listen-address="],
            stdout=log, stderr=subprocess.STDOUT)
        problems = Problems()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        break
                except OSError:
                    time.sleep(0.1)
            else:
                problems.append("Alertmanager did not start")
            if not problems:
                import urllib.request
                alert = [{"labels": {"alertname": "HighErrorRate", "service": "portal-api", "team": "platform",
                                     "severity": "critical"},
                          "annotations": {"summary": "e2e"},
                          "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
                req = urllib.request.Request(am_url + "/api/v2/alerts", data=json.dumps(alert).encode(),
                                             headers={"Content-Type": "application/json"}, method="POST")
                urllib.request.urlopen(req, timeout=5).read()
                sent = time.monotonic()
                # The responder's route waits group_wait (10s) before its first notification.
                deadline = sent + 30
                while time.monotonic() < deadline:
                    paths = {p for p, _, _ in received}
                    if {"/webhook/alertmanager", "/slack"} <= paths:
                        break
                    time.sleep(0.2)
                hooks = [(h, b) for p, h, b in received if p == "/webhook/alertmanager"]
                if problems.need(bool(hooks), "the responder's webhook was never called"):
                    headers, body = hooks[0]
                    auth = {k.lower(): v for k, v in headers.items()}.get("authorization")
                    problems.need(auth == f"Bearer {token}", f"webhook Authorization header was {auth!r}")
                    names = [a["labels"].get("alertname") for a in body.get("alerts", [])]
                    problems.need(names == ["HighErrorRate"], f"webhook carried alerts {names}")
                    problems.need(body.get("status") == "firing", "webhook status is not firing")
                problems.need(any(p == "/slack" for p, _, _ in received),
                              "the humans' Slack receiver was not notified (continue: true not effective)")
                problems.need(not any(p == "/pagerduty" for p, _, _ in received),
                              "a portal-api alert paged directly; the responder owns that decision")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            sink.shutdown()
            log.close()
        if problems:
            print((tmpd / "am.log").read_text()[-3000:])
    return finish("alertmanager-e2e", problems,
                  "alert reached the responder with the bearer token, and Slack too")


# ----------------------------------------------------------------------------- dockerfile
def cmd_dockerfile() -> int:
    """No Docker engine here, so the Dockerfile is checked by reading it with BuildKit's parser."""
    import fnmatch
    import tomllib

    import dockerfile

    problems = Problems()
    path = DEPLOY / "Dockerfile"
    try:
        cmds = dockerfile.parse_file(str(path))
    except dockerfile.GoParseError as e:
        print(f"FAIL dockerfile: {e}")
        return 1
    stages: list[list] = []
    for c in cmds:
        if c.cmd == "FROM":
            stages.append([])
        stages[-1].append(c)
    if not problems.need(len(stages) >= 2, "Dockerfile: expected a multi-stage build"):
        return finish("dockerfile", problems)
    build, final = stages[0], stages[-1]
    problems.need(build[0].value[0].startswith("rust:") and "bookworm" in build[0].value[0],
                  f"Dockerfile: builder image {build[0].value[0]}")
    runs = " ".join(" ".join(c.value) for c in build if c.cmd == "RUN")
    problems.need("cargo build" in runs and "--release" in runs and "--locked" in runs,
                  "Dockerfile: builder must run cargo build --release --locked")
    base = final[0].value[0]
    problems.need(base.startswith(("gcr.io/distroless/cc-debian12", "debian:bookworm-slim")),
                  f"Dockerfile: runtime image {base}")

    def last(cmd):
        found = [c for c in final if c.cmd == cmd]
        return found[-1].value if found else None

    user = (last("USER") or ("0",))[0]
    problems.need(re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user) is not None,
                  f"Dockerfile: USER {user} must be numeric and not root (runAsNonRoot checks the number)")
    problems.need(last("EXPOSE") == ("9095",), f"Dockerfile: EXPOSE {last('EXPOSE')}")
    binary = tomllib.loads((REPO / "Cargo.toml").read_text())["bin"][0]["name"]
    problems.need(last("ENTRYPOINT") == (f"/usr/local/bin/{binary}",), f"Dockerfile: ENTRYPOINT {last('ENTRYPOINT')}")
    problems.need(last("CMD") == ("serve", "--config", "/etc/rollback-responder/config.yaml"),
                  f"Dockerfile: CMD {last('CMD')}")
    copies = [c for c in final if c.cmd == "COPY"]
    problems.need(any(c.value[-1] == f"/usr/local/bin/{binary}" for c in copies), "Dockerfile: binary not copied")
    problems.need(any(c.value[-1].rstrip("/") == "/etc/rollback-responder/policies" for c in copies),
                  "Dockerfile: policies not copied")

    ignore_file = DEPLOY / "Dockerfile.dockerignore"
    patterns = [l.strip().rstrip("/") for l in ignore_file.read_text().splitlines()
                if l.strip() and not l.startswith("#")]

    def ignored(rel_path: str) -> bool:
        # Docker's rule: the last pattern that matches wins; `!pattern` re-includes.
        parts = Path(rel_path).parts
        verdict = False
        for pat in patterns:
            negated = pat.startswith("!")
            pat = pat.lstrip("!")
            if any(fnmatch.fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):
                verdict = not negated
        return verdict

    # What the build context must provide: the crate, and what the build and image copy.
    needed = ["Cargo.toml", "Cargo.lock", "src"]
    needed += [c.value[0] for stage in stages for c in stage
               if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags) and c.value[0] != "."]
    for n in needed:
        problems.need((REPO / n).exists(), f"Dockerfile: build context has no {n}")
        problems.need(not ignored(n.rstrip("/")), f"Dockerfile: {n} is excluded by {rel(ignore_file)}")
    for p in (REPO / "src").rglob("*"):
        if p.is_file():
            problems.need(not ignored(rel(p)), f"Dockerfile: {rel(p)} is excluded by {rel(ignore_file)}")
    problems.need(ignored("target") and ignored(".git"), "Dockerfile: target/ and .git/ must stay out of the context")
    problems.need(any(c.value == ("deploy/config.example.yaml", "/etc/rollback-responder/config.yaml") for c in copies),
                  "Dockerfile: the example config is not the image's default config")
    problems.need(last("WORKDIR") == (IMAGE_WORKDIR,), f"Dockerfile: WORKDIR {last('WORKDIR')}, expected {IMAGE_WORKDIR}")
    return finish("dockerfile", problems, f"{len(stages)} stages, {base}, USER {user}, context complete")


IMAGE_WORKDIR = "/var/lib/rollback-responder"


def cmd_image_smoke(binary: str) -> int:
    """No Docker engine here: the image's default command is run on a copy of its file layout
    (the example config, the policies, a working directory whose `policies` links to them), with
    the image's absolute paths moved under a temp root. It must start and be ready."""
    problems = Problems()
    with tempfile.TemporaryDirectory(prefix="check-deploy-image-") as tmp:
        root = Path(tmp)
        etc = root / "etc/rollback-responder"
        shutil.copytree(REPO / "policies", etc / "policies")
        shutil.copy(DEPLOY / "config.example.yaml", etc / "config.yaml")
        work = root / IMAGE_WORKDIR.lstrip("/")
        work.mkdir(parents=True)
        (work / "policies").symlink_to(etc / "policies")
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ROLLBACK_RESPONDER", "AWS_", "KUBECONFIG"))}
        log = (root / "svc.log").open("w")
        proc = subprocess.Popen([str(Path(binary).resolve()), "serve", "--config", str(etc / "config.yaml"),
                                 "--listen", f"127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
        try:
            deadline = time.monotonic() + 30
            status, body = None, b""
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    status, body = http_get(f"http://127.0.0.1:{port}/readyz")
                    if status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            if problems.need(status == 200, f"/readyz never answered 200 (last {status}, exit code {proc.poll()})"):
                ready = json.loads(body)
                problems.need(ready.get("dry_run") is True, "the example config must run in dry run")
                problems.need((ready.get("policies") or {}).get("count", 0) >= 1, "/readyz: no policy loaded")
                problems.need((work / "rollback-responder.db").exists(), "the store is not in the working directory")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
        if problems:
            print((root / "svc.log").read_text()[-3000:])
    return finish("image-smoke", problems, "the example config runs in the image's layout (dry run, SQLite in the workdir)")


# -------------------------------------------------------------------------- service-smoke
def http_get(url: str, headers: dict | None = None, data: bytes | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def cmd_service_smoke(binary: str) -> int:
    """The Kubernetes config.yaml and the shipped policies, loaded by the real binary: it must
    start, be ready, export metrics, and demand the bearer token from its *_file."""
    problems = Problems()
    cfg = load_docs(BASE / "config.yaml")[0]
    with tempfile.TemporaryDirectory(prefix="check-deploy-svc-") as tmp:
        tmpd = Path(tmp)
        token = "smoke-" + os.urandom(8).hex()
        (tmpd / "webhook-bearer-token").write_text(token + "\n")
        port = free_port()
        problems.need(cfg["server"]["listen"].endswith(":9095"), "config.yaml: server.listen must use port 9095")
        cfg["server"]["listen"] = f"127.0.0.1:{port}"
        problems.need(cfg["webhook"]["bearer_token_file"] == "/etc/rollback-responder/secrets/webhook-bearer-token",
                      "config.yaml: bearer_token_file path")
        cfg["webhook"]["bearer_token_file"] = str(tmpd / "webhook-bearer-token")
        # Every other secret file the config names gets a stand-in value of its own.
        for section in cfg.values():
            if not isinstance(section, dict):
                continue
            for key, value in list(section.items()):
                if key.endswith("_file") and str(value).startswith("/etc/rollback-responder/secrets/") \
                        and key != "bearer_token_file":
                    stand_in = tmpd / Path(value).name
                    stand_in.write_text("smoke-" + Path(value).name + "\n")
                    section[key] = str(stand_in)
        cfg["policies_dir"] = str(BASE / "policies")
        # No cluster here: a kubeconfig naming an address nothing listens on stands in for the
        # pod's service account (the client is built at start-up, never called).
        problems.need((cfg.get("kubernetes") or {}).get("in_cluster") is True,
                      "config.yaml: kubernetes.in_cluster must be true (the shipped policies revert Kubernetes objects)")
        (tmpd / "kubeconfig").write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "smoke",
            "clusters": [{"name": "smoke", "cluster": {"server": "http://127.0.0.1:9"}}],
            "users": [{"name": "smoke", "user": {}}],
            "contexts": [{"name": "smoke", "context": {"cluster": "smoke", "user": "smoke"}}],
        }))
        cfg["kubernetes"] = {"kubeconfig": str(tmpd / "kubeconfig")}
        (tmpd / "config.yaml").write_text(yaml.safe_dump(cfg))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ROLLBACK_RESPONDER", "AWS_", "KUBECONFIG"))}
        env.update({
            # SQLite in a temp dir stands in for PostgreSQL: this checks the config, not the store.
            "ROLLBACK_RESPONDER__STORE__URL": f"sqlite://{tmpd / 'store.db'}",
            # Nothing may reach AWS from CI, not even the metadata endpoint.
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "KUBECONFIG": "/dev/null", "HOSTNAME": "check-deploy",
        })
        log = (tmpd / "svc.log").open("w")
        proc = subprocess.Popen([str(Path(binary).resolve()), "serve", "--config", str(tmpd / "config.yaml")],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmpd)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            status = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    status, body = http_get(base + "/readyz")
                    if status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            if problems.need(status == 200, f"/readyz never answered 200 (last {status}, exit code {proc.poll()})"):
                ready = json.loads(body)
                problems.need(ready.get("dry_run") is False, f"/readyz says dry_run={ready.get('dry_run')}")
                problems.need((ready.get("policies") or {}).get("count", 0) >= 1, "/readyz: no policy loaded")
                problems.need(http_get(base + "/healthz")[0] == 200, "/healthz is not 200")
                code, text = http_get(base + "/metrics")
                problems.need(code == 200 and b"rollback_responder_" in text, "/metrics has no rollback_responder_ metric")
                url = base + "/webhook/alertmanager"
                hdr = {"Content-Type": "application/json"}
                problems.need(http_get(url, hdr, b"{}")[0] == 401, "webhook without a token is not 401")
                problems.need(http_get(url, dict(hdr, Authorization="Bearer wrong"), b"{}")[0] == 401,
                              "webhook with a wrong token is not 401")
                code, _ = http_get(url, dict(hdr, Authorization=f"Bearer {token}"), b"{}")
                problems.need(code != 401, "webhook refuses the token from bearer_token_file")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                problems.append("did not stop within 30s of SIGTERM (terminationGracePeriodSeconds)")
            log.close()
        if problems:
            print((tmpd / "svc.log").read_text()[-3000:])
    return finish("service-smoke", problems, f"{Path(binary).name} ready on the Kubernetes config, dry_run off, token enforced")


# ------------------------------------------------------------------------- prometheusrule
PROMETHEUS_RULE_HEADER = """\
# The rules of rules.yml as a prometheus-operator PrometheusRule, for clusters where the operator
# loads rules (kube-prometheus-stack). GENERATED from rules.yml: edit rules.yml, then run
#   python3 deploy/tools/check_deploy.py prometheusrule --write
# (.ci/check-deploy fails while the two differ). Apply with `kubectl apply -f`; most
# installations select rules by a label (kube-prometheus-stack: `release: <helm release>`).
"""


def prometheus_rule() -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "rollback-responder",
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": "rollback-responder",
                       "app.kubernetes.io/part-of": "rollback-responder"},
        },
        "spec": {"groups": load_docs(RULES)[0]["groups"]},
    }


def cmd_prometheusrule(write: bool) -> int:
    want = prometheus_rule()
    if write:
        PROMETHEUS_RULE.write_text(PROMETHEUS_RULE_HEADER + yaml.safe_dump(want, sort_keys=False, width=100))
    problems = Problems()
    if problems.need(PROMETHEUS_RULE.is_file(), f"{rel(PROMETHEUS_RULE)} is missing (run with --write)"):
        have = load_docs(PROMETHEUS_RULE)[0]
        problems.need(have == want, f"{rel(PROMETHEUS_RULE)} differs from {rel(RULES)}: run "
                                    "`python3 deploy/tools/check_deploy.py prometheusrule --write`")
    return finish("prometheusrule", problems, f"{len(want['spec']['groups'])} groups, same as {rel(RULES)}")


def main(argv: list[str]) -> int:
    cmds = {
        "files": lambda: cmd_files(),
        "manifests": lambda: cmd_manifests(),
        "contract": lambda: cmd_contract(),
        "policies": lambda: cmd_policies(),
        "rendered": lambda: cmd_rendered(argv[2], argv[3]),
        "dashboard-rules": lambda: cmd_dashboard_rules(argv[2]),
        "alertmanager-e2e": lambda: cmd_alertmanager_e2e(),
        "prometheusrule": lambda: cmd_prometheusrule("--write" in argv[2:]),
        "dockerfile": lambda: cmd_dockerfile(),
        "service-smoke": lambda: cmd_service_smoke(argv[2]),
        "image-smoke": lambda: cmd_image_smoke(argv[2]),
    }
    if len(argv) < 2 or argv[1] not in cmds:
        print(__doc__)
        return 2
    return cmds[argv[1]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
