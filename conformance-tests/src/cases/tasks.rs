// Tasks: app-level scenarios with supervisors and agents running real
// processes on the backend under test, through the harness's task cluster
// (see cluster.rs): launch and finish, failure with the exit code, kill,
// a task too big for any agent, constraints, restart on failure, a killed
// agent, a paused agent, a killed supervisor leader, and reconciliation.

use super::case;
use crate::util::{ensure, ensure_eq, expect_err, fail, Context, QUIET};
use crate::{AgentSpec, Case, CaseResult, Ctx, Fail, Launch, Requirement, TaskCluster};
use dprim::tasks::{Constraint, Resources, RestartPolicy, TaskSpec, TaskState, TaskStatus};
use dprim::{ErrorKind, TaskId, Tasks};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(
            "tasks::launch_and_finish",
            launch_and_finish,
            [Requirement::TaskCluster],
            "A task whose command exits 0 ends FINISHED with exit code 0."
        ),
        case!(
            "tasks::nonzero_exit_fails_with_code",
            nonzero_exit_fails_with_code,
            [Requirement::TaskCluster],
            "A task whose command exits non-zero ends FAILED with that exit code."
        ),
        case!(
            "tasks::kill_ends_killed",
            kill_ends_killed,
            [Requirement::TaskCluster],
            "A killed task ends KILLED once its process is gone."
        ),
        case!(
            "tasks::too_big_stays_pending_with_reason",
            too_big_stays_pending_with_reason,
            [Requirement::TaskCluster],
            "A task that needs more than any agent has stays STAGING, its message saying it needs more than any agent has."
        ),
        case!(
            "tasks::constraints_respected",
            constraints_respected,
            [Requirement::TaskCluster],
            "A task runs only on an agent whose attributes satisfy all of its constraints."
        ),
        case!(
            "tasks::on_failure_relaunched",
            on_failure_relaunched,
            [Requirement::TaskCluster],
            "A task whose restart policy is `OnFailure` is launched again after it fails, until a launch succeeds."
        ),
        case!(
            "tasks::killed_agent_unreachable_then_relaunched",
            killed_agent_unreachable_then_relaunched,
            [Requirement::TaskCluster],
            "When an agent dies, its tasks become UNREACHABLE within the session TTL plus one second, and a task whose restart policy allows it is relaunched on another agent."
        ),
        case!(
            "tasks::paused_agent_kills_replaced_task",
            paused_agent_kills_replaced_task,
            [Requirement::TaskCluster],
            "An agent that was cut off longer than its session TTL (paused, or partitioned) and comes back kills the tasks that were replaced while it was away."
        ),
        case!(
            "tasks::agent_back_in_time_starts_its_assignment",
            agent_back_in_time_starts_its_assignment,
            [Requirement::TaskCluster],
            "An agent whose session ended before it started a task assigned to it, and that comes back before the task is declared GONE, starts it then."
        ),
        case!(
            "tasks::supervisor_failover_loses_nothing",
            supervisor_failover_loses_nothing,
            [Requirement::TaskCluster],
            "When the leading supervisor dies, a standby takes over, and no task is lost or launched twice."
        ),
        case!(
            "tasks::reconcile_returns_every_task",
            reconcile_returns_every_task,
            [Requirement::TaskCluster],
            "Implicit reconciliation returns every task, page by page; explicit reconciliation answers in the order asked, UNKNOWN for an id nobody knows."
        ),
        case!(
            "tasks::done_task_forgotten_after_retention",
            done_task_forgotten_after_retention,
            [Requirement::TaskCluster],
            "A task done for good (FINISHED, FAILED, KILLED, GONE or DROPPED, with no relaunch due) is forgotten once the supervisor's task retention has passed: `status` is then `NotFound`, and reconciliation reports it UNKNOWN."
        ),
    ]
}

