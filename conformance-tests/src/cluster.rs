//! Task clusters: the supervisors and agents the `tasks::` cases run.
//!
//! Tasks are not a driver trait: they are implemented once, on top of the
//! other primitives, by whoever provides [`dprim::Tasks`] (in this project,
//! `dprim-runtime`). This crate cannot depend on that implementation, so the
//! `tasks::` cases get it through this interface: a [`TaskClusters`] factory
//! that the [`Harness`](crate::Harness) offers
//! ([`Harness::task_clusters`](crate::Harness::task_clusters)), building one
//! [`TaskCluster`] per case in that case's fresh namespace. Without a factory
//! the `tasks::` cases are reported skipped, saying so.

use async_trait::async_trait;
use dprim::tasks::Resources;
use dprim::{Backend, Result, TaskId, Tasks};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// An agent for [`TaskCluster::start_agent`]: its id, what it offers and
/// its attributes (for constraints).
#[derive(Clone, Debug, PartialEq)]
pub struct AgentSpec {
    /// The agent's id (a key segment).
    pub id: String,
    /// What it offers.
    pub resources: Resources,
    /// Its attributes.
    pub attributes: BTreeMap<String, String>,
}

/// One launch of a task: the agent that started it and the launch's number
/// (1 for the first; a relaunch gets the next).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Launch {
    /// The agent that started it.
    pub agent: String,
    /// The launch's number.
    pub number: u32,
}

/// Builds task clusters, one per `tasks::` case.
#[async_trait]
pub trait TaskClusters: Send + Sync {
    /// Starts an empty cluster (no supervisor, no agent) whose supervisors,
    /// agents and [`Tasks`] client all use `backend`'s namespace (the case's
    /// fresh one). `backend` is the case's first client, opened by the
    /// harness.
    async fn start(&self, backend: &Backend) -> Result<Box<dyn TaskCluster>>;
}

/// Supervisors and agents running tasks on one namespace, which a case
/// starts, kills, pauses and inspects.
///
/// A case ends by calling [`TaskCluster::stop`]. A case that panics or times
/// out drops the cluster instead, which must stop everything just as well,
/// without waiting where it cannot: no supervisor, agent (paused ones too)
/// or task process it started may outlive it.
#[async_trait]
pub trait TaskCluster: Send + Sync {
    /// The client cases launch and follow tasks with.
    fn tasks(&self) -> Arc<dyn Tasks>;

    /// The session TTL of the agents and supervisors.
    fn session_ttl(&self) -> Duration;

    /// Starts a supervisor named `name`; returns once some supervisor of
    /// the cluster leads (this one, or an earlier one it now stands by for).
    async fn start_supervisor(&mut self, name: &str) -> Result<()>;

    /// Starts a supervisor as [`TaskCluster::start_supervisor`] does, but
    /// one that forgets tasks done for good after `task_retention` instead
    /// of the cluster's usual retention (long enough that no other case
    /// sees a task forgotten).
    async fn start_supervisor_retaining(
        &mut self,
        name: &str,
        task_retention: Duration,
    ) -> Result<()>;

    /// The name of the supervisor that leads now, if any.
    async fn leader(&self) -> Result<Option<String>>;

    /// Ends supervisor `name` abruptly (as SIGKILL would: no resignation,
    /// its session simply stops being renewed).
    async fn kill_supervisor(&mut self, name: &str) -> Result<()>;

    /// Starts an agent; returns once it is registered (tasks can be placed
    /// on it).
    async fn start_agent(&mut self, agent: AgentSpec) -> Result<()>;

    /// Ends agent `id` abruptly (as SIGKILL would: no clean close, its
    /// session simply stops being renewed); its tasks keep running.
    async fn kill_agent(&mut self, id: &str) -> Result<()>;

    /// Freezes agent `id` (as SIGSTOP would): it does nothing and renews
    /// nothing until [`TaskCluster::resume_agent`]; its tasks keep running.
    async fn pause_agent(&mut self, id: &str) -> Result<()>;

    /// Lets a paused agent go on (as SIGCONT would).
    async fn resume_agent(&mut self, id: &str) -> Result<()>;

    /// Every launch of `task` an agent of this cluster started.
    async fn launches(&self, task: &TaskId) -> Result<Vec<Launch>>;

    /// Whether the process of `launch` still runs; `None` while its agent
    /// has not recorded a process for it.
    async fn launch_running(&self, task: &TaskId, launch: &Launch) -> Result<Option<bool>>;

    /// Keeps what the cluster wrote (logs, sandboxes) after it is stopped,
    /// for a failed case; returns where it is, if there is anything.
    fn keep(&mut self) -> Option<String>;

    /// Stops every supervisor and agent (paused ones too) and every task
    /// process they started, and waits until they are gone.
    async fn stop(&mut self);
}
