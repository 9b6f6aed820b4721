//! The terminal view: `incidents` and `incident ID` read a running service's API and print
//! tables people can read. Everything printed from the service is stripped of control
//! characters first: alert labels are attacker-controlled, and an escape sequence must not
//! repaint someone's terminal.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

/// Exit codes shared by every subcommand (documented in `--help`).
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// The answer is "no": invalid policies, a refused config, an unknown incident.
    pub const REFUSED: u8 = 1;
    /// The command line or an input file is wrong (clap uses 2 for usage errors too).
    pub const USAGE: u8 = 2;
    /// Something we depend on is unavailable: the service, its store; try again later.
    pub const UNAVAILABLE: u8 = 3;
}

/// Where and how to reach the service.
pub struct Target {
    pub url: String,
    pub token: Option<String>,
}

/// A failure with the exit code it maps to.
struct Failure(u8, String);

fn client() -> Result<reqwest::Client, Failure> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Failure(exit::UNAVAILABLE, format!("cannot build an HTTP client: {e}")))
}

async fn get(t: &Target, path: &str) -> Result<Value, Failure> {
    let base = t.url.trim_end_matches('/');
    let url = format!("{base}{path}");
    let mut req = client()?.get(&url);
    if let Some(token) = &t.token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.map_err(|e| {
        if e.is_builder() {
            Failure(exit::USAGE, format!("--url {}: not a URL ({e})", t.url))
        } else {
            Failure(
                exit::UNAVAILABLE,
                format!(
                    "cannot reach {base}: {} (is the service running? see --url)",
                    root_cause(&e)
                ),
            )
        }
    })?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let message = body["error"].as_str().map(clean).unwrap_or_default();
    match status.as_u16() {
        200..=299 => Ok(body),
        401 => Err(Failure(
            exit::USAGE,
            format!("{base} needs the read token: --token or ROLLBACK_RESPONDER_TOKEN"),
        )),
        404 => Err(Failure(exit::REFUSED, message)),
        400..=499 => Err(Failure(exit::USAGE, format!("{status}: {message}"))),
        _ => Err(Failure(
            exit::UNAVAILABLE,
            format!("{base} answered {status}: {message}"),
        )),
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// A value from the service, safe to print: control characters (ESC, CR, newlines) escaped.
pub fn clean(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => clean(s),
        other => clean(&other.to_string()),
    }
}

/// Left-aligned columns, two spaces apart; cells longer than `max` are cut with an ellipsis.
fn table(header: &[&str], rows: &[Vec<String>], max: usize) -> String {
    let cut = |s: &str| -> String {
        if s.chars().count() > max {
            let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
            t.push('…');
            t
        } else {
            s.to_string()
        }
    };
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| cut(c)).collect()).collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| -> String {
        let n = cells.len();
        let mut out = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            out.push_str(&c);
            if i + 1 < n {
                let pad = widths[i].saturating_sub(c.chars().count()) + 2;
                out.push_str(&" ".repeat(pad));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

/// "2026-12-03 06:15:07" from an RFC 3339 time (UTC as the service sends it).
fn when(v: &Value) -> String {
    v.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&chrono::Utc).format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| text(v))
}

