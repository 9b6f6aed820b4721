//! GitOps suspends belong to the incident that made them (action::gitops): the resume
//! annotation names the incident, so another incident that finds the sync already suspended
//! says whose suspension it is instead of taking it for an earlier run of its own, and a
//! takeover of the incident that made it still finds its own. Against the fake API server.

use rollback_responder::action::gitops::{GitOpsStep, RESUME_ANNOTATION};
use rollback_responder::action::kubernetes::{KubeExecutor, KubeSettings, KubeStep};
use rollback_responder::action::retry::no_gate;
use rollback_responder::action::{Executors, ForIncident, Target};
use serde_json::{json, Value};

use crate::gitops::{application, argo_gitops, gitops_steps, image, release_world, run, undo_target};
use crate::support::fake_kube::FakeKube;

/// The Application as an earlier incident's rollback left it: automated sync off, the
/// responder's resume annotation naming that incident still on it.
async fn suspended_by_an_earlier_incident(exec: &KubeExecutor) -> ForIncident {
    let earlier = ForIncident {
        id: Some("0190-earlier".into()),
        opened_at: Some(chrono::Utc::now() - chrono::Duration::days(2)),
    };
    let mut t = undo_target(argo_gitops(true));
    t.steps.clear();
    t.steps.push(KubeStep::Scale {
        deployment: "portal-api".into(),
        replicas: 3,
    });
    exec.revert_for(&t, false, &earlier, &mut |_| {}, &no_gate)
        .await
        .expect("the earlier incident's run");
    earlier
}

/// Another incident finds the sync suspended by an earlier incident that never resumed it:
/// said as that incident's suspension (which one), not "an earlier run of this rollback", and
/// not this incident's change; a takeover of the earlier incident still finds its own.
#[tokio::test]
async fn an_earlier_incidents_suspension_is_named_and_not_taken_for_this_ones() {
    let fake = FakeKube::start().await;
    release_world(&fake);
    fake.insert("applications", application(json!({"prune": true})));
    let exec = KubeExecutor::new(fake.client(), &KubeSettings::default());
    let earlier = suspended_by_an_earlier_incident(&exec).await;
    let mark: Value = serde_json::from_str(
        fake.get("applications", "argocd", "portal-api").unwrap()["metadata"]["annotations"][RESUME_ANNOTATION]
            .as_str()
            .expect("annotation"),
    )
    .unwrap();
    assert_eq!(mark["incident"], "0190-earlier");
    let writes = fake.writes();

    let this = ForIncident {
        id: Some("0190-this".into()),
        opened_at: Some(chrono::Utc::now()),
    };
    let executors = Executors {
        kube: Some(exec.clone()),
        ..Default::default()
    };
    let target = Target::Kubernetes(undo_target(argo_gitops(true)));
    // A dry run says the same and writes nothing.
    let mut dry = Vec::new();
    let report = executors
        .execute(&target, true, this.clone(), &mut |s| dry.push(s), &no_gate, &[])
        .await
        .expect("dry run");
    assert!(report.dry_run && !report.changed);
    assert_eq!(fake.writes(), writes, "a dry run writes nothing");
    assert!(
        dry.iter().any(|s| s
            .summary
            .contains("suspended by the responder for incident 0190-earlier")),
        "{dry:#?}"
    );
    let mut steps = Vec::new();
    let report = executors
        .execute(&target, false, this.clone(), &mut |s| steps.push(s), &no_gate, &[])
        .await
        .expect("the revert runs");
    assert!(report.changed);
    assert_eq!(image(&fake), "portal-api:0.9.0");
    assert_eq!(
        fake.writes(),
        writes + 1,
        "only the undo: the Application is left as it was"
    );
    let step = steps
        .iter()
        .find(|s| s.detail["step"] == "gitops")
        .expect("the gitops step");
    assert!(!step.applied, "not this incident's change");
    assert_eq!(step.detail["by_us"], false);
    assert_eq!(step.detail["other_incident"]["incident"], "0190-earlier");
    assert!(
        step.summary.starts_with(
            "Argo CD application argocd/portal-api: automated sync was already off, suspended by the responder for \
             incident 0190-earlier (opened "
        ),
        "{}",
        step.summary
    );
    assert!(!step.summary.contains("earlier run"), "{}", step.summary);
    assert!(
        report
            .summary
            .contains("suspended by the responder for incident 0190-earlier"),
        "{}",
        report.summary
    );

    // A takeover of the earlier incident, known by its opening time only, finds its own.
    let by_time = ForIncident {
        id: None,
        opened_at: earlier.opened_at,
    };
    let (result, records) = {
        let mut records = Vec::new();
        let r = exec
            .revert_for(
                &undo_target(argo_gitops(true)),
                false,
                &by_time,
                &mut |r| records.push(r),
                &no_gate,
            )
            .await;
        (r, records)
    };
    result.expect("takeover");
    assert!(matches!(
        gitops_steps(&records)[..],
        [GitOpsStep::AlreadyOff {
            by_us: true,
            other_incident: None,
            ..
        }]
    ));
}

/// A takeover that finds the sync suspended by this incident's interrupted earlier attempt and
/// then fails to revert: the suspend is this incident's change, so it is a partial rollback
/// that says how to resume. Before, only a suspend written in the same run counted, so the
/// takeover said "nothing was changed" and gave no resume command while Argo CD stayed off.
#[tokio::test]
async fn a_takeover_that_fails_after_finding_its_own_suspend_is_partial_and_says_how_to_resume() {
    let fake = FakeKube::start().await;
    release_world(&fake);
    fake.insert("applications", application(json!({"prune": true, "selfHeal": true})));
    fake.deny("patch", "deployments");
    let t = undo_target(argo_gitops(true));
    // The first attempt suspends, then its undo is refused.
    let (first, _) = run(&fake, &t, false).await;
    let first = first.expect_err("the undo is refused").to_string();
    assert!(first.contains("resume"), "{first}");
    // The takeover finds the suspend its own, and the undo refused again.
    let (again, records) = run(&fake, &t, false).await;
    assert!(matches!(
        gitops_steps(&records)[..],
        [GitOpsStep::AlreadyOff { by_us: true, .. }]
    ));
    let e = again.expect_err("the undo is refused again");
    assert!(
        matches!(
            e,
            rollback_responder::action::kubernetes::KubeError::NothingRevertedAfterSuspend { .. }
        ),
        "{e:?}"
    );
    assert_eq!(e.to_string(), first, "the takeover says what the first attempt said");
    assert!(
        records.iter().any(|r| r.applied()),
        "the suspend counts as this incident's change"
    );
    assert_eq!(image(&fake), "portal-api:1.0.0", "the Deployment was not rolled back");
}
