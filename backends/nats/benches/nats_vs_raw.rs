//! dprim-nats against raw async-nats, in one run, on one server:
//! - KV put, get and CAS: sequential p50 latency and throughput with 64
//!   requests in flight (raw: the async-nats KV store on the same bucket);
//! - pub/sub: 1M x 128 B published by one client, received by one
//!   subscriber (messages received per second), both sides on the subject
//!   the backend maps the topic to;
//! - queue: push (64 in flight), then pull + ack by 64 workers (raw: a
//!   JetStream work-queue stream with a durable pull consumer, double ack).
//!
//! `scripts/nats.sh start && cargo bench -p dprim-nats --bench nats_vs_raw`
//! (DPRIM_BENCH_NATS=host:port picks another server; DPRIM_BENCH_OPS the
//! number of KV operations per measurement, DPRIM_BENCH_MESSAGES the pub/sub
//! message count, DPRIM_BENCH_QUEUE the queue message count;
//! DPRIM_BENCH_MIXED=1 also measures pub/sub with a dprim publisher and a
//! raw subscriber, and the reverse).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use async_nats::jetstream;
use bytes::Bytes;
use dprim::{Config, Key, KvExt, PullOptions, SubscriptionItem, Value};
use futures::StreamExt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const VALUE: [u8; 128] = [b'x'; 128];

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn sequential<F, Fut>(n: usize, mut f: F) -> Duration
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i).await;
        lat.push(t.elapsed());
    }
    lat.sort();
    lat[n / 2]
}

async fn concurrent<F, Fut>(n: usize, f: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (f, next) = (f.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                f(i).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn ratio_row(op: &str, raw: (Duration, f64), ours: (Duration, f64)) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "| {op} | {:.3} | {:.3} | {:.3}x | {:.0} | {:.0} | {:.3}x |",
        ms(raw.0),
        ms(ours.0),
        ms(ours.0) / ms(raw.0),
        raw.1,
        ours.1,
        ours.1 / raw.1
    );
}

/// Which client a side of the pub/sub measurement uses.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    Raw,
    Dprim,
}

/// A subscriber of either side, counting received messages (messages
/// reported in a dprim `Lagged` count as received).
enum Subscriber {
    Raw(async_nats::Subscriber),
    Dprim(dprim::Subscription),
}

impl Subscriber {
    /// Messages the next item stands for; `None` once nothing came for 2 s.
    async fn next(&mut self) -> Option<usize> {
        let wait = Duration::from_secs(2);
        match self {
            Subscriber::Raw(s) => match tokio::time::timeout(wait, s.next()).await {
                Ok(Some(_)) => Some(1),
                _ => None,
            },
            Subscriber::Dprim(s) => match tokio::time::timeout(wait, s.next()).await {
                Ok(Some(Ok(SubscriptionItem::Message(_)))) => Some(1),
                Ok(Some(Ok(SubscriptionItem::Lagged(n)))) => Some(n as usize),
                _ => None,
            },
        }
    }
}

/// A publisher of either side.
enum Publisher {
    Raw(async_nats::Client),
    Dprim(dprim::Backend),
}