fn finish(r: Result<String, Failure>) -> ExitCode {
    match r {
        Ok(out) => {
            print!("{out}");
            ExitCode::from(exit::OK)
        }
        Err(Failure(code, msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure(exit::UNAVAILABLE, format!("cannot start the runtime: {e}")))
}

/// `incidents [--open] [--service S]`: the list, newest first.
pub fn incidents(t: &Target, open: bool, service: Option<&str>) -> ExitCode {
    finish(runtime().and_then(|rt| {
        rt.block_on(async {
            let path = format!("/api/v1/incidents?limit=500&open={open}");
            let v = get(t, &path).await?;
            let list: Vec<&Value> = v["incidents"]
                .as_array()
                .map(|a| a.as_slice())
                .unwrap_or_default()
                .iter()
                .filter(|i| service.is_none_or(|s| i["service"].as_str() == Some(s)))
                .collect();
            if list.is_empty() {
                return Ok("No incidents.\n".to_string());
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|i| {
                    vec![
                        text(&i["id"]),
                        text(&i["phase"]),
                        if i["open"] == true {
                            "open".into()
                        } else {
                            "closed".into()
                        },
                        text(&i["service"]),
                        text(&i["alertname"]),
                        when(&i["opened_at"]),
                        if i["executed"] == true {
                            "yes".into()
                        } else {
                            "no".into()
                        },
                    ]
                })
                .collect();
            Ok(table(
                &["ID", "PHASE", "STATE", "SERVICE", "ALERT", "OPENED (UTC)", "CHANGED"],
                &rows,
                60,
            ))
        })
    }))
}

/// `incident ID`: the facts, the alerts and the timeline of one incident.
pub fn incident(t: &Target, id: &str) -> ExitCode {
    if uuid::Uuid::parse_str(id).is_err() {
        return finish(Err(Failure(
            exit::USAGE,
            format!("{}: not an incident id (a UUID, as `incidents` lists them)", clean(id)),
        )));
    }
    finish(runtime().and_then(|rt| {
        rt.block_on(async {
            let i = get(t, &format!("/api/v1/incidents/{id}")).await?;
            let d = &i["decision"];
            let mut out = String::new();
            let facts = [
                ("Incident", text(&i["id"])),
                ("Service", text(&i["service"])),
                ("Alert", text(&i["alertname"])),
                ("Phase", text(&i["phase"])),
                (
                    "State",
                    if i["open"] == true {
                        "open".into()
                    } else {
                        format!("closed {}", when(&i["closed_at"]))
                    },
                ),
                ("Target", text(&i["target_key"])),
                (
                    "Changed",
                    if i["executed"] == true {
                        format!("yes, {}", when(&i["acted_at"]))
                    } else {
                        "no".into()
                    },
                ),
                (
                    "Policy",
                    format!("{} (trigger {})", text(&i["policy"]), text(&i["trigger"])),
                ),
                ("Decision", format!("{}: {}", text(&d["outcome"]), text(&d["reason"]))),
                ("Policy hash", text(&d["policy_hash"])),
            ];
            for (k, v) in facts {
                out.push_str(&format!("{k:<12} {v}\n"));
            }
            let alerts: Vec<Vec<String>> = i["alerts"]
                .as_array()
                .map(|a| a.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|a| {
                    let labels = a["labels"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| format!("{}={}", clean(k), text(v)))
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default();
                    vec![text(&a["status"]), when(&a["startsAt"]), labels]
                })
                .collect();
            out.push_str(&format!("\nAlerts ({})\n", alerts.len()));
            out.push_str(&table(&["STATUS", "SINCE (UTC)", "LABELS"], &alerts, 120));
            let events: Vec<Vec<String>> = i["timeline"]
                .as_array()
                .map(|a| a.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|e| {
                    let phase = match (e["phase_from"].as_str(), e["phase_to"].as_str()) {
                        (Some(a), Some(b)) if a != b => format!("{} -> {}", clean(a), clean(b)),
                        _ => String::new(),
                    };
                    vec![
                        when(&e["at"]),
                        text(&e["kind"]),
                        text(&e["actor"]),
                        phase,
                        text(&e["summary"]),
                    ]
                })
                .collect();
            out.push_str(&format!("\nTimeline ({})\n", events.len()));
            out.push_str(&table(&["AT (UTC)", "KIND", "BY", "PHASE", "WHAT"], &events, 160));
            Ok(out)
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_not_printed() {
        assert_eq!(clean("a\u{1b}[31mred\r\nx"), "a\\u{1b}[31mred\\r\\nx");
        assert_eq!(clean("ünïcode ok"), "ünïcode ok");
    }

    #[test]
    fn columns_line_up_and_long_cells_are_cut() {
        let t = table(
            &["A", "BB"],
            &[vec!["xxx".into(), "1".into()], vec!["y".into(), "z".repeat(10)]],
            5,
        );
        assert_eq!(t, "A    BB\nxxx  1\ny    zzzz…\n");
    }
}
