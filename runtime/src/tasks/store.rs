//! Where task launch keeps its state: plain keys in the backend's Kv, so it
//! works on every backend. Everything lives under `_dprim/`:
//!
//! ```text
//! _dprim/agents/<agent>                 an agent's registration (ephemeral: its session)
//! _dprim/tasks/spec/<task>              what to run (written once by launch)
//! _dprim/tasks/status/<task>            the task's record (supervisor; CAS)
//! _dprim/tasks/assign/<agent>/<task>    "run this" from the supervisor to an agent
//! _dprim/tasks/kill/<agent>/<task>      "kill this" from the supervisor to an agent
//! _dprim/tasks/report/<task>/<launch>   the agent's latest report on a launch (sequence-numbered)
//! _dprim/tasks/kill-request/<task>      a user's kill request
//! _dprim/tasks/supervisor               the supervisors' election
//! ```

use super::state::TaskRecord;
use dprim::tasks::{Resources, TaskSpec, TaskStatus};
use dprim::{
    Backend, Depth, Error, Key, KvExt, Precondition, PutOptions, Result, Session, Value, Version,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::SystemTime;

pub(crate) fn key(path: String) -> Result<Key> {
    Key::new(path)
}

pub(crate) fn agents_dir() -> Result<Key> {
    key("_dprim/agents".into())
}
pub(crate) fn agent_key(agent: &str) -> Result<Key> {
    key(format!("_dprim/agents/{agent}"))
}
pub(crate) fn spec_dir() -> Result<Key> {
    key("_dprim/tasks/spec".into())
}
pub(crate) fn spec_key(task: &str) -> Result<Key> {
    key(format!("_dprim/tasks/spec/{task}"))
}
pub(crate) fn status_dir() -> Result<Key> {
    key("_dprim/tasks/status".into())
}
pub(crate) fn status_key(task: &str) -> Result<Key> {
    key(format!("_dprim/tasks/status/{task}"))
}
pub(crate) fn assign_dir(agent: &str) -> Result<Key> {
    key(format!("_dprim/tasks/assign/{agent}"))
}
pub(crate) fn assign_key(agent: &str, task: &str) -> Result<Key> {
    key(format!("_dprim/tasks/assign/{agent}/{task}"))
}
pub(crate) fn kill_dir(agent: &str) -> Result<Key> {
    key(format!("_dprim/tasks/kill/{agent}"))
}
pub(crate) fn kill_key(agent: &str, task: &str) -> Result<Key> {
    key(format!("_dprim/tasks/kill/{agent}/{task}"))
}
pub(crate) fn report_dir() -> Result<Key> {
    key("_dprim/tasks/report".into())
}
/// One key per launch: a report about an old launch (from an agent that
/// was away) can never overwrite one about the current launch.
pub(crate) fn report_key(task: &str, launch: u32) -> Result<Key> {
    key(format!("_dprim/tasks/report/{task}/{launch}"))
}
pub(crate) fn kill_request_dir() -> Result<Key> {
    key("_dprim/tasks/kill-request".into())
}
pub(crate) fn kill_request_key(task: &str) -> Result<Key> {
    key(format!("_dprim/tasks/kill-request/{task}"))
}
pub(crate) fn election() -> Result<Key> {
    key("_dprim/tasks/supervisor".into())
}

/// A task's record as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct StatusRecord {
    pub id: String,
    pub record: TaskRecord,
    /// The highest report sequence already applied.
    pub report_seq: u64,
    /// The election term of the supervisor that last wrote the record (0:
    /// written at launch). A supervisor never overwrites a record written
    /// under a later term: the term is its fencing token.
    #[serde(default)]
    pub term: u64,
    pub unreachable_since: Option<SystemTime>,
    /// A relaunch is due at this time (the record is terminal until then).
    pub relaunch_at: Option<SystemTime>,
}

impl StatusRecord {
    pub fn status(&self) -> TaskStatus {
        TaskStatus {
            id: dprim::TaskId(self.id.clone()),
            state: self.record.state,
            agent: self.record.agent.clone(),
            exit_code: self.record.exit_code,
            message: self.record.message.clone(),
            updated: self.record.updated,
        }
    }
}

/// What the supervisor asks an agent to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Assignment {
    pub spec: TaskSpec,
    pub launch: u32,
    /// The election term of the supervisor that wrote it: an agent ignores
    /// orders from a term older than the newest it has seen.
    #[serde(default)]
    pub term: u64,
}

