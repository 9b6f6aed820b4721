//! Faults between the executors and their peers: a proxy answering 503 or throttling in front
//! of moto and of the fake Kubernetes API server, and a write whose answer comes too late.
//! Each test asserts what the peer ended up with and how many writes it received, not only
//! what the executor reports.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_smithy_types::timeout::TimeoutConfig;
use rollback_responder::action::alb::{AlbExecutor, AlbOutcome, AlbStep, AwsSettings};
use rollback_responder::action::kubernetes::{KubeExecutor, KubeSettings, KubeStep, KubeStepRecord, KubernetesTarget};
use serde_json::json;

use crate::support::alb_fixture::{elb_client, weights, AlbFixture};
use crate::support::aws_proxy::{AwsProxy, HoldPoint};
use crate::support::fake_kube::{deployment, pod, service, template, FakeKube};
use crate::support::fault_proxy::{Fault, FaultProxy};

const NS: &str = "portal";

fn sel(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The seed's world: the Service selects the canary, two ready stable pods, the canary
/// Deployment at 3 replicas.
pub fn kube_world(fake: &FakeKube) {
    fake.insert(
        "services",
        service(NS, "portal-api-prod", &[("app", "portal-api"), ("version", "v1.0.0")]),
    );
    for i in 0..2 {
        fake.insert(
            "pods",
            pod(
                NS,
                &format!("portal-api-stable-{i}"),
                &[("app", "portal-api"), ("version", "v1.0.0-rc.0")],
                true,
            ),
        );
    }
    fake.insert(
        "deployments",
        deployment(
            NS,
            "portal-api-canary",
            "22222222-2222-4222-8222-222222222222",
            &[("app", "portal-api"), ("version", "v1.0.0")],
            template(&[("app", "portal-api"), ("version", "v1.0.0")], "portal-api:1.0.0"),
            1,
        ),
    );
}

pub fn kube_target() -> KubernetesTarget {
    KubernetesTarget {
        namespace: NS.into(),
        steps: vec![
            KubeStep::SwitchService {
                service: "portal-api-prod".into(),
                selector: sel(&[("app", "portal-api"), ("version", "v1.0.0-rc.0")]),
            },
            KubeStep::Scale {
                deployment: "portal-api-canary".into(),
                replicas: 0,
            },
        ],
        min_ready_replicas: 2,
        rollout_timeout: Duration::from_secs(5),
        gitops: None,
    }
}

/// A kube client talking to `url` (the proxy) over plain HTTP, without kube's own retries.
pub fn kube_client(url: &str) -> kube::Client {
    rollback_responder::tls::install_crypto_provider();
    let mut config = kube::Config::new(url.parse().expect("proxy url"));
    config.default_retry = false;
    kube::Client::try_from(config).expect("kube client")
}

/// Fast backoff so a burst of faults is ridden out in well under a second.
pub fn fast_kube_settings() -> KubeSettings {
    KubeSettings {
        initial_backoff_ms: 10,
        ..KubeSettings::default()
    }
}

#[tokio::test]
async fn a_burst_of_503s_from_the_kubernetes_api_does_not_abandon_the_rollback() {
    let fake = FakeKube::start().await;
    kube_world(&fake);
    let proxy = FaultProxy::start(&fake.url()).await;
    // Four 503s on the first reads, then four more on the scale patch, after the Service
    // was switched: more than the three tries that used to abandon the rollback.
    proxy.inject(Fault::kube_unavailable(4));
    proxy.inject(Fault {
        matching: "PATCH /apis/apps/v1/namespaces/portal/deployments/portal-api-canary/scale".into(),
        ..Fault::kube_unavailable(4)
    });
    let exec = KubeExecutor::new(kube_client(&proxy.url), &fast_kube_settings());

    let mut records = Vec::new();
    let result = exec.revert(&kube_target(), false, &mut |r| records.push(r)).await;
    let outcome = result.expect("the rollback completes");
    assert!(outcome.changed);

    // What the API server holds: switched, scaled, each written exactly once.
    let svc = fake.get("services", NS, "portal-api-prod").expect("service");
    assert_eq!(
        svc["spec"]["selector"],
        json!({"app": "portal-api", "version": "v1.0.0-rc.0"})
    );
    let canary = fake.get("deployments", NS, "portal-api-canary").expect("canary");
    assert_eq!(canary["spec"]["replicas"], 0);
    assert_eq!(fake.writes(), 2);
    assert_eq!(proxy.injected(), 8);

    // Every failed attempt is reported, naming the call, and each was retried.
    let attempts: Vec<(String, u32, bool)> = records
        .iter()
        .filter_map(|r| match r {
            KubeStepRecord::AttemptFailed(a) => Some((a.call.clone(), a.attempt, a.will_retry)),
            _ => None,
        })
        .collect();
    let get = "get services/portal-api-prod in portal".to_string();
    let patch = "patch deployments/scale/portal-api-canary in portal".to_string();
    assert_eq!(
        attempts,
        vec![
            (get.clone(), 1, true),
            (get.clone(), 2, true),
            (get.clone(), 3, true),
            (get, 4, true),
            (patch.clone(), 1, true),
            (patch.clone(), 2, true),
            (patch.clone(), 3, true),
            (patch, 4, true),
        ]
    );
}

#[tokio::test]
async fn a_permanent_kubernetes_error_is_not_retried_and_names_the_call() {
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
    let exec = KubeExecutor::new(kube_client(&proxy.url), &fast_kube_settings());
    let mut records = Vec::new();
    let err = exec
        .revert(&kube_target(), false, &mut |r| records.push(r))
        .await
        .expect_err("a bad request fails");
    assert_eq!(
        err.to_string(),
        "kubernetes API error 400 BadRequest: patch deployments/scale/portal-api-canary in portal: replicas: Invalid value"
    );
    // Tried once; the Service switch before it stays applied.
    assert_eq!(proxy.injected(), 1);
    let failed: Vec<_> = records
        .iter()
        .filter_map(|r| match r {
            KubeStepRecord::AttemptFailed(a) => Some((a.attempt, a.retryable, a.will_retry)),
            _ => None,
        })
        .collect();
    assert_eq!(failed, vec![(1, false, false)]);
    assert_eq!(
        fake.get("services", NS, "portal-api-prod").unwrap()["spec"]["selector"]["version"],
        "v1.0.0-rc.0"
    );
    assert_eq!(
        fake.get("deployments", NS, "portal-api-canary").unwrap()["spec"]["replicas"],
        3
    );
}

fn fast_aws_settings() -> AwsSettings {
    AwsSettings {
        initial_backoff_ms: 10,
        ..AwsSettings::default()
    }
}

#[tokio::test]
async fn throttling_and_503s_from_elbv2_do_not_abandon_the_rollback() {
    let fx = AlbFixture::start().await;
    let proxy = FaultProxy::start(&fx.moto.endpoint).await;
    proxy.inject(Fault::aws("DescribeTargetHealth", 4, 400, "Throttling"));
    proxy.inject(Fault::aws("ModifyListener", 4, 503, "ServiceUnavailable"));
    let exec = AlbExecutor::new(elb_client(&proxy.url), &fast_aws_settings());

    let mut steps = Vec::new();
    let result = exec.revert(&fx.listener_target(), false, &mut |s| steps.push(s)).await;
    assert!(matches!(result, Ok(AlbOutcome::Reverted { .. })), "{result:?}");

    // moto: all traffic on stable, written by exactly one ModifyListener.
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
    );
    assert_eq!(proxy.forwarded("ModifyListener"), 1);
    assert_eq!(proxy.injected(), 8);
    let failed: Vec<(String, String, u32)> = steps
        .iter()
        .filter_map(|s| match s {
            AlbStep::AttemptFailed(a) if a.will_retry => Some((a.call.clone(), a.code.clone(), a.attempt)),
            _ => None,
        })
        .collect();
    let mut want = Vec::new();
    for n in 1..=4 {
        want.push(("DescribeTargetHealth".to_string(), "Throttling".to_string(), n));
    }
    for n in 1..=4 {
        want.push(("ModifyListener".to_string(), "ServiceUnavailable".to_string(), n));
    }
    assert_eq!(failed, want);
    // Before each resend of the write, the listener was read again and found not yet written.
    let rereads: Vec<(u32, bool)> = steps
        .iter()
        .filter_map(|s| match s {
            AlbStep::ReadBeforeRetry { attempt, applied, .. } => Some((*attempt, *applied)),
            _ => None,
        })
        .collect();
    assert_eq!(rereads, vec![(2, false), (3, false), (4, false), (5, false)]);
}

