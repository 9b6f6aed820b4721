//! Placeholder until the ALB executor lands: the policy-side description of an ALB target.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An ALB listener's default action (or one listener rule) and its stable target group.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlbTarget {
    pub listener_arn: String,
    #[serde(default)]
    pub rule_arn: Option<String>,
    pub stable_target_group_arn: String,
    #[serde(default)]
    pub stickiness: Stickiness,
    #[serde(default = "one")]
    pub min_healthy_targets: u32,
    #[serde(default)]
    pub gradual: Option<GradualShift>,
}

fn one() -> u32 {
    1
}

/// What happens to the forward's stickiness on revert.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stickiness {
    #[default]
    Keep,
    Disable,
}

/// Shift back in steps for a cold stable pool.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GradualShift {
    pub steps: Vec<u8>,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl AlbTarget {
    /// Checks what serde cannot; the message names the field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if !self.listener_arn.starts_with("arn:") {
            return Err("target.alb.listener_arn: must be a listener ARN (arn:aws:elasticloadbalancing:...)".into());
        }
        if !self.stable_target_group_arn.starts_with("arn:") {
            return Err("target.alb.stable_target_group_arn: must be a target group ARN".into());
        }
        if let Some(g) = &self.gradual {
            if g.steps.is_empty() || g.steps.last() != Some(&100) || g.steps.windows(2).any(|w| w[0] >= w[1]) {
                return Err("target.alb.gradual.steps: list stable percentages strictly increasing and ending at 100, e.g. [50, 100]".into());
            }
        }
        Ok(())
    }

    /// Identity of what a revert changes.
    pub fn key(&self) -> String {
        format!("alb:{}", self.rule_arn.as_deref().unwrap_or(&self.listener_arn))
    }
}
