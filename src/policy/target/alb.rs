//! The ALB target of a policy file: which listener (default action) or rule to revert, the
//! stable target group, stickiness, the health floor and an optional gradual shift.
//!
//! Plain data with its validation, read by `policy` when the files load; the executor in
//! `action::alb` carries it out. Nothing here does I/O.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest wait we accept between two gradual steps; longer looks like a unit typo.
const MAX_GRADUAL_INTERVAL: Duration = Duration::from_secs(3600);
/// More steps than this is not a rollback any more but a slow rollout.
const MAX_GRADUAL_STEPS: usize = 20;

/// What to do with the forward action's target-group stickiness when reverting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stickiness {
    /// Write the stickiness config back as read (omitting it would reset it to disabled).
    #[default]
    Keep,
    /// Write `enabled = false` so sticky clients stop being pinned to the canary.
    Disable,
}

/// Shift traffic back in steps: stable share percentages, waiting `interval` between them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GradualShift {
    /// Stable share in percent per step, strictly increasing, ending at 100.
    pub steps: Vec<u8>,
    /// Wait between two steps (humantime, e.g. "30s").
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl GradualShift {
    /// Checks the steps and interval; the message names the field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        let Some(&last) = self.steps.last() else {
            return Err("gradual.steps is empty: list stable percentages ending at 100, e.g. [50, 100]".into());
        };
        if self.steps.len() > MAX_GRADUAL_STEPS {
            return Err(format!(
                "gradual.steps has {} entries; use at most {MAX_GRADUAL_STEPS}",
                self.steps.len()
            ));
        }
        if let Some(bad) = self.steps.iter().find(|&&p| p == 0 || p > 100) {
            return Err(format!(
                "gradual.steps contains {bad}: every step is a stable percentage from 1 to 100"
            ));
        }
        if let Some(w) = self.steps.windows(2).find(|w| w[0] >= w[1]) {
            return Err(format!(
                "gradual.steps must be strictly increasing, but {} is followed by {}",
                w[0], w[1]
            ));
        }
        if last != 100 {
            return Err(format!(
                "gradual.steps ends at {last}: the last step must be 100 so the revert completes"
            ));
        }
        if self.interval.is_zero() {
            return Err("gradual.interval is 0: set a wait between steps, e.g. \"30s\"".into());
        }
        if self.interval > MAX_GRADUAL_INTERVAL {
            return Err(format!(
                "gradual.interval is {}; use at most 1h",
                humantime_serde::re::humantime::format_duration(self.interval)
            ));
        }
        Ok(())
    }
}

/// A trigger's own choice between an immediate and a stepwise revert (seed 003 has both for
/// the same traffic): `gradual: none`, or `gradual: {steps: [...], interval: ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GradualChoice {
    /// One write, whatever the target says.
    None,
    /// These steps, whatever the target says.
    Shift(GradualShift),
}

impl GradualChoice {
    /// The shift to use: `None` for an immediate revert.
    pub fn shift(&self) -> Option<&GradualShift> {
        match self {
            GradualChoice::None => None,
            GradualChoice::Shift(g) => Some(g),
        }
    }
}

impl Serialize for GradualChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            GradualChoice::None => s.serialize_str("none"),
            GradualChoice::Shift(g) => g.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for GradualChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, MapAccess, Visitor};
        struct Choice;
        impl<'de> Visitor<'de> for Choice {
            type Value = GradualChoice;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`none` or {steps: [stable percentages ending at 100], interval: DURATION}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<GradualChoice, E> {
                match v {
                    "none" => Ok(GradualChoice::None),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<GradualChoice, A::Error> {
                GradualShift::deserialize(de::value::MapAccessDeserializer::new(map)).map(GradualChoice::Shift)
            }
        }
        d.deserialize_any(Choice)
    }
}

fn default_min_healthy_targets() -> u32 {
    1
}

/// Which forwards of the listener a revert rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One action list: the listener's default action, or `rule_arn`'s rule.
    #[default]
    One,
    /// Every forward on the listener that sends traffic to a canary group: the default action
    /// and each rule found at run time (DescribeRules), each pre-checked, written and read back.
    Listener,
}

