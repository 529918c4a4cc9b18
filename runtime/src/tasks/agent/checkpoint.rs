//! The agent's checkpoint: what an agent must not forget when it dies,
//! kept in `<work_dir>/agent.json`.
//!
//! It holds the agent's id (a work dir belongs to one agent), the last
//! report sequence number, the highest supervisor term seen, the launches
//! it runs (with their process group and start time, so a restarted agent
//! can take them back), the launches it has finished with, and the outbox:
//! reports not yet written to the backend, in order.
//!
//! Every change is written atomically: a temporary file is written and
//! flushed to disk, renamed over the checkpoint, and the directory flushed,
//! so after a crash the file holds either the old or the new state, never
//! a mix.

use super::super::store::Report;
use dprim::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The checkpoint's file name in the work dir.
pub(crate) const FILE: &str = "agent.json";

/// The format written; a newer one is refused rather than misread.
const FORMAT: u32 = 1;

/// One launch the agent runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Launched {
    pub launch: u32,
    /// The process group id; `None` while it is being started (recorded
    /// before the process exists, so a crash in between is noticed).
    pub pid: Option<i32>,
    /// The process's start time (`/proc/<pid>/stat`), to tell it from a
    /// later process that reused the pid.
    pub start_time: Option<u64>,
    pub sandbox: PathBuf,
}

/// A report waiting to be written to the backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Outgoing {
    pub task: String,
    pub report: Report,
}

/// The agent process that last opened the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Owner {
    pub pid: i32,
    pub start_time: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct State {
    pub format: u32,
    pub agent: String,
    #[serde(default)]
    pub owner: Option<Owner>,
    /// The last report sequence number used.
    pub seq: u64,
    /// The highest supervisor election term seen in an order.
    pub term: u64,
    /// Launches running (or being started), by task.
    pub tasks: BTreeMap<String, Launched>,
    /// Launches that ended or were declined here, while still assigned: never
    /// started (again).
    pub done: BTreeSet<(String, u32)>,
    /// Reports not yet written, oldest first.
    pub outbox: VecDeque<Outgoing>,
}

/// The checkpoint file and the state it holds.
#[derive(Debug)]
pub(crate) struct Checkpoint {
    path: PathBuf,
    pub state: State,
}

fn unreadable(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::ConfigInvalid,
        format!(
            "the agent checkpoint {} is unreadable ({why}). It lists the tasks this agent \
             runs and the reports it has not delivered yet. Restore it from a backup, or, \
             if none of its tasks still runs (their process groups are in \
             <work-dir>/<task>/<launch>/pid), move it aside and start the agent again: \
             the supervisor then treats the tasks it ran as lost",
            path.display()
        ),
    )
}

