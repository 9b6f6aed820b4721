//! Staying rolled back under GitOps (action::gitops): the Kubernetes executor suspends the
//! owning Argo CD Application's automated sync, or a Flux Kustomization / HelmRelease, before
//! its first write, against the fake API server (which stores these custom objects and checks
//! every request against the shipped Roles, the optional GitOps ones included). Then the same
//! through the whole service, with a real Alertmanager and Slack on loopback: the timeline
//! and the thread say how to resume; a missing Application fails the incident with nothing
//! reverted. Bad `gitops:` input is refused by the policy loader with file, line and key.

use std::path::Path;
use std::time::Duration;

use rollback_responder::action::gitops::{GitOpsStep, RESUME_ANNOTATION};
use rollback_responder::action::kubernetes::{
    KubeError, KubeExecutor, KubeOutcome, KubeSettings, KubeStep, KubeStepRecord, KubernetesTarget,
};
use rollback_responder::action::Executors;
use rollback_responder::policy::PolicySet;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::peers::Alertmanager;
use crate::support::fake_kube::{deployment, pod, replicaset, service, template, FakeKube};
use crate::support::fake_notify::SlackFake;

const NS: &str = "portal";
const UID: &str = "44444444-4444-4444-8444-444444444444";

/// Deployment portal-api at revision 2 (image 1.0.0) with the ReplicaSets of revisions 1 and 2:
/// a rollout undo goes back to 0.9.0.
pub(crate) fn release_world(fake: &FakeKube) {
    let old = template(&[("app", "portal-api"), ("version", "v0.9.0")], "portal-api:0.9.0");
    let new = template(&[("app", "portal-api"), ("version", "v1.0.0")], "portal-api:1.0.0");
    let sel = [("app", "portal-api")];
    fake.insert("deployments", deployment(NS, "portal-api", UID, &sel, new.clone(), 2));
    fake.insert(
        "replicasets",
        replicaset(NS, "portal-api", UID, "aaa111", &old, 1, 0, 0),
    );
    fake.insert(
        "replicasets",
        replicaset(NS, "portal-api", UID, "bbb222", &new, 2, 3, 3),
    );
}

/// An Argo CD Application in namespace argocd that deploys portal-api with `automated`.
pub(crate) fn application(automated: Value) -> Value {
    json!({
        "metadata": {"name": "portal-api", "namespace": "argocd"},
        "spec": {
            "project": "default",
            "source": {"repoURL": "https://git.example.com/portal.git", "path": "deploy", "targetRevision": "main"},
            "destination": {"server": "https://kubernetes.default.svc", "namespace": NS},
            "syncPolicy": {"automated": automated, "syncOptions": ["CreateNamespace=true"]},
        },
        "status": {"sync": {"status": "Synced"}},
    })
}

fn flux_object(name: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "flux-system"},
        "spec": {"interval": "10m", "prune": true},
    })
}

pub(crate) fn undo_target(gitops: Value) -> KubernetesTarget {
    KubernetesTarget {
        namespace: NS.into(),
        steps: vec![KubeStep::RolloutUndo {
            deployment: "portal-api".into(),
            to_revision: None,
            to_image: None,
        }],
        min_ready_replicas: 1,
        rollout_timeout: Duration::from_secs(5),
        gitops: Some(serde_json::from_value(gitops).expect("gitops section")),
    }
}

pub(crate) fn argo_gitops(required: bool) -> Value {
    json!({"argocd": {"application": "portal-api", "namespace": "argocd"}, "required": required})
}

pub(crate) async fn run(
    fake: &FakeKube,
    t: &KubernetesTarget,
    dry_run: bool,
) -> (Result<KubeOutcome, KubeError>, Vec<KubeStepRecord>) {
    let exec = KubeExecutor::new(fake.client(), &KubeSettings::default());
    let mut records = Vec::new();
    let mut record = |r: KubeStepRecord| records.push(r);
    let result = exec.revert(t, dry_run, &mut record).await;
    (result, records)
}

pub(crate) fn image(fake: &FakeKube) -> Value {
    fake.get("deployments", NS, "portal-api").expect("deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
        .clone()
}

pub(crate) fn gitops_steps(records: &[KubeStepRecord]) -> Vec<&GitOpsStep> {
    records
        .iter()
        .filter_map(|r| match r {
            KubeStepRecord::Gitops(g) => Some(g),
            _ => None,
        })
        .collect()
}

/// (method, path) of every write, in order.
fn patches(fake: &FakeKube) -> Vec<String> {
    fake.requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| format!("{} {}", r.content_type.unwrap_or_default(), r.path))
        .collect()
}

