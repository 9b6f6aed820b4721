use rollback_responder::action::Executors;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::*;
use crate::helpers::*;
use crate::notify::{received, SLACK_TOKEN};
use crate::support::fake_kube::endpointslice;

const POLICY: &str = r##"
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
verification: {bake: 1s, interval: 200ms}
notify:
  slack: {channel: "#portal-alerts"}
"##;

async fn slack() -> MockServer {
    let slack = MockServer::start().await;
    for p in ["/chat.postMessage", "/chat.update"] {
        Mock::given(method("POST"))
            .and(path(p))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"ok": true, "channel": "C0ALERTS", "ts": "1763790000.000100"})),
            )
            .mount(&slack)
            .await;
    }
    slack
}

async fn start(proxy: &FaultProxy, slack: &MockServer) -> TestApp {
    spawn_app(Options {
        policies: vec![("portal-api-k8s.yaml", POLICY.to_string())],
        env: env(&[
            ("ROLLBACK_RESPONDER__SLACK__API_URL", &slack.uri()),
            ("ROLLBACK_RESPONDER__SLACK__BOT_TOKEN", SLACK_TOKEN),
            ("ROLLBACK_RESPONDER__NOTIFICATIONS__INITIAL_BACKOFF", "50ms"),
        ]),
        executors: Some(Executors {
            kube: Some(KubeExecutor::new(kube_client(&proxy.url), &fast_kube_settings())),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await
}

async fn fire(app: &TestApp, fingerprint: &str) {
    app.post_webhook(&payload(
        "firing",
        vec![alert("HealthCheckFailing", "portal-api", fingerprint, &ago(150), None)],
    ))
    .await;
}

fn steps_of(inc: &Value) -> Vec<String> {
    inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "action_step")
        .map(|e| e["summary"].as_str().unwrap().to_string())
        .collect()
}

/// Thread replies Slack received, in order.
async fn slack_replies(slack: &MockServer, until: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let replies: Vec<String> = received(slack)
            .await
            .into_iter()
            .filter(|(_, p, b, _)| p == "/chat.postMessage" && b.get("thread_ts").is_some())
            .map(|(_, _, b, _)| b["text"].as_str().unwrap_or("").to_string())
            .collect();
        if until(&replies) {
            return replies;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slack replies so far: {replies:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Plays the Deployment controller for the canary (the fake runs none): once its spec asks
/// for 0 replicas, it reports that generation observed and no pods left, as a cluster would.
fn scaled_to_zero_by_the_controller(fake: &std::sync::Arc<FakeKube>) -> tokio::task::JoinHandle<()> {
    let fake = fake.clone();
    tokio::spawn(async move {
        loop {
            let d = fake.get("deployments", NS, "portal-api-canary").expect("deployment");
            if d["spec"]["replicas"] == 0 {
                let generation = d["metadata"]["generation"].clone();
                fake.modify("deployments", NS, "portal-api-canary", |d| {
                    d["status"] = json!({"observedGeneration": generation, "replicas": 0, "updatedReplicas": 0,
                            "readyReplicas": 0, "availableReplicas": 0});
                });
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

#[tokio::test]
async fn a_kubernetes_rollback_through_503s_reads_in_kubernetes_terms_in_the_timeline_and_slack() {
    let fake = std::sync::Arc::new(FakeKube::start().await);
    kube_world(&fake);
    fake.insert(
        "endpointslices",
        endpointslice(
            NS,
            "portal-api-prod",
            "x1",
            &[("portal-api-stable-0", true), ("portal-api-stable-1", true)],
        ),
    );
    // Verification holds a scale step to what a cluster does: the Deployment controller
    // observes the new generation and the canary's pods go. The fake runs no controller.
    let controller = scaled_to_zero_by_the_controller(&fake);
    let proxy = FaultProxy::start(&fake.url()).await;
    proxy.inject(Fault::kube_unavailable(3));
    proxy.inject(Fault {
        matching: "PATCH /apis/apps/v1/namespaces/portal/deployments/portal-api-canary/scale".into(),
        ..Fault::kube_unavailable(2)
    });
    let slack = slack().await;
    let app = start(&proxy, &slack).await;
    fire(&app, "k8s503").await;
    let list = app
        .wait_incidents("verified kubernetes rollback", |l| {
            l.len() == 1 && l[0]["phase"] == "verified"
        })
        .await;
    controller.await.expect("controller");
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    assert_eq!(inc["executed"], true);
    assert_eq!(
        fake.get("services", NS, "portal-api-prod").unwrap()["spec"]["selector"],
        json!({"app": "portal-api", "version": "v1.0.0-rc.0"})
    );
    assert_eq!(
        fake.get("deployments", NS, "portal-api-canary").unwrap()["spec"]["replicas"],
        0
    );
    assert_eq!(fake.writes(), 2);

    let steps = steps_of(&inc);
    // Failed attempts carry a jittered backoff: compare them up to "(retrying in".
    let shown: Vec<String> = steps
        .iter()
        .map(|s| match s.find(" (retrying in ") {
            Some(i) => s[..i].to_string(),
            None => s.clone(),
        })
        .collect();
    let get_503 = |n: u32| {
        format!(
            "get services/portal-api-prod in portal attempt {n} failed: api kubernetes API error 503 \
                 ServiceUnavailable: etcdserver: leader changed"
        )
    };
    let patch_503 = |n: u32| {
        format!(
            "patch deployments/scale/portal-api-canary in portal attempt {n} failed: api kubernetes API error 503 \
                 ServiceUnavailable: etcdserver: leader changed"
        )
    };
    assert_eq!(
        shown,
        vec![
            get_503(1),
            get_503(2),
            get_503(3),
            "read: service/portal-api-prod selects app=portal-api,version=v1.0.0".to_string(),
            "read: deployment/portal-api-canary has 3 replica(s)".to_string(),
            "pre-check service/portal-api-prod: 2 of 2 pod(s) matching app=portal-api,version=v1.0.0-rc.0 Ready, \
                 2 required: passed"
                .to_string(),
            "planned: service/portal-api-prod selects app=portal-api,version=v1.0.0-rc.0".to_string(),
            "service/portal-api-prod patched".to_string(),
            "read back: service/portal-api-prod selects app=portal-api,version=v1.0.0-rc.0: as wanted".to_string(),
            "planned: deployment/portal-api-canary has 0 replica(s)".to_string(),
            patch_503(1),
            patch_503(2),
            "deployment/portal-api-canary/scale patched".to_string(),
            "read back: deployment/portal-api-canary has 0 replica(s): as wanted".to_string(),
        ],
        "{steps:#?}"
    );
    for s in &steps {
        assert!(!s.contains("null"), "{s}");
    }
    // Slack heard the writes and the first failure of each call as they happened.
    let replies = slack_replies(&slack, |r| {
        r.iter().any(|t| t == "deployment/portal-api-canary/scale patched")
    })
    .await;
    let notable: Vec<&String> = replies
        .iter()
        .filter(|t| t.contains(" patched") || t.contains(" attempt "))
        .collect();
    assert_eq!(notable.len(), 4, "{replies:#?}");
    assert!(notable[0].starts_with(&get_503(1)), "{replies:#?}");
    assert_eq!(notable[1], "service/portal-api-prod patched");
    assert!(notable[2].starts_with(&patch_503(1)), "{replies:#?}");
    assert_eq!(notable[3], "deployment/portal-api-canary/scale patched");
}

#[tokio::test]
async fn a_partial_revert_counts_as_a_rollback_and_says_what_took_and_what_failed() {
    let fake = FakeKube::start().await;
    kube_world(&fake);
    let proxy = FaultProxy::start(&fake.url()).await;
    proxy.inject(Fault {
        matching: "PATCH /apis/apps/v1/namespaces/portal/deployments/portal-api-canary/scale".into(),
        status: 400,
        body: json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                         "message": "replicas: Invalid value", "reason": "BadRequest", "code": 400})
        .to_string(),
        ..Fault::kube_unavailable(1)
    });
    let slack = slack().await;
    let app = start(&proxy, &slack).await;
    fire(&app, "k8spartial").await;
    let list = app
        .wait_incidents("failed rollback", |l| l.len() == 1 && l[0]["phase"] == "failed")
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    // The Service switch took, the scale did not.
    assert_eq!(
        fake.get("services", NS, "portal-api-prod").unwrap()["spec"]["selector"]["version"],
        "v1.0.0-rc.0"
    );
    assert_eq!(
        fake.get("deployments", NS, "portal-api-canary").unwrap()["spec"]["replicas"],
        3
    );
    // It changed the target: a rollback for the cooldown and the rate limit.
    assert_eq!(inc["executed"], true, "{inc:#}");
    let timeline = inc["timeline"].as_array().unwrap();
    let patched = timeline
        .iter()
        .find(|e| e["kind"] == "action_step" && e["summary"] == "service/portal-api-prod patched")
        .expect("the switch is recorded");
    assert_eq!(
        inc["acted_at"], patched["at"],
        "acted_at is when the target first changed"
    );
    let failed = timeline.iter().find(|e| e["kind"] == "action_failed").expect("failure");
    let summary = failed["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("partial rollback: service/portal-api-prod patched (at "),
        "{summary}"
    );
    assert!(
        summary.contains(
            " took; then it failed: kubernetes API error 400 BadRequest: patch \
                 deployments/scale/portal-api-canary in portal: replicas: Invalid value (code api); the remaining \
                 steps were not done"
        ),
        "{summary}"
    );
    // The switch reached Slack before the failure did.
    let replies = slack_replies(&slack, |r| r.iter().any(|t| t.contains("partial rollback"))).await;
    let switched = replies.iter().position(|t| t == "service/portal-api-prod patched");
    let failure = replies.iter().position(|t| t.contains("partial rollback"));
    assert!(
        matches!((switched, failure), (Some(a), Some(b)) if a < b),
        "{replies:#?}"
    );
}
