//! An agent that dies and is started again on the same work dir: it takes
//! back the tasks still running, reports the ones that ended meanwhile
//! with their exit code, and delivers, in order, the reports it could not
//! write while the backend was unreachable. In one process on the memory
//! backend; an agent "crashes" by having its future aborted: no clean-up,
//! its session simply stops being renewed and its processes run on.
//!
//! On real backends (DPRIM_TEST_BACKENDS, e.g. `etcd,zookeeper,nats`, as
//! `scripts/test.sh` sets it) the same story runs with the supervisor and
//! the agent as separate `dprim` processes, the agent killed with SIGKILL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use async_trait::async_trait;
use dprim::election::Leadership;
use dprim::tasks::{Resources, TaskSpec, TaskState, TaskStatus};
use dprim::{
    Backend, BackendConfig, BackendParts, Depth, Elections, Entry, Error, ErrorKind, Key, Kv,
    Leader, Listing, LockGuard, Locks, PubSub, PutOptions, Queue, QueueOptions, Queues, Session,
    Sessions, Subscription, TaskId, Tasks, Txn, TxnResult, Value, Version, WatchEvent, WatchStart,
    WatchStream, WatchTarget,
};
use dprim_memory::MemoryServer;
use dprim_runtime::tasks::agent::{Agent, AgentConfig};
use dprim_runtime::tasks::client::TasksClient;
use futures::stream::BoxStream;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

fn shell(script: &str) -> TaskSpec {
    support::shell(script, 0.5)
}

/// A supervisor, one agent that can be crashed and started again, a client.
struct Cluster {
    backend: Backend,
    client: TasksClient,
    work: PathBuf,
    agent_ttl: Duration,
    stop: watch::Sender<bool>,
    supervisor: Option<JoinHandle<dprim::Result<()>>>,
    agent: Option<JoinHandle<dprim::Result<()>>>,
}

