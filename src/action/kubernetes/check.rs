//! The checks around a revert's writes: the pre-check before any write (are the pods about to
//! take the traffic Ready, and all of this app?), and the check steps between writes
//! ([`KubeStep::Check`](super::KubeStep::Check): seed 000's `curl -f` between the selector
//! switch and the scale-down), which must pass before the next step runs.
//!
//! A check step writes nothing, so a re-run after a takeover simply runs it again. In a dry
//! run it is described, not run: the steps before it were not written, so what it would see
//! says nothing about the rollback. A failure ends the revert with
//! [`KubeError::CheckFailed`]; the steps after it are never sent.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tokio::time::Instant;

use super::error::Op;
use super::executor::OnStep;
use super::plan::{clamp_u32, PreCheckNeed};
use super::views::{equality_selector, foreign_pods, pod_is_ready};
use super::{CheckVerdict, KubeError, KubeExecutor, KubeStepRecord, StepResult};
use crate::policy::target::kube_check::{HttpCheck, KubeCheck, MAX_REQUEST_TIMEOUT};

/// Shortest time one request of a check may take (short intervals still get a fair answer).
const MIN_REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

/// How long one request of `h` may take: its interval within [0.5 s, 10 s], and never past
/// the deadline.
fn request_timeout(h: &HttpCheck, remaining: Duration) -> Duration {
    h.interval
        .clamp(MIN_REQUEST_TIMEOUT, MAX_REQUEST_TIMEOUT)
        .min(remaining)
        .max(Duration::from_millis(1))
}

/// A request error in one line with its cause (reqwest's own text hides it), without the URL
/// (the record names it already).
fn request_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}

impl KubeExecutor {
    /// The pre-check of a step about to be written (see [`KubeExecutor::revert`]): Ready
    /// pods behind a Service's new selector, none of another app; a restored ReplicaSet's
    /// readiness, recorded only.
    pub(super) async fn precheck(
        &self,
        ns: &str,
        index: usize,
        need: &PreCheckNeed,
        required: u32,
        on_step: OnStep<'_>,
    ) -> Result<(), KubeError> {
        match need {
            PreCheckNeed::None => Ok(()),
            PreCheckNeed::Pods {
                service,
                selector,
                current,
            } => {
                let sel = equality_selector(selector);
                let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
                let lp = ListParams::default().labels(&sel);
                let op = Op {
                    verb: "list",
                    kind: "Pod",
                    api_group: "",
                    resource: "pods",
                    namespace: ns,
                    name: "",
                };
                let pods = self.call(op, on_step, || api.list(&lp)).await?;
                let matching = u32::try_from(pods.items.len()).unwrap_or(u32::MAX);
                let ready = u32::try_from(pods.items.iter().filter(|p| pod_is_ready(p)).count()).unwrap_or(u32::MAX);
                let foreign = foreign_pods(&pods.items, current, selector);
                let passed = ready >= required && foreign.is_empty();
                on_step(KubeStepRecord::PreCheck {
                    index,
                    object: format!("service/{service}"),
                    selector: sel.clone(),
                    matching,
                    ready,
                    required,
                    passed,
                    note: (!foreign.is_empty()).then(|| {
                        format!(
                            "{} of them belong to another app (neither selected now nor labelled like {}): {}",
                            foreign.len(),
                            equality_selector(current),
                            foreign.join(", ")
                        )
                    }),
                });
                if passed {
                    Ok(())
                } else if !foreign.is_empty() {
                    Err(KubeError::ForeignPods {
                        service: service.clone(),
                        namespace: ns.to_string(),
                        selector: sel,
                        current: equality_selector(current),
                        pods: foreign,
                    })
                } else {
                    Err(KubeError::PreCheckFailed {
                        service: service.clone(),
                        namespace: ns.to_string(),
                        selector: sel,
                        matching,
                        ready,
                        required,
                    })
                }
            }
            PreCheckNeed::ReplicaSet {
                name,
                revision,
                replicas,
                ready,
            } => {
                // Decided: recorded, never blocking. After a completed rollout the ReplicaSet
                // to restore is normally at 0 replicas, so demanding ready pods would refuse
                // every ordinary undo. The controller scales it up within the rolling-update
                // budget and a Service only routes to Ready pods, so the current pods keep
                // serving meanwhile (a Recreate strategy has a gap either way); verify() is
                // what tells whether the restored version came up.
                let ready_n = clamp_u32(*ready);
                let note = (ready_n < required).then(|| {
                    format!(
                        "replicaset {name} has {ready_n} ready replica(s); the Deployment controller scales it up \
                         after the undo, and verify() waits for the rollout to complete"
                    )
                });
                on_step(KubeStepRecord::PreCheck {
                    index,
                    object: format!("replicaset/{name}"),
                    selector: format!("revision {revision}"),
                    matching: clamp_u32(*replicas),
                    ready: ready_n,
                    required,
                    passed: true,
                    note,
                });
                Ok(())
            }
        }
    }

