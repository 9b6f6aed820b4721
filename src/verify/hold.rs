//! The bake as a hold: one check's samples and the rule that turns them into a verdict. Pure.
//!
//! A check is sampled at its interval from the start of the bake to its end. A *settling*
//! check (health probe, Prometheus, the alert) may be bad until its first good sample (the
//! service was just rolled back); from then on every bad sample counts, and more than the
//! policy's `allowed_bad_samples` fail it. A *strict* check (the target's read-back) counts
//! from its first sample, and a *fatal* sample (drift: someone changed the target back) fails
//! it whatever the allowance. A check passes only at the end of the bake, with enough good
//! samples and not too many bad ones; a check that was never good fails, saying so.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::ser::SerializeTuple;
use serde::{Serialize, Serializer};

/// One observation of one check.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub at: DateTime<Utc>,
    /// What was seen, short: `HTTP 500`, `0.031`, `firing`, `100% stable`.
    pub value: String,
    pub ok: bool,
    /// A bad sample that fails the check at once (drift), whatever the allowance.
    pub fatal: bool,
}

impl Sample {
    pub fn new(at: DateTime<Utc>, value: impl Into<String>, ok: bool) -> Self {
        Self {
            at,
            value: value.into(),
            ok,
            fatal: false,
        }
    }

    /// `value at time`, for people.
    pub fn line(&self) -> String {
        format!(
            "{} at {}",
            self.value,
            self.at.to_rfc3339_opts(SecondsFormat::Millis, true)
        )
    }
}

/// Compact in the timeline: `["2026-12-03T06:20:01.123Z", "HTTP 200", true]`.
impl Serialize for Sample {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(3)?;
        t.serialize_element(&self.at.to_rfc3339_opts(SecondsFormat::Millis, true))?;
        t.serialize_element(&self.value)?;
        t.serialize_element(&self.ok)?;
        t.end()
    }
}

/// When bad samples start to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// From the first good sample on.
    Settle,
    /// From the first sample on.
    Strict,
}

/// Samples kept per check in the timeline; beyond it the middle ones are dropped (counted).
pub const MAX_SAMPLES: usize = 240;

/// One check's samples so far.
#[derive(Debug, Clone)]
pub struct Hold {
    rule: Rule,
    allowed_bad: u32,
    /// Good samples in a row the check needs at least once (health probe `successes`).
    need_streak: u32,
    samples: Vec<Sample>,
    dropped: usize,
    total: usize,
    counting: bool,
    bad: u32,
    streak: u32,
    best_streak: u32,
    /// The sample that failed the check.
    failing: Option<Sample>,
    first_good: Option<Sample>,
}

/// What a hold says once the bake ended (or was ended).
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub passed: bool,
    /// Why, with the values that decided it.
    pub reason: String,
    /// The sample that decided it (the failing one, or the last one).
    pub deciding: Option<Sample>,
}

impl Hold {
    pub fn new(rule: Rule, allowed_bad: u32, need_streak: u32) -> Self {
        Self {
            rule,
            allowed_bad,
            need_streak: need_streak.max(1),
            samples: Vec::new(),
            dropped: 0,
            total: 0,
            counting: rule == Rule::Strict,
            bad: 0,
            streak: 0,
            best_streak: 0,
            failing: None,
            first_good: None,
        }
    }

    /// Adds a sample; returns whether the check has now failed (nothing can change that).
    pub fn push(&mut self, s: Sample) -> bool {
        self.total += 1;
        if s.ok {
            self.counting = true;
            self.streak += 1;
            self.best_streak = self.best_streak.max(self.streak);
            if self.first_good.is_none() {
                self.first_good = Some(s.clone());
            }
        } else {
            self.streak = 0;
            if s.fatal || self.counting {
                self.bad += 1;
                if self.failing.is_none() && (s.fatal || self.bad > self.allowed_bad) {
                    self.failing = Some(s.clone());
                }
            }
        }
        if self.samples.len() >= MAX_SAMPLES {
            // Keep the first half and the newest: the start and the end of the story.
            self.samples.remove(MAX_SAMPLES / 2);
            self.dropped += 1;
        }
        self.samples.push(s);
        self.failed()
    }

