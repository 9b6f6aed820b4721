//! A PostgreSQL cluster a test starts, stops and starts again itself (store fault tests): the
//! shared database on 5432 must keep running for every other test.

use std::path::PathBuf;

/// A PostgreSQL cluster of the test's own (initdb, pg_ctl from the Debian packages) on a free
/// loopback port, so the test can stop and start it; removed when dropped.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PgCluster {
    pub fn start() -> PgCluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                    .filter(|b| b.join("pg_ctl").exists())
                    .max()
            })
            .expect(
                "PostgreSQL's initdb and pg_ctl in /usr/lib/postgresql/*/bin: run `eval \"$(bash tests/setup.sh)\"`",
            );
        let dir = tempfile::tempdir().unwrap();
        let c = PgCluster {
            dir,
            bin,
            port: super::free_port(),
        };
        if is_root() {
            // PostgreSQL refuses to run as root: the cluster belongs to the postgres user.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let ok = std::process::Command::new("chown")
                .args(["postgres:postgres"])
                .arg(c.dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown the cluster directory to postgres");
        }
        let data = c.dir.path().join("data");
        c.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        c.ctl("start");
        c
    }

    /// Runs a PostgreSQL tool (as the postgres user when we are root); panics with its output.
    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let mut cmd = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        let out = cmd.args(args).output().unwrap_or_else(|e| panic!("run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl start` or `stop` (immediate: what a crash or a killed node looks like), waiting
    /// until it is done.
    pub fn ctl(&self, what: &str) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("log");
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let mut args = vec!["-D", data.to_str().unwrap(), "-w", "-l", log.to_str().unwrap()];
        match what {
            "start" => args.extend(["-o", &opts, "start"]),
            _ => args.extend(["-m", "immediate", "stop"]),
        }
        self.run("pg_ctl", &args);
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = std::process::Command::new(if is_root() { "runuser" } else { "true" })
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
        if !is_root() {
            let _ = std::process::Command::new(self.bin.join("pg_ctl"))
                .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
                .output();
        }
    }
}

pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}