#[tokio::test]
async fn a_write_answered_after_the_attempt_timeout_is_read_back_not_sent_twice() {
    let fx = AlbFixture::start().await;
    let proxy = AwsProxy::start(&fx.moto.endpoint, 1).await;
    // moto applies the ModifyListener, but its answer is held past the 1 s attempt timeout.
    let mut held = proxy.hold_next("ModifyListener", HoldPoint::AfterForward);
    let client = elb_client(proxy.endpoint(0));
    let conf = client
        .config()
        .to_builder()
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(1))
                .operation_attempt_timeout(Duration::from_secs(1))
                .build(),
        )
        .build();
    let exec = AlbExecutor::new(
        aws_sdk_elasticloadbalancingv2::Client::from_conf(conf),
        &fast_aws_settings(),
    );
    let t = fx.listener_target();
    let task = tokio::spawn(async move {
        let mut steps = Vec::new();
        let result = exec.revert(&t, false, &mut |s| steps.push(s)).await;
        (result, steps)
    });
    held.caught(Duration::from_secs(20)).await;
    // The executor finishes while the first answer is still held: it read the listener,
    // saw its write applied and did not send it again.
    let (result, steps) = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the revert finishes while the first answer is still held")
        .expect("task");
    held.release();
    assert!(matches!(result, Ok(AlbOutcome::Reverted { .. })), "{result:?}");
    assert_eq!(proxy.count("ModifyListener"), 1, "one write reached AWS");
    assert_eq!(
        weights(&fx.listener_actions().await),
        vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
    );
    assert!(steps.iter().any(
        |s| matches!(s, AlbStep::AttemptFailed(a) if a.call == "ModifyListener" && a.code == "Timeout" && a.will_retry)
    ));
    assert!(steps.iter().any(|s| matches!(
        s,
        AlbStep::ReadBeforeRetry {
            attempt: 2,
            applied: true,
            ..
        }
    )));
}