/// What an agent reports about a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum ReportEvent {
    Started,
    Exited { code: i32 },
    LaunchFailed { reason: String },
    KilledByRequest,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Report {
    pub agent: String,
    pub launch: u32,
    pub seq: u64,
    pub event: ReportEvent,
    /// When the agent made the report, in wall-clock milliseconds since the
    /// epoch (0 from agents that predate it). A report left on a forgotten
    /// task is deleted one retention after this, whichever leader sees it.
    #[serde(default)]
    pub made_ms: u64,
}

/// An agent's registration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct AgentInfo {
    pub id: String,
    /// How the agent enforces resources (see `process::Enforcement`).
    #[serde(default)]
    pub enforcement: String,
    pub resources: Resources,
    pub attributes: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct KillOrder {
    pub grace_ms: u64,
    /// The supervisor's election term (0 for a user's kill request).
    #[serde(default)]
    pub term: u64,
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Value> {
    let bytes = serde_json::to_vec(v)
        .map_err(|e| Error::unexpected(format!("encoding a task record: {e}")))?;
    Value::new(bytes)
}

pub(crate) fn decode<T: DeserializeOwned>(key: &Key, v: &Value) -> Result<T> {
    serde_json::from_slice(v.as_bytes())
        .map_err(|e| Error::unexpected(format!("`{key}` holds an unreadable task record: {e}")))
}

pub(crate) async fn get<T: DeserializeOwned>(
    b: &Backend,
    key: &Key,
) -> Result<Option<(T, Version)>> {
    match b.kv().get(key).await? {
        Some(e) => Ok(Some((decode(key, &e.value)?, e.version))),
        None => Ok(None),
    }
}

pub(crate) async fn put<T: Serialize>(b: &Backend, key: &Key, v: &T) -> Result<Version> {
    b.kv().put(key, encode(v)?).await
}

pub(crate) async fn put_with<T: Serialize>(
    b: &Backend,
    key: &Key,
    v: &T,
    precondition: Precondition,
    session: Option<&Session>,
) -> Result<Version> {
    let options = PutOptions {
        precondition,
        session: session.map(|s| s.id()),
    };
    b.kv().put_with(key, encode(v)?, options).await
}

/// Every record directly under `dir`, by the last segment of its key.
pub(crate) async fn list<T: DeserializeOwned>(
    b: &Backend,
    dir: &Key,
) -> Result<BTreeMap<String, (T, Version)>> {
    let listing = b.kv().list(dir, Depth::Children).await?;
    let mut out = BTreeMap::new();
    for e in listing.entries {
        out.insert(
            e.key.name().to_string(),
            (decode(&e.key, &e.value)?, e.version),
        );
    }
    Ok(out)
}

/// Every record at depth two under `dir`, by its last two segments.
pub(crate) async fn list_pairs<T: DeserializeOwned>(
    b: &Backend,
    dir: &Key,
) -> Result<BTreeMap<(String, String), (T, Version)>> {
    let listing = b.kv().list(dir, Depth::Recursive).await?;
    let mut out = BTreeMap::new();
    for e in listing.entries {
        if let Some((first, second)) = e.key.strip_dir(dir).and_then(|rest| rest.split_once('/')) {
            if !second.contains('/') {
                out.insert(
                    (first.to_string(), second.to_string()),
                    (decode(&e.key, &e.value)?, e.version),
                );
            }
        }
    }
    Ok(out)
}

/// Stores `value` under `key`, or forgets `key` (deleted or unreadable):
/// how the supervisor and agents keep their pictures of Kv current.
pub(crate) fn set<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) {
    match value {
        Some(v) => {
            map.insert(key, v);
        }
        None => {
            map.remove(&key);
        }
    }
}

/// A new task id: time-ordered, unique, and a valid key segment.
pub(crate) fn new_task_id() -> String {
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    // 48 random bits per millisecond: launches in the same millisecond
    // (many callers, many clients) must not pick the same id, which would
    // fail the second launch. With 24 bits a batch of 8,000 launches from
    // 64 callers did, now and then.
    format!(
        "t{millis:011x}-{:012x}",
        rand::random::<u64>() & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn task_ids_made_at_once_do_not_collide() {
        let ids: Vec<String> = (0..200_000).map(|_| new_task_id()).collect();
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        assert!(
            ids.iter().all(|id| Key::new(id).is_ok()),
            "an id is a key segment"
        );
    }
}
