//! Starting and stopping real etcd servers for tests, through the project's
//! own `scripts/etcd.sh`, each test in its own servers directory.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Servers started by `scripts/etcd.sh` under a private directory; stopped on drop.
pub struct Servers {
    pub dir: PathBuf,
}

impl Servers {
    pub fn new(test: &str) -> Servers {
        let dir = std::env::temp_dir().join(format!("dprim-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Servers { dir }
    }

    pub fn script(&self, args: &[&str]) {
        let status = Command::new("bash")
            .arg(repo_root().join("scripts/etcd.sh"))
            .args(args)
            .env("DPRIM_SERVERS_DIR", &self.dir)
            .status()
            .expect("run scripts/etcd.sh");
        assert!(
            status.success(),
            "scripts/etcd.sh {args:?} failed; is etcd installed (scripts/etcd.sh install)?"
        );
    }

    pub fn pid(&self, member: &str) -> i32 {
        std::fs::read_to_string(self.dir.join(format!("etcd/{member}.pid")))
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
            .arg(repo_root().join("scripts/etcd.sh"))
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

/// One etcd member run by a test itself (for flags the project's script
/// does not set), in `dir`, logging to `dir/etcd.log`; killed on drop.
pub struct Etcd(std::process::Child);

impl Etcd {
    /// Starts member `name` serving clients on `client_url`
    /// (`http://127.0.0.1:<port>` or `https://...`) and its peer on
    /// `peer_port`, with `extra` flags.
    pub fn start(dir: &Path, name: &str, client_url: &str, peer_port: u16, extra: &[&str]) -> Etcd {
        use std::process::Stdio;
        let log = std::fs::File::create(dir.join("etcd.log")).unwrap();
        let peer = format!("http://127.0.0.1:{peer_port}");
        let child = Command::new("etcd")
            .args([
                "--name",
                name,
                "--data-dir",
                "data",
                &format!("--listen-client-urls={client_url}"),
                &format!("--advertise-client-urls={client_url}"),
                &format!("--listen-peer-urls={peer}"),
                &format!("--initial-advertise-peer-urls={peer}"),
                &format!("--initial-cluster={name}={peer}"),
            ])
            .args(extra)
            .current_dir(dir)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start etcd (scripts/etcd.sh install)");
        Etcd(child)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
