//! The revert's API calls: read every step's object, plan, pre-check, then write each step
//! with a resourceVersion precondition and read it back (conflicts re-read and re-plan).

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};

use super::error::{classify, Op};
use super::plan::{object_key, object_name, plan_step, step_kind, Plan, WritePlan};
use super::settings::load_config;
use super::views::{deployment_state, Current, DeploymentView, RsView, ScaleView, ServiceView};
use super::{
    KubeError, KubeOutcome, KubeSettings, KubeStep, KubeStepRecord, KubernetesTarget, ObjectState, StepOutcome,
    StepResult, CALL_TIMEOUT,
};
use crate::action::gitops::GitOpsStep;
use crate::action::retry::{Attempt, BeforeWrite, RetryPolicy};
use crate::action::ForIncident;

// ---------------------------------------------------------------------------------------------
// Executor
// ---------------------------------------------------------------------------------------------

/// Executes Kubernetes reverts and verifications with one client.
#[derive(Clone)]
pub struct KubeExecutor {
    pub(super) client: kube::Client,
    pub(super) field_manager: String,
    pub(super) max_conflict_retries: u32,
    retry: RetryPolicy,
    /// For check steps; redirects are not followed (a login page answering 200 is not health).
    pub(super) http: reqwest::Client,
}

impl std::fmt::Debug for KubeExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeExecutor")
            .field("field_manager", &self.field_manager)
            .field("max_conflict_retries", &self.max_conflict_retries)
            .finish_non_exhaustive()
    }
}

pub(super) type OnStep<'a> = &'a mut (dyn FnMut(KubeStepRecord) + Send);

impl KubeExecutor {
    /// Builds the client from the settings: `in_cluster` (service account only), or the given
    /// kubeconfig file and/or context, or else inference (kubeconfig first, then in-cluster).
    /// Installs the ring crypto provider first (see `crate::tls`).
    pub async fn from_settings(s: &KubeSettings) -> Result<Self, KubeError> {
        crate::tls::install_crypto_provider();
        let mut config = load_config(s).await?;
        // kube's own retry layer resends 429/503/504 up to 15 times with delays growing into
        // minutes, invisibly; we retry a few times ourselves and report every attempt.
        config.default_retry = false;
        let client = kube::Client::try_from(config).map_err(|e| KubeError::Config {
            message: format!("building the client: {e}"),
        })?;
        Ok(Self::new(client, s))
    }

    /// The field manager our patches are recorded under in managedFields.
    pub fn field_manager(&self) -> &str {
        &self.field_manager
    }

    /// Wraps an existing client (tests pass a mock or a client of the fake API server).
    pub fn new(client: kube::Client, s: &KubeSettings) -> Self {
        Self {
            client,
            field_manager: if s.field_manager.is_empty() {
                KubeSettings::default().field_manager
            } else {
                s.field_manager.clone()
            },
            max_conflict_retries: s.max_conflict_retries,
            retry: RetryPolicy::new(s.retry_window, Duration::from_millis(s.initial_backoff_ms), None),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
        }
    }

    /// Runs the steps in order. First every step's object is read and its write planned
    /// (nothing is written if any read fails, a Deployment is paused or a revision is
    /// missing); then every traffic-shifting step that needs a write is pre-checked
    /// (`SwitchService`: at least `min_ready_replicas` Ready pods match the new selector, else
    /// [`KubeError::PreCheckFailed`] with nothing written; `RolloutUndo`: the restored
    /// ReplicaSet's readiness is recorded but does not block, because the controller scales it
    /// up and keeps the current pods until the restored ones are Ready); then each step is
    /// written with a resourceVersion precondition (conflicts: re-read, re-plan, retry up to
    /// `max_conflict_retries` times) and read back. Steps already in the wanted state are
    /// reported as done, which makes a second call after a partial run finish the work. A
    /// check step runs in its turn (`check`); failing, it ends the revert and no later step is
    /// sent ([`KubeError::CheckFailed`]); passing, the steps after it are read, planned and
    /// pre-checked again before any of them is written (the check may have waited minutes).
    /// Dry run: reads, pre-checks, and sends each patch with `dryRun=All` so the server
    /// validates it (RBAC, admission, schema) without persisting anything.
    pub async fn revert(
        &self,
        t: &KubernetesTarget,
        dry_run: bool,
        on_step: &mut (dyn FnMut(KubeStepRecord) + Send),
    ) -> Result<KubeOutcome, KubeError> {
        self.revert_gated(t, dry_run, None, on_step, &crate::action::retry::no_gate)
            .await
    }

