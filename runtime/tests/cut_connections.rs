//! Connections cut under load: three clients race reads, creates,
//! conditional writes and deletes on two keys through a TCP proxy that
//! resets every connection every few hundred milliseconds, and their history
//! must be linearizable (reads included where the backend declares
//! `kv.linearizable`). A write the proxy forwarded before a cut may have
//! been applied with its answer lost: it may come back as an error (its
//! outcome unknown, which the checker allows either way), never as a wrong
//! answer.
//!
//! Runs on the real backends named in DPRIM_TEST_BACKENDS (`scripts/test.sh`
//! sets `etcd,zookeeper,nats` and starts their servers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dprim::{Config, Key};
use dprim_conformance::faults::TcpProxy;
use dprim_conformance::linearizability::race;
use std::time::Duration;

/// The server each backend's suite config names.
fn server(kind: &str) -> std::net::SocketAddr {
    match kind {
        "etcd" => "127.0.0.1:2379",
        "zookeeper" => "127.0.0.1:2181",
        "nats" => "127.0.0.1:4222",
        other => panic!("unknown backend kind `{other}` in DPRIM_TEST_BACKENDS"),
    }
    .parse()
    .unwrap()
}

async fn race_through_cuts(kind: &str) {
    let proxy = TcpProxy::start(server(kind)).await.unwrap();
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"{kind}\"\nendpoints = [\"{}\"]\nnamespace = \"cut-{}\"\nrequest_timeout = \"2s\"\n",
        proxy.addr(),
        std::process::id()
    ))
    .unwrap();
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(dprim_runtime::open_config(&config).await.unwrap());
    }
    let linearizable_reads = clients[0].capabilities().kv.linearizable;
    let keys = vec![
        Key::new("register/a").unwrap(),
        Key::new("register/b").unwrap(),
    ];
    let racers = tokio::spawn(race(clients, keys, 300, Duration::from_millis(2), false));
    let mut cuts = 0;
    while !racers.is_finished() {
        tokio::time::sleep(Duration::from_millis(150 + rand::random_range(0..150))).await;
        proxy.cut();
        cuts += 1;
    }
    let history = racers.await.unwrap().unwrap();
    let unknown = history
        .ops()
        .iter()
        .filter(|op| op.returned.is_none())
        .count();
    let checked = history
        .check(linearizable_reads)
        .unwrap_or_else(|e| panic!("{kind}: the history through {cuts} cuts: {e}"));
    println!("{kind}: {checked:?} through {cuts} cuts, {unknown} outcomes unknown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn histories_stay_linearizable_when_connections_are_cut() {
    let Ok(list) = std::env::var("DPRIM_TEST_BACKENDS") else {
        eprintln!("DPRIM_TEST_BACKENDS is not set: the connection-cut race did not run (scripts/test.sh runs it on etcd, zookeeper and nats)");
        return;
    };
    for kind in list.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        race_through_cuts(kind).await;
    }
}
