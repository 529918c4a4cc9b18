//! An agent: registers itself and its resources as an ephemeral key of its
//! session, runs the tasks assigned to it as processes, and reports what
//! happens to them.
//!
//! # What survives the agent
//!
//! The agent keeps a checkpoint in `<work_dir>/agent.checkpoint.{0,1}`
//! (the private `checkpoint` module), saved whole before it acts on a
//! change:
//! before a launch starts (so a crash mid-start is noticed), once it runs
//! (with its process group and start time), and whenever a report is
//! made. It holds
//! the report sequence, the highest supervisor term seen, the launches it
//! runs and has finished with, and the outbox of reports not yet written
//! to the backend.
//!
//! - **Reports** are appended to the outbox (and the checkpoint saved)
//!   before any attempt to write them, and leave it only once the backend
//!   took them, oldest first: a report is never lost, even if the backend
//!   is unreachable for a long time or the agent restarts meanwhile. Each
//!   is written as a compare-and-swap on the launch's report key, and only
//!   if the key does not already hold that report or a later one (higher
//!   sequence), so a report delivered twice never moves the key backwards;
//!   the supervisor applies each sequence number once.
//! - **Re-adoption**: an agent started again on the same work dir takes
//!   back every launch in its checkpoint whose process group still runs
//!   (the same process, by its start time), reports it STARTED again and
//!   watches it until it ends; a launch that ended while the agent was down
//!   is reported with the exit code its wrapper left in the sandbox (see
//!   [`super::process`]; `-1` when it left none). Kills, re-reports after a
//!   re-registration and the killing of launches replaced meanwhile work on
//!   adopted launches as on any other.
//! - **Fencing**: assignments and kill orders carry the term of the
//!   supervisor that wrote them. Before starting a launch the agent reads
//!   the task's record (one read per launch) and starts it only if the
//!   record places this launch on this agent and is STARTING; otherwise the
//!   supervisor has moved on and the assignment is declined for good. An
//!   order whose term is older than the newest term the agent has seen is
//!   acted on only if the record still calls for it: a new supervisor keeps
//!   its predecessor's outstanding orders without rewriting them, so an old
//!   term alone does not make an order stale, while one the record no
//!   longer backs is from a supervisor that has been replaced.

mod checkpoint;

use self::checkpoint::{Checkpoint, Launched, Outgoing, Owner};
use super::process::{self, Adoption, Enforcement, TaskProcess, UNKNOWN_EXIT};
use super::store::{self, AgentInfo, Assignment, KillOrder, Report, ReportEvent, StatusRecord};
use dprim::tasks::{Resources, TaskState};
use dprim::{
    Backend, Depth, ErrorKind, Key, Precondition, Result, Session, Version, WatchEvent, WatchStart,
    WatchTarget,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot};

/// Agent settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The agent's id (a key segment).
    pub id: String,
    /// What it offers.
    pub resources: Resources,
    /// Its attributes.
    pub attributes: BTreeMap<String, String>,
    /// Sandboxes go under `<work_dir>/<task>/<launch>`; the checkpoint is
    /// `<work_dir>/agent.checkpoint.{0,1}`. An agent started again on the same work dir
    /// takes back the tasks still running there.
    pub work_dir: PathBuf,
    /// TTL of the agent's session.
    pub session_ttl: Duration,
    /// How often it looks for assignments and kill orders.
    pub interval: Duration,
    /// How long the sandbox of an ended launch (its output and exit code)
    /// stays on disk; then it is deleted, so a long-lived agent's work dir
    /// does not grow with every task it ever ran.
    pub sandbox_retention: Duration,
}

/// How long an ended launch's sandbox is kept by default (the same as the
/// supervisor's task retention: the output goes with the record).
pub const DEFAULT_SANDBOX_RETENTION: Duration = Duration::from_secs(3600);

/// The longest an agent waits between two looks for old sandboxes.
const SANDBOX_SWEEP: Duration = Duration::from_secs(60);

/// How long a graceful shutdown gives each task after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

struct Running {
    launch: u32,
    kill: Option<oneshot::Sender<Duration>>,
    kill_sent: bool,
}

struct Exit {
    task: String,
    launch: u32,
    code: i32,
    killed: bool,
}

/// What the task's record says about an assignment.
enum Verdict {
    /// It places this launch here and it is STARTING.
    Start,
    /// The record has not caught up with the assignment yet (a read from a
    /// lagging replica); look again at the next poll.
    Later,
    /// The supervisor has moved on; never start this launch.
    Decline(String),
}

/// The orders addressed to this agent (assignments and kill orders),
/// read once and then kept current from a watch, so a wake-up costs no
/// listing.
#[derive(Default)]
struct Orders {
    assignments: BTreeMap<String, (Assignment, Version)>,
    kills: BTreeMap<String, (KillOrder, Version)>,
    /// The newest version applied per key (the listing and the watch
    /// overlap).
    seen: HashMap<Key, Version>,
    /// In a mutex only to be `Sync` (the agent's futures are sent across
    /// threads while borrowing it); it is only reached through `&mut`.
    changes: Option<std::sync::Mutex<futures::stream::SelectAll<dprim::WatchStream>>>,
}

impl Orders {
    /// Lists both directories and watches them from there, unless a watch
    /// is already following them.
    async fn follow(&mut self, backend: &Backend, agent: &str) -> Result<()> {
        if self.changes.is_some() {
            return Ok(());
        }
        let dirs = [store::assign_dir(agent)?, store::kill_dir(agent)?];
        let mut since: Option<Version> = None;
        let mut fresh = Orders::default();
        for (i, dir) in dirs.iter().enumerate() {
            let listing = backend.kv().list(dir, Depth::Children).await?;
            since = Some(since.map_or(listing.revision, |s| s.min(listing.revision)));
            for e in listing.entries {
                fresh.apply(i == 0, &e.key, Some(&e.value), e.version);
            }
        }
        let Some(since) = since else {
            return Ok(());
        };
        let mut streams = Vec::new();
        for dir in &dirs {
            streams.push(
                backend
                    .kv()
                    .watch(WatchTarget::Dir(dir.clone()), WatchStart::After(since))
                    .await?,
            );
        }
        fresh.changes = Some(std::sync::Mutex::new(futures::stream::select_all(streams)));
        *self = fresh;
        Ok(())
    }

