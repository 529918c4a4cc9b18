//! The supervisor: several may run, one is elected (dprim Election). The
//! leader turns specs, agent registrations and agent reports into state
//! machine events, places staging tasks, and notices lost agents. It is the
//! only writer of task records; each write is a compare-and-swap on the
//! record's version, so a deposed leader's stale write fails instead of
//! overwriting its successor's, and each record, assignment and kill order
//! carries the leader's election term, its fencing token.
//!
//! A leader reads everything once (one listing per directory) and then
//! keeps that picture current from a watch started at the listings'
//! revision: a pass only looks at the tasks an event touched (plus, every
//! `interval`, the tasks waiting on a timer), and the record writes of a
//! pass go out concurrently. Its own writes come back through the watch
//! with a version it already holds and wake nothing, so a pass costs what
//! changed, not what exists.

use super::placement::{AgentView, Placer};
use super::state::{step, TaskAction, TaskEvent, TaskRecord};
use super::store::{
    self, set, AgentInfo, Assignment, KillOrder, Report, ReportEvent, StatusRecord,
};
use dprim::tasks::{Resources, TaskSpec, TaskState};
use dprim::{
    Backend, Depth, ErrorKind, Key, KvExt, Precondition, Result, Txn, Value, Version, WatchEvent,
    WatchStart, WatchStream, WatchTarget,
};
use futures::{FutureExt, StreamExt};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How many record writes (each followed by its orders) a pass keeps in
/// flight.
const WRITES_IN_FLIGHT: usize = 64;

/// How many tasks past their retention one pass forgets, so a backlog
/// (a new leader finding a day of finished tasks) is cleared over several
/// passes instead of holding one up.
const FORGET_PER_PASS: usize = 256;

/// How long a task done for good keeps its records by default.
pub const DEFAULT_TASK_RETENTION: Duration = Duration::from_secs(3600);

/// First pause before a supervisor that lost its leadership tries to open a
/// session or campaign again after a failure; it doubles up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest pause between such tries.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Waits `backoff` and doubles it (up to [`RETRY_MAX`]) for the next time;
/// `false` if `shutdown` came first.
async fn back_off<F: std::future::Future + Unpin>(
    shutdown: &mut F,
    backoff: &mut Duration,
) -> bool {
    let waited = tokio::select! {
        _ = shutdown => false,
        _ = tokio::time::sleep(*backoff) => true,
    };
    *backoff = (*backoff * 2).min(RETRY_MAX);
    waited
}

/// Supervisor settings.
#[derive(Clone)]
pub struct SupervisorConfig {
    /// Name in the election (shown as the leader's value).
    pub name: String,
    /// TTL of the supervisor's session.
    pub session_ttl: Duration,
    /// How long a task stays UNREACHABLE before it is declared GONE.
    pub gone_timeout: Duration,
    /// How often the leader looks at the tasks waiting on a timer (gone
    /// timeouts, relaunch backoff, pending placement) when nothing wakes it.
    pub interval: Duration,
    /// How long a task done for good (FINISHED, FAILED, KILLED, GONE or
    /// DROPPED with no relaunch due) keeps its records; then the leader
    /// deletes them and the task is unknown. Without this every task ever
    /// launched would stay in the backend and in the leader's memory.
    pub task_retention: Duration,
    /// Chooses agents for tasks.
    pub placer: Arc<dyn Placer>,
}

/// One supervisor instance.
pub struct Supervisor {
    backend: Backend,
    config: SupervisorConfig,
}

/// What a key under `_dprim/` is, for the leader's picture.
enum Item {
    Spec(String),
    Status(String),
    Report(String, u32),
    KillRequest(String),
    Agent(String),
    Other,
}

fn classify(key: &Key) -> Item {
    let parts: Vec<&str> = key.as_str().split('/').collect();
    match parts.as_slice() {
        ["_dprim", "agents", agent] => Item::Agent(agent.to_string()),
        ["_dprim", "tasks", "spec", task] => Item::Spec(task.to_string()),
        ["_dprim", "tasks", "status", task] => Item::Status(task.to_string()),
        ["_dprim", "tasks", "report", task, launch] => match launch.parse() {
            Ok(launch) => Item::Report(task.to_string(), launch),
            Err(_) => Item::Other,
        },
        ["_dprim", "tasks", "kill-request", task] => Item::KillRequest(task.to_string()),
        _ => Item::Other,
    }
}

/// The leader's picture of every task and agent, and which tasks a pass
/// must look at.
#[derive(Default)]
struct World {
    specs: BTreeMap<String, TaskSpec>,
    statuses: BTreeMap<String, (StatusRecord, Version)>,
    reports: BTreeMap<(String, u32), Report>,
    kill_requests: BTreeMap<String, KillOrder>,
    agents: BTreeMap<String, AgentInfo>,
    /// The newest version applied per key: a listing and the watch that
    /// follows it overlap, and an older change must not undo a newer one.
    seen: HashMap<Key, Version>,
    /// Tasks the next pass looks at.
    dirty: BTreeSet<String>,
    /// Tasks not yet done for good: a spec without a record, or a record
    /// that is not terminal or has a relaunch due. Whatever a pass does
    /// for every task (resources in use, timers, an agent coming or going)
    /// looks only at these, so a pass costs what is live, not every task
    /// ever launched.
    live: BTreeSet<String>,
    /// Tasks done for good, by when they ended: the next to forget first.
    ended: BTreeSet<(SystemTime, String)>,
    /// Reports of tasks that have neither spec nor record, by when their
    /// agent made them (when first seen so, for reports that do not say):
    /// an agent that was away for longer than a task's retention reports on
    /// a task forgotten meanwhile. Deleted after the retention too (a report
    /// that only arrived before its task's spec and record has them long
    /// before then: the record is written before the task is assigned).
    orphans: BTreeMap<(String, u32), SystemTime>,
    /// When each task in `ended` ended (to find its entry there).
    ended_at: HashMap<String, SystemTime>,
    /// What each task placed on an agent (STARTING, RUNNING or
    /// UNREACHABLE) counts against it, and the sums per agent: kept up to
    /// date with every change, so placement does not add up every live
    /// task on every pass.
    placed: HashMap<String, (String, Resources)>,
    used: HashMap<String, Used>,
    /// The newest revision the leader's listings read at. A delete newer
    /// than this cannot be followed by an older change of the same key
    /// (the watch is past the listings' overlap), so the key's entry in
    /// `seen` can go with it.
    listed_up_to: Option<Version>,
    /// Orders whose record was written but which could not be sent; the
    /// next pass sends them if the record still calls for them.
    unsent: BTreeMap<String, Vec<TaskAction>>,
}

