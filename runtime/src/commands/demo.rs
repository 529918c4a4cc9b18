//! `dprim demo`: a supervisor and three agents in this process, a small
//! workload, live task states, and one agent crashing midway so its task is
//! seen going UNREACHABLE, then GONE, then running elsewhere.

use crate::cli::{Ctx, DemoArgs};
use crate::exit::{Failure, OK};
use crate::tasks::agent::{Agent, AgentConfig};
use crate::tasks::client::TasksClient;
use crate::tasks::placement::FirstFit;
use crate::tasks::supervisor::{Supervisor, SupervisorConfig};
use dprim::tasks::{Constraint, Resources, RestartPolicy, TaskSpec, TaskStatus};
use dprim::{TaskId, Tasks};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

fn task(label: &str, script: &str, cpus: f64) -> (String, TaskSpec) {
    (
        label.to_string(),
        TaskSpec {
            command: "sh".into(),
            args: vec!["-c".into(), script.into()],
            resources: Resources {
                cpus,
                mem_bytes: 64 << 20,
                ..Resources::default()
            },
            ..TaskSpec::default()
        },
    )
}

fn state(s: &TaskStatus) -> String {
    format!("{:?}", s.state).to_uppercase()
}

pub(crate) async fn run(ctx: &Ctx, args: DemoArgs) -> Result<u8, Failure> {
    let (backend, _) = ctx.open().await?;
    let work = std::env::temp_dir().join(format!("dprim-demo-{}", std::process::id()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let ttl = Duration::from_secs(1);

    println!(
        "dprim demo on the {} backend: 1 supervisor, 3 agents (2 cpus each), work dir {}",
        backend.kind(),
        work.display()
    );
    let supervisor = Supervisor::new(
        backend.clone(),
        SupervisorConfig {
            name: "demo-supervisor".into(),
            session_ttl: ttl,
            gone_timeout: Duration::from_secs(2),
            interval: Duration::from_millis(50),
            placer: Arc::new(FirstFit),
            task_retention: crate::tasks::supervisor::DEFAULT_TASK_RETENTION,
        },
    );
    let supervisor = tokio::spawn(supervisor.run(stopped(stop_rx.clone())));
    let mut agents = BTreeMap::new();
    for (id, zone) in [("agent-1", "z1"), ("agent-2", "z2"), ("agent-3", "z3")] {
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
                session_ttl: ttl,
                interval: Duration::from_millis(50),
                sandbox_retention: crate::tasks::agent::DEFAULT_SANDBOX_RETENTION,
            },
        );
        agents.insert(id, tokio::spawn(agent.run(stopped(stop_rx.clone()))));
    }

    // Launch only once every agent is registered, so placement (first fit
    // by agent id) is the same on every run and agent-1 holds the service.
    let agents_dir = dprim::Key::new("_dprim/agents")?;
    for _ in 0..500 {
        let registered = backend
            .kv()
            .list(&agents_dir, dprim::Depth::Children)
            .await?;
        if registered.entries.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = TasksClient::new(backend.clone());
    let mut updates = client.watch().await?;
    let mut workload = vec![
        task("quick", "sleep 1", 0.5),
        task("fails", "sleep 1; exit 3", 0.5),
        task("service", "exec sleep 600", 1.0),
        task("too-big", "true", 16.0),
    ];
    let mut pinned = task("zone-z3", "sleep 2", 0.5);
    pinned.1.constraints = vec![Constraint::Equals("zone".into(), "z3".into())];
    workload.push(pinned);
    workload[2].1.restart = RestartPolicy::OnFailure;
    let mut labels: BTreeMap<TaskId, String> = BTreeMap::new();
    for (label, spec) in workload {
        let id = client.launch(spec).await?;
        println!("launched {label:<8} as {id}");
        labels.insert(id, label);
    }

    let start = Instant::now();
    let mut crashed = args.crash_after.is_zero();
    let deadline = tokio::time::Instant::now() + args.duration;
    let interrupted = ctx.interrupted();
    tokio::pin!(interrupted);
    println!(
        "{:>7}  {:<8} {:<12} {:<8} message",
        "time", "task", "state", "agent"
    );
    loop {
        let crash_at = tokio::time::Instant::from_std(start + args.crash_after);
        tokio::select! {
            _ = &mut interrupted => break,
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tokio::time::sleep_until(crash_at), if !crashed => {
                crashed = true;
                // Abort, not stop: no clean close, as if the machine died.
                if let Some(a) = agents.remove("agent-1") {
                    a.abort();
                }
                println!("{:>6.1}s  -- agent-1 crashed (its session will expire; its tasks become UNREACHABLE, then GONE, and restartable ones move)", start.elapsed().as_secs_f64());
            }
            u = updates.next() => match u {
                Some(Ok(s)) => {
                    let label = labels.get(&s.id).cloned().unwrap_or_else(|| s.id.0.clone());
                    println!("{:>6.1}s  {:<8} {:<12} {:<8} {}", start.elapsed().as_secs_f64(), label, state(&s), s.agent.as_deref().unwrap_or("-"), s.message);
                }
                Some(Err(e)) => return Err(Failure::new(e)),
                None => break,
            }
        }
    }

    println!("\nsummary:");
    for (id, label) in &labels {
        if let Ok(s) = client.status(id).await {
            println!(
                "  {label:<8} {:<12} {:<8} {}",
                state(&s),
                s.agent.as_deref().unwrap_or("-"),
                s.message
            );
            if !s.state.is_terminal() {
                let _ = client.kill(id, Duration::from_secs(1)).await;
            }
        }
    }
    // Give kills a moment to reach the agents, then stop everything.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop_tx.send(true);
    for (_, a) in agents {
        let _ = a.await;
    }
    let _ = supervisor.await;
    // The crashed agent left its process behind, as a dead machine would;
    // this demo cleans it up since it runs on this machine.
    kill_leftovers(&work.join("agent-1"));
    let _ = std::fs::remove_dir_all(&work);
    Ok(OK)
}

fn kill_leftovers(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for task in entries.flatten() {
        if let Ok(launches) = std::fs::read_dir(task.path()) {
            for launch in launches.flatten() {
                if let Ok(pid) = std::fs::read_to_string(launch.path().join("pid")) {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        let _ = nix::sys::signal::killpg(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
    }
}