    fn apply(
        &mut self,
        assignment: bool,
        key: &Key,
        value: Option<&dprim::Value>,
        version: Version,
    ) {
        if self.seen.get(key).is_some_and(|v| *v >= version) {
            return;
        }
        self.seen.insert(key.clone(), version);
        let task = key.name().to_string();
        if assignment {
            let a = value.and_then(|v| decoded(key, v)).map(|a| (a, version));
            store::set(&mut self.assignments, task, a);
        } else {
            let k = value.and_then(|v| decoded(key, v)).map(|k| (k, version));
            store::set(&mut self.kills, task, k);
        }
    }

    /// Applies what the watch has delivered so far (and `first`, already
    /// taken from it); after a resync or a failure the next `follow` lists
    /// again.
    fn absorb_ready(&mut self, agent: &str, first: Option<Option<Result<WatchEvent>>>) {
        use futures::{FutureExt, StreamExt};
        let Ok(assign_dir) = store::assign_dir(agent) else {
            return;
        };
        let mut next = first;
        loop {
            let item = match next.take() {
                Some(item) => item,
                None => match self.changes.as_mut().map(|c| match c.get_mut() {
                    Ok(c) => c.next().now_or_never(),
                    Err(_) => Some(None),
                }) {
                    Some(Some(item)) => item,
                    _ => return,
                },
            };
            match item {
                Some(Ok(WatchEvent::Put(e))) => {
                    let assignment = e.key.is_under(&assign_dir);
                    self.apply(assignment, &e.key, Some(&e.value), e.version);
                }
                Some(Ok(WatchEvent::Delete { key, version })) => {
                    let assignment = key.is_under(&assign_dir);
                    self.apply(assignment, &key, None, version);
                }
                Some(Ok(WatchEvent::Resync { reason })) => {
                    tracing::info!(%reason, "order watch resynced; listing again");
                    self.changes = None;
                    return;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "order watch failed; listing again");
                    self.changes = None;
                    return;
                }
                None => {
                    self.changes = None;
                    return;
                }
            }
        }
    }

    /// Resolves at the next delivered item; never without a watch.
    async fn next(&mut self) -> Option<Result<WatchEvent>> {
        use futures::StreamExt;
        match self.changes.as_mut().map(|c| c.get_mut()) {
            Some(Ok(c)) => c.next().await,
            // A poisoned lock cannot happen (never locked); end the watch.
            Some(Err(_)) => None,
            None => std::future::pending().await,
        }
    }
}

fn decoded<T: serde::de::DeserializeOwned>(key: &Key, value: &dprim::Value) -> Option<T> {
    match store::decode(key, value) {
        Ok(x) => Some(x),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an unreadable order");
            None
        }
    }
}

/// The checkpoint an agent keeps in `work_dir` (the launches it runs and
/// the reports it has not delivered yet), as JSON. Reads the files only,
/// whether or not the agent runs.
///
/// # Behavior
/// - A work dir with no checkpoint is `NotFound`; a checkpoint that cannot
///   be read is `ConfigInvalid`, naming the file.
pub fn read_checkpoint(work_dir: &std::path::Path) -> Result<serde_json::Value> {
    let state = Checkpoint::read(work_dir)?;
    serde_json::to_value(&state)
        .map_err(|e| dprim::Error::unexpected(format!("encoding the agent checkpoint: {e}")))
}

/// One agent.
pub struct Agent {
    backend: Backend,
    enforcement: Enforcement,
    config: AgentConfig,
}

impl Agent {
    /// An agent on `backend`.
    pub fn new(backend: Backend, config: AgentConfig) -> Agent {
        let enforcement = Enforcement::detect(&config.id);
        tracing::info!(agent = %config.id, enforcement = %enforcement.describe(), "resource enforcement");
        Agent {
            backend,
            enforcement,
            config,
        }
    }

    /// How this agent holds tasks to their resources on this machine.
    pub fn enforcement(&self) -> &Enforcement {
        &self.enforcement
    }

    /// Runs until `shutdown` resolves; then kills its tasks and leaves.
    ///
    /// # Behavior
    /// - Fails `ConfigInvalid` before touching the backend if the work
    ///   dir's checkpoint is unreadable, belongs to another agent id, or is
    ///   in use by another live agent process; the message names the file.
    /// - Takes back the tasks its checkpoint lists (see the module docs).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let me = std::process::id() as i32;
        let owner = Owner {
            pid: me,
            start_time: process::start_time_of(me),
        };
        let mut checkpoint = Checkpoint::open(&self.config.work_dir, &self.config.id, owner)?;
        // Report sequence numbers must grow across restarts, also when the
        // checkpoint was lost: never below the clock in microseconds.
        let clock = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        checkpoint.state.seq = checkpoint.state.seq.max(clock);
        checkpoint.save()?;
        let (exits, exit_rx) = mpsc::unbounded_channel::<Exit>();
        let runner = Runner {
            backend: self.backend,
            enforcement: self.enforcement,
            config: self.config,
            checkpoint,
            running: HashMap::new(),
            exits,
            declined_kills: HashSet::new(),
            orders: Orders::default(),
            written: HashMap::new(),
            unsaved_deliveries: false,
            swept_at: None,
        };
        runner.run(shutdown, exit_rx).await
    }
}

/// A running agent: its checkpoint and its tasks.
struct Runner {
    backend: Backend,
    enforcement: Enforcement,
    config: AgentConfig,
    checkpoint: Checkpoint,
    running: HashMap<String, Running>,
    exits: mpsc::UnboundedSender<Exit>,
    /// Kill orders of an older term the record did not back, by task and
    /// term: not read again.
    declined_kills: HashSet<(String, u64)>,
    orders: Orders,
    /// The version this process last wrote to each report key: the next
    /// report on the launch is a compare-and-swap on it, without a read.
    /// (And the sequence of the report written.)
    written: HashMap<Key, (Version, u64)>,
    /// Reports were delivered since the checkpoint was last saved.
    unsaved_deliveries: bool,
    /// When the work dir was last swept of old sandboxes.
    swept_at: Option<tokio::time::Instant>,
}

impl Drop for Runner {
    /// The agent's own control group goes with it when no task's group is
    /// left in it (the kernel refuses otherwise; a task still running keeps
    /// it for the next agent).
    fn drop(&mut self) {
        if let Enforcement::Cgroup { cgroups } = &self.enforcement {
            // Groups of ended tasks the kernel was still releasing go first.
            self.sweep_cgroups(&self.ended_sandboxes());
            cgroups.release();
        }
    }
}