/// How long a case waits for something the contract says will happen
/// (placement, a process starting or ending, a failover): far longer than
/// it should take; the cases check behaviour, not speed.
const TASK_WAIT: Duration = Duration::from_secs(30);

/// How often a case polls a task's status.
const POLL: Duration = Duration::from_millis(20);

/// The task retention of the supervisor in the case about forgetting.
const SHORT_RETENTION: Duration = Duration::from_secs(2);

/// The harness's task cluster with the helpers the cases share.
struct Cluster {
    inner: Box<dyn TaskCluster>,
    tasks: Arc<dyn Tasks>,
}

impl Cluster {
    async fn start(ctx: &Ctx) -> Result<Cluster, Fail> {
        let inner = ctx.task_cluster().await?;
        let tasks = inner.tasks();
        Ok(Cluster { inner, tasks })
    }

    /// Ends the case, stopping everything the cluster started; a failure
    /// says where the cluster's logs were kept.
    async fn finish(mut self, result: CaseResult) -> CaseResult {
        let result = match result {
            Err(Fail::Failed(reason)) => Err(Fail::Failed(match self.inner.keep() {
                Some(logs) => format!("{reason} (cluster logs kept in {logs})"),
                None => reason,
            })),
            other => other,
        };
        self.inner.stop().await;
        result
    }

    async fn supervisor(&mut self, name: &str) -> Result<(), Fail> {
        self.inner
            .start_supervisor(name)
            .await
            .ctx(&format!("start supervisor {name}"))
    }

    async fn agent(&mut self, id: &str, cpus: f64, zone: &str) -> Result<(), Fail> {
        self.inner
            .start_agent(AgentSpec {
                id: id.to_string(),
                resources: Resources {
                    cpus,
                    mem_bytes: 1 << 30,
                    disk_bytes: 1 << 30,
                    ports: Vec::new(),
                },
                attributes: [("zone".to_string(), zone.to_string())].into(),
            })
            .await
            .ctx(&format!("start agent {id}"))
    }

    async fn launch(&self, spec: TaskSpec) -> Result<TaskId, Fail> {
        let id = self.tasks.launch(spec).await.ctx("launch a task")?;
        // Recorded once launch returns: its status is known at once.
        self.status(&id).await?;
        Ok(id)
    }