    /// [`KubeExecutor::revert`] for an incident that opened at `opened_at`: a rollout undo
    /// without a named revision pins the revision current then as the bad one, so a rollback
    /// someone made since is found done, not undone (see [`KubeStep::RolloutUndo`]).
    pub async fn revert_since(
        &self,
        t: &KubernetesTarget,
        dry_run: bool,
        opened_at: DateTime<Utc>,
        on_step: &mut (dyn FnMut(KubeStepRecord) + Send),
    ) -> Result<KubeOutcome, KubeError> {
        self.revert_gated(t, dry_run, Some(opened_at), on_step, &crate::action::retry::no_gate)
            .await
    }

    /// [`KubeExecutor::revert_since`] (or, without `opened_at`, [`KubeExecutor::revert`]),
    /// awaiting `before_write` after each patch is planned (and reported) and before it is sent
    /// (not in a dry run).
    pub async fn revert_gated(
        &self,
        t: &KubernetesTarget,
        dry_run: bool,
        opened_at: Option<DateTime<Utc>>,
        on_step: &mut (dyn FnMut(KubeStepRecord) + Send),
        before_write: BeforeWrite<'_>,
    ) -> Result<KubeOutcome, KubeError> {
        let incident = ForIncident { id: None, opened_at };
        self.revert_for(t, dry_run, &incident, on_step, before_write).await
    }

    /// [`KubeExecutor::revert_gated`] for `incident`: its opening time pins the bad release,
    /// and its id (or opening time) marks a GitOps suspend as its own. A failure after the
    /// suspend took and before any Kubernetes object was reverted says so
    /// ([`KubeError::NothingRevertedAfterSuspend`]).
    pub async fn revert_for(
        &self,
        t: &KubernetesTarget,
        dry_run: bool,
        incident: &ForIncident,
        on_step: &mut (dyn FnMut(KubeStepRecord) + Send),
        before_write: BeforeWrite<'_>,
    ) -> Result<KubeOutcome, KubeError> {
        let mut suspended: Option<GitOpsStep> = None;
        let mut reverted = false;
        let result = {
            let mut watch = |r: KubeStepRecord| {
                match &r {
                    // Ours: written now, or by an interrupted earlier attempt of this incident
                    // (a takeover finds it off, by us): either way this incident's change.
                    KubeStepRecord::Gitops(
                        g @ (GitOpsStep::Suspended { .. } | GitOpsStep::AlreadyOff { by_us: true, .. }),
                    ) => suspended = Some(g.clone()),
                    r if r.applied() => reverted = true,
                    // Found reverted: by the earlier attempt whose suspend was found, maybe.
                    // Then "no Kubernetes object was reverted" would not be true.
                    KubeStepRecord::AlreadyDone { .. } => reverted = true,
                    _ => {}
                }
                on_step(r);
            };
            self.revert_steps(t, dry_run, incident, &mut watch, before_write).await
        };
        match (result, suspended) {
            (
                Err(cause),
                Some(
                    GitOpsStep::Suspended {
                        owner, resume_commands, ..
                    }
                    | GitOpsStep::AlreadyOff {
                        owner, resume_commands, ..
                    },
                ),
            ) if !reverted => Err(KubeError::NothingRevertedAfterSuspend {
                owner: owner.describe(),
                what: owner.what().to_string(),
                resume: resume_commands.join("  or  "),
                cause: Box::new(cause),
            }),
            (result, _) => result,
        }
    }