impl Cluster {
    fn new(name: &str, agent_ttl: Duration) -> Cluster {
        let backend = MemoryServer::new()
            .connect(&BackendConfig::memory())
            .unwrap();
        let work =
            std::env::temp_dir().join(format!("dprim-agent-restart-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let (stop, _) = watch::channel(false);
        // Long: these tests are about the agent coming back.
        let supervisor = support::supervisor(&backend, Duration::from_secs(60));
        let supervisor = tokio::spawn(supervisor.run(support::stopped(&stop)));
        Cluster {
            client: TasksClient::new(backend.clone()),
            backend,
            work,
            agent_ttl,
            stop,
            supervisor: Some(supervisor),
            agent: None,
        }
    }

    fn config(&self) -> AgentConfig {
        support::agent_config(self.work.clone(), self.agent_ttl, Default::default())
    }

    /// Starts the agent on `backend` (the cluster's, or a wrapper of it).
    fn start_agent_on(&mut self, backend: Backend) {
        let agent = Agent::new(backend, self.config());
        self.agent = Some(tokio::spawn(agent.run(support::stopped(&self.stop))));
    }

    fn start_agent(&mut self) {
        self.start_agent_on(self.backend.clone());
    }

    /// The agent dies without any clean-up.
    async fn crash_agent(&mut self) {
        let agent = self.agent.take().expect("an agent runs");
        agent.abort();
        assert!(agent.await.unwrap_err().is_cancelled());
    }

    async fn wait_for(&self, id: &TaskId, want: TaskState) -> TaskStatus {
        support::wait_for(&self.client, id, want).await
    }

    fn sandbox(&self, id: &TaskId) -> PathBuf {
        self.work.join(&id.0).join("1")
    }

    fn pgid(&self, id: &TaskId) -> Pid {
        let text = std::fs::read_to_string(self.sandbox(id).join("pid")).unwrap();
        Pid::from_raw(text.trim().parse().unwrap())
    }

    /// The agent's checkpoint, as JSON.
    fn checkpoint(&self) -> serde_json::Value {
        dprim_runtime::tasks::agent::read_checkpoint(&self.work).unwrap()
    }

    fn outbox_len(&self) -> usize {
        self.checkpoint()["outbox"].as_array().map_or(0, Vec::len)
    }

    async fn stop(mut self, leftovers: &[Pid]) {
        self.stop.send_replace(true);
        if let Some(agent) = self.agent.take() {
            agent.await.unwrap().unwrap();
        }
        if let Some(supervisor) = self.supervisor.take() {
            supervisor.await.unwrap().unwrap();
        }
        for pgid in leftovers {
            let _ = killpg(*pgid, Signal::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn group_alive(pgid: Pid) -> bool {
    // A zombie leader still answers; it has no `/proc/<pid>/cwd` target.
    killpg(pgid, None).is_ok() && std::fs::read_link(format!("/proc/{}/cwd", pgid.as_raw())).is_ok()
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..400 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what} never happened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_takes_back_its_running_tasks() {
    let mut c = Cluster::new("adopt", Duration::from_millis(500));
    c.start_agent();
    // Each start appends to `launches` in the work dir: a second start of
    // either task would show.
    let waits = c
        .client
        .launch(shell(
            "echo waits >> ../../launches; while [ ! -e ../../go ]; do sleep 0.05; done; exit 3",
        ))
        .await
        .unwrap();
    let sleeps = c
        .client
        .launch(shell("echo sleeps >> ../../launches; exec sleep 30"))
        .await
        .unwrap();
    c.wait_for(&waits, TaskState::Running).await;
    c.wait_for(&sleeps, TaskState::Running).await;
    let (waits_pg, sleeps_pg) = (c.pgid(&waits), c.pgid(&sleeps));

    c.crash_agent().await;
    // Its session expires: the supervisor no longer knows whether they run.
    c.wait_for(&waits, TaskState::Unreachable).await;
    c.wait_for(&sleeps, TaskState::Unreachable).await;
    assert!(group_alive(waits_pg) && group_alive(sleeps_pg));

    c.start_agent();
    c.wait_for(&waits, TaskState::Running).await;
    c.wait_for(&sleeps, TaskState::Running).await;
    // The same processes, not new ones.
    assert_eq!((c.pgid(&waits), c.pgid(&sleeps)), (waits_pg, sleeps_pg));

    // A kill reaches an adopted task.
    c.client
        .kill(&sleeps, Duration::from_secs(2))
        .await
        .unwrap();
    c.wait_for(&sleeps, TaskState::Killed).await;
    until("the killed task's group to end", || !group_alive(sleeps_pg)).await;

    // Its own exit is noticed and reported with its code.
    std::fs::write(c.work.join("go"), "").unwrap();
    let s = c.wait_for(&waits, TaskState::Failed).await;
    assert_eq!(s.exit_code, Some(3));

    let launches = std::fs::read_to_string(c.work.join("launches")).unwrap();
    let mut lines: Vec<&str> = launches.lines().collect();
    lines.sort();
    assert_eq!(lines, ["sleeps", "waits"], "a task was started twice");
    c.stop(&[waits_pg, sleeps_pg]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_ends_while_the_agent_is_down_is_reported_with_its_code() {
    // The agent is back well within its session TTL.
    let mut c = Cluster::new("ended", Duration::from_secs(5));
    c.start_agent();
    let id = c
        .client
        .launch(shell(
            "echo x >> ../../launches; while [ ! -e ../../go ]; do sleep 0.05; done; exit 4",
        ))
        .await
        .unwrap();
    c.wait_for(&id, TaskState::Running).await;
    let pgid = c.pgid(&id);

    c.crash_agent().await;
    std::fs::write(c.work.join("go"), "").unwrap();
    let exit_file = c.sandbox(&id).join("exit");
    until("the task to end", || exit_file.exists()).await;
    assert_eq!(
        c.client.status(&id).await.unwrap().state,
        TaskState::Running,
        "nobody could have told the supervisor yet"
    );

    c.start_agent();
    let s = c.wait_for(&id, TaskState::Failed).await;
    assert_eq!(s.exit_code, Some(4));
    // Reported from the exit file, not by running it again.
    let launches = std::fs::read_to_string(c.work.join("launches")).unwrap();
    assert_eq!(launches.lines().count(), 1, "the task was started twice");
    c.stop(&[pgid]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_made_while_the_backend_is_unreachable_arrive_later_in_order() {
    let mut c = Cluster::new("outbox", Duration::from_secs(5));
    let down = Arc::new(AtomicBool::new(true));
    let flaky = flaky_backend(&c.backend, down.clone());
    c.start_agent_on(flaky.clone());
    let reports = Key::new("_dprim/tasks/report").unwrap();
    let mut changes = c
        .backend
        .kv()
        .watch(WatchTarget::Dir(reports), WatchStart::Now)
        .await
        .unwrap();
    let id = c.client.launch(shell("exit 5")).await.unwrap();
    // It ran and ended, but neither report could be written: both wait in
    // the checkpoint, and the supervisor still thinks it is starting.
    until("both reports to be queued", || {
        dprim_runtime::tasks::agent::read_checkpoint(&c.work).is_ok() && c.outbox_len() == 2
    })
    .await;
    assert_eq!(
        c.client.status(&id).await.unwrap().state,
        TaskState::Starting
    );

    // The agent dies and comes back while the backend is still unreachable:
    // nothing is lost, nothing is started again.
    c.crash_agent().await;
    c.start_agent_on(flaky);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.outbox_len(), 2);

    down.store(false, Ordering::SeqCst);
    let s = c.wait_for(&id, TaskState::Failed).await;
    assert_eq!(s.exit_code, Some(5));
    until("the outbox to empty", || c.outbox_len() == 0).await;

    // The backend saw the reports in the order they were made.
    let mut seen = Vec::new();
    while let Ok(Some(Ok(event))) =
        tokio::time::timeout(Duration::from_millis(300), changes.next()).await
    {
        if let WatchEvent::Put(e) = event {
            let report: serde_json::Value = serde_json::from_slice(e.value.as_bytes()).unwrap();
            seen.push((report["seq"].as_u64().unwrap(), report["event"].clone()));
        }
    }
    let events: Vec<&serde_json::Value> = seen.iter().map(|(_, e)| e).collect();
    assert_eq!(
        events,
        [
            &serde_json::json!("Started"),
            &serde_json::json!({ "Exited": { "code": 5 } })
        ],
        "{seen:?}"
    );
    assert!(seen[0].0 < seen[1].0);
    let launches = std::fs::read_dir(c.work.join(&id.0)).unwrap().count();
    assert_eq!(launches, 1);
    c.stop(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_work_dir_stops_the_agent_with_a_clear_error() {
    let backend = MemoryServer::new()
        .connect(&BackendConfig::memory())
        .unwrap();
    let work = std::env::temp_dir().join(format!("dprim-agent-workdir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let config = |id: &str| AgentConfig {
        id: id.into(),
        resources: Resources::default(),
        attributes: Default::default(),
        work_dir: work.clone(),
        session_ttl: Duration::from_secs(1),
        interval: Duration::from_millis(30),
        sandbox_retention: dprim_runtime::tasks::agent::DEFAULT_SANDBOX_RETENTION,
    };
    // a1 runs once and leaves: the work dir is now a1's.
    Agent::new(backend.clone(), config("a1"))
        .run(async {})
        .await
        .unwrap();
    let e = Agent::new(backend.clone(), config("a2"))
        .run(async {})
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
    assert!(e.to_string().contains("belongs to agent `a1`"), "{e}");

    // Both slots damaged (a torn save spoils one only).
    for slot in ["agent.checkpoint.0", "agent.checkpoint.1"] {
        std::fs::write(work.join(slot), "{ not json").unwrap();
    }
    let checkpoint = work.join("agent.checkpoint.0");
    let e = Agent::new(backend.clone(), config("a1"))
        .run(async {})
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
    assert!(
        e.to_string().contains(&checkpoint.display().to_string()),
        "{e}"
    );
    // Refused before registering: the agent never became visible.
    let agents = backend
        .kv()
        .list(&Key::new("_dprim/agents").unwrap(), Depth::Children)
        .await
        .unwrap();
    assert!(agents.entries.is_empty());
    let _ = std::fs::remove_dir_all(work);
}

/// The cluster's backend, except that reading or writing a task report
/// fails (as if the backend were unreachable) while `down` is set.
fn flaky_backend(inner: &Backend, down: Arc<AtomicBool>) -> Backend {
    Backend::new(BackendParts {
        kind: inner.kind().into(),
        namespace: inner.namespace().into(),
        capabilities: inner.capabilities().clone(),
        kv: Arc::new(Flaky {
            inner: inner.clone(),
            down,
        }),
        sessions: Arc::new(Via(inner.clone())),
        locks: Arc::new(Via(inner.clone())),
        elections: Arc::new(Via(inner.clone())),
        pubsub: Arc::new(Via(inner.clone())),
        queues: Arc::new(Via(inner.clone())),
        faults: None,
    })
}

struct Flaky {
    inner: Backend,
    down: Arc<AtomicBool>,
}

impl Flaky {
    fn reach(&self, key: &Key) -> dprim::Result<()> {
        if self.down.load(Ordering::SeqCst) && key.as_str().starts_with("_dprim/tasks/report") {
            // Not `temporary`: the retry layer would only make the test slow.
            return Err(Error::new(
                ErrorKind::Unavailable,
                "the backend is unreachable (injected)",
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Kv for Flaky {
    async fn get(&self, key: &Key) -> dprim::Result<Option<Entry>> {
        self.reach(key)?;
        self.inner.kv().get(key).await
    }
    async fn put_with(
        &self,
        key: &Key,
        value: Value,
        options: PutOptions,
    ) -> dprim::Result<Version> {
        self.reach(key)?;
        self.inner.kv().put_with(key, value, options).await
    }
    async fn delete_with(
        &self,
        key: &Key,
        precondition: dprim::Precondition,
    ) -> dprim::Result<bool> {
        self.reach(key)?;
        self.inner.kv().delete_with(key, precondition).await
    }
    async fn list(&self, dir: &Key, depth: Depth) -> dprim::Result<Listing> {
        self.reach(dir)?;
        self.inner.kv().list(dir, depth).await
    }
    async fn txn(&self, txn: Txn) -> dprim::Result<TxnResult> {
        self.inner.kv().txn(txn).await
    }
    async fn watch(&self, target: WatchTarget, start: WatchStart) -> dprim::Result<WatchStream> {
        self.inner.kv().watch(target, start).await
    }
}

/// Everything but Kv goes straight to the cluster's backend.
struct Via(Backend);

#[async_trait]
impl Sessions for Via {
    async fn open(&self, ttl: Duration) -> dprim::Result<Session> {
        self.0.sessions().open(ttl).await
    }
}

#[async_trait]
impl Locks for Via {
    async fn lock(
        &self,
        name: &Key,
        session: &Session,
        timeout: Duration,
    ) -> dprim::Result<LockGuard> {
        self.0.locks().lock(name, session, timeout).await
    }
    async fn try_lock(&self, name: &Key, session: &Session) -> dprim::Result<Option<LockGuard>> {
        self.0.locks().try_lock(name, session).await
    }
}

#[async_trait]
impl Elections for Via {
    async fn campaign(
        &self,
        name: &Key,
        value: Value,
        session: &Session,
    ) -> dprim::Result<Leadership> {
        self.0.elections().campaign(name, value, session).await
    }
    async fn leader(&self, name: &Key) -> dprim::Result<Option<Leader>> {
        self.0.elections().leader(name).await
    }
    async fn observe(
        &self,
        name: &Key,
    ) -> dprim::Result<BoxStream<'static, dprim::Result<Option<Leader>>>> {
        self.0.elections().observe(name).await
    }
}

#[async_trait]
impl PubSub for Via {
    async fn publish(&self, topic: &Key, payload: Value) -> dprim::Result<()> {
        self.0.pubsub().publish(topic, payload).await
    }
    async fn flush(&self) -> dprim::Result<()> {
        self.0.pubsub().flush().await
    }
    async fn subscribe(&self, topic: &Key) -> dprim::Result<Subscription> {
        self.0.pubsub().subscribe(topic).await
    }
}

#[async_trait]
impl Queues for Via {
    async fn open(
        &self,
        name: &Key,
        options: Option<QueueOptions>,
    ) -> dprim::Result<Arc<dyn Queue>> {
        self.0.queues().open(name, options).await
    }
}

/// A supervisor and an agent as `dprim` processes on a real backend.
struct Processes {
    dir: PathBuf,
    config: PathBuf,
    supervisor: Option<std::process::Child>,
    agent: Option<std::process::Child>,
    agent_starts: u32,
    client: TasksClient,
}

impl Processes {
    async fn new(kind: &str) -> Processes {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let base =
            std::fs::read_to_string(root.join(format!("conformance-tests/configs/{kind}.toml")))
                .unwrap_or_else(|e| panic!("no config for {kind}: {e}"));
        let dir =
            std::env::temp_dir().join(format!("dprim-agent-restart-{kind}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let namespace = format!("agent-restart-{}-{nanos:x}", std::process::id());
        let text = base
            .lines()
            .filter(|l| {
                !l.trim_start().starts_with("namespace")
                    && !l.trim_start().starts_with("session_ttl")
            })
            .map(str::to_string)
            .chain([
                format!("namespace = \"{namespace}\""),
                "session_ttl = \"1s\"".to_string(),
            ])
            .collect::<Vec<_>>()
            .join("\n");
        let config = dir.join("config.toml");
        std::fs::write(&config, text).unwrap();
        let parsed = dprim::Config::from_file(&config).unwrap();
        let backend = dprim_runtime::open_config(&parsed)
            .await
            .unwrap_or_else(|e| {
                panic!("{kind} is not reachable (start it with scripts/{kind}.sh start): {e}")
            });
        Processes {
            dir,
            config,
            supervisor: None,
            agent: None,
            agent_starts: 0,
            client: TasksClient::new(backend),
        }
    }

    fn dprim(&self, args: &[&str], log: &str) -> std::process::Child {
        let log = std::fs::File::create(self.dir.join(log)).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_dprim"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("DPRIM_CONFIG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn work(&self) -> PathBuf {
        self.dir.join("a1")
    }

    fn start_agent(&mut self) {
        self.agent_starts += 1;
        let work = self.work().display().to_string();
        let log = format!("a1-{}.log", self.agent_starts);
        let args = [
            "agent",
            "--id",
            "a1",
            "--ttl",
            "1s",
            "--resources",
            "cpus=2,mem=1GiB",
            "--work-dir",
            &work,
        ];
        self.agent = Some(self.dprim(&args, &log));
    }

    fn kill_agent(&mut self) {
        let mut agent = self.agent.take().expect("an agent runs");
        agent.kill().unwrap(); // SIGKILL
        agent.wait().unwrap();
    }

    async fn wait_for(&self, id: &TaskId, want: TaskState) -> TaskStatus {
        for _ in 0..600 {
            let s = self.client.status(id).await.unwrap();
            if s.state == want {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "task {id} never reached {want:?}: {:?}; logs in {}",
            self.client.status(id).await,
            self.dir.display()
        );
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in [self.agent.as_mut(), self.supervisor.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Task processes are in their own groups and outlive their agent.
        if let Ok(tasks) = std::fs::read_dir(self.work()) {
            for launch in tasks
                .flatten()
                .filter_map(|t| std::fs::read_dir(t.path()).ok())
            {
                for sandbox in launch.flatten() {
                    if let Ok(pid) = std::fs::read_to_string(sandbox.path().join("pid")) {
                        if let Ok(pid) = pid.trim().parse() {
                            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                        }
                    }
                }
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_agent_process_takes_back_its_task_on_real_backends() {
    let Ok(list) = std::env::var("DPRIM_TEST_BACKENDS") else {
        eprintln!("DPRIM_TEST_BACKENDS is not set: the multi-process agent restart did not run (scripts/test.sh runs it on etcd, zookeeper and nats)");
        return;
    };
    for kind in list.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        let mut p = Processes::new(kind).await;
        p.supervisor = Some(p.dprim(
            &[
                "supervisor",
                "--name",
                "s1",
                "--ttl",
                "1s",
                "--gone-timeout",
                "60s",
            ],
            "s1.log",
        ));
        p.start_agent();
        let id = p
            .client
            .launch(shell(
                "echo x >> ../../launches; while [ ! -e ../../go ]; do sleep 0.05; done; exit 3",
            ))
            .await
            .unwrap();
        p.wait_for(&id, TaskState::Running).await;
        let pid: i32 = std::fs::read_to_string(p.work().join(&id.0).join("1").join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();

        p.kill_agent();
        p.wait_for(&id, TaskState::Unreachable).await;
        assert!(
            group_alive(Pid::from_raw(pid)),
            "{kind}: the task died with its agent"
        );
        p.start_agent();
        p.wait_for(&id, TaskState::Running).await;
        std::fs::write(p.work().join("go"), "").unwrap();
        let s = p.wait_for(&id, TaskState::Failed).await;
        assert_eq!(s.exit_code, Some(3), "{kind}");
        let launches = std::fs::read_to_string(p.work().join("launches")).unwrap();
        assert_eq!(launches.lines().count(), 1, "{kind}: started twice");
    }
}
