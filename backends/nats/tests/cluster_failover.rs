//! A 3-node JetStream cluster (scripts/nats.sh start-cluster: 3 replicas,
//! `sync_interval: always`): the queue stream's leader is killed with
//! SIGKILL and restarted while a producer and two consumers run through
//! dprim's Queue. Every acknowledged push must be delivered and acked;
//! duplicates (at-least-once) are counted and reported. Then the KV
//! bucket's stream leader is killed and restarted while three clients race
//! creates, conditional writes and deletes (and reads) on two keys: their
//! writes must be linearizable (reads are left out of the check: this
//! backend does not declare linearizable reads).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::{Config, PullOptions, Value};
use dprim_conformance::linearizability::{race, registers};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const PUSHES: u32 = 1500;

/// The server name leading `stream`, from any live member's monitoring port.
fn stream_leader(stream: &str) -> Option<String> {
    for port in [18222, 28222, 38222] {
        let out = std::process::Command::new("curl")
            .args(["-fsS", &format!("http://127.0.0.1:{port}/jsz?streams=true")])
            .output()
            .ok()?;
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            continue;
        };
        for account in json["account_details"].as_array().into_iter().flatten() {
            for s in account["stream_detail"].as_array().into_iter().flatten() {
                if s["name"] == stream {
                    if let Some(l) = s["cluster"]["leader"].as_str() {
                        return Some(l.to_string());
                    }
                }
            }
        }
    }
    None
}

/// Runs `f` until it succeeds, for at most 30 s while it fails with a
/// temporary error: a cluster just started answers health checks before it
/// has elected its JetStream meta leader and its streams' leaders.
async fn ready<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = dprim::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f().await {
            Ok(t) => return t,
            Err(e) if e.is_temporary() && Instant::now() < deadline => {
                println!("{what}: cluster not ready yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_and_kv_survive_stream_leader_kills() {
    let servers = support::Servers::new("failover", 14222);
    servers.script(&["start-cluster"]);
    let config = Config::from_toml(
        "[backend]\nkind = \"nats\"\nendpoints = [\"127.0.0.1:14222\", \"127.0.0.1:24222\", \"127.0.0.1:34222\"]\nnamespace = \"failover\"\nrequest_timeout = \"2s\"\n",
    )
    .unwrap();
    let producer = ready("connect", || dprim_nats::connect(&config.backend)).await;
    let options = dprim::QueueOptions {
        max_attempts: 1000,
        dead_letter: None,
    };
    let name = dprim::Key::new("jobs").unwrap();
    let q = ready("open the queue", || {
        producer.queues().open(&name, Some(options.clone()))
    })
    .await;

    let acked_pushes: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let delivered: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let producing_done = Arc::new(AtomicBool::new(false));
    let push_errors = Arc::new(Mutex::new(0u32));

    let mut consumers = Vec::new();
    for c in 0..2 {
        let backend = ready("connect", || dprim_nats::connect(&config.backend)).await;
        let q = ready("open the queue", || backend.queues().open(&name, None)).await;
        let (acked_pushes, delivered, done) = (
            acked_pushes.clone(),
            delivered.clone(),
            producing_done.clone(),
        );
        consumers.push(tokio::spawn(async move {
            let _keep = backend;
            let deadline = Instant::now() + Duration::from_secs(150);
            let mut failures = 0u32;
            loop {
                let finished = done.load(Ordering::SeqCst) && {
                    let pushed = acked_pushes.lock().unwrap().clone();
                    let got = delivered.lock().unwrap();
                    pushed.iter().all(|i| got.contains_key(i))
                };
                if finished || Instant::now() > deadline {
                    return failures;
                }
                let pull = q
                    .pull(PullOptions {
                        visibility_timeout: Duration::from_secs(10),
                        wait: Duration::from_millis(500),
                        session: None,
                    })
                    .await;
                let d = match pull {
                    Ok(Some(d)) => d,
                    Ok(None) => continue,
                    Err(e) => {
                        failures += 1;
                        eprintln!("consumer {c}: pull failed: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let i: u32 = d.payload.as_str().unwrap().parse().unwrap();
                // Ack until the server confirms (or the receipt went stale:
                // then the message comes back and is processed again).
                loop {
                    match q.ack(&d.receipt).await {
                        Ok(()) => {
                            *delivered.lock().unwrap().entry(i).or_insert(0) += 1;
                            break;
                        }
                        Err(e) if e.kind() == dprim::ErrorKind::Conflict => break,
                        Err(e) => {
                            failures += 1;
                            eprintln!("consumer {c}: ack of {i} failed: {e}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
        }));
    }

    let mut killed = None;
    for i in 0..PUSHES {
        if i == PUSHES / 3 {
            let leader = stream_leader("DPRIM_QUEUES").expect("find the queue stream's leader");
            println!("killing the queue stream leader {leader} with SIGKILL after {i} pushes");
            servers.kill9(&leader);
            killed = Some(leader);
        }
        if i == PUSHES / 3 + 200 {
            let member = killed.clone().unwrap();
            servers.script(&["restart-member", &member]);
            println!("restarted {member} after {i} pushes");
        }
        loop {
            match q
                .push(Value::new(i.to_string().into_bytes()).unwrap())
                .await
            {
                Ok(_) => {
                    acked_pushes.lock().unwrap().insert(i);
                    break;
                }
                Err(e) => {
                    *push_errors.lock().unwrap() += 1;
                    assert!(e.is_temporary(), "push {i} failed for good: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    producing_done.store(true, Ordering::SeqCst);
    let mut consumer_failures = 0;
    for c in consumers {
        consumer_failures += c.await.unwrap();
    }
    let pushed = acked_pushes.lock().unwrap().clone();
    let got = delivered.lock().unwrap().clone();
    let lost: Vec<u32> = pushed
        .iter()
        .copied()
        .filter(|i| !got.contains_key(i))
        .collect();
    let duplicates: u32 = got.values().map(|n| n - 1).sum();
    println!(
        "acknowledged pushes: {}, delivered and acked: {}, lost: {}, duplicate deliveries: {duplicates}, push retries: {}, consumer retries: {consumer_failures}",
        pushed.len(),
        got.len(),
        lost.len(),
        push_errors.lock().unwrap()
    );
    assert!(
        lost.is_empty(),
        "acknowledged pushes never delivered: {lost:?}"
    );

    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(ready("connect", || dprim_nats::connect(&config.backend)).await);
    }
    let racers = tokio::spawn(race(
        clients,
        registers(),
        600,
        Duration::from_millis(10),
        false,
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = stream_leader("KV_dprim").expect("find the KV stream's leader");
    println!("killing the KV stream leader {leader} with SIGKILL");
    servers.kill9(&leader);
    tokio::time::sleep(Duration::from_secs(2)).await;
    servers.script(&["restart-member", &leader]);
    let history = racers.await.unwrap().unwrap();
    let checked = history
        .check(false)
        .unwrap_or_else(|e| panic!("the racing clients' history: {e}"));
    println!("racing clients: {checked:?}");
    assert_eq!(checked.keys, 2, "{checked:?}");
}
