//! Slack, Statuspage and PagerDuty answers for wiremock that come from state, as the real APIs'
//! do: every Slack message gets its own `ts` and the channel's id, an update must name a
//! message that exists, every Statuspage incident created gets its own id and a PATCH must name
//! one of them, and PagerDuty echoes the event's dedup key. A test can then tell a reply
//! threaded on the root from one threaded on another reply, catch a message sent to the wrong
//! channel, and catch two incidents sharing one status page incident.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// The first `ts` Slack hands out; later ones count up from it.
pub const FIRST_TS: &str = "1763790000.000100";

/// The id Slack reports for a channel posted to by `name` (`#portal-alerts` -> `CPORTALALERTS`).
/// An id (`C...`) maps to itself.
pub fn slack_channel_id(name: &str) -> String {
    if !name.starts_with('#') {
        return name.to_string();
    }
    let id: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    format!("C{id}")
}

/// The `ts` of the n-th message (0-based) the fake accepts.
pub fn slack_ts(n: usize) -> String {
    format!("1763790000.{:06}", 100 + n)
}

/// A message Slack accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlackMessage {
    /// The channel's id (what Slack answers), whatever the request named it by.
    pub channel: String,
    pub ts: String,
    /// The message it replies to, if any.
    pub thread_ts: Option<String>,
    pub text: String,
}

#[derive(Default)]
struct SlackState {
    messages: Vec<SlackMessage>,
    /// HTTP statuses to answer the next requests with, before anything is stored.
    failures: VecDeque<u16>,
}

/// An error answer as the APIs give it for a status the test injected.
fn injected(status: u16) -> ResponseTemplate {
    let t = ResponseTemplate::new(status).set_body_json(json!({"ok": false, "error": "injected by the test"}));
    if status == 429 {
        t.insert_header("retry-after", "1")
    } else {
        t
    }
}

/// Answers `chat.postMessage` and `chat.update` from the messages posted so far.
#[derive(Clone, Default)]
pub struct SlackFake {
    state: Arc<Mutex<SlackState>>,
}

impl SlackFake {
    /// Mounts the fake on `server` (POST `/chat.postMessage` and `/chat.update`) at `priority`
    /// (wiremock's default is 5; lower wins).
    pub async fn mount(&self, server: &MockServer, priority: u8) {
        for p in ["/chat.postMessage", "/chat.update"] {
            Mock::given(method("POST"))
                .and(path(p))
                .respond_with(self.clone())
                .with_priority(priority)
                .mount(server)
                .await;
        }
    }

    /// Starts a Slack server with the fake mounted.
    pub async fn start() -> (MockServer, SlackFake) {
        let server = MockServer::start().await;
        let fake = SlackFake::default();
        fake.mount(&server, 5).await;
        (server, fake)
    }

    /// Answers the next `n` requests with HTTP `status` (429 with `Retry-After: 1`) and
    /// stores nothing for them.
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut state = self.state.lock().unwrap();
        state.failures.extend(std::iter::repeat_n(status, n));
    }

    /// Every message posted, in the order Slack accepted them.
    pub fn messages(&self) -> Vec<SlackMessage> {
        self.state.lock().unwrap().messages.clone()
    }
}

fn slack_error(code: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({"ok": false, "error": code}))
}

impl Respond for SlackFake {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
            return slack_error("invalid_json");
        };
        let Some(channel) = body["channel"].as_str().filter(|c| !c.is_empty()) else {
            return slack_error("channel_not_found");
        };
        let id = slack_channel_id(channel);
        let mut state = self.state.lock().unwrap();
        if let Some(status) = state.failures.pop_front() {
            return injected(status);
        }
        match req.url.path() {
            "/chat.postMessage" => {
                let known = channel.starts_with('#') || state.messages.iter().any(|m| m.channel == id);
                if !known {
                    return slack_error("channel_not_found");
                }
                let ts = slack_ts(state.messages.len());
                state.messages.push(SlackMessage {
                    channel: id.clone(),
                    ts: ts.clone(),
                    thread_ts: body["thread_ts"].as_str().map(str::to_string),
                    text: body["text"].as_str().unwrap_or_default().to_string(),
                });
                ResponseTemplate::new(200).set_body_json(json!({
                    "ok": true, "channel": id, "ts": ts,
                    "message": {"type": "message", "text": body["text"], "ts": ts, "thread_ts": body["thread_ts"]},
                }))
            }
            "/chat.update" => {
                let ts = body["ts"].as_str().unwrap_or_default();
                // Slack updates a message by channel id and ts; a name or a wrong pair misses.
                if !state.messages.iter().any(|m| m.channel == channel && m.ts == ts) {
                    return slack_error("message_not_found");
                }
                ResponseTemplate::new(200).set_body_json(json!({"ok": true, "channel": channel, "ts": ts}))
            }
            _ => slack_error("unknown_method"),
        }
    }
}

/// An incident the Statuspage fake created.
struct SpIncident {
    id: String,
    name: String,
    status: String,
    metadata: Value,
}

