use super::*;

/// A caller that names no incident.
fn none() -> ForIncident {
    ForIncident::default()
}

fn incident(id: &str, opened: &str) -> ForIncident {
    ForIncident {
        id: Some(id.into()),
        opened_at: Some(DateTime::parse_from_rfc3339(opened).expect("time").with_timezone(&Utc)),
    }
}

fn argo() -> Owner {
    Owner::ArgoCd {
        namespace: "argocd".into(),
        application: "portal-api".into(),
    }
}

fn flux(kind: FluxKind) -> Owner {
    Owner::Flux {
        kind,
        namespace: "flux-system".into(),
        name: "apps".into(),
    }
}

fn app(automated: Value) -> Value {
    json!({
        "metadata": {"name": "portal-api", "namespace": "argocd", "resourceVersion": "41"},
        "spec": {"project": "default", "syncPolicy": {"automated": automated, "syncOptions": ["CreateNamespace=true"]}},
    })
}

fn parse(yaml: &str) -> Result<GitOps, String> {
    serde_norway::from_str::<GitOps>(yaml).map_err(|e| e.to_string())
}

#[test]
fn automated_sync_is_removed_and_what_was_there_becomes_the_resume_patch() {
    let Plan::Suspend { patch, resume } = plan(&argo(), &app(json!({"prune": true, "selfHeal": true})), &none()) else {
        panic!("automated sync is on: suspend");
    };
    let expected_resume = json!({
        "metadata": {"annotations": {RESUME_ANNOTATION: null}},
        "spec": {"syncPolicy": {"automated": {"prune": true, "selfHeal": true}}},
    });
    assert_eq!(resume, expected_resume);
    assert_eq!(
        patch,
        json!({
            "metadata": {"resourceVersion": "41", "annotations": {
                RESUME_ANNOTATION: json!({"resume": expected_resume}).to_string()
            }},
            "spec": {"syncPolicy": {"automated": null}},
        })
    );
    // Applied as a merge patch, only `automated` goes: syncOptions stay.
    let mut obj = app(json!({"prune": true, "selfHeal": true}));
    json_patch::merge(&mut obj, &patch);
    assert_eq!(
        obj["spec"]["syncPolicy"],
        json!({"syncOptions": ["CreateNamespace=true"]})
    );
    // ... and then reads as suspended by us, with the same resume patch.
    assert_eq!(
        plan(&argo(), &obj, &none()),
        Plan::AlreadyOff(Off::ThisIncident { resume: resume.clone() })
    );
    // The resume patch puts back exactly what was there and drops our annotation.
    json_patch::merge(&mut obj, &resume);
    let mut original = app(json!({"prune": true, "selfHeal": true}));
    original["metadata"]["annotations"] = json!({});
    assert_eq!(obj, original);
}

#[test]
fn argo_without_automation_is_already_off_and_not_ours_to_resume() {
    let mut manual = app(json!(null));
    manual["spec"]["syncPolicy"] = json!({"syncOptions": []});
    assert_eq!(plan(&argo(), &manual, &none()), Plan::AlreadyOff(Off::NotUs));
    // Argo CD 3: settings kept, automation disabled.
    assert_eq!(
        plan(&argo(), &app(json!({"enabled": false, "prune": true})), &none()),
        Plan::AlreadyOff(Off::NotUs)
    );
    assert!(matches!(
        plan(&argo(), &app(json!({"enabled": true})), &none()),
        Plan::Suspend { .. }
    ));
    // An empty `automated: {}` is automated sync without prune or self-heal: on.
    assert!(matches!(plan(&argo(), &app(json!({})), &none()), Plan::Suspend { .. }));
}

#[test]
fn flux_objects_get_suspend_true_and_resume_with_false() {
    for kind in [FluxKind::Kustomization, FluxKind::HelmRelease] {
        let obj =
            json!({"metadata": {"name": "apps", "resourceVersion": "7"}, "spec": {"interval": "10m", "prune": true}});
        let Plan::Suspend { patch, resume } = plan(&flux(kind), &obj, &none()) else {
            panic!("reconciling: suspend");
        };
        assert_eq!(patch["spec"], json!({"suspend": true}));
        assert_eq!(patch["metadata"]["resourceVersion"], "7");
        assert_eq!(resume["spec"], json!({"suspend": false}));
        let mut suspended = obj.clone();
        suspended["spec"]["suspend"] = json!(true);
        assert_eq!(plan(&flux(kind), &suspended, &none()), Plan::AlreadyOff(Off::NotUs));
        let mut explicit = obj;
        explicit["spec"]["suspend"] = json!(false);
        assert!(matches!(plan(&flux(kind), &explicit, &none()), Plan::Suspend { .. }));
    }
}

