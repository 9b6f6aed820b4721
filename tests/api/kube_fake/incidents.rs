//! Kubernetes rollbacks through the whole service, from Alertmanager to verification.

use super::*;

/// Issue 4's end to end: a real Alertmanager delivers an alert matching an automatic
/// Kubernetes policy; the Service selector and the canary's replicas end as the seed's
/// `kubectl patch service` and `kubectl scale --replicas=0` would leave them, verified.
#[tokio::test]
async fn alertmanager_alert_runs_the_seed_rollback_commands_on_kubernetes() {
    use crate::helpers::*;
    use crate::peers::Alertmanager;
    use rollback_responder::action::Executors;

    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    fake.insert(
        "endpointslices",
        endpointslice(
            NS,
            "portal-api-prod",
            "x1",
            &[("portal-api-stable-0", true), ("portal-api-stable-1", true)],
        ),
    );
    let policy = r#"
name: portal-api-k8s
service: portal-api
matchers: ['service="portal-api"']
target:
  kubernetes:
    namespace: portal
    min_ready_replicas: 2
    rollout_timeout: 5s
    steps:
      - switch_service: {service: portal-api-prod, selector: {app: portal-api, version: v1.0.0-rc.0}}
      - scale: {deployment: portal-api-canary, replicas: 0}
triggers:
  - name: health-check-failing
    matchers: ['alertname="HealthCheckFailing"']
    for: 2m
    mode: auto
verification:
  bake: 3s
  interval: 500ms
"#;
    let app = spawn_app(Options {
        policies: vec![("portal-api-k8s.yaml", policy.to_string())],
        executors: Some(Executors {
            kube: Some(executor(&fake)),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    let am = Alertmanager::start(&app.url("/webhook/alertmanager"), TOKEN).await;
    let run = uuid::Uuid::now_v7().simple().to_string();
    am.post(
        json!({"alertname": "HealthCheckFailing", "service": "portal-api", "severity": "critical", "run": run}),
        &ago(150),
        None,
    )
    .await;
    app.wait_incidents("verifying", |l| l.len() == 1 && l[0]["phase"] == "verifying")
        .await;
    scaled_down(&fake);
    let list = app
        .wait_incidents("verified kubernetes rollback", |l| {
            l.len() == 1 && l[0]["phase"] == "verified"
        })
        .await;
    let svc = fake.get("services", NS, "portal-api-prod").unwrap();
    assert_eq!(
        svc["spec"]["selector"],
        json!({"app": "portal-api", "version": "v1.0.0-rc.0"}),
        "replaced, stale key gone"
    );
    assert_eq!(
        fake.get("deployments", NS, "portal-api-canary").unwrap()["spec"]["replicas"],
        0
    );
    // Exactly two writes reached the API server: the selector patch and the scale patch.
    assert_eq!(fake.writes(), 2);
    let patched: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        patched,
        [
            format!("/api/v1/namespaces/{NS}/services/portal-api-prod"),
            format!("/apis/apps/v1/namespaces/{NS}/deployments/portal-api-canary/scale"),
        ]
    );
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    assert_eq!(inc["executed"], true);
    let done = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "action_succeeded")
        .unwrap();
    assert_eq!(done["detail"]["steps"][0]["before"]["selector"]["version"], "v1.0.0");
    assert_eq!(
        done["detail"]["steps"][0]["after"]["selector"]["version"],
        "v1.0.0-rc.0"
    );
    let checks: Vec<&Value> = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "verification_check")
        .collect();
    let names: Vec<&str> = checks.iter().map(|c| c["detail"]["check"].as_str().unwrap()).collect();
    assert_eq!(names, ["read_back", "ready"]);
    assert!(checks.iter().all(|c| c["detail"]["passed"] == true), "{checks:#?}");
    // The readiness evidence is kept: two ready endpoints of the stable pods.
    let ready = &checks[1]["detail"];
    assert!(
        ready["evidence"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["ready_endpoints"] == 2 && s["passed"] == true),
        "{ready}"
    );
    let rb = &checks[0]["detail"];
    assert!(
        rb["value"]
            .as_str()
            .unwrap()
            .contains("svc/portal-api-prod app=portal-api,version=v1.0.0-rc.0; deploy/portal-api-canary replicas 0"),
        "{rb}"
    );
}

/// Drift during the bake: someone puts the Service back on the canary (`kubectl edit`). The
/// read-back sees it, names the field's manager, fails verification and writes nothing back.
#[tokio::test]
async fn a_service_selector_changed_back_during_the_bake_is_drift_with_its_manager() {
    use crate::helpers::*;
    use rollback_responder::action::Executors;

    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    fake.insert(
        "endpointslices",
        endpointslice(
            NS,
            "portal-api-prod",
            "x1",
            &[("portal-api-stable-0", true), ("portal-api-stable-1", true)],
        ),
    );
    let policy = r#"
name: portal-api-k8s
service: portal-api
matchers: ['service="portal-api"']
target:
  kubernetes:
    namespace: portal
    min_ready_replicas: 2
    rollout_timeout: 5s
    steps:
      - switch_service: {service: portal-api-prod, selector: {app: portal-api, version: v1.0.0-rc.0}}
      - scale: {deployment: portal-api-canary, replicas: 0}
triggers:
  - name: health-check-failing
    matchers: ['alertname="HealthCheckFailing"']
    mode: auto
verification:
  bake: 60s
  interval: 200ms
"#;
    let app = spawn_app(Options {
        policies: vec![("portal-api-k8s.yaml", policy.to_string())],
        executors: Some(Executors {
            kube: Some(executor(&fake)),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HealthCheckFailing", "portal-api", "kd01", &ago(60), None)],
    ))
    .await;
    let list = app
        .wait_incidents("verifying", |l| l.len() == 1 && l[0]["phase"] == "verifying")
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    scaled_down(&fake);
    let writes = fake.writes();
    assert_eq!(
        fake.get("services", NS, "portal-api-prod").unwrap()["spec"]["selector"]["version"],
        "v1.0.0-rc.0"
    );
    // `kubectl edit` puts the canary back; the API server records who owns the selector now.
    fake.modify("services", NS, "portal-api-prod", |s| {
        s["spec"]["selector"] = json!({"app": "portal-api", "version": "v1.0.0"});
        s["metadata"]["managedFields"] = json!([
            {"manager": "rollback-responder", "operation": "Update", "time": "2026-12-03T06:00:00Z",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:selector": {}}}},
            {"manager": "kubectl-edit", "operation": "Update", "time": "2026-12-03T06:00:02Z",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:selector": {}}}}
        ]);
    });
    let inc = app
        .wait_incident(&id, "verification failed on drift", |i| {
            i["phase"] == "verification_failed"
        })
        .await;
    let rb = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "verification_check" && e["detail"]["check"] == "read_back")
        .unwrap()["detail"]
        .clone();
    assert_eq!(rb["passed"], false, "{rb}");
    let drift = rb["drift"].as_str().unwrap();
    assert!(
        drift.starts_with(
            "service/portal-api-prod selector changed back to app=portal-api,version=v1.0.0 \
             (written: app=portal-api,version=v1.0.0-rc.0) by `kubectl-edit` (Update at 2026-12-03T06:00:02Z"
        ),
        "{drift}"
    );
    // Good samples before the drift, then the drift: the check read all along.
    let samples = rb["samples"].as_array().unwrap();
    assert!(samples.len() >= 2 && samples[0][2] == true, "{rb}");
    let failed = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "verification_failed")
        .unwrap();
    assert!(
        failed["summary"]
            .as_str()
            .unwrap()
            .contains("read_back: DRIFT: service/portal-api-prod"),
        "{failed}"
    );
    // Not fought: nothing written after the drift; the selector is what the person set.
    assert_eq!(fake.writes(), writes);
    assert_eq!(
        fake.get("services", NS, "portal-api-prod").unwrap()["spec"]["selector"]["version"],
        "v1.0.0"
    );
    assert_eq!(inc["open"], true, "a failed verification waits for a human");
}

/// The read-back through the bake, step by step: a restored template replaced by the canary's
/// and a scaled Deployment scaled back are drift, each named with the field's manager.
#[tokio::test]
async fn read_back_sees_a_replaced_template_and_a_scale_back_with_their_managers() {
    use rollback_responder::action::kubernetes::KubeBaseline;

    let fake = FakeKube::start().await;
    seed_world(&fake, true);
    let tpls = undo_world(&fake);
    let exec = executor(&fake);
    let t = target(vec![undo_step(None), scale_step()]);
    run(&exec, &t, false).await.0.expect("revert");
    let mut baseline: Option<KubeBaseline> = None;
    let first = exec.read_back_sample(&t, &mut baseline).await.expect("read");
    assert!(first.ok, "{first:?}");
    assert_eq!(
        first.value,
        "as written: deploy/portal-api revision 3 [api=portal-api:1.0.0-rc.0]; deploy/portal-api-canary replicas 0"
    );
    let again = exec.read_back_sample(&t, &mut baseline).await.expect("read");
    assert!(again.ok && again.drift.is_none(), "{again:?}");
    let reads = fake.requests().len();

    // A pipeline re-applies the canary's template.
    fake.modify("deployments", NS, "portal-api", |d| {
        d["spec"]["template"] = tpls[2].clone();
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = json!("4");
        d["metadata"]["managedFields"] = json!([
            {"manager": "argocd-controller", "operation": "Apply", "time": "2026-12-03T06:10:00Z",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:template": {"f:spec": {}}}}}
        ]);
    });
    let drift = exec.read_back_sample(&t, &mut baseline).await.expect("read");
    assert!(!drift.ok);
    let what = drift.drift.unwrap();
    assert_eq!(
        what,
        "deployment/portal-api is no longer the restored template: revision 3 [api=portal-api:1.0.0-rc.0] -> \
         4 [api=portal-api:1.0.0] by `argocd-controller` (Apply at 2026-12-03T06:10:00Z)"
    );
    assert!(fake.requests().len() > reads, "it read the API again");

    // Put the template back; then someone scales the canary up again.
    fake.modify("deployments", NS, "portal-api", |d| {
        d["spec"]["template"] = tpls[1].clone();
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = json!("3");
    });
    fake.modify("deployments", NS, "portal-api-canary", |d| {
        d["spec"]["replicas"] = json!(3);
    });
    let scaled = exec.read_back_sample(&t, &mut baseline).await.expect("read");
    assert_eq!(
        scaled.drift.as_deref(),
        Some(
            "deployment/portal-api-canary replicas changed to 3 (written: 0) \
             by unknown (no managed-fields entry owns /f:spec/f:replicas)"
        )
    );
    assert_eq!(
        fake.writes(),
        2,
        "the read-back writes nothing: only the revert's two writes"
    );
}
