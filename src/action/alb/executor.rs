//! The ELBv2 calls of an ALB revert: building the client, reading the action list, the stable
//! group's health pre-check, the write (never sent twice) and the read-back, each under the
//! shared retry policy with every failed attempt reported.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_sdk_elasticloadbalancingv2 as elbv2;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use elbv2::types::Action;

use super::{
    AlbError, AlbStep, AlbTarget, AwsSettings, ForwardSnapshot, ForwardState, Resource, ResourceKind, TargetHealthSeen,
};
use crate::action::retry::{Attempt, BeforeWrite, RetryPolicy};

/// DescribeRules pages read at most: a listener has at most 100 rules, so far more than enough.
const MAX_RULE_PAGES: usize = 100;

/// ELBv2 reads are normally consistent right after a write, but allow a short settling time
/// before declaring that the write did not take.
const READBACK_ATTEMPTS: u32 = 3;
const READBACK_SPACING: Duration = Duration::from_millis(500);
/// Per-attempt limits so a hung connection becomes a retryable timeout instead of a stall.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many individual targets a pre-check report lists (the per-state counts are complete).
const MAX_TARGETS_REPORTED: usize = 20;

/// Executes ALB reverts against one ELBv2 client.
#[derive(Debug, Clone)]
pub struct AlbExecutor {
    pub(super) client: elbv2::Client,
    pub(super) retry: RetryPolicy,
}

impl AlbExecutor {
    /// Default credential chain (env, profile, web identity/IRSA, ECS, IMDS), region, optional
    /// endpoint URL; SDK's own retries OFF (max_attempts 1) because we retry ourselves so that
    /// every failed attempt is reported with its AWS error code. HTTP client built with
    /// aws-smithy-http-client's rustls-ring (one crypto provider: ring).
    pub async fn from_settings(s: &AwsSettings) -> Self {
        crate::tls::install_crypto_provider();
        use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http_client);
        if let Some(region) = &s.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(profile) = &s.profile {
            loader = loader.profile_name(profile);
        }
        let sdk_config = loader.load().await;
        // The endpoint goes on the ELBv2 client only, so the credential providers (STS, SSO)
        // keep their own endpoints.
        let mut conf = elbv2::config::Builder::from(&sdk_config);
        if let Some(url) = &s.endpoint_url {
            conf = conf.endpoint_url(url);
        }
        Self::new(elbv2::Client::from_conf(conf.build()), s)
    }

    /// Wraps an existing client (tests use static credentials): SDK retries off, and default
    /// connect/attempt timeouts where the client sets none.
    pub fn new(client: elbv2::Client, s: &AwsSettings) -> Self {
        crate::tls::install_crypto_provider();
        let mut conf = client.config().to_builder().retry_config(RetryConfig::disabled());
        // Per-attempt limits turn a hung connection into a retryable timeout; values the
        // client already has (set or explicitly disabled) win over ours.
        let mut timeouts = client
            .config()
            .timeout_config()
            .cloned()
            .unwrap_or_else(|| TimeoutConfig::builder().build());
        timeouts.take_defaults_from(
            &TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .build(),
        );
        conf = conf.timeout_config(timeouts);
        let conf = conf.build();
        Self {
            client: elbv2::Client::from_conf(conf),
            retry: RetryPolicy::new(
                s.retry_window,
                Duration::from_millis(s.initial_backoff_ms),
                Some(s.max_attempts),
            ),
        }
    }

    /// Current forward state of the listener default action or the rule.
    pub async fn read(&self, t: &AlbTarget) -> Result<ForwardSnapshot, AlbError> {
        let r = Resource::of(t);
        let actions = self.read_actions(&r, &mut |_| {}).await?;
        Ok(ForwardSnapshot::from_actions(&r.arn, r.kind, &actions))
    }
}

impl AlbExecutor {
    /// Reads the action list under the retry policy, refusing the default rule (only
    /// ModifyListener can change it).
    pub(super) async fn read_actions(
        &self,
        r: &Resource,
        on_step: &mut (dyn FnMut(AlbStep) + Send),
    ) -> Result<Vec<Action>, AlbError> {
        let operation = match r.kind {
            ResourceKind::ListenerDefaultActions => "DescribeListeners",
            ResourceKind::Rule => "DescribeRules",
        };
        self.retrying(operation, on_step, || self.fetch_actions(r)).await
    }

