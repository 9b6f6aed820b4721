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

mod service;

// ---------------------------------------------------------------------------------------------
// Messages follow what happened
// ---------------------------------------------------------------------------------------------

mod messages;

mod unconfigured;

// ---------------------------------------------------------------------------------------------
// A takeover that finds the target already reverted
// ---------------------------------------------------------------------------------------------

mod takeover;

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

mod recreate;

mod repost;

mod gradual;

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
