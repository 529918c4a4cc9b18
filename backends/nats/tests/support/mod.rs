//! Starting and stopping real NATS servers for tests, through the project's
//! own `scripts/nats.sh`, each test in its own servers directory and ports.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Servers started by `scripts/nats.sh` under a private directory; stopped on drop.
pub struct Servers {
    pub dir: PathBuf,
    pub port: u16,
    pub monitor_port: u16,
    pub extra_conf: Option<PathBuf>,
}

impl Servers {
    /// A private directory; the single server (if started) uses `port` and
    /// `port + 4000` for monitoring.
    pub fn new(test: &str, port: u16) -> Servers {
        let dir = std::env::temp_dir().join(format!("dprim-nats-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Servers {
            dir,
            port,
            monitor_port: port + 4000,
            extra_conf: None,
        }
    }

    pub fn script(&self, args: &[&str]) {
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("scripts/nats.sh"))
            .args(args)
            .env("DPRIM_SERVERS_DIR", &self.dir)
            .env("DPRIM_NATS_PORT", self.port.to_string())
            .env("DPRIM_NATS_MONITOR_PORT", self.monitor_port.to_string());
        if let Some(extra) = &self.extra_conf {
            cmd.env("DPRIM_NATS_CONF_EXTRA", extra);
        }
        let status = cmd.status().expect("run scripts/nats.sh");
        assert!(
            status.success(),
            "scripts/nats.sh {args:?} failed; can it install nats-server (scripts/nats.sh install)?"
        );
    }

    pub fn pid(&self, member: &str) -> i32 {
        std::fs::read_to_string(self.dir.join(format!("nats/{member}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    pub fn kill9(&self, member: &str) {
        let pid = self.pid(member);
        let ok = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -9 {pid}");
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo_root().join("scripts/nats.sh"))
            .arg("stop")
            .env("DPRIM_SERVERS_DIR", &self.dir)
            .status();
        if std::thread::panicking() {
            eprintln!("server logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
