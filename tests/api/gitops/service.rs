//! GitOps through the whole service: what the incident and Slack say of the suspend.

use super::*;

// ---------------------------------------------------------------------------------------------
// Through the whole service
// ---------------------------------------------------------------------------------------------

const POLICY: &str = r##"
name: portal-api-gitops
service: portal-api
matchers: ['service="portal-api"']
target:
  kubernetes:
    namespace: portal
    rollout_timeout: 5s
    gitops:
      argocd: {application: portal-api, namespace: argocd}
    steps:
      - rollout_undo: {deployment: portal-api}
triggers:
  - name: errors
    matchers: ['alertname="HighErrorRate"']
    mode: auto
verification: {bake: 1s, interval: 200ms}
notify:
  slack: {channel: "#portal-alerts"}
"##;

async fn service_app(fake: &FakeKube, slack: &wiremock::MockServer) -> TestApp {
    spawn_app(Options {
        policies: vec![("portal-api-gitops.yaml", POLICY.to_string())],
        env: env(&[
            ("ROLLBACK_RESPONDER__SLACK__API_URL", &slack.uri()),
            ("ROLLBACK_RESPONDER__SLACK__BOT_TOKEN", crate::notify::SLACK_TOKEN),
        ]),
        executors: Some(Executors {
            kube: Some(KubeExecutor::new(fake.client(), &KubeSettings::default())),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await
}

fn action_steps(inc: &Value) -> Vec<String> {
    inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "action_step")
        .map(|e| e["summary"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn slack_texts(slack: &SlackFake, until: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let texts: Vec<String> = slack.messages().into_iter().map(|m| m.text).collect();
        if until(&texts) {
            return texts;
        }
        assert!(std::time::Instant::now() < deadline, "slack so far: {texts:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An alert from a real Alertmanager: the Application's automated sync is suspended, then the
/// Deployment is undone; the timeline and the Slack thread carry the resume command.
#[tokio::test]
async fn the_incident_tells_people_that_sync_is_suspended_and_how_to_resume_it() {
    let fake = FakeKube::start().await;
    release_world(&fake);
    fake.insert("applications", application(json!({"prune": true, "selfHeal": true})));
    let (slack_server, slack) = SlackFake::start().await;
    let app = service_app(&fake, &slack_server).await;
    let am = Alertmanager::start(&app.url("/webhook/alertmanager"), TOKEN).await;
    let run = uuid::Uuid::now_v7().simple().to_string();
    am.post(
        json!({"alertname": "HighErrorRate", "service": "portal-api", "run": run}),
        &ago(5),
        None,
    )
    .await;
    let list = app
        .wait_incidents("the rollback to run", |l| l.len() == 1 && l[0]["executed"] == true)
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    assert_eq!(image(&fake), "portal-api:0.9.0");
    let automated_gone = fake.get("applications", "argocd", "portal-api").unwrap()["spec"]["syncPolicy"]
        .get("automated")
        .is_none();
    assert!(automated_gone);

    let resume = "kubectl -n argocd patch applications.argoproj.io portal-api --type merge -p";
    let steps = action_steps(&inc);
    let suspended = steps
        .iter()
        .position(|s| {
            s.starts_with("Argo CD application argocd/portal-api: automated sync suspended before the revert")
        })
        .unwrap_or_else(|| panic!("no suspend step: {steps:#?}"));
    assert!(steps[suspended].contains(resume), "{}", steps[suspended]);
    let undone = steps
        .iter()
        .position(|s| s.starts_with("deployment/portal-api patched"))
        .unwrap_or_else(|| panic!("no undo step: {steps:#?}"));
    assert!(suspended < undone, "suspended before the revert: {steps:#?}");
    let detail = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "action_step" && e["detail"]["step"] == "gitops")
        .expect("the gitops step's record");
    assert_eq!(
        detail["detail"]["resume"]["spec"]["syncPolicy"]["automated"],
        json!({"prune": true, "selfHeal": true}),
        "the original automated policy is recorded"
    );

    // The action's result, the last word on it, repeats how to resume.
    let succeeded = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "action_succeeded")
        .expect("action_succeeded");
    assert!(
        succeeded["summary"].as_str().unwrap().contains(resume),
        "{}",
        succeeded["summary"]
    );

    let texts = slack_texts(&slack, |t| t.iter().any(|m| m.contains(resume))).await;
    assert!(
        texts
            .iter()
            .any(|m| m.contains("automated sync suspended before the revert") && m.contains(resume)),
        "{texts:#?}"
    );
}

/// The Application named in the policy does not exist: the incident fails, nothing reverted,
/// and the failure names the Application.
#[tokio::test]
async fn a_missing_application_fails_the_incident_with_nothing_reverted() {
    let fake = FakeKube::start().await;
    release_world(&fake);
    let (slack_server, _slack) = SlackFake::start().await;
    let app = service_app(&fake, &slack_server).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "f9e1d2c3b4a59687", &ago(5), None)],
    ))
    .await;
    let list = app
        .wait_incidents("the incident to fail", |l| l.len() == 1 && l[0]["phase"] == "failed")
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    assert_eq!(inc["executed"], false);
    let failed = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "action_failed")
        .unwrap_or_else(|| panic!("no action_failed: {}", inc["timeline"]));
    let summary = failed["summary"].as_str().unwrap();
    assert!(
        summary.starts_with(
            "rollback failed, nothing was changed: could not suspend Argo CD application argocd/portal-api"
        ),
        "{summary}"
    );
    assert!(summary.contains("Application argocd/portal-api not found"), "{summary}");
    assert_eq!(fake.writes(), 0);
    assert_eq!(image(&fake), "portal-api:1.0.0");
}

/// The suspend took but the Deployment's undo was refused: a partial rollback. The failure
/// says the GitOps sync was suspended (with the resume command) and that no Kubernetes object
/// was reverted, never "nothing was changed"; Slack hears the same.
#[tokio::test]
async fn a_suspend_followed_by_a_failed_undo_is_a_partial_rollback_that_says_so() {
    let fake = FakeKube::start().await;
    release_world(&fake);
    fake.insert("applications", application(json!({"prune": true})));
    fake.deny("patch", "deployments");
    let (slack_server, slack) = SlackFake::start().await;
    let app = service_app(&fake, &slack_server).await;
    app.post_webhook(&payload(
        "firing",
        vec![alert("HighErrorRate", "portal-api", "a1b2c3d4e5f60718", &ago(5), None)],
    ))
    .await;
    let list = app
        .wait_incidents("the incident to fail", |l| l.len() == 1 && l[0]["phase"] == "failed")
        .await;
    let inc = app.incident(list[0]["id"].as_str().unwrap()).await;
    let automated_gone = fake.get("applications", "argocd", "portal-api").unwrap()["spec"]["syncPolicy"]
        .get("automated")
        .is_none();
    assert!(automated_gone, "the suspend took");
    assert_eq!(image(&fake), "portal-api:1.0.0");
    assert_eq!(inc["executed"], true, "the suspend is this incident's change: {inc:#}");
    let failed = inc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "action_failed")
        .unwrap_or_else(|| panic!("no action_failed: {}", inc["timeline"]));
    let summary = failed["summary"].as_str().unwrap();
    let resume = "resume with: kubectl -n argocd patch applications.argoproj.io portal-api --type merge -p";
    assert!(
        summary.starts_with(
            "partial rollback: Argo CD application argocd/portal-api: automated sync suspended before the revert"
        ),
        "{summary}"
    );
    assert!(summary.contains(resume), "{summary}");
    assert!(summary.contains("no Kubernetes object was reverted"), "{summary}");
    assert!(
        summary.contains("forbidden: the responder may not patch deployments"),
        "{summary}"
    );
    assert!(!summary.contains("nothing was changed"), "{summary}");
    assert_eq!(
        failed["detail"]["applied"].as_array().map(Vec::len),
        Some(1),
        "{failed:#}"
    );
    assert_eq!(failed["detail"]["detail"]["error"], "nothing_reverted_after_suspend");
    let texts = slack_texts(&slack, |t| {
        t.iter().any(|m| m.contains("no Kubernetes object was reverted"))
    })
    .await;
    assert!(!texts.iter().any(|m| m.contains("nothing was changed")), "{texts:#?}");
}

