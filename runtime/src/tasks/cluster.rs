//! Task clusters for the conformance suite's `tasks::` cases: supervisors
//! and agents running on the case's namespace, which a case starts, kills,
//! pauses and inspects ([`dprim_conformance::TaskCluster`]).
//!
//! - On the memory backend (whose state lives in this process) they run in
//!   this process as tokio tasks. Killing one aborts its task: nothing is
//!   closed, its session simply stops being renewed, as after SIGKILL.
//!   Pausing an agent stops polling it and stalls its session's renewals
//!   through the backend's fault hook, as SIGSTOP freezes a process and
//!   its keep-alive.
//! - On every other backend each is a child process of the `dprim` binary
//!   (`dprim supervisor`, `dprim agent`), as in production, with a config
//!   file like the suite's own but rooted at the case's namespace; they are
//!   killed, paused and resumed with SIGKILL, SIGSTOP and SIGCONT.
//!
//! Either way agents keep their sandboxes under one directory per cluster,
//! which is how launches are counted and their processes found. Dropping a
//! cluster kills its supervisors and agents and every task process they
//! left (found by the sandbox path in their environment), then removes the
//! directory unless a failed case asked to keep it.

use super::agent::{Agent, AgentConfig};
use super::client::TasksClient;
use super::placement::FirstFit;
use super::store;
use super::supervisor::{Supervisor, SupervisorConfig, DEFAULT_TASK_RETENTION};
use async_trait::async_trait;
use dprim::{Backend, Config, Error, ErrorKind, Result, TaskId, Tasks};
use dprim_conformance::{AgentSpec, Launch, TaskCluster, TaskClusters};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{getpgid, getpgrp, Pid};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tracing::instrument::WithSubscriber;

/// How long a task stays UNREACHABLE before it is GONE, in every cluster:
/// short, so relaunch scenarios take seconds.
const GONE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often supervisors and agents look at timers when nothing wakes them.
const INTERVAL: Duration = Duration::from_millis(100);

/// How long starting a supervisor or agent may take (a fresh process
/// connecting to the backend) before the start fails.
const START_WAIT: Duration = Duration::from_secs(20);

/// Builds a [`TaskCluster`] per case: in this process, or as child
/// processes of the `dprim` binary (see the module docs).
#[derive(Clone, Debug)]
pub struct Clusters {
    mode: Mode,
}

#[derive(Clone, Debug)]
enum Mode {
    InProcess,
    Processes { exe: PathBuf, config: toml::Table },
}

impl Clusters {
    /// Supervisors and agents in this process, on the case's own client.
    /// Only for the memory backend: a backend whose state lives in this
    /// process cannot be shared with child processes.
    pub fn in_process() -> Clusters {
        Clusters {
            mode: Mode::InProcess,
        }
    }

    /// Supervisors and agents as child processes of `exe` (a `dprim`
    /// binary), each given a copy of the config file `config` with its
    /// `namespace` set to the case's namespace and its `session_ttl` to the
    /// cluster's.
    ///
    /// # Behavior
    /// An unreadable config file or one that is not a TOML table with a
    /// `[backend]` table is `ConfigInvalid`, naming the file.
    pub fn processes(exe: PathBuf, config: &Path) -> Result<Clusters> {
        let text = std::fs::read_to_string(config).map_err(|e| {
            Error::config(format!(
                "cannot read config file `{}`: {e}",
                config.display()
            ))
        })?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| {
            Error::config(format!(
                "config file `{}` is not valid TOML: {e}",
                config.display()
            ))
        })?;
        if !table.get("backend").is_some_and(toml::Value::is_table) {
            return Err(Error::config(format!(
                "config file `{}` has no [backend] table",
                config.display()
            )));
        }
        Ok(Clusters {
            mode: Mode::Processes { exe, config: table },
        })
    }

    /// The clusters `dprim conformance` uses for a loaded config: in this
    /// process for `memory`, otherwise child processes of this very binary
    /// reading a copy of `config_file`.
    ///
    /// # Behavior
    /// A non-memory config without a file, or a binary that cannot find its
    /// own path, is `ConfigInvalid` saying so.
    pub fn for_config(config: &Config, config_file: Option<&Path>) -> Result<Clusters> {
        if config.backend.kind == "memory" {
            return Ok(Clusters::in_process());
        }
        let file = config_file.ok_or_else(|| {
            Error::config(format!(
                "the `{}` task cluster needs the config as a file (--config)",
                config.backend.kind
            ))
        })?;
        let exe = std::env::current_exe().map_err(|e| {
            Error::config(format!(
                "cannot find this dprim binary to start supervisors and agents: {e}"
            ))
        })?;
        Clusters::processes(exe, file)
    }
}

