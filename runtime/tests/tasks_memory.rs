//! Task launch end to end on the in-memory backend, in one process: the
//! conformance suite's `tasks::` group (supervisors and agents running real
//! child processes, through the runtime's task cluster), so `cargo test`
//! covers it; `dprim conformance` runs the same group on etcd, ZooKeeper and
//! NATS with supervisors and agents as separate processes. Plus the
//! supervisor's fencing by election term, which needs no cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dprim::tasks::{Resources, TaskSpec};
use dprim::{BackendConfig, ErrorKind, Registry, Tasks};
use dprim_conformance::{run, ConfigHarness, Harness, Outcome, RunOptions};
use dprim_memory::MemoryServer;
use dprim_runtime::tasks::client::TasksClient;
use dprim_runtime::tasks::cluster::Clusters;
use dprim_runtime::tasks::placement::FirstFit;
use dprim_runtime::tasks::supervisor::{Supervisor, SupervisorConfig};
use std::sync::Arc;
use std::time::Duration;

fn spec(cmd: &str, args: &[&str], cpus: f64) -> TaskSpec {
    TaskSpec {
        command: cmd.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        resources: Resources {
            cpus,
            ..Resources::default()
        },
        ..TaskSpec::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tasks_group_passes_in_process() {
    let registry = Registry::new().register("memory", dprim_memory::constructor());
    let harness: Arc<dyn Harness> = Arc::new(
        ConfigHarness::new(registry, BackendConfig::memory())
            .with_task_clusters(Arc::new(Clusters::in_process())),
    );
    let options = RunOptions {
        filter: Some("tasks::".into()),
        ..RunOptions::default()
    };
    let report = run(harness, options, &mut |case| {
        eprintln!(
            "{} {} ({} ms) {}",
            case.outcome.as_str(),
            case.name,
            case.millis,
            case.reason
        );
    })
    .await;
    let expected = dprim_conformance::cases()
        .iter()
        .filter(|c| c.name.starts_with("tasks::"))
        .count();
    assert!(expected >= 9, "only {expected} tasks:: cases");
    assert_eq!(report.cases.len(), expected, "{}", report.table());
    // Every case runs here: none may be skipped, let alone fail.
    assert!(
        report.cases.iter().all(|c| c.outcome == Outcome::Passed),
        "{}",
        report.table()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_never_overwrites_a_later_terms_record() {
    let backend = MemoryServer::new()
        .connect(&BackendConfig::memory())
        .unwrap();
    let config = |name: &str| SupervisorConfig {
        name: name.into(),
        session_ttl: Duration::from_secs(2),
        gone_timeout: Duration::from_secs(2),
        interval: Duration::from_millis(30),
        placer: Arc::new(FirstFit),
        task_retention: dprim_runtime::tasks::supervisor::DEFAULT_TASK_RETENTION,
    };
    let client = TasksClient::new(backend.clone());
    let id = client.launch(spec("true", &[], 0.5)).await.unwrap();
    // The leader of term 10 records the task (pending: no agents).
    Supervisor::new(backend.clone(), config("new"))
        .reconcile(10)
        .await
        .unwrap();
    let before = client.status(&id).await.unwrap();
    // A deposed supervisor (term 3) wakes up and tries a pass.
    let err = Supervisor::new(backend.clone(), config("old"))
        .reconcile(3)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotLeader, "{err}");
    assert_eq!(client.status(&id).await.unwrap(), before);
}
