//! Reads with nobody serving direct gets. Every read of the backend is a
//! direct get, which any replica of the stream may answer; the replicas
//! of a stream just created, or catching up, have not subscribed yet, and
//! the request then gets "no responders". The backend must read from the
//! stream's leader instead, not fail.
//!
//! A single server whose two streams have direct gets turned off
//! (`allow_direct: false`, set with a raw client after the backend created
//! them) answers every direct get that way, so here every read the
//! backend makes takes that path: the KV, session and queue cases of the
//! conformance suite must pass on it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use async_nats::jetstream;
use dprim::{Config, ErrorKind, Key, KvExt, Registry, Value, WatchEvent, WatchStart, WatchTarget};
use dprim_conformance::{run, ConfigHarness, RunOptions};
use std::sync::Arc;
use std::time::Duration;

const STREAMS: [&str; 2] = ["KV_dprim", "DPRIM_QUEUES"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_read_works_when_no_replica_serves_direct_gets() {
    let servers = support::Servers::new("leader-reads", 4321);
    servers.script(&["start"]);
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"nats\"\nendpoints = [\"127.0.0.1:{}\"]\nnamespace = \"leader-reads\"\nsession_ttl = \"2s\"\n",
        servers.port
    ))
    .unwrap();
    // Creates the streams as the backend wants them.
    drop(dprim_nats::connect(&config.backend).await.unwrap());

    let raw = async_nats::connect(format!("127.0.0.1:{}", servers.port))
        .await
        .unwrap();
    let js = jetstream::new(raw.clone());
    for name in STREAMS {
        let mut stream = js.get_stream(name).await.unwrap();
        let mut stream_config = stream.info().await.unwrap().config.clone();
        stream_config.allow_direct = false;
        js.update_stream(stream_config).await.unwrap();
    }
    // What the backend would run into: a direct get finds nobody.
    let direct = js
        .get_stream("KV_dprim")
        .await
        .unwrap()
        .direct_get_last_for_subject("$KV.dprim.=meta")
        .await;
    assert!(direct.is_err(), "direct gets are still served: {direct:?}");

    // One write and its reads, with the answers checked.
    let backend = dprim_nats::connect(&config.backend).await.unwrap();
    let k = Key::new("leader/k").unwrap();
    let v1 = backend
        .kv()
        .put(&k, Value::new("one").unwrap())
        .await
        .unwrap();
    let got = backend
        .kv()
        .get(&k)
        .await
        .unwrap()
        .expect("the key just put");
    assert_eq!((got.value.as_bytes(), got.version), (&b"one"[..], v1));
    let again = backend.kv().create(&k, Value::new("two").unwrap()).await;
    assert_eq!(
        again.as_ref().map_err(|e| e.kind()),
        Err(ErrorKind::AlreadyExists),
        "{again:?}"
    );

    // A watch from before trimmed history reads the key's oldest kept
    // change to tell: it must say `Resync`.
    let hot = Key::new("leader/hot").unwrap();
    let start = backend
        .kv()
        .put(&hot, Value::new("0").unwrap())
        .await
        .unwrap();
    for i in 1..=dprim_nats::HISTORY + 5 {
        backend
            .kv()
            .put(&hot, Value::new(i.to_string()).unwrap())
            .await
            .unwrap();
    }
    let mut w = backend
        .kv()
        .watch(WatchTarget::Key(hot), WatchStart::After(start))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("the watch's first item");
    assert!(
        matches!(first, Some(Ok(WatchEvent::Resync { .. }))),
        "a watch from before trimmed history must start with Resync, got {first:?}"
    );

    let harness = Arc::new(ConfigHarness::new(
        Registry::new().register("nats", dprim_nats::constructor()),
        config.backend.clone(),
    ));
    let mut failed = 0;
    for filter in ["kv::", "session::", "queue::"] {
        let options = RunOptions {
            filter: Some(filter.to_string()),
            ..RunOptions::default()
        };
        let report = run(harness.clone(), options, &mut |c| {
            eprintln!("{:<55} {:?} {}ms {}", c.name, c.outcome, c.millis, c.reason);
        })
        .await;
        println!("{}", report.table());
        failed += report.failed();
    }
    assert_eq!(failed, 0, "cases failed with direct gets off (see above)");
}
