//! The task state machine: a pure function from (task, event) to (task,
//! actions). No I/O, no clocks read here (time comes in with the event), so
//! every transition is unit-tested and the supervisor and agents only carry
//! out the actions it returns.
//!
//! States follow Mesos. A task starts in STAGING (accepted, not placed),
//! moves to STARTING when placed on an agent, RUNNING when its process
//! started, and ends FINISHED (exit 0), FAILED (non-zero exit or could not
//! start) or KILLED (on request). If its agent's session is lost it becomes
//! UNREACHABLE (it may still be running); after the unreachable timeout it is
//! GONE (known dead). A task whose agent vanished before it started is
//! DROPPED. Terminal states accept no further event.

use dprim::tasks::{RestartPolicy, TaskState};
use std::fmt;
use std::time::{Duration, SystemTime};

/// What is known about one task, as the supervisor records it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskRecord {
    /// Current state.
    pub state: TaskState,
    /// The agent it is placed on, once placed.
    pub agent: Option<String>,
    /// Exit code, for FINISHED / FAILED after an exit.
    pub exit_code: Option<i32>,
    /// Why it is in this state.
    pub message: String,
    /// A kill was asked for; it ends KILLED, never relaunched.
    pub kill_requested: bool,
    /// Launches so far (1 for the first), for restart backoff.
    pub launches: u32,
    /// The restart policy from the task's spec.
    pub restart: RestartPolicy,
    /// When the state last changed.
    pub updated: SystemTime,
}

impl TaskRecord {
    /// A freshly accepted task.
    pub fn new(restart: RestartPolicy, now: SystemTime) -> TaskRecord {
        TaskRecord {
            state: TaskState::Staging,
            agent: None,
            exit_code: None,
            message: "waiting for an agent with enough free resources".into(),
            kill_requested: false,
            launches: 1,
            restart,
            updated: now,
        }
    }
}

/// Something that happened to a task.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskEvent {
    /// The placer chose an agent.
    Placed {
        /// The agent's id.
        agent: String,
    },
    /// No agent can take it now (stays STAGING, with the reason).
    Pending {
        /// Why no agent fits.
        reason: String,
    },
    /// The agent started the process.
    Started,
    /// The process exited by itself.
    Exited {
        /// Its exit code (a signal number N is reported as 128 + N).
        code: i32,
    },
    /// The agent could not start the process.
    LaunchFailed {
        /// Why.
        reason: String,
    },
    /// Someone asked to kill the task.
    KillRequested {
        /// How long to wait after SIGTERM before SIGKILL.
        grace: Duration,
    },
    /// The agent confirms the process ended because of a kill request.
    KilledByRequest,
    /// The task's agent lost its session.
    AgentLost,
    /// An agent that was lost came back and reports on the task.
    AgentReturned {
        /// Whether the process is still running there.
        running: bool,
    },
    /// The unreachable timeout passed without the agent coming back.
    UnreachableTimeout,
}

/// What the caller must do after a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskAction {
    /// Tell the agent to start the task.
    Assign {
        /// The agent.
        agent: String,
    },
    /// Tell the agent to kill the process: SIGTERM, SIGKILL after `grace`.
    Kill {
        /// The agent.
        agent: String,
        /// Grace period.
        grace: Duration,
    },
    /// Launch the task again (as a new launch of the same spec) after `after`.
    Relaunch {
        /// Backoff before the relaunch.
        after: Duration,
    },
    /// Publish the new status (every transition produces one).
    PublishStatus,
}

/// An event that is not allowed in the task's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IllegalTransition {
    /// The state the task was in.
    pub from: TaskState,
    /// The event, rendered.
    pub event: String,
}

impl fmt::Display for IllegalTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "event {} is not allowed in state {:?}",
            self.event, self.from
        )
    }
}

impl std::error::Error for IllegalTransition {}

/// First relaunch backoff; doubles per launch up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest relaunch backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

fn backoff(launches: u32) -> Duration {
    let doublings = launches.saturating_sub(1).min(16);
    (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)
}

/// Whether a task that ended in `state` is relaunched under `policy`.
fn relaunches(policy: RestartPolicy, state: TaskState, kill_requested: bool) -> bool {
    if kill_requested {
        return false;
    }
    match policy {
        RestartPolicy::Never => false,
        RestartPolicy::OnFailure => {
            matches!(
                state,
                TaskState::Failed | TaskState::Gone | TaskState::Dropped
            )
        }
        RestartPolicy::Always => state.is_terminal() && state != TaskState::Killed,
    }
}