// ---------------------------------------------------------------------------------------------
// Through the whole service: the timeline and the Slack thread
// ---------------------------------------------------------------------------------------------

mod service {
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
}

// ---------------------------------------------------------------------------------------------
// Messages follow what happened
// ---------------------------------------------------------------------------------------------

mod messages {
    use rollback_responder::action::Executors;
    use rollback_responder::incident::IncidentId;
    use serde_json::Value;

    use super::*;
    use crate::helpers::*;
    use crate::notify::{policy_with_notify, received, wait_requests, Peers};
    use crate::support::alb_fixture::forward;

    #[tokio::test]
    async fn a_listener_found_already_reverted_never_tells_the_public_it_was_rolled_back() {
        let fx = AlbFixture::start().await;
        // Someone already put all traffic back on stable.
        fx.elb
            .modify_listener()
            .listener_arn(&fx.listener_arn)
            .default_actions(forward(&[(&fx.stable_tg, 100), (&fx.canary_tg, 0)], Some(300)))
            .send()
            .await
            .expect("ModifyListener");
        let peers = Peers::start().await;
        let app = spawn_app(Options {
            policies: vec![("portal-api.yaml", policy_with_notify(&fx, "auto"))],
            env: peers.env(),
            executors: Some(Executors {
                alb: Some(fx.executor()),
                ..Default::default()
            }),
            ..Options::default()
        })
        .await;
        let starts = ago(60);
        app.post_webhook(&payload(
            "firing",
            vec![alert("HighErrorRate", "portal-api", "sp01", &starts, None)],
        ))
        .await;
        let list = app
            .wait_incidents("verified", |l| l.len() == 1 && l[0]["phase"] == "verified")
            .await;
        assert_eq!(list[0]["executed"], false);
        app.post_webhook(&payload(
            "resolved",
            vec![alert("HighErrorRate", "portal-api", "sp01", &starts, Some(&ago(0)))],
        ))
        .await;
        app.wait_incidents("closed", |l| l[0]["open"] == false).await;

        let sp = wait_requests(&peers.statuspage, 3, "statuspage").await;
        let bodies: Vec<(String, String, Value)> = sp
            .iter()
            .map(|(m, p, b, _)| (m.clone(), p.clone(), b["incident"].clone()))
            .collect();
        assert_eq!(bodies.len(), 3, "{bodies:#?}");
        assert_eq!(
            (bodies[0].0.as_str(), bodies[0].1.as_str()),
            ("POST", "/pages/PAGE1/incidents")
        );
        assert_eq!(bodies[0].2["name"], "portal-api: degraded service");
        assert_eq!(bodies[0].2["status"], "investigating");
        assert_eq!(
            bodies[0].2["body"],
            "We identified a problem with portal-api and are investigating."
        );
        assert_eq!(bodies[1].2["status"], "monitoring");
        assert_eq!(bodies[1].2["body"], "portal-api is healthy again. We are monitoring.");
        assert_eq!(bodies[2].2["status"], "resolved");
        assert_eq!(bodies[2].2["body"], "portal-api has recovered.");
        for (_, _, b) in &bodies {
            let text = b.to_string();
            assert!(
                !text.contains("rolling") && !text.contains("rolled back") && !text.contains("serving all traffic"),
                "{text}"
            );
        }
        // Nor does PagerDuty hear of a rollback we did not execute.
        let pd = received(&peers.pagerduty).await;
        assert!(
            pd.iter().all(|(_, p, _, _)| p != "/v2/change/enqueue"),
            "{:#?}",
            pd.iter().map(|r| r.2.clone()).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn an_incident_that_never_paged_sends_pagerduty_no_resolve() {
        let fx = AlbFixture::start().await;
        let peers = Peers::start().await;
        // The trigger waits 10 minutes: the alert resolves long before it would page.
        let policy = policy_with_notify(&fx, "auto").replace(
            "    matchers: ['alertname=\"HighErrorRate\"']\n    mode: auto",
            "    matchers: ['alertname=\"HighErrorRate\"']\n    for: 10m\n    mode: auto",
        );
        assert!(policy.contains("for: 10m"), "{policy}");
        let app = spawn_app(Options {
            policies: vec![("portal-api.yaml", policy)],
            env: peers.env(),
            executors: Some(Executors {
                alb: Some(fx.executor()),
                ..Default::default()
            }),
            ..Options::default()
        })
        .await;
        let starts = ago(5);
        app.post_webhook(&payload(
            "firing",
            vec![alert("HighErrorRate", "portal-api", "pd01", &starts, None)],
        ))
        .await;
        app.wait_incidents("waiting", |l| l.len() == 1 && l[0]["phase"] == "waiting")
            .await;
        app.post_webhook(&payload(
            "resolved",
            vec![alert("HighErrorRate", "portal-api", "pd01", &starts, Some(&ago(0)))],
        ))
        .await;
        let list = app
            .wait_incidents("cancelled and closed", |l| {
                l[0]["phase"] == "cancelled" && l[0]["open"] == false
            })
            .await;
        // Everything the incident will ever send was queued with its changes: no PagerDuty.
        let msgs = app
            .responder
            .store
            .messages(&IncidentId(list[0]["id"].as_str().unwrap().to_string()))
            .await
            .unwrap();
        let pd: Vec<&Value> = msgs.iter().filter(|m| m["channel"] == "pagerduty").collect();
        assert!(pd.is_empty(), "{pd:#?}");
        assert!(
            msgs.iter().any(|m| m["channel"] == "slack"),
            "the closing was told: {msgs:#?}"
        );
        assert!(received(&peers.pagerduty).await.is_empty());
        assert_eq!(
            weights(&fx.listener_actions().await)[0].1,
            75,
            "nothing was rolled back"
        );
    }
}

mod unconfigured {
    use rollback_responder::action::{kubernetes::KubeSettings, Executors};
    use rollback_responder::app::preflight::Unexecutable;
    use rollback_responder::app::Application;
    use rollback_responder::config;

    use crate::helpers::*;

    /// Builds the service on the default test policy (an ALB target) outside dry run with
    /// `executors`; the error if it refuses.
    async fn build(executors: Option<Executors>) -> Option<anyhow::Error> {
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("checkout.yaml"), CHECKOUT_POLICY).unwrap();
        let db = format!("sqlite://{}", dir.path().join("rr.db").display());
        let vars = env(&[
            ("ROLLBACK_RESPONDER__STORE__URL", &db),
            ("ROLLBACK_RESPONDER__POLICIES_DIR", policies.to_str().unwrap()),
            ("ROLLBACK_RESPONDER__SAFETY__DRY_RUN", "false"),
        ]);
        let cfg = config::load_from(None, Some("127.0.0.1:0".parse().unwrap()), vars).unwrap();
        Application::build_with(cfg, executors).await.err()
    }

    #[tokio::test]
    async fn a_policy_whose_executor_is_not_configured_refuses_start_up_outside_dry_run() {
        // No executor at all, then only the other kind: an ALB rollback could only be recorded
        // while PagerDuty and the status page were told it was under way.
        let kube_only = Executors {
            kube: Some(rollback_responder::action::kubernetes::KubeExecutor::new(
                crate::support::fake_kube::FakeKube::start().await.client(),
                &KubeSettings::default(),
            )),
            ..Default::default()
        };
        for executors in [None, Some(kube_only)] {
            let err = build(executors).await.expect("start-up is refused");
            let why = err.downcast_ref::<Unexecutable>().unwrap_or_else(|| panic!("{err:#}"));
            assert_eq!(why.0.len(), 1, "{why}");
            assert!(
                why.0[0].contains("checkout.yaml: policy \"checkout\" reverts an ALB target")
                    && why.0[0].contains("add `aws:` settings")
                    && why.0[0].contains("safety.dry_run: true"),
                "{why}"
            );
        }
        // With its executor the same set starts.
        let with_alb = Executors {
            alb: Some(alb_never_called()),
            ..Default::default()
        };
        assert!(build(Some(with_alb)).await.is_none());
    }
}

// ---------------------------------------------------------------------------------------------
// A takeover that finds the target already reverted
// ---------------------------------------------------------------------------------------------

mod takeover {
    use rollback_responder::action::Executors;
    use rollback_responder::incident::AuditKind;
    use rollback_responder::incident::{Event, IncidentId};
    use rollback_responder::store::NewEvent;
    use serde_json::{json, Value};

