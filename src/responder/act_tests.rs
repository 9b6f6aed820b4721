use super::*;

fn event(kind: AuditKind, actor: &str, detail: serde_json::Value) -> crate::store::EventRecord {
    crate::store::EventRecord {
        at: Utc::now(),
        kind,
        actor: actor.into(),
        phase_from: None,
        phase_to: None,
        summary: String::new(),
        detail,
    }
}

/// Only an attempt without a result is interrupted: a person's retry after a failed
/// rollback is a new attempt. Before, the first attempt's start and planned write were
/// found, so the retry said "taking over from replica-0, whose attempt was interrupted",
/// and when it failed too it claimed the old attempt's write as a partial rollback.
#[test]
fn an_attempt_that_recorded_its_result_is_not_interrupted() {
    let planned = json!({"step": "planned", "dry_run": false});
    let first = vec![
        event(AuditKind::ActionStarted, "replica-0", json!({})),
        event(AuditKind::ActionStep, "replica-0", planned.clone()),
    ];
    let i = Interrupted::find(&first).expect("no result: interrupted");
    assert_eq!(
        (i.started_by.as_str(), i.wrote.as_deref(), i.steps.len()),
        ("replica-0", Some("replica-0"), 1)
    );
    for result in [AuditKind::ActionFailed, AuditKind::ActionSucceeded] {
        let mut ended = first.clone();
        ended.push(event(result, "replica-0", json!({})));
        ended.push(event(AuditKind::HumanRollback, "slack:U1", json!({})));
        assert_eq!(Interrupted::find(&ended), None, "{result:?}");
        // The retry's own start, interrupted in turn: only its own steps count.
        ended.push(event(AuditKind::ActionStarted, "replica-1", json!({})));
        let i = Interrupted::find(&ended).expect("the retry was interrupted");
        assert_eq!((i.started_by.as_str(), i.wrote, i.steps.len()), ("replica-1", None, 0));
        ended.push(event(AuditKind::ActionStep, "replica-1", planned.clone()));
        let i = Interrupted::find(&ended).unwrap();
        assert_eq!((i.wrote.as_deref(), i.steps.len()), (Some("replica-1"), 1));
    }
}

#[test]
fn a_target_found_reverted_counts_only_after_our_own_recorded_intent_and_says_by_whom() {
    let s = "listener L: already forwards everything to the stable group [stable 100]; nothing written";
    // First attempt, nobody of ours wrote: somebody else did.
    let (counted, text) = found_reverted(None, None, s);
    assert!(!counted);
    assert_eq!(
        text,
        format!("found already reverted (not by this service): not counted as this incident's rollback; {s}")
    );
    let (counted, text) = found_reverted(
        None,
        Some(&RevertedBy::Others {
            who: "by alice (kubectl-patch)".into(),
        }),
        s,
    );
    assert!(!counted);
    assert!(
        text.starts_with("found already reverted (by alice (kubectl-patch)): not counted"),
        "{text}"
    );
    // A takeover after a replica died before writing: not ours either.
    let died_early = Interrupted {
        started_by: "replica-0".into(),
        wrote: None,
        wrote_at: None,
        steps: Vec::new(),
    };
    let (counted, text) = found_reverted(Some(&died_early), None, s);
    assert!(!counted);
    assert!(
        text.starts_with(
            "found already reverted (not by this service) (the interrupted earlier attempt by replica-0 had \
             not begun to write): not counted"
        ),
        "{text}"
    );
    // A takeover after a replica died mid-write: most likely its write, counted.
    let died_writing = Interrupted {
        started_by: "replica-0".into(),
        wrote: Some("replica-0".into()),
        wrote_at: Some(Utc::now()),
        steps: Vec::new(),
    };
    let (counted, text) = found_reverted(Some(&died_writing), None, s);
    assert!(counted);
    assert!(
        text.starts_with(
            "found already reverted, most likely by the interrupted earlier attempt of replica-0, which had \
             begun to write it: counted as this incident's rollback; listener L"
        ),
        "{text}"
    );
    // The executor saw somebody else's write: never counted, even after our intent.
    let (counted, text) = found_reverted(
        Some(&died_writing),
        Some(&RevertedBy::Others {
            who: "deployment/web by kubectl-rollout".into(),
        }),
        s,
    );
    assert!(!counted);
    assert!(text.starts_with("found already reverted (deployment/web by kubectl-rollout) (the interrupted earlier attempt by replica-0 did not write it)"), "{text}");
}

#[test]
fn failure_summaries_say_what_took_and_what_failed_without_doubled_prefixes() {
    let e = ActionError::PreCheck {
        message: "pre-check failed: service portal/web: 0 of 2 pod(s) matching app=web are Ready, 2 required; \
                  nothing was changed (code precheck_failed)"
            .into(),
        detail: serde_json::Value::Null,
    };
    let s = failure_summary(&[], &e);
    assert!(
        s.starts_with("rollback failed, nothing was changed: pre-check failed: service portal/web"),
        "{s}"
    );
    assert_eq!(s.matches("pre-check failed").count(), 1, "{s}");

    let e = ActionError::Failed {
        message: "kubernetes API error 400 BadRequest: patch deployments/scale/web in portal: bad (code api)".into(),
        detail: serde_json::Value::Null,
    };
    let s = failure_summary(&["service/web patched (attempt 1) (at 10:00:01 UTC)".to_string()], &e);
    assert_eq!(
        s,
        "partial rollback: service/web patched (attempt 1) (at 10:00:01 UTC) took; then it failed: kubernetes API \
         error 400 BadRequest: patch deployments/scale/web in portal: bad (code api); the remaining steps were not \
         done and nothing more will be tried automatically, a human must act"
    );

    // A write that may have been applied: never "nothing was changed".
    let e = ActionError::Unconfirmed {
        message: "ModifyListener on L: whether it took is UNKNOWN: … (code OutcomeUnknown)".into(),
        detail: serde_json::Value::Null,
    };
    for took in [vec![], vec!["rule R reverted".to_string()]] {
        let s = failure_summary(&took, &e);
        assert!(
            s.starts_with("rollback failed, of UNKNOWN outcome: ") && !s.contains("nothing was changed"),
            "{s}"
        );
        assert_eq!(
            s.contains("rule R reverted took; then ModifyListener"),
            !took.is_empty(),
            "{s}"
        );
    }
}
