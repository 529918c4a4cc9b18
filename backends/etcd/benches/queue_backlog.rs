//! What a queue's backlog costs each pull on etcd: push a backlog of 1 KiB
//! messages (64 pushes in flight), then time pull + ack one at a time, for
//! a small and a large backlog. A pull should cost the same whatever waits
//! behind the message it takes.
//!
//! `scripts/etcd.sh start && cargo bench -p dprim-etcd --bench queue_backlog`
//! (DPRIM_BENCH_ETCD=host:port picks another server; DPRIM_BENCH_BACKLOG the
//! large backlog, default 10000).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use dprim::queue::{PullOptions, Queue};
use dprim::{Config, Key, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PULLS: u32 = 200;

async fn push(q: &Arc<dyn Queue>, n: usize) -> Duration {
    let t = Instant::now();
    let mut in_flight = Vec::new();
    for _ in 0..n {
        let q = q.clone();
        in_flight.push(tokio::spawn(async move {
            q.push(Value::new(vec![b'x'; 1024]).unwrap()).await.unwrap()
        }));
        if in_flight.len() >= 64 {
            for h in in_flight.drain(..) {
                h.await.unwrap();
            }
        }
    }
    for h in in_flight {
        h.await.unwrap();
    }
    t.elapsed()
}

#[tokio::main]
async fn main() {
    let endpoint = std::env::var("DPRIM_BENCH_ETCD").unwrap_or_else(|_| "127.0.0.1:2379".into());
    let large: usize = std::env::var("DPRIM_BENCH_BACKLOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"etcd\"\nendpoints = [\"{endpoint}\"]\nnamespace = \"bench-backlog-{}\"\n",
        std::process::id()
    ))
    .unwrap();
    let backend = dprim_etcd::connect(&config.backend)
        .await
        .expect("connect; start etcd with scripts/etcd.sh start");
    println!("| backlog | push msgs/s (64 in flight) | pull + ack, mean ms |");
    println!("|---|---|---|");
    for (i, backlog) in [100, large].into_iter().enumerate() {
        let q = backend
            .queues()
            .open(&Key::new(format!("q{i}")).unwrap(), None)
            .await
            .unwrap();
        let pushed = push(&q, backlog + PULLS as usize).await;
        let t = Instant::now();
        for _ in 0..PULLS {
            let d = q.pull(PullOptions::default()).await.unwrap().unwrap();
            q.ack(&d.receipt).await.unwrap();
        }
        let each = t.elapsed() / PULLS;
        println!(
            "| {backlog} | {:.0} | {:.2} |",
            (backlog + PULLS as usize) as f64 / pushed.as_secs_f64(),
            each.as_secs_f64() * 1e3
        );
    }
}