    /// One attempt at reading the action list (DescribeListeners or DescribeRules).
    pub(super) async fn fetch_actions(&self, r: &Resource) -> Result<Vec<Action>, AlbError> {
        match r.kind {
            ResourceKind::ListenerDefaultActions => self.fetch_default_actions(&r.arn).await,
            ResourceKind::Rule => {
                let rule_arn = r.arn.as_str();
                let out = self
                    .client
                    .describe_rules()
                    .rule_arns(rule_arn)
                    .send()
                    .await
                    .map_err(AlbError::from_sdk)?;
                let rule = out
                    .rules()
                    .iter()
                    .find(|r| r.rule_arn() == Some(rule_arn))
                    .ok_or_else(|| AlbError::NotFound {
                        code: "RuleNotFound".into(),
                        message: format!("rule {rule_arn} not returned by DescribeRules"),
                    })?;
                if rule.is_default() == Some(true) {
                    return Err(AlbError::InvalidTarget {
                        message: format!(
                            "rule_arn {rule_arn} is the listener's default rule, which ModifyRule cannot change: \
                         remove rule_arn to revert the listener's default action"
                        ),
                    });
                }
                Ok(rule.actions().to_vec())
            }
        }
    }

    async fn fetch_default_actions(&self, listener_arn: &str) -> Result<Vec<Action>, AlbError> {
        let out = self
            .client
            .describe_listeners()
            .listener_arns(listener_arn)
            .send()
            .await
            .map_err(AlbError::from_sdk)?;
        let listener = out
            .listeners()
            .iter()
            .find(|l| l.listener_arn() == Some(listener_arn))
            .ok_or_else(|| AlbError::NotFound {
                code: "ListenerNotFound".into(),
                message: format!("listener {listener_arn} not returned by DescribeListeners"),
            })?;
        Ok(listener.default_actions().to_vec())
    }

    /// Every action list of the listener as it is now: the default actions, then each
    /// non-default rule in priority order (DescribeRules, all pages).
    pub(super) async fn listener_lists(
        &self,
        listener_arn: &str,
        on_step: &mut (dyn FnMut(AlbStep) + Send),
    ) -> Result<Vec<(Resource, Vec<Action>)>, AlbError> {
        let default = self
            .retrying("DescribeListeners", on_step, || {
                self.fetch_default_actions(listener_arn)
            })
            .await?;
        let mut rules = Vec::new();
        let mut marker: Option<String> = None;
        let mut seen = HashSet::new();
        let mut pages = 0usize;
        loop {
            let out = self
                .retrying("DescribeRules", on_step, || async {
                    self.client
                        .describe_rules()
                        .listener_arn(listener_arn)
                        .set_marker(marker.clone())
                        .send()
                        .await
                        .map_err(AlbError::from_sdk)
                })
                .await?;
            rules.extend(out.rules().iter().filter(|r| r.is_default() != Some(true)).cloned());
            pages += 1;
            marker = out.next_marker().map(str::to_string);
            let Some(m) = &marker else { break };
            // A marker seen before (or endless pages) would loop forever: stop and say so.
            if !seen.insert(m.clone()) || pages >= MAX_RULE_PAGES {
                return Err(AlbError::Aws {
                    code: "DescribeRulesPagination".into(),
                    message: format!(
                        "DescribeRules on {listener_arn} did not finish: NextMarker {m:?} after {pages} page(s) \
                         (repeated, or over {MAX_RULE_PAGES} pages)"
                    ),
                    retryable: false,
                });
            }
        }
        // Priorities are numbers as strings; the default rule (already left out) says "default".
        rules.sort_by_key(|r| r.priority().and_then(|p| p.parse::<u32>().ok()).unwrap_or(u32::MAX));
        let mut lists = vec![(
            Resource {
                arn: listener_arn.to_string(),
                kind: ResourceKind::ListenerDefaultActions,
            },
            default,
        )];
        lists.extend(rules.into_iter().filter_map(|r| {
            Some((
                Resource {
                    arn: r.rule_arn()?.to_string(),
                    kind: ResourceKind::Rule,
                },
                r.actions().to_vec(),
            ))
        }));
        Ok(lists)
    }

