//! The SHIPPED policies of the seed systems (policies/*.yaml), each run end to end: a real
//! Alertmanager delivers the alert, the service decides with the shipped triggers, modes and
//! guards, and the shipped target's steps run against the real peer (moto for ALB targets,
//! the fake Kubernetes API server for Kubernetes ones). The test overrides only what must
//! point at loopback or be waited for: the ARNs moto created, and in `verification` the health
//! probe's URL and interval (a fake service on loopback), the Prometheus query (no Prometheus
//! scrapes the seed's service here) and the bake (a hold: `verified` comes at its end, so 3 s
//! instead of the shipped minutes). Assertions are on what the peer saw.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rollback_responder::action::alb::AlbExecutor;
use rollback_responder::action::kubernetes::{KubeExecutor, KubeSettings};
use rollback_responder::action::Executors;
use serde_json::{json, Value};
use serde_norway::Value as Yaml;

use crate::helpers::*;
use crate::peers::{Alertmanager, FakeService};
use crate::support::alb_fixture::{elb_client, fast_settings, stickiness, weights, AlbFixture};
use crate::support::aws_proxy::AwsProxy;
use crate::support::fake_kube::{deployment, endpointslice, pod, replicaset, service, template, FakeKube};
use crate::support::rbac::Role;

fn uniq() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

fn read_shipped(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Sets `path` (keys from the root) in a YAML document; every key but the last must exist.
fn set(doc: &mut Yaml, path: &[&str], value: Yaml) {
    let (last, parents) = path.split_last().expect("a path");
    let mut at = doc;
    for key in parents {
        at = at
            .get_mut(*key)
            .unwrap_or_else(|| panic!("the shipped policy has no {key:?} on the way to {path:?}"));
    }
    let map = at.as_mapping_mut().expect("a mapping");
    map.insert(Yaml::from(*last), value);
}

fn remove(doc: &mut Yaml, path: &[&str]) {
    let (last, parents) = path.split_last().expect("a path");
    let mut at = doc;
    for key in parents {
        at = at.get_mut(*key).expect("present");
    }
    assert!(
        at.as_mapping_mut().expect("a mapping").remove(*last).is_some(),
        "the shipped policy has no {path:?}"
    );
}

/// The shipped policy `file` with its health probe on `health_url` (polled every 100 ms), a
/// 3 s bake sampled every 200 ms, and without its Prometheus check; `edit` overrides the
/// target's loopback fields.
fn shipped(file: &str, health_url: &str, edit: impl FnOnce(&mut Yaml)) -> String {
    let mut doc: Yaml = serde_norway::from_str(&read_shipped(file)).expect("shipped YAML");
    set(
        &mut doc,
        &["verification", "health_probe", "url"],
        Yaml::from(health_url),
    );
    set(
        &mut doc,
        &["verification", "health_probe", "interval"],
        Yaml::from("100ms"),
    );
    // The bake is a hold: `verified` comes at its end, so a test cannot wait the shipped one.
    set(&mut doc, &["verification", "bake"], Yaml::from("3s"));
    set(&mut doc, &["verification", "interval"], Yaml::from("200ms"));
    if doc["verification"].get("prometheus").is_some() {
        remove(&mut doc, &["verification", "prometheus"]);
    }
    edit(&mut doc);
    serde_norway::to_string(&doc).expect("YAML out")
}

/// The ALB target of a shipped policy pointed at the fixture's listener and stable group.
fn on_moto(fx: &AlbFixture) -> impl FnOnce(&mut Yaml) + '_ {
    move |doc| {
        set(
            doc,
            &["target", "alb", "listener_arn"],
            Yaml::from(fx.listener_arn.as_str()),
        );
        set(
            doc,
            &["target", "alb", "stable_target_group_arn"],
            Yaml::from(fx.stable_tg.as_str()),
        );
    }
}

fn find<'a>(inc: &'a Value, kind: &str) -> &'a Value {
    inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in the timeline: {}", inc["timeline"]))
}

