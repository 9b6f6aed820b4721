//! Open-loop webhook generator (what wrk2 would do; wrk2 is not in Debian).
//!
//! A scheduler thread releases request N at `start + N / rate`, whatever the server does; a
//! pool of keep-alive connections sends them. Latency is measured from the *scheduled* time to
//! the end of the response, so a stalled server is charged for the requests queued behind the
//! stall (no coordinated omission). Requests released during `--warmup` are sent but not
//! counted. Prints one JSON line.
//!
//! bench-loadgen --addr 127.0.0.1:9095 --rate 2000 --duration 10 --warmup 2 --alerts 10 \
//!     --mode new|repeated [--services 10] [--service-prefix svc-] [--groups 10] \
//!     [--connections 64] [--token T] [--label NAME]
//!
//! Bodies have the same shape as bench/lua/payload.lua.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};

const PATH: &str = "/webhook/alertmanager";
/// Alertmanager cuts a receiver off after 10 s; so do we.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    New,
    Repeated,
}

struct Args {
    addr: String,
    rate: f64,
    duration: f64,
    warmup: f64,
    alerts: usize,
    mode: Mode,
    services: u64,
    service_prefix: String,
    groups: u64,
    connections: usize,
    token: String,
    label: String,
}

fn parse_args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:9095".into(),
        rate: 2000.0,
        duration: 10.0,
        warmup: 2.0,
        alerts: 10,
        mode: Mode::New,
        services: 10,
        service_prefix: "svc-".into(),
        groups: 10,
        connections: 64,
        token: std::env::var("BENCH_TOKEN").unwrap_or_else(|_| "bench-webhook-token".into()),
        label: String::new(),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let (k, v) = match pair {
            [k, v] => (k.as_str(), v.clone()),
            _ => die(&format!("{pair:?}: every option takes a value")),
        };
        let num = |v: &str| v.parse::<f64>().unwrap_or_else(|_| die(&format!("{k}: not a number: {v}")));
        match k {
            "--addr" => a.addr = v,
            "--rate" => a.rate = num(&v),
            "--duration" => a.duration = num(&v),
            "--warmup" => a.warmup = num(&v),
            "--alerts" => a.alerts = num(&v) as usize,
            "--mode" => {
                a.mode = match v.as_str() {
                    "new" => Mode::New,
                    "repeated" => Mode::Repeated,
                    _ => die("--mode is new or repeated"),
                }
            }
            "--services" => a.services = num(&v).max(1.0) as u64,
            "--service-prefix" => a.service_prefix = v,
            "--groups" => a.groups = num(&v).max(1.0) as u64,
            "--connections" => a.connections = num(&v).max(1.0) as usize,
            "--token" => a.token = v,
            "--label" => a.label = v,
            _ => die(&format!("unknown option {k}")),
        }
    }
    a
}

fn die(msg: &str) -> ! {
    eprintln!("bench-loadgen: {msg}");
    std::process::exit(2)
}

/// UTC now as RFC 3339 with nanoseconds (civil-from-days, to need no date crate).
fn rfc3339_now() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

fn alert(i: usize, service: &str, starts_at: &str, fingerprint: &str) -> String {
    format!(
        concat!(
            r#"{{"status":"firing","labels":{{"alertname":"HighErrorRate","env":"prod","#,
            r#""instance":"10.0.{a}.{b}:8080","job":"{s}","service":"{s}","severity":"critical"}},"#,
            r#""annotations":{{"description":"5xx ratio above 5% on {s} for the last 5 minutes","#,
            r#""runbook_url":"https://runbooks.example.com/{s}/high-error-rate","summary":"{s} high error rate"}},"#,
            r#""startsAt":"{t}","endsAt":"0001-01-01T00:00:00Z","#,
            r#""generatorURL":"http://prometheus.example.com:9090/graph?g0.expr=job%3A5xx_ratio%3Arate5m+%3E+0.05&g0.tab=1","#,
            r#""fingerprint":"{f}"}}"#
        ),
        a = i / 256 % 256,
        b = i % 256,
        s = service,
        t = starts_at,
        f = fingerprint
    )
}

