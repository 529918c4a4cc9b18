//! The `tasks::` scenarios on real backends, with the supervisors and agents
//! as separate `dprim` processes (as in production) and the test as the
//! client. The backends come from DPRIM_TASKS_BACKENDS (e.g.
//! `etcd,zookeeper,nats`, each using `conformance-tests/configs/<kind>.toml`
//! with a fresh namespace); `scripts/test.sh` sets it after starting the
//! servers. Without it only a note is printed: the in-process scenarios on
//! memory are in tests/tasks_memory.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dprim::tasks::{Constraint, Resources, RestartPolicy, TaskSpec, TaskState, TaskStatus};
use dprim::{Backend, Config, ErrorKind, TaskId, Tasks};
use dprim_runtime::tasks::client::TasksClient;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Cluster {
    config: PathBuf,
    dir: PathBuf,
    agents: Vec<(String, Child)>,
    supervisors: Vec<Child>,
    client: TasksClient,
    backend: Backend,
}

impl Cluster {
    async fn new(kind: &str, scenario: &str) -> Cluster {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let base =
            std::fs::read_to_string(root.join(format!("conformance-tests/configs/{kind}.toml")))
                .unwrap_or_else(|e| panic!("no config for {kind}: {e}"));
        let dir = std::env::temp_dir().join(format!(
            "dprim-tasks-{kind}-{scenario}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let namespace = format!("tasks-{}-{scenario}-{}", std::process::id(), rand_suffix());
        let text = base
            .lines()
            .filter(|l| {
                !l.trim_start().starts_with("namespace")
                    && !l.trim_start().starts_with("session_ttl")
            })
            .chain([
                format!("namespace = \"{namespace}\"").as_str(),
                "session_ttl = \"1s\"",
            ])
            .collect::<Vec<_>>()
            .join("\n");
        let config = dir.join("config.toml");
        std::fs::write(&config, text).unwrap();
        let parsed = Config::from_file(&config).unwrap();
        let backend = dprim_runtime::open_config(&parsed)
            .await
            .unwrap_or_else(|e| {
                panic!("{kind} is not reachable (start it with scripts/{kind}.sh start): {e}")
            });
        Cluster {
            config,
            dir,
            agents: Vec::new(),
            supervisors: Vec::new(),
            client: TasksClient::new(backend.clone()),
            backend,
        }
    }

    fn dprim(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_dprim"));
        c.arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .env_remove("DPRIM_CONFIG");
        c
    }

    fn agent(&mut self, id: &str, cpus: f64, zone: &str) {
        let log = std::fs::File::create(self.dir.join(format!("{id}.log"))).unwrap();
        let child = self
            .dprim()
            .args(["agent", "--id", id, "--ttl", "1s"])
            .arg("--resources")
            .arg(format!("cpus={cpus},mem=1GiB"))
            .arg("--attributes")
            .arg(format!("zone={zone}"))
            .arg("--work-dir")
            .arg(self.dir.join(id))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.push((id.to_string(), child));
    }

    fn supervisor(&mut self, name: &str) {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let child = self
            .dprim()
            .args([
                "supervisor",
                "--name",
                name,
                "--ttl",
                "1s",
                "--gone-timeout",
                "2s",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.supervisors.push(child);
    }

    fn signal_agent(&self, id: &str, signal: Signal) {
        let (_, child) = self.agents.iter().find(|(a, _)| a == id).unwrap();
        kill(Pid::from_raw(child.id() as i32), signal).unwrap();
    }

    async fn wait(&self, id: &TaskId, what: &str, ok: impl Fn(&TaskStatus) -> bool) -> TaskStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.client.status(id).await.unwrap();
            if ok(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "task {id}: never {what}; last {s:?}; logs in {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_state(&self, id: &TaskId, state: TaskState) -> TaskStatus {
        self.wait(id, &format!("{state:?}"), |s| s.state == state)
            .await
    }

    /// Sandboxes (`<agent>/<launch>`) that ran `task`.
    fn launches(&self, task: &TaskId) -> Vec<String> {
        let mut out = Vec::new();
        for (agent, _) in &self.agents {
            if let Ok(entries) = std::fs::read_dir(self.dir.join(agent).join(&task.0)) {
                for e in entries.flatten() {
                    out.push(format!("{agent}/{}", e.file_name().to_string_lossy()));
                }
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.agents {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
        for c in &mut self.supervisors {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Leftover task processes (of killed agents) are in their own groups.
        if let Ok(agents) = std::fs::read_dir(&self.dir) {
            for pidfile in agents.flatten().flat_map(|a| walk(&a.path())) {
                let pid = std::fs::read_to_string(&pidfile)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok());
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else if p.file_name().is_some_and(|n| n == "pid") {
                out.push(p);
            }
        }
    }
    out
}

fn rand_suffix() -> String {
    format!(
        "{:06x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            & 0xff_ffff
    )
}

fn spec(script: &str, cpus: f64) -> TaskSpec {
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

fn backends() -> Vec<String> {
    match std::env::var("DPRIM_TASKS_BACKENDS") {
        Ok(list) => list
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        Err(_) => {
            eprintln!("DPRIM_TASKS_BACKENDS is not set: the multi-process task scenarios did not run (scripts/test.sh runs them on etcd, zookeeper and nats)");
            Vec::new()
        }
    }
}

async fn basics(kind: &str) {
    let mut c = Cluster::new(kind, "basics").await;
    c.supervisor("s1");
    c.agent("a1", 2.0, "z1");
    c.agent("a2", 2.0, "z2");
    let ok = c.client.launch(spec("true", 0.5)).await.unwrap();
    let s = c.wait_state(&ok, TaskState::Finished).await;
    assert_eq!(s.exit_code, Some(0));
    let failing = c.client.launch(spec("exit 7", 0.5)).await.unwrap();
    assert_eq!(
        c.wait_state(&failing, TaskState::Failed).await.exit_code,
        Some(7)
    );
    let long = c.client.launch(spec("exec sleep 60", 0.5)).await.unwrap();
    c.wait_state(&long, TaskState::Running).await;
    c.client.kill(&long, Duration::from_secs(1)).await.unwrap();
    c.wait_state(&long, TaskState::Killed).await;
    let huge = c.client.launch(spec("true", 64.0)).await.unwrap();
    let s = c
        .wait(&huge, "pending with a reason", |s| {
            s.message.contains("more than any agent")
        })
        .await;
    assert_eq!(s.state, TaskState::Staging);
    let mut pinned = spec("true", 0.5);
    pinned.constraints = vec![Constraint::Equals("zone".into(), "z2".into())];
    let pinned = c.client.launch(pinned).await.unwrap();
    assert_eq!(
        c.wait_state(&pinned, TaskState::Finished)
            .await
            .agent
            .as_deref(),
        Some("a2")
    );
    let all = c.client.reconcile(None, None).await.unwrap();
    let ids: Vec<&TaskId> = all.statuses.iter().map(|s| &s.id).collect();
    for id in [&ok, &failing, &long, &huge, &pinned] {
        assert!(ids.contains(&id), "reconcile misses {id}");
    }
    let unknown = TaskId("t-none".into());
    assert_eq!(
        c.client.status(&unknown).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let _ = &c.backend;
}

async fn agent_killed(kind: &str) {
    let mut c = Cluster::new(kind, "agentkill").await;
    c.supervisor("s1");
    c.agent("a1", 1.0, "z1");
    c.agent("a2", 1.0, "z2");
    let mut s = spec("exec sleep 60", 1.0);
    s.restart = RestartPolicy::OnFailure;
    let id = c.client.launch(s).await.unwrap();
    let first = c.wait_state(&id, TaskState::Running).await;
    let victim = first.agent.clone().unwrap();
    let killed_at = Instant::now();
    c.signal_agent(&victim, Signal::SIGKILL);
    c.wait_state(&id, TaskState::Unreachable).await;
    let noticed = killed_at.elapsed();
    // Session TTL 1 s; the supervisor notices on its next pass.
    assert!(
        noticed < Duration::from_secs(3),
        "UNREACHABLE only after {noticed:?}"
    );
    let moved = c
        .wait(&id, "running on the other agent", |s| {
            s.state == TaskState::Running && s.agent.as_deref() != Some(&victim)
        })
        .await;
    assert_ne!(moved.agent, Some(victim));
}

async fn agent_paused(kind: &str) {
    let mut c = Cluster::new(kind, "agentstop").await;
    c.supervisor("s1");
    c.agent("a1", 1.0, "z1");
    c.agent("a2", 1.0, "z2");
    let mut s = spec("exec sleep 60", 1.0);
    s.restart = RestartPolicy::OnFailure;
    let id = c.client.launch(s).await.unwrap();
    let first = c.wait_state(&id, TaskState::Running).await;
    let paused = first.agent.clone().unwrap();
    let old_pid: i32 = {
        let pidfile = c.dir.join(&paused).join(&id.0).join("1").join("pid");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(p) = std::fs::read_to_string(&pidfile) {
                break p.trim().parse().unwrap();
            }
            assert!(Instant::now() < deadline, "no pid file");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    c.signal_agent(&paused, Signal::SIGSTOP);
    c.wait(&id, "replaced on the other agent", |s| {
        s.state == TaskState::Running && s.agent.as_deref() != Some(&paused)
    })
    .await;
    c.signal_agent(&paused, Signal::SIGCONT);
    // Back from its pause, the agent must kill the task it no longer owns.
    let deadline = Instant::now() + Duration::from_secs(15);
    while kill(Pid::from_raw(old_pid), None).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the replaced task (pid {old_pid}) still runs after its agent came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn supervisor_failover(kind: &str) {
    let mut c = Cluster::new(kind, "supfail").await;
    c.supervisor("s1");
    c.supervisor("s2");
    c.agent("a1", 4.0, "z1");
    c.agent("a2", 4.0, "z2");
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(c.client.launch(spec("sleep 1", 0.5)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Kill whichever supervisor leads.
    let leader = c
        .backend
        .elections()
        .leader(&dprim::Key::new("_dprim/tasks/supervisor").unwrap())
        .await
        .unwrap()
        .expect("a leader");
    let name = String::from_utf8_lossy(leader.value.as_bytes()).to_string();
    let index = if name == "s1" { 0 } else { 1 };
    let _ = c.supervisors[index].kill();
    for _ in 0..4 {
        ids.push(c.client.launch(spec("sleep 1", 0.5)).await.unwrap());
    }
    for id in &ids {
        c.wait_state(id, TaskState::Finished).await;
        let launches = c.launches(id);
        assert_eq!(launches.len(), 1, "task {id} launched {launches:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_scenarios_on_every_configured_backend() {
    for kind in backends() {
        eprintln!("tasks scenarios on {kind}");
        basics(&kind).await;
        agent_killed(&kind).await;
        agent_paused(&kind).await;
        supervisor_failover(&kind).await;
    }
}