    /// Implicit reconciliation, page by page; fails past `most` pages
    /// (a reconciliation that never ends).
    async fn reconcile_implicit(&self, most: usize) -> Result<Vec<Vec<TaskStatus>>, Fail> {
        let mut pages = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .tasks
                .reconcile(None, after.take())
                .await
                .ctx("implicit reconciliation")?;
            pages.push(page.statuses);
            ensure!(
                pages.len() <= most,
                "reconciliation never ends: {} pages",
                pages.len()
            );
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(pages),
            }
        }
    }

    /// Explicit reconciliation of `ids`: each task's id and state, in the
    /// order answered, and whether a next page was offered.
    async fn reconcile_explicit(
        &self,
        ids: Vec<TaskId>,
    ) -> Result<(Vec<(TaskId, TaskState)>, bool), Fail> {
        let page = self
            .tasks
            .reconcile(Some(ids), None)
            .await
            .ctx("explicit reconciliation")?;
        let answered = page
            .statuses
            .iter()
            .map(|s| (s.id.clone(), s.state))
            .collect();
        Ok((answered, page.next.is_some()))
    }

    async fn status(&self, id: &TaskId) -> Result<TaskStatus, Fail> {
        self.tasks
            .status(id)
            .await
            .ctx(&format!("status of task {id}"))
    }

    /// Polls `id`'s status until `ok` holds, for at most [`TASK_WAIT`].
    async fn wait(
        &self,
        id: &TaskId,
        what: &str,
        ok: impl Fn(&TaskStatus) -> bool,
    ) -> Result<TaskStatus, Fail> {
        let deadline = Instant::now() + TASK_WAIT;
        loop {
            let status = self.status(id).await?;
            if ok(&status) {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                fail!(
                    "task {id} never {what} within {}; last status {}",
                    humantime::format_duration(TASK_WAIT),
                    show(&status)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn wait_state(&self, id: &TaskId, state: TaskState) -> Result<TaskStatus, Fail> {
        self.wait(id, &format!("reached {state:?}"), |s| s.state == state)
            .await
    }

    /// The launch of `id` on `agent` (its only one there).
    async fn launch_on(&self, id: &TaskId, agent: &str) -> Result<Launch, Fail> {
        let deadline = Instant::now() + TASK_WAIT;
        loop {
            let launches = self.launches(id).await?;
            if let Some(l) = launches.iter().find(|l| l.agent == agent) {
                return Ok(l.clone());
            }
            if Instant::now() >= deadline {
                fail!("agent {agent} never started task {id}; launches: {launches:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn launches(&self, id: &TaskId) -> Result<Vec<Launch>, Fail> {
        self.inner
            .launches(id)
            .await
            .ctx(&format!("launches of task {id}"))
    }

    /// Waits until the process of `launch` runs (`true`) or is gone
    /// (`false`).
    async fn wait_process(&self, id: &TaskId, launch: &Launch, running: bool) -> Result<(), Fail> {
        let deadline = Instant::now() + TASK_WAIT;
        loop {
            let now = self
                .inner
                .launch_running(id, launch)
                .await
                .ctx(&format!("whether launch {launch:?} of task {id} runs"))?;
            if now == Some(running) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                fail!(
                    "the process of launch {} of task {id} on agent {} {} (recorded and running: {now:?})",
                    launch.number,
                    launch.agent,
                    if running { "never ran" } else { "still runs" }
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

fn show(s: &TaskStatus) -> String {
    format!(
        "{:?} on {} (exit code {:?}): {:?}",
        s.state,
        s.agent.as_deref().unwrap_or("no agent"),
        s.exit_code,
        s.message
    )
}

/// `sh -c script`, asking for `cpus`.
fn shell(script: &str, cpus: f64) -> TaskSpec {
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

async fn launch_and_finish(ctx: Ctx) -> CaseResult {
    let mut c = Cluster::start(&ctx).await?;
    let result = async {
        c.supervisor("s1").await?;
        c.agent("a1", 2.0, "z1").await?;
        let id = c.launch(shell("true", 0.5)).await?;
        let s = c.wait_state(&id, TaskState::Finished).await?;
        ensure_eq!(s.exit_code, Some(0), "exit code of a FINISHED task");
        ensure_eq!(s.agent.as_deref(), Some("a1"), "agent of the task");
        let launches = c.launches(&id).await?;
        ensure_eq!(launches.len(), 1, "launches of the task ({launches:?})");
        Ok(())
    }
    .await;
    c.finish(result).await
}

async fn nonzero_exit_fails_with_code(ctx: Ctx) -> CaseResult {
    let mut c = Cluster::start(&ctx).await?;
    let result = async {
        c.supervisor("s1").await?;
        c.agent("a1", 2.0, "z1").await?;
        let id = c.launch(shell("exit 7", 0.5)).await?;
        let s = c.wait_state(&id, TaskState::Failed).await?;
        ensure_eq!(s.exit_code, Some(7), "exit code of the FAILED task");
        Ok(())
    }
    .await;
    c.finish(result).await
}

async fn kill_ends_killed(ctx: Ctx) -> CaseResult {
    let mut c = Cluster::start(&ctx).await?;
    let result = async {
        c.supervisor("s1").await?;
        c.agent("a1", 2.0, "z1").await?;
        let id = c.launch(shell("exec sleep 60", 0.5)).await?;
        c.wait_state(&id, TaskState::Running).await?;
        let launch = c.launch_on(&id, "a1").await?;
        c.wait_process(&id, &launch, true).await?;
        c.tasks
            .kill(&id, Duration::from_secs(1))
            .await
            .ctx("kill the task")?;
        let s = c.wait_state(&id, TaskState::Killed).await?;
        ensure!(
            c.inner
                .launch_running(&id, &launch)
                .await
                .ctx("whether the killed task runs")?
                == Some(false),
            "task {id} is {} but its process still runs",
            show(&s)
        );
        Ok(())
    }
    .await;
    c.finish(result).await
}

async fn too_big_stays_pending_with_reason(ctx: Ctx) -> CaseResult {
    let mut c = Cluster::start(&ctx).await?;
    let result = async {
        c.supervisor("s1").await?;
        c.agent("a1", 2.0, "z1").await?;
        c.agent("a2", 2.0, "z2").await?;
        let id = c.launch(shell("true", 64.0)).await?;
        let s = c
            .wait(&id, "said it needs more than any agent has", |s| {
                s.message.contains("more than any agent")
            })
            .await?;
        ensure_eq!(
            s.state,
            TaskState::Staging,
            "state of the task too big to place"
        );
        // And it stays so: nothing places it later.
        tokio::time::sleep(QUIET).await;
        let s = c.status(&id).await?;
        ensure_eq!(
            s.state,
            TaskState::Staging,
            "state of the task too big to place, later"
        );
        let launches = c.launches(&id).await?;
        ensure!(
            launches.is_empty(),
            "the task too big for any agent was launched: {launches:?}"
        );
        Ok(())
    }
    .await;
    c.finish(result).await
}

async fn constraints_respected(ctx: Ctx) -> CaseResult {
    let mut c = Cluster::start(&ctx).await?;
    let result = async {
        c.supervisor("s1").await?;
        c.agent("a1", 2.0, "z1").await?;
        c.agent("a2", 2.0, "z2").await?;
        let mut ids = Vec::new();
        for constraint in [
            Constraint::Equals("zone".into(), "z2".into()),
            Constraint::NotEquals("zone".into(), "z1".into()),
            Constraint::Equals("zone".into(), "z2".into()),
            Constraint::NotEquals("zone".into(), "z1".into()),
        ] {
            let mut spec = shell("true", 0.5);
            spec.constraints = vec![constraint.clone()];
            ids.push((c.launch(spec).await?, constraint));
        }
        for (id, constraint) in &ids {
            let s = c.wait_state(id, TaskState::Finished).await?;
            ensure_eq!(
                s.agent.as_deref(),
                Some("a2"),
                "agent of task {id} with constraint {constraint:?}"
            );
        }
        Ok(())
    }
    .await;
    c.finish(result).await
}

async fn on_failure_relaunched(ctx: Ctx) -> CaseResult {
    let mut c = Cluster::start(&ctx).await?;
    let result = async {
        c.supervisor("s1").await?;
        // One agent: the flag the first launch leaves in the task's
        // directory (beside its launches' sandboxes) is there for the next.
        c.agent("a1", 2.0, "z1").await?;
        let mut spec = shell("test -e ../flag || { touch ../flag; exit 1; }", 0.5);
        spec.restart = RestartPolicy::OnFailure;
        let id = c.launch(spec).await?;
        let s = c.wait_state(&id, TaskState::Finished).await?;
        ensure_eq!(s.exit_code, Some(0), "exit code of the relaunched task");
        let launches = c.launches(&id).await?;
        ensure_eq!(
            launches.len(),
            2,
            "launches of a task that failed once ({launches:?})"
        );
        Ok(())
    }
    .await;
    c.finish(result).await
}

async fn killed_agent_unreachable_then_relaunched(ctx: Ctx) -> CaseResult {
    let mut c = Cluster::start(&ctx).await?;
    let result = async {
        c.supervisor("s1").await?;
        // a2 starts first, so its report sequence numbers start below
        // a1's: a relaunch there must still be followed (sequence numbers
        // are only compared within one launch).
        c.agent("a2", 1.0, "z2").await?;
        c.agent("a1", 1.0, "z1").await?;
        let mut spec = shell("exec sleep 60", 1.0);
        spec.restart = RestartPolicy::OnFailure;
        let id = c.launch(spec).await?;
        let first = c.wait_state(&id, TaskState::Running).await?;
        let victim = first.agent.clone().ctx("agent of the RUNNING task")?;
        let killed_at = Instant::now();
        c.inner
            .kill_agent(&victim)
            .await
            .ctx(&format!("kill agent {victim}"))?;
        c.wait_state(&id, TaskState::Unreachable).await?;
        let noticed = killed_at.elapsed();
        let limit = c.inner.session_ttl() + Duration::from_secs(1);
        ensure!(
            noticed <= limit,
            "task {id} became UNREACHABLE {} after its agent was killed; the limit is the session TTL plus one second ({})",
            humantime::format_duration(noticed),
            humantime::format_duration(limit)
        );
        let moved = c
            .wait(&id, "ran on the other agent", |s| {
                s.state == TaskState::Running && s.agent.as_deref() != Some(victim.as_str())
            })
            .await?;
        ensure!(
            moved.agent.is_some(),
            "the relaunched task names no agent: {}",
            show(&moved)
        );
        Ok(())
    }
    .await;
    c.finish(result).await
}

async fn paused_agent_kills_replaced_task(ctx: Ctx) -> CaseResult {
    let mut c = Cluster::start(&ctx).await?;
    let result = async {
        c.supervisor("s1").await?;
        c.agent("a1", 1.0, "z1").await?;
        c.agent("a2", 1.0, "z2").await?;
        let mut spec = shell("exec sleep 60", 1.0);
        spec.restart = RestartPolicy::OnFailure;
        let id = c.launch(spec).await?;
        let first = c.wait_state(&id, TaskState::Running).await?;
        let paused = first.agent.clone().ctx("agent of the RUNNING task")?;
        let old = c.launch_on(&id, &paused).await?;
        c.wait_process(&id, &old, true).await?;
        c.inner
            .pause_agent(&paused)
            .await
            .ctx(&format!("pause agent {paused}"))?;
        // Replaced elsewhere: the paused agent's session expired (it was
        // paused longer than its TTL) and the task was declared GONE.
        let replaced = c
            .wait(&id, "was replaced on the other agent", |s| {
                s.state == TaskState::Running && s.agent.as_deref() != Some(paused.as_str())
            })
            .await?;
        let replacement = replaced.agent.clone().ctx("agent of the replacement")?;
        ensure!(
            c.inner
                .launch_running(&id, &old)
                .await
                .ctx("whether the replaced launch runs")?
                == Some(true),
            "the replaced launch ended while its agent was paused; nothing left to check"
        );
        c.inner
            .resume_agent(&paused)
            .await
            .ctx(&format!("resume agent {paused}"))?;
        // Back from its pause, the agent kills the task it no longer owns...
        c.wait_process(&id, &old, false).await?;
        // ...and only that one: the replacement runs on.
        let new = c.launch_on(&id, &replacement).await?;
        tokio::time::sleep(QUIET).await;
        let s = c.status(&id).await?;
        ensure!(
            s.state == TaskState::Running && s.agent.as_deref() == Some(replacement.as_str()),
            "after the replaced launch was killed the task is {}, not RUNNING on {replacement}",
            show(&s)
        );
        ensure!(
            c.inner
                .launch_running(&id, &new)
                .await
                .ctx("whether the replacement runs")?
                == Some(true),
            "the replacement on {replacement} does not run any more"
        );
        Ok(())
    }
    .await;
    c.finish(result).await
}

async fn agent_back_in_time_starts_its_assignment(ctx: Ctx) -> CaseResult {
    let mut c = Cluster::start(&ctx).await?;
    let result = async {
        c.supervisor("s1").await?;
        c.agent("a1", 1.0, "z1").await?;
        c.inner.pause_agent("a1").await.ctx("pause agent a1")?;
        // Placed on a1, still registered, which cannot start it now.
        let id = c.launch(shell("exit 0", 1.0)).await?;
        c.wait(&id, "was assigned to a1", |s| {
            s.state == TaskState::Starting && s.agent.as_deref() == Some("a1")
        })
        .await?;
        // a1's session ends: the assigned task is UNREACHABLE...
        c.wait_state(&id, TaskState::Unreachable).await?;
        // ...and a1 comes back before it is declared GONE.
        c.inner.resume_agent("a1").await.ctx("resume agent a1")?;
        let end = c.wait(&id, "ended", |s| s.state.is_terminal()).await?;
        ensure!(
            end.state == TaskState::Finished && end.agent.as_deref() == Some("a1"),
            "the task assigned to a1 before its session ended is {}, not FINISHED on a1",
            show(&end)
        );
        ensure_eq!(c.launches(&id).await?.len(), 1, "launches of task {id}");
        Ok(())
    }
    .await;
    c.finish(result).await
}

async fn supervisor_failover_loses_nothing(ctx: Ctx) -> CaseResult {
    let mut c = Cluster::start(&ctx).await?;
    let result = async {
        c.supervisor("s1").await?;
        c.supervisor("s2").await?;
        c.agent("a1", 4.0, "z1").await?;
        c.agent("a2", 4.0, "z2").await?;
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(c.launch(shell("sleep 1", 0.5)).await?);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let leader = c
            .inner
            .leader()
            .await
            .ctx("the leading supervisor")?
            .ctx("the leading supervisor")?;
        c.inner
            .kill_supervisor(&leader)
            .await
            .ctx(&format!("kill supervisor {leader}"))?;
        for _ in 0..4 {
            ids.push(c.launch(shell("sleep 1", 0.5)).await?);
        }
        for id in &ids {
            c.wait_state(id, TaskState::Finished).await?;
        }
        let now = c.inner.leader().await.ctx("the leading supervisor")?;
        ensure!(
            now.as_ref().is_some_and(|l| *l != leader),
            "the standby does not lead after {leader} was killed (leader: {now:?})"
        );
        for id in &ids {
            let launches = c.launches(id).await?;
            ensure_eq!(launches.len(), 1, "launches of task {id} ({launches:?})");
        }
        Ok(())
    }
    .await;
    c.finish(result).await
}

async fn reconcile_returns_every_task(ctx: Ctx) -> CaseResult {
    let mut c = Cluster::start(&ctx).await?;
    let result = async {
        c.supervisor("s1").await?;
        c.agent("a1", 2.0, "z1").await?;
        let ok = c.launch(shell("true", 0.5)).await?;
        let failing = c.launch(shell("exit 3", 0.5)).await?;
        let running = c.launch(shell("exec sleep 60", 0.5)).await?;
        let killed = c.launch(shell("exec sleep 60", 0.5)).await?;
        c.wait_state(&ok, TaskState::Finished).await?;
        c.wait_state(&failing, TaskState::Failed).await?;
        c.wait_state(&running, TaskState::Running).await?;
        c.wait_state(&killed, TaskState::Running).await?;
        c.tasks
            .kill(&killed, Duration::from_secs(1))
            .await
            .ctx("kill a task")?;
        c.wait_state(&killed, TaskState::Killed).await?;
        let mut launched: BTreeSet<TaskId> = [&ok, &failing, &running, &killed]
            .into_iter()
            .cloned()
            .collect();
        // Enough pending tasks (too big for the agent) for more than one
        // page of implicit reconciliation.
        for _ in 0..101 {
            launched.insert(c.launch(shell("true", 64.0)).await?);
        }

        let mut seen = BTreeSet::new();
        let pages = c.reconcile_implicit(launched.len()).await?;
        for page in &pages {
            for s in page {
                ensure!(
                    seen.insert(s.id.clone()),
                    "implicit reconciliation gave task {} twice",
                    s.id
                );
                let expected = match &s.id {
                    id if *id == ok => Some(TaskState::Finished),
                    id if *id == failing => Some(TaskState::Failed),
                    id if *id == running => Some(TaskState::Running),
                    id if *id == killed => Some(TaskState::Killed),
                    _ => None,
                };
                if let Some(state) = expected {
                    ensure_eq!(s.state, state, "reconciled state of task {}", s.id);
                }
            }
        }
        ensure!(
            pages.len() > 1,
            "{} tasks came back on one page",
            seen.len()
        );
        let missing: Vec<_> = launched.difference(&seen).collect();
        ensure!(
            missing.is_empty(),
            "implicit reconciliation misses {missing:?}"
        );
        let extra: Vec<_> = seen.difference(&launched).collect();
        ensure!(
            extra.is_empty(),
            "implicit reconciliation gave unknown tasks {extra:?}"
        );

        let unknown = TaskId("t-nope".into());
        expect_err(
            c.tasks.status(&unknown).await,
            &[ErrorKind::NotFound],
            "status of an unknown task",
        )?;
        let (answered, next) = c
            .reconcile_explicit(vec![failing.clone(), unknown.clone(), ok.clone()])
            .await?;
        ensure_eq!(
            answered,
            vec![
                (failing.clone(), TaskState::Failed),
                (unknown, TaskState::Unknown),
                (ok.clone(), TaskState::Finished),
            ],
            "explicit reconciliation"
        );
        ensure!(!next, "explicit reconciliation has a next page");
        Ok(())
    }
    .await;
    c.finish(result).await
}

async fn done_task_forgotten_after_retention(ctx: Ctx) -> CaseResult {
    let mut c = Cluster::start(&ctx).await?;
    let result = async {
        c.inner
            .start_supervisor_retaining("s1", SHORT_RETENTION)
            .await
            .ctx("start supervisor s1")?;
        c.agent("a1", 2.0, "z1").await?;
        let done = c.launch(shell("exit 3", 0.5)).await?;
        let running = c.launch(shell("exec sleep 60", 0.5)).await?;
        let ended = c.wait_state(&done, TaskState::Failed).await?;
        c.wait_state(&running, TaskState::Running).await?;

        let deadline = Instant::now() + SHORT_RETENTION + TASK_WAIT;
        loop {
            match c.tasks.status(&done).await {
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                Ok(s) => ensure_eq!(s.state, TaskState::Failed, "state of task {done}"),
                Err(e) => fail!("status of task {done}: {e}"),
            }
            if Instant::now() >= deadline {
                fail!(
                    "task {done} ended at {:?} and is still known after a retention of {SHORT_RETENTION:?}",
                    ended.updated
                );
            }
            tokio::time::sleep(POLL).await;
        }
        let known_for = SystemTime::now()
            .duration_since(ended.updated)
            .unwrap_or_default();
        ensure!(
            known_for >= SHORT_RETENTION,
            "task {done} was forgotten {known_for:?} after it ended, before the retention of {SHORT_RETENTION:?}"
        );

        let (answered, _) = c.reconcile_explicit(vec![done.clone(), running.clone()]).await?;
        ensure_eq!(
            answered,
            vec![
                (done.clone(), TaskState::Unknown),
                (running.clone(), TaskState::Running),
            ],
            "explicit reconciliation"
        );
        let seen: BTreeSet<TaskId> = c
            .reconcile_implicit(2)
            .await?
            .into_iter()
            .flatten()
            .map(|s| s.id)
            .collect();
        ensure_eq!(
            seen,
            BTreeSet::from([running.clone()]),
            "tasks implicit reconciliation returns"
        );
        // A task still running is never forgotten, however old.
        ensure_eq!(
            c.status(&running).await?.state,
            TaskState::Running,
            "state of the running task {running}"
        );
        Ok(())
    }
    .await;
    c.finish(result).await
}