/// Messages per second one subscriber receives from one publisher, on a
/// topic of its own for this round: the subscriber on the benchmark's own
/// client or backend, the publisher on a connection of its own. A raw side
/// uses the subject the backend maps the topic to.
async fn pubsub_rate(
    (client, backend): (&async_nats::Client, &dprim::Backend),
    config: &Config,
    addr: &str,
    (publisher, subscriber): (Side, Side),
    messages: usize,
    round: u32,
) -> f64 {
    let topic = Key::new(format!("bench/topic{round}")).unwrap();
    // The backend's subject for `bench/topic<round>` (`dprim.<namespace>.=t.`
    // and the key's segments as tokens).
    let subject = format!("dprim.bench-{}.=t.bench.topic{round}", std::process::id());
    let mut sub = match subscriber {
        Side::Raw => {
            let s = client.subscribe(subject.clone()).await.unwrap();
            client.flush().await.unwrap();
            Subscriber::Raw(s)
        }
        Side::Dprim => Subscriber::Dprim(backend.pubsub().subscribe(&topic).await.unwrap()),
    };
    // Connected before the clock starts, as the subscriber is.
    let publisher = match publisher {
        Side::Raw => Publisher::Raw(async_nats::connect(addr).await.unwrap()),
        Side::Dprim => Publisher::Dprim(dprim_nats::connect(&config.backend).await.unwrap()),
    };
    let t = Instant::now();
    let p = tokio::spawn(async move {
        match &publisher {
            Publisher::Raw(client) => {
                for _ in 0..messages {
                    client
                        .publish(subject.clone(), Bytes::from_static(&VALUE))
                        .await
                        .unwrap();
                }
                client.flush().await.unwrap();
            }
            Publisher::Dprim(backend) => {
                for _ in 0..messages {
                    backend
                        .pubsub()
                        .publish(&topic, Value::new(&VALUE[..]).unwrap())
                        .await
                        .unwrap();
                }
            }
        }
        // Kept connected (the task owns the publisher) until the
        // subscriber has counted and aborts it.
        std::future::pending::<()>().await;
    });
    let mut got = 0usize;
    while got < messages {
        match sub.next().await {
            Some(n) => got += n,
            None => break,
        }
    }
    let rate = got as f64 / t.elapsed().as_secs_f64();
    p.abort();
    rate
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let addr = std::env::var("DPRIM_BENCH_NATS").unwrap_or_else(|_| "127.0.0.1:4222".into());
    let ops = env("DPRIM_BENCH_OPS", 2000);
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"nats\"\nendpoints = [\"{addr}\"]\nnamespace = \"bench-{}\"\n",
        std::process::id()
    ))
    .unwrap();
    let backend = dprim_nats::connect(&config.backend).await.unwrap();
    let client = async_nats::connect(addr.as_str()).await.unwrap();
    let js = jetstream::new(client.clone());
    let store = js.get_key_value("dprim").await.unwrap();
    let raw_key = |i: usize| format!("rawbench{}.k{}", std::process::id(), i % 256);
    let key = |i: usize| Key::new(format!("b/k{}", i % 256)).unwrap();
    for i in 0..256 {
        store
            .put(raw_key(i), Bytes::from_static(&VALUE))
            .await
            .unwrap();
        backend
            .kv()
            .put(&key(i), Value::new(&VALUE[..]).unwrap())
            .await
            .unwrap();
    }

    println!(
        "| op | raw p50 ms | dprim p50 ms | ratio | raw ops/s (64) | dprim ops/s (64) | ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    for op in ["put", "get", "CAS"] {
        let mut best_raw = (Duration::MAX, 0f64);
        let mut best_ours = (Duration::MAX, 0f64);
        for _ in 0..3 {
            let s = store.clone();
            let raw_seq = sequential(ops, |i| {
                let s = s.clone();
                async move { raw_op(&s, op, &raw_key(i)).await }
            })
            .await;
            let s = store.clone();
            let raw_tp = concurrent(ops * 4, move |i| {
                let s = s.clone();
                async move { raw_op(&s, op, &raw_key(i)).await }
            })
            .await;
            let b = backend.clone();
            let ours_seq = sequential(ops, |i| {
                let b = b.clone();
                async move { dprim_op(&b, op, &key(i)).await }
            })
            .await;
            let b = backend.clone();
            let ours_tp = concurrent(ops * 4, move |i| {
                let b = b.clone();
                async move { dprim_op(&b, op, &key(i)).await }
            })
            .await;
            best_raw = (best_raw.0.min(raw_seq), best_raw.1.max(raw_tp));
            best_ours = (best_ours.0.min(ours_seq), best_ours.1.max(ours_tp));
        }
        ratio_row(op, best_raw, best_ours);
    }

    // Pub/sub: messages received per second by one subscriber. Best of
    // three rounds each, alternating, as for KV: on two shared cores one
    // round can stall on the scheduler. DPRIM_BENCH_MIXED=1 adds a dprim
    // publisher with a raw subscriber and the other way round, to tell
    // which side a difference comes from.
    let messages = env("DPRIM_BENCH_MESSAGES", 1_000_000);
    let mut pairs = vec![(Side::Raw, Side::Raw), (Side::Dprim, Side::Dprim)];
    if std::env::var_os("DPRIM_BENCH_MIXED").is_some() {
        pairs.push((Side::Dprim, Side::Raw));
        pairs.push((Side::Raw, Side::Dprim));
    }
    let mut best = vec![0f64; pairs.len()];
    let mut round = 0;
    for _ in 0..3 {
        for (i, pair) in pairs.iter().enumerate() {
            round += 1;
            best[i] = best[i].max(
                pubsub_rate((&client, &backend), &config, &addr, *pair, messages, round).await,
            );
        }
    }
    println!();
    println!("| pub/sub {messages} x 128 B | publisher | subscriber | msgs/s | ratio to raw |");
    println!("|---|---|---|---|---|");
    let name = |s: Side| if s == Side::Raw { "raw" } else { "dprim" };
    for (pair, rate) in pairs.iter().zip(&best) {
        println!(
            "| one subscriber | {} | {} | {rate:.0} | {:.3}x |",
            name(pair.0),
            name(pair.1),
            rate / best[0]
        );
    }

    // Queue: push N with 64 in flight, then 64 workers pull + ack.
    let n = env("DPRIM_BENCH_QUEUE", 5000);
    let raw_stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: format!("RAWBENCH{}", std::process::id()),
            subjects: vec![format!("rawbenchq{}", std::process::id())],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .unwrap();
    let raw_consumer: jetstream::consumer::PullConsumer = raw_stream
        .get_or_create_consumer(
            "bench",
            jetstream::consumer::pull::Config {
                durable_name: Some("bench".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let raw_subject = format!("rawbenchq{}", std::process::id());
    let js2 = js.clone();
    let raw_push = concurrent(n, move |_| {
        let (js, s) = (js2.clone(), raw_subject.clone());
        async move {
            js.publish(s, Bytes::from_static(&VALUE))
                .await
                .unwrap()
                .await
                .unwrap();
        }
    })
    .await;
    let c = raw_consumer.clone();
    let raw_drain = concurrent(n, move |_| {
        let c = c.clone();
        async move {
            loop {
                let mut batch = c.fetch().max_messages(1).messages().await.unwrap();
                if let Some(Ok(m)) = batch.next().await {
                    m.double_ack().await.unwrap();
                    return;
                }
            }
        }
    })
    .await;
    let q = backend
        .queues()
        .open(&Key::new("bench/q").unwrap(), None)
        .await
        .unwrap();
    let q2 = q.clone();
    let ours_push = concurrent(n, move |_| {
        let q = q2.clone();
        async move {
            q.push(Value::new(&VALUE[..]).unwrap()).await.unwrap();
        }
    })
    .await;
    let q2 = q.clone();
    let ours_drain = concurrent(n, move |_| {
        let q = q2.clone();
        async move {
            loop {
                if let Some(d) = q.pull(PullOptions::default()).await.unwrap() {
                    q.ack(&d.receipt).await.unwrap();
                    return;
                }
            }
        }
    })
    .await;
    let both = |push: f64, drain: f64| n as f64 / (n as f64 / push + n as f64 / drain);
    println!();
    println!("| queue {n} x 128 B | raw msgs/s | dprim msgs/s | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| push (64 in flight) | {raw_push:.0} | {ours_push:.0} | {:.3}x |",
        ours_push / raw_push
    );
    println!(
        "| pull + ack (64 workers) | {raw_drain:.0} | {ours_drain:.0} | {:.3}x |",
        ours_drain / raw_drain
    );
    println!(
        "| push + pull + ack | {:.0} | {:.0} | {:.3}x |",
        both(raw_push, raw_drain),
        both(ours_push, ours_drain),
        both(ours_push, ours_drain) / both(raw_push, raw_drain)
    );
    let _ = js
        .delete_stream(format!("RAWBENCH{}", std::process::id()))
        .await;
}

async fn raw_op(s: &jetstream::kv::Store, op: &str, k: &str) {
    match op {
        "put" => {
            s.put(k, Bytes::from_static(&VALUE)).await.unwrap();
        }
        "get" => {
            s.get(k).await.unwrap();
        }
        _ => loop {
            let e = s.entry(k).await.unwrap().unwrap();
            if s.update(k, Bytes::from_static(&VALUE), e.revision)
                .await
                .is_ok()
            {
                return;
            }
        },
    }
}

async fn dprim_op(b: &dprim::Backend, op: &str, k: &Key) {
    let v = || Value::new(&VALUE[..]).unwrap();
    match op {
        "put" => {
            b.kv().put(k, v()).await.unwrap();
        }
        "get" => {
            b.kv().get(k).await.unwrap();
        }
        _ => loop {
            let e = b.kv().get(k).await.unwrap().unwrap();
            if b.kv().put_if_version(k, v(), e.version).await.is_ok() {
                return;
            }
        },
    }
}