    /// The steps themselves, as [`KubeExecutor::revert`] describes them.
    async fn revert_steps(
        &self,
        t: &KubernetesTarget,
        dry_run: bool,
        incident: &ForIncident,
        on_step: OnStep<'_>,
        before_write: BeforeWrite<'_>,
    ) -> Result<KubeOutcome, KubeError> {
        let opened_at = incident.opened_at;
        t.validate().map_err(|message| KubeError::InvalidTarget { message })?;
        let ns = t.namespace.as_str();

        // A check step reads and plans nothing (`None`): it runs in its turn below.
        let mut planned = self.plan_steps(t, 0, opened_at, on_step).await?;
        self.precheck_planned(t, &planned, on_step).await?;

        // GitOps (action::gitops): Argo CD / Flux must not sync the release back; before any write.
        let gitops = match &t.gitops {
            Some(g) => Some(self.suspend_gitops(g, dry_run, incident, on_step, before_write).await?),
            None => None,
        };

        let mut touched: HashSet<String> = HashSet::new();
        let mut steps = Vec::with_capacity(t.steps.len());
        for (index, step) in t.steps.iter().enumerate() {
            let (current, plan) = match (step, planned[index].take()) {
                (KubeStep::Check(c), _) => {
                    let result = self.run_check(index, c, dry_run, on_step).await?;
                    steps.push(StepOutcome {
                        index,
                        step: step.clone(),
                        result,
                    });
                    // The check waited (seconds, maybe minutes): what the later steps read and
                    // planned before it may be stale (a step found done undone again, a release
                    // rolled out, other pods under the new selector). Read, plan and pre-check
                    // them again, with the same rules as at the start. A dry run wrote nothing
                    // and waited for nothing: its plans stand.
                    if !dry_run {
                        planned = self.plan_steps(t, index + 1, opened_at, on_step).await?;
                        self.precheck_planned(t, &planned, on_step).await?;
                        touched.clear();
                    }
                    continue;
                }
                (_, Some(p)) => p,
                (_, None) => return Err(KubeError::internal("a write step was not planned")),
            };
            let result = match plan {
                Plan::Done { reason, by } => StepResult::AlreadyDone {
                    state: current.state(),
                    reason,
                    by,
                },
                Plan::Write(_) => {
                    let key = object_key(step);
                    // An earlier step of this run wrote the same object (undo, then scale):
                    // read it again rather than spend a conflict retry on a known-stale version.
                    let current = if touched.contains(&key) {
                        let fresh = self.read_step(ns, step, on_step).await?;
                        on_step(KubeStepRecord::Read {
                            index,
                            state: fresh.state(),
                        });
                        fresh
                    } else {
                        current
                    };
                    let result = self
                        .execute_step(ns, index, step, current, dry_run, opened_at, on_step, before_write)
                        .await?;
                    if matches!(result, StepResult::Changed { .. }) {
                        touched.insert(key);
                    }
                    result
                }
            };
            steps.push(StepOutcome {
                index,
                step: step.clone(),
                result,
            });
        }
        let changed = steps.iter().any(|s| matches!(s.result, StepResult::Changed { .. }));
        Ok(KubeOutcome {
            changed,
            dry_run,
            steps,
            gitops,
        })
    }