#[test]
fn resume_commands_are_exact_and_shell_safe() {
    let resume = json!({"metadata": {"annotations": {RESUME_ANNOTATION: null}}, "spec": {"syncPolicy": {"automated": {"prune": true}}}});
    assert_eq!(
        argo().resume_commands(&resume),
        [
            r#"kubectl -n argocd patch applications.argoproj.io portal-api --type merge -p '{"metadata":{"annotations":{"rollback-responder/gitops-resume":null}},"spec":{"syncPolicy":{"automated":{"prune":true}}}}'"#
        ]
    );
    let cmds = flux(FluxKind::HelmRelease).resume_commands(&json!({"spec": {"suspend": false}}));
    assert_eq!(
        cmds,
        [
            r#"kubectl -n flux-system patch helmreleases.helm.toolkit.fluxcd.io apps --type merge -p '{"spec":{"suspend":false}}'"#,
            "flux resume helmrelease apps -n flux-system",
        ]
    );
    assert_eq!(
        flux(FluxKind::Kustomization).resume_commands(&json!({}))[1],
        "flux resume kustomization apps -n flux-system"
    );
    assert_eq!(crate::policy::target::gitops::shell_quote("it's"), r"'it'\''s'");
}

#[test]
fn the_owner_names_its_api_resource() {
    let ar = argo().api_resource();
    assert_eq!(
        (ar.api_version.as_str(), ar.kind.as_str(), ar.plural.as_str()),
        ("argoproj.io/v1alpha1", "Application", "applications")
    );
    let ar = flux(FluxKind::Kustomization).api_resource();
    assert_eq!(ar.api_version, "kustomize.toolkit.fluxcd.io/v1");
    let ar = flux(FluxKind::HelmRelease).api_resource();
    assert_eq!(
        (ar.api_version.as_str(), ar.plural.as_str()),
        ("helm.toolkit.fluxcd.io/v2", "helmreleases")
    );
    for (group, resource, _) in RBAC_RULES {
        assert!(
            [argo(), flux(FluxKind::Kustomization), flux(FluxKind::HelmRelease)]
                .iter()
                .any(|o| o.group() == *group && o.resource() == *resource),
            "{group}/{resource}"
        );
    }
    assert_eq!(argo().describe(), "Argo CD application argocd/portal-api");
    assert_eq!(
        flux(FluxKind::HelmRelease).describe(),
        "Flux HelmRelease flux-system/apps"
    );
}

#[test]
fn policy_syntax_defaults_and_errors_name_the_key() {
    let g = parse("argocd: {application: portal-api}").expect("argocd");
    assert!(g.required);
    assert_eq!(g.owner(), Ok(argo()));
    let g = parse("flux: {kind: HelmRelease, name: apps}\nrequired: false").expect("flux");
    assert!(!g.required);
    assert_eq!(g.owner(), Ok(flux(FluxKind::HelmRelease)));

    let unknown = parse("flux: {kind: GitRepository, name: apps}").unwrap_err();
    assert!(
        unknown.contains("unknown variant `GitRepository`") && unknown.contains("Kustomization"),
        "{unknown}"
    );
    let typo = parse("argocd: {app: portal-api}").unwrap_err();
    assert!(typo.contains("unknown field `app`"), "{typo}");

    let err = |yaml: &str| parse(yaml).expect("parses").owner().unwrap_err();
    assert_eq!(
        err("argocd: {application: ''}"),
        "target.kubernetes.gitops.argocd.application: must not be empty; name the Argo CD Application that syncs these objects"
    );
    assert!(err("flux: {kind: Kustomization, name: ''}")
        .starts_with("target.kubernetes.gitops.flux.name: must not be empty"));
    assert!(err("flux: {kind: Kustomization, name: apps, namespace: Flux_System}")
        .starts_with("target.kubernetes.gitops.flux.namespace: must be a Kubernetes name"));
    assert!(
        err("argocd: {application: ../secrets}").starts_with("target.kubernetes.gitops.argocd.application: must be")
    );
    assert!(err("required: true").starts_with("target.kubernetes.gitops: name the object to suspend"));
    assert_eq!(
        err("argocd: {application: a}\nflux: {kind: Kustomization, name: b}"),
        "target.kubernetes.gitops: give argocd or flux, not both"
    );
}

