//! Slash commands, approvals end to end from Alertmanager, and the two-person rule.

use super::*;

#[tokio::test]
async fn slash_commands_list_status_now_freeze_and_unfreeze() {
    let w = world(1, "1h").await;
    assert!(command(&w.app, "U0ANYONE", "help")
        .await
        .contains("`now POLICY [reason]`"));
    assert_eq!(command(&w.app, "U0ANYONE", "list").await, "No incidents.");
    // Freezing is for approvers only, and shows in readiness and metrics.
    assert!(command(&w.app, "U0INTRUDER", "freeze 1h")
        .await
        .contains("may not approve"));
    let f = command(&w.app, "U0APPROVER", "freeze 30m portal-api").await;
    assert_eq!(
        f,
        ":ice_cube: Automatic rollbacks frozen (policy `portal-api`) for 30m."
    );
    let ready = w.app.get_json("/readyz").await;
    assert_eq!(ready["freezes"]["policies"]["portal-api"]["by"], "slack:U0APPROVER");
    let metrics = w
        .app
        .http
        .get(w.app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("rollback_responder_frozen{scope=\"portal-api\"} 1"),
        "{metrics}"
    );
    assert_eq!(
        command(&w.app, "U0APPROVER", "unfreeze portal-api").await,
        ":sunny: Freeze lifted."
    );
    // A person can roll back by hand; the guards still apply to a second attempt.
    let now = command(&w.app, "U0APPROVER", "now portal-api customers report errors").await;
    assert!(now.starts_with(":rewind: Incident `"), "{now}");
    let list = w
        .app
        .wait_incidents("manual rollback verified", |l| {
            l.len() == 1 && l[0]["phase"] == "verified"
        })
        .await;
    assert_eq!(
        list[0]["decision"]["reason"],
        "manual rollback requested by <@U0APPROVER>: customers report errors"
    );
    assert_eq!(w.alb().await, w.rolled_back_once());
    let id = list[0]["id"].as_str().unwrap();
    let status = command(&w.app, "U0ANYONE", &format!("status {id}")).await;
    assert!(
        status.contains("*verified*") && status.contains("(the target was changed)"),
        "{status}"
    );
    assert!(command(&w.app, "U0ANYONE", "list").await.contains(id));
    let again = command(&w.app, "U0APPROVER", "now portal-api").await;
    assert!(again.starts_with(":warning: cooldown:"), "{again}");
    assert_eq!(w.app.incidents().await.len(), 1, "the refused attempt opened nothing");
    assert_eq!(w.alb().await, w.rolled_back_once());
}

/// The end to end of the approval issue, approved from Slack and from PagerDuty.
async fn manual_flow(from_pagerduty: bool) {
    let w = world(1, "1h").await;
    let am = Alertmanager::start(&w.app.url("/webhook/alertmanager"), TOKEN).await;
    am.post(json!({"alertname": "HighLatency", "service": "portal-api", "endpoint": "files", "run": uuid::Uuid::now_v7().simple().to_string()}), &ago(600), None).await;
    let list = w
        .app
        .wait_incidents("awaiting approval", |l| {
            l.len() == 1 && l[0]["phase"] == "awaiting_approval"
        })
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    let slack = wait_requests(&w.peers.slack, 2, "slack").await;
    let buttons = &slack[0].2["blocks"][2]["elements"];
    assert_eq!(buttons[0]["action_id"], "rollback_approve");
    assert_eq!(buttons[0]["value"], id.as_str());
    let who = if from_pagerduty {
        let triggered = pd_event(
            "incident.triggered",
            "P0SYSTEM",
            json!({"id": "Q0E2E", "type": "incident", "incident_key": format!("rollback-responder/{id}")}),
        );
        pd_post(&w.app, "e2e-1", &triggered, PD_SECRET).await;
        let note = pd_event(
            "incident.annotated",
            "P0ONCALL",
            json!({"type": "incident_note", "id": "N9", "content": "rollback approve", "incident": {"id": "Q0E2E"}}),
        );
        let r: Value = pd_post(&w.app, "e2e-2", &note, PD_SECRET).await.json().await.unwrap();
        assert_eq!(r["status"], "approved", "{r}");
        "PagerDuty user P0ONCALL"
    } else {
        let ru = response_url().await;
        assert_eq!(
            click(
                &w.app,
                "U0APPROVER",
                "rollback_approve",
                &id,
                &format!("{}/r", ru.uri())
            )
            .await,
            200
        );
        "<@U0APPROVER>"
    };
    w.app.wait_incidents("verified", |l| l[0]["phase"] == "verified").await;
    assert_eq!(w.alb().await, w.rolled_back_once());
    // The thread says who approved and when; PagerDuty was acknowledged after the approval.
    let slack = wait_requests(&w.peers.slack, 7, "slack").await;
    let line = slack
        .iter()
        .map(|r| r.2["text"].as_str().unwrap_or("").to_string())
        .find(|t| t.contains("`awaiting_approval` → `executing`"))
        .expect("approval in the thread");
    assert!(line.contains(&format!("approved by {who} via")), "{line}");
    let pd = wait_requests(&w.peers.pagerduty, 3, "pagerduty").await;
    let actions: Vec<&str> = pd
        .iter()
        .map(|r| r.2["event_action"].as_str().unwrap_or("change"))
        .collect();
    assert_eq!(&actions[..3], ["trigger", "acknowledge", "change"]);
    let inc = w.app.incident(&id).await;
    let approved = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "approved")
        .unwrap();
    assert!(approved["at"].is_string());
    assert!(approved["summary"].as_str().unwrap().contains(who));
}

