use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// A policy with one automatic trigger on `HighErrorRate` firing for 5m (other modules' tests
/// use it too).
pub(crate) const MINIMAL: &str = "name: web
service: web
target:
  alb:
    listener_arn: arn:aws:elasticloadbalancing:us-east-1:1:listener/app/web/1/2
    stable_target_group_arn: arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/web-stable/1
triggers:
  - name: errors
    matchers: ['alertname=\"HighErrorRate\"']
    for: 5m
    mode: auto
";

fn load(text: &str) -> Result<PolicySet, Vec<PolicyError>> {
    PolicySet::from_sources(Path::new("p"), vec![(PathBuf::from("p/web.yaml"), text.to_string())])
}

#[test]
fn minimal_policy_loads_with_defaults() {
    let set = load(MINIMAL).unwrap();
    let p = set.get("web").unwrap();
    assert_eq!(p.guards.cooldown, Duration::from_secs(1800));
    assert_eq!(p.triggers[0].for_, Duration::from_secs(300));
    assert_eq!(set.hash.len(), 16);
}

#[test]
fn unknown_key_is_reported_with_file_and_line() {
    let text = MINIMAL.replace("    for: 5m", "    for: 5m\n    fro: 5m");
    let errs = load(&text).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].line, 11, "{}", errs[0]);
    assert!(errs[0].to_string().starts_with("p/web.yaml:11: "), "{}", errs[0]);
    assert!(errs[0].message.contains("unknown field `fro`"), "{}", errs[0]);
}

#[test]
fn bad_matcher_regex_is_reported_at_its_line() {
    let text = MINIMAL.replace("alertname=\"HighErrorRate\"", "alertname=~\"(\"");
    let errs = load(&text).unwrap_err();
    assert!(errs[0].message.contains("invalid regular expression"), "{}", errs[0]);
    assert_eq!(errs[0].line, 9, "{}", errs[0]);
}

#[test]
fn manual_trigger_without_approval_is_refused_with_the_fix() {
    let errs = load(&MINIMAL.replace("mode: auto", "mode: manual")).unwrap_err();
    assert!(errs[0].message.contains("add approval.approvers"), "{}", errs[0]);
    assert_eq!(errs[0].line, 8);
}

#[test]
fn bad_duration_names_the_line() {
    let errs = load(&MINIMAL.replace("for: 5m", "for: five minutes")).unwrap_err();
    assert_eq!(errs[0].line, 10, "{}", errs[0]);
}

#[test]
fn duplicate_policy_names_across_files_are_refused() {
    let errs = PolicySet::from_sources(
        Path::new("p"),
        vec![
            (PathBuf::from("p/a.yaml"), MINIMAL.to_string()),
            (PathBuf::from("p/b.yaml"), MINIMAL.to_string()),
        ],
    )
    .unwrap_err();
    assert!(
        errs[0]
            .to_string()
            .starts_with("p/b.yaml:1: name: policy \"web\" is already defined in p/a.yaml"),
        "{}",
        errs[0]
    );
}

fn two(a: &str, b: &str) -> Result<PolicySet, Vec<PolicyError>> {
    PolicySet::from_sources(
        Path::new("p"),
        vec![
            (PathBuf::from("p/a.yaml"), a.into()),
            (PathBuf::from("p/b.yaml"), b.into()),
        ],
    )
}

fn policy(name: &str, matchers: &str, triggers: &[(&str, &str)]) -> String {
    let mut s = format!(
            "name: {name}\nservice: s\nmatchers: {matchers}\ntarget: {{alb: {{listener_arn: \"arn:aws:elasticloadbalancing:us-east-1:1:listener/app/x/1/2\", stable_target_group_arn: \"arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/s/1\"}}}}\ntriggers:\n"
        );
    for (t, m) in triggers {
        s.push_str(&format!("  - name: {t}\n    matchers: {m}\n    mode: auto\n"));
    }
    s
}