impl World {
    /// Applies one change (a listed entry, a put or a delete), unless the
    /// picture already holds a newer version of the key.
    fn apply(&mut self, key: &Key, value: Option<&Value>, version: Version) {
        let item = classify(key);
        if matches!(item, Item::Other) {
            return;
        }
        if self.seen.get(key).is_some_and(|v| *v >= version) {
            return;
        }
        if value.is_none() && self.listed_up_to.is_none_or(|l| version > l) {
            self.seen.remove(key);
        } else {
            self.seen.insert(key.clone(), version);
        }
        fn decoded<T: serde::de::DeserializeOwned>(key: &Key, value: Option<&Value>) -> Option<T> {
            let value = value?;
            match store::decode(key, value) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring an unreadable task record");
                    None
                }
            }
        }
        match item {
            Item::Spec(task) => {
                set(&mut self.specs, task.clone(), decoded(key, value));
                self.reindex(&task);
                self.dirty.insert(task);
            }
            Item::Status(task) => {
                let rec = decoded(key, value).map(|rec| (rec, version));
                set(&mut self.statuses, task.clone(), rec);
                self.reindex(&task);
                self.dirty.insert(task);
            }
            Item::Report(task, launch) => {
                set(
                    &mut self.reports,
                    (task.clone(), launch),
                    decoded(key, value),
                );
                let unknown = !self.specs.contains_key(&task) && !self.statuses.contains_key(&task);
                if value.is_some() && unknown {
                    let since = orphan_since(self.reports.get(&(task.clone(), launch)));
                    self.orphans.entry((task.clone(), launch)).or_insert(since);
                } else {
                    self.orphans.remove(&(task.clone(), launch));
                }
                self.dirty.insert(task);
            }
            Item::KillRequest(task) => {
                set(&mut self.kill_requests, task.clone(), decoded(key, value));
                self.dirty.insert(task);
            }
            Item::Agent(agent) => {
                set(&mut self.agents, agent.clone(), decoded(key, value));
                // Its tasks may be lost or back; waiting tasks may fit now.
                for id in &self.live {
                    let Some((s, _)) = self.statuses.get(id) else {
                        continue;
                    };
                    let on_agent = s.record.agent.as_deref() == Some(agent.as_str());
                    if on_agent || s.record.state == TaskState::Staging {
                        self.dirty.insert(id.clone());
                    }
                }
            }
            Item::Other => {}
        }
    }

    /// Applies a watch event; false for a resync (the picture must be read
    /// again).
    fn absorb(&mut self, event: WatchEvent) -> bool {
        match event {
            WatchEvent::Put(e) => self.apply(&e.key, Some(&e.value), e.version),
            WatchEvent::Delete { key, version } => self.apply(&key, None, version),
            WatchEvent::Resync { reason } => {
                tracing::info!(%reason, "task watch resynced; reading everything again");
                return false;
            }
        }
        true
    }

    /// Marks every task a timer may be due for: waiting for placement, for
    /// its gone timeout or for a relaunch, or launched without a record.
    /// (Starting and running tasks change only on events.)
    fn mark_timed(&mut self) {
        for id in &self.live {
            let due = match self.statuses.get(id) {
                None => true,
                Some((s, _)) => {
                    matches!(s.record.state, TaskState::Staging | TaskState::Unreachable)
                        || s.relaunch_at.is_some()
                }
            };
            if due {
                self.dirty.insert(id.clone());
            }
        }
    }

    /// Sets a task's record as the picture holds it.
    fn set_status(&mut self, id: String, rec: StatusRecord, version: Version) {
        self.statuses.insert(id.clone(), (rec, version));
        self.reindex(&id);
    }

    /// Keeps what the picture derives from a task's spec and record in
    /// step after either changed: its share of an agent's resources,
    /// whether its reports are orphans, and whether it is live or ended.
    fn reindex(&mut self, id: &str) {
        self.recount(id);
        if self.specs.contains_key(id) || self.statuses.contains_key(id) {
            let known: Vec<(String, u32)> = self
                .orphans
                .range((id.to_string(), 0)..=(id.to_string(), u32::MAX))
                .map(|(k, _)| k.clone())
                .collect();
            for k in known {
                self.orphans.remove(&k);
            }
        } else {
            // Forgotten: any report left of it (one written after the
            // forgetting deleted the reports) is an orphan from now on.
            let left: Vec<((String, u32), SystemTime)> = self
                .reports
                .range((id.to_string(), 0)..=(id.to_string(), u32::MAX))
                .map(|(k, r)| (k.clone(), orphan_since(Some(r))))
                .collect();
            for (k, since) in left {
                self.orphans.entry(k).or_insert(since);
            }
        }
        let ended = self
            .statuses
            .get(id)
            .filter(|(s, _)| s.record.state.is_terminal() && s.relaunch_at.is_none())
            .map(|(s, _)| s.record.updated);
        let live = ended.is_none() && self.specs.contains_key(id);
        if live {
            if !self.live.contains(id) {
                self.live.insert(id.to_string());
            }
        } else {
            self.live.remove(id);
        }
        if self.ended_at.get(id).copied() != ended {
            if let Some(at) = self.ended_at.remove(id) {
                self.ended.remove(&(at, id.to_string()));
            }
            if let Some(at) = ended {
                self.ended_at.insert(id.to_string(), at);
                self.ended.insert((at, id.to_string()));
            }
        }
    }

    /// Takes up to `limit` tasks that ended before `before`, with the
    /// version of the record that says so.
    fn take_forgettable(&mut self, before: SystemTime, limit: usize) -> Vec<Forget> {
        let mut due = Vec::new();
        while due.len() < limit {
            let Some((at, id)) = self.ended.first().cloned() else {
                break;
            };
            if at > before {
                break;
            }
            self.ended.pop_first();
            self.ended_at.remove(&id);
            let Some((s, version)) = self.statuses.get(&id) else {
                continue;
            };
            let launches = self
                .reports
                .range((id.clone(), 0)..=(id.clone(), u32::MAX))
                .map(|((_, launch), _)| *launch)
                .collect();
            due.push(Forget {
                agent: s.record.agent.clone(),
                version: *version,
                launches,
                at,
                id,
            });
        }
        due
    }

    /// Puts back a task whose forgetting failed, to try again later.
    fn forget_later(&mut self, f: &Forget) {
        if self
            .statuses
            .get(&f.id)
            .is_some_and(|(_, v)| *v == f.version)
        {
            self.ended_at.insert(f.id.clone(), f.at);
            self.ended.insert((f.at, f.id.clone()));
        }
    }

    /// Moves task `id`'s share of an agent's resources to where its spec
    /// and record now put it.
    fn recount(&mut self, id: &str) {
        let now = match (self.statuses.get(id), self.specs.get(id)) {
            (Some((s, _)), Some(spec))
                if matches!(
                    s.record.state,
                    TaskState::Starting | TaskState::Running | TaskState::Unreachable
                ) =>
            {
                s.record
                    .agent
                    .clone()
                    .map(|agent| (agent, spec.resources.clone()))
            }
            _ => None,
        };
        if self.placed.get(id) == now.as_ref() {
            return;
        }
        if let Some((agent, r)) = self.placed.remove(id) {
            if let Some(used) = self.used.get_mut(&agent) {
                used.remove(&r);
                if used.is_empty() {
                    self.used.remove(&agent);
                }
            }
        }
        if let Some((agent, r)) = now {
            self.used.entry(agent.clone()).or_default().add(&r);
            self.placed.insert(id.to_string(), (agent, r));
        }
    }

    /// Every agent as placement sees it, with what its placed tasks use.
    fn agent_views(&self) -> Vec<AgentView> {
        self.agents
            .values()
            .map(|a| AgentView {
                id: a.id.clone(),
                total: a.resources.clone(),
                used: self
                    .used
                    .get(&a.id)
                    .map(Used::resources)
                    .unwrap_or_default(),
                attributes: a.attributes.clone(),
            })
            .collect()
    }
}

