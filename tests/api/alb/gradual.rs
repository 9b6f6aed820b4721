//! Gradual shifts: step by step, and a takeover in the middle of one.

use super::*;

#[tokio::test]
async fn gradual_shift_steps_to_fifty_then_hundred() {
    let fx = AlbFixture::start().await;
    let interval = Duration::from_millis(300);
    let gradual = Some(GradualShift {
        steps: vec![50, 100],
        interval,
    });
    // The rule starts at stable 10 %: both steps are written.
    let t = AlbTarget {
        gradual: gradual.clone(),
        ..fx.rule_target()
    };
    let started = Instant::now();
    let (result, steps) = revert(&fx.executor(), &t, false).await;
    assert!(matches!(result, Ok(AlbOutcome::Reverted { .. })), "{result:?}");
    assert!(started.elapsed() >= interval);
    let written: Vec<u8> = steps
        .iter()
        .filter_map(|s| match s {
            AlbStep::Wrote { stable_percent, .. } => Some(*stable_percent),
            _ => None,
        })
        .collect();
    assert_eq!(written, vec![50, 100]);
    let halfway = steps
        .iter()
        .find_map(|s| match s {
            AlbStep::ReadBack {
                stable_percent: 50,
                snapshot,
                matches: true,
            } => Some(snapshot.clone()),
            _ => None,
        })
        .expect("read-back after the 50 % step");
    let fwd = halfway.forward.expect("forward");
    let ws: Vec<Option<i32>> = fwd.target_groups.iter().map(|g| g.weight).collect();
    assert_eq!(ws, vec![Some(50), Some(50)]);
    assert!(steps.iter().any(|s| matches!(
        s,
        AlbStep::Waiting {
            interval_ms: 300,
            next_stable_percent: 100
        }
    )));
    assert_eq!(weights(&fx.rule_actions().await), w(&fx, 100, 0));

    // The listener is already at stable 75 %: the 50 % step is skipped, never moving
    // traffic back towards the canary.
    let t = AlbTarget {
        gradual,
        ..fx.listener_target()
    };
    let (result, steps) = revert(&fx.executor(), &t, false).await;
    assert!(matches!(result, Ok(AlbOutcome::Reverted { .. })), "{result:?}");
    assert_eq!(wrote(&steps), 1);
    assert_eq!(weights(&fx.listener_actions().await), w(&fx, 100, 0));
}

/// A replica dies while waiting between two gradual steps (its revert is dropped after the
/// 50 % step) and another takes over: it goes on from the weights at the rule, waits only what
/// is left of the interval since the 50 % write (neither skipping the wait nor starting it
/// again), then waits the full interval before the last step, and says where it resumed.
#[tokio::test]
async fn a_takeover_mid_shift_resumes_from_the_weights_read_and_keeps_the_interval() {
    use rollback_responder::action::alb::Resume;
    use rollback_responder::action::retry::no_gate;
    use rollback_responder::action::EarlierStep;

    let fx = AlbFixture::start().await;
    let interval = Duration::from_millis(1500);
    let t = AlbTarget {
        gradual: Some(GradualShift {
            steps: vec![50, 80, 100],
            interval,
        }),
        ..fx.rule_target()
    };
    let exec = fx.executor();

    // The first attempt: every step kept with the instant it was reported; it dies (is
    // dropped) once it starts waiting for the 80 % step.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, AlbStep)>();
    let first = async {
        let mut record = |s: AlbStep| {
            let _ = tx.send((Instant::now(), s));
        };
        exec.revert(&t, false, &mut record).await
    };
    let mut seen: Vec<(Instant, AlbStep)> = Vec::new();
    tokio::select! {
        r = first => panic!("the first attempt ran to its end: {r:?}"),
        _ = async {
            while let Some(s) = rx.recv().await {
                let waiting = matches!(s.1, AlbStep::Waiting { .. });
                seen.push(s);
                if waiting {
                    break;
                }
            }
        } => {}
    }
    assert_eq!(weights(&fx.rule_actions().await), w(&fx, 50, 50));
    let wrote_50 = seen
        .iter()
        .find(|(_, s)| matches!(s, AlbStep::Wrote { stable_percent: 50, .. }))
        .map(|(at, _)| *at)
        .expect("the 50 % write");

    // The takeover comes a while later, with what the first attempt recorded.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let earlier: Vec<EarlierStep> = seen
        .iter()
        .map(|(at, s)| EarlierStep {
            ago: at.elapsed(),
            detail: serde_json::to_value(s).unwrap(),
        })
        .collect();
    let resume = Resume::from_earlier(&earlier);
    let taken_over = Instant::now();
    let mut steps: Vec<(Instant, AlbStep)> = Vec::new();
    let mut record = |s: AlbStep| steps.push((Instant::now(), s));
    let result = exec.revert_resuming(&t, false, &mut record, &no_gate, &resume).await;
    assert!(matches!(result, Ok(AlbOutcome::Reverted { .. })), "{result:?}");
    assert_eq!(weights(&fx.rule_actions().await), w(&fx, 100, 0));

    let written: Vec<(Instant, u8)> = steps
        .iter()
        .filter_map(|(at, s)| match s {
            AlbStep::Wrote { stable_percent, .. } => Some((*at, *stable_percent)),
            _ => None,
        })
        .collect();
    assert_eq!(
        written.iter().map(|w| w.1).collect::<Vec<_>>(),
        vec![80, 100],
        "{steps:?}"
    );
    // The wait before 80 % counts from the 50 % write, not from the takeover.
    let gap = written[0].0 - wrote_50;
    assert!(gap >= interval, "80 % came {gap:?} after 50 %: the wait was skipped");
    assert!(
        written[0].0 - taken_over < interval,
        "80 % came {:?} after the takeover: the wait began again",
        written[0].0 - taken_over
    );
    assert!(written[1].0 - written[0].0 >= interval, "the interval before 100 %");
    let resumed = steps
        .iter()
        .find_map(|(_, s)| match s {
            AlbStep::Resumed {
                stable_percent,
                last_stable_percent,
                next_stable_percent,
                wait_ms,
                ..
            } => Some((*stable_percent, *last_stable_percent, *next_stable_percent, *wait_ms)),
            _ => None,
        })
        .expect("a resumed step");
    assert_eq!((resumed.0, resumed.1, resumed.2), (50, 50, 80));
    assert!(resumed.3 > 0 && resumed.3 < 1500 - 600, "{resumed:?}");
    let said = steps
        .iter()
        .find(|(_, s)| matches!(s, AlbStep::Resumed { .. }))
        .map(|(_, s)| s.describe())
        .unwrap();
    assert!(
        said.starts_with(&format!(
            "resuming the interrupted gradual shift of {} at 50% stable (the earlier attempt's 50% step, recorded ",
            fx.rule_arn
        )) && said.contains("before shifting to 80% stable"),
        "{said}"
    );
    assert!(steps
        .iter()
        .all(|(_, s)| !matches!(s, AlbStep::Planned { stable_percent: 50, .. })));

    // A dry-run takeover describes the remaining steps without waiting or writing.
    fx.set_rule_weights(50, 50).await;
    let mut dry = Vec::new();
    let started = Instant::now();
    let result = exec
        .revert_resuming(
            &t,
            true,
            &mut |s| dry.push(s),
            &no_gate,
            &Resume::from_earlier(&earlier),
        )
        .await;
    assert!(matches!(result, Ok(AlbOutcome::DryRun { .. })), "{result:?}");
    assert!(started.elapsed() < interval);
    assert_eq!(wrote(&dry), 0);
    assert_eq!(weights(&fx.rule_actions().await), w(&fx, 50, 50));
}