    pub fn failed(&self) -> bool {
        self.failing.is_some()
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Samples taken but left out of [`Hold::samples`].
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// The verdict once sampling ended; `complete` is false when the bake was cut short
    /// (another check failed first), which never passes.
    pub fn verdict(&self, complete: bool) -> Verdict {
        let last = self.samples.last().cloned();
        let n = self.total;
        if let Some(f) = &self.failing {
            let reason = if f.fatal {
                format!("{} (sample {} of {n})", f.line(), self.sample_index(f))
            } else {
                match (self.rule, &self.first_good) {
                    (Rule::Settle, Some(g)) => format!(
                        "bad: {}; {} bad sample(s) after the first good one ({}), {} allowed",
                        f.line(),
                        self.bad,
                        g.line(),
                        self.allowed_bad
                    ),
                    _ => format!(
                        "bad: {}; {} bad sample(s), {} allowed",
                        f.line(),
                        self.bad,
                        self.allowed_bad
                    ),
                }
            };
            return Verdict {
                passed: false,
                reason,
                deciding: Some(f.clone()),
            };
        }
        let Some(last_sample) = last else {
            return Verdict {
                passed: false,
                reason: "no sample was taken".into(),
                deciding: None,
            };
        };
        if !complete {
            return Verdict {
                passed: false,
                reason: format!(
                    "not finished: the bake was ended early by a failed check (last: {})",
                    last_sample.line()
                ),
                deciding: Some(last_sample),
            };
        }
        if self.first_good.is_none() {
            return Verdict {
                passed: false,
                reason: format!("never good in {n} sample(s) (last: {})", last_sample.line()),
                deciding: Some(last_sample),
            };
        }
        if self.best_streak < self.need_streak {
            return Verdict {
                passed: false,
                reason: format!(
                    "never {} good samples in a row (best {}, {n} samples; last: {})",
                    self.need_streak,
                    self.best_streak,
                    last_sample.line()
                ),
                deciding: Some(last_sample),
            };
        }
        let good = self.best_streak;
        Verdict {
            passed: true,
            reason: format!(
                "held to the end of the bake: {n} samples, {} bad after the first good one ({} allowed), up to {good} good in a row; last: {}",
                self.bad,
                self.allowed_bad,
                last_sample.line()
            ),
            deciding: Some(last_sample),
        }
    }

    /// The 1-based number of a kept sample among all taken (dropped ones are in the middle).
    fn sample_index(&self, s: &Sample) -> usize {
        match self.samples.iter().position(|x| x == s) {
            Some(i) if i >= MAX_SAMPLES / 2 => i + 1 + self.dropped,
            Some(i) => i + 1,
            None => self.total,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    fn run(rule: Rule, allowed: u32, streak: u32, oks: &[bool]) -> (Hold, Vec<bool>) {
        let t0 = DateTime::parse_from_rfc3339("2026-12-03T06:00:00Z").unwrap().to_utc();
        let mut h = Hold::new(rule, allowed, streak);
        let failed = oks
            .iter()
            .enumerate()
            .map(|(i, ok)| {
                let at = t0 + TimeDelta::seconds(i as i64);
                h.push(Sample::new(at, if *ok { "HTTP 200" } else { "HTTP 500" }, *ok))
            })
            .collect();
        (h, failed)
    }

    #[test]
    fn healthy_throughout_passes_only_at_the_end() {
        let (h, failed) = run(Rule::Settle, 0, 3, &[true; 5]);
        assert_eq!(failed, [false; 5]);
        let v = h.verdict(true);
        assert!(v.passed, "{v:?}");
        assert!(v.reason.contains("5 samples, 0 bad"), "{}", v.reason);
        assert!(!h.verdict(false).passed, "a bake cut short never passes");
    }

    #[test]
    fn one_bad_sample_after_a_good_one_fails_with_its_value_and_time() {
        let (h, failed) = run(Rule::Settle, 0, 1, &[false, false, true, true, false, true]);
        assert_eq!(failed, [false, false, false, false, true, true]);
        let v = h.verdict(true);
        assert!(!v.passed);
        assert_eq!(v.deciding.as_ref().unwrap().value, "HTTP 500");
        assert_eq!(v.deciding.unwrap().at.to_rfc3339(), "2026-12-03T06:00:04+00:00");
        assert!(
            v.reason.contains("bad: HTTP 500 at 2026-12-03T06:00:04.000Z")
                && v.reason
                    .contains("first good one (HTTP 200 at 2026-12-03T06:00:02.000Z)"),
            "{}",
            v.reason
        );
    }

    #[test]
    fn the_policy_may_allow_bad_samples() {
        let (h, failed) = run(Rule::Settle, 2, 1, &[true, false, true, false, true]);
        assert!(!failed.iter().any(|f| *f));
        assert!(h.verdict(true).passed);
        let (h, _) = run(Rule::Settle, 2, 1, &[true, false, false, false]);
        assert!(h.failed());
        assert!(h.verdict(true).reason.contains("3 bad sample(s)"));
    }

    #[test]
    fn never_good_fails_and_says_so() {
        let (h, failed) = run(Rule::Settle, 0, 1, &[false, false, false]);
        assert_eq!(failed, [false; 3], "a settling check is not failed before the end");
        let v = h.verdict(true);
        assert!(!v.passed);
        assert!(v.reason.starts_with("never good in 3 sample(s)"), "{}", v.reason);
        assert!(!Hold::new(Rule::Settle, 0, 1).verdict(true).passed, "no sample");
    }

    #[test]
    fn a_streak_is_needed_once() {
        let (h, _) = run(Rule::Settle, 5, 3, &[true, true, false, true, true, false]);
        let v = h.verdict(true);
        assert!(!v.passed);
        assert!(
            v.reason.contains("never 3 good samples in a row (best 2"),
            "{}",
            v.reason
        );
    }

    #[test]
    fn strict_counts_from_the_first_sample_and_fatal_ignores_the_allowance() {
        let (h, failed) = run(Rule::Strict, 0, 1, &[false, true]);
        assert_eq!(failed, [true, true]);
        assert!(!h.verdict(true).passed);
        let mut h = Hold::new(Rule::Strict, 10, 1);
        assert!(!h.push(Sample::new(Utc::now(), "100% stable", true)));
        let mut drift = Sample::new(Utc::now(), "75% stable", false);
        drift.fatal = true;
        assert!(h.push(drift));
        assert!(h.verdict(true).reason.starts_with("75% stable at "));
    }

    #[test]
    fn samples_are_compact_and_bounded() {
        let (h, _) = run(Rule::Settle, 0, 1, &vec![true; MAX_SAMPLES + 10]);
        assert_eq!(h.samples().len(), MAX_SAMPLES);
        assert_eq!(h.dropped(), 10);
        assert_eq!(
            serde_json::to_value(&h.samples()[0]).unwrap(),
            serde_json::json!(["2026-12-03T06:00:00.000Z", "HTTP 200", true])
        );
        assert!(h
            .verdict(true)
            .reason
            .contains(&format!("{} samples", MAX_SAMPLES + 10)));
    }
}