/// The ALB listener (default action) or listener rule to revert, as written in a policy file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlbTarget {
    /// Listener whose default action (or whose rule) carries the weighted forward.
    pub listener_arn: String,
    /// `None`: revert the listener's default action; `Some`: revert this (non-default) rule.
    #[serde(default)]
    pub rule_arn: Option<String>,
    /// Target group that receives all traffic after the revert.
    pub stable_target_group_arn: String,
    /// Keep or disable target-group stickiness on the forward action.
    #[serde(default)]
    pub stickiness: Stickiness,
    /// Healthy targets the stable group needs before we shift traffic onto it.
    #[serde(default = "default_min_healthy_targets")]
    pub min_healthy_targets: u32,
    /// Optional stepwise shift instead of one write.
    #[serde(default)]
    pub gradual: Option<GradualShift>,
    /// `one` (default): the default action or `rule_arn`; `listener`: every forward to a canary.
    #[serde(default)]
    pub scope: Scope,
    /// The canary groups for `scope: listener`; empty: every group other than the stable one
    /// that shares a forward with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub canary_target_group_arns: Vec<String>,
}

impl AlbTarget {
    /// Checks ARNs, rule/listener consistency, min_healthy_targets and gradual steps.
    pub fn validate(&self) -> Result<(), String> {
        let (listener_prefix, listener_path) = check_arn("listener_arn", &self.listener_arn, ":listener/")?;
        if let Some(rule_arn) = &self.rule_arn {
            let (rule_prefix, rule_path) = check_arn("rule_arn", rule_arn, ":listener-rule/")?;
            // A rule ARN is the listener ARN's path plus one more segment; checking this
            // catches a rule copied from another listener before we touch anything.
            let belongs = rule_prefix == listener_prefix
                && rule_path
                    .strip_prefix(listener_path)
                    .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1);
            if !belongs {
                return Err(format!(
                    "rule_arn {rule_arn} does not belong to listener_arn {}: take both from the same listener \
                     (aws elbv2 describe-rules --listener-arn <listener_arn>)",
                    self.listener_arn
                ));
            }
        }
        check_arn(
            "stable_target_group_arn",
            &self.stable_target_group_arn,
            ":targetgroup/",
        )?;
        if self.min_healthy_targets == 0 {
            return Err(
                "min_healthy_targets is 0: set at least 1, shifting traffic onto a group \
                 without healthy targets would drop it"
                    .into(),
            );
        }
        if let Some(g) = &self.gradual {
            g.validate()?;
        }
        self.validate_scope()
    }

    fn validate_scope(&self) -> Result<(), String> {
        match self.scope {
            Scope::Listener if self.rule_arn.is_some() => {
                return Err(
                    "scope: listener reverts every forward on the listener, so rule_arn must not be set: \
                     remove rule_arn, or remove scope to revert only that rule"
                        .into(),
                )
            }
            Scope::One if !self.canary_target_group_arns.is_empty() => {
                return Err(
                    "canary_target_group_arns is only used with scope: listener: add scope: listener, \
                     or remove canary_target_group_arns"
                        .into(),
                )
            }
            _ => {}
        }
        for arn in &self.canary_target_group_arns {
            check_arn("canary_target_group_arns", arn, ":targetgroup/")?;
            if *arn == self.stable_target_group_arn {
                return Err(format!(
                    "canary_target_group_arns lists the stable target group {arn}: list only the groups to take traffic from"
                ));
            }
        }
        Ok(())
    }

    /// Stable identity of what this target changes: `alb:<rule arn or listener arn>`.
    pub fn key(&self) -> String {
        format!("alb:{}", self.resource_arn())
    }

    /// The ARN whose action list is rewritten: the rule if set, else the listener.
    pub fn resource_arn(&self) -> &str {
        self.rule_arn.as_deref().unwrap_or(&self.listener_arn)
    }
}

