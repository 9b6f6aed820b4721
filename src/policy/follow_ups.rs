//! `follow_ups`: what a policy's rollback leaves to people (restore the database, purge a cache,
//! switch DNS back). The responder never does these; its messages list them once the rollback
//! has run (Slack root and thread, PagerDuty details, the incident page) so nobody forgets them.
//! Each entry is one line of a list in Slack and PagerDuty: bounded, so a policy cannot make a
//! message Slack refuses.

/// At most this many follow-ups per policy.
pub const MAX_FOLLOW_UPS: usize = 20;
/// At most this many characters per follow-up.
pub const MAX_FOLLOW_UP_CHARS: usize = 200;

/// Errors in a policy's `follow_ups` as `(text to locate in the file, message)`.
pub(super) fn check(follow_ups: &[String]) -> Vec<(String, String)> {
    let mut errs = Vec::new();
    let at_key = "follow_ups:".to_string();
    if follow_ups.len() > MAX_FOLLOW_UPS {
        errs.push((
            at_key.clone(),
            format!(
                "follow_ups: {} entries, at most {MAX_FOLLOW_UPS}: keep the list to what a person must do after the \
                 rollback and link the rest from the runbook",
                follow_ups.len()
            ),
        ));
    }
    for (i, f) in follow_ups.iter().enumerate() {
        // Locate the entry by its text; an empty one has none, so the key's line.
        let at = f.lines().find(|l| !l.trim().is_empty()).unwrap_or(&at_key).to_string();
        let n = f.chars().count();
        if f.trim().is_empty() {
            errs.push((
                at_key.clone(),
                format!("follow_ups[{i}]: empty; write what a person must do, e.g. \"Purge the CDN cache\""),
            ));
        } else if n > MAX_FOLLOW_UP_CHARS {
            errs.push((
                at,
                format!(
                    "follow_ups[{i}]: {n} characters, at most {MAX_FOLLOW_UP_CHARS}: one line per follow-up (put \
                     details in the runbook)"
                ),
            ));
        } else if f.chars().any(char::is_control) {
            errs.push((
                at,
                format!("follow_ups[{i}]: contains a line break or control character; one line per follow-up"),
            ));
        } else if follow_ups[..i].iter().any(|g| g.trim() == f.trim()) {
            errs.push((at, format!("follow_ups[{i}]: {:?} is listed twice", f.trim())));
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(list: &[&str]) -> Vec<String> {
        check(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .into_iter()
            .map(|(_, m)| m)
            .collect()
    }

    const POLICY: &str = "name: web
service: web
target:
  alb:
    listener_arn: arn:aws:elasticloadbalancing:us-east-1:1:listener/app/web/1/2
    stable_target_group_arn: arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/web-stable/1
triggers:
  - name: errors
    matchers: ['alertname=\"HighErrorRate\"']
    mode: auto
follow_ups:
  - Purge the CDN cache
  - ''
  - Purge the CDN cache
";

    fn load(text: &str) -> Vec<String> {
        let dir = std::path::Path::new("p");
        match super::super::PolicySet::from_sources(dir, vec![(dir.join("web.yaml"), text.to_string())]) {
            Ok(_) => vec![],
            Err(errs) => errs.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn a_bad_follow_up_refuses_the_policy_with_file_line_and_key() {
        assert_eq!(
            load(POLICY),
            [
                "p/web.yaml:11: follow_ups[1]: empty; write what a person must do, e.g. \"Purge the CDN cache\"",
                "p/web.yaml:12: follow_ups[2]: \"Purge the CDN cache\" is listed twice",
            ]
        );
        // Not a list of strings: serde's error at its line, pointing at the documented shape.
        let errs = load(&POLICY.replace("  - ''\n", "  - {restore: db}\n"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("p/web.yaml:13: follow_ups[1]: invalid type"),
            "{}",
            errs[0]
        );
        assert!(load(
            &POLICY
                .replace("  - ''\n", "  - Switch DNS back\n")
                .replace("  - Purge the CDN cache\n", "")
        )
        .is_empty());
    }

    #[test]
    fn every_shipped_policy_lists_what_it_leaves_to_people() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let set = super::super::PolicySet::load_dir(&dir).unwrap_or_else(|e| panic!("{e:?}"));
        for p in set.iter() {
            assert!(!p.follow_ups.is_empty(), "policies/{}: no follow_ups", p.name);
        }
    }

    #[test]
    fn plain_short_distinct_lines_pass() {
        assert!(messages(&[]).is_empty());
        assert!(messages(&[
            "Restore the database from the pre-release snapshot",
            "Purge the CDN cache"
        ])
        .is_empty());
    }

    #[test]
    fn empty_long_multiline_duplicate_and_too_many_are_named_by_index() {
        assert_eq!(
            messages(&["ok", "  "]),
            ["follow_ups[1]: empty; write what a person must do, e.g. \"Purge the CDN cache\""]
        );
        let long = "x".repeat(MAX_FOLLOW_UP_CHARS + 1);
        assert!(messages(&[&long])[0].starts_with("follow_ups[0]: 201 characters, at most 200"));
        assert!(messages(&["a\nb"])[0].starts_with("follow_ups[0]: contains a line break"));
        assert_eq!(
            messages(&["Purge the cache", "Purge the cache "]),
            ["follow_ups[1]: \"Purge the cache\" is listed twice"]
        );
        let many: Vec<String> = (0..=MAX_FOLLOW_UPS).map(|i| format!("step {i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(messages(&refs)[0].starts_with("follow_ups: 21 entries, at most 20"));
    }
}
