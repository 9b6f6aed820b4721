//! Verification after a revert: wait for ready endpoints behind each switched Service and for
//! each undone or scaled Deployment's rollout to complete, within the target's timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use tokio::time::Instant;

use super::error::Op;
use super::executor::OnStep;
use super::views::{equality_selector, ready_endpoints, rollout_progress};
use super::{KubeError, KubeExecutor, KubeStep, KubeStepRecord, KubernetesTarget, RolloutProgress, SERVICE_NAME_LABEL};

/// Polling bounds for `verify`: often enough for short test timeouts, gentle on the API.
pub(super) const MIN_POLL: Duration = Duration::from_millis(50);
pub(super) const MAX_POLL: Duration = Duration::from_secs(2);

impl KubeExecutor {
    /// Verification after a revert, polling until `t.rollout_timeout` (one deadline for the
    /// whole target): every switched Service has at least `min_ready_replicas` ready endpoints (EndpointSlices
    /// labelled `kubernetes.io/service-name`) backed by a pod of the new selector, else
    /// [`KubeError::NoReadyEndpoints`]; every undone Deployment completes its rollout
    /// (observedGeneration >= generation, updated == desired, no old replicas left, all
    /// updated available), else [`KubeError::RolloutTimedOut`], early on
    /// ProgressDeadlineExceeded; every scaled Deployment has exactly its replicas, all available,
    /// else [`KubeError::RolloutTimedOut`]. Drift is the read-back's
    /// (`read_back_sample`), sampled through the whole bake.
    pub async fn verify(
        &self,
        t: &KubernetesTarget,
        on_step: &mut (dyn FnMut(KubeStepRecord) + Send),
    ) -> Result<(), KubeError> {
        t.validate().map_err(|message| KubeError::InvalidTarget { message })?;
        let ns = t.namespace.as_str();
        let started = Instant::now();
        let deadline = started + t.rollout_timeout;
        let interval = poll_interval(t.rollout_timeout);
        for step in &t.steps {
            match step {
                KubeStep::SwitchService { service, selector } => {
                    let within = Window {
                        started,
                        deadline,
                        interval,
                    };
                    self.wait_for_endpoints(ns, service, selector, t.min_ready_replicas, within, on_step)
                        .await?;
                }
                KubeStep::RolloutUndo { deployment, .. } => {
                    self.wait_for_rollout(ns, deployment, None, t.rollout_timeout, deadline, interval, on_step)
                        .await?;
                }
                // The controller saw the new replicas, and exactly that many pods are left,
                // all available (scaling the canary to 0: its pods are gone).
                KubeStep::Scale { deployment, replicas } => {
                    let want = i32::try_from(*replicas).unwrap_or(i32::MAX);
                    self.wait_for_rollout(
                        ns,
                        deployment,
                        Some(want),
                        t.rollout_timeout,
                        deadline,
                        interval,
                        on_step,
                    )
                    .await?;
                }
                // It ran between the writes; the policy's verification.health_probe repeats
                // such a probe through the bake.
                KubeStep::Check(_) => {}
            }
        }
        Ok(())
    }

    /// Waits for at least `min_ready_replicas` (at least one) ready endpoints of the new
    /// selector's pods behind the Service.
    async fn wait_for_endpoints(
        &self,
        ns: &str,
        service: &str,
        selector: &BTreeMap<String, String>,
        min_ready_replicas: u32,
        within: Window,
        on_step: OnStep<'_>,
    ) -> Result<(), KubeError> {
        let Window {
            started,
            deadline,
            interval,
        } = within;
        let required = min_ready_replicas.max(1);
        let sel = equality_selector(selector);
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let slices_api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), ns);
        let pods_lp = ListParams::default().labels(&sel);
        let slices_lp = ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={service}"));
        let mut last: Option<(u32, u32)> = None;
        loop {
            let op = Op {
                verb: "list",
                kind: "Pod",
                api_group: "",
                resource: "pods",
                namespace: ns,
                name: "",
            };
            let pods = self.call(op, on_step, || pods_api.list(&pods_lp)).await?;
            let names: BTreeSet<String> = pods.items.iter().filter_map(|p| p.metadata.name.clone()).collect();
            let op = Op {
                verb: "list",
                kind: "EndpointSlice",
                api_group: "discovery.k8s.io",
                resource: "endpointslices",
                namespace: ns,
                name: "",
            };
            let slices = self.call(op, on_step, || slices_api.list(&slices_lp)).await?;
            let ready = ready_endpoints(&slices.items, &names);
            let matching = u32::try_from(names.len()).unwrap_or(u32::MAX);
            let passed = ready >= required;
            if last != Some((matching, ready)) || passed {
                on_step(KubeStepRecord::Endpoints {
                    service: service.to_string(),
                    selector: sel.clone(),
                    matching_pods: matching,
                    ready_endpoints: ready,
                    passed,
                });
                last = Some((matching, ready));
            }
            if passed {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(KubeError::NoReadyEndpoints {
                    service: service.to_string(),
                    selector: sel,
                    waited_secs: now.duration_since(started).as_secs(),
                    ready,
                    required,
                });
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
        }
    }

    /// Waits for the Deployment's rollout to complete and, for a scale step, for exactly
    /// `replicas` pods, all available.
    #[allow(clippy::too_many_arguments)]
    async fn wait_for_rollout(
        &self,
        ns: &str,
        deployment: &str,
        replicas: Option<i32>,
        timeout: Duration,
        deadline: Instant,
        interval: Duration,
        on_step: OnStep<'_>,
    ) -> Result<(), KubeError> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
        let mut last: Option<RolloutProgress> = None;
        loop {
            let op = Op::deployment("get", ns, deployment);
            let d = self.call(op, on_step, || api.get(deployment)).await?;
            let mut progress = rollout_progress(&d);
            if let Some(n) = replicas.filter(|_| progress.complete) {
                if progress.replicas != n || progress.available < n {
                    progress.complete = false;
                    progress.message = format!(
                        "scaled to {n}: {} replicas left, {} available",
                        progress.replicas, progress.available
                    );
                }
            }
            if last.as_ref() != Some(&progress) {
                on_step(KubeStepRecord::Rollout {
                    deployment: deployment.to_string(),
                    progress: progress.clone(),
                });
            }
            if progress.complete {
                return Ok(());
            }
            let now = Instant::now();
            if progress.deadline_exceeded || now >= deadline {
                return Err(KubeError::RolloutTimedOut {
                    deployment: deployment.to_string(),
                    timeout_secs: timeout.as_secs(),
                    progress_deadline_exceeded: progress.deadline_exceeded,
                    last_status: progress.message,
                });
            }
            last = Some(progress);
            tokio::time::sleep(interval.min(deadline - now)).await;
        }
    }
}

/// When a verification wait started, when it must end, and how often it polls.
#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    deadline: Instant,
    interval: Duration,
}

/// A tenth of the timeout, within [50 ms, 2 s].
pub(super) fn poll_interval(timeout: Duration) -> Duration {
    (timeout / 10).clamp(MIN_POLL, MAX_POLL)
}