const APP_PATH: &str = "/apis/argoproj.io/v1alpha1/namespaces/argocd/applications/portal-api";
const DEPLOY_PATH: &str = "/apis/apps/v1/namespaces/portal/deployments/portal-api";

#[tokio::test]
async fn argo_cd_automated_sync_is_suspended_before_the_deployment_is_rolled_back() {
    let fake = FakeKube::start().await;
    release_world(&fake);
    fake.insert("applications", application(json!({"prune": true, "selfHeal": true})));
    let t = undo_target(argo_gitops(true));

    let (result, records) = run(&fake, &t, false).await;
    let outcome = result.expect("revert succeeds");
    assert!(outcome.changed);
    assert_eq!(image(&fake), "portal-api:0.9.0", "the Deployment is rolled back");

    // The Application: automated sync gone, the rest of its sync policy kept, and what was
    // there recorded on it as the patch that resumes it.
    let app = fake.get("applications", "argocd", "portal-api").expect("application");
    assert_eq!(
        app["spec"]["syncPolicy"],
        json!({"syncOptions": ["CreateNamespace=true"]})
    );
    let mark: Value = serde_json::from_str(
        app["metadata"]["annotations"][RESUME_ANNOTATION]
            .as_str()
            .expect("annotation"),
    )
    .unwrap();
    let resume = mark["resume"].clone();
    assert_eq!(
        resume["spec"]["syncPolicy"]["automated"],
        json!({"prune": true, "selfHeal": true})
    );

    // Suspended first, then the revert: a merge patch of the Application, then the undo.
    assert_eq!(
        patches(&fake),
        [
            format!("application/merge-patch+json {APP_PATH}"),
            format!("application/json-patch+json {DEPLOY_PATH}"),
        ]
    );
    let gitops = gitops_steps(&records);
    assert_eq!(gitops.len(), 1, "{records:#?}");
    let GitOpsStep::Suspended {
        resume: recorded,
        resume_commands,
        attempt: 1,
        ..
    } = gitops[0]
    else {
        panic!("suspended: {:?}", gitops[0]);
    };
    assert_eq!(recorded, &resume, "the step records the original automated policy");
    assert_eq!(
        resume_commands[0],
        format!(
            "kubectl -n argocd patch applications.argoproj.io portal-api --type merge -p '{}'",
            serde_json::to_string(&resume).unwrap()
        )
    );
    assert_eq!(outcome.gitops.as_ref(), Some(gitops[0]));
    let pos = |f: &dyn Fn(&KubeStepRecord) -> bool| records.iter().position(f).expect("record");
    assert!(
        pos(&|r| matches!(r, KubeStepRecord::PreCheck { .. })) < pos(&|r| matches!(r, KubeStepRecord::Gitops(_))),
        "pre-checks come before the suspend"
    );

    // The resume command's patch, applied, gives back the Application as it was.
    let mut resumed = app.clone();
    json_patch::merge(&mut resumed, &resume);
    assert_eq!(
        resumed["spec"],
        application(json!({"prune": true, "selfHeal": true}))["spec"]
    );
    assert_eq!(resumed["metadata"]["annotations"], json!({}));

    // A second run (a takeover after a crash) writes nothing and still says how to resume.
    let writes = fake.writes();
    let (again, records) = run(&fake, &t, false).await;
    let again = again.expect("second run");
    assert!(!again.changed);
    assert_eq!(fake.writes(), writes, "nothing written twice");
    match gitops_steps(&records)[..] {
        [GitOpsStep::AlreadyOff {
            by_us: true,
            resume_commands: again_commands,
            ..
        }] => assert_eq!(again_commands, resume_commands),
        ref other => panic!("already off by us: {other:?}"),
    }
}