#[async_trait]
impl TaskClusters for Clusters {
    async fn start(&self, backend: &Backend) -> Result<Box<dyn TaskCluster>> {
        let session_ttl = backend
            .capabilities()
            .session
            .min_ttl
            .max(Duration::from_secs(1));
        let dir = std::env::temp_dir().join(format!(
            "dprim-tasks-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "cannot create the cluster directory `{}`: {e}",
                    dir.display()
                ),
            )
        })?;
        let members = match &self.mode {
            Mode::InProcess => Members::InProcess {
                supervisors: BTreeMap::new(),
                agents: BTreeMap::new(),
            },
            Mode::Processes { exe, config } => {
                let mut config = config.clone();
                if let Some(toml::Value::Table(b)) = config.get_mut("backend") {
                    b.insert(
                        "namespace".into(),
                        toml::Value::String(backend.namespace().to_string()),
                    );
                    b.insert(
                        "session_ttl".into(),
                        toml::Value::String(humantime::format_duration(session_ttl).to_string()),
                    );
                }
                let file = dir.join("config.toml");
                std::fs::write(&file, config.to_string()).map_err(|e| {
                    Error::new(
                        ErrorKind::Unavailable,
                        format!("cannot write `{}`: {e}", file.display()),
                    )
                })?;
                Members::Processes {
                    exe: exe.clone(),
                    config: file,
                    supervisors: BTreeMap::new(),
                    agents: BTreeMap::new(),
                }
            }
        };
        Ok(Box::new(Cluster {
            backend: backend.clone(),
            client: Arc::new(TasksClient::new(backend.clone())),
            dir,
            keep: false,
            stopped: false,
            session_ttl,
            members,
        }))
    }
}

/// One case's supervisors and agents.
struct Cluster {
    backend: Backend,
    client: Arc<TasksClient>,
    /// Agent `a`'s work dir is `<dir>/<a>`; logs are `<dir>/<name>.log`.
    dir: PathBuf,
    keep: bool,
    /// Everything was stopped and cleaned up.
    stopped: bool,
    session_ttl: Duration,
    members: Members,
}

enum Members {
    InProcess {
        supervisors: BTreeMap<String, JoinHandle<Result<()>>>,
        agents: BTreeMap<String, InProcessAgent>,
    },
    Processes {
        exe: PathBuf,
        config: PathBuf,
        supervisors: BTreeMap<String, Child>,
        agents: BTreeMap<String, Child>,
    },
}

struct InProcessAgent {
    task: JoinHandle<Result<()>>,
    gate: Gate,
}

impl Cluster {
    fn work_dir(&self, agent: &str) -> PathBuf {
        self.dir.join(agent)
    }

