//! TLS to a real ZooKeeper server started by the project's script with a
//! TLS client port (`secureClientPort`, client certificates required) and
//! certificates from `scripts/test-certs.sh`: a subset of the conformance
//! suite passes over TLS; a missing client certificate, an unknown CA or a
//! plain connection is refused with an error that says what to check; bad
//! `tls` settings are config errors naming the setting.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::{Config, ErrorKind, Registry};
use dprim_conformance::{ConfigHarness, RunOptions};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use support::Servers;

/// The plain client port (the script's readiness checks use it).
const PORT: u16 = 2287;
/// The TLS client port.
const SECURE_PORT: u16 = 2288;

fn make_certs(dir: &Path) {
    let ok = Command::new("bash")
        .arg(support::repo_root().join("scripts/test-certs.sh"))
        .arg(dir)
        .status()
        .expect("run scripts/test-certs.sh")
        .success();
    assert!(ok, "scripts/test-certs.sh failed (is openssl installed?)");
}

fn config(port: u16, tls: &str) -> Config {
    Config::from_toml(&format!(
        "[backend]\nkind = \"zookeeper\"\nendpoints = [\"127.0.0.1:{port}\"]\nnamespace = \"tls\"\nconnect_timeout = \"2s\"\nrequest_timeout = \"2s\"\n{tls}"
    ))
    .unwrap()
}

fn tls_table(ca: &Path, identity: Option<&Path>) -> String {
    match identity {
        Some(d) => format!(
            "tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}\n",
            ca.display(),
            d.join("client.pem").display(),
            d.join("client-key.pem").display()
        ),
        None => format!("tls = {{ ca = \"{}\" }}\n", ca.display()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let mut servers = Servers::new("tls", Some(PORT));
    let certs = servers.dir.join("certs");
    make_certs(&certs);
    // ZooKeeper reads its certificate and key from one PEM file.
    let keystore = certs.join("server-keystore.pem");
    std::fs::write(
        &keystore,
        [
            std::fs::read(certs.join("server.pem")).unwrap(),
            std::fs::read(certs.join("server-key.pem")).unwrap(),
        ]
        .concat(),
    )
    .unwrap();
    let extra = servers.dir.join("tls.cfg");
    std::fs::write(
        &extra,
        format!(
            "secureClientPort={SECURE_PORT}\n\
             secureClientPortAddress=127.0.0.1\n\
             serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n\
             ssl.keyStore.location={}\n\
             ssl.keyStore.type=PEM\n\
             ssl.trustStore.location={}\n\
             ssl.trustStore.type=PEM\n\
             ssl.clientAuth=need\n",
            keystore.display(),
            certs.join("ca.pem").display()
        ),
    )
    .unwrap();
    servers.extra_conf = Some(extra);
    servers.script(&["start"]);
    let ca = certs.join("ca.pem");

    // With the CA and a client certificate: a subset of the suite passes.
    let good = config(SECURE_PORT, &tls_table(&ca, Some(&certs)));
    let registry = Registry::new().register("zookeeper", dprim_zookeeper::constructor());
    let harness = Arc::new(ConfigHarness::new(registry, good.backend.clone()));
    for filter in [
        "kv::cas",
        "kv::watch_dir",
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
    }

    // The server wants a client certificate: without one, refused.
    let err = dprim_zookeeper::connect(&config(SECURE_PORT, &tls_table(&ca, None)).backend)
        .await
        .expect_err("a TLS connection without a client certificate must be refused");
    println!("no client certificate gives: {err}");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("`tls.cert`"), "{err}");

    // A CA that did not sign the server's certificate: refused.
    let stranger = servers.dir.join("other-ca");
    make_certs(&stranger);
    let err = dprim_zookeeper::connect(
        &config(
            SECURE_PORT,
            &tls_table(&stranger.join("ca.pem"), Some(&stranger)),
        )
        .backend,
    )
    .await
    .expect_err("a server certificate from an unknown CA must be refused");
    println!("an unknown CA gives: {err}");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("`tls.ca`"), "{err}");

    // No TLS against the TLS port: refused, naming what to check.
    let err = dprim_zookeeper::connect(&config(SECURE_PORT, "").backend)
        .await
        .expect_err("plain TCP to the TLS port must be refused");
    println!("plain TCP to the TLS port gives: {err}");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("`endpoints`"), "{err}");
}

#[tokio::test]
async fn bad_tls_settings_are_config_errors() {
    let dir = std::env::temp_dir().join(format!("dprim-zk-tls-config-{}", std::process::id()));
    make_certs(&dir);
    let cases = [
        (
            "tls = { cert = \"x.pem\", key = \"y.pem\" }\n".to_string(),
            "`tls.ca`",
        ),
        (
            format!(
                "tls = {{ ca = \"{}\", cert = \"{}\" }}\n",
                dir.join("ca.pem").display(),
                dir.join("client.pem").display()
            ),
            "both `cert` and `key`",
        ),
        (
            "tls = { ca = \"/nonexistent/ca.pem\" }\n".to_string(),
            "/nonexistent/ca.pem",
        ),
        (
            // A key where the CA belongs: no certificate in it.
            format!(
                "tls = {{ ca = \"{}\" }}\n",
                dir.join("client-key.pem").display()
            ),
            "client-key.pem",
        ),
    ];
    for (tls, named) in cases {
        let err = dprim_zookeeper::connect(&config(SECURE_PORT, &tls).backend)
            .await
            .expect_err(&tls);
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{tls}: {err}");
        assert!(err.to_string().contains(named), "{tls}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