    pub(super) async fn precheck(
        &self,
        t: &AlbTarget,
        on_step: &mut (dyn FnMut(AlbStep) + Send),
    ) -> Result<(), AlbError> {
        let tg = t.stable_target_group_arn.as_str();
        let out = self
            .retrying("DescribeTargetHealth", on_step, || async {
                self.client
                    .describe_target_health()
                    .target_group_arn(tg)
                    .send()
                    .await
                    .map_err(AlbError::from_sdk)
            })
            .await?;
        let mut states: BTreeMap<String, u32> = BTreeMap::new();
        let mut targets = Vec::new();
        let mut healthy = 0u32;
        for d in out.target_health_descriptions() {
            let health = d.target_health();
            let state = health
                .and_then(|h| h.state())
                .map_or("unknown", |s| s.as_str())
                .to_string();
            if state == "healthy" {
                healthy += 1;
            }
            *states.entry(state.clone()).or_default() += 1;
            if targets.len() < MAX_TARGETS_REPORTED {
                targets.push(TargetHealthSeen {
                    id: d.target().and_then(|x| x.id()).unwrap_or_default().to_string(),
                    port: d.target().and_then(|x| x.port()),
                    state,
                    reason: health.and_then(|h| h.reason()).map(|r| r.as_str().to_string()),
                });
            }
        }
        let passed = healthy >= t.min_healthy_targets;
        on_step(AlbStep::PreCheck {
            target_group_arn: tg.to_string(),
            healthy,
            required: t.min_healthy_targets,
            passed,
            states: states.clone(),
            targets: targets.clone(),
        });
        if passed {
            Ok(())
        } else {
            Err(AlbError::PreCheckFailed {
                target_group_arn: tg.to_string(),
                healthy,
                required: t.min_healthy_targets,
                states,
                targets,
            })
        }
    }

    /// Writes the whole list (the APIs replace it); returns the attempt that succeeded.
    /// A failed attempt may have been applied all the same (an answer slower than the attempt
    /// timeout, a connection cut after AWS took the request), so before each further attempt
    /// the list is read again, and if it already routes as `expected` nothing is sent twice.
    pub(super) async fn write(
        &self,
        r: &Resource,
        actions: &[Action],
        expected: &ForwardSnapshot,
        on_step: &mut (dyn FnMut(AlbStep) + Send),
        before_write: BeforeWrite<'_>,
    ) -> Result<u32, AlbError> {
        let operation = r.kind.write_operation();
        let want = expected.forward.clone().unwrap_or_default();
        let attempts = AtomicU32::new(0);
        let on_step = std::sync::Mutex::new(on_step);
        let emit = |s: AlbStep| {
            if let Ok(mut f) = on_step.lock() {
                (*f)(s);
            }
        };
        let list = Some(actions.to_vec());
        let mut on_attempt = |a: Attempt| emit(AlbStep::AttemptFailed(a));
        // Set by an attempt that failed without a clear answer (it may have been applied),
        // cleared by a read that shows the list as it is: if the retries end while it is set,
        // whether the revert took is not known, and the error says so.
        let unsure = std::sync::atomic::AtomicBool::new(false);
        let result = self
            .retry
            .run_gated(operation, &mut on_attempt, Some(before_write), || async {
                let attempt = attempts.fetch_add(1, Ordering::Relaxed) + 1;
                if attempt > 1 {
                    let read = self.fetch_actions(r).await?;
                    unsure.store(false, Ordering::Relaxed);
                    let snap = ForwardSnapshot::from_actions(&r.arn, r.kind, &read);
                    let applied = snap.forward.as_ref().is_some_and(|f| want.same_routing(f));
                    emit(AlbStep::ReadBeforeRetry {
                        operation: operation.to_string(),
                        attempt,
                        applied,
                    });
                    if applied {
                        tracing::info!(operation, attempt, "an earlier attempt was applied; not writing again");
                        return Ok(());
                    }
                }
                let sent = match r.kind {
                    ResourceKind::ListenerDefaultActions => self
                        .client
                        .modify_listener()
                        .listener_arn(&r.arn)
                        .set_default_actions(list.clone())
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(AlbError::from_sdk),
                    ResourceKind::Rule => self
                        .client
                        .modify_rule()
                        .rule_arn(&r.arn)
                        .set_actions(list.clone())
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(AlbError::from_sdk),
                };
                if sent.as_ref().is_err_and(AlbError::may_have_been_applied) {
                    unsure.store(true, Ordering::Relaxed);
                }
                sent
            })
            .await;
        let n = attempts.load(Ordering::Relaxed);
        match result {
            Ok(()) => Ok(n),
            // The last attempt may have been applied: one more read tells, if it can be made.
            Err(e) if unsure.load(Ordering::Relaxed) => match self.fetch_actions(r).await {
                Ok(read) => {
                    let snap = ForwardSnapshot::from_actions(&r.arn, r.kind, &read);
                    let applied = snap.forward.as_ref().is_some_and(|f| want.same_routing(f));
                    emit(AlbStep::ReadAfterLastAttempt {
                        operation: operation.to_string(),
                        applied,
                    });
                    if applied {
                        tracing::info!(operation, attempt = n, "the last attempt was applied");
                        Ok(n)
                    } else {
                        Err(e)
                    }
                }
                Err(read) => Err(AlbError::OutcomeUnknown {
                    operation: operation.to_string(),
                    arn: r.arn.clone(),
                    cause: format!("{e} (code {}); reading it back: {read}", e.code()),
                }),
            },
            Err(e) => Err(e),
        }
    }

