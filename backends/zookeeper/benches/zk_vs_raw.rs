//! dprim-zookeeper against the raw zookeeper-client, in one run, on one
//! server: create, get and CAS, sequential p50 latency and throughput with
//! 64 requests in flight, printed as dprim/raw ratios.
//!
//! `scripts/zookeeper.sh start && cargo bench -p dprim-zookeeper --bench zk_vs_raw`
//! (DPRIM_BENCH_ZK=host:port picks another server; DPRIM_BENCH_OPS the
//! number of operations per measurement).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use dprim::{Backend, Config, Key, KvExt, Value};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zookeeper_client::{Acls, Client, CreateMode};

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Create,
    Get,
    Cas,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Get => "get",
            Op::Cas => "CAS",
        }
    }
}

const VALUE: [u8; 128] = [b'x'; 128];
static ROUND: AtomicUsize = AtomicUsize::new(0);

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

/// CAS targets: 64 keys, so the 64 tasks never contend on one key.
fn slot(i: usize) -> usize {
    i % 64
}

async fn raw_op(c: Client, op: Op, round: usize, i: usize) {
    let options = CreateMode::Persistent.with_acls(Acls::anyone_all());
    match op {
        Op::Create => drop(
            c.create(
                &format!("/bench-raw-{}/r{round}-{i}", std::process::id()),
                &VALUE,
                &options,
            )
            .await
            .unwrap(),
        ),
        Op::Get => drop(
            c.get_data(&format!("/bench-raw-{}/k{}", std::process::id(), slot(i)))
                .await
                .unwrap(),
        ),
        // Two in-flight operations may pick the same key: a lost race reads again.
        Op::Cas => loop {
            let path = format!("/bench-raw-{}/k{}", std::process::id(), slot(i));
            let (_, stat) = c.get_data(&path).await.unwrap();
            match c.set_data(&path, &VALUE, Some(stat.version)).await {
                Ok(_) => break,
                Err(zookeeper_client::Error::BadVersion) => continue,
                Err(e) => panic!("{e}"),
            }
        },
    }
}

async fn dprim_op(b: Backend, op: Op, round: usize, i: usize) {
    let value = Value::new(VALUE.to_vec()).unwrap();
    match op {
        Op::Create => drop(
            b.kv()
                .create(&Key::new(format!("r{round}-{i}")).unwrap(), value)
                .await
                .unwrap(),
        ),
        Op::Get => drop(
            b.kv()
                .get(&Key::new(format!("k{}", slot(i))).unwrap())
                .await
                .unwrap(),
        ),
        Op::Cas => loop {
            let key = Key::new(format!("k{}", slot(i))).unwrap();
            let v = b.kv().get(&key).await.unwrap().unwrap().version;
            match b.kv().put_if_version(&key, value.clone(), v).await {
                Ok(_) => break,
                Err(e) if e.kind() == dprim::ErrorKind::Conflict => continue,
                Err(e) => panic!("{e}"),
            }
        },
    }
}

async fn measure_raw(c: &Client, op: Op, n: usize, seq: bool) -> f64 {
    let round = ROUND.fetch_add(1, Ordering::Relaxed);
    if seq {
        let p50 = sequential(n, |i| raw_op(c.clone(), op, round, i)).await;
        p50.as_secs_f64() * 1e3
    } else {
        let c = c.clone();
        concurrent(n, move |i| raw_op(c.clone(), op, round, i)).await
    }
}

async fn measure_dprim(b: &Backend, op: Op, n: usize, seq: bool) -> f64 {
    let round = ROUND.fetch_add(1, Ordering::Relaxed);
    if seq {
        let p50 = sequential(n, |i| dprim_op(b.clone(), op, round, i)).await;
        p50.as_secs_f64() * 1e3
    } else {
        let b = b.clone();
        concurrent(n, move |i| dprim_op(b.clone(), op, round, i)).await
    }
}

#[tokio::main]
async fn main() {
    let endpoint = std::env::var("DPRIM_BENCH_ZK").unwrap_or_else(|_| "127.0.0.1:2181".into());
    let n: usize = std::env::var("DPRIM_BENCH_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let raw = Client::connect(&endpoint)
        .await
        .expect("connect raw client; start ZooKeeper with scripts/zookeeper.sh start");
    let ns = format!("bench-dprim-{}", std::process::id());
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"zookeeper\"\nendpoints = [\"{endpoint}\"]\nnamespace = \"{ns}\"\n"
    ))
    .unwrap();
    let backend = dprim_zookeeper::connect(&config.backend).await.unwrap();
    let options = CreateMode::Persistent.with_acls(Acls::anyone_all());
    let _ = raw
        .create(&format!("/bench-raw-{}", std::process::id()), &[], &options)
        .await;
    for i in 0..64 {
        let path = format!("/bench-raw-{}/k{i}", std::process::id());
        if raw.create(&path, &VALUE, &options).await.is_err() {
            raw.set_data(&path, &VALUE, None).await.unwrap();
        }
        backend
            .kv()
            .put(
                &Key::new(format!("k{i}")).unwrap(),
                Value::new(VALUE.to_vec()).unwrap(),
            )
            .await
            .unwrap();
    }
    println!("zookeeper at {endpoint}, {n} ops per measurement, 128-byte values; raw and dprim alternate, best of 3");
    println!(
        "{:<6} {:>14} {:>14} {:>7}   {:>16} {:>16} {:>7}",
        "op", "raw p50 ms", "dprim p50 ms", "ratio", "raw ops/s (64)", "dprim ops/s (64)", "ratio"
    );
    for op in [Op::Create, Op::Get, Op::Cas] {
        let (mut rp, mut dp, mut rt, mut dt) = (f64::MAX, f64::MAX, 0f64, 0f64);
        for _ in 0..3 {
            rp = rp.min(measure_raw(&raw, op, n, true).await);
            dp = dp.min(measure_dprim(&backend, op, n, true).await);
            rt = rt.max(measure_raw(&raw, op, n * 4, false).await);
            dt = dt.max(measure_dprim(&backend, op, n * 4, false).await);
        }
        println!(
            "{:<6} {:>14.3} {:>14.3} {:>6.3}x   {:>16.0} {:>16.0} {:>6.3}x",
            op.name(),
            rp,
            dp,
            dp / rp,
            rt,
            dt,
            dt / rt
        );
    }
}