// ---------------------------------------------------------------------------------------------
// Bad policy input
// ---------------------------------------------------------------------------------------------

fn load(gitops: &str) -> Vec<String> {
    let text = POLICY.replace("      argocd: {application: portal-api, namespace: argocd}\n", gitops);
    assert_ne!(text, POLICY, "the replacement applies");
    match PolicySet::from_sources(Path::new("policies"), vec![("policies/gitops.yaml".into(), text)]) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn bad_gitops_sections_are_refused_naming_file_line_and_key() {
    assert_eq!(
        load("      flux: {kind: Kustomization, name: apps}\n"),
        Vec::<String>::new()
    );

    let unknown = load("      flux: {kind: GitRepository, name: apps}\n");
    assert_eq!(unknown.len(), 1, "{unknown:?}");
    assert!(unknown[0].starts_with("policies/gitops.yaml:10:"), "{unknown:?}");
    assert!(
        unknown[0].contains("unknown variant `GitRepository`, expected `Kustomization` or `HelmRelease`"),
        "{unknown:?}"
    );

    let empty = load("      argocd: {application: ''}\n");
    assert_eq!(
        empty,
        ["policies/gitops.yaml:5: target.kubernetes.gitops.argocd.application: must not be empty; name the Argo CD Application that syncs these objects"]
    );
    let empty = load("      flux: {kind: HelmRelease, name: ''}\n");
    assert!(
        empty[0].starts_with("policies/gitops.yaml:5: target.kubernetes.gitops.flux.name: must not be empty"),
        "{empty:?}"
    );
    let neither = load("      required: false\n");
    assert!(
        neither[0].contains("target.kubernetes.gitops: name the object to suspend"),
        "{neither:?}"
    );
    let typo = load("      argo: {application: portal-api}\n");
    assert!(typo[0].contains("unknown field `argo`"), "{typo:?}");
}