    pub(super) async fn read_back(
        &self,
        r: &Resource,
        expected: &ForwardSnapshot,
        stable_percent: u8,
        on_step: &mut (dyn FnMut(AlbStep) + Send),
    ) -> Result<(Vec<Action>, ForwardSnapshot), AlbError> {
        let want = expected.forward.clone().unwrap_or_default();
        let mut got = ForwardState::default();
        for n in 0..READBACK_ATTEMPTS {
            if n > 0 {
                tokio::time::sleep(READBACK_SPACING).await;
            }
            let actions = self.read_actions(r, on_step).await?;
            let snap = ForwardSnapshot::from_actions(&r.arn, r.kind, &actions);
            got = snap.forward.clone().unwrap_or_default();
            let matches = want.same_routing(&got);
            on_step(AlbStep::ReadBack {
                stable_percent,
                snapshot: snap.clone(),
                matches,
            });
            if matches {
                return Ok((actions, snap));
            }
        }
        Err(AlbError::WeightsDidNotTake { expected: want, got })
    }

    /// Runs `op` under the shared retry policy, reporting every failed attempt (with its
    /// code and whether another follows) through `on_step`.
    pub(super) async fn retrying<T, F, Fut>(
        &self,
        operation: &'static str,
        on_step: &mut (dyn FnMut(AlbStep) + Send),
        op: F,
    ) -> Result<T, AlbError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, AlbError>>,
    {
        let mut on_attempt = |a: Attempt| on_step(AlbStep::AttemptFailed(a));
        self.retry.run(operation, &mut on_attempt, op).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_turns_sdk_retries_off_and_fills_timeouts() {
        let client = elbv2::Client::from_conf(
            elbv2::Config::builder()
                .behavior_version(elbv2::config::BehaviorVersion::latest())
                .region(elbv2::config::Region::new("us-east-1"))
                .retry_config(RetryConfig::standard().with_max_attempts(5))
                .timeout_config(TimeoutConfig::builder().connect_timeout(Duration::from_secs(1)).build())
                .build(),
        );
        let exec = AlbExecutor::new(client, &AwsSettings::default());
        let conf = exec.client.config();
        assert_eq!(conf.retry_config().map(|r| r.max_attempts()), Some(1));
        let timeouts = conf.timeout_config().unwrap();
        assert_eq!(timeouts.connect_timeout(), Some(Duration::from_secs(1)));
        assert_eq!(timeouts.operation_attempt_timeout(), Some(ATTEMPT_TIMEOUT));
        assert_eq!(exec.retry.max_attempts, None, "the retry window decides by default");
        assert_eq!(exec.retry.window, crate::action::retry::DEFAULT_WINDOW);
        assert_eq!(exec.retry.initial, Duration::from_millis(200));
    }
}
