//! Switches while an incident is open: a policy reload, dry run turned on or off.

use super::*;

/// Item 8: a policy reload that turns the pending request's manual trigger automatic decides
/// the incident again under the new policy, without waiting for a new alert.
#[tokio::test]
async fn a_policy_reload_that_makes_a_pending_trigger_automatic_rolls_back() {
    let s = Seq::start("1h").await;
    s.fire("HighLatency").await;
    s.one_incident("latency request pending", |i| i["phase"] == "awaiting_approval")
        .await;
    let file = s.app.dir.path().join("policies").join("shop.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let automatic = text.replace(
        "matchers: ['alertname=\"HighLatency\"']\n    mode: manual",
        "matchers: ['alertname=\"HighLatency\"']\n    mode: auto",
    );
    assert_ne!(text, automatic, "the policy text changed");
    std::fs::write(&file, automatic).unwrap();
    let inc = s
        .one_incident("rolled back after the reload", |i| i["phase"] == "verified")
        .await;
    assert_eq!(s.stable_weight().await, 100, "moto saw the rollback");
    assert_eq!(inc["decision"]["outcome"], "auto");
    assert_ne!(
        inc["decision"]["policy_hash"], inc["timeline"][1]["detail"]["policy_hash"],
        "decided again under the new policy set"
    );
}

/// Dry run switched on (a policy reload) while a live request waits: its approval runs a dry
/// run and says so. Before, the approval sent a real ModifyListener on the decision made
/// before the switch.
#[tokio::test]
async fn a_request_approved_after_dry_run_was_switched_on_is_a_dry_run() {
    let s = Seq::start("1h").await;
    s.fire("HighLatency").await;
    let inc = s
        .one_incident("latency request pending", |i| i["phase"] == "awaiting_approval")
        .await;
    let hash = s.app.get_json("/readyz").await["policies"]["hash"].clone();
    let file = s.app.dir.path().join("policies").join("shop.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let dry = text.replace("guards:\n  cooldown: 1h", "guards:\n  cooldown: 1h\n  dry_run: true");
    assert_ne!(text, dry, "the policy text changed");
    std::fs::write(&file, dry).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while s.app.get_json("/readyz").await["policies"]["hash"] == hash {
        assert!(std::time::Instant::now() < deadline, "the reload never came");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let id = rollback_responder::incident::IncidentId(inc["id"].as_str().unwrap().to_string());
    let who = rollback_responder::approval::Person::slack("U1", vec![]);
    s.app
        .responder
        .vote(&id, &who, rollback_responder::approval::Verdict::Approve, "test")
        .await
        .expect("approved");
    let inc = s.one_incident("a dry run", |i| i["phase"] == "dry_run").await;
    assert_eq!(s.stable_weight().await, 75, "nothing written: {:#?}", summaries(&inc));
    let lines = summaries(&inc);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("approved: approved by") && l.contains("dry run is in force now")),
        "{lines:#?}"
    );
    assert_eq!(inc["executed"], false);
}

/// After a dry run rehearsed the rollback (the alert still firing) and dry run was switched
/// off, a person can roll back for real. Before, `/rollback now` was refused ("already open,
/// phase dry_run"), Approve too, and joining alerts said "already rolled back" of a target
/// nothing had changed.
#[tokio::test]
async fn after_a_dry_run_a_person_can_roll_back_for_real() {
    let s = Seq::start_policy(
        |fx, svc| {
            mixed_policy(fx, svc, "1h", "1h")
                .replace("guards:\n  cooldown: 1h", "guards:\n  cooldown: 1h\n  dry_run: true")
        },
        vec![],
    )
    .await;
    s.fire("HealthCheckFailing").await;
    let inc = s.one_incident("rehearsed", |i| i["phase"] == "dry_run").await;
    assert_eq!(s.stable_weight().await, 75);
    s.fire("HighErrorRate").await;
    // A joining alert is told what a dry run means, not "already rolled back".
    s.app
        .wait_incident(inc["id"].as_str().unwrap(), "the second alert joined", |i| {
            summaries(i).iter().any(|l| {
                l.starts_with("alert_joined: HighErrorRate")
                    && l.contains("the dry run rehearsed this incident's rollback and changed nothing")
            })
        })
        .await;
    let file = s.app.dir.path().join("policies").join("shop.yaml");
    let hash = s.app.get_json("/readyz").await["policies"]["hash"].clone();
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("\n  dry_run: true", "")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while s.app.get_json("/readyz").await["policies"]["hash"] == hash {
        assert!(std::time::Instant::now() < deadline, "the reload never came");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let who = rollback_responder::approval::Person::slack("U1", vec![]);
    s.app
        .responder
        .start_manual("shop", &who, "the rehearsal looked right")
        .await
        .expect("rolled back by hand");
    let inc = s
        .one_incident("rolled back for real", |i| i["phase"] == "verified")
        .await;
    assert_eq!(s.stable_weight().await, 100, "moto saw the rollback");
    assert_eq!(inc["executed"], true);
}
