//! The agent's checkpoint: what an agent must not forget when it dies,
//! kept in the work dir in two slot files, `agent.checkpoint.0` and
//! `agent.checkpoint.1`.
//!
//! It holds the agent's id (a work dir belongs to one agent), the last
//! report sequence number, the highest supervisor term seen, the launches
//! it runs (with their process group and start time, so a restarted agent
//! can take them back), the launches it has finished with, and the outbox:
//! reports not yet written to the backend, in order.
//!
//! Saves alternate between the two slots. A save overwrites its slot in
//! place and flushes the file's data (`fdatasync`); the slot begins with a
//! header line naming the save's generation, the length of the state that
//! follows and its checksum. A crash during a save can spoil only the slot
//! being written; it then fails its checksum and the other slot holds the
//! state saved before, so the checkpoint is always the old or the new
//! state, never a mix. A slot file is created by writing a temporary file
//! and renaming it, so a slot that exists was written whole at least once.
//! Writing in place changes no file-system metadata (unless the state
//! grew), so a save does not wait for a journal commit, as the create,
//! rename and directory flush of every save did before: agents save on
//! every task state change, and those commits were the bottleneck of a
//! busy machine's launch rate.
//!
//! A checkpoint of the older single-file layout (`agent.json`) is read
//! when no slot exists yet, and removed after the first save.

use super::super::store::Report;
use dprim::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The two slot files in the work dir.
pub(crate) const SLOTS: [&str; 2] = ["agent.checkpoint.0", "agent.checkpoint.1"];

/// The single file of the older layout.
pub(crate) const LEGACY_FILE: &str = "agent.json";

/// First word of a slot's header line.
const MAGIC: &str = "dprim-agent-checkpoint";

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

/// The checkpoint's slot files and the state they hold.
#[derive(Debug)]
pub(crate) struct Checkpoint {
    dir: PathBuf,
    pub state: State,
    /// The generation of the newest whole save (0: none yet).
    generation: u64,
    /// The slot files, opened for writing on first use.
    files: [Option<File>; 2],
    /// An `agent.json` of the older layout to remove after the first save.
    legacy: bool,
}

fn unreadable(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::ConfigInvalid,
        format!(
            "the agent checkpoint {} is unreadable ({why}). It lists the tasks this agent \
             runs and the reports it has not delivered yet. Restore it from a backup, or, \
             if none of its tasks still runs (their process groups are in \
             <work-dir>/<task>/<launch>/pid), move the work dir's agent.checkpoint.* files \
             aside and start the agent again: the supervisor then treats the tasks it ran \
             as lost",
            path.display()
        ),
    )
}

/// Detects a torn or damaged slot (not an adversary): eight bytes at a
/// time, each word mixed in by a multiply and a rotation. Fixed here rather
/// than taken from `std`, whose hasher may change between Rust releases
/// while a checkpoint must stay readable by the next agent build.
fn checksum(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mix = |h: u64, w: u64| (h ^ w).wrapping_mul(K).rotate_left(29);
    let mut words = bytes.chunks_exact(8);
    let mut h = (bytes.len() as u64).wrapping_mul(K);
    for w in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        h = mix(h, u64::from_le_bytes(word));
    }
    let mut tail = [0u8; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    mix(h, u64::from_le_bytes(tail))
}

