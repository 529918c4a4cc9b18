//! Pulls waiting on an empty queue must not all wake for every message
//! (the herd effect): with many consumers waiting, each push would
//! otherwise fire a watch of every one of them, and each would then read
//! the queue again, so the server's work per message grew with the number
//! of idle consumers.
//!
//! A waiting pull watches the queue itself until it first wakes to find
//! nothing; from then on it waits in a line, where only the first few
//! watch the queue. So after one push (which wakes them all once), the
//! watchers fired per event must stay few.
//!
//! Measured on the server itself: `mntr` counts watch events and the
//! watchers they fired (`zk_cnt_node_*_watch_count`,
//! `zk_sum_node_*_watch_count`). Each consumer here has its own connection,
//! as separate processes would (a client sets one server watch per path
//! however many of its callers wait on it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::{Config, Key};
use dprim_conformance::waiting::WaitingConsumers;
use std::collections::HashMap;
use std::time::Duration;
use support::Servers;

const PORT: u16 = 2289;
const CONSUMERS: usize = 12;
const MESSAGES: usize = 6;
/// Watchers an event may fire on average: the two pulls at the head of
/// the line of waiting pulls watch the queue, and each of the others the
/// two places ahead of it; a little more for a watch whose removal (sent
/// when its waiter stopped waiting on it) is still on its way.
const MOST_WOKEN: f64 = 2.5;

async fn connect() -> dprim::Backend {
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"zookeeper\"\nendpoints = [\"127.0.0.1:{PORT}\"]\nnamespace = \"waiters\"\n"
    ))
    .unwrap();
    dprim_zookeeper::connect(&config.backend).await.unwrap()
}

/// Per kind of watch event (`children`, `deleted`, ...): how many events
/// fired watchers, and how many watchers they fired, since the server
/// started.
fn watch_counts() -> HashMap<String, (u64, u64)> {
    let mut counts: HashMap<String, (u64, u64)> = HashMap::new();
    for line in Servers::four_letter(PORT, "mntr").lines() {
        let Some((name, value)) = line.split_once('\t') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<u64>() else {
            continue;
        };
        let kind = |prefix: &str| {
            name.strip_prefix(prefix)
                .and_then(|n| n.strip_suffix("_watch_count"))
                .map(str::to_string)
        };
        if let Some(kind) = kind("zk_cnt_node_") {
            counts.entry(kind).or_default().0 = value;
        } else if let Some(kind) = kind("zk_sum_node_") {
            counts.entry(kind).or_default().1 = value;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_wakes_a_bounded_number_of_waiting_pulls() {
    let servers = Servers::new("waiters", Some(PORT));
    servers.script(&["start"]);
    let name = Key::new("jobs").unwrap();
    let producer = connect().await;
    let queue = producer.queues().open(&name, None).await.unwrap();

    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        consumers.push(connect().await);
    }
    let mut waiting = WaitingConsumers::start(consumers, &name).await.unwrap();
    // Every consumer is waiting: nothing to pull yet. The first message
    // wakes them all; those that find nothing take a place in line.
    tokio::time::sleep(Duration::from_secs(2)).await;
    waiting.push_and_take(queue.as_ref(), 0).await.unwrap();

    let before = watch_counts();
    assert!(
        before.get("children").is_some_and(|c| c.0 > 0),
        "mntr reports no children watch events: {}",
        Servers::four_letter(PORT, "mntr")
    );
    for i in 1..=MESSAGES {
        let c = waiting.push_and_take(queue.as_ref(), i).await.unwrap();
        println!("message {i} taken by consumer {c}");
    }
    let after = watch_counts();
    for (kind, (events, fired)) in &after {
        let (events_before, fired_before) = before.get(kind).copied().unwrap_or_default();
        let events = events - events_before;
        let fired = fired - fired_before;
        println!("`{kind}` events: {events}, watchers fired: {fired}");
        if events > 0 {
            let per_event = fired as f64 / events as f64;
            assert!(
                per_event <= MOST_WOKEN,
                "`{kind}` events fired {per_event:.1} watchers each with {} consumers waiting (at most {MOST_WOKEN} expected)",
                CONSUMERS - 1
            );
        }
    }
}