    /// Runs check step `index`: polls until it passes (`successes` accepted answers in a row)
    /// or its timeout ends. A dry run describes it without running it.
    pub(super) async fn run_check(
        &self,
        index: usize,
        check: &KubeCheck,
        dry_run: bool,
        on_step: OnStep<'_>,
    ) -> Result<StepResult, KubeError> {
        let what = check.describe();
        let verdict = |verdict, probes, waited: Duration, last: Option<String>| KubeStepRecord::Checked {
            index,
            check: what.clone(),
            verdict,
            probes,
            waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            last,
        };
        if dry_run {
            on_step(verdict(CheckVerdict::NotRun, 0, Duration::ZERO, None));
            return Ok(StepResult::CheckNotRun { check: what });
        }
        let KubeCheck::Http(h) = check;
        let started = Instant::now();
        // The timeout is validated (at most 10 minutes); the fallback only avoids a panic.
        let deadline = started.checked_add(h.timeout).unwrap_or(started);
        let (mut in_a_row, mut probes) = (0u32, 0u32);
        let mut last: Option<String> = None;
        loop {
            let timeout = request_timeout(h, deadline.saturating_duration_since(Instant::now()));
            probes = probes.saturating_add(1);
            let (answer, ok) = match self.http.get(&h.url).timeout(timeout).send().await {
                Ok(r) => (
                    format!("HTTP {}", r.status().as_u16()),
                    h.expect_status.accepts(r.status().as_u16()),
                ),
                Err(e) if e.is_timeout() => (
                    format!("no answer within {}", humantime::format_duration(timeout)),
                    false,
                ),
                Err(e) => (format!("request failed: {}", request_error(e)), false),
            };
            // A failure resets the count: the successes must be in a row, as people read it.
            in_a_row = if ok { in_a_row.saturating_add(1) } else { 0 };
            if last.as_deref() != Some(answer.as_str()) {
                on_step(KubeStepRecord::CheckProbe {
                    index,
                    check: what.clone(),
                    probe: probes,
                    answer: answer.clone(),
                    ok,
                    in_a_row,
                    required: h.successes,
                });
            }
            last = Some(answer);
            let now = Instant::now();
            let waited = now.duration_since(started);
            if in_a_row >= h.successes {
                on_step(verdict(CheckVerdict::Passed, probes, waited, last.clone()));
                return Ok(StepResult::Checked {
                    check: what,
                    probes,
                    waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                    last: last.unwrap_or_default(),
                });
            }
            // The next probe would start after the deadline: the check cannot pass any more.
            if now.checked_add(h.interval).is_none_or(|next| next > deadline) {
                on_step(verdict(CheckVerdict::Failed, probes, waited, last.clone()));
                return Err(KubeError::CheckFailed {
                    index,
                    check: what,
                    probes,
                    waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                    last: last.unwrap_or_default(),
                });
            }
            tokio::time::sleep(h.interval).await;
        }
    }
}