fn notification(service: &str, alerts: &[String]) -> String {
    format!(
        concat!(
            r#"{{"receiver":"rollback-responder","status":"firing","alerts":[{a}],"#,
            r#""groupLabels":{{"alertname":"HighErrorRate","service":"{s}"}},"#,
            r#""commonLabels":{{"alertname":"HighErrorRate","env":"prod","job":"{s}","service":"{s}","severity":"critical"}},"#,
            r#""commonAnnotations":{{}},"externalURL":"http://alertmanager.example.com:9093","version":"4","#,
            r#""groupKey":"{{}}:{{alertname=\"HighErrorRate\", service=\"{s}\"}}","truncatedAlerts":0}}"#
        ),
        a = alerts.join(","),
        s = service
    )
}

struct Bodies {
    args: Args,
    salt: String,
    fixed: Vec<String>,
}

impl Bodies {
    fn new(args: Args) -> Bodies {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        let salt = format!("{:010x}", (nanos as u64 ^ u64::from(std::process::id()) << 40) & 0xff_ffff_ffff);
        let fixed = (0..args.groups)
            .map(|g| {
                let service = format!("{}{}", args.service_prefix, g % args.services);
                let alerts: Vec<String> = (1..=args.alerts)
                    .map(|i| alert(i, &service, "2026-01-01T00:00:00.000Z", &format!("{g:08x}{i:08x}")))
                    .collect();
                notification(&service, &alerts)
            })
            .collect();
        Bodies { args, salt, fixed }
    }

    fn request(&self, seq: u64) -> Vec<u8> {
        let a = &self.args;
        let body = match a.mode {
            Mode::Repeated => self.fixed[(seq % a.groups) as usize].clone(),
            Mode::New => {
                let service = format!("{}{}", a.service_prefix, seq % a.services);
                let starts_at = rfc3339_now();
                let alerts: Vec<String> = (1..=a.alerts)
                    .map(|i| alert(i, &service, &starts_at, &format!("{}{seq:08x}{i:03x}", self.salt)))
                    .collect();
                notification(&service, &alerts)
            }
        };
        let mut req = format!(
            "POST {PATH} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
             User-Agent: Alertmanager/0.25.0\r\nContent-Length: {}\r\n\r\n",
            a.addr,
            a.token,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body.as_bytes());
        req
    }
}

struct Job {
    seq: u64,
    at: Instant,
    counted: bool,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    lag_us: Vec<u64>,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
    first_at: Option<Instant>,
    last_end: Option<Instant>,
}

/// One request and its response on a keep-alive connection; returns the status code.
async fn roundtrip(conn: &mut BufReader<TcpStream>, req: &[u8]) -> io::Result<u16> {
    conn.get_mut().write_all(req).await?;
    let mut line = String::new();
    if conn.read_line(&mut line).await? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {line:?}")))?;
    let mut len = 0usize;
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed in headers"));
        }
        if line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "content-length"))?;
        } else if lower.starts_with("transfer-encoding:") {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "chunked responses are not supported"));
        }
    }
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).await?;
    Ok(status)
}

async fn worker(addr: Arc<String>, bodies: Arc<Bodies>, jobs: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<BufReader<TcpStream>> = None;
    loop {
        let Some(job) = jobs.lock().await.recv().await else {
            return tally;
        };
        let req = bodies.request(job.seq);
        let sent = Instant::now();
        let outcome = async {
            if conn.is_none() {
                let s = TcpStream::connect(addr.as_str()).await?;
                s.set_nodelay(true)?;
                conn = Some(BufReader::with_capacity(64 * 1024, s));
            }
            roundtrip(conn.as_mut().expect("connected"), &req).await
        };
        let result = match tokio::time::timeout(REQUEST_TIMEOUT, outcome).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "timeout")),
        };
        let end = Instant::now();
        if result.is_err() {
            conn = None;
        }
        if !job.counted {
            continue;
        }
        tally.first_at = Some(tally.first_at.map_or(job.at, |f| f.min(job.at)));
        tally.last_end = Some(tally.last_end.map_or(end, |l| l.max(end)));
        match result {
            Ok(status) => {
                *tally.statuses.entry(status).or_default() += 1;
                tally.latencies_us.push(end.duration_since(job.at).as_micros() as u64);
                tally.lag_us.push(sent.saturating_duration_since(job.at).as_micros() as u64);
            }
            Err(e) => *tally.errors.entry(format!("{:?}", e.kind())).or_default() += 1,
        }
    }
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[idx.clamp(1, sorted.len()) - 1]
}