/// Splits `arn` at `marker` after basic shape checks; returns (prefix, path after marker).
fn check_arn<'a>(field: &str, arn: &'a str, marker: &str) -> Result<(&'a str, &'a str), String> {
    let kind = marker.trim_matches(|c| c == ':' || c == '/');
    if arn.is_empty() {
        return Err(format!("{field} is empty: set the {kind} ARN"));
    }
    if arn.chars().any(char::is_whitespace) {
        return Err(format!("{field} contains whitespace: {arn:?}"));
    }
    if !arn.starts_with("arn:") || !arn.contains(":elasticloadbalancing:") {
        return Err(format!(
            "{field} {arn:?} is not an ELBv2 ARN (expected arn:<partition>:elasticloadbalancing:<region>:<account>:{kind}/...)"
        ));
    }
    match arn.split_once(marker) {
        Some((prefix, path)) if !path.is_empty() => Ok((prefix, path)),
        _ => Err(format!("{field} {arn:?} is not a {kind} ARN (expected ...:{kind}/...)")),
    }
}

/// A listener-default-action target and its ARNs, for unit tests here and in `action::alb`.
#[cfg(test)]
pub(crate) mod example {
    use super::*;

    pub const LISTENER: &str =
        "arn:aws:elasticloadbalancing:us-east-1:123456789012:listener/app/lb/50dc6c495c0c9188/f2f7dc8efc522ab2";
    pub const RULE: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:listener-rule/app/lb/50dc6c495c0c9188/f2f7dc8efc522ab2/9683b2d02a6cabee";
    pub const STABLE: &str = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/stable/73e2d6bc24d8a067";

