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
/// Throughput rounds per side.
const PAIRS: usize = 5;

/// Sequential latency of raw and dprim, one operation of each in turn
/// (which goes first alternates), so both see the same server and machine
/// load at the same moments: the p50 of each side.
async fn interleaved_p50<R, RF, D, DF>(n: usize, mut raw: R, mut dprim: D) -> (Duration, Duration)
where
    R: FnMut(usize) -> RF,
    RF: Future<Output = ()>,
    D: FnMut(usize) -> DF,
    DF: Future<Output = ()>,
{
    let (mut r, mut d) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        if i % 2 == 0 {
            let t = Instant::now();
            raw(i).await;
            r.push(t.elapsed());
            let t = Instant::now();
            dprim(i).await;
            d.push(t.elapsed());
        } else {
            let t = Instant::now();
            dprim(i).await;
            d.push(t.elapsed());
            let t = Instant::now();
            raw(i).await;
            r.push(t.elapsed());
        }
    }
    r.sort();
    d.sort();
    (r[n / 2], d[n / 2])
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

async fn measure_raw(c: &Client, op: Op, n: usize) -> f64 {
    let round = ROUND.fetch_add(1, Ordering::Relaxed);
    let c = c.clone();
    concurrent(n, move |i| raw_op(c.clone(), op, round, i)).await
}

async fn measure_dprim(b: &Backend, op: Op, n: usize) -> f64 {
    let round = ROUND.fetch_add(1, Ordering::Relaxed);
    let b = b.clone();
    concurrent(n, move |i| dprim_op(b.clone(), op, round, i)).await
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
    println!(
        "zookeeper at {endpoint}, 128-byte values; p50 over {n} sequential ops per side, raw and dprim in turn; \
         throughput over {} ops with 64 in flight, {PAIRS} pairs of rounds, medians and the median pair's ratio (range)",
        n * 4
    );
    println!(
        "{:<6} {:>14} {:>14} {:>7}   {:>16} {:>16} {:>7}",
        "op", "raw p50 ms", "dprim p50 ms", "ratio", "raw ops/s (64)", "dprim ops/s (64)", "ratio"
    );
    for op in [Op::Create, Op::Get, Op::Cas] {
        let round = ROUND.fetch_add(1, Ordering::Relaxed);
        let (rp, dp) = interleaved_p50(
            n,
            |i| raw_op(raw.clone(), op, round, i),
            |i| dprim_op(backend.clone(), op, round, i),
        )
        .await;
        let (rp, dp) = (rp.as_secs_f64() * 1e3, dp.as_secs_f64() * 1e3);
        // Throughput rounds in pairs, the side that goes first alternating;
        // each pair's ratio compares the two sides under the same load.
        let (mut rts, mut dts, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for pair in 0..PAIRS {
            let (rt, dt) = if pair % 2 == 0 {
                let rt = measure_raw(&raw, op, n * 4).await;
                (rt, measure_dprim(&backend, op, n * 4).await)
            } else {
                let dt = measure_dprim(&backend, op, n * 4).await;
                (measure_raw(&raw, op, n * 4).await, dt)
            };
            rts.push(rt);
            dts.push(dt);
            ratios.push(dt / rt);
        }
        let (lo, hi) = ratios
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        println!(
            "{:<6} {:>14.3} {:>14.3} {:>6.3}x   {:>16.0} {:>16.0} {:>6.3}x  ({lo:.3}-{hi:.3})",
            op.name(),
            rp,
            dp,
            dp / rp,
            median(rts),
            median(dts),
            median(ratios),
        );
    }
}
