//! A person's retry after a failed rollback is a new attempt, and is said as one: not
//! "taking over" an interrupted attempt, and never crediting the failed attempt's planned write
//! as a (partial) rollback.

use crate::approvals::{command, world};

fn events<'a>(inc: &'a serde_json::Value, kind: &str) -> Vec<&'a str> {
    inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .filter_map(|e| e["summary"].as_str())
        .collect()
}

/// Before, the retry found the first attempt's start and planned write in the audit trail: it
/// announced "taking over from replica-0, whose attempt was interrupted", and when it failed
/// too it said "partial rollback: the writes of the interrupted earlier attempt … took" and
/// counted the incident as executed (cooldowns, PagerDuty, the status page) with nothing
/// changed.
#[tokio::test]
async fn a_persons_retry_after_a_failed_rollback_is_a_new_attempt() {
    let w = world(1, "1h").await;
    w.aws.fail("ModifyListener", &w.fx.listener_arn, 403, "AccessDenied");
    let id = w.pending("rt01").await;
    for n in 1..=2 {
        command(&w.app, "U0APPROVER", "now portal-api canary is bad").await;
        let inc = w
            .app
            .wait_incident(&id, "the attempt to fail", |i| {
                i["phase"] == "failed" && events(i, "action_failed").len() == n
            })
            .await;
        assert_eq!(inc["executed"], false, "attempt {n}: nothing changed: {inc:#}");
        let started = events(&inc, "action_started");
        assert_eq!(started.len(), n, "{started:#?}");
        assert!(!started.iter().any(|s| s.contains("taking over")), "{started:#?}");
        let failed = events(&inc, "action_failed");
        assert!(
            failed[n - 1].starts_with("rollback failed, nothing was changed"),
            "attempt {n}: {}",
            failed[n - 1]
        );
    }
    assert_eq!(w.alb().await, w.untouched());
    // Fixed (the permission granted), the next retry rolls back, once, as its own attempt.
    w.aws.heal();
    command(&w.app, "U0APPROVER", "now portal-api permission fixed").await;
    let inc = w
        .app
        .wait_incident(&id, "the retry to be verified", |i| i["phase"] == "verified")
        .await;
    assert_eq!(inc["executed"], true);
    assert!(!events(&inc, "action_started").iter().any(|s| s.contains("taking over")));
    assert_eq!(w.alb().await, w.rolled_back_once());
}
