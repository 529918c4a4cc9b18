//! A publisher that exits right after publishing loses nothing once it has
//! called `flush`. A NATS publish returns while its message is still queued
//! in the client; a process that then exits (here: its runtime is dropped,
//! so none of its tasks runs again) took the queued messages with it, which
//! `dprim pub` did about one time in three.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::{Config, Key, SubscriptionItem, Value};
use std::collections::BTreeSet;
use std::time::Duration;

const PUBLISHERS: u32 = 30;
const EACH: u32 = 10;

#[test]
fn flushed_messages_survive_the_publisher_exiting() {
    let servers = support::Servers::new("publisher-exit", 4319);
    servers.script(&["start"]);
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"nats\"\nendpoints = [\"127.0.0.1:{}\"]\nnamespace = \"exit\"\n",
        servers.port
    ))
    .unwrap();
    let topic = Key::new("exit").unwrap();
    let subscriber_runtime = tokio::runtime::Runtime::new().unwrap();
    let (_subscriber, mut sub) = subscriber_runtime.block_on(async {
        let backend = dprim_nats::connect(&config.backend).await.unwrap();
        let sub = backend.pubsub().subscribe(&topic).await.unwrap();
        (backend, sub)
    });
    for p in 0..PUBLISHERS {
        // One short-lived publishing process.
        let process = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        process.block_on(async {
            let backend = dprim_nats::connect(&config.backend).await.unwrap();
            for i in 0..EACH {
                let payload = Value::new(format!("{p}:{i}").into_bytes()).unwrap();
                backend.pubsub().publish(&topic, payload).await.unwrap();
            }
            backend.pubsub().flush().await.unwrap();
        });
        drop(process);
    }
    let mut missing: BTreeSet<String> = (0..PUBLISHERS)
        .flat_map(|p| (0..EACH).map(move |i| format!("{p}:{i}")))
        .collect();
    subscriber_runtime.block_on(async {
        while !missing.is_empty() {
            match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
                Ok(Some(Ok(SubscriptionItem::Message(m)))) => {
                    let text = m.payload.as_str().unwrap().to_string();
                    assert!(missing.remove(&text), "{text} arrived twice");
                }
                other => panic!(
                    "{} messages never arrived (e.g. {:?}); the subscription gave {other:?}",
                    missing.len(),
                    missing.iter().take(5).collect::<Vec<_>>()
                ),
            }
        }
    });
}