impl Runner {
    async fn register(&self) -> Result<Session> {
        let session = self
            .backend
            .sessions()
            .open(self.config.session_ttl)
            .await?;
        let info = AgentInfo {
            enforcement: self.enforcement.describe(),
            id: self.config.id.clone(),
            resources: self.config.resources.clone(),
            attributes: self.config.attributes.clone(),
        };
        store::put_with(
            &self.backend,
            &store::agent_key(&self.config.id)?,
            &info,
            dprim::Precondition::None,
            Some(&session),
        )
        .await?;
        Ok(session)
    }

    /// Saves the checkpoint. A failure is logged: the agent keeps working
    /// from memory (the backend still gets every report), it only could
    /// not make this change survive a crash.
    fn save(&mut self) {
        self.unsaved_deliveries = false;
        if let Err(e) = off_the_runtime(|| self.checkpoint.save()) {
            tracing::error!(error = %e, "cannot save the agent checkpoint; a crash now would forget this change");
        }
    }

    /// Queues a report (durably, in order) for the backend.
    fn report(&mut self, task: &str, launch: u32, event: ReportEvent) {
        let state = &mut self.checkpoint.state;
        state.seq += 1;
        state.outbox.push_back(Outgoing {
            task: task.to_string(),
            report: Report {
                agent: self.config.id.clone(),
                launch,
                seq: state.seq,
                event,
                made_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            },
        });
        self.save();
    }

