//! Check steps of a Kubernetes target (seed 000's `curl -f` between the selector switch and
//! the scale-down) against the fake API server and a health endpoint on loopback that notes,
//! at each request, what the fake cluster looked like: so "the check ran after the switch and
//! before the scale-down" is observed, not inferred from the executor's own records.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::http::StatusCode;
use rollback_responder::action::kubernetes::{
    CheckVerdict, ExpectStatus, HttpCheck, KubeCheck, KubeError, KubeExecutor, KubeOutcome, KubeSettings, KubeStep,
    KubeStepRecord, KubernetesTarget, StepResult,
};

use crate::support::fake_kube::{pod, service, FakeKube};

const NS: &str = "portal";

/// What the cluster looked like when the health endpoint was asked.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    /// The Service's `version` selector key.
    selector_version: Option<String>,
    /// The canary Deployment's spec.replicas.
    canary_replicas: Option<i64>,
}

/// What someone does to the cluster while the check waits, at each probe.
type DuringCheck = Box<dyn FnMut(&FakeKube) + Send>;

#[derive(Default)]
struct HealthState {
    /// Answers in order, then `steady` for ever.
    script: Vec<u16>,
    steady: u16,
    seen: Vec<Seen>,
    during: Option<DuringCheck>,
}

/// `/health` answering the scripted statuses; `/hang` never answering in time.
struct Health {
    addr: SocketAddr,
    state: Arc<Mutex<HealthState>>,
}

impl Health {
    /// Weak: the fake must drop at the end of the test (its RBAC check runs then).
    async fn start(fake: &Arc<FakeKube>, script: &[u16], steady: u16) -> Health {
        Self::start_with(fake, script, steady, None).await
    }

