use rollback_responder::action::{kubernetes::KubeSettings, Executors};
use rollback_responder::app::preflight::Unexecutable;
use rollback_responder::app::Application;
use rollback_responder::config;

use crate::helpers::*;

/// Builds the service on the default test policy (an ALB target) outside dry run with
/// `executors`; the error if it refuses.
async fn build(executors: Option<Executors>) -> Option<anyhow::Error> {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("checkout.yaml"), CHECKOUT_POLICY).unwrap();
    let db = format!("sqlite://{}", dir.path().join("rr.db").display());
    let vars = env(&[
        ("ROLLBACK_RESPONDER__STORE__URL", &db),
        ("ROLLBACK_RESPONDER__POLICIES_DIR", policies.to_str().unwrap()),
        ("ROLLBACK_RESPONDER__SAFETY__DRY_RUN", "false"),
    ]);
    let cfg = config::load_from(None, Some("127.0.0.1:0".parse().unwrap()), vars).unwrap();
    Application::build_with(cfg, executors).await.err()
}

#[tokio::test]
async fn a_policy_whose_executor_is_not_configured_refuses_start_up_outside_dry_run() {
    // No executor at all, then only the other kind: an ALB rollback could only be recorded
    // while PagerDuty and the status page were told it was under way.
    let kube_only = Executors {
        kube: Some(rollback_responder::action::kubernetes::KubeExecutor::new(
            crate::support::fake_kube::FakeKube::start().await.client(),
            &KubeSettings::default(),
        )),
        ..Default::default()
    };
    for executors in [None, Some(kube_only)] {
        let err = build(executors).await.expect("start-up is refused");
        let why = err.downcast_ref::<Unexecutable>().unwrap_or_else(|| panic!("{err:#}"));
        assert_eq!(why.0.len(), 1, "{why}");
        assert!(
            why.0[0].contains("checkout.yaml: policy \"checkout\" reverts an ALB target")
                && why.0[0].contains("add `aws:` settings")
                && why.0[0].contains("safety.dry_run: true"),
            "{why}"
        );
    }
    // With its executor the same set starts.
    let with_alb = Executors {
        alb: Some(alb_never_called()),
        ..Default::default()
    };
    assert!(build(Some(with_alb)).await.is_none());
}