/// Answers Statuspage's create, update and unresolved-list of incidents on one page from the
/// incidents created: `GET /pages/{page}/incidents/unresolved` lists those not `resolved` (or
/// `postmortem`), with the metadata they were created with, newest first, as Statuspage does.
#[derive(Clone)]
pub struct StatuspageFake {
    page: String,
    /// Every incident created, in order.
    created: Arc<Mutex<Vec<SpIncident>>>,
    /// HTTP statuses to answer the next requests with, before anything is created.
    failures: Arc<Mutex<VecDeque<u16>>>,
}

impl StatuspageFake {
    /// Mounts the fake for page `page` on `server`.
    pub async fn mount(server: &MockServer, page: &str) -> StatuspageFake {
        let fake = StatuspageFake {
            page: page.to_string(),
            created: Arc::default(),
            failures: Arc::default(),
        };
        let prefix = format!("^/pages/{page}/incidents");
        for m in ["POST", "PATCH", "GET"] {
            Mock::given(method(m))
                .and(path_regex(prefix.as_str()))
                .respond_with(fake.clone())
                .mount(server)
                .await;
        }
        fake
    }

    /// Answers the next `n` requests (of any kind: an outage) with HTTP `status` and creates
    /// or changes nothing.
    pub fn fail_next(&self, n: usize, status: u16) {
        self.failures.lock().unwrap().extend(std::iter::repeat_n(status, n));
    }

    /// (id, name) of the incidents created, in order (ids `sp-inc-1`, `sp-inc-2`, ...).
    pub fn created(&self) -> Vec<(String, String)> {
        let created = self.created.lock().unwrap();
        created.iter().map(|i| (i.id.clone(), i.name.clone())).collect()
    }
}

impl StatuspageFake {
    /// An incident as Statuspage's API shows it.
    fn json(&self, i: &SpIncident) -> Value {
        json!({"id": i.id, "name": i.name, "status": i.status, "page_id": self.page, "metadata": i.metadata})
    }
}

impl Respond for StatuspageFake {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let incident = &body["incident"];
        let base = format!("/pages/{}/incidents", self.page);
        if let Some(status) = self.failures.lock().unwrap().pop_front() {
            return injected(status);
        }
        let mut created = self.created.lock().unwrap();
        match (req.method.as_str(), req.url.path()) {
            ("POST", p) if p == base => {
                let Some(name) = incident["name"].as_str().filter(|n| !n.is_empty()) else {
                    return ResponseTemplate::new(422).set_body_json(json!({"error": "name can't be blank"}));
                };
                let new = SpIncident {
                    id: format!("sp-inc-{}", created.len() + 1),
                    name: name.to_string(),
                    status: incident["status"].as_str().unwrap_or("investigating").to_string(),
                    metadata: incident.get("metadata").cloned().unwrap_or_else(|| json!({})),
                };
                let answer = self.json(&new);
                created.push(new);
                ResponseTemplate::new(201).set_body_json(answer)
            }
            ("GET", p) if p == format!("{base}/unresolved") => {
                let open: Vec<Value> = created
                    .iter()
                    .rev()
                    .filter(|i| i.status != "resolved" && i.status != "postmortem")
                    .map(|i| self.json(i))
                    .collect();
                ResponseTemplate::new(200).set_body_json(open)
            }
            ("PATCH", p) => {
                let id = p.strip_prefix(&format!("{base}/")).unwrap_or_default();
                let Some(found) = created.iter_mut().find(|i| i.id == id) else {
                    return ResponseTemplate::new(404).set_body_json(json!({"error": "Not found"}));
                };
                if let Some(status) = incident["status"].as_str() {
                    found.status = status.to_string();
                }
                ResponseTemplate::new(200).set_body_json(self.json(found))
            }
            _ => ResponseTemplate::new(404).set_body_json(json!({"error": "Not found"})),
        }
    }
}

/// PagerDuty's Events API v2: 202 with the event's dedup key (a trigger without one gets a new
/// key, as PagerDuty does), 400 for an event without a routing key or action.
#[derive(Clone, Default)]
pub struct PagerDutyFake {
    keys: Arc<Mutex<usize>>,
}

impl PagerDutyFake {
    /// Mounts the fake on every POST to `server`.
    pub async fn mount(server: &MockServer) -> PagerDutyFake {
        let fake = PagerDutyFake::default();
        Mock::given(method("POST"))
            .respond_with(fake.clone())
            .mount(server)
            .await;
        fake
    }
}

impl Respond for PagerDutyFake {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        if body["routing_key"].as_str().is_none_or(str::is_empty) {
            return ResponseTemplate::new(400)
                .set_body_json(json!({"status": "invalid event", "message": "Event object is invalid"}));
        }
        if req.url.path() == "/v2/change/enqueue" {
            return ResponseTemplate::new(202)
                .set_body_json(json!({"status": "success", "message": "Change event processed"}));
        }
        if body["event_action"].as_str().is_none() {
            return ResponseTemplate::new(400)
                .set_body_json(json!({"status": "invalid event", "message": "Event object is invalid"}));
        }
        let key = match body["dedup_key"].as_str() {
            Some(k) => k.to_string(),
            None => {
                let mut n = self.keys.lock().unwrap();
                *n += 1;
                format!("pd-key-{n}")
            }
        };
        ResponseTemplate::new(202)
            .set_body_json(json!({"status": "success", "message": "Event processed", "dedup_key": key}))
    }
}