    /// Writes one report unless the backend already holds it or a later
    /// one for the same launch: a compare-and-swap on the report key, so a
    /// redelivery never moves the key backwards.
    async fn deliver(&mut self, out: &Outgoing) -> Result<()> {
        let key = store::report_key(&out.task, out.report.launch)?;
        // Usually this process is the key's only writer, and knows what is
        // there: nothing yet, or what it wrote last. Only when that guess
        // fails is the key read.
        let guess = match self.written.get(&key) {
            // It wrote this report or a later one already.
            Some((_, seq)) if *seq >= out.report.seq => return Ok(()),
            Some((v, _)) => Precondition::Version(*v),
            None => Precondition::Absent,
        };
        match store::put_with(&self.backend, &key, &out.report, guess, None).await {
            Ok(v) => {
                self.written.insert(key, (v, out.report.seq));
                return Ok(());
            }
            Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::AlreadyExists) => {}
            Err(e) => return Err(e),
        }
        // A conflict means someone wrote the key between the read and the
        // write; read again. More than a few in a row is not a race.
        for _ in 0..5 {
            let precondition = match self.backend.kv().get(&key).await? {
                Some(entry) => match store::decode::<Report>(&key, &entry.value) {
                    Ok(there) if there.seq >= out.report.seq => return Ok(()),
                    _ => Precondition::Version(entry.version),
                },
                None => Precondition::Absent,
            };
            match store::put_with(&self.backend, &key, &out.report, precondition, None).await {
                Ok(v) => {
                    self.written.insert(key, (v, out.report.seq));
                    return Ok(());
                }
                Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::AlreadyExists) => {}
                Err(e) => return Err(e),
            }
        }
        Err(dprim::Error::unexpected(format!(
            "the report key `{key}` kept changing while it was being written"
        )))
    }

    /// Writes the outbox, oldest first, until it is empty or a write fails.
    async fn flush(&mut self) {
        let mut delivered = false;
        while let Some(out) = self.checkpoint.state.outbox.front().cloned() {
            match self.deliver(&out).await {
                Ok(()) => {
                    self.checkpoint.state.outbox.pop_front();
                    delivered = true;
                }
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        waiting = self.checkpoint.state.outbox.len(),
                        "cannot write a task report yet; keeping it"
                    );
                    break;
                }
            }
        }
        // Not saved here: the next change saves the shorter outbox, and
        // until then a crash only means delivering again, which the report
        // key and the supervisor both absorb. One save fewer per report.
        self.unsaved_deliveries |= delivered;
    }

    /// Watches a started or adopted process until it ends or is killed.
    fn watch(&mut self, task: String, launch: u32, mut process: TaskProcess) {
        let (kill_tx, kill_rx) = oneshot::channel::<Duration>();
        self.running.insert(
            task.clone(),
            Running {
                launch,
                kill: Some(kill_tx),
                kill_sent: false,
            },
        );
        let exits = self.exits.clone();
        tokio::spawn(async move {
            let (code, killed) = tokio::select! {
                code = process.wait() => (code.unwrap_or(UNKNOWN_EXIT), false),
                grace = kill_rx => match grace {
                    Ok(grace) => (process.kill(grace).await.unwrap_or(UNKNOWN_EXIT), true),
                    Err(_) => (process.wait().await.unwrap_or(UNKNOWN_EXIT), false),
                },
            };
            let _ = exits.send(Exit {
                task,
                launch,
                code,
                killed,
            });
        });
    }

    fn on_exit(&mut self, exit: Exit) {
        if self
            .running
            .get(&exit.task)
            .is_some_and(|r| r.launch == exit.launch)
        {
            self.running.remove(&exit.task);
        }
        let state = &mut self.checkpoint.state;
        if state
            .tasks
            .get(&exit.task)
            .is_some_and(|l| l.launch == exit.launch)
        {
            state.tasks.remove(&exit.task);
        }
        state.done.insert((exit.task.clone(), exit.launch));
        let event = if exit.killed {
            ReportEvent::KilledByRequest
        } else {
            ReportEvent::Exited { code: exit.code }
        };
        // Saves the checkpoint with the launch gone and its report queued.
        self.report(&exit.task, exit.launch, event);
    }

    /// Takes back the launches the checkpoint lists: watches those still
    /// running, reports those that ended while the agent was down.
    fn adopt_all(&mut self) {
        let recorded: Vec<(String, Launched)> = self
            .checkpoint
            .state
            .tasks
            .iter()
            .map(|(t, l)| (t.clone(), l.clone()))
            .collect();
        for (task, launched) in recorded {
            let launch = launched.launch;
            let found = match launched.pid {
                Some(pid) => TaskProcess::adopt(pid, launched.start_time, &launched.sandbox),
                // The agent stopped between recording the launch and
                // learning its pid: the sandbox's pid file tells whether
                // the process was started.
                None => match read_pid_file(&launched.sandbox) {
                    Some(pid) => TaskProcess::adopt(pid, None, &launched.sandbox),
                    None => {
                        self.checkpoint.state.tasks.remove(&task);
                        self.checkpoint.state.done.insert((task.clone(), launch));
                        self.report(
                            &task,
                            launch,
                            ReportEvent::LaunchFailed {
                                reason: "the agent stopped while starting it, before the \
                                         process started"
                                    .into(),
                            },
                        );
                        continue;
                    }
                },
            };
            match found {
                Adoption::Running(process) => {
                    tracing::info!(task = %task, launch, pid = process.pid(), "took back a task that kept running while the agent was down");
                    if let Some(l) = self.checkpoint.state.tasks.get_mut(&task) {
                        l.pid = Some(process.pid());
                        l.start_time = process.start_time();
                    }
                    let process = process.in_group(&self.enforcement);
                    self.watch(task.clone(), launch, process);
                    // The supervisor may have marked it UNREACHABLE meanwhile.
                    self.report(&task, launch, ReportEvent::Started);
                }
                Adoption::Ended(code) => {
                    let code = code.unwrap_or_else(|| {
                        tracing::warn!(task = %task, launch, "a task ended while the agent was down without leaving its exit code (killed by SIGKILL?); reporting {UNKNOWN_EXIT}");
                        UNKNOWN_EXIT
                    });
                    tracing::info!(task = %task, launch, code, "a task ended while the agent was down");
                    self.on_exit(Exit {
                        task,
                        launch,
                        code,
                        killed: false,
                    });
                }
            }
        }
    }

    async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
        mut exit_rx: mpsc::UnboundedReceiver<Exit>,
    ) -> Result<()> {
        tokio::pin!(shutdown);
        // Listening before registering: once the agent is visible, `dprim
        // task logs` can reach it. Dropped (stopped) when `run` returns.
        let _logs = super::logs::LogServer::start(
            self.backend.clone(),
            &self.config.id,
            self.config.work_dir.clone(),
        )
        .await;
        self.adopt_all();
        let mut session = self.register().await?;
        loop {
            if session.check().is_err() {
                tracing::warn!(agent = %self.config.id, "agent session lost; registering again");
                match self.register().await {
                    Ok(s) => {
                        session = s;
                        // Tell the supervisor which tasks still run here: it
                        // marked them UNREACHABLE while the agent was gone.
                        let alive: Vec<(String, u32)> = self
                            .running
                            .iter()
                            .map(|(t, r)| (t.clone(), r.launch))
                            .collect();
                        for (task, launch) in alive {
                            self.report(&task, launch, ReportEvent::Started);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "re-registration failed"),
                }
            }
            if let Err(e) = self.poll().await {
                tracing::warn!(error = %e, "agent poll failed");
            }
            self.sweep_sandboxes_when_due();
            while let Ok(exit) = exit_rx.try_recv() {
                self.on_exit(exit);
            }
            self.flush().await;
            tokio::select! {
                _ = &mut shutdown => break,
                Some(exit) = exit_rx.recv() => {
                    self.on_exit(exit);
                    self.flush().await;
                }
                change = self.orders.next() => {
                    self.orders.absorb_ready(&self.config.id, Some(change));
                }
                _ = tokio::time::sleep(self.config.interval) => {}
            }
        }
        // Leaving: kill every task, and report how they ended while the
        // backend can still be told. Nobody asked for these kills, so they
        // are reported as the exits they are (143 after SIGTERM), not as
        // kills on request.
        let mut stopped = HashSet::new();
        for (task, r) in self.running.iter_mut() {
            if let Some(kill) = r.kill.take() {
                let _ = kill.send(SHUTDOWN_GRACE);
                stopped.insert(task.clone());
            }
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE + Duration::from_secs(2);
        while !self.running.is_empty() {
            match tokio::time::timeout_at(deadline, exit_rx.recv()).await {
                Ok(Some(mut exit)) => {
                    if stopped.contains(&exit.task) {
                        exit.killed = false;
                    }
                    self.on_exit(exit);
                }
                _ => break,
            }
        }
        // Whatever cannot be written now stays in the checkpoint for the
        // next start.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.flush()).await;
        if self.unsaved_deliveries {
            self.save();
        }
        let _ = session.close().await;
        Ok(())
    }

    /// Reads the task's record to decide whether assignment `a` is still
    /// what the supervisor wants.
    async fn verdict(&self, task: &str, a: &Assignment) -> Result<Verdict> {
        let Some((rec, _)) =
            store::get::<StatusRecord>(&self.backend, &store::status_key(task)?).await?
        else {
            return Ok(Verdict::Decline("the task has no record".into()));
        };
        let r = &rec.record;
        if r.launches > a.launch {
            return Ok(Verdict::Decline(format!(
                "the task is at launch {} already",
                r.launches
            )));
        }
        if r.launches < a.launch || r.state == TaskState::Staging {
            return Ok(Verdict::Later);
        }
        if r.agent.as_deref() != Some(self.config.id.as_str()) {
            return Ok(Verdict::Decline(format!(
                "the record places it on agent {}",
                r.agent.as_deref().unwrap_or("(none)")
            )));
        }
        // UNREACHABLE with no report of this launch applied: this agent's
        // session ended (a pause, an overloaded host) after the launch was
        // assigned and before it started. The launch is still this agent's
        // until the supervisor declares it GONE, and its start report
        // brings the record back (RUNNING). Declining it would leave the
        // task to go GONE although its agent came back in time.
        let assigned_before_a_blip = r.state == TaskState::Unreachable && rec.report_seq == 0;
        if r.state != TaskState::Starting && !assigned_before_a_blip {
            return Ok(Verdict::Decline(format!(
                "the record says {:?}, not STARTING",
                r.state
            )));
        }
        Ok(Verdict::Start)
    }

    /// Whether the task's record still asks to kill `launch` here.
    async fn kill_backed(&self, task: &str, launch: u32) -> Result<bool> {
        let rec = store::get::<StatusRecord>(&self.backend, &store::status_key(task)?).await?;
        Ok(rec.is_some_and(|(rec, _)| {
            let r = &rec.record;
            r.kill_requested
                && r.launches == launch
                && !r.state.is_terminal()
                && r.agent.as_deref() == Some(self.config.id.as_str())
        }))
    }

    /// Starts one launch: recorded in the checkpoint before the process
    /// exists, and with its pid once it does.
    fn start(&mut self, task: &str, a: &Assignment) {
        let sandbox = self.config.work_dir.join(task).join(a.launch.to_string());
        self.checkpoint.state.tasks.insert(
            task.to_string(),
            Launched {
                launch: a.launch,
                pid: None,
                start_time: None,
                sandbox: sandbox.clone(),
            },
        );
        let started = off_the_runtime(|| match self.checkpoint.save() {
            // Without the record a crash could start it twice.
            Err(e) => Err(e),
            Ok(()) => TaskProcess::spawn(&a.spec, &sandbox, &self.enforcement),
        });
        match started {
            Ok(process) => {
                if let Some(l) = self.checkpoint.state.tasks.get_mut(task) {
                    l.pid = Some(process.pid());
                    l.start_time = process.start_time();
                }
                self.watch(task.to_string(), a.launch, process);
                // Saves the pid together with the report.
                self.report(task, a.launch, ReportEvent::Started);
            }
            Err(e) => {
                self.checkpoint.state.tasks.remove(task);
                // Not retried for this launch; the supervisor decides.
                self.checkpoint
                    .state
                    .done
                    .insert((task.to_string(), a.launch));
                self.report(
                    task,
                    a.launch,
                    ReportEvent::LaunchFailed {
                        reason: e.message().to_string(),
                    },
                );
            }
        }
    }

    async fn poll(&mut self) -> Result<()> {
        let me = self.config.id.clone();
        self.orders.absorb_ready(&me, None);
        self.orders.follow(&self.backend, &me).await?;
        let assignments = self.orders.assignments.clone();
        let kills = self.orders.kills.clone();
        // Report versions are only worth remembering while a launch can
        // still report; the outbox keeps anything not yet written.
        let outbox: HashSet<&str> = self
            .checkpoint
            .state
            .outbox
            .iter()
            .map(|o| o.task.as_str())
            .collect();
        let running = &self.running;
        self.written.retain(|key, _| {
            let task = key.as_str().rsplit('/').nth(1).unwrap_or_default();
            assignments.contains_key(task) || running.contains_key(task) || outbox.contains(task)
        });
        let mut changed = false;
        let newest = assignments
            .values()
            .map(|(a, _)| a.term)
            .chain(kills.values().map(|(k, _)| k.term))
            .max()
            .unwrap_or(0);
        if newest > self.checkpoint.state.term {
            self.checkpoint.state.term = newest;
            changed = true;
        }
        // A launch no longer assigned here is never assigned again (a new
        // launch has a new number): forget it.
        let before = self.checkpoint.state.done.len();
        self.checkpoint.state.done.retain(|(task, launch)| {
            assignments
                .get(task)
                .is_some_and(|(a, _)| a.launch == *launch)
        });
        changed |= self.checkpoint.state.done.len() != before;
        if changed {
            self.save();
        }
        let term = self.checkpoint.state.term;
        for (task, (a, _)) in &assignments {
            if self.running.contains_key(task)
                || self
                    .checkpoint
                    .state
                    .done
                    .contains(&(task.clone(), a.launch))
            {
                continue;
            }
            let stale = a.term != 0 && a.term < term;
            match self.verdict(task, a).await {
                Ok(Verdict::Start) => {
                    if stale {
                        tracing::info!(task = %task, launch = a.launch, order_term = a.term, term, "starting an assignment of an older supervisor term: the task's record still calls for it");
                    }
                    self.start(task, a);
                }
                Ok(Verdict::Later) => {}
                Ok(Verdict::Decline(why)) => {
                    if stale {
                        tracing::warn!(task = %task, launch = a.launch, order_term = a.term, term, "ignoring an assignment of an older supervisor term: {why}");
                    } else {
                        tracing::warn!(task = %task, launch = a.launch, "not starting an assignment the supervisor has moved on from: {why}");
                    }
                    self.checkpoint.state.done.insert((task.clone(), a.launch));
                    self.save();
                }
                Err(e) => {
                    tracing::warn!(task = %task, error = %e, "cannot read the task's record; trying again");
                }
            }
        }
        // A task running here that is no longer assigned here (the
        // supervisor declared it GONE and replaced it while this agent was
        // unreachable) must not keep running beside its replacement.
        for (task, r) in self.running.iter_mut() {
            let assigned = assignments
                .get(task)
                .is_some_and(|(a, _)| a.launch == r.launch);
            if !assigned && !r.kill_sent {
                tracing::warn!(task = %task, "killing a task that was replaced while this agent was away");
                if let Some(kill) = r.kill.take() {
                    let _ = kill.send(Duration::ZERO);
                }
                r.kill_sent = true;
            }
        }
        for (task, (order, _)) in kills {
            let Some(launch) = self
                .running
                .get(&task)
                .filter(|r| !r.kill_sent)
                .map(|r| r.launch)
            else {
                continue;
            };
            if order.term != 0 && order.term < term {
                if self.declined_kills.contains(&(task.clone(), order.term)) {
                    continue;
                }
                match self.kill_backed(&task, launch).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(task = %task, order_term = order.term, term, "ignoring a kill order of an older supervisor term: the task's record does not ask for it");
                        self.declined_kills.insert((task, order.term));
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(task = %task, error = %e, "cannot read the task's record; trying again");
                        continue;
                    }
                }
            }
            if let Some(r) = self.running.get_mut(&task) {
                if let Some(kill) = r.kill.take() {
                    let _ = kill.send(Duration::from_millis(order.grace_ms));
                }
                r.kill_sent = true;
            }
        }
        Ok(())
    }
}