    use super::*;
    use crate::helpers::*;
    use crate::notify::{policy_with_notify, Peers};
    use crate::support::alb_fixture::forward;

    const DEAD: &str = "replica-dead";

    /// An incident whose action a replica (`DEAD`) started and never finished, with the
    /// listener already reverted by then; `dead_planned_a_write`: that replica had recorded the
    /// plan of its write (its intent) before it died. Returns the app (which takes the work
    /// over once the dead replica's lease is found expired) and the incident id.
    async fn orphaned_with_listener_reverted(dead_planned_a_write: bool) -> (AlbFixture, Peers, TestApp, IncidentId) {
        let fx = AlbFixture::start().await;
        let peers = Peers::start().await;
        let app = spawn_app(Options {
            policies: vec![("portal-api.yaml", policy_with_notify(&fx, "manual"))],
            env: peers.env(),
            executors: Some(Executors {
                alb: Some(fx.executor()),
                ..Default::default()
            }),
            ..Options::default()
        })
        .await;
        app.post_webhook(&payload(
            "firing",
            vec![alert("HighErrorRate", "portal-api", "tk01", &ago(60), None)],
        ))
        .await;
        let list = app
            .wait_incidents("awaiting approval", |l| {
                l.len() == 1 && l[0]["phase"] == "awaiting_approval"
            })
            .await;
        let id = IncidentId(list[0]["id"].as_str().unwrap().to_string());
        // All traffic on stable, by whoever did it.
        fx.elb
            .modify_listener()
            .listener_arn(&fx.listener_arn)
            .default_actions(forward(&[(&fx.stable_tg, 100), (&fx.canary_tg, 0)], Some(300)))
            .send()
            .await
            .expect("ModifyListener");

        // What a replica that died mid-action leaves: approved into `executing`, its lease
        // (already expired), its start mark and, maybe, its write's plan.
        let r = &app.responder;
        let now = chrono::Utc::now();
        let mut tx = r.store.begin().await.unwrap();
        let mut inc = tx.incident(&id).await.unwrap().unwrap();
        r.apply(
            &mut tx,
            &mut inc,
            Event::Approved {
                by: vec!["U0APPROVER".into()],
            },
            "U0APPROVER",
            "approved".into(),
            Value::Null,
            now,
        )
        .await
        .unwrap();
        inc.owner = Some(DEAD.into());
        inc.lease_until = Some(now - chrono::Duration::seconds(1));
        assert!(tx.take_lease(&inc).await.unwrap());
        let event = |kind, summary: &str, detail| NewEvent {
            kind,
            actor: DEAD,
            phase_from: None,
            phase_to: None,
            summary: summary.into(),
            detail,
        };
        tx.append_event(
            &id,
            now,
            event(AuditKind::ActionStarted, "rolling back", json!({"dry_run": false})),
        )
        .await
        .unwrap();
        if dead_planned_a_write {
            tx.append_event(
                &id,
                now,
                event(
                    AuditKind::ActionStep,
                    "ModifyListener planned",
                    json!({"step": "planned", "dry_run": false, "operation": "ModifyListener"}),
                ),
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        (fx, peers, app, id)
    }

    fn change_events(msgs: &[Value]) -> usize {
        msgs.iter()
            .filter(|m| m["channel"] == "pagerduty" && m["message"]["path"] == "/v2/change/enqueue")
            .count()
    }

    #[tokio::test]
    async fn a_revert_found_after_a_replica_died_before_writing_is_not_counted_as_ours() {
        let (fx, _peers, app, id) = orphaned_with_listener_reverted(false).await;
        let list = app
            .wait_incidents("taken over and settled", |l| l[0]["phase"] == "verified")
            .await;
        assert_eq!(list[0]["executed"], false, "acted_at stays empty: {}", list[0]);
        let inc = app.incident(&id.0).await;
        let done = inc["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == "action_succeeded")
            .expect("the takeover's result");
        let summary = done["summary"].as_str().unwrap();
        assert!(
            summary.starts_with(&format!(
                "found already reverted (not by this service) (the interrupted earlier attempt by {DEAD} had not \
                 begun to write): not counted as this incident's rollback; "
            )),
            "{summary}"
        );
        // Nothing written by us, and nobody is told we executed a rollback.
        assert_eq!(weights(&fx.listener_actions().await)[0].1, 100);
        let msgs = app.responder.store.messages(&id).await.unwrap();
        assert_eq!(change_events(&msgs), 0, "{msgs:#?}");
        // The thread says what was found; no channel claims a rollback of ours.
        assert!(
            msgs.iter().any(|m| m["channel"] == "slack"
                && m["message"]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("found already reverted (not by this service)"))),
            "{msgs:#?}"
        );
        for m in &msgs {
            let text = m["message"].to_string();
            for claim in [
                "Rollback executed",
                "rolled it back",
                "Executed:* yes",
                "stays rolled back",
            ] {
                assert!(!text.contains(claim), "{claim:?} in {text}");
            }
        }
        let statuspage: Vec<&Value> = msgs.iter().filter(|m| m["channel"] == "statuspage").collect();
        assert_eq!(
            statuspage[0]["message"]["body"]["incident"]["status"], "investigating",
            "{statuspage:#?}"
        );
    }

    #[tokio::test]
    async fn a_revert_found_after_a_replica_died_mid_write_is_counted_as_ours() {
        let (_fx, _peers, app, id) = orphaned_with_listener_reverted(true).await;
        let list = app
            .wait_incidents("taken over and settled", |l| l[0]["phase"] == "verified")
            .await;
        assert_eq!(list[0]["executed"], true, "{}", list[0]);
        let inc = app.incident(&id.0).await;
        let done = inc["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == "action_succeeded")
            .expect("the takeover's result");
        assert!(
            done["summary"].as_str().unwrap().starts_with(&format!(
                "found already reverted, most likely by the interrupted earlier attempt of {DEAD}, which had begun \
                 to write it: counted as this incident's rollback"
            )),
            "{done}"
        );
        let msgs = app.responder.store.messages(&id).await.unwrap();
        assert_eq!(change_events(&msgs), 1, "{msgs:#?}");
    }
}

#[tokio::test]
async fn no_write_is_sent_before_the_callers_write_gate_opens() {
    use std::sync::{Arc, Mutex};
    let fx = AlbFixture::start().await;
    let proxy = Arc::new(FaultProxy::start(&fx.moto.endpoint).await);
    let exec = AlbExecutor::new(elb_client(&proxy.url), &fast_aws_settings());
    let steps: Arc<Mutex<Vec<String>>> = Arc::default();
    let (open_tx, open_rx) = tokio::sync::watch::channel(false);
    let (at_gate_tx, mut at_gate_rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<String>, usize)>();
    let t = fx.listener_target();
    let task = {
        let (steps, proxy) = (steps.clone(), proxy.clone());
        tokio::spawn(async move {
            let log = steps.clone();
            let gate = move || -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
                // What was reported and what AWS got by the time the gate is reached.
                let _ = at_gate_tx.send((steps.lock().unwrap().clone(), proxy.forwarded("ModifyListener")));
                let mut open = open_rx.clone();
                Box::pin(async move {
                    let _ = open.wait_for(|o| *o).await;
                })
            };
            let mut on_step = move |s: AlbStep| log.lock().unwrap().push(s.describe());
            exec.revert_gated(&t, false, &mut on_step, &gate).await
        })
    };
    let (reported, writes) = at_gate_rx.recv().await.expect("the gate is reached");
    assert!(
        reported
            .last()
            .is_some_and(|s| s.starts_with("ModifyListener planned: 100% to stable")),
        "the write's plan is reported before the gate: {reported:#?}"
    );
    assert_eq!(writes, 0, "nothing written before the gate opens");
    open_tx.send(true).unwrap();
    let result = task.await.expect("task");
    assert!(matches!(result, Ok(AlbOutcome::Reverted { .. })), "{result:?}");
    assert_eq!(proxy.forwarded("ModifyListener"), 1);
}

mod recreate {
    use std::sync::{Arc, Mutex};

    use rollback_responder::action::Executors;
    use serde_json::{json, Value};
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

    use super::*;
    use crate::helpers::*;
    use crate::notify::{policy_with_notify, received, wait_requests};

    /// Statuspage's create: takes the incident, but answers too late for the caller.
    struct SlowCreate(Arc<Mutex<Vec<Value>>>);

    impl Respond for SlowCreate {
        fn respond(&self, r: &Request) -> ResponseTemplate {
            self.0
                .lock()
                .unwrap()
                .push(serde_json::from_slice(&r.body).unwrap_or(Value::Null));
            ResponseTemplate::new(201)
                .set_body_json(json!({"id": "sp-inc-1"}))
                .set_delay(Duration::from_secs(3))
        }
    }

    /// Statuspage's unresolved incidents: the ones created so far.
    struct Unresolved(Arc<Mutex<Vec<Value>>>);

    impl Respond for Unresolved {
        fn respond(&self, _: &Request) -> ResponseTemplate {
            let list: Vec<Value> = self
                .0
                .lock()
                .unwrap()
                .iter()
                .map(
                    |b| json!({"id": "sp-inc-1", "name": b["incident"]["name"], "metadata": b["incident"]["metadata"]}),
                )
                .collect();
            ResponseTemplate::new(200).set_body_json(list)
        }
    }

    #[tokio::test]
    async fn a_status_page_create_that_timed_out_is_found_not_sent_again() {
        let fx = AlbFixture::start().await;
        let created = Arc::new(Mutex::new(Vec::new()));
        let sp = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/pages/PAGE1/incidents"))
            .respond_with(SlowCreate(created.clone()))
            .mount(&sp)
            .await;
        Mock::given(method("GET"))
            .and(path("/pages/PAGE1/incidents/unresolved"))
            .respond_with(Unresolved(created.clone()))
            .mount(&sp)
            .await;
        Mock::given(method("PATCH"))
            .and(path("/pages/PAGE1/incidents/sp-inc-1"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "sp-inc-1"})))
            .mount(&sp)
            .await;
        let app = spawn_app(Options {
            policies: vec![("portal-api.yaml", policy_with_notify(&fx, "auto"))],
            env: env(&[
                ("ROLLBACK_RESPONDER__STATUSPAGE__API_URL", &sp.uri()),
                ("ROLLBACK_RESPONDER__STATUSPAGE__API_KEY", "sp-api-key"),
                ("ROLLBACK_RESPONDER__STATUSPAGE__PAGE_ID", "PAGE1"),
                ("ROLLBACK_RESPONDER__NOTIFICATIONS__TIMEOUT", "1s"),
                ("ROLLBACK_RESPONDER__NOTIFICATIONS__INITIAL_BACKOFF", "50ms"),
                ("ROLLBACK_RESPONDER__NOTIFICATIONS__MAX_BACKOFF", "300ms"),
            ]),
            executors: Some(Executors {
                alb: Some(fx.executor()),
                ..Default::default()
            }),
            ..Options::default()
        })
        .await;
        app.post_webhook(&payload(
            "firing",
            vec![alert("HighErrorRate", "portal-api", "rc01", &ago(60), None)],
        ))
        .await;
        let list = app
            .wait_incidents("verified", |l| l.len() == 1 && l[0]["phase"] == "verified")
            .await;
        let id = list[0]["id"].as_str().unwrap().to_string();
        // create (timed out), look-up, then the verified update on the incident it found.
        let reqs = wait_requests(&sp, 3, "statuspage").await;
        let seen: Vec<(String, String)> = reqs.iter().map(|(m, p, _, _)| (m.clone(), p.clone())).collect();
        assert_eq!(
            seen,
            vec![
                ("POST".to_string(), "/pages/PAGE1/incidents".to_string()),
                ("GET".to_string(), "/pages/PAGE1/incidents/unresolved".to_string()),
                ("PATCH".to_string(), "/pages/PAGE1/incidents/sp-inc-1".to_string()),
            ]
        );
        assert_eq!(
            reqs[0].2["incident"]["metadata"],
            json!({"rollback_responder": {"incident_id": id}})
        );
        assert_eq!(reqs[2].2["incident"]["status"], "monitoring");
        assert_eq!(created.lock().unwrap().len(), 1, "one public incident");
        // The last PATCH has been answered, but its delivery is recorded just after.
        app.wait_outbox_drained().await;
        let msgs = app
            .responder
            .store
            .messages(&rollback_responder::incident::IncidentId(id))
            .await
            .unwrap();
        let sp_msgs: Vec<&Value> = msgs.iter().filter(|m| m["channel"] == "statuspage").collect();
        assert!(sp_msgs.iter().all(|m| m["state"] == "delivered"), "{sp_msgs:#?}");
        assert_eq!(received(&sp).await.len(), 3);
    }
}

mod repost {
    use std::sync::{Arc, Mutex};

