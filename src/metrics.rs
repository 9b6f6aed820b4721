//! The service's own metrics, exposed at `GET /metrics` in Prometheus text format with the
//! `rollback_responder_` prefix. prometheus-client does the exposition.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Labels, their values escaped as the exposition formats require: prometheus-client writes
/// label values as they are, so a value holding `"`, `\` or a newline (a policy name is free
/// text) would otherwise end the value early and break every scrape that follows.
fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), escape_label_value(v)))
        .collect()
}

fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Every metric the service exports.
pub struct Metrics {
    registry: Registry,
    notifications: Family<Labels, Counter>,
    alerts: Family<Labels, Counter>,
    duplicates: Counter,
    decisions: Family<Labels, Counter>,
    actions: Family<Labels, Counter>,
    action_duration: Family<Labels, Histogram>,
    alert_to_action: Histogram,
    store_errors: Counter,
    panics: Family<Labels, Counter>,
    frozen: Family<Labels, Gauge>,
    /// The policy scopes `frozen` has shown, so one no longer frozen is shown as 0.
    frozen_scopes: std::sync::Mutex<std::collections::BTreeSet<String>>,
    outbox_depth: Family<Labels, Gauge>,
    outbox_failures: Family<Labels, Counter>,
    action_to_verified: Histogram,
    incidents_open: Gauge,
    approvals_pending: Gauge,
    policy_reloads: Family<Labels, Counter>,
    policy_refused: Gauge,
    leases_lost: Counter,
    unclaimable: Gauge,
    /// The decision counters made so far, by outcome and then policy: a storm counts a
    /// decision per alert, and building the label set and finding it in the family each time
    /// cost a twentieth of deciding the alert. A counter and its copy here count together.
    /// Bounded by outcomes times policy names.
    decision_counters: std::sync::Mutex<foldhash::HashMap<String, foldhash::HashMap<String, Counter>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("rollback_responder");
        let notifications = Family::<Labels, Counter>::default();
        registry.register(
            "notifications_received",
            "Alertmanager webhook deliveries accepted, by status",
            notifications.clone(),
        );
        let alerts = Family::<Labels, Counter>::default();
        registry.register(
            "alerts_received",
            "Alerts received in webhook deliveries, by status",
            alerts.clone(),
        );
        let duplicates = Counter::default();
        registry.register(
            "alerts_duplicate",
            "Alerts received again in a state already stored (absorbed)",
            duplicates.clone(),
        );
        let decisions = Family::<Labels, Counter>::default();
        registry.register("decisions", "Decisions made, by outcome and policy", decisions.clone());
        let actions = Family::<Labels, Counter>::default();
        registry.register("actions", "Rollback actions, by kind and result", actions.clone());
        let action_duration =
            Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 14)));
        registry.register(
            "action_duration_seconds",
            "How long rollback actions took, by kind",
            action_duration.clone(),
        );
        let alert_to_action = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register(
            "alert_to_action_seconds",
            "From the alert's startsAt to the rollback's change",
            alert_to_action.clone(),
        );
        let store_errors = Counter::default();
        registry.register("store_errors", "Store operations that failed", store_errors.clone());
        let panics = Family::<Labels, Counter>::default();
        registry.register(
            "panics",
            "Panics caught (a request answered 500, a loop iteration or a task abandoned), by where",
            panics.clone(),
        );
        let frozen = Family::<Labels, Gauge>::default();
        registry.register(
            "frozen",
            "1 while automatic rollbacks are frozen, by scope",
            frozen.clone(),
        );
        let outbox_depth = Family::<Labels, Gauge>::default();
        registry.register(
            "outbox_depth",
            "Notifications waiting for delivery, by channel",
            outbox_depth.clone(),
        );
        let outbox_failures = Family::<Labels, Counter>::default();
        registry.register(
            "outbox_delivery_failures",
            "Failed notification delivery attempts, by channel",
            outbox_failures.clone(),
        );
        let action_to_verified = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register(
            "action_to_verified_seconds",
            "From the rollback's change to its verification",
            action_to_verified.clone(),
        );
        let incidents_open = Gauge::default();
        registry.register(
            "incidents_open",
            "Incidents not closed yet (shared store)",
            incidents_open.clone(),
        );
        let approvals_pending = Gauge::default();
        registry.register(
            "approvals_pending",
            "Incidents waiting for a human's approval (shared store)",
            approvals_pending.clone(),
        );
        let policy_reloads = Family::<Labels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reloads (SIGHUP, file change), by result: applied, unchanged, refused (the set in force stays)",
            policy_reloads.clone(),
        );
        // Every series whose labels are known up front exists at zero before its first use, so
        // dashboards and `increase()` see 0 rather than "No data".
        let policy_refused = Gauge::default();
        registry.register(
            "policy_files_refused",
            "1 while the policy files on disk were refused at the last reload (an older set is in force)",
            policy_refused.clone(),
        );
        let leases_lost = Counter::default();
        registry.register(
            "leases_lost",
            "Work this replica stopped because its lease on the incident ran out or another replica took it",
            leases_lost.clone(),
        );
        let unclaimable = Gauge::default();
        registry.register(
            "work_unclaimable",
            "Incidents with work in flight that this replica leaves to others: decided for a real run it cannot \
             make here (dry run, or no executor for the target)",
            unclaimable.clone(),
        );
        for result in ["applied", "unchanged", "refused"] {
            let _ = policy_reloads.get_or_create(&l(&[("result", result)]));
        }
        for status in ["firing", "resolved"] {
            let _ = notifications.get_or_create(&l(&[("status", status)]));
            let _ = alerts.get_or_create(&l(&[("status", status)]));
        }
        for kind in ["alb", "kubernetes"] {
            for result in ["changed", "no_op", "dry_run", "failed"] {
                let _ = actions.get_or_create(&l(&[("kind", kind), ("result", result)]));
            }
            let _ = action_duration.get_or_create(&l(&[("kind", kind)]));
        }
        for channel in ["slack", "pagerduty", "statuspage"] {
            let _ = outbox_failures.get_or_create(&l(&[("channel", channel)]));
        }
        let _ = frozen.get_or_create(&l(&[("scope", "*")]));
        Metrics {
            leases_lost,
            unclaimable,
            policy_reloads,
            policy_refused,
            incidents_open,
            approvals_pending,
            registry,
            notifications,
            alerts,
            duplicates,
            decisions,
            actions,
            action_duration,
            alert_to_action,
            store_errors,
            panics,
            frozen,
            frozen_scopes: Default::default(),
            outbox_depth,
            outbox_failures,
            action_to_verified,
            decision_counters: Default::default(),
        }
    }

    /// A webhook delivery with its alerts.
    pub fn notification(&self, status: &str, firing: u64, resolved: u64, duplicates: u64) {
        self.notifications.get_or_create(&l(&[("status", status)])).inc();
        self.alerts.get_or_create(&l(&[("status", "firing")])).inc_by(firing);
        self.alerts
            .get_or_create(&l(&[("status", "resolved")]))
            .inc_by(resolved);
        self.duplicates.inc_by(duplicates);
    }

    /// A decision.
    pub fn decision(&self, outcome: &str, policy: &str) {
        let mut kept = self.decision_counters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(counter) = kept.get(outcome).and_then(|by_policy| by_policy.get(policy)) {
            counter.inc();
            return;
        }
        let counter = self
            .decisions
            .get_or_create(&l(&[("outcome", outcome), ("policy", policy)]))
            .clone();
        counter.inc();
        kept.entry(outcome.to_string())
            .or_default()
            .insert(policy.to_string(), counter);
    }

    /// An action's result and duration.
    pub fn action(&self, kind: &str, result: &str, seconds: f64) {
        self.actions
            .get_or_create(&l(&[("kind", kind), ("result", result)]))
            .inc();
        self.action_duration
            .get_or_create(&l(&[("kind", kind)]))
            .observe(seconds);
    }

    /// Time from alert start to a real change.
    pub fn alert_to_action(&self, seconds: f64) {
        self.alert_to_action.observe(seconds);
    }

    /// A failed store operation.
    pub fn store_error(&self) {
        self.store_errors.inc();
    }

    /// A panic caught in a request handler (`http`) or a background loop (`worker`).
    pub fn panic(&self, place: &str) {
        self.panics.get_or_create(&l(&[("where", place)])).inc();
    }

    /// The freezes in force, read from the store (and the config) at scrape time: a freeze set
    /// on another replica, or one whose end has passed, shows as it is. A scope shown before
    /// and no longer frozen goes to 0; `*` is always shown.
    pub fn set_freezes(&self, freezes: &crate::policy::FreezeState, now: chrono::DateTime<chrono::Utc>) {
        let live = |f: &crate::policy::Freeze| f.until.is_none_or(|u| u > now);
        let mut shown = self.frozen_scopes.lock().unwrap_or_else(|p| p.into_inner());
        let on: std::collections::BTreeSet<&str> = freezes
            .policies
            .iter()
            .filter(|(_, f)| live(f))
            .map(|(p, _)| p.as_str())
            .collect();
        for scope in shown.iter().filter(|s| !on.contains(s.as_str())) {
            self.frozen.get_or_create(&l(&[("scope", scope)])).set(0);
        }
        for scope in &on {
            self.frozen.get_or_create(&l(&[("scope", scope)])).set(1);
            shown.insert(scope.to_string());
        }
        let global = freezes.global.as_ref().is_some_and(live);
        self.frozen.get_or_create(&l(&[("scope", "*")])).set(i64::from(global));
    }

    /// Notifications waiting per channel.
    pub fn set_outbox_depth(&self, channel: &str, n: i64) {
        self.outbox_depth.get_or_create(&l(&[("channel", channel)])).set(n);
    }

    /// A failed delivery attempt.
    pub fn outbox_failure(&self, channel: &str) {
        self.outbox_failures.get_or_create(&l(&[("channel", channel)])).inc();
    }

    /// Time from a real change to its verification.
    pub fn action_to_verified(&self, seconds: f64) {
        self.action_to_verified.observe(seconds);
    }

    /// Open incidents and pending approvals, read from the store at scrape time.
    pub fn set_incident_gauges(&self, open: i64, pending: i64) {
        self.incidents_open.set(open);
        self.approvals_pending.set(pending);
    }

    /// Work stopped because its lease was lost.
    pub fn lease_lost(&self) {
        self.leases_lost.inc();
    }

    /// How many incidents this replica currently leaves because it cannot run them.
    pub fn set_unclaimable(&self, n: usize) {
        self.unclaimable.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A policy reload and how it ended (`applied`, `unchanged`, `refused`).
    pub fn policy_reload(&self, result: &str) {
        self.policy_reloads.get_or_create(&l(&[("result", result)])).inc();
        self.policy_refused.set(i64::from(result == "refused"));
    }

    /// Decisions per outcome for these policies exist at zero (called when a set is loaded).
    pub fn known_policies<'a>(&self, names: impl Iterator<Item = &'a str>) {
        for policy in names {
            for outcome in ["auto", "manual", "escalate_later", "suppressed"] {
                let _ = self
                    .decisions
                    .get_or_create(&l(&[("outcome", outcome), ("policy", policy)]));
            }
        }
    }

    /// The exposition a scraper asked for: OpenMetrics when its `Accept` names it (Prometheus
    /// does), else the Prometheus text format 0.0.4 (curl, `promtool check metrics`).
    pub fn render_for(&self, accept: Option<&str>) -> (&'static str, String) {
        let open_metrics = self.render();
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            (OPENMETRICS, open_metrics)
        } else {
            (TEXT_FORMAT, text_format(&open_metrics))
        }
    }

    /// The OpenMetrics exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Content type of the OpenMetrics exposition.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text format.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics to the Prometheus text format: a counter family's HELP and TYPE name its