impl Runner {
    /// The sandboxes in the work dir of launches this agent neither runs
    /// nor is starting.
    fn ended_sandboxes(&self) -> Vec<PathBuf> {
        let live: HashSet<PathBuf> = self
            .checkpoint
            .state
            .tasks
            .values()
            .map(|l| l.sandbox.clone())
            .collect();
        sandboxes_except(&self.config.work_dir, &live)
    }

    /// Removes the control groups of the `ended` launches that are still
    /// there (see [`Cgroups::sweep`]).
    fn sweep_cgroups(&self, ended: &[PathBuf]) {
        if let Enforcement::Cgroup { cgroups } = &self.enforcement {
            let names: HashSet<String> = ended.iter().map(|s| process::cgroup_name(s)).collect();
            cgroups.sweep(&names);
        }
    }

    /// Deletes the sandboxes of launches that ended more than the sandbox
    /// retention ago (and control groups the kernel was still releasing
    /// when their task ended), at most every [`SANDBOX_SWEEP`] (sooner for
    /// a short retention).
    fn sweep_sandboxes_when_due(&mut self) {
        let every =
            (self.config.sandbox_retention / 2).clamp(Duration::from_millis(100), SANDBOX_SWEEP);
        if self.swept_at.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        self.swept_at = Some(tokio::time::Instant::now());
        let Some(before) = SystemTime::now().checked_sub(self.config.sandbox_retention) else {
            return;
        };
        // A walk over every sandbox: off the async workers as well.
        let removed = off_the_runtime(|| {
            let ended = self.ended_sandboxes();
            self.sweep_cgroups(&ended);
            sweep_sandboxes(&ended, before)
        });
        if removed > 0 {
            tracing::info!(removed, "deleted the sandboxes of launches that ended longer than the sandbox retention ago");
        }
    }
}