    /// `dprim --config <config>` with stderr in `<dir>/<name>.log`.
    fn dprim(exe: &Path, config: &Path, dir: &Path, name: &str) -> Result<Command> {
        let path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&path).map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!("cannot create `{}`: {e}", path.display()),
            )
        })?;
        let mut c = Command::new(exe);
        c.arg("--config")
            .arg(config)
            .env_remove("DPRIM_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // Enough to follow elections and lost sessions in a kept log,
        // which is a file: no colour codes.
        c.env("DPRIM_LOG", log_filter()).env("NO_COLOR", "1");
        Ok(c)
    }

    /// Fails if `name` (a supervisor or an agent) has already ended.
    fn check_alive(&mut self, name: &str) -> Result<()> {
        let ended = match &mut self.members {
            Members::InProcess {
                supervisors,
                agents,
            } => supervisors
                .get(name)
                .or_else(|| agents.get(name).map(|a| &a.task))
                .is_some_and(JoinHandle::is_finished)
                .then(|| "ended".to_string()),
            Members::Processes {
                supervisors,
                agents,
                ..
            } => match supervisors.get_mut(name).or_else(|| agents.get_mut(name)) {
                Some(child) => match child.try_wait() {
                    Ok(Some(status)) => Some(format!("exited ({status})")),
                    _ => None,
                },
                None => None,
            },
        };
        match ended {
            Some(how) => Err(Error::new(
                ErrorKind::Unavailable,
                format!("{name} {how} while starting{}", self.log_tail(name)),
            )),
            None => Ok(()),
        }
    }

    /// The end of `name`'s log, for an error message.
    fn log_tail(&self, name: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join("\n  ");
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its log ends:\n  {tail}")
        }
    }

    /// Polls `ready` until it holds, failing if `name` ends first or
    /// [`START_WAIT`] passes.
    async fn wait_started<F, Fut>(&mut self, name: &str, what: &str, ready: F) -> Result<()>
    where
        F: Fn(Backend) -> Fut,
        Fut: Future<Output = Result<bool>>,
    {
        let deadline = Instant::now() + START_WAIT;
        loop {
            if ready(self.backend.clone()).await.unwrap_or(false) {
                return Ok(());
            }
            self.check_alive(name)?;
            if Instant::now() >= deadline {
                return Err(Error::timeout(format!(
                    "{name} started but {what} within {}{}",
                    humantime::format_duration(START_WAIT),
                    self.log_tail(name)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn sandbox(&self, task: &TaskId, launch: &Launch) -> PathBuf {
        self.work_dir(&launch.agent)
            .join(&task.0)
            .join(launch.number.to_string())
    }

    fn agent_ids(&self) -> Vec<String> {
        match &self.members {
            Members::InProcess { agents, .. } => agents.keys().cloned().collect(),
            Members::Processes { agents, .. } => agents.keys().cloned().collect(),
        }
    }
}

#[async_trait]
impl TaskCluster for Cluster {
    fn tasks(&self) -> Arc<dyn Tasks> {
        self.client.clone()
    }

    fn session_ttl(&self) -> Duration {
        self.session_ttl
    }

    async fn start_supervisor(&mut self, name: &str) -> Result<()> {
        self.start_supervisor_retaining(name, DEFAULT_TASK_RETENTION)
            .await
    }

    async fn start_supervisor_retaining(
        &mut self,
        name: &str,
        task_retention: Duration,
    ) -> Result<()> {
        match &mut self.members {
            Members::InProcess { supervisors, .. } => {
                let supervisor = Supervisor::new(
                    self.backend.clone(),
                    SupervisorConfig {
                        name: name.to_string(),
                        session_ttl: self.session_ttl,
                        gone_timeout: GONE_TIMEOUT,
                        interval: INTERVAL,
                        placer: Arc::new(FirstFit),
                        task_retention,
                    },
                );
                let logs = log_to_file(&self.dir, name)?;
                supervisors.insert(
                    name.to_string(),
                    tokio::spawn(supervisor.run(std::future::pending()).with_subscriber(logs)),
                );
            }
            Members::Processes {
                exe,
                config,
                supervisors,
                ..
            } => {
                let child = Cluster::dprim(exe, config, &self.dir, name)?
                    .arg("supervisor")
                    .arg("--name")
                    .arg(name)
                    .arg("--ttl")
                    .arg(humantime::format_duration(self.session_ttl).to_string())
                    .arg("--gone-timeout")
                    .arg(humantime::format_duration(GONE_TIMEOUT).to_string())
                    .arg("--task-retention")
                    .arg(humantime::format_duration(task_retention).to_string())
                    .spawn()
                    .map_err(|e| spawn_error(exe, e))?;
                supervisors.insert(name.to_string(), child);
            }
        }
        let election = store::election()?;
        self.wait_started(name, "no supervisor leads", move |backend| {
            let election = election.clone();
            async move { Ok(backend.elections().leader(&election).await?.is_some()) }
        })
        .await
    }

    async fn leader(&self) -> Result<Option<String>> {
        Ok(self
            .backend
            .elections()
            .leader(&store::election()?)
            .await?
            .map(|l| String::from_utf8_lossy(l.value.as_bytes()).into_owned()))
    }

    async fn kill_supervisor(&mut self, name: &str) -> Result<()> {
        match &mut self.members {
            Members::InProcess { supervisors, .. } => {
                let task = supervisors.get(name).ok_or_else(|| no_member(name))?;
                task.abort();
            }
            Members::Processes { supervisors, .. } => {
                let child = supervisors.get_mut(name).ok_or_else(|| no_member(name))?;
                child.kill().map_err(|e| signal_error(name, e))?;
                let _ = child.wait();
            }
        }
        Ok(())
    }

    async fn start_agent(&mut self, agent: AgentSpec) -> Result<()> {
        let id = agent.id.clone();
        let work_dir = self.work_dir(&id);
        match &mut self.members {
            Members::InProcess { agents, .. } => {
                let runner = Agent::new(
                    self.backend.clone(),
                    AgentConfig {
                        id: id.clone(),
                        resources: agent.resources,
                        attributes: agent.attributes,
                        work_dir,
                        session_ttl: self.session_ttl,
                        interval: INTERVAL,
                        sandbox_retention: super::agent::DEFAULT_SANDBOX_RETENTION,
                    },
                );
                let gate = Gate::default();
                let logs = log_to_file(&self.dir, &id)?;
                let task = tokio::spawn(
                    gate.wrap(runner.run(std::future::pending()).with_subscriber(logs)),
                );
                agents.insert(id.clone(), InProcessAgent { task, gate });
            }
            Members::Processes {
                exe,
                config,
                agents,
                ..
            } => {
                let child = Cluster::dprim(exe, config, &self.dir, &id)?
                    .arg("agent")
                    .arg("--id")
                    .arg(&id)
                    .arg("--ttl")
                    .arg(humantime::format_duration(self.session_ttl).to_string())
                    .arg("--resources")
                    .arg(resources_arg(&agent.resources))
                    .arg("--attributes")
                    .arg(attributes_arg(&agent.attributes))
                    .arg("--work-dir")
                    .arg(&work_dir)
                    .spawn()
                    .map_err(|e| spawn_error(exe, e))?;
                agents.insert(id.clone(), child);
            }
        }
        let key = store::agent_key(&id)?;
        self.wait_started(&id, "never registered", move |backend| {
            let key = key.clone();
            async move { Ok(backend.kv().get(&key).await?.is_some()) }
        })
        .await
    }

    async fn kill_agent(&mut self, id: &str) -> Result<()> {
        match &mut self.members {
            Members::InProcess { agents, .. } => {
                agents.get(id).ok_or_else(|| no_member(id))?.task.abort();
            }
            Members::Processes { agents, .. } => {
                let child = agents.get_mut(id).ok_or_else(|| no_member(id))?;
                child.kill().map_err(|e| signal_error(id, e))?;
                let _ = child.wait();
            }
        }
        Ok(())
    }

    async fn pause_agent(&mut self, id: &str) -> Result<()> {
        match &self.members {
            Members::InProcess { agents, .. } => {
                let agent = agents.get(id).ok_or_else(|| no_member(id))?;
                agent.gate.set(true);
                // The session's keep-alive runs apart from the agent's own
                // task; a frozen process would renew nothing either.
                let faults = self.backend.faults().ok_or_else(|| {
                    Error::new(
                        ErrorKind::Unsupported,
                        "pausing an in-process agent needs the backend's stall_session fault hook",
                    )
                })?;
                let entry = self
                    .backend
                    .kv()
                    .get(&store::agent_key(id)?)
                    .await?
                    .ok_or_else(|| Error::not_found(format!("agent {id} is not registered")))?;
                let session = entry.session.ok_or_else(|| {
                    Error::unexpected(format!("agent {id}'s registration has no session"))
                })?;
                faults.stall_session(session).await?;
            }
            Members::Processes { agents, .. } => {
                let child = agents.get(id).ok_or_else(|| no_member(id))?;
                signal(child, Signal::SIGSTOP).map_err(|e| signal_error(id, e))?;
            }
        }
        Ok(())
    }

    async fn resume_agent(&mut self, id: &str) -> Result<()> {
        match &self.members {
            Members::InProcess { agents, .. } => {
                agents.get(id).ok_or_else(|| no_member(id))?.gate.set(false);
            }
            Members::Processes { agents, .. } => {
                let child = agents.get(id).ok_or_else(|| no_member(id))?;
                signal(child, Signal::SIGCONT).map_err(|e| signal_error(id, e))?;
            }
        }
        Ok(())
    }

    async fn launches(&self, task: &TaskId) -> Result<Vec<Launch>> {
        let mut out = Vec::new();
        for agent in self.agent_ids() {
            let Ok(entries) = std::fs::read_dir(self.work_dir(&agent).join(&task.0)) else {
                continue;
            };
            for entry in entries.flatten() {
                let number = entry.file_name().to_str().and_then(|n| n.parse().ok());
                if let (Some(number), true) = (number, entry.path().is_dir()) {
                    out.push(Launch {
                        agent: agent.clone(),
                        number,
                    });
                }
            }
        }
        out.sort();
        Ok(out)
    }

    async fn launch_running(&self, task: &TaskId, launch: &Launch) -> Result<Option<bool>> {
        let sandbox = self.sandbox(task, launch);
        let Some(pid) = read_pid(&sandbox.join("pid")) else {
            return Ok(None);
        };
        if kill(pid, None).is_err() {
            return Ok(Some(false));
        }
        // The pid may be a zombie (its agent paused or gone) or, long
        // after, another process: only a live process of that sandbox
        // counts.
        let marker = format!("DPRIM_SANDBOX={}", sandbox.display());
        Ok(Some(match std::fs::read(format!("/proc/{pid}/environ")) {
            Ok(environ) => environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()),
            // No /proc: the pid exists, which is all that can be known.
            Err(_) => !Path::new("/proc/self").exists(),
        }))
    }

    fn keep(&mut self) -> Option<String> {
        self.keep = true;
        Some(self.dir.display().to_string())
    }

    async fn stop(&mut self) {
        if self.stopped {
            return;
        }
        for task in self.end_members() {
            let _ = task.await;
        }
        clean_up(&self.dir, self.keep);
        self.stopped = true;
    }
}

impl Cluster {
    /// Kills the member processes (waiting for them) or aborts the
    /// in-process members, returning the tasks of those (an abort takes
    /// effect at their next pause, which the caller may wait for).
    fn end_members(&mut self) -> Vec<JoinHandle<Result<()>>> {
        match &mut self.members {
            Members::InProcess {
                supervisors,
                agents,
            } => {
                let mut tasks: Vec<JoinHandle<Result<()>>> =
                    std::mem::take(supervisors).into_values().collect();
                for (_, agent) in std::mem::take(agents) {
                    // A paused agent is dropped where it stands.
                    agent.task.abort();
                    tasks.push(agent.task);
                }
                for task in &tasks {
                    task.abort();
                }
                tasks
            }
            Members::Processes {
                supervisors,
                agents,
                ..
            } => {
                for child in agents.values_mut() {
                    // A stopped process gets SIGKILL too, but continuing it
                    // first lets it be reaped at once.
                    let _ = signal(child, Signal::SIGCONT);
                    let _ = child.kill();
                    let _ = child.wait();
                }
                for child in supervisors.values_mut() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                Vec::new()
            }
        }
    }
}

/// After the members have ended: kills the task processes they left (tasks
/// run in their own process groups and outlive a killed agent) and removes
/// the cluster's directory unless it is kept.
fn clean_up(dir: &Path, keep: bool) {
    kill_tasks(dir);
    if !keep {
        let _ = std::fs::remove_dir_all(dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        let tasks = self.end_members();
        // Whatever runs now is killed at once; an in-process agent still in
        // the middle of a step could start one more process, so once the
        // aborted members are gone everything is cleaned up again.
        kill_tasks(&self.dir);
        let (dir, keep) = (self.dir.clone(), self.keep);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if !tasks.is_empty() => {
                runtime.spawn(async move {
                    for task in tasks {
                        let _ = task.await;
                    }
                    clean_up(&dir, keep);
                });
            }
            _ => clean_up(&dir, keep),
        }
    }
}

/// A subscriber writing an in-process member's logs to `<dir>/<name>.log`,
/// as a member process's stderr would be, rather than into the suite's own
/// output.
fn log_to_file(dir: &Path, name: &str) -> Result<impl tracing::Subscriber + Send + Sync> {
    let path = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&path).map_err(|e| {
        Error::new(
            ErrorKind::Unavailable,
            format!("cannot create `{}`: {e}", path.display()),
        )
    })?;
    Ok(tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(log_filter()))
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .finish())
}

/// The log filter of cluster members: the suite's own `DPRIM_LOG`, else
/// `info`.
fn log_filter() -> String {
    std::env::var("DPRIM_LOG").unwrap_or_else(|_| "info".to_string())
}

/// Kills every task process an agent of the cluster in `dir` started that
/// still runs (its own and its children, through its process group).
fn kill_tasks(dir: &Path) {
    let marker = format!("DPRIM_SANDBOX={}/", dir.display());
    let own_group = getpgrp();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        // No /proc: the pid files name each task's process group.
        for pidfile in pid_files(dir) {
            if let Some(pid) = read_pid(&pidfile) {
                if pid != own_group {
                    let _ = killpg(pid, Signal::SIGKILL);
                }
            }
        }
        return;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let ours = environ
            .split(|b| *b == 0)
            .any(|v| v.starts_with(marker.as_bytes()));
        if ours {
            let pid = Pid::from_raw(pid);
            if let Ok(group) = getpgid(Some(pid)) {
                if group != own_group {
                    let _ = killpg(group, Signal::SIGKILL);
                }
            }
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

fn signal(child: &Child, signal: Signal) -> nix::Result<()> {
    let pid = i32::try_from(child.id()).map_err(|_| nix::Error::ESRCH)?;
    kill(Pid::from_raw(pid), signal)
}

fn read_pid(path: &Path) -> Option<Pid> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| *p > 0)
        .map(Pid::from_raw)
}

/// Every `pid` file in the sandboxes under `dir`.
fn pid_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(pid_files(&path));
            } else if path.file_name().is_some_and(|n| n == "pid") {
                out.push(path);
            }
        }
    }
    out
}

