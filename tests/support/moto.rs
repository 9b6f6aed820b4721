//! A private moto_server per test: started on a free loopback port, killed on drop.
//!
//! The binary comes from `MOTO_SERVER`, or `target/peers/venv/bin/moto_server` under the
//! crate. A missing binary is a test failure with an install hint, never a skip.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const EC2_VERSION: &str = "2016-11-15";

/// A running moto_server; the process is killed when this is dropped.
pub struct Moto {
    child: Child,
    log: PathBuf,
    /// `http://127.0.0.1:<port>`
    pub endpoint: String,
    http: reqwest::Client,
}

fn moto_binary() -> PathBuf {
    let path = std::env::var_os("MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/peers/venv/bin/moto_server"));
    if !path.is_file() {
        let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/peers/venv");
        panic!(
            "moto_server not found at {}.\n\
             Install it once with:\n  \
             python3 -m venv {venv} && {venv}/bin/pip install 'moto[server]==5.2.5'\n\
             or point MOTO_SERVER at an existing moto_server binary.",
            path.display(),
            venv = venv.display()
        );
    }
    path
}

impl Moto {
    /// Starts moto and waits until it answers, with a deadline.
    pub async fn start() -> Moto {
        let bin = moto_binary();
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = super::free_port();
            let log = std::env::temp_dir().join(format!("moto-{}-{port}.log", std::process::id()));
            let log_file = std::fs::File::create(&log).expect("create moto log file");
            let child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let mut moto = Moto {
                child,
                log,
                endpoint: format!("http://127.0.0.1:{port}"),
                http: reqwest::Client::new(),
            };
            match moto.wait_ready().await {
                Ok(()) => return moto,
                Err(e) => last_error = e, // dropping `moto` kills the process
            }
        }
        panic!("moto_server did not start: {last_error}");
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("moto_server exited with {status}: {}", self.log_tail()));
            }
            let probe = self
                .http
                .post(format!("{}/moto-api/reset", self.endpoint))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if matches!(probe, Ok(ref r) if r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "moto_server not ready after {READY_TIMEOUT:?}: {}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(2000);
        text.get(start..).unwrap_or_default().to_string()
    }

    /// Wipes all emulated state.
    pub async fn reset(&self) {
        let r = self
            .http
            .post(format!("{}/moto-api/reset", self.endpoint))
            .send()
            .await
            .expect("moto reset");
        assert!(r.status().is_success(), "moto reset: {}", r.status());
    }

    /// Calls moto's EC2 query API (form POST) and returns the XML body; panics on an error.
    pub async fn ec2(&self, action: &str, params: &[(&str, &str)]) -> String {
        let mut form: Vec<(&str, &str)> = vec![("Action", action), ("Version", EC2_VERSION)];
        form.extend_from_slice(params);
        let r = self
            .http
            .post(format!("{}/", self.endpoint))
            // moto routes on the service named in the credential scope.
            .header(
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/ec2/aws4_request, \
                 SignedHeaders=host, Signature=0",
            )
            .form(&form)
            .send()
            .await
            .unwrap_or_else(|e| panic!("EC2 {action}: {e}"));
        let status = r.status();
        let body = r.text().await.expect("EC2 response body");
        assert!(status.is_success(), "EC2 {action} failed ({status}): {body}");
        body
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Text of every `<tag>...</tag>` in `xml`, in order (enough for moto's flat EC2 answers).
pub fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        out.push(after[..end].to_string());
        rest = &after[end + close.len()..];
    }
    out
}
