//! A listing is complete or an error, never silently short: while the
//! server stalls (SIGSTOP for 400 ms, again and again), every listing of a
//! directory of 500 keys returns all 500. A scan once gave up after 300 ms
//! without a message and returned what it had, which a lock or an election
//! reads as "not in line" (`SessionLost`) and a reaper as "gone". And while
//! sessions come and go (their keys removed as they close), listings keep
//! answering, whole.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::{Config, Depth, Key, KvExt, Value};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEYS: usize = 500;

fn signal(pid: i32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_are_whole_while_the_server_stalls() {
    let servers = support::Servers::new("slow-lists", 4317);
    servers.script(&["start"]);
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"nats\"\nendpoints = [\"127.0.0.1:{}\"]\nnamespace = \"slow\"\n",
        servers.port
    ))
    .unwrap();
    let b = dprim_nats::connect(&config.backend).await.unwrap();
    let dir = Key::new("d").unwrap();
    let puts: Vec<_> = (0..KEYS)
        .map(|i| {
            let (b, k) = (b.clone(), dir.join(format!("k{i}")).unwrap());
            tokio::spawn(async move { b.kv().put(&k, Value::empty()).await.unwrap() })
        })
        .collect();
    for p in puts {
        p.await.unwrap();
    }

    let pid = servers.pid("s1");
    let done = Arc::new(AtomicBool::new(false));
    let staller = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut stalls = 0;
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(300));
                signal(pid, "-STOP");
                std::thread::sleep(Duration::from_millis(400));
                signal(pid, "-CONT");
                stalls += 1;
            }
            stalls
        })
    };
    let started = Instant::now();
    let mut lists = 0;
    let mut short = Vec::new();
    while started.elapsed() < Duration::from_secs(8) {
        let listing = b.kv().list(&dir, Depth::Children).await;
        lists += 1;
        match listing {
            Ok(l) if l.entries.len() == KEYS => {}
            Ok(l) => short.push(l.entries.len()),
            // A stall may outlast a request: an error is honest.
            Err(e) => println!("list {lists}: {e}"),
        }
    }
    done.store(true, Ordering::SeqCst);
    let stalls = staller.join().unwrap();
    signal(pid, "-CONT");
    println!("{lists} listings over {stalls} stalls");
    assert!(stalls >= 5, "the server was stalled only {stalls} times");
    assert!(
        short.is_empty(),
        "{} of {lists} listings came back short, with {short:?} of {KEYS} keys",
        short.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_are_whole_while_sessions_come_and_go() {
    let servers = support::Servers::new("churn-lists", 4318);
    servers.script(&["start"]);
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"nats\"\nendpoints = [\"127.0.0.1:{}\"]\nnamespace = \"churn\"\n",
        servers.port
    ))
    .unwrap();
    let b = dprim_nats::connect(&config.backend).await.unwrap();
    let dir = Key::new("st").unwrap();
    const STABLE: usize = 100;
    for i in 0..STABLE {
        b.kv()
            .put(&dir.join(format!("k{i:03}")).unwrap(), Value::empty())
            .await
            .unwrap();
    }
    let done = Arc::new(AtomicBool::new(false));
    let churners: Vec<_> = (0..4)
        .map(|w| {
            let (b, dir, done) = (b.clone(), dir.clone(), done.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !done.load(Ordering::SeqCst) {
                    let s = b.sessions().open(Duration::from_secs(5)).await.unwrap();
                    for j in 0..5 {
                        let k = dir.join(format!("e{w}-{n}-{j}")).unwrap();
                        b.kv().put_ephemeral(&k, Value::empty(), &s).await.unwrap();
                    }
                    s.close().await.unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let started = Instant::now();
    let mut lists = 0;
    while started.elapsed() < Duration::from_secs(8) {
        let t = Instant::now();
        let listing = b
            .kv()
            .list(&dir, Depth::Children)
            .await
            .unwrap_or_else(|e| panic!("list {lists} failed after {:?}: {e}", t.elapsed()));
        let stable = listing
            .entries
            .iter()
            .filter(|e| e.key.as_str().starts_with("st/k"))
            .count();
        assert_eq!(stable, STABLE, "listing {lists} lacks stable keys");
        lists += 1;
    }
    done.store(true, Ordering::SeqCst);
    let mut sessions = 0;
    for c in churners {
        sessions += c.await.unwrap();
    }
    println!("{lists} listings while {sessions} sessions came and went");
    assert!(sessions >= 20, "only {sessions} sessions");
}