#[test]
fn steps_say_what_happened_and_how_to_resume() {
    let resume = json!({"spec": {"suspend": false}});
    let owner = flux(FluxKind::Kustomization);
    let s = GitOpsStep::Suspended {
        resume_commands: owner.resume_commands(&resume),
        owner: owner.clone(),
        resume,
        attempt: 1,
    };
    assert_eq!(
        s.describe(),
        "Flux Kustomization flux-system/apps: reconciliation suspended before the revert, so it does not sync the \
         bad release back; once git holds the good version, resume with: kubectl -n flux-system patch \
         kustomizations.kustomize.toolkit.fluxcd.io apps --type merge -p '{\"spec\":{\"suspend\":false}}'  or  \
         flux resume kustomization apps -n flux-system"
    );
    // This incident's change, though it moves no traffic: a failure after it is a partial
    // rollback that says so.
    let step = crate::action::Step::from(crate::action::kubernetes::KubeStepRecord::Gitops(s.clone()));
    assert!(step.notable && step.applied);
    let theirs = GitOpsStep::AlreadyOff {
        owner: argo(),
        by_us: false,
        other_incident: None,
        resume_commands: vec![],
    };
    let step = crate::action::Step::from(crate::action::kubernetes::KubeStepRecord::Gitops(theirs.clone()));
    assert!(!step.applied);
    assert!(
        theirs.describe().contains("already off (not by the responder)"),
        "{}",
        theirs.describe()
    );
    let warn = GitOpsStep::NotSuspended {
        owner: argo(),
        error: "Application argocd/portal-api not found".into(),
    };
    assert!(warn
        .describe()
        .starts_with("WARNING: could not suspend the automated sync of Argo CD application"));
    assert!(warn.is_notable());
    let racing = GitOpsStep::ConflictRetry {
        owner: argo(),
        attempt: 1,
        will_retry: true,
    };
    assert!(!racing.is_notable());
    let v = serde_json::to_value(&s).expect("json");
    assert_eq!(
        (v["gitops"].as_str(), v["owner"]["tool"].as_str()),
        (Some("suspended"), Some("flux"))
    );
}

/// The annotation names the incident it was made for: a takeover of that incident finds its
/// own suspend; another incident finds an earlier incident's suspension, and says whose it is,
/// never "an earlier run of this rollback"; an older version's bare resume patch is nobody's.
#[test]
fn only_this_incidents_suspension_is_ours() {
    let first = incident("0190-first", "2026-12-01T10:00:00.123456Z");
    let Plan::Suspend { patch, resume } = plan(&argo(), &app(json!({"prune": true})), &first) else {
        panic!("suspend");
    };
    let mark: Value = serde_json::from_str(
        patch["metadata"]["annotations"][RESUME_ANNOTATION]
            .as_str()
            .expect("mark"),
    )
    .expect("json");
    assert_eq!(
        mark,
        json!({"incident": "0190-first", "incident_opened_at": "2026-12-01T10:00:00.123Z", "resume": resume})
    );
    let mut obj = app(json!({"prune": true}));
    json_patch::merge(&mut obj, &patch);
    assert_eq!(
        plan(&argo(), &obj, &first),
        Plan::AlreadyOff(Off::ThisIncident { resume: resume.clone() })
    );
    // The same incident known by its opening time only (a caller without the id).
    let by_time = ForIncident {
        id: None,
        opened_at: first.opened_at,
    };
    assert!(matches!(
        plan(&argo(), &obj, &by_time),
        Plan::AlreadyOff(Off::ThisIncident { .. })
    ));
    let later = incident("0190-later", "2026-12-03T10:00:00Z");
    let Plan::AlreadyOff(Off::OtherIncident { by, resume: theirs }) = plan(&argo(), &obj, &later) else {
        panic!("another incident's suspension: {:?}", plan(&argo(), &obj, &later));
    };
    assert_eq!(theirs, resume);
    assert_eq!(by.describe(), "incident 0190-first (opened 2026-12-01T10:00:00Z)");
    let step = GitOpsStep::AlreadyOff {
        owner: argo(),
        by_us: false,
        other_incident: Some(by),
        resume_commands: argo().resume_commands(&theirs),
    };
    let said = step.describe();
    assert!(
        said.starts_with(
            "Argo CD application argocd/portal-api: automated sync was already off, suspended by the responder for \
             incident 0190-first (opened 2026-12-01T10:00:00Z), not by this incident"
        ),
        "{said}"
    );
    assert!(!said.contains("earlier run"), "{said}");
    // An older version's annotation: the bare resume patch, naming no incident.
    let mut old = obj.clone();
    old["metadata"]["annotations"][RESUME_ANNOTATION] = json!(resume.to_string());
    assert!(matches!(
        plan(&argo(), &old, &later),
        Plan::AlreadyOff(Off::OtherIncident { by, .. }) if by == SuspendedFor::default()
    ));
    // Resumed by hand (the annotation left behind) and on again: suspended afresh, for us.
    let mut resumed = obj.clone();
    resumed["spec"]["syncPolicy"]["automated"] = json!({"prune": true});
    let Plan::Suspend { patch, .. } = plan(&argo(), &resumed, &later) else {
        panic!("suspend again");
    };
    let mark: Value = serde_json::from_str(
        patch["metadata"]["annotations"][RESUME_ANNOTATION]
            .as_str()
            .expect("mark"),
    )
    .expect("json");
    assert_eq!(mark["incident"], "0190-later");
}