    /// Reads and plans every write step from `from` on, reporting each read and each step
    /// found done; nothing is written if any read or plan fails. Check steps and the steps
    /// before `from` get `None`.
    async fn plan_steps(
        &self,
        t: &KubernetesTarget,
        from: usize,
        opened_at: Option<DateTime<Utc>>,
        on_step: OnStep<'_>,
    ) -> Result<Vec<Option<(Current, Plan)>>, KubeError> {
        let mut planned: Vec<Option<(Current, Plan)>> = Vec::with_capacity(t.steps.len());
        for (index, step) in t.steps.iter().enumerate() {
            if index < from || matches!(step, KubeStep::Check(_)) {
                planned.push(None);
                continue;
            }
            let current = self.read_step(&t.namespace, step, on_step).await?;
            on_step(KubeStepRecord::Read {
                index,
                state: current.state(),
            });
            let plan = plan_step(step, &current, opened_at)?;
            if let Plan::Done { reason, by } = &plan {
                on_step(KubeStepRecord::AlreadyDone {
                    index,
                    state: current.state(),
                    reason: reason.clone(),
                    by: by.clone(),
                });
            }
            planned.push(Some((current, plan)));
        }
        Ok(planned)
    }

    /// The pre-check of every planned write (see [`KubeExecutor::revert`]).
    async fn precheck_planned(
        &self,
        t: &KubernetesTarget,
        planned: &[Option<(Current, Plan)>],
        on_step: OnStep<'_>,
    ) -> Result<(), KubeError> {
        for (index, p) in planned.iter().enumerate() {
            if let Some((_, Plan::Write(w))) = p {
                self.precheck(&t.namespace, index, &w.precheck, t.min_ready_replicas, on_step)
                    .await?;
            }
        }
        Ok(())
    }

