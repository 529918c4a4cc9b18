//! etcd with TLS (mutual) and password auth, certificates generated here:
//! a subset of the conformance suite passes through it, a wrong password is
//! `PermissionDenied` with a clear message, and the password never appears
//! in any output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::{Config, ErrorKind, Registry};
use dprim_conformance::{ConfigHarness, RunOptions};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use support::{Etcd, Servers};

const PASSWORD: &str = "s3cret-dprim-pw";
const PORT: u16 = 23790;

/// A CA and server and client certificates for 127.0.0.1, made by the
/// project's `scripts/test-certs.sh`.
fn make_certs(dir: &Path) {
    let ok = Command::new("bash")
        .arg(support::repo_root().join("scripts/test-certs.sh"))
        .arg(dir)
        .status()
        .expect("run scripts/test-certs.sh")
        .success();
    assert!(ok, "scripts/test-certs.sh failed (is openssl installed?)");
}

fn etcdctl(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("etcdctl")
        .args([
            &format!("--endpoints=https://127.0.0.1:{PORT}"),
            "--cacert=ca.pem",
            "--cert=client.pem",
            "--key=client-key.pem",
        ])
        .args(args)
        .current_dir(dir)
        .env("ETCDCTL_API", "3")
        .output()
        .expect("etcdctl (scripts/etcd.sh install)")
}

fn config(dir: &Path, password_env: &str) -> Config {
    Config::from_toml(&format!(
        r#"[backend]
kind = "etcd"
endpoints = ["127.0.0.1:{PORT}"]
namespace = "tls"
username = "root"
password = {{ env = "{password_env}" }}
tls = {{ ca = "{d}/ca.pem", cert = "{d}/client.pem", key = "{d}/client-key.pem" }}
"#,
        d = dir.display()
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_password_auth() {
    let servers = Servers::new("etcd-tls");
    servers.script(&["install"]);
    let dir = servers.dir.clone();
    make_certs(&dir);
    let _etcd = Etcd::start(
        &dir,
        "tls",
        &format!("https://127.0.0.1:{PORT}"),
        23800,
        &[
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--cert-file=server.pem",
            "--key-file=server-key.pem",
            "--trusted-ca-file=ca.pem",
            "--client-cert-auth",
        ],
    );
    let mut ready = false;
    for _ in 0..100 {
        if etcdctl(&dir, &["endpoint", "health"]).status.success() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ready,
        "TLS etcd did not become healthy; see {}",
        dir.display()
    );
    for args in [
        vec!["user", "add", &format!("root:{PASSWORD}")],
        vec!["auth", "enable"],
    ] {
        let out = etcdctl(&dir, &args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Right password: a subset of the suite passes over TLS with auth.
    std::env::set_var("DPRIM_TEST_ETCD_PW_GOOD", PASSWORD);
    let good = config(&dir, "DPRIM_TEST_ETCD_PW_GOOD");
    assert!(!format!("{good:?}").contains(PASSWORD));
    let registry = Registry::new().register("etcd", dprim_etcd::constructor());
    let harness = Arc::new(ConfigHarness::new(registry, good.backend.clone()));
    for filter in [
        "kv::cas",
        "lock::unlock_hands_over",
        "queue::push_pull_ack",
        "session::close_deletes",
    ] {
        let options = RunOptions {
            filter: Some(filter.to_string()),
            ..RunOptions::default()
        };
        let report = dprim_conformance::run(harness.clone(), options, &mut |_| {}).await;
        assert!(report.passed() > 0, "no case matched {filter}");
        assert_eq!(report.passed(), report.cases.len(), "{}", report.table());
        assert!(!report.to_json().contains(PASSWORD));
    }

    // Wrong password: PermissionDenied, clearly, without echoing it.
    let wrong_pw = "not-the-password-xyz";
    std::env::set_var("DPRIM_TEST_ETCD_PW_BAD", wrong_pw);
    let bad = config(&dir, "DPRIM_TEST_ETCD_PW_BAD");
    let err = dprim_etcd::connect(&bad.backend).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    let shown = format!("{err} {err:?}");
    assert!(
        shown.contains("username"),
        "the error should say what to check: {shown}"
    );
    assert!(
        !shown.contains(wrong_pw) && !shown.contains(PASSWORD),
        "{shown}"
    );

    // No TLS client files: the server refuses the handshake; a clear error, no panic.
    let plain = Config::from_toml(&format!(
        "[backend]\nkind = \"etcd\"\nendpoints = [\"127.0.0.1:{PORT}\"]\nconnect_timeout = \"2s\"\n"
    ))
    .unwrap();
    let err = dprim_etcd::connect(&plain.backend).await.unwrap_err();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::Unavailable | ErrorKind::Timeout | ErrorKind::PermissionDenied
        ),
        "{err}"
    );
}
