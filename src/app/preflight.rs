//! Can this responder carry out every policy it loads? Outside dry run, a policy whose
//! executor is not configured (no `aws:` for an ALB target, no `kubernetes:` for a Kubernetes
//! one) would turn each of its rollbacks into a mere record while people are told a rollback
//! is under way. So such a set refuses start-up (`serve` exits with the config exit code) and
//! is refused by a reload like a set with errors (the set in force stays; `/readyz` and
//! `policy_reloads_total{result="refused"}` say so).
//!
//! Runs after the policies load and the executors are built, before the server binds; the
//! reload path runs it on every new set.

use crate::action::{Executors, Target};
use crate::policy::PolicySet;

/// Policies that could not be carried out here: one line per policy, naming its file, the
/// target kind, and the two fixes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("refusing to start: {}", .0.join("\n"))]
pub struct Unexecutable(pub Vec<String>);

/// Checks `set` against the executors configured here. `dry_run` is `safety.dry_run`: then
/// nothing is ever executed and any set passes; a policy with `guards.dry_run` passes too.
pub fn check(set: &PolicySet, executors: &Executors, dry_run: bool) -> Result<(), Unexecutable> {
    if dry_run {
        return Ok(());
    }
    let problems: Vec<String> = set
        .policies
        .iter()
        .filter(|p| !p.policy.guards.dry_run && !executors.can_execute(&p.policy.target))
        .map(|p| {
            let (what, section) = match p.policy.target {
                Target::Alb(_) => ("an ALB", "aws"),
                Target::Kubernetes(_) => ("a Kubernetes", "kubernetes"),
            };
            format!(
                "{}: policy {:?} reverts {what} target, but the config has no `{section}:` settings, so its \
                 rollbacks could not be carried out; add `{section}:` settings to the config, or set dry run \
                 (`safety.dry_run: true`, or `guards.dry_run: true` in this policy)",
                p.file.display(),
                p.policy.name
            )
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Unexecutable(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(files: &[(&str, &str)]) -> PolicySet {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        PolicySet::load_dir(dir.path()).unwrap()
    }

    const ALB: &str = r#"
name: web
service: web
target:
  alb:
    listener_arn: arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/web/1/2
    stable_target_group_arn: arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web-stable/1
triggers:
  - {name: errors, matchers: ['alertname="HighErrorRate"'], mode: auto}
"#;

    const KUBE: &str = r#"
name: api
service: api
target:
  kubernetes:
    namespace: portal
    steps:
      - rollout_undo: {deployment: api}
triggers:
  - {name: errors, matchers: ['alertname="HighErrorRate"'], mode: auto}
"#;

    #[test]
    fn a_policy_without_its_executor_outside_dry_run_is_refused_naming_file_kind_and_fix() {
        let s = set(&[("a-web.yaml", ALB), ("b-api.yaml", KUBE)]);
        let err = check(&s, &Executors::default(), false).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(
            err.0[0].contains("a-web.yaml: policy \"web\" reverts an ALB target"),
            "{err}"
        );
        assert!(err.0[0].contains("add `aws:` settings"), "{err}");
        assert!(err.0[0].contains("safety.dry_run: true"), "{err}");
        assert!(
            err.0[1].contains("b-api.yaml: policy \"api\" reverts a Kubernetes target"),
            "{err}"
        );
        assert!(err.0[1].contains("add `kubernetes:` settings"), "{err}");
        assert!(err.to_string().starts_with("refusing to start: "), "{err}");
    }

    #[test]
    fn dry_run_globally_or_in_the_policy_needs_no_executor() {
        let s = set(&[("web.yaml", ALB)]);
        assert_eq!(check(&s, &Executors::default(), true), Ok(()));
        let per_policy = format!("{ALB}guards: {{dry_run: true}}\n");
        let s = set(&[("web.yaml", &per_policy)]);
        assert_eq!(check(&s, &Executors::default(), false), Ok(()));
        // One policy in dry run does not excuse another.
        let s = set(&[("web.yaml", &per_policy), ("api.yaml", KUBE)]);
        let err = check(&s, &Executors::default(), false).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(err.0[0].contains("policy \"api\""), "{err}");
    }
}
