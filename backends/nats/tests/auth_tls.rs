//! User/password authentication and TLS against a real nats-server whose
//! certificates this test makes with the openssl CLI. Wrong credentials give
//! `PermissionDenied` with a clear message; the password never shows up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::{Config, ErrorKind, Key, KvExt, Value};
use std::path::Path;
use std::process::Command;

const PASSWORD: &str = "pw-Zq8vN3kT7yR2";

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

fn config(port: u16, dir: &Path, user: &str, password_var: &str, tls: bool) -> Config {
    let tls = if tls {
        format!("tls = {{ ca = \"{}\" }}\n", dir.join("ca.pem").display())
    } else {
        String::new()
    };
    Config::from_toml(&format!(
        "[backend]\nkind = \"nats\"\nendpoints = [\"127.0.0.1:{port}\"]\nnamespace = \"auth-test\"\nusername = \"{user}\"\npassword = {{ env = \"{password_var}\" }}\n{tls}"
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_and_tls_from_config() {
    let mut servers = support::Servers::new("auth-tls", 4312);
    let certs = servers.dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    make_certs(&certs);
    let extra = servers.dir.join("auth.conf");
    std::fs::write(
        &extra,
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\nauthorization {{\n  users = [ {{ user: \"app\", password: \"{PASSWORD}\" }} ]\n}}\n",
            certs.join("server.pem").display(),
            certs.join("server-key.pem").display()
        ),
    )
    .unwrap();
    servers.extra_conf = Some(extra);
    servers.script(&["start"]);

    std::env::set_var("DPRIM_TEST_NATS_PASSWORD", PASSWORD);
    std::env::set_var("DPRIM_TEST_NATS_WRONG", "not-the-password-4711");

    // Right credentials over TLS: every primitive's plumbing works.
    let good = config(
        servers.port,
        &certs,
        "app",
        "DPRIM_TEST_NATS_PASSWORD",
        true,
    );
    assert!(
        !format!("{:?}", good).contains(PASSWORD),
        "the config's Debug shows the password"
    );
    let backend = dprim_nats::connect(&good.backend)
        .await
        .expect("connect with the right password over TLS");
    let k = Key::new("auth/probe").unwrap();
    backend
        .kv()
        .put(&k, Value::new(b"ok".to_vec()).unwrap())
        .await
        .unwrap();
    assert_eq!(
        backend
            .kv()
            .get(&k)
            .await
            .unwrap()
            .unwrap()
            .value
            .as_bytes(),
        b"ok"
    );

    // Wrong password: PermissionDenied naming what to check, never a secret.
    let bad = config(servers.port, &certs, "app", "DPRIM_TEST_NATS_WRONG", true);
    let err = dprim_nats::connect(&bad.backend)
        .await
        .expect_err("a wrong password must be refused");
    let shown = format!("{err} / {err:?}");
    println!("wrong password gives: {err}");
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{shown}");
    assert!(
        shown.contains("`username`"),
        "the message names what to check: {shown}"
    );
    assert!(
        !shown.contains("not-the-password-4711") && !shown.contains(PASSWORD),
        "a secret leaked: {shown}"
    );

    // Unknown user: the same.
    let stranger = config(
        servers.port,
        &certs,
        "mallory",
        "DPRIM_TEST_NATS_PASSWORD",
        true,
    );
    let err = dprim_nats::connect(&stranger.backend)
        .await
        .expect_err("an unknown user must be refused");
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(!format!("{err:?}").contains(PASSWORD));

    // No TLS settings against a TLS-only server: refused, no secret shown.
    let plain = config(
        servers.port,
        &certs,
        "app",
        "DPRIM_TEST_NATS_PASSWORD",
        false,
    );
    let err = dprim_nats::connect(&plain.backend)
        .await
        .expect_err("plain TCP must not work");
    println!("no TLS gives: {err}");
    assert!(!format!("{err:?}").contains(PASSWORD));

    // A missing password variable is a config error naming the variable.
    let missing = config(
        servers.port,
        &certs,
        "app",
        "DPRIM_TEST_NATS_UNSET_VAR",
        true,
    );
    let err = dprim_nats::connect(&missing.backend)
        .await
        .expect_err("unset variable");
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    assert!(
        err.to_string().contains("DPRIM_TEST_NATS_UNSET_VAR"),
        "{err}"
    );
}
