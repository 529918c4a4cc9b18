//! Starting and stopping real ZooKeeper servers for tests, through the
//! project's own `scripts/zookeeper.sh`, each test in its own servers
//! directory.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Servers started by `scripts/zookeeper.sh` under a private directory;
/// stopped on drop.
pub struct Servers {
    pub dir: PathBuf,
    port: Option<u16>,
    /// Lines appended to the standalone server's zoo.cfg.
    pub extra_conf: Option<PathBuf>,
}

impl Servers {
    /// A private servers directory; `port` is the standalone client port.
    pub fn new(test: &str, port: Option<u16>) -> Servers {
        let dir = std::env::temp_dir().join(format!("dprim-zk-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Servers {
            dir,
            port,
            extra_conf: None,
        }
    }

    pub fn script(&self, args: &[&str]) {
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("scripts/zookeeper.sh"))
            .args(args)
            .env("DPRIM_SERVERS_DIR", &self.dir);
        if let Some(port) = self.port {
            cmd.env("DPRIM_ZK_PORT", port.to_string());
        }
        if let Some(extra) = &self.extra_conf {
            cmd.env("DPRIM_ZK_CONF_EXTRA", extra);
        }
        let status = cmd.status().expect("run scripts/zookeeper.sh");
        assert!(
            status.success(),
            "scripts/zookeeper.sh {args:?} failed; is ZooKeeper installed (scripts/zookeeper.sh install)?"
        );
    }

    pub fn pid(&self, member: &str) -> i32 {
        std::fs::read_to_string(self.dir.join(format!("zookeeper/{member}.pid")))
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
        let _ = std::fs::remove_file(self.dir.join(format!("zookeeper/{member}.pid")));
        // Wait until the process is gone, so a restart does not race it.
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Sends a four-letter command to a client port and returns the answer.
    pub fn four_letter(port: u16, cmd: &str) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
        let _ = s.write_all(cmd.as_bytes());
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo_root().join("scripts/zookeeper.sh"))
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