/// Resources in use on one agent, summed exactly (CPUs in millionths), so
/// that adding and removing tasks for as long as the supervisor leads
/// leaves no rounding behind.
#[derive(Default)]
struct Used {
    micro_cpus: i64,
    mem_bytes: i128,
    disk_bytes: i128,
    /// Ports and how many placed tasks hold each.
    ports: BTreeMap<u16, u32>,
    tasks: u64,
}

fn micro(cpus: f64) -> i64 {
    (cpus * 1e6).round() as i64
}

impl Used {
    fn add(&mut self, r: &Resources) {
        self.micro_cpus += micro(r.cpus);
        self.mem_bytes += i128::from(r.mem_bytes);
        self.disk_bytes += i128::from(r.disk_bytes);
        for p in &r.ports {
            *self.ports.entry(*p).or_default() += 1;
        }
        self.tasks += 1;
    }

    fn remove(&mut self, r: &Resources) {
        self.micro_cpus -= micro(r.cpus);
        self.mem_bytes -= i128::from(r.mem_bytes);
        self.disk_bytes -= i128::from(r.disk_bytes);
        for p in &r.ports {
            if let Some(n) = self.ports.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    self.ports.remove(p);
                }
            }
        }
        self.tasks = self.tasks.saturating_sub(1);
    }

    fn is_empty(&self) -> bool {
        self.tasks == 0
    }

    fn resources(&self) -> Resources {
        Resources {
            cpus: self.micro_cpus.max(0) as f64 / 1e6,
            mem_bytes: u64::try_from(self.mem_bytes.max(0)).unwrap_or(u64::MAX),
            disk_bytes: u64::try_from(self.disk_bytes.max(0)).unwrap_or(u64::MAX),
            ports: self.ports.keys().copied().collect(),
        }
    }
}

/// A task past its retention, to be deleted if its record is still the
/// one at `version`.
struct Forget {
    id: String,
    version: Version,
    /// Its last launch's agent (whose orders go too).
    agent: Option<String>,
    /// The launches that left a report.
    launches: Vec<u32>,
    /// When it ended.
    at: SystemTime,
}

/// A record a pass decided to write, and the orders that follow it.
struct Write {
    id: String,
    spec: TaskSpec,
    /// The spec's version, when the write creates the record: the record
    /// is only created if the spec is still that one (a task forgotten
    /// after its retention loses its record and spec together, and must
    /// not come back as a new launch from a picture that still holds the
    /// spec).
    spec_version: Option<Version>,
    rec: StatusRecord,
    precondition: Precondition,
    actions: Vec<TaskAction>,
}

enum Written {
    /// Stored at this version; these orders could not be sent.
    Stored {
        id: String,
        rec: Box<StatusRecord>,
        version: Version,
        unsent: Vec<TaskAction>,
    },
    /// Someone else wrote the record first (a launch, or another
    /// supervisor); the watch brings their version.
    Lost,
}

type Changes = futures::stream::SelectAll<WatchStream>;