#[tokio::test]
async fn alertmanager_to_slack_buttons_to_a_signed_click_to_moto() {
    manual_flow(false).await;
}

#[tokio::test]
async fn alertmanager_to_slack_buttons_approved_from_a_signed_pagerduty_webhook() {
    manual_flow(true).await;
}

/// `/rollback now` under a two-person rule is the first approval, not a rollback: a second,
/// different person has to approve before anything changes.
#[tokio::test]
async fn rollback_now_under_a_two_person_rule_waits_for_a_second_approver() {
    let w = world(2, "1h").await;
    let now = command(&w.app, "U0APPROVER", "now portal-api customers report errors").await;
    let list = w
        .app
        .wait_incidents("awaiting a second approver", |l| {
            l.len() == 1 && l[0]["phase"] == "awaiting_approval"
        })
        .await;
    let id = list[0]["id"].as_str().unwrap().to_string();
    let reason = list[0]["decision"]["reason"].as_str().unwrap();
    assert!(reason.contains("the policy needs 2 approvers"), "{reason}");
    assert!(now.contains(&id), "{now}");
    assert_eq!(list[0]["decision"]["on_timeout"], "escalate");
    assert_eq!(w.alb().await, w.untouched(), "nothing rolled back on one person's word");
    let again = command(&w.app, "U0APPROVER", &format!("approve {id}")).await;
    assert_eq!(again, format!(":warning: <@U0APPROVER> already voted on incident {id}"));
    let second = command(&w.app, "U0SECOND", &format!("approve {id}")).await;
    assert!(second.starts_with(":white_check_mark: Approved"), "{second}");
    w.app.wait_incidents("verified", |l| l[0]["phase"] == "verified").await;
    assert_eq!(w.alb().await, w.rolled_back_once());
}

/// Two approvers answering at the same moment both count. On PostgreSQL their votes run in
/// parallel, and each transaction would see only its own vote ("1 of 2") and wait for
/// another approver that already came; the request would then expire.
#[tokio::test]
async fn two_approvals_at_the_same_moment_both_count() {
    use rollback_responder::approval::{Person, Verdict, VoteResult};
    use rollback_responder::incident::IncidentId;
    let w = world(2, "1h").await;
    let id = IncidentId(w.pending("ek01").await);
    let r = &w.app.responder;
    let (first, second) = (Person::slack("U0APPROVER", vec![]), Person::slack("U0SECOND", vec![]));
    let (a, b) = tokio::join!(
        r.vote(&id, &first, Verdict::Approve, "test"),
        r.vote(&id, &second, Verdict::Approve, "test"),
    );
    let results = [a.unwrap(), b.unwrap()];
    assert!(
        results.iter().any(|v| matches!(v, VoteResult::Approved { .. })),
        "{results:?}"
    );
    // Both votes counted: the request is approved by both and rolled back once.
    let inc = w
        .app
        .wait_incident(&id.0, "verified", |i| i["phase"] == "verified")
        .await;
    assert_eq!(timeline_count(&inc, "approved"), 1);
    assert_eq!(timeline_count(&inc, "action_started"), 1);
    assert_eq!(w.alb().await, w.rolled_back_once());
}

/// Approvals given to a dry run approved a rehearsal: under a two-person rule they never count
/// towards a real rollback. After the policy leaves dry run, one approver's `/rollback now` on
/// the rehearsed incident is refused and says how to ask afresh; nothing is written.
#[tokio::test]
async fn a_rehearsals_approvals_do_not_count_towards_a_real_rollback() {
    let w = world(2, "1h").await;
    let file = w.app.dir.path().join("policies").join("portal-api.yaml");
    let live = std::fs::read_to_string(&file).unwrap();
    let reload = |text: String| {
        let (app, file) = (&w.app, &file);
        async move {
            let hash = app.get_json("/readyz").await["policies"]["hash"].clone();
            std::fs::write(file, text).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while app.get_json("/readyz").await["policies"]["hash"] == hash {
                assert!(std::time::Instant::now() < deadline, "the reload never came");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    reload(live.replace("approval:\n", "guards: {dry_run: true}\napproval:\n")).await;
    let id = w.pending("eh09").await;
    command(&w.app, "U0APPROVER", &format!("approve {id}")).await;
    command(&w.app, "U0SECOND", &format!("approve {id}")).await;
    w.app.wait_incident(&id, "rehearsed", |i| i["phase"] == "dry_run").await;
    reload(live).await;
    let said = command(&w.app, "U0APPROVER", "now portal-api for real this time").await;
    assert!(
        said.contains("was a dry run") && said.contains("needs 2 approvers"),
        "{said}"
    );
    assert_eq!(w.phase(&id).await, "dry_run");
    assert_eq!(w.alb().await, w.untouched());
}
