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

use dprim::{
    Config, Depth, ErrorKind, Key, KvExt, Value, Version, WatchEvent, WatchStart, WatchTarget,
};
use dprim_conformance::linearizability::{race, registers};
use std::collections::BTreeMap;
use std::time::Duration;
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

    let writer_backend = backend.clone();
    let writer = tokio::spawn(async move {
        let mut acked: Vec<(Key, u64, Version)> = Vec::new();
        let mut unknown: Vec<(Key, u64)> = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        let mut i = 0u64;
        while tokio::time::Instant::now() < deadline {
            let key = Key::new(format!("w/k{}", i % 10)).unwrap();
            let v = match writer_backend
                .kv()
                .put(&key, Value::new(i.to_string().into_bytes()).unwrap())
                .await
            {
                Ok(v) => v,
                // Its request may have been applied: no retry can hide
                // that without risking a second application.
                Err(e) if e.kind() == ErrorKind::OutcomeUnknown => {
                    unknown.push((key, i));
                    i += 1;
                    continue;
                }
                Err(e) => panic!("write {i} failed through the retry layer: {e}"),
            };
            acked.push((key, i, v));
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (acked, unknown)
    });

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

    let (acked, unknown) = writer.await.unwrap();
    let history = racers.await.unwrap().unwrap();
    let checked = history
        .check(true)
        .unwrap_or_else(|e| panic!("the racing clients' history: {e}"));
    println!("racing clients: {checked:?}");
    assert_eq!(checked.keys, 2, "{checked:?}");
    assert!(acked.len() > 100, "only {} writes in 8 s", acked.len());

    // Every acknowledged write is there: each key holds its last
    // acknowledged value, or the value of a later write whose outcome is
    // unknown (which may have been applied).
    println!(
        "writer: {} writes acknowledged, {} with outcome unknown",
        acked.len(),
        unknown.len()
    );
    let mut last: BTreeMap<Key, (u64, Version)> = BTreeMap::new();
    for (k, i, v) in &acked {
        last.insert(k.clone(), (*i, *v));
    }
    for (k, (i, v)) in &last {
        let e = backend
            .kv()
            .get(k)
            .await
            .unwrap()
            .expect("acked key missing");
        let later_unknown = unknown
            .iter()
            .any(|(uk, ui)| uk == k && ui > i && e.value.as_bytes() == ui.to_string().as_bytes());
        if !later_unknown {
            assert_eq!(e.value.as_bytes(), i.to_string().as_bytes(), "{k}");
            assert_eq!(e.version, *v, "{k}");
        }
    }

    // The watcher saw every acknowledged version, in order, with no Resync.
    let mut seen = Vec::new();
    let want = acked.last().unwrap().2;
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
    for (k, i, v) in &acked {
        assert!(
            seen.binary_search(v).is_ok(),
            "watcher missed {k}={i} at {v:?}"
        );
    }
}
