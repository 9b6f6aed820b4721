//! The real `rollback-responder serve` binary as a child process: configured only through
//! the environment, on its own loopback port, its stderr (the log) in a temp file. Killed
//! (SIGKILL) and reaped on drop; when the test is panicking, its log is printed first so a
//! failure shows what every process did.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ResponderProcess {
    /// A label for messages (the replica id).
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
    killed: bool,
    _dir: tempfile::TempDir,
}

impl ResponderProcess {
    /// Starts `serve --listen 127.0.0.1:PORT` with exactly `env` on top of the test's own
    /// environment minus anything that configures the service or AWS, and waits for /readyz.
    pub async fn start(name: &str, env: &[(String, String)]) -> ResponderProcess {
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir for the process log");
            let log = dir.path().join("stderr.log");
            let file = std::fs::File::create(&log).expect("create the process log");
            let out = file.try_clone().expect("clone the log handle");
            let addr = SocketAddr::from(([127, 0, 0, 1], super::free_port()));
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_rollback-responder"));
            cmd.arg("serve")
                .arg("--listen")
                .arg(addr.to_string())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(file);
            for (k, _) in std::env::vars_os() {
                let k = k.to_string_lossy();
                if k.starts_with("ROLLBACK_RESPONDER__") || k.starts_with("AWS_") {
                    cmd.env_remove(k.as_ref());
                }
            }
            cmd.envs(env.iter().map(|(k, v)| (k, v)));
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", env!("CARGO_BIN_EXE_rollback-responder")));
            let mut p = ResponderProcess {
                name: name.to_string(),
                addr,
                child,
                log,
                killed: false,
                _dir: dir,
            };
            match p.wait_ready().await {
                Ok(()) => return p,
                Err(e) => {
                    last = e;
                    p.killed = true; // a failed start is not a test failure to report here
                    if !last.contains("binding") {
                        break;
                    }
                }
            }
        }
        panic!("{name} did not start: {last}");
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}:\n{}", self.log()));
            }
            let probe = http
                .get(self.url("/readyz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if matches!(probe, Ok(ref r) if r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after {READY_TIMEOUT:?}:\n{}", self.log()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// SIGKILL: no shutdown hook, no lease release, no transaction finished.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.killed = true;
    }

    /// SIGTERM, then waits until the process has exited: a graceful shutdown, so nothing it
    /// was doing is still on its way to a peer afterwards. Panics after 30 s.
    pub async fn terminate(&mut self) {
        if !self.is_running() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.is_running() {
            assert!(
                Instant::now() < deadline,
                "{} did not exit on SIGTERM:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGSTOP: the process freezes mid-whatever (a long GC-like pause, a VM stall): its
    /// timers and its lease renewals stop until [`ResponderProcess::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`ResponderProcess::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {} failed", self.name);
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything the process wrote to stderr and stdout so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ResponderProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- {} ({}){} log -----\n{}",
                self.name,
                self.addr,
                if self.killed { ", killed by the test," } else { "" },
                self.log()
            );
        }
    }
}
