//! Task launch end to end on the in-memory backend, in one process: a
//! supervisor and two agents running real child processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dprim::tasks::{Constraint, Resources, RestartPolicy, TaskSpec, TaskState, TaskStatus};
use dprim::{BackendConfig, ErrorKind, TaskId, Tasks};
use dprim_memory::MemoryServer;
use dprim_runtime::tasks::agent::{Agent, AgentConfig};
use dprim_runtime::tasks::client::TasksClient;
use dprim_runtime::tasks::placement::FirstFit;
use dprim_runtime::tasks::supervisor::{Supervisor, SupervisorConfig};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

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

async fn wait_for(client: &TasksClient, id: &TaskId, want: TaskState) -> TaskStatus {
    for _ in 0..200 {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_finish_fail_kill_pending_and_constraints() {
    let backend = MemoryServer::new()
        .connect(&BackendConfig::memory())
        .unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let supervisor = Supervisor::new(
        backend.clone(),
        SupervisorConfig {
            name: "s1".into(),
            session_ttl: Duration::from_secs(2),
            gone_timeout: Duration::from_secs(2),
            interval: Duration::from_millis(30),
            placer: Arc::new(FirstFit),
        },
    );
    let mut handles = vec![tokio::spawn(supervisor.run(stopped(stop_rx.clone())))];
    let work = std::env::temp_dir().join(format!("dprim-tasks-test-{}", std::process::id()));
    for (id, zone) in [("a1", "z1"), ("a2", "z2")] {
        let agent = Agent::new(
            backend.clone(),
            AgentConfig {
                id: id.into(),
                resources: Resources {
                    cpus: 2.0,
                    mem_bytes: 1 << 30,
                    disk_bytes: 1 << 30,
                    ports: vec![],
                },
                attributes: [("zone".to_string(), zone.to_string())].into(),
                work_dir: work.join(id),
                session_ttl: Duration::from_secs(2),
                interval: Duration::from_millis(30),
            },
        );
        handles.push(tokio::spawn(agent.run(stopped(stop_rx.clone()))));
    }
    let client = TasksClient::new(backend.clone());

    let ok = client.launch(spec("true", &[], 0.5)).await.unwrap();
    let s = wait_for(&client, &ok, TaskState::Finished).await;
    assert_eq!(s.exit_code, Some(0));

    let failing = client
        .launch(spec("sh", &["-c", "exit 3"], 0.5))
        .await
        .unwrap();
    let s = wait_for(&client, &failing, TaskState::Failed).await;
    assert_eq!(s.exit_code, Some(3));

    let long = client.launch(spec("sleep", &["30"], 0.5)).await.unwrap();
    wait_for(&client, &long, TaskState::Running).await;
    client.kill(&long, Duration::from_secs(2)).await.unwrap();
    wait_for(&client, &long, TaskState::Killed).await;

    let huge = client.launch(spec("true", &[], 64.0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = client.status(&huge).await.unwrap();
    assert_eq!(s.state, TaskState::Staging);
    assert!(s.message.contains("more than any agent"), "{}", s.message);

    let mut placed = spec("true", &[], 0.5);
    placed.constraints = vec![Constraint::Equals("zone".into(), "z2".into())];
    let z2 = client.launch(placed).await.unwrap();
    let s = wait_for(&client, &z2, TaskState::Finished).await;
    assert_eq!(s.agent.as_deref(), Some("a2"));

    let mut retried = spec(
        "sh",
        &["-c", "test -e ../../flag || { touch ../../flag; exit 1; }"],
        0.5,
    );
    retried.restart = RestartPolicy::OnFailure;
    let r = client.launch(retried).await.unwrap();
    // Fails once, is relaunched after the first backoff, then finishes.
    for _ in 0..200 {
        if client.status(&r).await.unwrap().state == TaskState::Finished {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(client.status(&r).await.unwrap().state, TaskState::Finished);

    let page = client.reconcile(None, None).await.unwrap();
    assert_eq!(page.statuses.len(), 6);
    let unknown = TaskId("t-nope".into());
    assert_eq!(
        client.status(&unknown).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let explicit = client
        .reconcile(Some(vec![ok.clone(), unknown]), None)
        .await
        .unwrap();
    assert_eq!(explicit.statuses[1].state, TaskState::Unknown);

    stop_tx.send(true).unwrap();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    let _ = std::fs::remove_dir_all(work);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_agent_goes_unreachable_then_gone_and_the_task_moves() {
    let backend = MemoryServer::new()
        .connect(&BackendConfig::memory())
        .unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let supervisor = Supervisor::new(
        backend.clone(),
        SupervisorConfig {
            name: "s1".into(),
            session_ttl: Duration::from_secs(2),
            gone_timeout: Duration::from_millis(500),
            interval: Duration::from_millis(30),
            placer: Arc::new(FirstFit),
        },
    );
    let sup = tokio::spawn(supervisor.run(stopped(stop_rx.clone())));
    let work = std::env::temp_dir().join(format!("dprim-tasks-crash-{}", std::process::id()));
    let mut agents = Vec::new();
    // a2 is made first, so its report sequence numbers start below a1's:
    // the relaunch on a2 must still be tracked (sequence numbers are only
    // compared within one launch).
    for id in ["a2", "a1"] {
        let agent = Agent::new(
            backend.clone(),
            AgentConfig {
                id: id.into(),
                resources: Resources {
                    cpus: 1.0,
                    ..Resources::default()
                },
                attributes: Default::default(),
                work_dir: work.join(id),
                session_ttl: Duration::from_millis(500),
                interval: Duration::from_millis(30),
            },
        );
        agents.push(tokio::spawn(agent.run(stopped(stop_rx.clone()))));
    }
    let client = TasksClient::new(backend.clone());
    // Both agents registered, so first fit (by id) picks a1.
    let agents_dir = dprim::Key::new("_dprim/agents").unwrap();
    for _ in 0..200 {
        let n = backend
            .kv()
            .list(&agents_dir, dprim::Depth::Children)
            .await
            .unwrap()
            .entries
            .len();
        if n == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut s = spec("sh", &["-c", "echo $$ > pid; exec sleep 30"], 1.0);
    s.restart = RestartPolicy::OnFailure;
    let id = client.launch(s).await.unwrap();
    let first = wait_for(&client, &id, TaskState::Running).await;
    assert_eq!(first.agent.as_deref(), Some("a1"));

    // a1 crashes: no clean close, its session simply stops being renewed.
    agents[1].abort();
    wait_for(&client, &id, TaskState::Unreachable).await;
    // After the gone timeout and the first restart backoff it runs on a2.
    let mut moved = None;
    for _ in 0..200 {
        let s = client.status(&id).await.unwrap();
        if s.state == TaskState::Running && s.agent.as_deref() == Some("a2") {
            moved = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        moved.is_some(),
        "task never moved to a2: {:?}",
        client.status(&id).await
    );

    stop_tx.send(true).unwrap();
    sup.await.unwrap().unwrap();
    agents.remove(0).await.unwrap().unwrap();
    // The crashed agent's process is still running (nobody was left to kill it).
    if let Ok(pid) = std::fs::read_to_string(work.join("a1").join(&id.0).join("1").join("pid")) {
        let _ = std::process::Command::new("kill").arg(pid.trim()).status();
    }
    let _ = std::fs::remove_dir_all(work);
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
