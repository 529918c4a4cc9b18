//! What a queue's backlog costs each pull: push a backlog of 1 KiB
//! messages (64 pushes in flight), then time pull + ack one at a time and
//! `depth` as often, for a small and a large backlog, on the backend
//! DPRIM_BENCH_CONFIG names (default: the embedded in-memory backend). A
//! pull should cost the same whatever waits behind the message it takes.
//!
//! `cargo bench -p dprim-runtime --bench queue_backlog` (DPRIM_BENCH_BACKLOG
//! sets the large backlog, default 10000).
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
    let large: usize = std::env::var("DPRIM_BENCH_BACKLOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let mut config = match std::env::var("DPRIM_BENCH_CONFIG") {
        Ok(path) => Config::from_file(std::path::Path::new(&path)).unwrap(),
        Err(_) => Config::memory(),
    };
    config.backend = config
        .backend
        .with_namespace(format!("bench-backlog-{}", std::process::id()));
    let backend = dprim_runtime::open_config(&config)
        .await
        .expect("open the backend; start its server with scripts/<kind>.sh start");
    println!("| backlog | push msgs/s (64 in flight) | pull + ack, mean ms | depth, mean ms |");
    println!("|---|---|---|---|");
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
        let t = Instant::now();
        for _ in 0..PULLS {
            q.depth().await.unwrap();
        }
        let depth = t.elapsed() / PULLS;
        println!(
            "| {backlog} | {:.0} | {:.3} | {:.3} |",
            (backlog + PULLS as usize) as f64 / pushed.as_secs_f64(),
            each.as_secs_f64() * 1e3,
            depth.as_secs_f64() * 1e3
        );
    }
}