/// Resolves at the next change, or never when there is no watch.
async fn next_change(changes: &mut Option<Changes>) -> Option<Result<WatchEvent>> {
    match changes {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

impl Supervisor {
    /// A supervisor on `backend`.
    pub fn new(backend: Backend, config: SupervisorConfig) -> Supervisor {
        Supervisor { backend, config }
    }

    /// Campaigns, and while leader keeps every task's record current,
    /// until `shutdown` resolves. After losing leadership it campaigns
    /// again.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        // An unreachable backend at start is an error to report; once the
        // supervisor has run, it outlasts an outage (a partition that cost
        // it its leadership, say) by trying again until it is stopped.
        let mut started = false;
        let mut backoff = RETRY_FIRST;
        loop {
            let opened = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                s = self.backend.sessions().open(self.config.session_ttl) => s,
            };
            let session = match opened {
                Ok(s) => s,
                Err(e) if started && e.is_temporary() => {
                    tracing::warn!(error = %e, name = %self.config.name, "cannot open a session to campaign again; retrying");
                    if !back_off(&mut shutdown, &mut backoff).await {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            started = true;
            let value = Value::new(self.config.name.clone().into_bytes())?;
            let election = store::election()?;
            let leadership = tokio::select! {
                _ = &mut shutdown => { let _ = session.close().await; return Ok(()); }
                l = self.backend.elections().campaign(&election, value, &session) => l,
            };
            let leadership = match leadership {
                Ok(l) => l,
                Err(e) if e.kind() == ErrorKind::SessionLost => continue,
                Err(e) if e.is_temporary() => {
                    tracing::warn!(error = %e, name = %self.config.name, "campaign failed; retrying");
                    let _ = session.close().await;
                    if !back_off(&mut shutdown, &mut backoff).await {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            backoff = RETRY_FIRST;
            let term = leadership.term().0;
            tracing::info!(term, name = %self.config.name, "supervisor elected");
            let mut world: Option<World> = None;
            let mut changes: Option<Changes> = None;
            let mut timer = tokio::time::interval(self.config.interval);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                if leadership.check().is_err() {
                    break;
                }
                if world.is_none() {
                    match self.load().await {
                        Ok((w, since)) => match self.watch(since).await {
                            Ok(c) => {
                                world = Some(w);
                                changes = Some(c);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot watch the tasks; retrying")
                            }
                        },
                        Err(e) => tracing::warn!(error = %e, "cannot read the tasks; retrying"),
                    }
                }
                if let Some(w) = world.as_mut() {
                    match self.pass(w, term).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::NotLeader => {
                            tracing::warn!(error = %e, "a newer supervisor is writing; stepping down");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "supervisor pass failed; reading everything again");
                            world = None;
                            changes = None;
                        }
                    }
                }
                tokio::select! {
                    _ = &mut shutdown => {
                        let _ = leadership.resign().await;
                        let _ = session.close().await;
                        return Ok(());
                    }
                    _ = leadership.lost() => break,
                    change = next_change(&mut changes) => {
                        let mut next = change;
                        // Take in everything already delivered, then make
                        // one pass over what it touched.
                        loop {
                            let fine = match (next, world.as_mut()) {
                                (Some(Ok(event)), Some(w)) => w.absorb(event),
                                (Some(Err(e)), _) => {
                                    tracing::warn!(error = %e, "task watch failed; reading everything again");
                                    false
                                }
                                _ => false,
                            };
                            if !fine {
                                world = None;
                                changes = None;
                                break;
                            }
                            match changes.as_mut().and_then(|c| c.next().now_or_never()) {
                                Some(n) => next = n,
                                None => break,
                            }
                        }
                    }
                    _ = timer.tick() => {
                        if let Some(w) = world.as_mut() {
                            w.mark_timed();
                        }
                    }
                }
            }
            tracing::warn!(name = %self.config.name, "supervisor lost leadership");
            // Whatever is left of this term goes with its session; the next
            // campaign starts on a fresh one.
            let _ = session.close().await;
        }
    }

    /// One pass over every task, as the leader of election term `term`,
    /// reading everything first.
    ///
    /// Fails `NotLeader` (writing nothing more) on meeting a record written
    /// under a later term.
    pub async fn reconcile(&self, term: u64) -> Result<()> {
        let (mut world, _) = self.load().await?;
        self.pass(&mut world, term).await
    }

    /// Reads everything once. Returns the picture (every task marked for
    /// the first pass, orders lost by a previous leader queued again) and
    /// the revision a watch continues from.
    async fn load(&self) -> Result<(World, Version)> {
        let b = &self.backend;
        let mut world = World::default();
        let mut since: Option<Version> = None;
        // Records before specs: a task forgotten between the two listings
        // (its spec deleted first, or both at once) then has neither, never
        // a spec alone, which would read as a launch without a record.
        for dir in [
            store::status_dir()?,
            store::spec_dir()?,
            store::report_dir()?,
            store::kill_request_dir()?,
            store::agents_dir()?,
        ] {
            let listing = b.kv().list(&dir, Depth::Recursive).await?;
            since = Some(since.map_or(listing.revision, |s| s.min(listing.revision)));
            world.listed_up_to = world.listed_up_to.max(Some(listing.revision));
            for e in listing.entries {
                world.apply(&e.key, Some(&e.value), e.version);
            }
        }
        // A leader that died between writing a record and sending its
        // order leaves the order unsent; compare orders with records.
        let assigned: BTreeMap<(String, String), (Assignment, _)> =
            store::list_pairs(b, &store::key("_dprim/tasks/assign".into())?).await?;
        let kill_orders: BTreeMap<(String, String), (KillOrder, _)> =
            store::list_pairs(b, &store::key("_dprim/tasks/kill".into())?).await?;
        for (id, (s, _)) in &world.statuses {
            let Some(agent) = s.record.agent.clone() else {
                continue;
            };
            let pair = (agent.clone(), id.clone());
            if s.record.state == TaskState::Starting
                && assigned
                    .get(&pair)
                    .is_none_or(|(a, _)| a.launch != s.record.launches)
            {
                world
                    .unsent
                    .entry(id.clone())
                    .or_default()
                    .push(TaskAction::Assign { agent });
            } else if s.record.kill_requested
                && !s.record.state.is_terminal()
                && !kill_orders.contains_key(&pair)
            {
                let grace = world.kill_requests.get(id).map_or(0, |k| k.grace_ms);
                world
                    .unsent
                    .entry(id.clone())
                    .or_default()
                    .push(TaskAction::Kill {
                        agent,
                        grace: Duration::from_millis(grace),
                    });
            }
        }
        world.dirty = world.specs.keys().cloned().collect();
        let since = match since {
            Some(s) => s,
            None => return Err(dprim::Error::unexpected("no listing revision")),
        };
        Ok((world, since))
    }

    async fn watch(&self, since: Version) -> Result<Changes> {
        let mut streams = Vec::new();
        for dir in [store::key("_dprim/tasks".into())?, store::agents_dir()?] {
            streams.push(
                self.backend
                    .kv()
                    .watch(WatchTarget::Dir(dir), WatchStart::After(since))
                    .await?,
            );
        }
        Ok(futures::stream::select_all(streams))
    }

    /// Looks at the tasks marked in `world`, writes the records that
    /// change (concurrently) and sends the orders that follow them.
    async fn pass(&self, world: &mut World, term: u64) -> Result<()> {
        let mut first_error = None;
        // Orders of earlier passes that could not be sent, if the record
        // still calls for them.
        for (id, actions) in std::mem::take(&mut world.unsent) {
            let (Some(spec), Some((rec, _))) = (world.specs.get(&id), world.statuses.get(&id))
            else {
                continue;
            };
            for action in actions {
                let due = match &action {
                    TaskAction::Assign { agent } => {
                        rec.record.state == TaskState::Starting
                            && rec.record.agent.as_ref() == Some(agent)
                    }
                    TaskAction::Kill { .. } => !rec.record.state.is_terminal(),
                    _ => false,
                };
                if !due {
                    continue;
                }
                if let Err(e) = self.carry_out(&id, spec, rec, action.clone(), term).await {
                    world.unsent.entry(id.clone()).or_default().push(action);
                    first_error.get_or_insert(e);
                }
            }
        }

        let dirty = std::mem::take(&mut world.dirty);
        let now = SystemTime::now();
        let mut agents = world.agent_views();
        let mut writes = Vec::new();
        for id in dirty {
            if let Some(w) = self.decide(world, &id, &mut agents, term, now)? {
                writes.push(w);
            }
        }
        let results: Vec<Result<Written>> = futures::stream::iter(writes)
            .map(|w| self.write(w, term))
            .buffer_unordered(WRITES_IN_FLIGHT)
            .collect()
            .await;
        for result in results {
            match result {
                Ok(Written::Stored {
                    id,
                    rec,
                    version,
                    unsent,
                }) => {
                    let key = store::status_key(&id)?;
                    if world.seen.get(&key).is_none_or(|v| *v < version) {
                        world.seen.insert(key, version);
                        world.set_status(id.clone(), *rec, version);
                    }
                    if !unsent.is_empty() {
                        world.unsent.insert(id, unsent);
                    }
                }
                Ok(Written::Lost) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }

        // Tasks past their retention go; the watch brings the deletes back
        // and they leave the picture then.
        if let Some(before) = now.checked_sub(self.config.task_retention) {
            let due = world.take_forgettable(before, FORGET_PER_PASS);
            let results: Vec<(Forget, Result<()>)> = futures::stream::iter(due)
                .map(|f| async move {
                    let result = self.forget(&f).await;
                    (f, result)
                })
                .buffer_unordered(WRITES_IN_FLIGHT)
                .collect()
                .await;
            for (f, result) in results {
                match result {
                    Ok(()) => {}
                    // The record changed meanwhile: its new version comes
                    // through the watch and decides again.
                    Err(e) if e.kind() == ErrorKind::Conflict => {}
                    Err(e) => {
                        world.forget_later(&f);
                        first_error.get_or_insert(e);
                    }
                }
            }
            let orphans: Vec<(String, u32)> = world
                .orphans
                .iter()
                .filter(|(_, seen)| **seen <= before)
                .map(|(k, _)| k.clone())
                .take(FORGET_PER_PASS)
                .collect();
            for (task, launch) in orphans {
                match self
                    .backend
                    .kv()
                    .delete(&store::report_key(&task, launch)?)
                    .await
                {
                    Ok(_) => {
                        world.orphans.remove(&(task, launch));
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Feeds one task's events through the state machine. Returns the
    /// record to write, if it changes.
    fn decide(
        &self,
        world: &World,
        id: &str,
        agents: &mut [AgentView],
        term: u64,
        now: SystemTime,
    ) -> Result<Option<Write>> {
        let Some(spec) = world.specs.get(id) else {
            return Ok(None);
        };
        let (mut rec, version) = match world.statuses.get(id) {
            Some((r, v)) => (r.clone(), Some(*v)),
            None => (
                StatusRecord {
                    id: id.to_string(),
                    record: TaskRecord::new(spec.restart, now),
                    report_seq: 0,
                    term,
                    unreachable_since: None,
                    relaunch_at: None,
                },
                None,
            ),
        };
        if rec.term > term {
            return Err(dprim::Error::not_leader(format!(
                "task `{id}` was written under term {}, later than this supervisor's term {term}",
                rec.term
            )));
        }
        let before = rec.clone();
        let mut actions = Vec::new();
        let mut fire =
            |rec: &mut StatusRecord, event: TaskEvent| match step(&rec.record, event, now) {
                Ok((next, mut a)) => {
                    rec.record = next;
                    actions.append(&mut a);
                }
                Err(e) => tracing::debug!(task = %rec.id, error = %e, "ignored event"),
            };

        // A due relaunch starts a new launch of the same spec.
        if let Some(at) = rec.relaunch_at {
            if now >= at {
                let launches = rec.record.launches + 1;
                rec.record = TaskRecord::new(spec.restart, now);
                rec.record.launches = launches;
                rec.report_seq = 0;
                rec.relaunch_at = None;
                rec.unreachable_since = None;
            }
        }
        if let Some(request) = world.kill_requests.get(id) {
            if !rec.record.kill_requested && !rec.record.state.is_terminal() {
                fire(
                    &mut rec,
                    TaskEvent::KillRequested {
                        grace: Duration::from_millis(request.grace_ms),
                    },
                );
            }
        }
        if let Some(report) = world.reports.get(&(id.to_string(), rec.record.launches)) {
            // Sequence numbers come from the agent that ran this launch;
            // `report_seq` is reset with each new launch.
            if report.launch == rec.record.launches && report.seq > rec.report_seq {
                rec.report_seq = report.seq;
                let unreachable = rec.record.state == TaskState::Unreachable;
                let ended = match &report.event {
                    ReportEvent::Started => None,
                    ReportEvent::Exited { code } => Some(TaskEvent::Exited { code: *code }),
                    ReportEvent::LaunchFailed { reason } => Some(TaskEvent::LaunchFailed {
                        reason: reason.clone(),
                    }),
                    ReportEvent::KilledByRequest => Some(TaskEvent::KilledByRequest),
                };
                match (ended, unreachable) {
                    (None, false) => fire(&mut rec, TaskEvent::Started),
                    (None, true) => fire(&mut rec, TaskEvent::AgentReturned { running: true }),
                    // Back from being unreachable with the launch's end: it
                    // ran until then, and its exit is known.
                    (Some(end @ (TaskEvent::Exited { .. } | TaskEvent::KilledByRequest)), true) => {
                        fire(&mut rec, TaskEvent::AgentReturned { running: true });
                        fire(&mut rec, end);
                    }
                    (Some(_), true) => fire(&mut rec, TaskEvent::AgentReturned { running: false }),
                    (Some(end), false) => fire(&mut rec, end),
                }
                if rec.record.state != TaskState::Unreachable {
                    rec.unreachable_since = None;
                }
            }
        }
        let agent_present = rec
            .record
            .agent
            .as_ref()
            .is_some_and(|a| world.agents.contains_key(a));
        if matches!(rec.record.state, TaskState::Starting | TaskState::Running) && !agent_present {
            fire(&mut rec, TaskEvent::AgentLost);
            rec.unreachable_since = Some(now);
        }
        if rec.record.state == TaskState::Unreachable {
            let since = *rec.unreachable_since.get_or_insert(now);
            if now.duration_since(since).unwrap_or_default() >= self.config.gone_timeout {
                fire(&mut rec, TaskEvent::UnreachableTimeout);
            }
        }
        if rec.record.state == TaskState::Staging && rec.relaunch_at.is_none() {
            match self.config.placer.place(spec, agents) {
                Ok(agent) => {
                    if let Some(view) = agents.iter_mut().find(|a| a.id == agent) {
                        add(&mut view.used, &spec.resources);
                    }
                    fire(&mut rec, TaskEvent::Placed { agent });
                }
                Err(reason) => fire(&mut rec, TaskEvent::Pending { reason }),
            }
        }

        for action in &actions {
            if let TaskAction::Relaunch { after } = action {
                rec.relaunch_at = Some(now + *after);
                rec.record.message = format!(
                    "{}; launch {} follows in {}",
                    rec.record.message,
                    rec.record.launches + 1,
                    humantime::format_duration(*after)
                );
            }
        }
        if rec == before {
            return Ok(None);
        }
        rec.term = term;
        Ok(Some(Write {
            id: id.to_string(),
            spec: spec.clone(),
            spec_version: match version {
                Some(_) => None,
                None => world.seen.get(&store::spec_key(id)?).copied(),
            },
            rec,
            precondition: match version {
                Some(v) => Precondition::Version(v),
                None => Precondition::Absent,
            },
            actions,
        }))
    }

    /// Writes one record (compare-and-swap), then its orders: in one
    /// transaction where the backend has them, else one after the other.
    async fn write(&self, w: Write, term: u64) -> Result<Written> {
        let b = &self.backend;
        if b.capabilities().kv.transactions {
            return self.write_atomically(w, term).await;
        }
        // Record first: an assignment or kill order only goes out once the
        // record that explains it is stored.
        let version = match store::put_with(
            b,
            &store::status_key(&w.id)?,
            &w.rec,
            w.precondition,
            None,
        )
        .await
        {
            Ok(v) => v,
            Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::AlreadyExists) => {
                return Ok(Written::Lost)
            }
            Err(e) => return Err(e),
        };
        let mut unsent = Vec::new();
        for action in w.actions {
            if let Err(e) = self
                .carry_out(&w.id, &w.spec, &w.rec, action.clone(), term)
                .await
            {
                tracing::warn!(task = %w.id, error = %e, "cannot send an order yet; keeping it");
                unsent.push(action);
            }
        }
        if w.rec.record.state.is_terminal() {
            if let Some(agent) = &w.rec.record.agent {
                let _ = b.kv().delete(&store::assign_key(agent, &w.id)?).await;
                if w.rec.record.kill_requested {
                    let _ = b.kv().delete(&store::kill_key(agent, &w.id)?).await;
                }
            }
        }
        Ok(Written::Stored {
            id: w.id,
            rec: Box::new(w.rec),
            version,
            unsent,
        })
    }

    /// The record, its orders and the clean-up of a finished launch as one
    /// transaction: one round trip, and no order without its record.
    async fn write_atomically(&self, w: Write, term: u64) -> Result<Written> {
        let status_key = store::status_key(&w.id)?;
        let mut txn = Txn::new().check(status_key.clone(), w.precondition);
        if let Some(v) = w.spec_version {
            txn = txn.check(store::spec_key(&w.id)?, Precondition::Version(v));
        }
        let mut txn = txn.put(status_key, store::encode(&w.rec)?);
        let mut written = BTreeSet::new();
        for action in &w.actions {
            if let Some((key, value)) = order(&w.id, &w.spec, &w.rec, action, term)? {
                written.insert(key.clone());
                txn = txn.put(key, value);
            }
        }
        if w.rec.record.state.is_terminal() {
            if let Some(agent) = &w.rec.record.agent {
                let mut done = vec![store::assign_key(agent, &w.id)?];
                if w.rec.record.kill_requested {
                    done.push(store::kill_key(agent, &w.id)?);
                }
                for key in done {
                    if !written.contains(&key) {
                        txn = txn.delete(key);
                    }
                }
            }
        }
        let result = match self.backend.kv().txn(txn).await {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::Conflict => return Ok(Written::Lost),
            Err(e) => return Err(e),
        };
        let Some(Some(version)) = result.versions.first().copied() else {
            return Err(dprim::Error::unexpected(
                "a transaction's put reported no version",
            ));
        };
        Ok(Written::Stored {
            id: w.id,
            rec: Box::new(w.rec),
            version,
            unsent: Vec::new(),
        })
    }

    /// Deletes every record of a task past its retention, if its record is
    /// still the one that said it ended. The reports go first (on their
    /// own they mean nothing), the record last: on a backend without
    /// transactions an interruption leaves a record whose spec is gone,
    /// which the next pass (or leader) forgets in turn, never a spec
    /// without its record, which would read as a new launch.
    async fn forget(&self, f: &Forget) -> Result<()> {
        let kv = self.backend.kv();
        for launch in &f.launches {
            kv.delete(&store::report_key(&f.id, *launch)?).await?;
        }
        let status_key = store::status_key(&f.id)?;
        let mut others = vec![store::spec_key(&f.id)?, store::kill_request_key(&f.id)?];
        if let Some(agent) = &f.agent {
            others.push(store::assign_key(agent, &f.id)?);
            others.push(store::kill_key(agent, &f.id)?);
        }
        if self.backend.capabilities().kv.transactions {
            let mut txn = Txn::new().check(status_key.clone(), Precondition::Version(f.version));
            for key in others {
                txn = txn.delete(key);
            }
            kv.txn(txn.delete(status_key)).await?;
            return Ok(());
        }
        for key in others {
            kv.delete(&key).await?;
        }
        kv.delete_if_version(&status_key, f.version).await
    }

    async fn carry_out(
        &self,
        id: &str,
        spec: &TaskSpec,
        rec: &StatusRecord,
        action: TaskAction,
        term: u64,
    ) -> Result<()> {
        if let Some((key, value)) = order(id, spec, rec, &action, term)? {
            self.backend.kv().put(&key, value).await?;
        }
        Ok(())
    }
}

/// The order an action sends to an agent (its key and value), if any.
fn order(
    id: &str,
    spec: &TaskSpec,
    rec: &StatusRecord,
    action: &TaskAction,
    term: u64,
) -> Result<Option<(Key, Value)>> {
    Ok(match action {
        TaskAction::Assign { agent } => {
            let assignment = Assignment {
                spec: spec.clone(),
                launch: rec.record.launches,
                term,
            };
            Some((store::assign_key(agent, id)?, store::encode(&assignment)?))
        }
        TaskAction::Kill { agent, grace } if !agent.is_empty() => {
            let order = KillOrder {
                grace_ms: grace.as_millis() as u64,
                term,
            };
            Some((store::kill_key(agent, id)?, store::encode(&order)?))
        }
        // Relaunches are scheduled in the record itself (`relaunch_at`),
        // written before any action; publishing is the record write.
        _ => None,
    })
}

fn add(total: &mut Resources, r: &Resources) {
    total.cpus += r.cpus;
    total.mem_bytes += r.mem_bytes;
    total.disk_bytes += r.disk_bytes;
    total.ports.extend(&r.ports);
}

/// Since when a report is an orphan: when its agent made it (so every
/// leader ages it alike), or now for a report that does not say (or says a
/// time still to come, from a clock ahead of this one).
fn orphan_since(report: Option<&Report>) -> SystemTime {
    let now = SystemTime::now();
    match report.map(|r| r.made_ms) {
        Some(ms) if ms > 0 => (std::time::UNIX_EPOCH + Duration::from_millis(ms)).min(now),
        _ => now,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::tasks::placement::FirstFit;
    use dprim::tasks::Tasks;
    use dprim::BackendConfig;
    use dprim_memory::MemoryServer;

    fn supervisor(backend: &Backend) -> Supervisor {
        retaining(backend, DEFAULT_TASK_RETENTION)
    }

    fn retaining(backend: &Backend, task_retention: Duration) -> Supervisor {
        Supervisor::new(
            backend.clone(),
            SupervisorConfig {
                name: "test".into(),
                session_ttl: Duration::from_secs(2),
                gone_timeout: Duration::from_secs(60),
                interval: Duration::from_millis(50),
                placer: Arc::new(FirstFit),
                task_retention,
            },
        )
    }

    /// A fresh backend with agent `a1` registered and one no-op task
    /// launched (not yet placed).
    async fn one_task_one_agent() -> (Backend, crate::tasks::client::TasksClient, dprim::TaskId) {
        let backend = MemoryServer::new()
            .connect(&BackendConfig::memory())
            .unwrap();
        register_agent(&backend, "a1").await;
        let client = crate::tasks::client::TasksClient::new(backend.clone());
        let id = client.launch(noop()).await.unwrap();
        (backend, client, id)
    }

    async fn register_agent(backend: &Backend, id: &str) {
        let info = AgentInfo {
            id: id.into(),
            enforcement: String::new(),
            resources: Resources {
                cpus: 4.0,
                mem_bytes: 1 << 30,
                disk_bytes: 1 << 30,
                ports: vec![],
            },
            attributes: BTreeMap::new(),
        };
        store::put(backend, &store::agent_key(id).unwrap(), &info)
            .await
            .unwrap();
    }

    fn noop() -> TaskSpec {
        TaskSpec {
            command: "true".into(),
            resources: Resources {
                cpus: 1.0,
                ..Resources::default()
            },
            ..TaskSpec::default()
        }
    }

    #[tokio::test]
    async fn a_new_leader_sends_the_assignment_its_predecessor_did_not() {
        let (backend, _, id) = one_task_one_agent().await;
        supervisor(&backend).reconcile(1).await.unwrap();
        let assign = store::assign_key("a1", &id.0).unwrap();
        let (first, _) = store::get::<Assignment>(&backend, &assign)
            .await
            .unwrap()
            .expect("placed and assigned");
        assert_eq!(first.term, 1);
        // The leader of term 1 died after writing the record, before its
        // order reached the agent.
        backend.kv().delete(&assign).await.unwrap();
        supervisor(&backend).reconcile(2).await.unwrap();
        let (again, _) = store::get::<Assignment>(&backend, &assign)
            .await
            .unwrap()
            .expect("the next leader sends it again");
        assert_eq!((again.launch, again.term), (first.launch, 2));
    }

    #[tokio::test]
    async fn a_launch_that_ended_while_its_agent_was_unreachable_keeps_its_exit_code() {
        let (backend, client, id) = one_task_one_agent().await;
        let sup = supervisor(&backend);
        let report = |seq: u64, event: ReportEvent| Report {
            agent: "a1".into(),
            launch: 1,
            seq,
            event,
            made_ms: 0,
        };
        let report_key = store::report_key(&id.0, 1).unwrap();
        sup.reconcile(1).await.unwrap();
        store::put(&backend, &report_key, &report(1, ReportEvent::Started))
            .await
            .unwrap();
        sup.reconcile(1).await.unwrap();
        assert_eq!(client.status(&id).await.unwrap().state, TaskState::Running);
        // The agent's session ends; the task may still run.
        backend
            .kv()
            .delete(&store::agent_key("a1").unwrap())
            .await
            .unwrap();
        sup.reconcile(1).await.unwrap();
        assert_eq!(
            client.status(&id).await.unwrap().state,
            TaskState::Unreachable
        );
        // It comes back and reports the exit it saw meanwhile.
        register_agent(&backend, "a1").await;
        store::put(
            &backend,
            &report_key,
            &report(2, ReportEvent::Exited { code: 4 }),
        )
        .await
        .unwrap();
        sup.reconcile(1).await.unwrap();
        let status = client.status(&id).await.unwrap();
        assert_eq!(
            (status.state, status.exit_code),
            (TaskState::Failed, Some(4)),
            "{status:?}"
        );
    }

    #[tokio::test]
    async fn a_finished_task_leaves_what_every_pass_looks_at() {
        let (backend, client, done) = one_task_one_agent().await;
        let running = client.launch(noop()).await.unwrap();
        let sup = supervisor(&backend);
        sup.reconcile(1).await.unwrap();
        finish(&backend, &sup, &client, &done).await;

        let (mut world, _) = sup.load().await.unwrap();
        assert_eq!(world.live, BTreeSet::from([running.0.clone()]));
        let views = world.agent_views();
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].used.cpus, 1.0, "only the placed task uses a cpu");
        world.dirty.clear();
        world.mark_timed();
        assert!(world.dirty.is_empty(), "a starting task waits on no timer");
        // An agent coming back looks at its live tasks only.
        register_agent(&backend, "a1").await;
        let (agent, version) = backend
            .kv()
            .get(&store::agent_key("a1").unwrap())
            .await
            .unwrap()
            .map(|e| (e.value, e.version))
            .unwrap();
        world.apply(&store::agent_key("a1").unwrap(), Some(&agent), version);
        assert_eq!(world.dirty, BTreeSet::from([running.0]));
    }

    /// Agent a1 reports that launch 1 of `id` exited with 0, and a pass of
    /// `sup` makes the task FINISHED.
    async fn finish(
        backend: &Backend,
        sup: &Supervisor,
        client: &crate::tasks::client::TasksClient,
        id: &dprim::TaskId,
    ) {
        let report = Report {
            agent: "a1".into(),
            launch: 1,
            seq: 1,
            event: ReportEvent::Exited { code: 0 },
            made_ms: 0,
        };
        store::put(backend, &store::report_key(&id.0, 1).unwrap(), &report)
            .await
            .unwrap();
        sup.reconcile(1).await.unwrap();
        assert_eq!(client.status(id).await.unwrap().state, TaskState::Finished);
    }

    /// Every key under `_dprim/tasks` that names task `id`.
    async fn keys_of(backend: &Backend, id: &str) -> Vec<String> {
        let listing = backend
            .kv()
            .list(
                &store::key("_dprim/tasks".into()).unwrap(),
                Depth::Recursive,
            )
            .await
            .unwrap();
        listing
            .entries
            .into_iter()
            .map(|e| e.key.as_str().to_string())
            .filter(|k| k.split('/').any(|part| part == id))
            .collect()
    }

    #[tokio::test]
    async fn a_task_done_for_good_is_forgotten_after_the_retention_and_a_live_one_is_not() {
        let (backend, client, done) = one_task_one_agent().await;
        let live = client.launch(noop()).await.unwrap();
        let sup = retaining(&backend, Duration::from_secs(1));
        sup.reconcile(1).await.unwrap();
        finish(&backend, &sup, &client, &done).await;
        // Within the retention a pass keeps it.
        sup.reconcile(1).await.unwrap();
        assert!(client.status(&done).await.is_ok());
        assert!(!keys_of(&backend, &done.0).await.is_empty());

        tokio::time::sleep(Duration::from_millis(1100)).await;
        sup.reconcile(1).await.unwrap();
        let err = client.status(&done).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        assert!(err.message().contains("--task-retention"), "{err}");
        assert_eq!(keys_of(&backend, &done.0).await, Vec::<String>::new());
        // The live task keeps everything, however old.
        assert_eq!(
            client.status(&live).await.unwrap().state,
            TaskState::Starting
        );
        let left = keys_of(&backend, &live.0).await;
        assert_eq!(left.len(), 3, "spec, record and assignment: {left:?}");
    }

    #[tokio::test]
    async fn a_forgotten_task_is_not_launched_again_from_a_picture_that_still_holds_its_spec() {
        let (backend, client, id) = one_task_one_agent().await;
        let keeper = supervisor(&backend);
        keeper.reconcile(1).await.unwrap();
        finish(&backend, &keeper, &client, &id).await;
        let (mut world, since) = keeper.load().await.unwrap();
        let mut changes = keeper.watch(since).await.unwrap();

        retaining(&backend, Duration::ZERO)
            .reconcile(1)
            .await
            .unwrap();
        assert_eq!(
            client.status(&id).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        // The picture learns that the record is gone before it learns
        // that the spec is.
        let status_key = store::status_key(&id.0).unwrap();
        loop {
            let event = tokio::time::timeout(Duration::from_secs(5), changes.next())
                .await
                .expect("the forgetting comes through the watch")
                .unwrap()
                .unwrap();
            if let WatchEvent::Delete { key, version } = event {
                if key == status_key {
                    world.apply(&key, None, version);
                    break;
                }
            }
        }
        assert!(world.specs.contains_key(&id.0));
        keeper.pass(&mut world, 1).await.unwrap();
        assert_eq!(
            client.status(&id).await.unwrap_err().kind(),
            ErrorKind::NotFound,
            "the forgotten task came back"
        );
        assert_eq!(keys_of(&backend, &id.0).await, Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_report_on_a_task_forgotten_meanwhile_is_deleted_after_the_retention() {
        let (backend, _, known) = one_task_one_agent().await;
        let report = |launch: u32, event: ReportEvent| Report {
            agent: "a1".into(),
            launch,
            seq: 9,
            event,
            made_ms: 0,
        };
        // An agent away for longer than the retention reports on a task
        // that was forgotten meanwhile; another report is of a known task.
        let orphan = store::report_key("t-forgotten", 2).unwrap();
        store::put(
            &backend,
            &orphan,
            &report(2, ReportEvent::Exited { code: 0 }),
        )
        .await
        .unwrap();
        let kept = store::report_key(&known.0, 1).unwrap();
        store::put(&backend, &kept, &report(1, ReportEvent::Started))
            .await
            .unwrap();

        let sup = retaining(&backend, Duration::from_secs(1));
        let (mut world, _) = sup.load().await.unwrap();
        sup.pass(&mut world, 1).await.unwrap();
        assert!(
            backend.kv().get(&orphan).await.unwrap().is_some(),
            "kept for the retention"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        sup.pass(&mut world, 1).await.unwrap();
        assert!(backend.kv().get(&orphan).await.unwrap().is_none());
        assert!(backend.kv().get(&kept).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_new_leader_ages_a_left_report_by_when_it_was_made() {
        let (backend, _, _) = one_task_one_agent().await;
        let retention = Duration::from_secs(60);
        let made = |ago: Duration| {
            (SystemTime::now() - ago)
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
        };
        // Two reports left on forgotten tasks: one made longer than the
        // retention ago (an earlier leader saw it come and then lost
        // office), one made just now.
        let old = store::report_key("t-forgotten-old", 1).unwrap();
        let new = store::report_key("t-forgotten-new", 1).unwrap();
        for (key, ago) in [(&old, retention * 2), (&new, Duration::ZERO)] {
            let report = Report {
                agent: "a1".into(),
                launch: 1,
                seq: 3,
                event: ReportEvent::Exited { code: 0 },
                made_ms: made(ago),
            };
            store::put(&backend, key, &report).await.unwrap();
        }
        // A leader that has just taken office deletes the old one at once,
        // and keeps the new one for its retention.
        let sup = retaining(&backend, retention);
        let (mut world, _) = sup.load().await.unwrap();
        sup.pass(&mut world, 1).await.unwrap();
        assert!(
            backend.kv().get(&old).await.unwrap().is_none(),
            "a report made two retentions ago is still there"
        );
        assert!(backend.kv().get(&new).await.unwrap().is_some());
    }

    #[test]
    fn resources_in_use_add_up_exactly_however_often_tasks_come_and_go() {
        let task = Resources {
            cpus: 0.1,
            mem_bytes: 3,
            disk_bytes: 5,
            ports: vec![8080],
        };
        let mut used = Used::default();
        for _ in 0..1_000_000 {
            used.add(&task);
            used.add(&task);
            used.remove(&task);
            used.remove(&task);
        }
        assert!(used.is_empty());
        assert_eq!(used.resources(), Resources::default());
        for _ in 0..3 {
            used.add(&task);
        }
        let r = used.resources();
        assert_eq!((r.cpus, r.mem_bytes, r.ports), (0.3, 9, vec![8080]));
    }

    #[tokio::test]
    async fn a_pass_after_its_own_writes_has_nothing_to_do() {
        let (backend, _, _) = one_task_one_agent().await;
        let sup = supervisor(&backend);
        let (mut world, since) = sup.load().await.unwrap();
        let mut changes = sup.watch(since).await.unwrap();
        sup.pass(&mut world, 1).await.unwrap();
        assert!(world.dirty.is_empty());
        // The watch delivers the pass's own record write (and the
        // assignment); neither marks a task.
        let mut delivered = 0;
        while let Ok(Some(Ok(event))) =
            tokio::time::timeout(Duration::from_millis(200), changes.next()).await
        {
            assert!(world.absorb(event));
            delivered += 1;
        }
        assert!(delivered > 0, "the watch saw the pass's writes");
        assert!(world.dirty.is_empty(), "{:?}", world.dirty);
    }
}
