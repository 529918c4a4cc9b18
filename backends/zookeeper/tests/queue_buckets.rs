//! A queue's messages live in buckets of `BUCKET_SPAN` sequence numbers.
//! Pushes through several clients, each with its own idea of the open
//! bucket, keep push order across bucket changes; a drained queue keeps
//! only its last bucket; depth counts every bucket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::queue::{PullOptions, Queue};
use dprim::{Config, Key, Value};
use dprim_zookeeper::BUCKET_SPAN;
use std::sync::Arc;
use std::time::Duration;
use support::Servers;
use zookeeper_client::Client;

const PORT: u16 = 2285;
const NAMESPACE: &str = "buckets";

async fn connect() -> dprim::Backend {
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"zookeeper\"\nendpoints = [\"127.0.0.1:{PORT}\"]\nnamespace = \"{NAMESPACE}\"\n"
    ))
    .unwrap();
    dprim_zookeeper::connect(&config.backend).await.unwrap()
}

async fn buckets(raw: &Client) -> Vec<String> {
    let mut names = raw
        .list_children(&format!("/{NAMESPACE}/!queue/ordered/!m"))
        .await
        .unwrap();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn push_order_holds_across_buckets_and_clients() {
    let servers = Servers::new("buckets", Some(PORT));
    servers.script(&["start"]);
    let name = Key::new("ordered").unwrap();
    let mut queues: Vec<Arc<dyn Queue>> = Vec::new();
    let mut backends = Vec::new();
    for _ in 0..3 {
        let backend = connect().await;
        queues.push(backend.queues().open(&name, None).await.unwrap());
        backends.push(backend);
    }
    // One push after another, in runs of five per client: a client that
    // sealed a bucket pushes on into the next one while the other two still
    // believe the sealed one is open.
    let total = (BUCKET_SPAN as usize) * 5 / 2;
    for i in 0..total {
        let payload = Value::new(i.to_string().into_bytes()).unwrap();
        queues[(i / 5) % 3].push(payload).await.unwrap();
    }
    let raw = Client::connect(&format!("127.0.0.1:{PORT}")).await.unwrap();
    assert_eq!(
        buckets(&raw).await.len(),
        3,
        "{total} messages fill three buckets"
    );
    let depth = queues[1].depth().await.unwrap();
    assert_eq!((depth.ready, depth.in_flight), (total as u64, 0));

    let options = PullOptions {
        visibility_timeout: Duration::from_secs(30),
        wait: Duration::ZERO,
        session: None,
    };
    for expected in 0..total {
        let delivery = queues[expected % 3]
            .pull(options.clone())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("message {expected} was not delivered"));
        let got: usize = std::str::from_utf8(delivery.payload.as_bytes())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(got, expected, "delivered out of push order");
        queues[expected % 3].ack(&delivery.receipt).await.unwrap();
    }
    assert!(queues[0].pull(options).await.unwrap().is_none());
    let depth = queues[2].depth().await.unwrap();
    assert_eq!((depth.ready, depth.in_flight), (0, 0));
    // Each drained bucket was deleted by the pull that found it empty,
    // except the last, which pushes still use.
    assert_eq!(buckets(&raw).await, vec!["b-0000000002".to_string()]);
    queues[0]
        .push(Value::new(b"after".to_vec()).unwrap())
        .await
        .unwrap();
    let next = queues[1]
        .pull(PullOptions::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.payload.as_bytes(), b"after");
}