    pub fn target() -> AlbTarget {
        AlbTarget {
            listener_arn: LISTENER.into(),
            rule_arn: None,
            stable_target_group_arn: STABLE.into(),
            stickiness: Stickiness::Keep,
            min_healthy_targets: 1,
            gradual: None,
            scope: Scope::One,
            canary_target_group_arns: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::example::{target, LISTENER, RULE, STABLE};
    use super::*;

    #[test]
    fn a_gradual_choice_is_none_or_steps_and_anything_else_is_refused() {
        let none: GradualChoice = serde_norway::from_str("none").unwrap();
        assert_eq!(none, GradualChoice::None);
        assert_eq!(none.shift(), None);
        let steps: GradualChoice = serde_norway::from_str("{steps: [50, 100], interval: 30s}").unwrap();
        assert_eq!(steps.shift().map(|g| g.steps.clone()), Some(vec![50, 100]));
        assert_eq!(serde_json::to_value(&none).unwrap(), serde_json::json!("none"));
        let err = serde_norway::from_str::<GradualChoice>("immediate")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`none` or {steps"), "{err}");
        assert!(serde_norway::from_str::<GradualChoice>("{steps: [100], interval: 1s, extra: 1}").is_err());
    }

    #[test]
    fn listener_scope_validation_names_the_conflicting_field() {
        let listener = AlbTarget {
            scope: Scope::Listener,
            ..target()
        };
        assert_eq!(listener.validate(), Ok(()));
        assert_eq!(listener.key(), format!("alb:{LISTENER}"));
        let with_rule = AlbTarget {
            rule_arn: Some(RULE.into()),
            ..listener.clone()
        };
        assert!(with_rule.validate().unwrap_err().contains("rule_arn must not be set"));
        let canary = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/canary/1";
        let named = AlbTarget {
            canary_target_group_arns: vec![canary.into()],
            ..listener.clone()
        };
        assert_eq!(named.validate(), Ok(()));
        let without_scope = AlbTarget {
            scope: Scope::One,
            ..named.clone()
        };
        assert!(without_scope
            .validate()
            .unwrap_err()
            .contains("only used with scope: listener"));
        let stable_as_canary = AlbTarget {
            canary_target_group_arns: vec![STABLE.into()],
            ..listener.clone()
        };
        assert!(stable_as_canary
            .validate()
            .unwrap_err()
            .contains("lists the stable target group"));
        let bad = AlbTarget {
            canary_target_group_arns: vec!["canary".into()],
            ..listener
        };
        assert!(bad.validate().unwrap_err().starts_with("canary_target_group_arns"));
        let parsed: AlbTarget = serde_json::from_value(serde_json::json!({
            "listener_arn": LISTENER, "stable_target_group_arn": STABLE, "scope": "listener"
        }))
        .unwrap();
        assert_eq!(parsed.scope, Scope::Listener);
        assert!(serde_json::from_value::<AlbTarget>(serde_json::json!({
            "listener_arn": LISTENER, "stable_target_group_arn": STABLE, "scope": "everything"
        }))
        .is_err());
    }

    #[test]
    fn target_validation() {
        assert_eq!(target().validate(), Ok(()));
        let with_rule = AlbTarget {
            rule_arn: Some(RULE.into()),
            ..target()
        };
        assert_eq!(with_rule.validate(), Ok(()));
        assert_eq!(with_rule.key(), format!("alb:{RULE}"));
        assert_eq!(target().key(), format!("alb:{LISTENER}"));

        let foreign_rule = AlbTarget {
            rule_arn: Some(RULE.replace("f2f7dc8efc522ab2", "0000000000000000")),
            ..target()
        };
        assert!(foreign_rule.validate().unwrap_err().contains("does not belong"));
        let bad = AlbTarget {
            listener_arn: STABLE.into(),
            ..target()
        };
        assert!(bad.validate().unwrap_err().starts_with("listener_arn"));
        let bad = AlbTarget {
            stable_target_group_arn: "stable".into(),
            ..target()
        };
        assert!(bad.validate().unwrap_err().starts_with("stable_target_group_arn"));
        let bad = AlbTarget {
            stable_target_group_arn: format!(" {STABLE}"),
            ..target()
        };
        assert!(bad.validate().unwrap_err().contains("whitespace"));
        let bad = AlbTarget {
            min_healthy_targets: 0,
            ..target()
        };
        assert!(bad.validate().unwrap_err().starts_with("min_healthy_targets"));
        let bad = AlbTarget {
            gradual: Some(GradualShift {
                steps: vec![50],
                interval: Duration::from_secs(1),
            }),
            ..target()
        };
        assert!(bad.validate().unwrap_err().contains("100"));
    }

    #[test]
    fn gradual_validation() {
        let g = |steps: Vec<u8>, secs: u64| GradualShift {
            steps,
            interval: Duration::from_secs(secs),
        };
        assert_eq!(g(vec![50, 100], 30).validate(), Ok(()));
        assert_eq!(g(vec![100], 30).validate(), Ok(()));
        assert!(g(vec![], 30).validate().unwrap_err().contains("empty"));
        assert!(g(vec![50, 50, 100], 30)
            .validate()
            .unwrap_err()
            .contains("strictly increasing"));
        assert!(g(vec![80, 50, 100], 30)
            .validate()
            .unwrap_err()
            .contains("strictly increasing"));
        assert!(g(vec![0, 100], 30).validate().unwrap_err().contains("1 to 100"));
        assert!(g(vec![101], 30).validate().unwrap_err().contains("1 to 100"));
        assert!(g(vec![25, 50], 30)
            .validate()
            .unwrap_err()
            .contains("last step must be 100"));
        assert!(g(vec![50, 100], 0).validate().unwrap_err().contains("interval"));
        assert!(g(vec![50, 100], 7200).validate().unwrap_err().contains("interval"));
    }

    #[test]
    fn policy_deserialization_is_strict_with_defaults() {
        let t: AlbTarget = serde_json::from_value(serde_json::json!({
            "listener_arn": LISTENER,
            "stable_target_group_arn": STABLE,
            "gradual": {"steps": [50, 100], "interval": "30s"}
        }))
        .unwrap();
        assert_eq!(t.stickiness, Stickiness::Keep);
        assert_eq!(t.min_healthy_targets, 1);
        assert_eq!(t.gradual.as_ref().unwrap().interval, Duration::from_secs(30));
        let t: AlbTarget = serde_json::from_value(serde_json::json!({
            "listener_arn": LISTENER,
            "stable_target_group_arn": STABLE,
            "stickiness": "disable"
        }))
        .unwrap();
        assert_eq!(t.stickiness, Stickiness::Disable);
        assert!(serde_json::from_value::<AlbTarget>(serde_json::json!({
            "listener_arn": LISTENER,
            "stable_target_group_arn": STABLE,
            "weight": 3
        }))
        .is_err());
    }
}
