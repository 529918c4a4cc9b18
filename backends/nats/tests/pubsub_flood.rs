//! A subscriber flooded faster than it can take messages loses none
//! silently: every message published to its topic is either received or
//! counted in a `Lagged`. The client library drops messages without a count
//! when its own per-subscription channel fills, so dprim must empty that
//! channel as fast as the connection fills it. (It once did so from a task
//! of its own, which the scheduler could starve while the connection kept
//! reading: a flood from plain NATS publishers lost messages that no
//! `Lagged` reported.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use dprim::{Config, Key, SubscriptionItem};
use std::collections::HashMap;
use std::time::Duration;

const PUBLISHERS: u64 = 4;
const EACH: u64 = 250_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_subscriber_loses_nothing_silently() {
    let servers = support::Servers::new("flood", 4316);
    servers.script(&["start"]);
    let url = format!("127.0.0.1:{}", servers.port);
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"nats\"\nendpoints = [\"{url}\"]\nnamespace = \"flood\"\n"
    ))
    .unwrap();
    let backend = dprim_nats::connect(&config.backend).await.unwrap();
    let mut sub = backend
        .pubsub()
        .subscribe(&Key::new("flood").unwrap())
        .await
        .unwrap();

    // Plain NATS publishers on the topic's subject: nothing paces them.
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let client = async_nats::connect(url.as_str()).await.unwrap();
        publishers.push(tokio::spawn(async move {
            for i in 0..EACH {
                client
                    .publish("dprim.flood.=t.flood", Bytes::from(format!("{p}:{i}")))
                    .await
                    .unwrap();
            }
            client.flush().await.unwrap();
        }));
    }

    let total = PUBLISHERS * EACH;
    let (mut received, mut lagged) = (0u64, 0u64);
    let mut next: HashMap<u64, u64> = HashMap::new();
    while received + lagged < total {
        match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
            Ok(Some(Ok(SubscriptionItem::Message(m)))) => {
                let text = m.payload.as_str().unwrap();
                let (p, i) = text.split_once(':').unwrap();
                let (p, i): (u64, u64) = (p.parse().unwrap(), i.parse().unwrap());
                let expected = next.entry(p).or_insert(0);
                assert!(
                    i >= *expected,
                    "publisher {p}: message {i} after {expected}"
                );
                *expected = i + 1;
                received += 1;
            }
            Ok(Some(Ok(SubscriptionItem::Lagged(n)))) => lagged += n,
            Ok(other) => panic!("the subscription ended or failed: {other:?}"),
            Err(_) => panic!(
                "{} of {total} messages neither arrived nor were reported in a Lagged \
                 ({received} received, {lagged} reported missed)",
                total - received - lagged
            ),
        }
    }
    for p in publishers {
        p.await.unwrap();
    }
    assert_eq!(received + lagged, total);
}