    /// `during` runs at every probe, after the cluster is noted: a change made while the
    /// check waits.
    async fn start_with(fake: &Arc<FakeKube>, script: &[u16], steady: u16, during: Option<DuringCheck>) -> Health {
        let state = Arc::new(Mutex::new(HealthState {
            script: script.to_vec(),
            steady,
            seen: Vec::new(),
            during,
        }));
        let (s, weak): (_, Weak<FakeKube>) = (state.clone(), Arc::downgrade(fake));
        let app = axum::Router::new()
            .route(
                "/health",
                axum::routing::get(move || {
                    let (s, weak) = (s.clone(), weak.clone());
                    async move {
                        let seen = weak.upgrade().map(|f| Seen {
                            selector_version: f
                                .get("services", NS, "portal-api-prod")
                                .and_then(|v| v["spec"]["selector"]["version"].as_str().map(String::from)),
                            canary_replicas: f
                                .get("deployments", NS, "portal-api-canary")
                                .and_then(|d| d["spec"]["replicas"].as_i64()),
                        });
                        let mut st = s.lock().unwrap();
                        let n = st.seen.len();
                        st.seen.push(seen.unwrap_or(Seen {
                            selector_version: None,
                            canary_replicas: None,
                        }));
                        let code = st.script.get(n).copied().unwrap_or(st.steady);
                        if let (Some(during), Some(f)) = (st.during.as_mut(), weak.upgrade()) {
                            during(&f);
                        }
                        StatusCode::from_u16(code).unwrap()
                    }
                }),
            )
            .route(
                "/hang",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    StatusCode::OK
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Health { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}/health", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

/// Seed 000's world (`faults_actions::kube_world`): portal-api-prod on the canary (v1.0.0),
/// two Ready stable pods, the canary Deployment at 3 replicas.
async fn world() -> Arc<FakeKube> {
    let fake = Arc::new(FakeKube::start().await);
    crate::faults_actions::kube_world(&fake);
    fake
}

fn switch() -> KubeStep {
    let selector: BTreeMap<String, String> = [("app", "portal-api"), ("version", "v1.0.0-rc.0")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    KubeStep::SwitchService {
        service: "portal-api-prod".into(),
        selector,
    }
}

fn scale() -> KubeStep {
    KubeStep::Scale {
        deployment: "portal-api-canary".into(),
        replicas: 0,
    }
}

fn check(url: &str, successes: u32, interval_ms: u64, timeout_ms: u64) -> KubeStep {
    KubeStep::Check(KubeCheck::Http(HttpCheck {
        url: url.into(),
        expect_status: ExpectStatus::Class(2),
        successes,
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(timeout_ms),
    }))
}

/// The seed's order: switch, check, scale down.
fn seed(check: KubeStep) -> KubernetesTarget {
    KubernetesTarget {
        namespace: NS.into(),
        steps: vec![switch(), check, scale()],
        min_ready_replicas: 2,
        rollout_timeout: Duration::from_secs(5),
        gitops: None,
    }
}

async fn run(
    fake: &FakeKube,
    t: &KubernetesTarget,
    dry_run: bool,
) -> (Result<KubeOutcome, KubeError>, Vec<KubeStepRecord>) {
    let exec = KubeExecutor::new(fake.client(), &KubeSettings::default());
    let mut records = Vec::new();
    let result = exec.revert(t, dry_run, &mut |r| records.push(r)).await;
    (result, records)
}

fn scale_patches(fake: &FakeKube) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/deployments/portal-api-canary/scale"))
        .count()
}

fn canary_replicas(fake: &FakeKube) -> i64 {
    fake.get("deployments", NS, "portal-api-canary").unwrap()["spec"]["replicas"]
        .as_i64()
        .unwrap()
}

#[tokio::test]
async fn a_passing_check_runs_after_the_switch_and_before_the_scale_down() {
    let fake = world().await;
    let health = Health::start(&fake, &[], 200).await;
    let (result, records) = run(&fake, &seed(check(&health.url(), 3, 50, 5_000)), false).await;
    let outcome = result.expect("revert");
    assert!(outcome.changed);
    assert!(matches!(&outcome.steps[1].result, StepResult::Checked { probes: 3, last, .. } if last == "HTTP 200"));
    assert!(matches!(outcome.steps[2].result, StepResult::Changed { .. }));
    // Every probe saw the selector already switched and the canary still serving.
    let switched_not_scaled = Seen {
        selector_version: Some("v1.0.0-rc.0".into()),
        canary_replicas: Some(3),
    };
    assert_eq!(health.seen(), vec![switched_not_scaled; 3]);
    assert_eq!(canary_replicas(&fake), 0);
    assert_eq!(fake.writes(), 2);
    let passed = records
        .iter()
        .find(|r| matches!(r, KubeStepRecord::Checked { .. }))
        .expect("verdict");
    assert!(matches!(
        passed,
        KubeStepRecord::Checked {
            index: 1,
            verdict: CheckVerdict::Passed,
            probes: 3,
            ..
        }
    ));
    let line = passed.describe();
    assert!(
        line.starts_with(&format!(
            "check steps[1] passed, the next step runs: GET {} answers 2xx 3 time(s) in a row (every 50ms, within 5s) (3 probe(s) in ",
            health.url()
        )),
        "{line}"
    );
    // The Slack thread hears the verdict (a notable step), not each probe.
    let step: rollback_responder::action::Step = passed.clone().into();
    assert!(step.notable && !step.applied);
}

#[tokio::test]
async fn a_failing_check_stops_before_the_scale_down_and_names_itself() {
    let fake = world().await;
    let health = Health::start(&fake, &[], 503).await;
    let (result, records) = run(&fake, &seed(check(&health.url(), 2, 100, 1_000)), false).await;
    let err = result.expect_err("the check fails");
    match &err {
        KubeError::CheckFailed {
            index: 1, last, probes, ..
        } => {
            assert_eq!(last, "HTTP 503");
            assert!((5..=11).contains(probes), "{probes} probes in 1s at 100ms");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.code(), "check_failed");
    assert!(!err.is_retryable() && !err.is_precheck());
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "check steps[1] failed: GET {} answers 2xx 2 time(s) in a row (every 100ms, within 1s): not passed after",
            health.url()
        )) && msg.ends_with("last answer HTTP 503; the steps after it were not run"),
        "{msg}"
    );
    // The switch took; the scale-down was never sent.
    assert_eq!(scale_patches(&fake), 0);
    assert_eq!(canary_replicas(&fake), 3);
    assert_eq!(fake.writes(), 1);
    assert!(!records
        .iter()
        .any(|r| matches!(r, KubeStepRecord::Planned { index: 2, .. })));
    assert!(records.iter().any(|r| matches!(
        r,
        KubeStepRecord::Checked {
            verdict: CheckVerdict::Failed,
            ..
        }
    )));
    // One probe record for the first 503: the same answer again is not recorded again.
    let probes: Vec<&KubeStepRecord> = records
        .iter()
        .filter(|r| matches!(r, KubeStepRecord::CheckProbe { .. }))
        .collect();
    assert_eq!(probes.len(), 1, "{probes:?}");
    assert_eq!(
        probes[0].describe(),
        "check steps[1] probe 1: HTTP 503: not accepted, 2 in a row needed"
    );
}

#[tokio::test]
async fn a_check_that_recovers_after_two_failures_passes_and_the_scale_down_follows() {
    let fake = world().await;
    let health = Health::start(&fake, &[503, 503], 200).await;
    let (result, records) = run(&fake, &seed(check(&health.url(), 2, 50, 5_000)), false).await;
    let outcome = result.expect("revert");
    assert!(matches!(outcome.steps[1].result, StepResult::Checked { probes: 4, .. }));
    assert_eq!(health.seen().len(), 4);
    assert_eq!(canary_replicas(&fake), 0);
    let probes: Vec<String> = records
        .iter()
        .filter(|r| matches!(r, KubeStepRecord::CheckProbe { .. }))
        .map(KubeStepRecord::describe)
        .collect();
    assert_eq!(
        probes,
        [
            "check steps[1] probe 1: HTTP 503: not accepted, 2 in a row needed",
            "check steps[1] probe 3: HTTP 200: accepted, 1 of 2 in a row",
        ]
    );
}

#[tokio::test]
async fn a_failure_between_successes_resets_the_count() {
    let fake = world().await;
    // 200, 503, 200, 200: the first success does not count towards the two in a row.
    let health = Health::start(&fake, &[200, 503], 200).await;
    let (result, _) = run(&fake, &seed(check(&health.url(), 2, 50, 5_000)), false).await;
    assert!(matches!(
        result.expect("revert").steps[1].result,
        StepResult::Checked { probes: 4, .. }
    ));
}

#[tokio::test]
async fn a_hanging_or_unreachable_endpoint_fails_the_check_saying_why() {
    let fake = world().await;
    let health = Health::start(&fake, &[], 200).await;
    let hang = format!("http://{}/hang", health.addr);
    let (result, _) = run(&fake, &seed(check(&hang, 1, 200, 1_000)), false).await;
    match result.expect_err("no answer") {
        KubeError::CheckFailed { last, .. } => assert!(last.starts_with("no answer within "), "{last}"),
        other => panic!("{other:?}"),
    }
    // A closed port: the connection is refused, and the cause is said.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (result, _) = run(
        &fake,
        &seed(check(&format!("http://{closed}/health"), 1, 200, 1_000)),
        false,
    )
    .await;
    match result.expect_err("refused") {
        KubeError::CheckFailed { last, .. } => {
            assert!(last.starts_with("request failed: "), "{last}");
            assert!(
                !last.contains(&closed.to_string()),
                "the URL is named once, in the check: {last}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(scale_patches(&fake), 0);
}

#[tokio::test]
async fn a_dry_run_describes_the_check_and_sends_nothing() {
    let fake = world().await;
    let health = Health::start(&fake, &[], 200).await;
    let (result, records) = run(&fake, &seed(check(&health.url(), 3, 50, 5_000)), true).await;
    let outcome = result.expect("dry run");
    assert!(outcome.dry_run && !outcome.changed);
    assert!(matches!(&outcome.steps[1].result, StepResult::CheckNotRun { check } if check.starts_with("GET http://")));
    assert!(matches!(outcome.steps[2].result, StepResult::DryRun { .. }));
    assert!(health.seen().is_empty(), "the health endpoint was asked in a dry run");
    assert_eq!(fake.writes(), 0);
    let verdict = records
        .iter()
        .find(|r| matches!(r, KubeStepRecord::Checked { .. }))
        .expect("described");
    assert!(
        verdict
            .describe()
            .starts_with("dry run: check steps[1] not run (the steps before it were not written): would GET http://"),
        "{}",
        verdict.describe()
    );
    let step: rollback_responder::action::Step = verdict.clone().into();
    assert!(!step.notable && !step.applied);
}

/// A takeover after a crash between the switch and the check runs the check again (it writes
/// nothing), then the scale-down; a third run finds everything done and still checks.
#[tokio::test]
async fn a_rerun_runs_the_check_again_and_writes_only_what_is_left() {
    let fake = world().await;
    let health = Health::start(&fake, &[], 200).await;
    let t = seed(check(&health.url(), 2, 50, 5_000));
    let only_switch = KubernetesTarget {
        steps: vec![switch()],
        ..t.clone()
    };
    run(&fake, &only_switch, false)
        .await
        .0
        .expect("the first attempt's switch");
    assert_eq!(fake.writes(), 1);

    let (second, _) = run(&fake, &t, false).await;
    let second = second.expect("takeover");
    assert!(matches!(second.steps[0].result, StepResult::AlreadyDone { .. }));
    assert!(matches!(second.steps[1].result, StepResult::Checked { probes: 2, .. }));
    assert!(matches!(second.steps[2].result, StepResult::Changed { .. }));
    assert_eq!(fake.writes(), 2);
    assert_eq!(health.seen().len(), 2);

    let (third, _) = run(&fake, &t, false).await;
    let third = third.expect("third run");
    assert!(!third.changed);
    assert_eq!(health.seen().len(), 4, "the check ran again");
    assert_eq!(fake.writes(), 2, "nothing more written");
}

/// A check first verifies before anything is written: failing, it writes nothing at all.
#[tokio::test]
async fn a_failing_first_check_writes_nothing() {
    let fake = world().await;
    let health = Health::start(&fake, &[], 500).await;
    let t = KubernetesTarget {
        steps: vec![check(&health.url(), 1, 100, 1_000), switch(), scale()],
        ..seed(scale())
    };
    let (result, _) = run(&fake, &t, false).await;
    assert!(matches!(result, Err(KubeError::CheckFailed { index: 0, .. })));
    assert_eq!(fake.writes(), 0);
    assert!(health
        .seen()
        .iter()
        .all(|s| s.selector_version.as_deref() == Some("v1.0.0")));
}

// ---------------------------------------------------------------------------------------------
// What changed while the check waited
// ---------------------------------------------------------------------------------------------

/// The canary was already at 0 when the revert began (found done), and something (an HPA, a
/// person) scaled it back up while the check waited: the scale-down is read again after the
/// check and written, not reported done from the stale first read.
#[tokio::test]
async fn a_step_found_done_before_the_check_is_read_again_after_it() {
    let fake = world().await;
    fake.modify("deployments", NS, "portal-api-canary", |d| {
        d["spec"]["replicas"] = 0.into()
    });
    let during: DuringCheck = Box::new(|f: &FakeKube| {
        f.modify("deployments", NS, "portal-api-canary", |d| {
            d["spec"]["replicas"] = 3.into()
        })
    });
    let health = Health::start_with(&fake, &[], 200, Some(during)).await;
    let (result, records) = run(&fake, &seed(check(&health.url(), 2, 50, 5_000)), false).await;
    let outcome = result.expect("revert");
    assert!(
        matches!(outcome.steps[2].result, StepResult::Changed { .. }),
        "{:?}",
        outcome.steps[2]
    );
    assert_eq!(canary_replicas(&fake), 0, "scaled down after the check");
    assert_eq!(scale_patches(&fake), 1);
    // Found done at the start, then read again after the verdict, planned and written.
    let pos = |f: &dyn Fn(&KubeStepRecord) -> bool| records.iter().position(f);
    let verdict = pos(&|r| matches!(r, KubeStepRecord::Checked { .. })).expect("verdict");
    let done = pos(&|r| matches!(r, KubeStepRecord::AlreadyDone { index: 2, .. })).expect("found done first");
    let reread = records
        .iter()
        .skip(verdict)
        .position(|r| matches!(r, KubeStepRecord::Read { index: 2, .. }))
        .expect("read again after the check");
    assert!(done < verdict);
    let line = records[verdict + reread].describe();
    assert_eq!(line, "read: deployment/portal-api-canary has 3 replica(s)");
    assert!(records
        .iter()
        .skip(verdict)
        .any(|r| matches!(r, KubeStepRecord::Patched { index: 2, .. })));
}

/// A second Service switched after the check (seed 000's copied selector, without `app`) is
/// pre-checked again after the wait: another app's pod that appeared under the new selector
/// meanwhile refuses that switch, naming the pod, after the first switch took (a partial
/// rollback, never "nothing was changed").
#[tokio::test]
async fn pods_that_appear_during_the_check_are_pre_checked_before_the_next_switch() {
    let fake = world().await;
    fake.insert(
        "services",
        service(
            NS,
            "portal-api-internal",
            &[("app", "portal-api"), ("version", "v1.0.0")],
        ),
    );
    let during: DuringCheck = Box::new(|f: &FakeKube| {
        if f.get("pods", NS, "billing-0").is_none() {
            f.insert(
                "pods",
                pod(NS, "billing-0", &[("app", "billing"), ("version", "v1.0.0-rc.0")], true),
            );
        }
    });
    let health = Health::start_with(&fake, &[], 200, Some(during)).await;
    let copied = KubeStep::SwitchService {
        service: "portal-api-internal".into(),
        selector: [("version".to_string(), "v1.0.0-rc.0".to_string())].into(),
    };
    let t = KubernetesTarget {
        steps: vec![switch(), check(&health.url(), 1, 50, 5_000), copied],
        ..seed(scale())
    };
    let (result, records) = run(&fake, &t, false).await;
    let err = result.expect_err("foreign pods after the wait");
    assert_eq!(err.code(), "foreign_pods");
    let msg = err.to_string();
    assert!(msg.contains("billing-0 (app=billing)"), "{msg}");
    assert!(!msg.contains("nothing was changed"), "{msg}");
    // The first switch took; the second was not written.
    assert_eq!(fake.writes(), 1);
    let internal = fake.get("services", NS, "portal-api-internal").unwrap();
    assert_eq!(internal["spec"]["selector"]["version"], "v1.0.0");
    let prechecks: Vec<String> = records
        .iter()
        .filter(|r| matches!(r, KubeStepRecord::PreCheck { index: 2, .. }))
        .map(KubeStepRecord::describe)
        .collect();
    assert_eq!(prechecks.len(), 2, "at the start and after the check: {prechecks:#?}");
    assert!(prechecks[0].ends_with(": passed"), "{}", prechecks[0]);
    assert!(prechecks[1].contains("FAILED, not switched"), "{}", prechecks[1]);
    let applied: Vec<rollback_responder::action::Step> = records
        .iter()
        .cloned()
        .map(Into::into)
        .filter(|s: &rollback_responder::action::Step| s.applied)
        .collect();
    assert_eq!(applied.len(), 1, "the first switch is what took");
}