impl Checkpoint {
    /// Opens (or starts) the checkpoint of agent `agent` in `work_dir`,
    /// creating the directory if needed. `owner` is the agent process
    /// opening it.
    ///
    /// # Behavior
    /// - A checkpoint that cannot be read or parsed is a `ConfigInvalid`
    ///   error naming the file and what to do; nothing is overwritten.
    /// - A work dir whose checkpoint belongs to another agent id, or that
    ///   another live agent process has open, is refused (`ConfigInvalid`).
    pub(crate) fn open(work_dir: &Path, agent: &str, owner: Owner) -> Result<Checkpoint> {
        std::fs::create_dir_all(work_dir).map_err(|e| {
            Error::new(
                ErrorKind::ConfigInvalid,
                format!("cannot create the work dir {}: {e}", work_dir.display()),
            )
        })?;
        let path = work_dir.join(FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                let state: State =
                    serde_json::from_slice(&bytes).map_err(|e| unreadable(&path, e))?;
                if state.format > FORMAT {
                    return Err(unreadable(
                        &path,
                        format!(
                            "format {} is newer than this agent's {FORMAT}; run a newer agent",
                            state.format
                        ),
                    ));
                }
                if state.agent != agent {
                    return Err(Error::new(
                        ErrorKind::ConfigInvalid,
                        format!(
                            "the work dir {} belongs to agent `{}`, not `{agent}` (see {}): \
                             give each agent its own --work-dir, or start it as `{}`",
                            work_dir.display(),
                            state.agent,
                            path.display(),
                            state.agent
                        ),
                    ));
                }
                if let Some(other) = state.owner.filter(|o| o.pid != owner.pid) {
                    if super::super::process::is_same_process(other.pid, other.start_time) {
                        return Err(Error::new(
                            ErrorKind::ConfigInvalid,
                            format!(
                                "agent `{agent}` already runs on the work dir {} (process {}); \
                                 two agents must not share a work dir",
                                work_dir.display(),
                                other.pid
                            ),
                        ));
                    }
                }
                state
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                format: FORMAT,
                agent: agent.to_string(),
                owner: None,
                seq: 0,
                term: 0,
                tasks: BTreeMap::new(),
                done: BTreeSet::new(),
                outbox: VecDeque::new(),
            },
            Err(e) => return Err(unreadable(&path, e)),
        };
        let mut checkpoint = Checkpoint { path, state };
        checkpoint.state.format = FORMAT;
        checkpoint.state.owner = Some(owner);
        Ok(checkpoint)
    }

    /// Writes the state atomically (temporary file, fsync, rename, fsync
    /// of the directory).
    pub(crate) fn save(&self) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.state)
            .map_err(|e| Error::unexpected(format!("encoding the agent checkpoint: {e}")))?;
        let failed = |what: &str, e: std::io::Error| {
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "cannot {what} the agent checkpoint {}: {e}",
                    self.path.display()
                ),
            )
        };
        let tmp = self.path.with_extension("json.tmp");
        {
            let mut file = std::fs::File::create(&tmp).map_err(|e| failed("write", e))?;
            file.write_all(&bytes).map_err(|e| failed("write", e))?;
            file.sync_all().map_err(|e| failed("flush", e))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(|e| failed("replace", e))?;
        // The rename itself is only durable once the directory is.
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| failed("flush the directory of", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::store::ReportEvent;

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("dprim-checkpoint-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn me() -> Owner {
        Owner {
            pid: std::process::id() as i32,
            start_time: None,
        }
    }

    #[test]
    fn saved_state_comes_back_in_order() {
        let d = dir("roundtrip");
        let mut c = Checkpoint::open(&d, "a1", me()).unwrap();
        c.state.seq = 42;
        c.state.term = 7;
        c.state.tasks.insert(
            "t1".into(),
            Launched {
                launch: 2,
                pid: Some(1234),
                start_time: Some(99),
                sandbox: d.join("t1/2"),
            },
        );
        c.state.done.insert(("t0".into(), 1));
        for (seq, event) in [
            (41, ReportEvent::Started),
            (42, ReportEvent::Exited { code: 3 }),
        ] {
            c.state.outbox.push_back(Outgoing {
                task: "t1".into(),
                report: Report {
                    agent: "a1".into(),
                    launch: 2,
                    seq,
                    event,
                },
            });
        }
        c.save().unwrap();
        assert!(!d.join("agent.json.tmp").exists());
        let again = Checkpoint::open(&d, "a1", me()).unwrap();
        assert_eq!(again.state, c.state);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_corrupt_checkpoint_is_a_clear_error_and_is_kept() {
        let d = dir("corrupt");
        std::fs::create_dir_all(&d).unwrap();
        // A torn write cannot happen through `save`, but a disk or a hand
        // edit can leave one.
        std::fs::write(d.join(FILE), b"{\"format\":1,\"agent\":\"a1\",\"se").unwrap();
        let e = Checkpoint::open(&d, "a1", me()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        let text = e.to_string();
        assert!(text.contains(&d.join(FILE).display().to_string()), "{text}");
        assert!(text.contains("move it aside"), "{text}");
        assert_eq!(
            std::fs::read(d.join(FILE)).unwrap(),
            b"{\"format\":1,\"agent\":\"a1\",\"se"
        );
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_leftover_temporary_file_does_not_matter() {
        let d = dir("leftover");
        let mut c = Checkpoint::open(&d, "a1", me()).unwrap();
        c.state.seq = 5;
        c.save().unwrap();
        // A crash after writing the temporary file, before the rename.
        std::fs::write(d.join("agent.json.tmp"), b"garbage").unwrap();
        let again = Checkpoint::open(&d, "a1", me()).unwrap();
        assert_eq!(again.state.seq, 5);
        again.save().unwrap();
        assert!(!d.join("agent.json.tmp").exists());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn another_agents_work_dir_is_refused() {
        let d = dir("other");
        Checkpoint::open(&d, "a1", me()).unwrap().save().unwrap();
        let e = Checkpoint::open(&d, "a2", me()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        assert!(e.to_string().contains("belongs to agent `a1`"), "{e}");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_work_dir_in_use_by_a_live_agent_is_refused() {
        let d = dir("in-use");
        // Another live process (this test's parent cannot be reused while
        // we run) holds it.
        let other = std::os::unix::process::parent_id() as i32;
        let mut c = Checkpoint::open(
            &d,
            "a1",
            Owner {
                pid: other,
                start_time: crate::tasks::process::start_time_of(other),
            },
        )
        .unwrap();
        c.save().unwrap();
        let e = Checkpoint::open(&d, "a1", me()).unwrap_err();
        assert!(e.to_string().contains("already runs"), "{e}");
        // Once that process is gone (a different start time: a reused
        // pid), the work dir is free.
        c.state.owner = Some(Owner {
            pid: other,
            start_time: crate::tasks::process::start_time_of(other).map(|t| t + 1),
        });
        c.save().unwrap();
        Checkpoint::open(&d, "a1", me()).unwrap();
        let _ = std::fs::remove_dir_all(d);
    }
}