    use rollback_responder::action::Executors;
    use serde_json::{json, Value};
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

    use super::*;
    use crate::helpers::*;
    use crate::notify::{policy_with_notify, received, SLACK_TOKEN};

    const TS: &str = "1763790000.000100";

    /// chat.postMessage: the incident's first post is taken but answered too late for the
    /// caller; thread replies are answered at once.
    struct SlowFirstPost(Arc<Mutex<Vec<Value>>>);

    impl Respond for SlowFirstPost {
        fn respond(&self, r: &Request) -> ResponseTemplate {
            let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            let ok = ResponseTemplate::new(200).set_body_json(json!({"ok": true, "channel": "C0ALERTS", "ts": TS}));
            if body.get("thread_ts").is_some() {
                return ok;
            }
            self.0.lock().unwrap().push(body);
            ok.set_delay(Duration::from_secs(3))
        }
    }

    /// conversations.history: the incident posts made so far, with their metadata.
    struct History(Arc<Mutex<Vec<Value>>>);

    impl Respond for History {
        fn respond(&self, _: &Request) -> ResponseTemplate {
            let messages: Vec<Value> = self
                .0
                .lock()
                .unwrap()
                .iter()
                .map(|b| json!({"type": "message", "ts": TS, "text": b["text"], "metadata": b["metadata"]}))
                .collect();
            ResponseTemplate::new(200).set_body_json(json!({"ok": true, "messages": messages}))
        }
    }

