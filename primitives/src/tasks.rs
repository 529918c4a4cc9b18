//! Tasks: launching processes on agent machines.
//!
//! The trait and its types are part of the contract now; the implementation
//! (agents, supervisor, placement) lives in `dprim-runtime` and is built on
//! the other primitives only, so it works on every backend.

use crate::error::{Error, Result};
use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

/// Identifies a task.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct TaskId(pub String);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Mesos task states.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskState {
    /// Accepted, waiting for placement on an agent.
    Staging,
    /// Assigned to an agent, which is starting it.
    Starting,
    /// The process is running.
    Running,
    /// Exited with code 0. Terminal.
    Finished,
    /// Exited non-zero or could not start. Terminal.
    Failed,
    /// Killed on request. Terminal.
    Killed,
    /// The agent's session was lost; the task may still be running.
    Unreachable,
    /// Known dead with its agent. Terminal.
    Gone,
    /// Never started (e.g. its agent vanished before launch). Terminal.
    Dropped,
    /// Nothing is known about the task.
    Unknown,
}

impl TaskState {
    /// Whether no further transition can happen.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Finished
                | TaskState::Failed
                | TaskState::Killed
                | TaskState::Gone
                | TaskState::Dropped
        )
    }
}

/// Resources a task asks for or an agent offers.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct Resources {
    /// CPU shares (1.0 = one core).
    pub cpus: f64,
    /// Memory in bytes.
    pub mem_bytes: u64,
    /// Disk in bytes.
    pub disk_bytes: u64,
    /// TCP ports.
    pub ports: Vec<u16>,
}

/// A placement constraint on agent attributes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Constraint {
    /// The attribute must equal the value.
    Equals(String, String),
    /// The attribute must not equal the value.
    NotEquals(String, String),
}

/// When to relaunch a task that ended or whose agent was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// Never relaunch.
    #[default]
    Never,
    /// Relaunch after FAILED or GONE.
    OnFailure,
    /// Relaunch after any terminal state but KILLED.
    Always,
}

/// What to run.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Program to execute.
    pub command: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Resources reserved for it.
    pub resources: Resources,
    /// Where it may run.
    pub constraints: Vec<Constraint>,
    /// What happens when it ends.
    pub restart: RestartPolicy,
}

impl TaskSpec {
    /// Checks the spec.
    pub fn validate(&self) -> Result<()> {
        if self.command.trim().is_empty() {
            return Err(Error::invalid("task has no command"));
        }
        let r = &self.resources;
        if !r.cpus.is_finite() || r.cpus < 0.0 {
            return Err(Error::invalid(format!(
                "cpus must be a non-negative number, got {}",
                r.cpus
            )));
        }
        Ok(())
    }
}

/// A task's latest known status.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskStatus {
    /// The task.
    pub id: TaskId,
    /// Its state.
    pub state: TaskState,
    /// The agent it is (or was) on.
    pub agent: Option<String>,
    /// Exit code, for FINISHED / FAILED.
    pub exit_code: Option<i32>,
    /// Why it is in this state (pending reason, failure message).
    pub message: String,
    /// When the status was recorded.
    pub updated: SystemTime,
}

/// One page of a reconciliation.
#[derive(Clone, Debug)]
pub struct ReconcilePage {
    /// Statuses on this page.
    pub statuses: Vec<TaskStatus>,
    /// Pass back to get the next page; `None` on the last page.
    pub next: Option<String>,
}

/// Launching and following tasks.
///
/// Tasks run on agents (processes that register what they offer and run
/// tasks as child processes, each with a session); one elected supervisor
/// among several places them and follows their agents.
///
/// # Behavior
/// - A task whose command exits 0 ends FINISHED with exit code 0.
/// - A task whose command exits non-zero ends FAILED with that exit code.
/// - A task that needs more than any agent has stays STAGING, its message
///   saying it needs more than any agent has.
/// - A task runs only on an agent whose attributes satisfy all of its
///   constraints.
/// - A task whose restart policy is `OnFailure` is launched again after it
///   fails, until a launch succeeds.
/// - When an agent dies, its tasks become UNREACHABLE within the session TTL
///   plus one second, and a task whose restart policy allows it is
///   relaunched on another agent.
/// - An agent that was cut off longer than its session TTL (paused, or
///   partitioned) and comes back kills the tasks that were replaced while
///   it was away.
/// - An agent whose session ended before it started a task assigned to it,
///   and that comes back before the task is declared GONE, starts it then.
/// - When the leading supervisor dies, a standby takes over, and no task is
///   lost or launched twice.
#[async_trait]
pub trait Tasks: Send + Sync {
    /// Accepts a task for launch.
    ///
    /// # Behavior
    /// Returns once the task is recorded in STAGING; it is then placed and started.
    async fn launch(&self, spec: TaskSpec) -> Result<TaskId>;
    /// Kills a task: SIGTERM, then SIGKILL after `grace`.
    ///
    /// # Behavior
    /// A killed task ends KILLED once its process is gone.
    async fn kill(&self, id: &TaskId, grace: Duration) -> Result<()>;
    /// The latest status; `NotFound` for an unknown id.
    ///
    /// # Behavior
    /// A task done for good (FINISHED, FAILED, KILLED, GONE or DROPPED, with
    /// no relaunch due) is forgotten once the supervisor's task retention has
    /// passed: `status` is then `NotFound`, and reconciliation reports it
    /// UNKNOWN.
    async fn status(&self, id: &TaskId) -> Result<TaskStatus>;
    /// Every status update from now on (at-least-once).
    ///
    /// # Behavior
    /// - When updates may have been missed (the backend could not prove
    ///   the watch's continuity, e.g. across a reconnect), the stream yields
    ///   an error of kind `Resync` and ends: reconcile, then watch again.
    async fn watch(&self) -> Result<BoxStream<'static, Result<TaskStatus>>>;
    /// What is known about `ids` (explicit) or every task (implicit, `None`), paginated.
    ///
    /// # Behavior
    /// Implicit reconciliation returns every task, page by page; explicit
    /// reconciliation answers in the order asked, UNKNOWN for an id nobody
    /// knows.
    async fn reconcile(
        &self,
        ids: Option<Vec<TaskId>>,
        page: Option<String>,
    ) -> Result<ReconcilePage>;
}
