//! dprim-etcd against the raw etcd-client, in one run, on one server:
//! put, get and CAS, sequential p50 latency and throughput with 64 requests
//! in flight, printed as dprim/raw ratios.
//!
//! `scripts/etcd.sh start && cargo bench -p dprim-etcd --bench etcd_vs_raw`
//! (DPRIM_BENCH_ETCD=host:port picks another server; DPRIM_BENCH_OPS the
//! number of operations per measurement).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use dprim::{Backend, Config, Key, KvExt, Value};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Put,
    Get,
    Cas,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::Cas => "CAS",
        }
    }
}

const VALUE: [u8; 128] = [b'x'; 128];

/// Runs `n` operations one after another; returns the median latency.
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

/// Runs `n` operations with 64 in flight; returns operations per second.
async fn concurrent<F, Fut>(n: usize, f: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (f, next) = (f.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

fn raw_key(ns: &str, i: usize) -> Vec<u8> {
    format!("{ns}/k{}", i % 256).into_bytes()
}

async fn raw_cas(c: &mut etcd_client::Client, key: Vec<u8>) {
    let rev = c.get(key.clone(), None).await.unwrap().kvs()[0].mod_revision();
    let txn = Txn::new()
        .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
        .and_then([TxnOp::put(key, VALUE.to_vec(), None)]);
    c.txn(txn).await.unwrap();
}

async fn dprim_cas(b: &Backend, key: &Key) {
    let v = b.kv().get(key).await.unwrap().unwrap().version;
    b.kv()
        .put_if_version(key, Value::new(VALUE.to_vec()).unwrap(), v)
        .await
        .unwrap();
}

fn dkey(i: usize) -> Key {
    Key::new(format!("k{}", i % 256)).unwrap()
}

async fn measure_raw(client: &etcd_client::Client, op: Op, n: usize, seq: bool) -> f64 {
    let ns = "bench-raw";
    let c = client.clone();
    if seq {
        let mut c = c;
        let p50 = sequential(n, |i| {
            let mut c = c.clone();
            async move {
                match op {
                    Op::Put => drop(c.put(raw_key(ns, i), VALUE.to_vec(), None).await.unwrap()),
                    Op::Get => drop(c.get(raw_key(ns, i), None).await.unwrap()),
                    Op::Cas => raw_cas(&mut c, raw_key(ns, i)).await,
                }
            }
        })
        .await;
        let _ = &mut c;
        p50.as_secs_f64() * 1e3
    } else {
        concurrent(n, move |i| {
            let mut c = c.clone();
            async move {
                match op {
                    Op::Put => drop(c.put(raw_key(ns, i), VALUE.to_vec(), None).await.unwrap()),
                    Op::Get => drop(c.get(raw_key(ns, i), None).await.unwrap()),
                    // Keys are per task, so CAS never conflicts.
                    Op::Cas => raw_cas(&mut c, raw_key(ns, i)).await,
                }
            }
        })
        .await
    }
}

async fn measure_dprim(b: &Backend, op: Op, n: usize, seq: bool) -> f64 {
    if seq {
        let p50 = sequential(n, |i| {
            let b = b.clone();
            async move {
                match op {
                    Op::Put => drop(
                        b.kv()
                            .put(&dkey(i), Value::new(VALUE.to_vec()).unwrap())
                            .await
                            .unwrap(),
                    ),
                    Op::Get => drop(b.kv().get(&dkey(i)).await.unwrap()),
                    Op::Cas => dprim_cas(&b, &dkey(i)).await,
                }
            }
        })
        .await;
        p50.as_secs_f64() * 1e3
    } else {
        let b = b.clone();
        concurrent(n, move |i| {
            let b = b.clone();
            async move {
                match op {
                    Op::Put => drop(
                        b.kv()
                            .put(&dkey(i), Value::new(VALUE.to_vec()).unwrap())
                            .await
                            .unwrap(),
                    ),
                    Op::Get => drop(b.kv().get(&dkey(i)).await.unwrap()),
                    Op::Cas => dprim_cas(&b, &dkey(i)).await,
                }
            }
        })
        .await
    }
}

#[tokio::main]
async fn main() {
    let endpoint = std::env::var("DPRIM_BENCH_ETCD").unwrap_or_else(|_| "127.0.0.1:2379".into());
    let n: usize = std::env::var("DPRIM_BENCH_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let raw = etcd_client::Client::connect([endpoint.as_str()], None)
        .await
        .expect("connect raw client; start etcd with scripts/etcd.sh start");
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"etcd\"\nendpoints = [\"{endpoint}\"]\nnamespace = \"bench-dprim\"\n"
    ))
    .unwrap();
    let backend = dprim_etcd::connect(&config.backend).await.unwrap();
    // Seed the keys CAS and get read.
    for i in 0..256 {
        let mut c = raw.clone();
        c.put(raw_key("bench-raw", i), VALUE.to_vec(), None)
            .await
            .unwrap();
        backend
            .kv()
            .put(&dkey(i), Value::new(VALUE.to_vec()).unwrap())
            .await
            .unwrap();
    }
    println!("etcd at {endpoint}, {n} ops per measurement, 128-byte values; raw and dprim alternate, best of 3");
    println!(
        "{:<5} {:>14} {:>14} {:>7}   {:>16} {:>16} {:>7}",
        "op", "raw p50 ms", "dprim p50 ms", "ratio", "raw ops/s (64)", "dprim ops/s (64)", "ratio"
    );
    for op in [Op::Put, Op::Get, Op::Cas] {
        // Alternate raw and dprim so drift in the server hits both alike;
        // keep the best of three rounds of each.
        let (mut rp, mut dp, mut rt, mut dt) = (f64::MAX, f64::MAX, 0f64, 0f64);
        for _ in 0..3 {
            rp = rp.min(measure_raw(&raw, op, n, true).await);
            dp = dp.min(measure_dprim(&backend, op, n, true).await);
            rt = rt.max(measure_raw(&raw, op, n * 4, false).await);
            dt = dt.max(measure_dprim(&backend, op, n * 4, false).await);
        }
        println!(
            "{:<5} {:>14.3} {:>14.3} {:>6.3}x   {:>16.0} {:>16.0} {:>6.3}x",
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
