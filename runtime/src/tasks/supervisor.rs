//! The supervisor: several may run, one is elected (dprim Election). The
//! leader turns specs, agent registrations and agent reports into state
//! machine events, places staging tasks, and notices lost agents. It is the
//! only writer of task records; each write is a compare-and-swap on the
//! record's version, so a deposed leader's stale write fails instead of
//! overwriting its successor's.

use super::placement::{AgentView, Placer};
use super::state::{step, TaskAction, TaskEvent, TaskRecord};
use super::store::{self, AgentInfo, Assignment, KillOrder, Report, ReportEvent, StatusRecord};
use dprim::tasks::{Resources, TaskSpec, TaskState};
use dprim::{Backend, ErrorKind, KvExt, Precondition, Result, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Supervisor settings.
#[derive(Clone)]
pub struct SupervisorConfig {
    /// Name in the election (shown as the leader's value).
    pub name: String,
    /// TTL of the supervisor's session.
    pub session_ttl: Duration,
    /// How long a task stays UNREACHABLE before it is declared GONE.
    pub gone_timeout: Duration,
    /// How often the leader looks at everything when nothing wakes it.
    pub interval: Duration,
    /// Chooses agents for tasks.
    pub placer: Arc<dyn Placer>,
}

/// One supervisor instance.
pub struct Supervisor {
    backend: Backend,
    config: SupervisorConfig,
}

impl Supervisor {
    /// A supervisor on `backend`.
    pub fn new(backend: Backend, config: SupervisorConfig) -> Supervisor {
        Supervisor { backend, config }
    }

    /// Campaigns, and while leader reconciles every `interval`, until
    /// `shutdown` resolves. After losing leadership it campaigns again.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        loop {
            let session = self
                .backend
                .sessions()
                .open(self.config.session_ttl)
                .await?;
            let value = Value::new(self.config.name.clone().into_bytes())?;
            let election = store::election()?;
            let leadership = tokio::select! {
                _ = &mut shutdown => { let _ = session.close().await; return Ok(()); }
                l = self.backend.elections().campaign(&election, value, &session) => l,
            };
            let leadership = match leadership {
                Ok(l) => l,
                Err(e) if e.kind() == ErrorKind::SessionLost => continue,
                Err(e) => return Err(e),
            };
            tracing::info!(term = %leadership.term(), name = %self.config.name, "supervisor elected");
            let mut waker = store::Waker::new(
                self.backend.clone(),
                vec![store::key("_dprim/tasks".into())?, store::agents_dir()?],
            );
            loop {
                if leadership.check().is_err() {
                    break;
                }
                if let Err(e) = self.reconcile(leadership.term().0).await {
                    if e.kind() == ErrorKind::NotLeader {
                        tracing::warn!(error = %e, "a newer supervisor is writing; stepping down");
                        break;
                    }
                    tracing::warn!(error = %e, "supervisor pass failed; retrying");
                }
                tokio::select! {
                    _ = &mut shutdown => {
                        let _ = leadership.resign().await;
                        let _ = session.close().await;
                        return Ok(());
                    }
                    _ = leadership.lost() => break,
                    _ = waker.changed() => {}
                    _ = tokio::time::sleep(self.config.interval) => {}
                }
            }
            tracing::warn!(name = %self.config.name, "supervisor lost leadership");
            // Whatever is left of this term goes with its session; the next
            // campaign starts on a fresh one.
            let _ = session.close().await;
        }
    }

    /// One pass over every task, as the leader of election term `term`.
    ///
    /// Fails `NotLeader` (writing nothing more) on meeting a record written
    /// under a later term.
    pub async fn reconcile(&self, term: u64) -> Result<()> {
        let b = &self.backend;
        let specs: BTreeMap<String, (TaskSpec, _)> = store::list(b, &store::spec_dir()?).await?;
        let mut statuses: BTreeMap<String, (StatusRecord, _)> =
            store::list(b, &store::status_dir()?).await?;
        let reports: BTreeMap<(String, String), (Report, _)> =
            store::list_pairs(b, &store::report_dir()?).await?;
        let kill_requests: BTreeMap<String, (KillOrder, _)> =
            store::list(b, &store::kill_request_dir()?).await?;
        let agents: BTreeMap<String, (AgentInfo, _)> =
            store::list(b, &store::agents_dir()?).await?;
        let now = SystemTime::now();

        // What placed tasks use on each agent.
        let mut used: BTreeMap<String, Resources> = BTreeMap::new();
        for (id, (s, _)) in &statuses {
            if matches!(
                s.record.state,
                TaskState::Starting | TaskState::Running | TaskState::Unreachable
            ) {
                if let (Some(agent), Some((spec, _))) = (&s.record.agent, specs.get(id)) {
                    add(used.entry(agent.clone()).or_default(), &spec.resources);
                }
            }
        }

        for (id, (spec, _)) in &specs {
            let (mut rec, version) = match statuses.remove(id) {
                Some((r, v)) => (r, Some(v)),
                None => (
                    StatusRecord {
                        id: id.clone(),
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
            let mut apply = |rec: &mut StatusRecord, event: TaskEvent| match step(
                &rec.record,
                event.clone(),
                now,
            ) {
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
            if kill_requests.contains_key(id)
                && !rec.record.kill_requested
                && !rec.record.state.is_terminal()
            {
                let grace = kill_requests.get(id).map_or(0, |(k, _)| k.grace_ms);
                apply(
                    &mut rec,
                    TaskEvent::KillRequested {
                        grace: Duration::from_millis(grace),
                    },
                );
            }
            let current = (id.clone(), rec.record.launches.to_string());
            if let Some((report, _)) = reports.get(&current) {
                // Sequence numbers come from the agent that ran this launch;
                // `report_seq` is reset with each new launch.
                if report.launch == rec.record.launches && report.seq > rec.report_seq {
                    rec.report_seq = report.seq;
                    let unreachable = rec.record.state == TaskState::Unreachable;
                    let event = match (&report.event, unreachable) {
                        (ReportEvent::Started, false) => TaskEvent::Started,
                        (ReportEvent::Started, true) => TaskEvent::AgentReturned { running: true },
                        (_, true) => TaskEvent::AgentReturned { running: false },
                        (ReportEvent::Exited { code }, false) => TaskEvent::Exited { code: *code },
                        (ReportEvent::LaunchFailed { reason }, false) => TaskEvent::LaunchFailed {
                            reason: reason.clone(),
                        },
                        (ReportEvent::KilledByRequest, false) => TaskEvent::KilledByRequest,
                    };
                    apply(&mut rec, event);
                    if rec.record.state == TaskState::Running {
                        rec.unreachable_since = None;
                    }
                }
            }
            let agent_present = rec
                .record
                .agent
                .as_ref()
                .is_some_and(|a| agents.contains_key(a));
            if matches!(rec.record.state, TaskState::Starting | TaskState::Running)
                && !agent_present
            {
                apply(&mut rec, TaskEvent::AgentLost);
                rec.unreachable_since = Some(now);
            }
            if rec.record.state == TaskState::Unreachable {
                let since = *rec.unreachable_since.get_or_insert(now);
                if now.duration_since(since).unwrap_or_default() >= self.config.gone_timeout {
                    apply(&mut rec, TaskEvent::UnreachableTimeout);
                }
            }
            if rec.record.state == TaskState::Staging && rec.relaunch_at.is_none() {
                let views: Vec<AgentView> = agents
                    .values()
                    .map(|(a, _)| AgentView {
                        id: a.id.clone(),
                        total: a.resources.clone(),
                        used: used.get(&a.id).cloned().unwrap_or_default(),
                        attributes: a.attributes.clone(),
                    })
                    .collect();
                match self.config.placer.place(spec, &views) {
                    Ok(agent) => {
                        add(used.entry(agent.clone()).or_default(), &spec.resources);
                        apply(&mut rec, TaskEvent::Placed { agent });
                    }
                    Err(reason) => apply(&mut rec, TaskEvent::Pending { reason }),
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
                continue;
            }
            rec.term = term;
            // Record first: an assignment or kill order only goes out once
            // the record that explains it is stored.
            let precondition = match version {
                Some(v) => Precondition::Version(v),
                None => Precondition::Absent,
            };
            match store::put_with(b, &store::status_key(id)?, &rec, precondition, None).await {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::AlreadyExists) => {
                    // Someone else wrote it (a launch, or another supervisor):
                    // look again next pass.
                    continue;
                }
                Err(e) => return Err(e),
            }
            for action in actions {
                self.carry_out(id, spec, &rec, action).await?;
            }
            if rec.record.state.is_terminal() {
                if let Some(agent) = &rec.record.agent {
                    let _ = b.kv().delete(&store::assign_key(agent, id)?).await;
                    let _ = b.kv().delete(&store::kill_key(agent, id)?).await;
                }
            }
        }
        Ok(())
    }

    async fn carry_out(
        &self,
        id: &str,
        spec: &TaskSpec,
        rec: &StatusRecord,
        action: TaskAction,
    ) -> Result<()> {
        let b = &self.backend;
        match action {
            TaskAction::Assign { agent } => {
                let assignment = Assignment {
                    spec: spec.clone(),
                    launch: rec.record.launches,
                    term: rec.term,
                };
                store::put(b, &store::assign_key(&agent, id)?, &assignment).await?;
            }
            TaskAction::Kill { agent, grace } => {
                if !agent.is_empty() {
                    let order = KillOrder {
                        grace_ms: grace.as_millis() as u64,
                        term: rec.term,
                    };
                    store::put(b, &store::kill_key(&agent, id)?, &order).await?;
                }
            }
            // Relaunches are scheduled in the record itself (`relaunch_at`),
            // written before any action; publishing is the record write.
            TaskAction::Relaunch { .. } | TaskAction::PublishStatus => {}
        }
        Ok(())
    }
}

fn add(total: &mut Resources, r: &Resources) {
    total.cpus += r.cpus;
    total.mem_bytes += r.mem_bytes;
    total.disk_bytes += r.disk_bytes;
    total.ports.extend(&r.ports);
}