fn main() {
    let args = parse_args();
    let rate = args.rate;
    let warm_n = (args.warmup * rate).round() as u64;
    let total = warm_n + (args.duration * rate).round() as u64;
    let connections = args.connections;
    let addr = Arc::new(args.addr.clone());
    let label = args.label.clone();
    let (mode, alerts) = (args.mode, args.alerts);
    let bodies = Arc::new(Bodies::new(args));

    let (tx, rx) = mpsc::unbounded_channel::<Job>();
    // The schedule runs on its own thread: thread::sleep is precise to tens of microseconds,
    // tokio's timer only to a millisecond.
    let scheduler = std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(20);
        for seq in 0..total {
            let at = start + Duration::from_secs_f64(seq as f64 / rate);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if tx.send(Job { seq, at, counted: seq >= warm_n }).is_err() {
                break;
            }
        }
    });

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let tallies: Vec<Tally> = rt.block_on(async {
        let jobs = Arc::new(Mutex::new(rx));
        let handles: Vec<_> = (0..connections)
            .map(|_| tokio::spawn(worker(addr.clone(), bodies.clone(), jobs.clone())))
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.expect("worker"));
        }
        out
    });
    scheduler.join().expect("scheduler");

    let mut all = Tally::default();
    for t in tallies {
        all.latencies_us.extend(t.latencies_us);
        all.lag_us.extend(t.lag_us);
        for (k, v) in t.statuses {
            *all.statuses.entry(k).or_default() += v;
        }
        for (k, v) in t.errors {
            *all.errors.entry(k).or_default() += v;
        }
        all.first_at = match (all.first_at, t.first_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        all.last_end = match (all.last_end, t.last_end) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    all.latencies_us.sort_unstable();
    all.lag_us.sort_unstable();
    let ok: u64 = all.statuses.iter().filter(|(s, _)| (200..300).contains(*s)).map(|(_, n)| n).sum();
    let answered: u64 = all.statuses.values().sum();
    let errors: u64 = all.errors.values().sum();
    let span = match (all.first_at, all.last_end) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    let mean = if all.latencies_us.is_empty() {
        0.0
    } else {
        all.latencies_us.iter().sum::<u64>() as f64 / all.latencies_us.len() as f64
    };
    let statuses: Vec<String> = all.statuses.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    let errs: Vec<String> = all.errors.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    println!(
        "BENCH_JSON {{\"label\":\"{label}\",\"mode\":\"{}\",\"alerts\":{alerts},\"rate\":{rate},\"connections\":{connections},\
         \"requests\":{},\"ok\":{ok},\"non2xx\":{},\"errors\":{errors},\"achieved_rps\":{:.1},\
         \"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\"mean_us\":{mean:.1},\
         \"send_lag_p99_us\":{},\"statuses\":{{{}}},\"error_kinds\":{{{}}}}}",
        if mode == Mode::New { "new" } else { "repeated" },
        answered + errors,
        answered - ok,
        if span > 0.0 { answered as f64 / span } else { 0.0 },
        pct(&all.latencies_us, 50.0),
        pct(&all.latencies_us, 90.0),
        pct(&all.latencies_us, 99.0),
        pct(&all.latencies_us, 99.9),
        all.latencies_us.last().copied().unwrap_or(0),
        pct(&all.lag_us, 99.0),
        statuses.join(","),
        errs.join(",")
    );
}
