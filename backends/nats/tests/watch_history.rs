//! A watch must never skip changes the bucket trimmed: the bucket keeps
//! `dprim_nats::HISTORY` revisions per key, so a key changed more often
//! than that after a watch's start point has lost changes the watch owes,
//! and the watch must say `Resync` instead of starting after the gap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::{Backend, Config, Key, KvExt, Value, WatchEvent, WatchStart, WatchTarget};
use std::time::Duration;

async fn connect(port: u16, namespace: &str) -> Backend {
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"nats\"\nendpoints = [\"127.0.0.1:{port}\"]\nnamespace = \"{namespace}\"\n"
    ))
    .unwrap();
    dprim_nats::connect(&config.backend).await.unwrap()
}

fn val(i: usize) -> Value {
    Value::new(format!("{i}").into_bytes()).unwrap()
}

async fn next(w: &mut dprim::WatchStream) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch ended")
        .expect("a watch event, not an error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_trimmed_history() {
    let servers = support::Servers::new("watch-history", 4313);
    servers.script(&["start"]);
    let b = connect(servers.port, "watch-history").await;
    let kv = b.kv();
    let history = dprim_nats::HISTORY as usize;

    // One key changed more often than the bucket keeps after the start
    // point: the oldest changes after it are gone.
    let hot = Key::new("hot/k").unwrap();
    let start = kv.put(&hot, val(0)).await.unwrap();
    let mut last = start;
    for i in 1..=history + 20 {
        last = kv.put(&hot, val(i)).await.unwrap();
    }
    let mut w = kv
        .watch(WatchTarget::Key(hot.clone()), WatchStart::After(start))
        .await
        .unwrap();
    let first = next(&mut w).await;
    assert!(
        matches!(first, WatchEvent::Resync { .. }),
        "a key watch from before trimmed history must start with Resync, got {first:?}"
    );

    // The same through a directory watch, even when another key's change
    // comes first in the stream.
    let dir = Key::new("d").unwrap();
    let quiet = Key::new("d/quiet").unwrap();
    let busy = Key::new("d/busy").unwrap();
    let dstart = kv.put(&busy, val(0)).await.unwrap();
    kv.put(&quiet, val(0)).await.unwrap();
    for i in 1..=history + 20 {
        kv.put(&busy, val(i)).await.unwrap();
    }
    let mut w = kv
        .watch(WatchTarget::Dir(dir.clone()), WatchStart::After(dstart))
        .await
        .unwrap();
    let first = next(&mut w).await;
    assert!(
        matches!(first, WatchEvent::Resync { .. }),
        "a directory watch from before trimmed history must start with Resync, got {first:?}"
    );

    // No false alarm: a start point inside the kept history delivers every
    // later change in order.
    let kept = 100;
    let mut versions = Vec::new();
    for i in 0..=kept {
        versions.push(kv.put(&hot, val(i)).await.unwrap());
    }
    assert!(versions[0] > last);
    let mut w = kv
        .watch(
            WatchTarget::Key(hot.clone()),
            WatchStart::After(versions[0]),
        )
        .await
        .unwrap();
    for v in &versions[1..] {
        match next(&mut w).await {
            WatchEvent::Put(e) => assert_eq!(e.version, *v),
            other => panic!("expected the put at {v}, got {other:?}"),
        }
    }

    // A reader that falls far behind a key's kept history while the watch
    // runs gets every change in order or a Resync, never a silent gap.
    let mut w = kv
        .watch(WatchTarget::Dir(dir.clone()), WatchStart::Now)
        .await
        .unwrap();
    let mut written = Vec::new();
    for i in 0..history * 4 {
        written.push(kv.put(&busy, val(i)).await.unwrap());
    }
    let mut seen = 0;
    loop {
        match next(&mut w).await {
            WatchEvent::Put(e) => {
                assert_eq!(e.version, written[seen], "change {seen} of the busy key");
                seen += 1;
                if seen == written.len() {
                    break;
                }
            }
            WatchEvent::Resync { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
}
