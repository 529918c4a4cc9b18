//! Listing often must not exhaust the server's consumers: each list uses a
//! short-lived JetStream consumer, and nats-server allows 1,000 per stream
//! by default. Clients that poll (task agents list their assignments several
//! times a second) once hit "maximum consumers limit reached".
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::{Config, Depth, Key, KvExt, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_lists_do_not_exhaust_consumers() {
    let servers = support::Servers::new("many-lists", 4314);
    servers.script(&["start"]);
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"nats\"\nendpoints = [\"127.0.0.1:{}\"]\nnamespace = \"lists\"\n",
        servers.port
    ))
    .unwrap();
    let b = dprim_nats::connect(&config.backend).await.unwrap();
    let dir = Key::new("d").unwrap();
    b.kv()
        .put(&dir.join("k").unwrap(), Value::empty())
        .await
        .unwrap();
    for i in 0..1500 {
        let listing = b
            .kv()
            .list(&dir, Depth::Children)
            .await
            .unwrap_or_else(|e| panic!("list {i} failed: {e}"));
        assert_eq!(listing.entries.len(), 1);
    }
}