/// Deletes each of the `ended` sandboxes whose newest change (the
/// directory or a file in it: output, exit code) is older than `before`,
/// and task directories left empty. Returns how many sandboxes went.
fn sweep_sandboxes(ended: &[PathBuf], before: SystemTime) -> usize {
    let mut removed = 0;
    for sandbox in ended {
        if newest_change(sandbox).is_some_and(|at| at < before) {
            match std::fs::remove_dir_all(sandbox) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(sandbox = %sandbox.display(), error = %e, "cannot delete an old sandbox")
                }
            }
            // Only succeeds once the task's last sandbox is gone.
            if let Some(task) = sandbox.parent() {
                let _ = std::fs::remove_dir(task);
            }
        }
    }
    removed
}

/// Every sandbox (`<work_dir>/<task>/<launch>`) in the work dir that is
/// not in `live`. Anything else in the work dir is not a sandbox.
fn sandboxes_except(work_dir: &Path, live: &HashSet<PathBuf>) -> Vec<PathBuf> {
    let mut ended = Vec::new();
    let Ok(tasks) = std::fs::read_dir(work_dir) else {
        return ended;
    };
    for task in tasks.flatten() {
        if !task.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(launches) = std::fs::read_dir(task.path()) else {
            continue;
        };
        for launch in launches.flatten() {
            let sandbox = launch.path();
            let is_launch = launch
                .file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok());
            if is_launch && launch.file_type().is_ok_and(|t| t.is_dir()) && !live.contains(&sandbox)
            {
                ended.push(sandbox);
            }
        }
    }
    ended
}

/// When a sandbox last changed: its own modification time or any of its
/// files', whichever is newest.
fn newest_change(sandbox: &Path) -> Option<SystemTime> {
    let mut newest = std::fs::metadata(sandbox).ok()?.modified().ok()?;
    if let Ok(entries) = std::fs::read_dir(sandbox) {
        for e in entries.flatten() {
            if let Ok(at) = e.metadata().and_then(|m| m.modified()) {
                newest = newest.max(at);
            }
        }
    }
    Some(newest)
}

