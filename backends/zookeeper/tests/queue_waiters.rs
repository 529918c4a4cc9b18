//! Pulls waiting on an empty queue must not all wake for every message
//! (the herd effect): with many consumers waiting, each push would
//! otherwise fire a watch of every one of them, and each would then read
//! the queue again, so the server's work per message grew with the number
//! of idle consumers.
//!
//! Measured on the server itself: `mntr` reports, per watch event, how
//! many watchers it fired (`zk_max_node_*_watch_count`). Each consumer here
//! has its own connection, as separate processes would (a client sets one
//! server watch per path however many of its callers wait on it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::queue::{PullOptions, Queue};
use dprim::{Config, Key, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use support::Servers;

const PORT: u16 = 2289;
const CONSUMERS: usize = 12;
const MESSAGES: usize = 6;
/// Watchers a single event may fire: the two pulls at the head of the
/// line of waiting pulls watch the queue, and each of the others the two
/// places ahead of it; one more for a watch whose removal (sent when its
/// waiter stopped waiting on it) is still on its way.
const MOST_WOKEN: u64 = 3;

async fn connect() -> dprim::Backend {
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"zookeeper\"\nendpoints = [\"127.0.0.1:{PORT}\"]\nnamespace = \"waiters\"\n"
    ))
    .unwrap();
    dprim_zookeeper::connect(&config.backend).await.unwrap()
}

fn watch_counts() -> HashMap<String, u64> {
    Servers::four_letter(PORT, "mntr")
        .lines()
        .filter_map(|l| {
            let (name, value) = l.split_once('\t')?;
            let name = name
                .strip_prefix("zk_max_node_")?
                .strip_suffix("_watch_count")?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_wakes_a_bounded_number_of_waiting_pulls() {
    let servers = Servers::new("waiters", Some(PORT));
    servers.script(&["start"]);
    let name = Key::new("jobs").unwrap();
    let producer = connect().await;
    let queue = producer.queues().open(&name, None).await.unwrap();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut consumers = Vec::new();
    for c in 0..CONSUMERS {
        let backend = connect().await;
        let q: Arc<dyn Queue> = backend.queues().open(&name, None).await.unwrap();
        let tx = tx.clone();
        consumers.push(tokio::spawn(async move {
            // Pulls until it got a message or the test ends.
            loop {
                let options = PullOptions {
                    wait: Duration::from_secs(30),
                    ..PullOptions::default()
                };
                match q.pull(options).await {
                    Ok(Some(d)) => {
                        q.ack(&d.receipt).await.unwrap();
                        tx.send((c, d.payload)).unwrap();
                        return backend;
                    }
                    Ok(None) => {}
                    Err(e) => panic!("consumer {c}: {e}"),
                }
            }
        }));
    }
    // Every consumer is waiting: nothing to pull yet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = watch_counts();
    assert!(
        !before.is_empty(),
        "mntr reports no watch counts: {}",
        Servers::four_letter(PORT, "mntr")
    );

    for i in 0..MESSAGES {
        queue
            .push(Value::new(format!("m{i}")).unwrap())
            .await
            .unwrap();
        let (c, payload) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("a waiting consumer takes the message")
            .unwrap();
        println!("message {i} ({payload:?}) taken by consumer {c}");
        // Lets the line settle before the next push.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let after = watch_counts();
    println!("most watchers fired by one event, per kind: {after:?}");
    for (kind, most) in &after {
        assert!(
            *most <= MOST_WOKEN,
            "one `{kind}` event fired {most} watchers with {CONSUMERS} consumers waiting (at most {MOST_WOKEN} expected); before the pushes: {before:?}"
        );
    }
    for c in consumers {
        c.abort();
    }
    drop(queue);
}
