//! The [`Tasks`] primitive as apps and the CLI use it: launch writes the
//! spec and the first record; everything else reads records or leaves
//! requests for the supervisor.

use super::logs::{LogStream, TaskLogs};
use super::state::TaskRecord;
use super::store::{self, KillOrder, StatusRecord};
use async_trait::async_trait;
use dprim::tasks::{ReconcilePage, TaskSpec, TaskStatus};
use dprim::{
    Backend, Error, Precondition, Result, TaskId, Tasks, WatchEvent, WatchStart, WatchTarget,
};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::time::{Duration, SystemTime};

/// Page size of implicit reconciliation.
pub const RECONCILE_PAGE: usize = 100;

/// Tasks over a backend's other primitives.
#[derive(Clone, Debug)]
pub struct TasksClient {
    backend: Backend,
}

impl TasksClient {
    /// A client on `backend`.
    pub fn new(backend: Backend) -> TasksClient {
        TasksClient { backend }
    }

    /// The output of one launch of task `id` (default: its latest launch),
    /// read from the agent that ran it through the backend; see
    /// [`TaskLogs`].
    ///
    /// # Behavior
    /// - An unknown task is `NotFound`, naming it.
    /// - A task not placed on an agent yet, or a launch that never started,
    ///   is `NotFound`, saying so.
    /// - An agent that is no longer registered is `Unavailable`, naming it.
    pub async fn logs(
        &self,
        id: &TaskId,
        stream: LogStream,
        launch: Option<u32>,
    ) -> Result<TaskLogs> {
        let record = self.record(id).await?;
        TaskLogs::open(self.backend.clone(), record, launch, stream).await
    }

    async fn record(&self, id: &TaskId) -> Result<StatusRecord> {
        let key = store::status_key(&id.0).map_err(|_| unknown(id))?;
        match store::get::<StatusRecord>(&self.backend, &key).await? {
            Some((r, _)) => Ok(r),
            None => Err(unknown(id)),
        }
    }
}

fn unknown(id: &TaskId) -> Error {
    Error::not_found(format!(
        "no task `{id}`: never launched, or done for good longer than the supervisor's task retention ago (`dprim supervisor --task-retention`, 1h by default); `dprim task ls` lists the known tasks"
    ))
}

impl TasksClient {
    /// Writes a new task's spec and first record under `id`.
    async fn write_launch(&self, spec: TaskSpec, id: String) -> Result<()> {
        let record = StatusRecord {
            id: id.clone(),
            record: TaskRecord::new(spec.restart, SystemTime::now()),
            report_seq: 0,
            term: 0,
            unreachable_since: None,
            relaunch_at: None,
        };
        let spec_key = store::spec_key(&id)?;
        let status_key = store::status_key(&id)?;
        if self.backend.capabilities().kv.transactions {
            // Spec and first record in one round trip.
            let txn = dprim::Txn::new()
                .check(spec_key.clone(), Precondition::Absent)
                .check(status_key.clone(), Precondition::Absent)
                .put(spec_key, store::encode(&spec)?)
                .put(status_key, store::encode(&record)?);
            self.backend.kv().txn(txn).await?;
            return Ok(());
        }
        store::put_with(&self.backend, &spec_key, &spec, Precondition::Absent, None).await?;
        // The supervisor may have written it first; either way it exists.
        match store::put_with(
            &self.backend,
            &status_key,
            &record,
            Precondition::Absent,
            None,
        )
        .await
        {
            Ok(_) => {}
            Err(e) if e.kind() == dprim::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

#[async_trait]
impl Tasks for TasksClient {
    async fn launch(&self, spec: TaskSpec) -> Result<TaskId> {
        spec.validate()?;
        let id = store::new_task_id();
        // A launch whose outcome is unknown may have happened: the id is
        // how the caller finds out.
        self.write_launch(spec, id.clone())
            .await
            .map_err(|e| e.with_context("task", &id))?;
        Ok(TaskId(id))
    }

    async fn kill(&self, id: &TaskId, grace: Duration) -> Result<()> {
        self.record(id).await?;
        let order = KillOrder {
            grace_ms: grace.as_millis() as u64,
            term: 0,
        };
        store::put(&self.backend, &store::kill_request_key(&id.0)?, &order).await?;
        Ok(())
    }

    async fn status(&self, id: &TaskId) -> Result<TaskStatus> {
        Ok(self.record(id).await?.status())
    }

    async fn watch(&self) -> Result<BoxStream<'static, Result<TaskStatus>>> {
        let stream = self
            .backend
            .kv()
            .watch(WatchTarget::Dir(store::status_dir()?), WatchStart::Now)
            .await?;
        Ok(stream
            .filter_map(|event| async move {
                match event {
                    Ok(WatchEvent::Put(e)) => Some(
                        serde_json::from_slice::<StatusRecord>(e.value.as_bytes())
                            .map(|r| r.status())
                            .map_err(|err| Error::unexpected(format!("unreadable task record: {err}"))),
                    ),
                    Ok(WatchEvent::Delete { .. }) => None,
                    Ok(WatchEvent::Resync { reason }) => Some(Err(Error::new(
                        dprim::ErrorKind::Resync,
                        format!("task updates may have been missed ({reason}); reconcile, then watch again"),
                    ))),
                    Err(e) => Some(Err(e)),
                }
            })
            .boxed())
    }

    async fn reconcile(
        &self,
        ids: Option<Vec<TaskId>>,
        page: Option<String>,
    ) -> Result<ReconcilePage> {
        if let Some(ids) = ids {
            let mut statuses = Vec::new();
            for id in ids {
                match self.record(&id).await {
                    Ok(r) => statuses.push(r.status()),
                    Err(e) if e.kind() == dprim::ErrorKind::NotFound => statuses.push(TaskStatus {
                        id,
                        state: dprim::TaskState::Unknown,
                        agent: None,
                        exit_code: None,
                        message: "no such task".into(),
                        updated: SystemTime::now(),
                    }),
                    Err(e) => return Err(e),
                }
            }
            return Ok(ReconcilePage {
                statuses,
                next: None,
            });
        }
        let all: std::collections::BTreeMap<String, (StatusRecord, _)> =
            store::list(&self.backend, &store::status_dir()?).await?;
        let mut statuses: Vec<TaskStatus> = all
            .into_iter()
            .filter(|(id, _)| page.as_ref().is_none_or(|after| id > after))
            .take(RECONCILE_PAGE + 1)
            .map(|(_, (r, _))| r.status())
            .collect();
        let next = if statuses.len() > RECONCILE_PAGE {
            statuses.truncate(RECONCILE_PAGE);
            statuses.last().map(|s| s.id.0.clone())
        } else {
            None
        };
        Ok(ReconcilePage { statuses, next })
    }
}