    #[tokio::test]
    async fn a_slack_post_that_timed_out_is_found_not_posted_again() {
        let fx = AlbFixture::start().await;
        let posts = Arc::new(Mutex::new(Vec::new()));
        let slack = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/chat.postMessage"))
            .respond_with(SlowFirstPost(posts.clone()))
            .mount(&slack)
            .await;
        Mock::given(method("POST"))
            .and(path("/chat.update"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"ok": true})))
            .mount(&slack)
            .await;
        Mock::given(method("GET"))
            .and(path("/conversations.list"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "ok": true,
                "channels": [{"id": "C0OTHER", "name": "general"}, {"id": "C0ALERTS", "name": "portal-alerts"}],
                "response_metadata": {"next_cursor": ""},
            })))
            .mount(&slack)
            .await;
        Mock::given(method("GET"))
            .and(path("/conversations.history"))
            .respond_with(History(posts.clone()))
            .mount(&slack)
            .await;
        let app = spawn_app(Options {
            policies: vec![("portal-api.yaml", policy_with_notify(&fx, "auto"))],
            env: env(&[
                ("ROLLBACK_RESPONDER__SLACK__API_URL", &slack.uri()),
                ("ROLLBACK_RESPONDER__SLACK__BOT_TOKEN", SLACK_TOKEN),
                ("ROLLBACK_RESPONDER__NOTIFICATIONS__TIMEOUT", "1s"),
                ("ROLLBACK_RESPONDER__NOTIFICATIONS__INITIAL_BACKOFF", "50ms"),
                ("ROLLBACK_RESPONDER__NOTIFICATIONS__MAX_BACKOFF", "300ms"),
            ]),
            executors: Some(Executors {
                alb: Some(fx.executor()),
                ..Default::default()
            }),
            ..Options::default()
        })
        .await;
        app.post_webhook(&payload(
            "firing",
            vec![alert("HighErrorRate", "portal-api", "rp01", &ago(60), None)],
        ))
        .await;
        let list = app
            .wait_incidents("verified", |l| l.len() == 1 && l[0]["phase"] == "verified")
            .await;
        let id = list[0]["id"].as_str().unwrap().to_string();
        // Wait until every Slack message of the incident so far is delivered.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let msgs = app
                .responder
                .store
                .messages(&rollback_responder::incident::IncidentId(id.clone()))
                .await
                .unwrap();
            if msgs
                .iter()
                .filter(|m| m["channel"] == "slack")
                .all(|m| m["state"] == "delivered")
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{msgs:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let reqs = received(&slack).await;
        let roots: Vec<&Value> = reqs
            .iter()
            .filter(|(m, p, b, _)| m == "POST" && p == "/chat.postMessage" && b.get("thread_ts").is_none())
            .map(|r| &r.2)
            .collect();
        assert_eq!(roots.len(), 1, "one incident message: {roots:#?}");
        assert_eq!(
            roots[0]["metadata"],
            json!({"event_type": "rollback_responder_incident", "event_payload": {"incident_id": id}})
        );
        let gets: Vec<String> = reqs
            .iter()
            .filter(|(m, ..)| m == "GET")
            .map(|(_, p, _, r)| format!("{p}?{}", r.url.query().unwrap_or("")))
            .collect();
        assert_eq!(gets.len(), 2, "{gets:#?}");
        assert!(gets[0].starts_with("/conversations.list?"), "{gets:#?}");
        assert_eq!(
            gets[1],
            "/conversations.history?channel=C0ALERTS&limit=200&include_all_metadata=true"
        );
        // Everything after it went to the thread of the message found.
        let replies: Vec<&Value> = reqs
            .iter()
            .filter(|(m, p, b, _)| m == "POST" && p == "/chat.postMessage" && b.get("thread_ts").is_some())
            .map(|r| &r.2)
            .collect();
        assert!(!replies.is_empty());
        for r in replies {
            assert_eq!(
                (r["channel"].as_str(), r["thread_ts"].as_str()),
                (Some("C0ALERTS"), Some(TS)),
                "{r}"
            );
        }
    }
}

