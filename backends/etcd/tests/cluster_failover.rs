//! A 3-member etcd cluster loses its leader (SIGKILL) and gets it back while
//! a writer and a watcher run through dprim: the writer sees no error the
//! retry layer could have hidden (only `OutcomeUnknown` for a write in
//! flight when the leader died, which no retry can hide without risking a
//! second application), no acknowledged write is lost, and the watcher
//! misses no event. Meanwhile three more clients race reads,
//! creates, conditional writes and deletes on two keys, and their history
//! must be linearizable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::{Config, Depth, Key, WatchEvent, WatchStart, WatchTarget};
use dprim_conformance::failover::write_numbers;
use dprim_conformance::linearizability::{race, registers};
use std::time::{Duration, Instant};
use support::Servers;

const ENDPOINTS: [&str; 3] = ["127.0.0.1:12379", "127.0.0.1:22379", "127.0.0.1:32379"];

async fn leader_member() -> String {
    for (i, ep) in ENDPOINTS.iter().enumerate() {
        let Ok(mut c) = etcd_client::Client::connect([*ep], None).await else {
            continue;
        };
        if let Ok(status) = c.status().await {
            let me = status.header().map(|h| h.member_id());
            if me == Some(status.leader()) {
                return format!("c{}", i + 1);
            }
        }
    }
    panic!("no etcd member reports itself leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_and_restarted_loses_nothing() {
    let servers = Servers::new("etcd-failover");
    servers.script(&["start-cluster"]);
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"etcd\"\nendpoints = {:?}\nnamespace = \"failover\"\nrequest_timeout = \"2s\"\n",
        ENDPOINTS
    ))
    .unwrap();
    let backend = dprim_etcd::connect(&config.backend).await.unwrap();
    let dir = Key::new("w").unwrap();
    let start = backend
        .kv()
        .list(&dir, Depth::Recursive)
        .await
        .unwrap()
        .revision;
    let mut watch = backend
        .kv()
        .watch(WatchTarget::Dir(dir.clone()), WatchStart::After(start))
        .await
        .unwrap();

    let until = Instant::now() + Duration::from_secs(8);
    let writer = tokio::spawn(write_numbers(backend.clone(), dir.clone(), move |_| {
        Instant::now() < until
    }));

    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(dprim_etcd::connect(&config.backend).await.unwrap());
    }
    // About 8 s at a few milliseconds per operation and pause.
    let racers = tokio::spawn(race(
        clients,
        registers(),
        600,
        Duration::from_millis(10),
        false,
    ));

    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = leader_member().await;
    servers.kill9(&leader);
    tokio::time::sleep(Duration::from_secs(2)).await;
    servers.script(&["restart-member", &leader]);

    let writes = writer.await.unwrap().unwrap();
    let history = racers.await.unwrap().unwrap();
    let checked = history
        .check(true)
        .unwrap_or_else(|e| panic!("the racing clients' history: {e}"));
    println!("racing clients: {checked:?}");
    assert_eq!(checked.keys, 2, "{checked:?}");
    assert!(
        writes.acked.len() > 100,
        "only {} writes in 8 s",
        writes.acked.len()
    );

    // Every acknowledged write is there.
    println!(
        "writer: {} writes acknowledged, {} with outcome unknown",
        writes.acked.len(),
        writes.unknown.len()
    );
    writes.check_stored(&backend).await.unwrap();

    // The watcher saw every acknowledged version, in order, with no Resync.
    let mut seen = Vec::new();
    let want = writes.acked.last().unwrap().2;
    while seen.last().is_none_or(|v| *v < want) {
        let ev = tokio::time::timeout(Duration::from_secs(20), watch.next())
            .await
            .expect("watcher stalled")
            .expect("watch ended")
            .unwrap();
        match ev {
            WatchEvent::Put(e) => seen.push(e.version),
            other => panic!("unexpected watch event {other:?}"),
        }
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "versions out of order"
    );
    for (k, i, v, _) in &writes.acked {
        assert!(
            seen.binary_search(v).is_ok(),
            "watcher missed {k}={i} at {v:?}"
        );
    }
}