/// An ALB service on moto behind a recording proxy (to count the writes moto received), with
/// the shipped `file` policy and the shipped portal-api.yaml next to it.
async fn alb_app(file: &'static str, fx: &AlbFixture, proxy: &AwsProxy, svc: &FakeService) -> TestApp {
    alb_app_with(file, shipped(file, &svc.health_url(), on_moto(fx)), proxy).await
}

/// [`alb_app`] with the policy text given.
async fn alb_app_with(file: &'static str, policy: String, proxy: &AwsProxy) -> TestApp {
    let exec = AlbExecutor::new(elb_client(proxy.endpoint(0)), &fast_settings());
    spawn_app(Options {
        policies: vec![(file, policy), ("portal-api.yaml", read_shipped("portal-api.yaml"))],
        executors: Some(Executors {
            alb: Some(exec),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await
}

/// Waits for the rollback to succeed, resolves the incident's alerts as Prometheus would once
/// the errors are gone, and waits for the shipped verification (health probe, alerts
/// resolved) to pass.
async fn succeeded_then_verified(app: &TestApp, am: &Alertmanager, alerts: &[(&Value, &str)]) -> Value {
    let list = app
        .wait_incidents("the rollback to succeed", |l| l.len() == 1 && l[0]["executed"] == true)
        .await;
    for (labels, starts) in alerts {
        am.post((*labels).clone(), starts, Some(&ago(0))).await;
    }
    let id = list[0]["id"].as_str().unwrap().to_string();
    app.wait_incident(&id, "verified", |i| i["phase"] == "verified").await
}

/// Seed 001 (Squad API, blue-green): the error-rate trigger asks a human ("Rollback decision:
/// YES/NO") and nothing is written; when the health endpoint has been failing for 2 minutes
/// the incident rolls back without waiting: 100 % to blue, stickiness off, one write.
#[tokio::test]
async fn squad_api_asks_on_errors_and_sends_everything_back_to_blue_when_health_fails() {
    let fx = AlbFixture::start().await;
    let proxy = AwsProxy::start(&fx.moto.endpoint, 1).await;
    let svc = FakeService::start("squad").await;
    let app = alb_app("squad-api.yaml", &fx, &proxy, &svc).await;
    let am = Alertmanager::start(&app.url("/webhook/alertmanager"), TOKEN).await;
    let run = uniq();

    let errors = json!({"alertname": "HighErrorRate", "service": "squad-api", "severity": "critical", "run": run});
    let errors_start = ago(6 * 60);
    am.post(errors.clone(), &errors_start, None).await;
    let list = app
        .wait_incidents("the approval request", |l| {
            l.len() == 1 && l[0]["phase"] == "awaiting_approval"
        })
        .await;
    assert_eq!(list[0]["policy"], "squad-api");
    assert_eq!(proxy.count("ModifyListener"), 0, "a manual trigger writes nothing");

    let health = json!({"alertname": "HealthCheckFailing", "service": "squad-api", "severity": "critical", "run": run});
    let starts = ago(150);
    am.post(health.clone(), &starts, None).await;
    let inc = succeeded_then_verified(&app, &am, &[(&errors, &errors_start), (&health, &starts)]).await;

    let actions = fx.listener_actions().await;
    assert_eq!(
        weights(&actions),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
    );
    assert!(!stickiness(&actions).0, "the shipped policy disables stickiness");
    assert_eq!(proxy.count("ModifyListener"), 1);
    assert_eq!(inc["policy"], "squad-api");
    assert_eq!(find(&inc, "action_succeeded")["detail"]["outcome"], "reverted");
    assert!(svc.health_requests() >= 3, "the shipped probe needs 3 successes");
    // The checklist steps the responder leaves to people travel with the incident, for its
    // messages (Slack, PagerDuty, the incident page) to list after the rollback.
    let doc: Yaml = serde_norway::from_str(&read_shipped("squad-api.yaml")).unwrap();
    let follow_ups: Vec<String> = serde_norway::from_value(doc["follow_ups"].clone()).unwrap();
    assert!(
        follow_ups.iter().any(|f| f.starts_with("Database: restore"))
            && follow_ups.iter().any(|f| f.starts_with("Cache: invalidate")),
        "{follow_ups:?}"
    );
    assert_eq!(inc["context"]["follow_ups"], json!(follow_ups));
}

/// Seed 003 (Python-to-Go cutover): an immediate trigger (error rate > 5 % sustained 5 min)
/// sends all traffic back to the Python group in one write; the Go group keeps weight 0.
#[tokio::test]
async fn go_cutover_error_rate_sends_everything_back_to_python_at_once() {
    let fx = AlbFixture::start().await;
    let proxy = AwsProxy::start(&fx.moto.endpoint, 1).await;
    let svc = FakeService::start("cutover").await;
    let app = alb_app("go-cutover.yaml", &fx, &proxy, &svc).await;
    let am = Alertmanager::start(&app.url("/webhook/alertmanager"), TOKEN).await;

    let labels = json!({"alertname": "HighErrorRate", "service": "go-cutover", "severity": "critical", "run": uniq()});
    let starts = ago(6 * 60);
    am.post(labels.clone(), &starts, None).await;
    let inc = succeeded_then_verified(&app, &am, &[(&labels, &starts)]).await;

    let actions = fx.listener_actions().await;
    assert_eq!(
        weights(&actions),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
    );
    assert!(!stickiness(&actions).0);
    assert_eq!(proxy.count("ModifyListener"), 1, "all at once: one write, no steps");
    assert_eq!(inc["policy"], "go-cutover");
    assert_eq!(inc["trigger"], "error-rate-above-5pct");
}

/// Seed 003's graceful trigger (latency > 1 s) shifts back in its own steps, Python at 10 %, 50 %,
/// 100 %, where the immediate one (above) writes once: the choice is the trigger's. The shipped
/// trigger is manual; here it is made automatic (and its interval short) to skip the approval.
#[tokio::test]
async fn go_cutover_graceful_trigger_shifts_back_to_python_in_its_own_steps() {
    let fx = AlbFixture::start().await;
    fx.set_listener_weights(0, 100).await;
    let proxy = AwsProxy::start(&fx.moto.endpoint, 1).await;
    let svc = FakeService::start("cutover-graceful").await;
    let policy = shipped("go-cutover.yaml", &svc.health_url(), |doc| {
        on_moto(&fx)(doc);
        let triggers = doc["triggers"].as_sequence_mut().expect("triggers");
        let latency = triggers
            .iter_mut()
            .find(|t| t["name"] == "latency-above-1s")
            .expect("the latency trigger");
        latency["mode"] = Yaml::from("auto");
        latency["gradual"]["interval"] = Yaml::from("100ms");
    });
    let app = alb_app_with("go-cutover.yaml", policy, &proxy).await;
    let am = Alertmanager::start(&app.url("/webhook/alertmanager"), TOKEN).await;

    let labels = json!({"alertname": "HighLatency", "service": "go-cutover", "severity": "warning", "run": uniq()});
    let starts = ago(11 * 60);
    am.post(labels.clone(), &starts, None).await;
    let inc = succeeded_then_verified(&app, &am, &[(&labels, &starts)]).await;
    assert_eq!(inc["trigger"], "latency-above-1s");
    let written: Vec<&str> = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "action_step" && e["summary"].as_str().is_some_and(|s| s.contains(" written: ")))
        .map(|e| e["summary"].as_str().unwrap())
        .collect();
    assert_eq!(
        written,
        vec![
            "ModifyListener written: 10% to stable (attempt 1)",
            "ModifyListener written: 50% to stable (attempt 1)",
            "ModifyListener written: 100% to stable (attempt 1)",
        ]
    );
    assert_eq!(proxy.count("ModifyListener"), 3);
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
    );
}

/// Plays the Deployment controller for `name` (the fake runs none): once `done` holds for the
/// stored Deployment, it reports `status` with the observed generation, as a cluster would.
fn play_controller(
    fake: &Arc<FakeKube>,
    ns: &'static str,
    name: &'static str,
    done: impl Fn(&Value) -> bool + Send + 'static,
    status: Value,
) -> tokio::task::JoinHandle<()> {
    let fake = fake.clone();
    tokio::spawn(async move {
        loop {
            let d = fake.get("deployments", ns, name).expect("deployment");
            if done(&d) {
                let generation = d["metadata"]["generation"].clone();
                fake.modify("deployments", ns, name, |d| {
                    d["status"] = status;
                    d["status"]["observedGeneration"] = generation;
                });
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

const PORTAL_NS: &str = "portal";

/// The shipped portal-api-k8s check step (seed 000's `curl -f` between the switch and the
/// scale-down) pointed at `url`, polled every 100 ms, within `timeout`.
fn check_on<'a>(url: &'a str, timeout: &'a str) -> impl FnOnce(&mut Yaml) + 'a {
    move |doc| {
        let step = &mut doc["target"]["kubernetes"]["steps"][1];
        let http = step
            .get_mut("check")
            .and_then(|c| c.get_mut("http"))
            .and_then(Yaml::as_mapping_mut)
            .expect("steps[1] of the shipped policy is the http check");
        http.insert(Yaml::from("url"), Yaml::from(url));
        http.insert(Yaml::from("interval"), Yaml::from("100ms"));
        http.insert(Yaml::from("timeout"), Yaml::from(timeout));
    }
}

/// Seed 000's world in the shipped policy's namespace: portal-api-prod selects the canary
/// (v1.0.0), two Ready stable pods, the canary Deployment at 3 replicas, and a pod of ANOTHER
/// app that carries the stable version label.
fn portal_world(fake: &FakeKube) {
    fake.insert(
        "services",
        service(
            PORTAL_NS,
            "portal-api-prod",
            &[("app", "portal-api"), ("version", "v1.0.0")],
        ),
    );
    for i in 0..2 {
        fake.insert(
            "pods",
            pod(
                PORTAL_NS,
                &format!("portal-api-stable-{i}"),
                &[("app", "portal-api"), ("version", "v1.0.0-rc.0")],
                true,
            ),
        );
    }
    fake.insert(
        "pods",
        pod(
            PORTAL_NS,
            "billing-0",
            &[("app", "billing"), ("version", "v1.0.0-rc.0")],
            true,
        ),
    );
    fake.insert(
        "deployments",
        deployment(
            PORTAL_NS,
            "portal-api-canary",
            "22222222-2222-4222-8222-222222222222",
            &[("app", "portal-api"), ("version", "v1.0.0")],
            template(&[("app", "portal-api"), ("version", "v1.0.0")], "portal-api:1.0.0"),
            1,
        ),
    );
    fake.insert(
        "endpointslices",
        endpointslice(
            PORTAL_NS,
            "portal-api-prod",
            "x1",
            &[("portal-api-stable-0", true), ("portal-api-stable-1", true)],
        ),
    );
}

/// Seed 000 (Portal API on Kubernetes): an alert labelled platform="kubernetes" falls under
/// portal-api-k8s even with the ALB policy loaded, and runs the seed's commands in order: the
/// Service's selector becomes the FULL {app, version} (never the seed's bare version, which
/// would also select billing-0), then the canary is scaled to 0. Two writes, nothing else.
#[tokio::test]
async fn portal_api_on_kubernetes_switches_the_full_selector_then_scales_the_canary_to_zero() {
    let fake = Arc::new(FakeKube::start().await);
    portal_world(&fake);
    let controller = play_controller(
        &fake,
        PORTAL_NS,
        "portal-api-canary",
        |d| d["spec"]["replicas"] == 0,
        json!({"replicas": 0, "updatedReplicas": 0, "readyReplicas": 0, "availableReplicas": 0}),
    );
    let svc = FakeService::start("portal-k8s").await;
    let app = spawn_app(Options {
        policies: vec![
            ("portal-api.yaml", read_shipped("portal-api.yaml")),
            (
                "portal-api-k8s.yaml",
                shipped(
                    "portal-api-k8s.yaml",
                    &svc.health_url(),
                    check_on(&svc.health_url(), "60s"),
                ),
            ),
        ],
        // The ALB policy is loaded to show the split on `platform`; it never acts here.
        executors: Some(Executors {
            kube: Some(KubeExecutor::new(fake.client(), &KubeSettings::default())),
            alb: Some(crate::helpers::alb_never_called()),
        }),
        ..Options::default()
    })
    .await;
    let am = Alertmanager::start(&app.url("/webhook/alertmanager"), TOKEN).await;
    let labels = json!({"alertname": "HealthCheckFailing", "service": "portal-api", "platform": "kubernetes", "severity": "critical", "run": uniq()});
    let starts = ago(150);
    am.post(labels.clone(), &starts, None).await;
    let inc = succeeded_then_verified(&app, &am, &[(&labels, &starts)]).await;
    controller.await.expect("controller");

    assert_eq!(inc["policy"], "portal-api-k8s");
    let s = fake.get("services", PORTAL_NS, "portal-api-prod").expect("service");
    assert_eq!(
        s["spec"]["selector"],
        json!({"app": "portal-api", "version": "v1.0.0-rc.0"})
    );
    let canary = fake.get("deployments", PORTAL_NS, "portal-api-canary").expect("canary");
    assert_eq!(canary["spec"]["replicas"], 0);
    assert_eq!(fake.writes(), 2, "one selector write, one scale write");
    let steps = &find(&inc, "action_succeeded")["detail"]["steps"];
    assert_eq!(steps[0]["before"]["selector"]["version"], "v1.0.0");
    assert_eq!(steps[0]["after"]["selector"]["app"], "portal-api");
    // The seed's `curl -f` ran between the two writes: three 2xx in a row, then the scale-down.
    assert_eq!(steps[1]["result"], "checked", "{steps}");
    assert_eq!(steps[1]["probes"], 3, "{steps}");
    let order: Vec<&str> = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| match e["detail"]["step"].as_str() {
            Some("patched") => e["detail"]["object"].as_str(),
            Some("checked") => Some("checked"),
            _ => None,
        })
        .collect();
    assert_eq!(
        order,
        [
            "service/portal-api-prod",
            "checked",
            "deployment/portal-api-canary/scale"
        ]
    );
}

/// The shipped portal-api-k8s alone, its check and probe on `svc` (the check within
/// `check_timeout`), on the fake API server, after a health alert labelled for Kubernetes.
async fn portal_k8s_alerted(fake: &FakeKube, svc: &FakeService, check_timeout: &str) -> (TestApp, Alertmanager) {
    let app = spawn_app(Options {
        policies: vec![(
            "portal-api-k8s.yaml",
            shipped(
                "portal-api-k8s.yaml",
                &svc.health_url(),
                check_on(&svc.health_url(), check_timeout),
            ),
        )],
        executors: Some(Executors {
            kube: Some(KubeExecutor::new(fake.client(), &KubeSettings::default())),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let am = Alertmanager::start(&app.url("/webhook/alertmanager"), TOKEN).await;
    am.post(
        json!({"alertname": "HealthCheckFailing", "service": "portal-api", "platform": "kubernetes", "run": uniq()}),
        &ago(150),
        None,
    )
    .await;
    (app, am)
}

/// Seed 000 fault: after the switch, the health check keeps failing. The canary is NOT scaled
/// down (it is the only copy of the new release's pods and logs, and no traffic reaches it
/// any more); the incident says which check failed and that the switch took.
#[tokio::test]
async fn portal_api_on_kubernetes_keeps_the_canary_when_the_health_check_after_the_switch_fails() {
    let fake = FakeKube::start().await;
    portal_world(&fake);
    let svc = FakeService::start("portal-k8s-check").await;
    svc.set(false, 0.0);
    let (app, _am) = portal_k8s_alerted(&fake, &svc, "2s").await;
    let list = app
        .wait_incidents("the check to fail the rollback", |l| {
            l.len() == 1 && l[0]["phase"] == "failed"
        })
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    // The switch is a change: the incident counts as a rollback for the guards.
    assert_eq!(inc["executed"], true, "{}", inc["timeline"]);
    let failed = find(&inc, "action_failed");
    let summary = failed["summary"].as_str().unwrap();
    let check = format!(
        "check steps[1] failed: GET {} answers 2xx 3 time(s) in a row (every 100ms, within 2s): not passed after",
        svc.health_url()
    );
    assert!(
        summary.starts_with("partial rollback: service/portal-api-prod patched (at ")
            && summary.contains(&format!("took; then it failed: {check}"))
            && summary.contains("last answer HTTP 500; the steps after it were not run (code check_failed)"),
        "{summary}"
    );
    assert_eq!(failed["detail"]["detail"]["error"], "check_failed", "{failed}");
    assert_eq!(failed["detail"]["applied"].as_array().unwrap().len(), 1, "{failed}");
    // What the fake API server saw: the selector patch, and no scale.
    let s = fake.get("services", PORTAL_NS, "portal-api-prod").unwrap();
    assert_eq!(s["spec"]["selector"]["version"], "v1.0.0-rc.0");
    assert_eq!(
        fake.get("deployments", PORTAL_NS, "portal-api-canary").unwrap()["spec"]["replicas"],
        3
    );
    assert_eq!(fake.writes(), 1);
    assert!(!fake
        .requests()
        .iter()
        .any(|r| r.path.ends_with("/scale") && r.method == "PATCH"));
    assert!(svc.health_requests() >= 10, "{} probes", svc.health_requests());
}

/// Seed 000 fault: the stable pods are not Ready. The shipped min_ready_replicas (2) holds
/// the switch: nothing is written, the canary keeps its replicas, the incident fails.
#[tokio::test]
async fn portal_api_on_kubernetes_writes_nothing_when_the_stable_pods_are_not_ready() {
    let fake = FakeKube::start().await;
    portal_world(&fake);
    fake.modify("pods", PORTAL_NS, "portal-api-stable-1", |p| {
        p["status"]["conditions"][0]["status"] = json!("False")
    });
    let svc = FakeService::start("portal-k8s-fault").await;
    let (app, _am) = portal_k8s_alerted(&fake, &svc, "60s").await;
    let list = app
        .wait_incidents("the pre-check to refuse", |l| l.len() == 1 && l[0]["phase"] == "failed")
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    assert_eq!(inc["executed"], false, "{}", inc["timeline"]);
    assert_eq!(fake.writes(), 0);
    let s = fake.get("services", PORTAL_NS, "portal-api-prod").unwrap();
    assert_eq!(s["spec"]["selector"]["version"], "v1.0.0");
    assert_eq!(
        fake.get("deployments", PORTAL_NS, "portal-api-canary").unwrap()["spec"]["replicas"],
        3
    );
}

const X_NS: &str = "x0tta6bl4";
const X_UID: &str = "33333333-3333-4333-8333-333333333333";

/// x0tta6bl4-api at revision 2 (image 2.0.0) with the ReplicaSets of revisions 1 and 2, the
/// shipped policy, and a task playing the Deployment controller: once the template is revision
/// 1's again it reports the rollout complete, which the verification waits for.
async fn x0tta6bl4_world() -> (Arc<FakeKube>, TestApp, tokio::task::JoinHandle<()>, FakeService) {
    let fake = Arc::new(FakeKube::start().await);
    let sel = [("app", "x0tta6bl4-api")];
    let old = template(&[("app", "x0tta6bl4-api"), ("version", "v1")], "x0tta6bl4-api:1.0.0");
    let new = template(&[("app", "x0tta6bl4-api"), ("version", "v2")], "x0tta6bl4-api:2.0.0");
    fake.insert(
        "deployments",
        deployment(X_NS, "x0tta6bl4-api", X_UID, &sel, new.clone(), 2),
    );
    fake.insert(
        "replicasets",
        replicaset(X_NS, "x0tta6bl4-api", X_UID, "aaa111", &old, 1, 0, 0),
    );
    fake.insert(
        "replicasets",
        replicaset(X_NS, "x0tta6bl4-api", X_UID, "bbb222", &new, 2, 3, 3),
    );
    let svc = FakeService::start("x0tta6bl4").await;
    let app = spawn_app(Options {
        policies: vec![("x0tta6bl4.yaml", shipped("x0tta6bl4.yaml", &svc.health_url(), |_| {}))],
        executors: Some(Executors {
            kube: Some(KubeExecutor::new(fake.client(), &KubeSettings::default())),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let controller = play_controller(
        &fake,
        X_NS,
        "x0tta6bl4-api",
        |d| d["spec"]["template"]["spec"]["containers"][0]["image"] == "x0tta6bl4-api:1.0.0",
        json!({"replicas": 3, "updatedReplicas": 3, "readyReplicas": 3, "availableReplicas": 3}),
    );
    // The shipped Role grants the executor `portal` only (deploy/kubernetes/base/rbac.yaml);
    // x0tta6bl4 needs a copy of it in its own namespace, checked in `assert_undone`.
    fake.expect_outside_rbac();
    (fake, app, controller, svc)
}

fn assert_undone(fake: &FakeKube) {
    let d = fake.get("deployments", X_NS, "x0tta6bl4-api").unwrap();
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "x0tta6bl4-api:1.0.0"
    );
    assert_eq!(d["spec"]["template"]["metadata"]["labels"]["version"], "v1");
    assert_eq!(fake.writes(), 1, "one Deployment write: the undo");
    let shipped = Role::shipped();
    assert!(
        !fake.outside_rbac(&shipped).is_empty(),
        "the shipped Role does not reach x0tta6bl4"
    );
    let copy = Role {
        namespace: X_NS.into(),
        ..shipped
    };
    let outside = fake.outside_rbac(&copy);
    assert!(
        outside.is_empty(),
        "beyond a copy of the Role in x0tta6bl4: {outside:?}"
    );
}

/// Seed 002 (x0tta6bl4): a CRITICAL-tier alert rolls x0tta6bl4-api back one revision
/// (`kubectl rollout undo`) at once.
#[tokio::test]
async fn x0tta6bl4_critical_tier_undoes_the_deployment_to_the_previous_revision() {
    let (fake, app, controller, _svc) = x0tta6bl4_world().await;
    let am = Alertmanager::start(&app.url("/webhook/alertmanager"), TOKEN).await;
    let labels = json!({"alertname": "HighErrorRate", "service": "x0tta6bl4", "severity": "critical", "run": uniq()});
    let starts = ago(30);
    am.post(labels.clone(), &starts, None).await;
    let inc = succeeded_then_verified(&app, &am, &[(&labels, &starts)]).await;
    controller.await.expect("controller");

    assert_eq!(inc["policy"], "x0tta6bl4");
    assert_eq!(inc["trigger"], "critical");
    assert_undone(&fake);
}

/// Seed 002's HIGH tier, "roll back if not resolved in 30 min": an alert that started 29 min
/// 58 s ago asks the approvers and writes nothing; with nobody answering, the rollback runs
/// by itself when the 30 minutes are up.
#[tokio::test]
async fn x0tta6bl4_high_tier_asks_first_and_rolls_back_when_30_minutes_are_up() {
    let (fake, app, controller, _svc) = x0tta6bl4_world().await;
    let am = Alertmanager::start(&app.url("/webhook/alertmanager"), TOKEN).await;
    let labels = json!({"alertname": "HighErrorRate", "service": "x0tta6bl4", "severity": "high", "run": uniq()});
    let starts = ago(30 * 60 - 2);
    am.post(labels.clone(), &starts, None).await;
    let list = app
        .wait_incidents("the approval request", |l| {
            l.len() == 1 && l[0]["phase"] == "awaiting_approval"
        })
        .await;
    assert_eq!(list[0]["trigger"], "high");
    assert_eq!(
        list[0]["decision"]["outcome"], "escalate_later",
        "{}",
        list[0]["decision"]
    );
    assert_eq!(fake.writes(), 0, "asked, not acted");

    let inc = succeeded_then_verified(&app, &am, &[(&labels, &starts)]).await;
    controller.await.expect("controller");
    let acted: chrono::DateTime<chrono::Utc> = inc["acted_at"].as_str().unwrap().parse().unwrap();
    let started: chrono::DateTime<chrono::Utc> = starts.parse().unwrap();
    assert!(
        acted >= started + chrono::Duration::minutes(30),
        "acted at {acted}, before startsAt + 30m ({started})"
    );
    assert_undone(&fake);
}

/// Seed 004 (Portal API on the ALB, the change plan): the automatic 5xx > 5 % trigger reverts
/// the listener to 100 % stable with stickiness disabled, one write, and leaves a
/// platform="kubernetes" alert of the same service to the Kubernetes policy (no second write).
#[tokio::test]
async fn portal_api_on_the_alb_reverts_the_listener_and_leaves_kubernetes_alerts_alone() {
    let fx = AlbFixture::start().await;
    let proxy = AwsProxy::start(&fx.moto.endpoint, 1).await;
    let svc = FakeService::start("portal-alb").await;
    let exec = AlbExecutor::new(elb_client(proxy.endpoint(0)), &fast_settings());
    let app = spawn_app(Options {
        policies: vec![(
            "portal-api.yaml",
            shipped("portal-api.yaml", &svc.health_url(), on_moto(&fx)),
        )],
        executors: Some(Executors {
            alb: Some(exec),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let am = Alertmanager::start(&app.url("/webhook/alertmanager"), TOKEN).await;
    let labels = json!({"alertname": "HighErrorRate", "service": "portal-api", "severity": "critical", "run": uniq()});
    let starts = ago(6 * 60);
    am.post(labels.clone(), &starts, None).await;
    let inc = succeeded_then_verified(&app, &am, &[(&labels, &starts)]).await;
    assert_eq!(inc["policy"], "portal-api");
    assert_eq!(inc["trigger"], "error-rate-above-5pct");
    let actions = fx.listener_actions().await;
    assert_eq!(
        weights(&actions),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
    );
    assert!(!stickiness(&actions).0);
    assert_eq!(proxy.count("ModifyListener"), 1);
    // `scope: listener`: the fixture's `/api/*` rule forwarded to the canary too.
    assert_eq!(
        weights(&fx.rule_actions().await),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
    );
    assert_eq!(proxy.count("ModifyRule"), 1);

    // The Kubernetes Portal API's alert matches no policy here: stored, no incident, no write.
    let k8s = json!({"alertname": "HighErrorRate", "service": "portal-api", "platform": "kubernetes", "severity": "critical", "run": uniq()});
    let before = app.responder.store.alert_count().await.unwrap();
    am.post(k8s, &ago(6 * 60), None).await;
    // Wait for the proof that it was decided: stored, and no longer pending.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while app.responder.store.alert_count().await.unwrap() == before
        || !app.responder.store.pending_alert_ids(10).await.unwrap().is_empty()
    {
        assert!(std::time::Instant::now() < deadline, "the alert was never decided");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.incidents().await.len(), 1, "no incident for the Kubernetes alert");
    assert_eq!(proxy.count("ModifyListener"), 1);
}