    /// One API call with a time limit per attempt, retried within the shared retry policy's
    /// window while it fails transiently; every failed attempt is recorded.
    pub(super) async fn call<T, F, Fut>(&self, op: Op<'_>, on_step: OnStep<'_>, f: F) -> Result<T, KubeError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        self.call_gated(op, on_step, None, f).await
    }

    /// [`KubeExecutor::call`] for a write: a retry waits at `gate` first, as the first attempt
    /// did (see [`crate::action::retry::RetryPolicy::run_gated`]). `None` in a dry run, whose
    /// writes change nothing.
    pub(super) async fn call_gated<T, F, Fut>(
        &self,
        op: Op<'_>,
        on_step: OnStep<'_>,
        gate: Option<BeforeWrite<'_>>,
        mut f: F,
    ) -> Result<T, KubeError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let call = op.describe();
        let mut on_attempt = |a: Attempt| on_step(KubeStepRecord::AttemptFailed(a));
        // A write's attempt that failed without a clear answer may have been applied; if the
        // retries end without a clear answer either, whether it took is not known. (A clear
        // one after it, a 409 say, goes back to the caller, which reads the object again.)
        let unsure = std::sync::atomic::AtomicBool::new(false);
        let write = gate.is_some();
        let result = self
            .retry
            .run_gated(&call, &mut on_attempt, gate, || {
                let fut = f();
                let (op, unsure) = (&op, &unsure);
                async move {
                    let r = match tokio::time::timeout(CALL_TIMEOUT, fut).await {
                        Ok(r) => r.map_err(|e| classify(e, op)),
                        Err(_) => Err(KubeError::Client {
                            message: format!("{}: no answer within {}s", op.describe(), CALL_TIMEOUT.as_secs()),
                            retryable: true,
                        }),
                    };
                    if r.as_ref().is_err_and(KubeError::may_have_been_applied) {
                        unsure.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    r
                }
            })
            .await;
        match result {
            Err(e) if write && e.may_have_been_applied() && unsure.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(KubeError::OutcomeUnknown {
                    call,
                    cause: format!("{e} (code {})", e.code()),
                })
            }
            other => other,
        }
    }

    pub(super) fn dynamic_api<K>(&self, ns: &str) -> Api<DynamicObject>
    where
        K: kube::Resource<DynamicType = ()>,
    {
        Api::namespaced_with(self.client.clone(), ns, &ApiResource::erase::<K>(&()))
    }

    /// Reads what a step needs: the Service; the Deployment and its ReplicaSets; the scale.
    pub(super) async fn read_step(&self, ns: &str, step: &KubeStep, on_step: OnStep<'_>) -> Result<Current, KubeError> {
        match step {
            KubeStep::SwitchService { service, .. } => {
                let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
                let op = Op::service("get", ns, service);
                let svc = self.call(op, on_step, || api.get(service)).await?;
                Ok(Current::Service(ServiceView::from_service(&svc)))
            }
            KubeStep::RolloutUndo { deployment, .. } => {
                let api = self.dynamic_api::<Deployment>(ns);
                let op = Op::deployment("get", ns, deployment);
                let obj = self.call(op, on_step, || api.get(deployment)).await?;
                let d = DeploymentView::parse(&obj)?;
                let rs_api = self.dynamic_api::<ReplicaSet>(ns);
                let lp = ListParams::default().labels(&d.selector);
                let op = Op {
                    verb: "list",
                    kind: "ReplicaSet",
                    api_group: "apps",
                    resource: "replicasets",
                    namespace: ns,
                    name: "",
                };
                let list = self.call(op, on_step, || rs_api.list(&lp)).await?;
                let rses = list.items.iter().map(RsView::parse).collect();
                Ok(Current::Undo(d, rses))
            }
            KubeStep::Scale { deployment, .. } => {
                let api: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
                let op = Op::scale("get", ns, deployment);
                let scale = self.call(op, on_step, || api.get_scale(deployment)).await?;
                Ok(Current::Scale(ScaleView::from_scale(deployment, &scale)))
            }
            KubeStep::Check(_) => Err(KubeError::internal("a check step reads no object")),
        }
    }

    /// Writes one step with optimistic concurrency: a 409, or a 422 while the object's
    /// resourceVersion moved (our `test` op failed), means someone wrote in between: re-read,
    /// re-plan (it may be done now) and try again, at most `max_conflict_retries` times.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn execute_step(
        &self,
        ns: &str,
        index: usize,
        step: &KubeStep,
        mut current: Current,
        dry_run: bool,
        opened_at: Option<DateTime<Utc>>,
        on_step: OnStep<'_>,
        before_write: BeforeWrite<'_>,
    ) -> Result<StepResult, KubeError> {
        let object = object_name(step);
        let before = current.state();
        let max_attempts = self.max_conflict_retries.saturating_add(1);
        let mut attempt = 1u32;
        loop {
            let plan = match plan_step(step, &current, opened_at)? {
                Plan::Write(w) => w,
                Plan::Done { reason, by } => {
                    let state = current.state();
                    on_step(KubeStepRecord::AlreadyDone {
                        index,
                        state: state.clone(),
                        reason: reason.clone(),
                        by: by.clone(),
                    });
                    // Found done after a conflict: by someone else, or by our own attempt
                    // whose answer was lost. Either way the object changed during this run.
                    return Ok(if attempt == 1 || dry_run {
                        StepResult::AlreadyDone { state, reason, by }
                    } else {
                        StepResult::Changed { before, after: state }
                    });
                }
            };
            on_step(KubeStepRecord::Planned {
                index,
                object: object.clone(),
                dry_run,
                content_type: plan.content_type.to_string(),
                patch: plan.patch.clone(),
                would_write: plan.would_write.clone(),
            });
            let tested = current.resource_version().to_string();
            if !dry_run {
                before_write().await;
            }
            let gate = (!dry_run).then_some(before_write);
            let err = match self.write(ns, step, &current, &plan, dry_run, on_step, gate).await {
                Ok(written) => {
                    on_step(KubeStepRecord::Patched {
                        index,
                        object: object.clone(),
                        attempt,
                        dry_run,
                        resource_version: written.resource_version().to_string(),
                    });
                    if dry_run {
                        return Ok(StepResult::DryRun {
                            before,
                            would_write: written,
                        });
                    }
                    tracing::info!(object = %object, namespace = ns, attempt, "kubernetes revert step written");
                    let reread = self.read_step(ns, step, on_step).await?;
                    let after = reread.state();
                    let matches = matches!(plan_step(step, &reread, opened_at), Ok(Plan::Done { .. }));
                    on_step(KubeStepRecord::ReadBack {
                        index,
                        state: after.clone(),
                        matches,
                    });
                    if !matches {
                        return Err(KubeError::ReadBackMismatch {
                            object,
                            expected: serde_json::to_string(&plan.would_write).unwrap_or_default(),
                            got: serde_json::to_string(&after).unwrap_or_default(),
                        });
                    }
                    return Ok(StepResult::Changed { before, after });
                }
                Err(e) => e,
            };
            let maybe_stale = matches!(err, KubeError::Conflict { .. } | KubeError::Api { code: 422, .. });
            if !maybe_stale {
                return Err(err);
            }
            let reread = self.read_step(ns, step, on_step).await?;
            if matches!(err, KubeError::Api { .. }) && reread.resource_version() == tested {
                // 422 with an unchanged object: the patch itself is invalid, not stale.
                return Err(err);
            }
            let will_retry = attempt < max_attempts;
            tracing::warn!(object = %object, namespace = ns, attempt, will_retry, error = %err, "kubernetes write lost a resourceVersion race");
            on_step(KubeStepRecord::ConflictRetry {
                index,
                object: object.clone(),
                attempt,
                code: err.code().to_string(),
                message: err.to_string(),
                will_retry,
            });
            if !will_retry {
                let (kind, name) = step_kind(step);
                return Err(KubeError::Conflict {
                    kind: kind.to_string(),
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    attempts: attempt,
                    message: err.to_string(),
                });
            }
            on_step(KubeStepRecord::Read {
                index,
                state: reread.state(),
            });
            current = reread;
            attempt += 1;
        }
    }

    /// Sends a step's patch; returns the object as the server answered (the would-be object
    /// for a dry run).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn write(
        &self,
        ns: &str,
        step: &KubeStep,
        current: &Current,
        plan: &WritePlan,
        dry_run: bool,
        on_step: OnStep<'_>,
        gate: Option<BeforeWrite<'_>>,
    ) -> Result<ObjectState, KubeError> {
        let pp = PatchParams {
            dry_run,
            field_manager: Some(self.field_manager.clone()),
            ..PatchParams::default()
        };
        let json_patch = || -> Result<Patch<()>, KubeError> {
            serde_json::from_value::<json_patch::Patch>(plan.patch.clone())
                .map(Patch::Json)
                .map_err(|e| KubeError::internal(format!("building the JSON patch: {e}")))
        };
        match (step, current) {
            (KubeStep::SwitchService { service, .. }, Current::Service(_)) => {
                let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
                let patch = json_patch()?;
                let op = Op::service("patch", ns, service);
                let svc = self
                    .call_gated(op, on_step, gate, || api.patch(service, &pp, &patch))
                    .await?;
                Ok(Current::Service(ServiceView::from_service(&svc)).state())
            }
            (KubeStep::RolloutUndo { deployment, .. }, Current::Undo(_, rses)) => {
                let api = self.dynamic_api::<Deployment>(ns);
                let patch = json_patch()?;
                let op = Op::deployment("patch", ns, deployment);
                let obj = self
                    .call_gated(op, on_step, gate, || api.patch(deployment, &pp, &patch))
                    .await?;
                Ok(deployment_state(&DeploymentView::parse(&obj)?, rses))
            }
            (KubeStep::Scale { deployment, .. }, Current::Scale(_)) => {
                // An HPA targeting this Deployment will fight a manual replica count (it
                // leaves a Deployment at 0 alone, but resets any other value to its range).
                let api: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
                let patch = Patch::Merge(plan.patch.clone());
                let op = Op::scale("patch", ns, deployment);
                let scale = self
                    .call_gated(op, on_step, gate, || api.patch_scale(deployment, &pp, &patch))
                    .await?;
                Ok(Current::Scale(ScaleView::from_scale(deployment, &scale)).state())
            }
            _ => Err(KubeError::internal("step and object read do not match")),
        }
    }
}