/// A slot's bytes: the header line, then the state as JSON (compact: it is
/// written on every change; `dprim agents checkpoint` pretty-prints it).
fn encode_slot(generation: u64, state: &State) -> Result<Vec<u8>> {
    let body = serde_json::to_vec(state)
        .map_err(|e| Error::unexpected(format!("encoding the agent checkpoint: {e}")))?;
    let mut bytes = format!(
        "{MAGIC} {generation} {} {:016x}\n",
        body.len(),
        checksum(&body)
    )
    .into_bytes();
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// A slot's generation and state; what is wrong with it otherwise. Bytes
/// after the state are what a longer earlier save left, and are ignored.
fn decode_slot(bytes: &[u8]) -> std::result::Result<(u64, State), String> {
    let end = bytes
        .iter()
        .take(256)
        .position(|b| *b == b'\n')
        .ok_or("no header line")?;
    let header = std::str::from_utf8(&bytes[..end]).map_err(|_| "a header that is not text")?;
    let fields: Vec<&str> = header.split(' ').collect();
    let [MAGIC, generation, len, sum] = fields[..] else {
        return Err(format!("not a dprim agent checkpoint header: `{header}`"));
    };
    let bad = |what: &str| format!("a bad {what} in the header `{header}`");
    let generation: u64 = generation.parse().map_err(|_| bad("generation"))?;
    let len: usize = len.parse().map_err(|_| bad("length"))?;
    let sum = u64::from_str_radix(sum, 16).map_err(|_| bad("checksum"))?;
    let body = bytes
        .get(end + 1..end + 1 + len)
        .ok_or("shorter than its header says (a save that did not finish)")?;
    if checksum(body) != sum {
        return Err("its checksum does not match (a save that did not finish)".into());
    }
    let state = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    Ok((generation, state))
}

/// The newest whole save in `dir`: `(generation, state)`, `Ok(None)` if no
/// slot exists. An error if every slot that exists is damaged: a torn save
/// spoils one slot only, so that is damage from elsewhere.
fn read_slots(dir: &Path) -> Result<Option<(u64, State)>> {
    let mut newest: Option<(u64, State)> = None;
    let mut damaged = Vec::new();
    for name in SLOTS {
        let path = dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => match decode_slot(&bytes) {
                Ok((generation, state)) => {
                    if newest.as_ref().is_none_or(|(g, _)| generation > *g) {
                        newest = Some((generation, state));
                    }
                }
                Err(why) => damaged.push((path, why)),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(unreadable(&path, e)),
        }
    }
    match (newest, damaged.first()) {
        (Some(found), _) => Ok(Some(found)),
        (None, Some((path, why))) => Err(unreadable(path, why)),
        (None, None) => Ok(None),
    }
}

/// A checkpoint as found in a work dir.
struct Found {
    state: State,
    /// The generation of the save it comes from (0 for the older layout).
    generation: u64,
    /// It comes from `agent.json`, the older layout.
    legacy: bool,
}

/// The newest whole save in `dir`, else a checkpoint of the older layout;
/// `Ok(None)` if there is neither.
fn load(dir: &Path) -> Result<Option<Found>> {
    if let Some((generation, state)) = read_slots(dir)? {
        return Ok(Some(Found {
            state,
            generation,
            legacy: false,
        }));
    }
    let path = dir.join(LEGACY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(Found {
            state: serde_json::from_slice(&bytes).map_err(|e| unreadable(&path, e))?,
            generation: 0,
            legacy: true,
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(unreadable(&path, e)),
    }
}

/// Writes `bytes` to `path` whole: temporary file, flush, rename, flush of
/// the directory.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Flushes the directory holding `path`: a rename, creation or removal is
/// only durable once its directory is.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
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
        let found = load(work_dir)?;
        let (generation, legacy) = found
            .as_ref()
            .map_or((0, false), |f| (f.generation, f.legacy));
        let state = match found.map(|f| f.state) {
            Some(state) => {
                let path = work_dir.join(if legacy {
                    LEGACY_FILE
                } else {
                    SLOTS[(generation % 2) as usize]
                });
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
            None => State {
                format: FORMAT,
                agent: agent.to_string(),
                owner: None,
                seq: 0,
                term: 0,
                tasks: BTreeMap::new(),
                done: BTreeSet::new(),
                outbox: VecDeque::new(),
            },
        };
        let mut checkpoint = Checkpoint {
            dir: work_dir.to_path_buf(),
            state,
            generation,
            files: [None, None],
            legacy,
        };
        checkpoint.state.format = FORMAT;
        checkpoint.state.owner = Some(owner);
        Ok(checkpoint)
    }

    /// The state last saved in `work_dir`, without taking the work dir
    /// over (for reading a checkpoint from outside the agent).
    pub(crate) fn read(work_dir: &Path) -> Result<State> {
        load(work_dir)?.map(|found| found.state).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "{} holds no agent checkpoint ({} or {}); is it an agent's --work-dir?",
                    work_dir.display(),
                    SLOTS[0],
                    SLOTS[1]
                ),
            )
        })
    }

    /// Saves the state into the slot after the newest one (see the module
    /// docs): in place with a data flush, or, the first time, as a new file.
    pub(crate) fn save(&mut self) -> Result<()> {
        let generation = self.generation + 1;
        let slot = (generation % 2) as usize;
        let bytes = encode_slot(generation, &self.state)?;
        let path = self.dir.join(SLOTS[slot]);
        let failed = |what: &str, e: std::io::Error| {
            Error::new(
                ErrorKind::Unavailable,
                format!("cannot {what} the agent checkpoint {}: {e}", path.display()),
            )
        };
        if self.files[slot].is_none() {
            match std::fs::OpenOptions::new().write(true).open(&path) {
                Ok(file) => self.files[slot] = Some(file),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    write_new(&path, &bytes).map_err(|e| failed("write", e))?;
                    self.files[slot] = Some(
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(|e| failed("open", e))?,
                    );
                    return self.saved(generation);
                }
                Err(e) => return Err(failed("open", e)),
            }
        }
        if let Some(file) = &self.files[slot] {
            file.write_all_at(&bytes, 0)
                .map_err(|e| failed("write", e))?;
            file.sync_data().map_err(|e| failed("flush", e))?;
        }
        self.saved(generation)
    }

    /// Records that save `generation` is whole; the first one retires a
    /// checkpoint of the older layout.
    fn saved(&mut self, generation: u64) -> Result<()> {
        self.generation = generation;
        if self.legacy {
            let path = self.dir.join(LEGACY_FILE);
            match std::fs::remove_file(&path).and_then(|()| sync_dir(&path)) {
                Ok(()) => self.legacy = false,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.legacy = false,
                Err(e) => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "cannot remove the old agent checkpoint {}: {e}",
                            path.display()
                        ),
                    ))
                }
            }
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
                    made_ms: 0,
                },
            });
        }
        c.save().unwrap();
        let again = Checkpoint::open(&d, "a1", me()).unwrap();
        assert_eq!(again.state, c.state);
        // Saved again (into the other slot, then in place over the first),
        // it still comes back, and no temporary file is left.
        c.state.seq = 43;
        c.save().unwrap();
        c.state.outbox.pop_back();
        c.save().unwrap();
        assert_eq!(Checkpoint::open(&d, "a1", me()).unwrap().state, c.state);
        assert_eq!(Checkpoint::read(&d).unwrap(), c.state);
        let mut names: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, SLOTS);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn the_checksum_sees_any_changed_byte_and_any_length() {
        let bytes: Vec<u8> = (0..100u8).collect();
        let sum = checksum(&bytes);
        for i in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[i] ^= 1;
            assert_ne!(checksum(&changed), sum, "byte {i}");
        }
        for len in 0..bytes.len() {
            assert_ne!(checksum(&bytes[..len]), sum, "length {len}");
        }
        // Pinned: a checkpoint must stay readable by the next agent build.
        assert_eq!(checksum(b"dprim agent checkpoint"), 0xab6a_29f5_26e1_f390);
    }

    #[test]
    fn a_save_torn_by_a_crash_leaves_the_one_before() {
        let d = dir("torn");
        let mut c = Checkpoint::open(&d, "a1", me()).unwrap();
        c.state.seq = 1;
        c.save().unwrap(); // generation 1, slot 1
        c.state.seq = 2;
        c.save().unwrap(); // generation 2, slot 0
        c.state.seq = 3;
        c.state.term = 9;
        c.save().unwrap(); // generation 3, slot 1
                           // A crash in the middle of the next save to slot 0: part of the new
                           // bytes written over the old ones.
        let slot0 = d.join(SLOTS[0]);
        let whole = std::fs::read(&slot0).unwrap();
        c.state.seq = 4;
        let next = encode_slot(4, &c.state).unwrap();
        let mut torn = whole.clone();
        let cut = next.len() / 2;
        torn[..cut].copy_from_slice(&next[..cut]);
        std::fs::write(&slot0, &torn).unwrap();
        let again = Checkpoint::open(&d, "a1", me()).unwrap();
        assert_eq!((again.state.seq, again.state.term), (3, 9));
        // The next save goes over the torn slot.
        let mut again = again;
        again.state.seq = 5;
        again.save().unwrap();
        assert_eq!(Checkpoint::read(&d).unwrap().seq, 5);
        assert!(decode_slot(&std::fs::read(&slot0).unwrap()).is_ok());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_checkpoint_of_the_older_layout_is_taken_over() {
        let d = dir("legacy");
        std::fs::create_dir_all(&d).unwrap();
        let mut old = Checkpoint::open(&d, "a1", me()).unwrap().state;
        old.seq = 77;
        old.done.insert(("t".into(), 3));
        std::fs::write(d.join(LEGACY_FILE), serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(Checkpoint::read(&d).unwrap().seq, 77);
        let mut c = Checkpoint::open(&d, "a1", me()).unwrap();
        assert_eq!((c.state.seq, &c.state.done), (77, &old.done));
        c.save().unwrap();
        assert!(!d.join(LEGACY_FILE).exists());
        assert_eq!(Checkpoint::open(&d, "a1", me()).unwrap().state.seq, 77);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_corrupt_checkpoint_is_a_clear_error_and_is_kept() {
        let d = dir("corrupt");
        let mut c = Checkpoint::open(&d, "a1", me()).unwrap();
        c.save().unwrap();
        c.save().unwrap();
        // A torn save spoils one slot only; a disk or a hand edit can
        // spoil both.
        for name in SLOTS {
            let path = d.join(name);
            let mut bytes = std::fs::read(&path).unwrap();
            let last = bytes.len() - 2;
            bytes[last] ^= 0x20;
            std::fs::write(&path, &bytes).unwrap();
        }
        let before = std::fs::read(d.join(SLOTS[0])).unwrap();
        let e = Checkpoint::open(&d, "a1", me()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        let text = e.to_string();
        assert!(
            text.contains(&d.join(SLOTS[0]).display().to_string()),
            "{text}"
        );
        assert!(text.contains("checksum"), "{text}");
        assert!(
            text.contains("move the work dir's agent.checkpoint.* files aside"),
            "{text}"
        );
        assert_eq!(std::fs::read(d.join(SLOTS[0])).unwrap(), before);
        assert_eq!(
            Checkpoint::read(&d).unwrap_err().kind(),
            ErrorKind::ConfigInvalid
        );
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_leftover_temporary_file_does_not_matter() {
        let d = dir("leftover");
        let mut c = Checkpoint::open(&d, "a1", me()).unwrap();
        c.state.seq = 5;
        c.save().unwrap();
        // A crash after writing a slot's first temporary file, before the
        // rename.
        let tmp = d.join(SLOTS[0]).with_extension("tmp");
        std::fs::write(&tmp, b"garbage").unwrap();
        let mut again = Checkpoint::open(&d, "a1", me()).unwrap();
        assert_eq!(again.state.seq, 5);
        again.save().unwrap();
        assert!(!tmp.exists());
        assert_eq!(Checkpoint::read(&d).unwrap().seq, 5);
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
