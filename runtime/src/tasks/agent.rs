//! An agent: registers itself and its resources as an ephemeral key of its
//! session, runs the tasks assigned to it as child processes, and reports
//! what happens to them. Reports that cannot be written (backend
//! unreachable) are kept in order and written when it can.

use super::process::{Enforcement, TaskProcess};
use super::store::{self, AgentInfo, Assignment, KillOrder, Report, ReportEvent};
use dprim::tasks::Resources;
use dprim::{Backend, Result, Session};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
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
    /// Sandboxes go under `<work_dir>/<task>/<launch>`.
    pub work_dir: PathBuf,
    /// TTL of the agent's session.
    pub session_ttl: Duration,
    /// How often it looks for assignments and kill orders.
    pub interval: Duration,
}

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

/// One agent.
pub struct Agent {
    backend: Backend,
    enforcement: Enforcement,
    config: AgentConfig,
    seq: u64,
    outbox: VecDeque<(String, Report)>,
}

impl Agent {
    /// An agent on `backend`.
    pub fn new(backend: Backend, config: AgentConfig) -> Agent {
        // Report sequence numbers must grow across agent restarts too.
        let seq = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let enforcement = Enforcement::detect();
        tracing::info!(agent = %config.id, enforcement = %enforcement.describe(), "resource enforcement");
        Agent {
            backend,
            enforcement,
            config,
            seq,
            outbox: VecDeque::new(),
        }
    }

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

    fn report(&mut self, task: &str, launch: u32, event: ReportEvent) {
        self.seq += 1;
        let report = Report {
            agent: self.config.id.clone(),
            launch,
            seq: self.seq,
            event,
        };
        self.outbox.push_back((task.to_string(), report));
    }

    async fn flush(&mut self) {
        while let Some((task, report)) = self.outbox.front() {
            let written = match store::report_key(task, report.launch) {
                Ok(key) => store::put(&self.backend, &key, report).await,
                Err(e) => Err(e),
            };
            match written {
                Ok(_) => {
                    self.outbox.pop_front();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write a task report yet; keeping it");
                    return;
                }
            }
        }
    }

    /// Runs until `shutdown` resolves; then kills its tasks and leaves.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        let mut session = self.register().await?;
        let mut running: HashMap<String, Running> = HashMap::new();
        let mut done: HashSet<(String, u32)> = HashSet::new();
        let (exit_tx, mut exit_rx) = mpsc::unbounded_channel::<Exit>();
        let mut waker = store::Waker::new(
            self.backend.clone(),
            vec![
                store::assign_dir(&self.config.id)?,
                store::kill_dir(&self.config.id)?,
            ],
        );
        loop {
            if session.check().is_err() {
                tracing::warn!(agent = %self.config.id, "agent session lost; registering again");
                match self.register().await {
                    Ok(s) => {
                        session = s;
                        // Tell the supervisor which tasks still run here: it
                        // marked them UNREACHABLE while the agent was gone.
                        let alive: Vec<(String, u32)> =
                            running.iter().map(|(t, r)| (t.clone(), r.launch)).collect();
                        for (task, launch) in alive {
                            self.report(&task, launch, ReportEvent::Started);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "re-registration failed"),
                }
            }
            if let Err(e) = self.poll(&mut running, &mut done, &exit_tx).await {
                tracing::warn!(error = %e, "agent poll failed");
            }
            while let Ok(exit) = exit_rx.try_recv() {
                running.remove(&exit.task);
                done.insert((exit.task.clone(), exit.launch));
                let event = if exit.killed {
                    ReportEvent::KilledByRequest
                } else {
                    ReportEvent::Exited { code: exit.code }
                };
                self.report(&exit.task, exit.launch, event);
            }
            self.flush().await;
            tokio::select! {
                _ = &mut shutdown => break,
                Some(exit) = exit_rx.recv() => {
                    running.remove(&exit.task);
                    done.insert((exit.task.clone(), exit.launch));
                    let event = if exit.killed { ReportEvent::KilledByRequest } else { ReportEvent::Exited { code: exit.code } };
                    self.report(&exit.task, exit.launch, event);
                    self.flush().await;
                }
                _ = waker.changed() => {}
                _ = tokio::time::sleep(self.config.interval) => {}
            }
        }
        for (_, r) in running.iter_mut() {
            if let Some(kill) = r.kill.take() {
                let _ = kill.send(Duration::from_secs(5));
            }
        }
        let _ = session.close().await;
        Ok(())
    }

    async fn poll(
        &mut self,
        running: &mut HashMap<String, Running>,
        done: &mut HashSet<(String, u32)>,
        exits: &mpsc::UnboundedSender<Exit>,
    ) -> Result<()> {
        let me = self.config.id.clone();
        let assignments: BTreeMap<String, (Assignment, _)> =
            store::list(&self.backend, &store::assign_dir(&me)?).await?;
        for (task, (a, _)) in &assignments {
            let task = task.clone();
            if running.contains_key(&task) || done.contains(&(task.clone(), a.launch)) {
                continue;
            }
            let sandbox = self.config.work_dir.join(&task).join(a.launch.to_string());
            match TaskProcess::spawn(&a.spec, &sandbox, &self.enforcement) {
                Ok(mut process) => {
                    let (kill_tx, kill_rx) = oneshot::channel::<Duration>();
                    running.insert(
                        task.clone(),
                        Running {
                            launch: a.launch,
                            kill: Some(kill_tx),
                            kill_sent: false,
                        },
                    );
                    self.report(&task, a.launch, ReportEvent::Started);
                    let exits = exits.clone();
                    let launch = a.launch;
                    tokio::spawn(async move {
                        let (code, killed) = tokio::select! {
                            code = process.wait() => (code.unwrap_or(-1), false),
                            grace = kill_rx => match grace {
                                Ok(grace) => (process.kill(grace).await.unwrap_or(-1), true),
                                Err(_) => (process.wait().await.unwrap_or(-1), false),
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
                Err(e) => {
                    self.report(
                        &task,
                        a.launch,
                        ReportEvent::LaunchFailed {
                            reason: e.message().to_string(),
                        },
                    );
                    // Not retried for this launch; the supervisor decides.
                    done.insert((task, a.launch));
                }
            }
        }
        // A task running here that is no longer assigned here (the
        // supervisor declared it GONE and replaced it while this agent was
        // unreachable) must not keep running beside its replacement.
        for (task, r) in running.iter_mut() {
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
        let kills: BTreeMap<String, (KillOrder, _)> =
            store::list(&self.backend, &store::kill_dir(&me)?).await?;
        for (task, (order, _)) in kills {
            if let Some(r) = running.get_mut(&task) {
                if !r.kill_sent {
                    if let Some(kill) = r.kill.take() {
                        let _ = kill.send(Duration::from_millis(order.grace_ms));
                    }
                    r.kill_sent = true;
                }
            }
        }
        Ok(())
    }
}