/// Applies `event` to `task` at time `now`.
///
/// Returns the new record and the actions to carry out, or
/// [`IllegalTransition`] (the record is unchanged) for an event the state
/// does not allow — in particular any event after a terminal state.
pub fn step(
    task: &TaskRecord,
    event: TaskEvent,
    now: SystemTime,
) -> Result<(TaskRecord, Vec<TaskAction>), IllegalTransition> {
    use TaskEvent as E;
    use TaskState as S;
    let illegal = || IllegalTransition {
        from: task.state,
        event: format!("{event:?}"),
    };
    if task.state.is_terminal() {
        return Err(illegal());
    }
    let mut next = task.clone();
    let mut actions = Vec::new();
    let agent = task.agent.clone().unwrap_or_default();
    match (task.state, &event) {
        (S::Staging, E::Placed { agent }) => {
            next.state = S::Starting;
            next.agent = Some(agent.clone());
            next.message = format!("assigned to agent {agent}");
            actions.push(TaskAction::Assign {
                agent: agent.clone(),
            });
        }
        (S::Staging, E::Pending { reason }) => {
            if task.message == *reason {
                return Ok((next, actions));
            }
            next.message = reason.clone();
        }
        (S::Staging, E::KillRequested { .. }) => {
            next.state = S::Killed;
            next.kill_requested = true;
            next.message = "killed before it was placed".into();
        }
        (S::Starting, E::Started) | (S::Unreachable, E::AgentReturned { running: true }) => {
            next.state = S::Running;
            next.message = format!("running on agent {agent}");
        }
        (S::Starting | S::Running, E::Exited { code }) => {
            next.exit_code = Some(*code);
            if next.kill_requested {
                next.state = S::Killed;
                next.message = format!("killed on request (exit code {code})");
            } else if *code == 0 {
                next.state = S::Finished;
                next.message = "exited with code 0".into();
            } else {
                next.state = S::Failed;
                next.message = format!("exited with code {code}");
            }
        }
        (S::Starting, E::LaunchFailed { reason }) => {
            next.state = S::Failed;
            next.message = format!("could not start: {reason}");
        }
        (S::Starting | S::Running | S::Unreachable, E::KillRequested { grace }) => {
            next.kill_requested = true;
            next.message = "kill requested".into();
            actions.push(TaskAction::Kill {
                agent,
                grace: *grace,
            });
        }
        (S::Starting | S::Running, E::KilledByRequest) if task.kill_requested => {
            next.state = S::Killed;
            next.message = "killed on request".into();
        }
        (S::Starting | S::Running, E::AgentLost) => {
            next.state = S::Unreachable;
            next.message = format!("agent {agent} lost its session; the task may still be running");
        }
        (S::Unreachable, E::AgentReturned { running: false }) => {
            next.state = S::Gone;
            next.message = format!("agent {agent} came back without the task");
        }
        (S::Unreachable, E::UnreachableTimeout) => {
            next.state = S::Gone;
            next.message = format!("agent {agent} did not come back in time");
        }
        _ => return Err(illegal()),
    }
    next.updated = now;
    if next.state.is_terminal() && relaunches(next.restart, next.state, next.kill_requested) {
        actions.push(TaskAction::Relaunch {
            after: backoff(next.launches),
        });
    }
    actions.push(TaskAction::PublishStatus);
    Ok((next, actions))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH
    }

    fn run(task: TaskRecord, events: &[TaskEvent]) -> (TaskRecord, Vec<TaskAction>) {
        let mut task = task;
        let mut last = Vec::new();
        for e in events {
            let (next, actions) = step(&task, e.clone(), t0()).unwrap();
            task = next;
            last = actions;
        }
        (task, last)
    }

    fn placed() -> TaskEvent {
        TaskEvent::Placed { agent: "a1".into() }
    }

    #[test]
    fn happy_path_finishes() {
        let task = TaskRecord::new(RestartPolicy::Never, t0());
        let (t, a) = step(&task, placed(), t0()).unwrap();
        assert_eq!(t.state, TaskState::Starting);
        assert_eq!(a[0], TaskAction::Assign { agent: "a1".into() });
        let (t, a) = run(t, &[TaskEvent::Started, TaskEvent::Exited { code: 0 }]);
        assert_eq!((t.state, t.exit_code), (TaskState::Finished, Some(0)));
        assert_eq!(a, vec![TaskAction::PublishStatus]);
    }

    #[test]
    fn non_zero_exit_fails_with_code_and_relaunches_on_failure() {
        let task = TaskRecord::new(RestartPolicy::OnFailure, t0());
        let (t, a) = run(
            task,
            &[placed(), TaskEvent::Started, TaskEvent::Exited { code: 3 }],
        );
        assert_eq!((t.state, t.exit_code), (TaskState::Failed, Some(3)));
        assert!(a.contains(&TaskAction::Relaunch {
            after: FIRST_BACKOFF
        }));
    }

    #[test]
    fn kill_of_running_task_ends_killed_and_never_relaunches() {
        let task = TaskRecord::new(RestartPolicy::Always, t0());
        let (t, a) = run(
            task,
            &[
                placed(),
                TaskEvent::Started,
                TaskEvent::KillRequested {
                    grace: Duration::from_secs(5),
                },
            ],
        );
        assert_eq!(t.state, TaskState::Running);
        assert_eq!(
            a[0],
            TaskAction::Kill {
                agent: "a1".into(),
                grace: Duration::from_secs(5)
            }
        );
        let (t, a) = run(t, &[TaskEvent::Exited { code: 143 }]);
        assert_eq!(t.state, TaskState::Killed);
        assert_eq!(a, vec![TaskAction::PublishStatus]);
    }

    #[test]
    fn kill_of_staging_task_is_immediate() {
        let task = TaskRecord::new(RestartPolicy::Always, t0());
        let (t, _) = run(
            task,
            &[TaskEvent::KillRequested {
                grace: Duration::ZERO,
            }],
        );
        assert_eq!(t.state, TaskState::Killed);
    }

    #[test]
    fn agent_loss_goes_unreachable_then_gone_then_relaunch() {
        let task = TaskRecord::new(RestartPolicy::OnFailure, t0());
        let (t, _) = run(task, &[placed(), TaskEvent::Started, TaskEvent::AgentLost]);
        assert_eq!(t.state, TaskState::Unreachable);
        let (gone, a) = run(t.clone(), &[TaskEvent::UnreachableTimeout]);
        assert_eq!(gone.state, TaskState::Gone);
        assert!(a.contains(&TaskAction::Relaunch {
            after: FIRST_BACKOFF
        }));
        let (back, _) = run(t, &[TaskEvent::AgentReturned { running: true }]);
        assert_eq!(back.state, TaskState::Running);
    }

    #[test]
    fn terminal_states_reject_everything() {
        let task = TaskRecord::new(RestartPolicy::Never, t0());
        let (t, _) = run(
            task,
            &[placed(), TaskEvent::Started, TaskEvent::Exited { code: 0 }],
        );
        for e in [
            TaskEvent::Started,
            TaskEvent::AgentLost,
            TaskEvent::KillRequested {
                grace: Duration::ZERO,
            },
        ] {
            let err = step(&t, e, t0()).unwrap_err();
            assert_eq!(err.from, TaskState::Finished);
        }
    }

    #[test]
    fn illegal_transitions_are_rejected() {
        let task = TaskRecord::new(RestartPolicy::Never, t0());
        assert!(step(&task, TaskEvent::Started, t0()).is_err());
        assert!(step(&task, TaskEvent::Exited { code: 0 }, t0()).is_err());
        assert!(step(&task, TaskEvent::AgentLost, t0()).is_err());
        let (t, _) = run(task, &[placed()]);
        assert!(step(&t, placed(), t0()).is_err());
        assert!(
            step(&t, TaskEvent::KilledByRequest, t0()).is_err(),
            "no kill was requested"
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(100), MAX_BACKOFF);
    }

    #[test]
    fn always_relaunches_finished_tasks_but_never_killed_ones() {
        let task = TaskRecord::new(RestartPolicy::Always, t0());
        let (_, a) = run(
            task,
            &[placed(), TaskEvent::Started, TaskEvent::Exited { code: 0 }],
        );
        assert!(a.iter().any(|x| matches!(x, TaskAction::Relaunch { .. })));
    }

    #[test]
    fn repeated_pending_reason_is_not_a_new_status() {
        let task = TaskRecord::new(RestartPolicy::Never, t0());
        let reason = "no agent has 64 cpus free".to_string();
        let (t, a) = step(
            &task,
            TaskEvent::Pending {
                reason: reason.clone(),
            },
            t0(),
        )
        .unwrap();
        assert_eq!(a, vec![TaskAction::PublishStatus]);
        let (_, a) = step(&t, TaskEvent::Pending { reason }, t0()).unwrap();
        assert!(a.is_empty());
    }
}