mod gradual {
    use rollback_responder::action::Executors;
    use serde_json::Value;

    use super::*;
    use crate::helpers::*;

    #[tokio::test]
    async fn each_step_of_a_gradual_shift_is_in_the_timeline_when_it_happens() {
        let fx = AlbFixture::start().await;
        let policy = format!(
            r#"
name: portal-api
service: portal-api
matchers: ['service="portal-api"']
target:
  alb:
    listener_arn: {listener}
    stable_target_group_arn: {stable}
    gradual: {{steps: [90, 100], interval: 1s}}
triggers:
  - name: errors
    matchers: ['alertname="HighErrorRate"']
    mode: auto
verification:
  bake: 1s
  interval: 200ms
"#,
            listener = fx.listener_arn,
            stable = fx.stable_tg
        );
        let app = spawn_app(Options {
            policies: vec![("portal-api.yaml", policy)],
            executors: Some(Executors {
                alb: Some(fx.executor()),
                ..Default::default()
            }),
            ..Options::default()
        })
        .await;
        app.post_webhook(&payload(
            "firing",
            vec![alert("HighErrorRate", "portal-api", "gr01", &ago(60), None)],
        ))
        .await;
        // The first step is on record while the action is still running.
        let list = app
            .wait_incidents("executing", |l| l.len() == 1 && l[0]["phase"] == "executing")
            .await;
        let id = list[0]["id"].as_str().unwrap().to_string();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let first = loop {
            let inc = app.incident(&id).await;
            let wrote: Vec<Value> = inc["timeline"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["kind"] == "action_step" && e["detail"]["step"] == "wrote")
                .cloned()
                .collect();
            if let Some(w) = wrote.first() {
                assert_eq!(w["summary"], "ModifyListener written: 90% to stable (attempt 1)");
                break (w.clone(), inc["phase"].clone());
            }
            assert!(std::time::Instant::now() < deadline, "{inc:#}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(first.1, "executing", "recorded before the action ended");
        let list = app.wait_incidents("verified", |l| l[0]["phase"] == "verified").await;
        assert_eq!(list[0]["executed"], true);
        let inc = app.incident(&id).await;
        let timeline = inc["timeline"].as_array().unwrap();
        let wrote: Vec<&Value> = timeline
            .iter()
            .filter(|e| e["kind"] == "action_step" && e["detail"]["step"] == "wrote")
            .collect();
        assert_eq!(
            wrote.iter().map(|e| e["summary"].as_str().unwrap()).collect::<Vec<_>>(),
            vec![
                "ModifyListener written: 90% to stable (attempt 1)",
                "ModifyListener written: 100% to stable (attempt 1)"
            ]
        );
        // Each carries its own time: the second came a wait later than the first.
        let at = |e: &Value| chrono::DateTime::parse_from_rfc3339(e["at"].as_str().unwrap()).unwrap();
        assert!(at(wrote[1]) > at(wrote[0]), "{wrote:#?}");
        // And the incident's acted_at is when traffic first moved.
        assert_eq!(inc["acted_at"], wrote[0]["at"]);
        assert_eq!(
            weights(&fx.listener_actions().await),
            vec![(fx.stable_tg.clone(), 100), (fx.canary_tg.clone(), 0)]
        );
    }
}

#[tokio::test]
async fn a_message_claimed_from_a_sender_that_died_mid_request_is_marked_as_sent_before() {
    let dir = tempfile::tempdir().unwrap();
    let db = crate::helpers::TestDb::new(dir.path()).await;
    let store = rollback_responder::store::Store::connect(&db.url, 2)
        .await
        .expect("store");
    let inc = rollback_responder::incident::IncidentId("inc-crash".into());
    let t0 = chrono::Utc::now();
    let mut tx = store.begin().await.unwrap();
    tx.enqueue(&inc, "statuspage", "{}", t0).await.unwrap();
    tx.commit().await.unwrap();
    let id = store.messages(&inc).await.unwrap()[0]["id"].as_i64().unwrap();
    let lease = Duration::from_secs(1);
    let first = store
        .claim_message(id, "replica-a", t0, lease)
        .await
        .unwrap()
        .expect("claimed");
    assert!(!first.taken_over && first.attempts == 0);
    // replica-a dies mid-request; once its lease has run out, replica-b takes the message.
    let later = t0 + chrono::Duration::seconds(5);
    let second = store
        .claim_message(id, "replica-b", later, lease)
        .await
        .unwrap()
        .expect("claimed");
    assert!(second.taken_over, "the new sender knows the message may have been sent");
    assert_eq!(second.attempts, 0);
}
