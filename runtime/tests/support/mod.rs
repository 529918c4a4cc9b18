//! Helpers the runtime's integration tests share: task specs, the `dprim`
//! binary, and an in-process supervisor and agent on one backend.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // each test crate uses some

use dprim::tasks::{Resources, TaskSpec, TaskState, TaskStatus};
use dprim::{Backend, TaskId, Tasks};
use dprim_runtime::tasks::agent::AgentConfig;
use dprim_runtime::tasks::client::TasksClient;
use dprim_runtime::tasks::placement::FirstFit;
use dprim_runtime::tasks::supervisor::{Supervisor, SupervisorConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A task running `script` under `sh -c`, asking for `cpus`.
pub fn shell(script: &str, cpus: f64) -> TaskSpec {
    TaskSpec {
        command: "sh".into(),
        args: vec!["-c".into(), script.into()],
        resources: Resources {
            cpus,
            ..Resources::default()
        },
        ..TaskSpec::default()
    }
}

/// The `dprim` binary, with no config or log level from the environment.
pub fn dprim() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dprim"));
    cmd.env_remove("DPRIM_CONFIG")
        .env_remove("DPRIM_LOG")
        .stdin(Stdio::null());
    cmd
}

pub fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally, not by a signal")
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(prefix: &str, name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "dprim-{prefix}-{}-{nanos}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Resolves once `stop` is set: the shutdown signal of a supervisor or
/// agent run in the test.
pub fn stopped(stop: &watch::Sender<bool>) -> impl std::future::Future<Output = ()> {
    let mut rx = stop.subscribe();
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// Supervisor `s1` on `backend`, declaring an unreachable agent's tasks
/// GONE after `gone_timeout`.
pub fn supervisor(backend: &Backend, gone_timeout: Duration) -> Supervisor {
    named_supervisor(backend, "s1", gone_timeout)
}

/// Supervisor `name` on `backend`, declaring an unreachable agent's tasks
/// GONE after `gone_timeout`.
pub fn named_supervisor(backend: &Backend, name: &str, gone_timeout: Duration) -> Supervisor {
    Supervisor::new(
        backend.clone(),
        SupervisorConfig {
            name: name.into(),
            session_ttl: Duration::from_secs(2),
            gone_timeout,
            interval: Duration::from_millis(30),
            placer: Arc::new(FirstFit),
            task_retention: dprim_runtime::tasks::supervisor::DEFAULT_TASK_RETENTION,
        },
    )
}

/// Agent `a1` with 4 CPUs, 1 GiB of memory and of disk.
pub fn agent_config(
    work_dir: PathBuf,
    session_ttl: Duration,
    attributes: BTreeMap<String, String>,
) -> AgentConfig {
    AgentConfig {
        id: "a1".into(),
        resources: Resources {
            cpus: 4.0,
            mem_bytes: 1 << 30,
            disk_bytes: 1 << 30,
            ports: vec![],
        },
        attributes,
        work_dir,
        session_ttl,
        interval: Duration::from_millis(30),
        sandbox_retention: dprim_runtime::tasks::agent::DEFAULT_SANDBOX_RETENTION,
    }
}

/// Waits (up to 10 s) until task `id` is in state `want`.
pub async fn wait_for(client: &TasksClient, id: &TaskId, want: TaskState) -> TaskStatus {
    for _ in 0..400 {
        let s = client.status(id).await.unwrap();
        if s.state == want {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "task {id} never reached {want:?}: {:?}",
        client.status(id).await
    );
}
