//! Pulls waiting on an empty queue must not all wake for every message
//! (the herd effect): with many consumers waiting, each push, claim and
//! ack would otherwise reach the watch of every one of them, and each would
//! then read the queue again, so the server's work per message grew with
//! the number of idle consumers.
//!
//! A waiting pull watches the queue itself until it first wakes to find
//! nothing; from then on it waits in a line, where only the first few
//! watch the queue. So after one push (which wakes them all once), the
//! watch events and reads per message must stay few. Measured on the
//! server itself, from its metrics: `etcd_debugging_mvcc_events_total`
//! (events sent to watchers) and `etcd_mvcc_range_total` (reads).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::{Config, Key};
use dprim_conformance::waiting::WaitingConsumers;
use std::process::Command;
use std::time::Duration;
use support::{Etcd, Servers};

const PORT: u16 = 23791;
const PEER_PORT: u16 = 23801;
const CONSUMERS: usize = 12;
const MESSAGES: usize = 6;
/// Watch events per message: a push, a claim and an ack (message and
/// claim deleted) seen by the two pulls that watch the queue, and the
/// place left in line seen by the (at most two) pulls behind it. Every
/// waiting pull watching the queue made about 35 here with 11 consumers
/// waiting.
const MOST_EVENTS_PER_MESSAGE: f64 = 12.0;
/// Reads per message: those pulls reading the queue again after each
/// change, a waiter moving up the line looking at it. Every waiting pull
/// reading the queue made about 90 here with 11 consumers waiting.
const MOST_READS_PER_MESSAGE: f64 = 50.0;

fn metric(name: &str) -> f64 {
    let out = Command::new("curl")
        .args(["-fsS", &format!("http://127.0.0.1:{PORT}/metrics")])
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("etcd reports no {name}"))
}

async fn connect() -> dprim::Backend {
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"etcd\"\nendpoints = [\"127.0.0.1:{PORT}\"]\nnamespace = \"waiters\"\n"
    ))
    .unwrap();
    dprim_etcd::connect(&config.backend).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_wakes_a_bounded_number_of_waiting_pulls() {
    let servers = Servers::new("etcd-waiters");
    servers.script(&["install"]);
    let dir = servers.dir.clone();
    let _etcd = Etcd::start(
        &dir,
        "waiters",
        &format!("http://127.0.0.1:{PORT}"),
        PEER_PORT,
        &[],
    );
    let mut ready = false;
    for _ in 0..100 {
        let health = Command::new("curl")
            .args(["-fsS", &format!("http://127.0.0.1:{PORT}/health")])
            .output()
            .expect("run curl");
        if health.status.success() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "etcd did not become healthy; see {}", dir.display());

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

    let (events, reads) = (
        metric("etcd_debugging_mvcc_events_total"),
        metric("etcd_mvcc_range_total"),
    );
    for i in 1..=MESSAGES {
        let c = waiting.push_and_take(queue.as_ref(), i).await.unwrap();
        println!("message {i} taken by consumer {c}");
    }
    let events = (metric("etcd_debugging_mvcc_events_total") - events) / MESSAGES as f64;
    let reads = (metric("etcd_mvcc_range_total") - reads) / MESSAGES as f64;
    println!(
        "per message, with {} consumers waiting: {events:.1} watch events, {reads:.1} reads",
        CONSUMERS - 1
    );
    assert!(
        events <= MOST_EVENTS_PER_MESSAGE,
        "{events:.1} watch events per message with {} consumers waiting (at most {MOST_EVENTS_PER_MESSAGE} expected)",
        CONSUMERS - 1
    );
    assert!(
        reads <= MOST_READS_PER_MESSAGE,
        "{reads:.1} reads per message with {} consumers waiting (at most {MOST_READS_PER_MESSAGE} expected)",
        CONSUMERS - 1
    );
}