/// `_total` samples, and there is no `# EOF`.
fn text_format(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|r| r.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 64 * counters.len());
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_counters_by_their_samples_and_has_no_eof() {
        let m = Metrics::new();
        m.store_error();
        let (ct, text) = m.render_for(Some("*/*"));
        assert_eq!(ct, TEXT_FORMAT);
        assert!(text.contains("# HELP rollback_responder_store_errors_total Store operations that failed."));
        assert!(text.contains(
            "# TYPE rollback_responder_store_errors_total counter\nrollback_responder_store_errors_total 1\n"
        ));
        assert!(text.contains("# TYPE rollback_responder_outbox_depth gauge"));
        assert!(!text.contains("# EOF"));
        let (ct, om) = m.render_for(Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"));
        assert_eq!(ct, OPENMETRICS);
        assert!(om.ends_with("# EOF\n") && om.contains("# TYPE rollback_responder_store_errors counter"));
    }

    /// The freeze gauge shows what is in force when asked, not what was set: a freeze whose
    /// end has passed shows 0, a scope no longer frozen goes to 0, and a label value with a
    /// quote, a backslash or a newline is escaped (prometheus-client writes values as they
    /// are: unescaped, one such value broke every scrape after it).
    #[test]
    fn frozen_shows_the_freezes_in_force_with_their_scopes_escaped() {
        use crate::policy::{Freeze, FreezeState};
        let m = Metrics::new();
        let now = chrono::Utc::now();
        let freeze = |until: Option<chrono::DateTime<chrono::Utc>>| Freeze {
            reason: "r".into(),
            by: "b".into(),
            until,
        };
        let hostile = "x\"} 1\nfoo\\";
        let mut f = FreezeState {
            global: Some(freeze(Some(now - chrono::Duration::seconds(1)))),
            ..Default::default()
        };
        f.policies.insert(hostile.into(), freeze(None));
        f.policies
            .insert("checkout".into(), freeze(Some(now + chrono::Duration::hours(1))));
        m.set_freezes(&f, now);
        let (_, text) = m.render_for(None);
        assert!(text.contains("rollback_responder_frozen{scope=\"*\"} 0\n"), "{text}");
        assert!(
            text.contains("rollback_responder_frozen{scope=\"checkout\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("rollback_responder_frozen{scope=\"x\\\"} 1\\nfoo\\\\\"} 1\n"),
            "{text}"
        );
        assert!(!text.lines().any(|l| l.starts_with("foo")), "{text}");
        f.policies.remove("checkout");
        f.global = Some(freeze(None));
        m.set_freezes(&f, now);
        let (_, text) = m.render_for(None);
        assert!(text.contains("rollback_responder_frozen{scope=\"*\"} 1\n"), "{text}");
        assert!(
            text.contains("rollback_responder_frozen{scope=\"checkout\"} 0\n"),
            "{text}"
        );
    }

    /// Decisions counted through the kept counters land in the exported family, each label
    /// set on its own.
    #[test]
    fn decisions_are_counted_per_outcome_and_policy() {
        let m = Metrics::new();
        for _ in 0..3 {
            m.decision("auto", "checkout");
        }
        m.decision("auto", "portal");
        m.decision("needs_approval", "checkout");
        let (_, text) = m.render_for(Some("*/*"));
        for line in [
            "rollback_responder_decisions_total{outcome=\"auto\",policy=\"checkout\"} 3",
            "rollback_responder_decisions_total{outcome=\"auto\",policy=\"portal\"} 1",
            "rollback_responder_decisions_total{outcome=\"needs_approval\",policy=\"checkout\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