#[test]
fn a_policy_with_the_same_matchers_as_an_earlier_one_is_warned_about_not_refused() {
    // Issue 20's case: one policy for the listener, a copy for a rule.
    let a = policy(
        "listener",
        r#"['service="portal-api"']"#,
        &[("errors", r#"['alertname="HighErrorRate"']"#)],
    );
    let b = policy(
        "rule",
        r#"['service="portal-api"']"#,
        &[("errors", r#"['alertname="HighErrorRate"']"#)],
    );
    let set = two(&a, &b).expect("warnings do not refuse the set");
    assert_eq!(set.warnings.len(), 1, "{:?}", set.warnings);
    let w = set.warnings[0].to_string();
    assert!(
        w.starts_with("p/b.yaml:1: warning: policy \"rule\" can never match: policy \"listener\" (p/a.yaml)"),
        "{w}"
    );
}

#[test]
fn fewer_matchers_earlier_shadow_too_but_different_or_more_do_not() {
    let wide = policy("wide", r#"['service="a"']"#, &[("e", r#"['alertname="E"']"#)]);
    let narrow = policy(
        "narrow",
        r#"['service="a"', 'env="prod"']"#,
        &[("e", r#"['alertname="E"']"#)],
    );
    // The wide one first takes every alert of the narrow one.
    assert_eq!(two(&wide, &narrow).unwrap().warnings.len(), 1);
    // The narrow one first leaves the wide one the other envs.
    assert!(two(&narrow, &wide).unwrap().warnings.is_empty());
    // A different label value, or a negated one, is another service.
    let other = policy("other", r#"['service="b"']"#, &[("e", r#"['alertname="E"']"#)]);
    assert!(two(&wide, &other).unwrap().warnings.is_empty());
    let not_a = policy("not-a", r#"['service!="a"']"#, &[("e", r#"['alertname="E"']"#)]);
    assert!(two(&wide, &not_a).unwrap().warnings.is_empty());
}

#[test]
fn only_the_shadowed_trigger_is_named_when_the_policy_still_matches_other_alerts() {
    // An alert falls through to the next policy when no trigger of the first matches.
    let a = policy(
        "a",
        r#"['service="s"']"#,
        &[("errors", r#"['alertname="HighErrorRate"']"#)],
    );
    let b = policy(
        "b",
        r#"['service="s"']"#,
        &[
            ("health", r#"['alertname="HealthCheckFailing"']"#),
            ("errors-too", r#"['alertname="HighErrorRate"']"#),
        ],
    );
    let set = two(&a, &b).unwrap();
    assert_eq!(set.warnings.len(), 1, "{:?}", set.warnings);
    let w = set.warnings[0].to_string();
    assert!(
        w.contains("warning: triggers[errors-too] can never match: trigger \"errors\" of policy \"a\""),
        "{w}"
    );
    assert!(w.starts_with("p/b.yaml:9:"), "the trigger's line: {w}");
}

#[test]
fn the_go_cutover_triggers_choose_immediate_or_graceful_for_the_same_target() {
    let set = PolicySet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).expect("shipped");
    let p = set.get("go-cutover").expect("go-cutover");
    let gradual = |trigger: &str| match p.with_trigger_gradual(p.target.clone(), Some(trigger)) {
        Target::Alb(t) => t.gradual.map(|g| g.steps),
        Target::Kubernetes(_) => panic!("an ALB target"),
    };
    // Seed 003 "Immediate Rollback If": one write.
    assert_eq!(gradual("error-rate-above-5pct"), None);
    assert_eq!(gradual("data-integrity"), None);
    // "Graceful Rollback If": back in the seed's own phases (Python at 10 %, 50 %, 100 %).
    assert_eq!(gradual("latency-above-1s"), Some(vec![10, 50, 100]));
    assert_eq!(gradual("memory-leak"), Some(vec![10, 50, 100]));
    // The incident's plan is the target as it was at open (never a trigger's choice baked
    // in): opened by a graceful trigger it is stepwise, promoted to an immediate one the same
    // plan shifts at once.
    let planned = p.target.clone();
    let Target::Alb(t) = p.with_trigger_gradual(planned.clone(), Some("latency-above-1s")) else {
        panic!("an ALB target")
    };
    assert!(t.gradual.is_some());
    let Target::Alb(t) = p.with_trigger_gradual(planned, Some("security-breach")) else {
        panic!("an ALB target")
    };
    assert_eq!(t.gradual, None);
}

#[test]
fn a_trigger_gradual_is_checked_like_the_targets_and_only_for_alb() {
    let with = |gradual: &str| {
        format!(
            "name: p\nservice: s\ntarget: {{alb: {{listener_arn: \"arn:aws:elasticloadbalancing:us-east-1:1:listener/app/x/1/2\", stable_target_group_arn: \"arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/s/1\"}}}}\ntriggers:\n  - name: slow\n    matchers: ['alertname=\"A\"']\n    mode: auto\n    gradual: {gradual}\n"
        )
    };
    assert!(load(&with("none")).is_ok());
    assert!(load(&with("{steps: [50, 100], interval: 30s}")).is_ok());
    let errs = load(&with("{steps: [50], interval: 30s}")).unwrap_err();
    assert!(
        errs[0].message.contains("triggers[slow].gradual.steps ends at 50"),
        "{errs:?}"
    );
    let errs = load(&with("sometimes")).unwrap_err();
    assert!(errs[0].message.contains("`none` or {steps"), "{errs:?}");
    let kube = "name: k\nservice: s\ntarget: {kubernetes: {namespace: n, steps: [{scale: {deployment: d, replicas: 0}}]}}\ntriggers:\n  - name: slow\n    matchers: ['alertname=\"A\"']\n    mode: auto\n    gradual: none\n";
    let errs = load(kube).unwrap_err();
    assert!(
        errs[0]
            .message
            .contains("triggers[slow].gradual only applies to an ALB target"),
        "{errs:?}"
    );
}

#[test]
fn shipped_policies_have_no_warnings() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let set = PolicySet::load_dir(&dir).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
}

#[test]
fn shipped_policies_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let set = PolicySet::load_dir(&dir).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(set.get("portal-api").is_some());
}

/// A Kubernetes policy whose steps are `steps` (YAML list items, one per line).
fn kube_policy(steps: &[&str]) -> String {
    let steps: Vec<String> = steps.iter().map(|s| format!("      - {s}\n")).collect();
    format!(
        "name: web
service: web
target:
  kubernetes:
    namespace: portal
    steps:
{}triggers:
  - name: errors
    matchers: ['alertname=\"HighErrorRate\"']
    for: 5m
    mode: auto
",
        steps.concat()
    )
}

const SWITCH: &str = "switch_service: {service: web, selector: {app: web, version: v1}}";
const SCALE: &str = "scale: {deployment: web-canary, replicas: 0}";

#[test]
fn a_check_between_kubernetes_steps_loads_and_is_described_in_order() {
    let check = "check: {http: {url: 'https://web.example.com/health', expect_status: 2xx, successes: 3, interval: 2s, timeout: 60s}}";
    let set = load(&kube_policy(&[SWITCH, check, SCALE])).unwrap_or_else(|e| panic!("{e:?}"));
    let p = set.get("web").unwrap();
    assert_eq!(
        p.target.describe(),
        "in namespace portal: switch service/web selector to app=web,version=v1, then check that GET \
         https://web.example.com/health answers 2xx 3 time(s) in a row (every 2s, within 1m), then scale \
         deployment/web-canary to 0"
    );
    // A check changes nothing: the target's identity is the objects it writes.
    assert_eq!(p.target.key(), "k8s:portal/svc/web,deploy/web-canary");
    // A check first is allowed (verify before touching anything).
    assert!(load(&kube_policy(&[check, SWITCH])).is_ok());
}

#[test]
fn bad_kubernetes_checks_are_refused_at_their_step_line_naming_the_key() {
    let bad = |check: &str| -> PolicyError {
        let errs = load(&kube_policy(&[SWITCH, check, SCALE])).expect_err(check);
        assert_eq!(errs.len(), 1, "{errs:?}");
        errs[0].clone()
    };
    // Lines: 7 switch, 8 check, 9 scale.
    let e = bad("check: {http: {url: 'web.example.com/health'}}");
    assert_eq!(e.line, 8, "{e}");
    assert!(
        e.message
            .starts_with("target.kubernetes.steps[1].check.http.url: \"web.example.com/health\" is not an http"),
        "{e}"
    );
    let e = bad("check: {http: {url: 'http://web/health', successes: 0}}");
    assert_eq!(
        (e.line, e.message.as_str()),
        (8, "target.kubernetes.steps[1].check.http.successes: at least 1")
    );
    let e = bad("check: {http: {url: 'http://web/health', timeout: 1h}}");
    assert_eq!(e.line, 8, "{e}");
    assert!(
        e.message
            .contains("check.http.timeout: 1h is out of range; use 1s to 10m"),
        "{e}"
    );
    // serde's own errors (a bad status, a misspelt key) carry their line too.
    let e = bad("check: {http: {url: 'http://web/health', expect_status: 2yy}}");
    assert_eq!(e.line, 8, "{e}");
    assert!(
        e.message.contains("use a code such as 200 or a class such as 2xx"),
        "{e}"
    );
    let e = bad("check: {http: {url: 'http://web/health', sucesses: 2}}");
    assert_eq!(e.line, 8, "{e}");
    assert!(e.message.contains("unknown field `sucesses`"), "{e}");
    let e = bad("check: {tcp: {host: web}}");
    assert!(e.message.contains("unknown variant `tcp`"), "{e}");

    // A check as the only step reverts nothing.
    let errs = load(&kube_policy(&["check: {http: {url: 'http://web/health'}}"])).unwrap_err();
    assert!(
        errs[0]
            .message
            .starts_with("target.kubernetes.steps: a check writes nothing"),
        "{}",
        errs[0]
    );
    // Three 10-minute checks exceed the 30-minute bound of one action.
    let ten = "check: {http: {url: 'http://web/health', timeout: 10m}}";
    let errs = load(&kube_policy(&[ten, SWITCH, ten, SCALE, ten, ten])).unwrap_err();
    assert!(
        errs[0].message.contains("the checks' timeouts add up to more than 30m"),
        "{}",
        errs[0]
    );
    assert!(load(&kube_policy(&[ten, SWITCH, ten, SCALE, ten])).is_ok());
}

#[test]
fn a_listener_scope_policy_and_another_alb_policy_on_the_same_listener_are_refused() {
    let rule = "arn:aws:elasticloadbalancing:us-east-1:1:listener-rule/app/x/1/2/9";
    let with_target = |name: &str, extra: &str| {
        policy(name, r#"['service="s"']"#, &[("errors", r#"['alertname="E"']"#)])
            .replace("targetgroup/s/1\"}}", &format!("targetgroup/s/1\"{extra}}}}}"))
    };
    let listener = with_target("whole", ", scope: listener");
    let one_rule = with_target("api", &format!(", rule_arn: \"{rule}\""));
    assert!(listener.contains("scope: listener}}"), "{listener}");
    let errs = two(&listener, &one_rule).unwrap_err();
    let e = errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
    assert!(
        e.contains("p/b.yaml") && e.contains("p/a.yaml") && e.contains("scope: listener") && e.contains("\"whole\""),
        "{e}"
    );
    // Either order.
    assert!(two(&one_rule, &listener).is_err());
    // Without scope: listener, a listener policy and a rule policy have their own resources.
    let default_action = with_target("default", "");
    assert!(two(&default_action, &one_rule).is_ok());
    // Same key (the listener) twice: one cooldown, one incident at a time; allowed.
    assert!(two(&listener, &with_target("whole-too", ", scope: listener")).is_ok());
}

#[test]
fn without_a_trigger_choice_the_planned_targets_own_gradual_is_kept_not_the_live_policys() {
    let p = load(MINIMAL).unwrap().get("web").unwrap().clone();
    let Target::Alb(live) = &p.target else {
        panic!("an ALB target")
    };
    assert_eq!(live.gradual, None, "the live policy shifts at once");
    // The plan frozen when the incident opened was stepwise (the policy was edited since).
    let frozen = super::target::alb::GradualShift {
        steps: vec![50, 100],
        interval: Duration::from_secs(60),
    };
    let planned = Target::Alb(super::target::alb::AlbTarget {
        gradual: Some(frozen.clone()),
        ..live.clone()
    });
    for trigger in [Some("errors"), Some("gone"), None] {
        let Target::Alb(t) = p.with_trigger_gradual(planned.clone(), trigger) else {
            panic!("an ALB target")
        };
        assert_eq!(t.gradual, Some(frozen.clone()), "trigger {trigger:?}");
    }
}