/// Runs blocking work (a checkpoint's `fdatasync`, a sandbox and a process
/// start) without holding up the rest of the runtime: on a multi-threaded
/// runtime the worker's other tasks move to another thread meanwhile.
/// Without this, an agent busy starting tasks (or a process running many
/// agents) queued its session's renewals behind thousands of such calls,
/// and sessions expired under load.
fn off_the_runtime<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// The process group id the sandbox's `pid` file holds, if any.
fn read_pid_file(sandbox: &Path) -> Option<i32> {
    std::fs::read_to_string(sandbox.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::tasks::state::TaskRecord;
    use dprim::tasks::{RestartPolicy, TaskSpec};
    use dprim::{BackendConfig, Key, WatchEvent, WatchStart, WatchTarget};
    use dprim_memory::MemoryServer;

    fn work(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dprim-agent-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn memory() -> Backend {
        MemoryServer::new()
            .connect(&BackendConfig::memory())
            .unwrap()
    }

    fn runner(backend: &Backend, work_dir: &Path) -> (Runner, mpsc::UnboundedReceiver<Exit>) {
        let config = AgentConfig {
            id: "a1".into(),
            resources: Resources::default(),
            attributes: BTreeMap::new(),
            work_dir: work_dir.to_path_buf(),
            session_ttl: Duration::from_secs(1),
            interval: Duration::from_millis(30),
            sandbox_retention: DEFAULT_SANDBOX_RETENTION,
        };
        let owner = Owner {
            pid: std::process::id() as i32,
            start_time: None,
        };
        let checkpoint = Checkpoint::open(work_dir, "a1", owner).unwrap();
        let (exits, rx) = mpsc::unbounded_channel();
        let runner = Runner {
            backend: backend.clone(),
            enforcement: Enforcement::None,
            config,
            checkpoint,
            running: HashMap::new(),
            exits,
            declined_kills: HashSet::new(),
            orders: Orders::default(),
            written: HashMap::new(),
            unsaved_deliveries: false,
            swept_at: None,
        };
        (runner, rx)
    }

    #[tokio::test]
    async fn a_sweep_removes_only_the_control_groups_of_this_agents_ended_launches() {
        let Some(cgroups) = crate::tasks::cgroup::usable_here("sweep-") else {
            return;
        };
        let b = memory();
        let dir = work("cgroup-sweep");
        let (mut r, _exits) = runner(&b, &dir);
        r.enforcement = Enforcement::Cgroup {
            cgroups: cgroups.clone(),
        };
        // A launch of this agent that ended: its sandbox is here.
        std::fs::create_dir_all(dir.join("t-mine").join("1")).unwrap();
        let mine = cgroups.create("t-mine-1", &Resources::default()).unwrap();
        // A launch another agent of the same id (another work dir) has
        // just made a group for; its wrapper has not joined it yet.
        let theirs = cgroups.create("t-theirs-1", &Resources::default()).unwrap();

        r.sweep_cgroups(&r.ended_sandboxes());
        assert!(mine.procs_files().iter().all(|p| !p.exists()), "removed");
        assert!(
            theirs.procs_files().iter().all(|p| p.exists()),
            "another agent's group is left alone"
        );
        theirs.remove();
        drop(r);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_sweep_deletes_old_ended_sandboxes_and_keeps_the_rest() {
        let dir = std::env::temp_dir().join(format!("dprim-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sandbox = |task: &str, launch: &str| {
            let d = dir.join(task).join(launch);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("stdout"), "out").unwrap();
            std::fs::write(d.join(process::EXIT_FILE), "0\n").unwrap();
            d
        };
        let ended = sandbox("t-ended", "1");
        let relaunched_old = sandbox("t-relaunched", "1");
        let running = sandbox("t-relaunched", "2");
        let not_a_launch = dir.join("t-other").join("notes");
        std::fs::create_dir_all(&not_a_launch).unwrap();
        std::fs::write(dir.join("agent.checkpoint.0"), "x").unwrap();
        let keep = HashSet::from([running.clone()]);

        // Nothing has ended long enough ago.
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        assert_eq!(
            sweep_sandboxes(&sandboxes_except(&dir, &keep), an_hour_ago),
            0
        );
        assert!(ended.exists() && relaunched_old.exists());

        // Everything not kept has, now.
        let later = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(sweep_sandboxes(&sandboxes_except(&dir, &keep), later), 2);
        assert!(!ended.exists() && !dir.join("t-ended").exists());
        assert!(!relaunched_old.exists());
        assert!(running.join("stdout").exists(), "a kept sandbox stays");
        assert!(
            not_a_launch.exists(),
            "only launch directories are sandboxes"
        );
        assert!(dir.join("agent.checkpoint.0").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn sleeper() -> TaskSpec {
        TaskSpec {
            command: "sleep".into(),
            args: vec!["30".into()],
            ..TaskSpec::default()
        }
    }

    /// Writes the task's record as a supervisor of `term` would.
    async fn record(
        b: &Backend,
        task: &str,
        launch: u32,
        state: TaskState,
        agent: &str,
        term: u64,
        kill_requested: bool,
    ) {
        let mut r = TaskRecord::new(RestartPolicy::Never, SystemTime::now());
        r.state = state;
        r.agent = Some(agent.into());
        r.launches = launch;
        r.kill_requested = kill_requested;
        let rec = StatusRecord {
            id: task.into(),
            record: r,
            report_seq: 0,
            term,
            unreachable_since: None,
            relaunch_at: None,
        };
        store::put(b, &store::status_key(task).unwrap(), &rec)
            .await
            .unwrap();
    }

    async fn assign(b: &Backend, task: &str, launch: u32, term: u64) {
        let a = Assignment {
            spec: sleeper(),
            launch,
            term,
        };
        store::put(b, &store::assign_key("a1", task).unwrap(), &a)
            .await
            .unwrap();
    }

    async fn order_kill(b: &Backend, task: &str, term: u64) {
        let order = KillOrder { grace_ms: 0, term };
        store::put(b, &store::kill_key("a1", task).unwrap(), &order)
            .await
            .unwrap();
    }

    async fn next_exit(rx: &mut mpsc::UnboundedReceiver<Exit>) -> Exit {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the task ended")
            .expect("the channel is open")
    }

    #[tokio::test]
    async fn orders_are_fenced_by_term_and_by_the_record() {
        let b = memory();
        let dir = work("fencing");
        let (mut r, mut exits) = runner(&b, &dir);
        // x: current (term 5) and backed by its record: started.
        record(&b, "x", 1, TaskState::Starting, "a1", 5, false).await;
        assign(&b, "x", 1, 5).await;
        // y: an older term's assignment for launch 1, but the record is at
        // launch 2: the supervisor moved on, never started.
        record(&b, "y", 2, TaskState::Starting, "a1", 5, false).await;
        assign(&b, "y", 1, 3).await;
        // z: an older term's assignment the record still backs (a new
        // supervisor keeps its predecessor's orders): started.
        record(&b, "z", 1, TaskState::Starting, "a1", 3, false).await;
        assign(&b, "z", 1, 3).await;
        // w: current term, but the record already says RUNNING (someone
        // started it before): not started again.
        record(&b, "w", 1, TaskState::Running, "a1", 5, false).await;
        assign(&b, "w", 1, 5).await;
        // v: the record has not caught up with the assignment yet.
        record(&b, "v", 1, TaskState::Staging, "a1", 5, false).await;
        assign(&b, "v", 1, 5).await;

        r.poll().await.unwrap();
        let mut running: Vec<&String> = r.running.keys().collect();
        running.sort();
        assert_eq!(running, ["x", "z"]);
        assert!(!dir.join("y").exists() && !dir.join("w").exists());
        let done = &r.checkpoint.state.done;
        assert!(done.contains(&("y".into(), 1)) && done.contains(&("w".into(), 1)));
        assert!(!done.contains(&("v".into(), 1)), "looked at again later");
        assert_eq!(r.checkpoint.state.term, 5);
        // The newest term survives a restart.
        let again = Checkpoint::open(
            &dir,
            "a1",
            Owner {
                pid: std::process::id() as i32,
                start_time: None,
            },
        )
        .unwrap();
        assert_eq!(again.state.term, 5);
        assert_eq!(again.state.tasks.len(), 2);

        // v's record catches up: started at the next poll.
        record(&b, "v", 1, TaskState::Starting, "a1", 5, false).await;
        r.poll().await.unwrap();
        assert!(r.running.contains_key("v"));

        // A kill order of term 3 the record does not back: ignored.
        order_kill(&b, "x", 3).await;
        r.poll().await.unwrap();
        r.poll().await.unwrap();
        assert!(!r.running["x"].kill_sent);
        assert!(r.declined_kills.contains(&("x".into(), 3)));
        // The current supervisor's kill order is carried out.
        record(&b, "x", 1, TaskState::Running, "a1", 5, true).await;
        order_kill(&b, "x", 5).await;
        r.poll().await.unwrap();
        let exit = next_exit(&mut exits).await;
        assert_eq!((exit.task.as_str(), exit.killed), ("x", true));
        r.on_exit(exit);
        assert_eq!(
            r.checkpoint.state.outbox.back().map(|o| &o.report.event),
            Some(&ReportEvent::KilledByRequest)
        );

        for t in ["z", "v"] {
            if let Some(kill) = r.running.get_mut(t).and_then(|r| r.kill.take()) {
                let _ = kill.send(Duration::ZERO);
            }
        }
        next_exit(&mut exits).await;
        next_exit(&mut exits).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_launch_assigned_before_the_agent_lost_its_session_still_starts() {
        let b = memory();
        let dir = work("blip");
        let (mut r, mut exits) = runner(&b, &dir);
        // u: assigned, then the agent's session ended before it started it;
        // the supervisor marked it UNREACHABLE, no report of it applied.
        record(&b, "u", 1, TaskState::Unreachable, "a1", 5, false).await;
        assign(&b, "u", 1, 5).await;
        // s: UNREACHABLE after a report of this launch was applied: it was
        // started before (this agent just does not know it any more).
        let key = store::status_key("s").unwrap();
        record(&b, "s", 1, TaskState::Unreachable, "a1", 5, false).await;
        let (mut reported, _) = store::get::<StatusRecord>(&b, &key).await.unwrap().unwrap();
        reported.report_seq = 7;
        store::put(&b, &key, &reported).await.unwrap();
        assign(&b, "s", 1, 5).await;

        r.poll().await.unwrap();
        assert!(r.running.contains_key("u"), "started");
        assert!(!r.running.contains_key("s"), "never started twice");
        assert!(r.checkpoint.state.done.contains(&("s".into(), 1)));
        assert_eq!(
            r.checkpoint
                .state
                .outbox
                .back()
                .map(|o| (o.task.as_str(), &o.report.event)),
            Some(("u", &ReportEvent::Started))
        );
        if let Some(kill) = r.running.get_mut("u").and_then(|r| r.kill.take()) {
            let _ = kill.send(Duration::ZERO);
        }
        next_exit(&mut exits).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn reports_are_kept_until_written_and_never_move_a_key_back() {
        let b = memory();
        let dir = work("outbox");
        let (mut r, _exits) = runner(&b, &dir);
        let key = store::report_key("t", 1).unwrap();
        let mut changes = b
            .kv()
            .watch(WatchTarget::Key(key.clone()), WatchStart::Now)
            .await
            .unwrap();
        r.report("t", 1, ReportEvent::Started);
        r.report("t", 1, ReportEvent::Exited { code: 3 });
        // Both are in the checkpoint before any write was tried.
        let saved: serde_json::Value = read_checkpoint(&dir).unwrap();
        assert_eq!(saved["outbox"].as_array().unwrap().len(), 2);
        let first = r.checkpoint.state.outbox[0].clone();

        r.flush().await;
        assert!(r.checkpoint.state.outbox.is_empty());
        // Delivered reports leave the file with the next save.
        assert!(r.unsaved_deliveries);
        r.save();
        let saved: serde_json::Value = read_checkpoint(&dir).unwrap();
        assert_eq!(saved["outbox"].as_array().unwrap().len(), 0);
        let mut seen = Vec::new();
        for _ in 0..2 {
            match changes.next().await {
                Some(Ok(WatchEvent::Put(e))) => {
                    seen.push(store::decode::<Report>(&e.key, &e.value).unwrap().event)
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            seen,
            [ReportEvent::Started, ReportEvent::Exited { code: 3 }]
        );

        // Delivered again (a crash before the outbox was saved): the key
        // keeps the later report.
        let before = b.kv().get(&key).await.unwrap().unwrap();
        r.checkpoint.state.outbox.push_back(first);
        r.flush().await;
        assert!(r.checkpoint.state.outbox.is_empty());
        assert_eq!(b.kv().get(&key).await.unwrap().unwrap(), before);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_crash_while_starting_is_noticed_on_restart() {
        let b = memory();
        let dir = work("mid-start");
        let (mut r, mut exits) = runner(&b, &dir);
        // "never": recorded, but the agent died before the process started.
        // "started": recorded, started, but the agent died before it
        // recorded the pid; the sandbox's pid file tells.
        let started = dir.join("started").join("1");
        let process = TaskProcess::spawn(&sleeper(), &started, &Enforcement::None).unwrap();
        drop(process);
        for (task, sandbox) in [("never", dir.join("never").join("1")), ("started", started)] {
            r.checkpoint.state.tasks.insert(
                task.into(),
                Launched {
                    launch: 1,
                    pid: None,
                    start_time: None,
                    sandbox,
                },
            );
        }
        r.adopt_all();
        assert!(r.running.contains_key("started"));
        assert!(r.checkpoint.state.tasks["started"].pid.is_some());
        assert!(!r.checkpoint.state.tasks.contains_key("never"));
        let events: Vec<(&str, &ReportEvent)> = r
            .checkpoint
            .state
            .outbox
            .iter()
            .map(|o| (o.task.as_str(), &o.report.event))
            .collect();
        assert!(matches!(
            events.as_slice(),
            [
                ("never", ReportEvent::LaunchFailed { .. }),
                ("started", ReportEvent::Started)
            ]
        ));
        if let Some(kill) = r.running.get_mut("started").and_then(|r| r.kill.take()) {
            let _ = kill.send(Duration::ZERO);
        }
        // SIGTERM, or SIGKILL if it had not ended at once.
        let code = next_exit(&mut exits).await.code;
        assert!(code == 128 + 15 || code == 128 + 9, "{code}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_taken_back_task_that_was_replaced_meanwhile_is_killed() {
        let b = memory();
        let dir = work("replaced");
        let (mut r, mut exits) = runner(&b, &dir);
        let sandbox = dir.join("t").join("1");
        let process = TaskProcess::spawn(&sleeper(), &sandbox, &Enforcement::None).unwrap();
        r.checkpoint.state.tasks.insert(
            "t".into(),
            Launched {
                launch: 1,
                pid: Some(process.pid()),
                start_time: process.start_time(),
                sandbox,
            },
        );
        // The agent that started it is gone.
        drop(process);
        r.adopt_all();
        assert!(r.running.contains_key("t"));
        // While it was away the task was declared GONE and relaunched as
        // launch 2 elsewhere: no assignment of launch 1 here any more.
        record(&b, "t", 2, TaskState::Starting, "a2", 5, false).await;
        r.poll().await.unwrap();
        assert!(r.running["t"].kill_sent);
        let exit = next_exit(&mut exits).await;
        assert_eq!(
            (exit.task.as_str(), exit.launch, exit.killed),
            ("t", 1, true)
        );
        r.on_exit(exit);
        assert!(r.checkpoint.state.tasks.is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn report_keys_name_task_and_launch() {
        // The outbox relies on one key per launch.
        assert_eq!(
            store::report_key("t", 2).unwrap(),
            Key::new("_dprim/tasks/report/t/2").unwrap()
        );
    }
}
