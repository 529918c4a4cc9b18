//! Task launch latency and rate: launch -> RUNNING for a no-op task
//! (p50/p99), and launches per second, with 100 agents, a supervisor and the
//! tasks client in this process, on the backend DPRIM_BENCH_CONFIG names
//! (default: the embedded in-memory backend).
//!
//! `cargo bench -p dprim-runtime --bench task_launch`
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use dprim::tasks::{Resources, TaskSpec, TaskState};
use dprim::{Config, TaskId, Tasks};
use dprim_runtime::tasks::agent::{Agent, AgentConfig};
use dprim_runtime::tasks::client::TasksClient;
use dprim_runtime::tasks::placement::FirstFit;
use dprim_runtime::tasks::supervisor::{Supervisor, SupervisorConfig};
use futures::StreamExt;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const AGENTS: usize = 100;
/// Concurrent callers launching the batch.
const LAUNCHERS: usize = 64;

/// How long the benchmark waits for any status update before it gives up.
const STALL: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() {
    // RUST_LOG=warn shows what the agents and the supervisor complain about.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let config = match std::env::var("DPRIM_BENCH_CONFIG") {
        Ok(path) => Config::from_file(std::path::Path::new(&path)).unwrap(),
        Err(_) => Config::memory(),
    };
    // DPRIM_BENCH_NAMESPACE and DPRIM_BENCH_SUPERVISOR=external let a
    // supervisor run as its own process (`dprim supervisor` on the same
    // namespace), so its CPU time can be told apart from the agents'.
    let external_supervisor =
        std::env::var("DPRIM_BENCH_SUPERVISOR").is_ok_and(|v| v == "external");
    let config = {
        let ns = std::env::var("DPRIM_BENCH_NAMESPACE")
            .unwrap_or_else(|_| format!("bench-tasks-{}", std::process::id()));
        let mut c = config;
        c.backend = c.backend.with_namespace(ns);
        c
    };
    let sequential: usize = std::env::var("DPRIM_BENCH_LAUNCHES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let backend = dprim_runtime::open_config(&config).await.unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let work = std::env::temp_dir().join(format!("dprim-bench-tasks-{}", std::process::id()));
    let ttl = Duration::from_secs(5);
    let sup = Supervisor::new(
        backend.clone(),
        SupervisorConfig {
            name: "bench".into(),
            session_ttl: ttl,
            gone_timeout: Duration::from_secs(30),
            interval: Duration::from_millis(100),
            placer: Arc::new(FirstFit),
            task_retention: dprim_runtime::tasks::supervisor::DEFAULT_TASK_RETENTION,
        },
    );
    let mut handles = Vec::new();
    if !external_supervisor {
        handles.push(tokio::spawn(sup.run(stopped(stop_rx.clone()))));
    }
    for i in 0..AGENTS {
        let agent = Agent::new(
            backend.clone(),
            AgentConfig {
                id: format!("agent-{i:03}"),
                resources: Resources {
                    cpus: 8.0,
                    mem_bytes: 1 << 34,
                    disk_bytes: 1 << 34,
                    ports: vec![],
                },
                attributes: Default::default(),
                work_dir: work.join(format!("agent-{i:03}")),
                session_ttl: ttl,
                interval: Duration::from_secs(1),
                sandbox_retention: dprim_runtime::tasks::agent::DEFAULT_SANDBOX_RETENTION,
            },
        );
        handles.push(tokio::spawn(agent.run(stopped(stop_rx.clone()))));
    }
    let client = TasksClient::new(backend.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Launch -> RUNNING seen through the status watch, one task at a time.
    let mut updates = client.watch().await.unwrap();
    let noop = TaskSpec {
        command: "true".into(),
        resources: Resources {
            cpus: 0.01,
            ..Resources::default()
        },
        ..TaskSpec::default()
    };
    let mut latencies = Vec::new();
    for _ in 0..sequential {
        let t = Instant::now();
        let id = client.launch(noop.clone()).await.unwrap();
        let mut pending = HashSet::from([id]);
        wait_until_ran(&client, &mut updates, &mut pending).await;
        latencies.push(t.elapsed());
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];

    // Rate: launch a batch from LAUNCHERS concurrent callers and wait until
    // every task ran (the watch buffers the updates meanwhile, or, if it
    // falls too far behind, says Resync).
    let batch = std::env::var("DPRIM_BENCH_BATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(sequential * 5);
    let t = Instant::now();
    let launched: Vec<TaskId> = futures::stream::iter(0..batch)
        .map(|_| {
            let client = client.clone();
            let noop = noop.clone();
            async move { client.launch(noop).await.unwrap() }
        })
        .buffer_unordered(LAUNCHERS)
        .collect()
        .await;
    let mut pending: HashSet<TaskId> = launched.into_iter().collect();
    wait_until_ran(&client, &mut updates, &mut pending).await;
    let rate = batch as f64 / t.elapsed().as_secs_f64();
    println!(
        "backend {}, {AGENTS} agents, no-op task: launch -> RUNNING p50 {:.1} ms, p99 {:.1} ms over {sequential} launches; {rate:.0} launches/s over a batch of {batch} from {LAUNCHERS} callers",
        backend.kind(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
    );
    stop_tx.send(true).unwrap();
    for h in handles {
        let _ = h.await;
    }
    let _ = std::fs::remove_dir_all(work);
}

fn ran(state: TaskState) -> bool {
    matches!(state, TaskState::Running | TaskState::Finished)
}

/// Follows the status watch until every task in `pending` ran. A watch
/// that had to resync (it fell behind what the backend keeps) is opened
/// again and what it may have missed is asked task by task, as an app
/// would reconcile.
async fn wait_until_ran(
    client: &TasksClient,
    updates: &mut futures::stream::BoxStream<'static, dprim::Result<dprim::tasks::TaskStatus>>,
    pending: &mut HashSet<TaskId>,
) {
    while !pending.is_empty() {
        // A task that never runs would otherwise hang the benchmark.
        let next = match tokio::time::timeout(STALL, updates.next()).await {
            Ok(n) => n,
            Err(_) => {
                let mut stuck = Vec::new();
                for id in pending.iter().take(3) {
                    stuck.push(format!("{:?}", client.status(id).await));
                }
                panic!(
                    "no status update for {STALL:?} while {} tasks have not run, e.g. {}",
                    pending.len(),
                    stuck.join("; ")
                );
            }
        };
        match next {
            Some(Ok(s)) => {
                if ran(s.state) {
                    pending.remove(&s.id);
                }
            }
            Some(Err(e)) if e.kind() == dprim::ErrorKind::Resync => {
                *updates = client.watch().await.unwrap();
                let mut still = HashSet::new();
                for id in pending.drain() {
                    if !ran(client.status(&id).await.unwrap().state) {
                        still.insert(id);
                    }
                }
                *pending = still;
            }
            other => panic!("status watch: {other:?}"),
        }
    }
}