#[tokio::test]
async fn flux_kustomizations_and_helmreleases_get_spec_suspend_true() {
    for (kind, plural, flux_cmd) in [
        (
            "Kustomization",
            "kustomizations",
            "flux resume kustomization apps -n flux-system",
        ),
        (
            "HelmRelease",
            "helmreleases",
            "flux resume helmrelease apps -n flux-system",
        ),
    ] {
        let fake = FakeKube::start().await;
        release_world(&fake);
        fake.insert(plural, flux_object("apps"));
        let t = undo_target(json!({"flux": {"kind": kind, "name": "apps", "namespace": "flux-system"}}));
        let (result, records) = run(&fake, &t, false).await;
        result.expect("revert succeeds");
        let obj = fake.get(plural, "flux-system", "apps").expect("flux object");
        assert_eq!(obj["spec"]["suspend"], true, "{kind}");
        assert_eq!(obj["spec"]["prune"], true, "{kind}: the rest of the spec stays");
        assert_eq!(image(&fake), "portal-api:0.9.0");
        let patched = patches(&fake);
        assert!(
            patched[0].contains(&format!("/namespaces/flux-system/{plural}/apps")),
            "{patched:?}"
        );
        assert!(patched[1].ends_with(DEPLOY_PATH), "{patched:?}");
        match gitops_steps(&records)[..] {
            [GitOpsStep::Suspended { resume_commands, .. }] => assert_eq!(resume_commands[1], flux_cmd),
            ref other => panic!("{kind}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_missing_application_stops_the_rollback_before_anything_is_written() {
    let fake = FakeKube::start().await;
    release_world(&fake);
    let (result, records) = run(&fake, &undo_target(argo_gitops(true)), false).await;
    let err = result.expect_err("no Application: no revert");
    assert!(matches!(err, KubeError::GitOpsSuspend { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with("could not suspend Argo CD application argocd/portal-api before the revert: Application argocd/portal-api not found; nothing was reverted"),
        "{message}"
    );
    assert!(message.contains("gitops.required: false"), "{message}");
    assert_eq!(err.code(), "gitops_suspend_failed");
    assert_eq!(fake.writes(), 0);
    assert_eq!(image(&fake), "portal-api:1.0.0");
    assert!(gitops_steps(&records).is_empty());
}

#[tokio::test]
async fn a_forbidden_suspend_stops_the_rollback_and_names_the_rbac_rule() {
    let fake = FakeKube::start().await;
    release_world(&fake);
    fake.insert("applications", application(json!({"selfHeal": true})));
    fake.deny("patch", "applications");
    let (result, _) = run(&fake, &undo_target(argo_gitops(true)), false).await;
    let message = result.expect_err("403: no revert").to_string();
    assert!(
        message.contains(
            "forbidden: the responder may not patch applications (API group \"argoproj.io\") in namespace argocd"
        ),
        "{message}"
    );
    assert!(message.contains("deploy/kubernetes/gitops/"), "{message}");
    assert_eq!(fake.writes(), 0);
    assert_eq!(image(&fake), "portal-api:1.0.0");
}

#[tokio::test]
async fn not_required_the_revert_goes_on_with_a_warning_step() {
    let fake = FakeKube::start().await;
    release_world(&fake);
    let (result, records) = run(&fake, &undo_target(argo_gitops(false)), false).await;
    let outcome = result.expect("required: false: the revert goes on");
    assert!(outcome.changed);
    assert_eq!(image(&fake), "portal-api:0.9.0");
    match gitops_steps(&records)[..] {
        [w @ GitOpsStep::NotSuspended { error, .. }] => {
            assert_eq!(error, "Application argocd/portal-api not found");
            assert!(w
                .describe()
                .starts_with("WARNING: could not suspend the automated sync of Argo CD application argocd/portal-api"));
        }
        ref other => panic!("a warning: {other:?}"),
    }
}

#[tokio::test]
async fn a_dry_run_patches_nothing_and_says_what_it_would_suspend() {
    let fake = FakeKube::start().await;
    release_world(&fake);
    let app = fake.insert("applications", application(json!({"prune": true})));
    let (result, records) = run(&fake, &undo_target(argo_gitops(true)), true).await;
    let outcome = result.expect("dry run");
    assert!(outcome.dry_run && !outcome.changed);
    assert_eq!(fake.writes(), 0);
    assert_eq!(fake.get("applications", "argocd", "portal-api"), Some(app));
    assert_eq!(image(&fake), "portal-api:1.0.0");
    let app_patch = fake
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH" && r.path == APP_PATH)
        .expect("the patch is sent for the server to validate");
    assert_eq!(app_patch.query.get("dryRun").map(String::as_str), Some("All"));
    match gitops_steps(&records)[..] {
        [d @ GitOpsStep::DryRun { .. }] => {
            assert!(d.describe().starts_with("dry run: would suspend the automated sync"))
        }
        ref other => panic!("dry run step: {other:?}"),
    }
}

#[tokio::test]
async fn a_suspend_that_loses_a_race_rereads_and_tries_again() {
    let fake = FakeKube::start().await;
    release_world(&fake);
    fake.insert("applications", application(json!({"prune": true})));
    // Argo CD's controller writes the Application's status between our read and our patch.
    fake.concurrent_writes(1);
    let (result, records) = run(&fake, &undo_target(argo_gitops(true)), false).await;
    result.expect("revert succeeds after the retry");
    let app = fake.get("applications", "argocd", "portal-api").unwrap();
    assert!(app["spec"]["syncPolicy"].get("automated").is_none());
    match gitops_steps(&records)[..] {
        [GitOpsStep::ConflictRetry {
            attempt: 1,
            will_retry: true,
            ..
        }, GitOpsStep::Suspended { attempt: 2, .. }] => {}
        ref other => panic!("a retry, then suspended: {other:?}"),
    }
}

/// Another writer wins every race: after `max_conflict_retries` re-reads the suspend gives up,
/// and nothing is reverted.
#[tokio::test]
async fn a_suspend_that_keeps_losing_races_gives_up_with_nothing_reverted() {
    let fake = FakeKube::start().await;
    release_world(&fake);
    fake.insert("applications", application(json!({"prune": true})));
    fake.concurrent_writes(10);
    let (result, records) = run(&fake, &undo_target(argo_gitops(true)), false).await;
    let err = result.expect_err("gave up");
    let message = err.to_string();
    assert!(
        message.starts_with("could not suspend Argo CD application argocd/portal-api before the revert: conflict: Application argocd/portal-api changed under us 4 time(s)"),
        "{message}"
    );
    assert!(err.is_retryable(), "a later run may win the race");
    let races = gitops_steps(&records);
    assert_eq!(races.len(), 4, "{races:?}");
    assert!(matches!(
        races[3],
        GitOpsStep::ConflictRetry {
            attempt: 4,
            will_retry: false,
            ..
        }
    ));
    assert_eq!(fake.writes(), 0);
    assert_eq!(image(&fake), "portal-api:1.0.0");
}

#[tokio::test]
async fn automation_already_off_is_left_alone_and_the_revert_runs() {
    let fake = FakeKube::start().await;
    release_world(&fake);
    let mut manual = application(Value::Null);
    manual["spec"]["syncPolicy"] = json!({});
    let stored = fake.insert("applications", manual);
    let (result, records) = run(&fake, &undo_target(argo_gitops(true)), false).await;
    result.expect("revert");
    assert_eq!(fake.get("applications", "argocd", "portal-api"), Some(stored));
    assert_eq!(image(&fake), "portal-api:0.9.0");
    assert!(matches!(
        gitops_steps(&records)[..],
        [GitOpsStep::AlreadyOff { by_us: false, .. }]
    ));
}

/// A pre-check that refuses ends the rollback before the suspend: Argo CD is left syncing,
/// nothing of it to resume.
#[tokio::test]
async fn a_failed_pre_check_leaves_the_application_untouched() {
    let fake = FakeKube::start().await;
    fake.insert(
        "services",
        service(NS, "portal-api-prod", &[("app", "portal-api"), ("version", "v1.0.0")]),
    );
    fake.insert(
        "pods",
        pod(NS, "stable-0", &[("app", "portal-api"), ("version", "v0.9.0")], false),
    );
    fake.insert("applications", application(json!({"prune": true})));
    let mut t = undo_target(argo_gitops(true));
    t.steps = vec![KubeStep::SwitchService {
        service: "portal-api-prod".into(),
        selector: [("app", "portal-api"), ("version", "v0.9.0")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }];
    let (result, _) = run(&fake, &t, false).await;
    assert!(result.expect_err("pre-check").is_precheck());
    assert!(
        fake.requests().iter().all(|r| !r.path.contains("argoproj.io")),
        "the Application is not even read"
    );
    assert_eq!(fake.writes(), 0);
}

mod service;