fn resources_arg(r: &dprim::tasks::Resources) -> String {
    let mut parts = vec![
        format!("cpus={}", r.cpus),
        format!("mem={}", r.mem_bytes),
        format!("disk={}", r.disk_bytes),
    ];
    if !r.ports.is_empty() {
        let ports: Vec<String> = r.ports.iter().map(u16::to_string).collect();
        parts.push(format!("ports={}", ports.join(";")));
    }
    parts.join(",")
}

fn attributes_arg(attributes: &BTreeMap<String, String>) -> String {
    attributes
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn no_member(name: &str) -> Error {
    Error::not_found(format!("the cluster has no supervisor or agent `{name}`"))
}

fn spawn_error(exe: &Path, e: std::io::Error) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("cannot start `{}`: {e}", exe.display()),
    )
}

fn signal_error(name: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Unavailable, format!("cannot signal {name}: {e}"))
}

/// Lets a future be frozen: while closed, it is not polled at all (as a
/// stopped process runs no code), and it goes on where it was once open.
#[derive(Clone, Default)]
struct Gate {
    state: Arc<Mutex<GateState>>,
}

#[derive(Default)]
struct GateState {
    closed: bool,
    waker: Option<Waker>,
}

impl Gate {
    fn set(&self, closed: bool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.closed = closed;
        if !closed {
            if let Some(waker) = state.waker.take() {
                waker.wake();
            }
        }
    }

    fn wrap<F: Future>(&self, inner: F) -> impl Future<Output = F::Output> {
        let gate = self.clone();
        let mut inner: Pin<Box<F>> = Box::pin(inner);
        std::future::poll_fn(move |cx| {
            {
                let mut state = gate.state.lock().unwrap_or_else(|p| p.into_inner());
                if state.closed {
                    state.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
            inner.as_mut().poll(cx)
        })
    }
}
