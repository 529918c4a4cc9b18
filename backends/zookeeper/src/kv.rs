//! Kv on znodes.
//!
//! A key is the znode `/<ns>/!kv/<key>`; its data is one header byte plus
//! the value, while znodes that only exist as parents of deeper keys hold
//! no data. The version is the znode's mzxid: non-zero, growing on every
//! change, and totally ordered across the namespace.
//!
//! Every change is one `multi` that also creates a record in the change log
//! (`/<ns>/!kv/!log/e-<seq>`) holding the key and the new value: the record's
//! czxid is the change's zxid. ZooKeeper watch events carry neither data nor
//! (before 3.9) a zxid, and ZooKeeper keeps no history; the log gives watches
//! every change with its value, in order, and lets a watch resume from a
//! version. Deletions the server makes on its own (ephemeral keys of an
//! expired session) have no record: the persistent recursive watch reports
//! them, versioned by their parent's pzxid.
//!
//! ZooKeeper's conditional ops compare `stat.version`, a per-znode counter
//! that starts again when a znode is deleted and created anew, so on its own
//! it does not pin dprim's version (the mzxid). The generation znode
//! (`/<ns>/!kv/!gen`) closes that gap: every logged change that removes a
//! key's znode also bumps its data version, and a version-conditional write
//! checks the generation observed, through the same session, before the key
//! was read. If no key znode was removed since, the same `stat.version`
//! means the same incarnation and so the same mzxid. That lets a CAS go
//! straight to its `multi` with the `stat.version` remembered from the read
//! that produced the version (no second read), falling back to a read when
//! the guess is stale. Keys attached to a session are never remembered: the
//! server deletes them on its own, without bumping the generation.

use crate::layout::{parent, sequence};
use crate::Zk;
use async_trait::async_trait;
use dprim::{
    Depth, Entry, Error, ErrorKind, Key, Kv, Listing, Precondition, PutOptions, Result, SessionId,
    Txn, TxnOp, TxnResult, Value, Version, WatchEvent, WatchStart, WatchStream, WatchTarget,
};
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use zookeeper_client::{
    AddWatchMode, Client, CreateMode, EventType, MultiReadResult, MultiWriteError,
    MultiWriteResult, SessionState, Stat,
};

/// Log records kept per namespace (a little over the declared history).
const LOG_KEEP: i64 = crate::WATCH_HISTORY as i64 + 24;
/// Trim the log every this many records.
const LOG_TRIM_EVERY: i64 = 128;
/// Most value bytes one transaction may carry: each value is written twice
/// (the key and its log record) and a ZooKeeper request is at most 1 MB.
const MAX_TXN_VALUE_BYTES: usize = 400 * 1024;

/// Keys whose (mzxid -> stat.version) pair is remembered; past this the
/// memory starts over (a forgotten key costs one read on its next CAS).
const REMEMBER_KEYS: usize = 4096;
/// Log records deleted per trimming `multi`.
const TRIM_CHUNK: usize = 256;

/// Kv state shared by every kv instance of one backend.
#[derive(Default)]
pub(crate) struct KvState {
    /// Set while a log trim runs: one at a time is enough, as each trims
    /// everything old enough.
    trimming: AtomicBool,
    remembered: Mutex<HashMap<Key, Remembered>>,
    /// Log records being read or read lately, by sequence: every watch of
    /// the backend hears of every new record, and one read serves them all.
    records: Mutex<std::collections::BTreeMap<i64, RecordRead>>,
}

/// One log record's read, shared by the watches that want it. The error is
/// a message: the watch that sees it resyncs, naming it.
type RecordRead = futures::future::Shared<
    futures::future::BoxFuture<'static, std::result::Result<Arc<(Vec<u8>, Stat)>, String>>,
>;

/// Record reads kept for watches that hear of a record late; older ones
/// are read again if ever asked for.
const SHARED_RECORDS: usize = 4096;

/// What a read or a write of the main session saw of a persistent key.
#[derive(Clone, Copy, Debug)]
struct Remembered {
    mzxid: i64,
    version: i32,
    /// The generation observed through the main session before that read.
    generation: i64,
}

impl KvState {
    /// Reads log record `seq` at `path` through `client`, or joins the read
    /// another watch of this backend started.
    async fn read_record(
        &self,
        client: &Client,
        seq: i64,
        path: &str,
    ) -> std::result::Result<Arc<(Vec<u8>, Stat)>, String> {
        use futures::FutureExt;
        let read = {
            let mut map = self.records.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&seq) {
                Some(read) => read.clone(),
                None => {
                    let client = client.clone();
                    let path = path.to_string();
                    let read: RecordRead = async move {
                        client
                            .get_data(&path)
                            .await
                            .map(Arc::new)
                            .map_err(|e| e.to_string())
                    }
                    .boxed()
                    .shared();
                    map.insert(seq, read.clone());
                    while map.len() > SHARED_RECORDS {
                        map.pop_first();
                    }
                    read
                }
            }
        };
        let result = read.await;
        if result.is_err() {
            // Not kept: a watch asking again reads again.
            self.records
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&seq);
        }
        result
    }

    fn remember(&self, key: &Key, r: Option<Remembered>) {
        let mut map = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Some(r) => {
                if map.len() >= REMEMBER_KEYS && !map.contains_key(key) {
                    map.clear();
                }
                map.insert(key.clone(), r);
            }
            None => {
                map.remove(key);
            }
        }
    }

    fn recall(&self, key: &Key, mzxid: i64) -> Option<Remembered> {
        let map = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).copied().filter(|r| r.mzxid == mzxid)
    }
}

/// Reads the generation through `client` (creating its znode if missing)
/// and records it in `cell`, the generation of `client`'s session.
async fn refresh_generation(zk: &Zk, client: &Client, cell: &AtomicI64) -> Result<i64> {
    let path = zk.layout().gen_node();
    let stat = match zk.call("exists", client.check_stat(&path)).await? {
        Some(s) => s,
        None => {
            zk.mkdirs(client, &path).await?;
            zk.call("exists", client.check_stat(&path))
                .await?
                .ok_or_else(|| Error::unexpected(format!("{path} vanished right after creation")))?
        }
    };
    let g = i64::from(stat.version);
    cell.fetch_max(g, Ordering::SeqCst);
    Ok(g)
}

/// Makes sure the generation znode exists and learns its version. A
/// namespace of another identity may refuse it: then writes find out.
pub(crate) async fn prepare_generation(zk: &Zk) -> Result<()> {
    let (client, cell) = zk.main_client().await?;
    match refresh_generation(zk, &client, &cell).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::PermissionDenied => Ok(()),
        Err(e) => Err(e),
    }
}

/// A stat standing in for a remembered persistent entry.
fn remembered_stat(r: &Remembered) -> Stat {
    Stat {
        czxid: 0,
        mzxid: r.mzxid,
        pzxid: 0,
        ctime: 0,
        mtime: 0,
        version: r.version,
        cversion: 0,
        aversion: 0,
        ephemeral_owner: 0,
        data_length: 1,
        num_children: 0,
    }
}

pub(crate) struct ZkKv {
    zk: Zk,
}

impl ZkKv {
    pub(crate) fn new(zk: Zk) -> ZkKv {
        ZkKv { zk }
    }
}

fn version(zxid: i64) -> Result<Version> {
    u64::try_from(zxid)
        .ok()
        .and_then(Version::new)
        .ok_or_else(|| Error::unexpected(format!("zookeeper returned zxid {zxid}")))
}

fn encode_value(value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(value.len() + 1);
    v.push(1);
    v.extend_from_slice(value);
    v
}

/// What a log record says happened.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    /// Put on an existing or new znode.
    Put,
    /// Put that replaced the znode (delete + create: ephemeral ownership changed).
    Replace,
    /// Delete that removed the znode.
    Delete,
    /// Delete that kept the znode as a parent of deeper keys.
    Clear,
}

impl Op {
    fn code(self) -> u8 {
        match self {
            Op::Put => b'P',
            Op::Replace => b'R',
            Op::Delete => b'D',
            Op::Clear => b'd',
        }
    }
    fn from_code(c: u8) -> Option<Op> {
        Some(match c {
            b'P' => Op::Put,
            b'R' => Op::Replace,
            b'D' => Op::Delete,
            b'd' => Op::Clear,
            _ => return None,
        })
    }
    /// Whether the znode was deleted (so a NodeDeleted event follows).
    fn removes_node(self) -> bool {
        matches!(self, Op::Replace | Op::Delete)
    }
}

fn encode_record(op: Op, key: &Key, owner: i64, value: &[u8]) -> Vec<u8> {
    let k = key.as_str().as_bytes();
    let mut v = Vec::with_capacity(1 + 2 + k.len() + 8 + value.len());
    v.push(op.code());
    v.extend_from_slice(&(k.len() as u16).to_be_bytes());
    v.extend_from_slice(k);
    v.extend_from_slice(&owner.to_be_bytes());
    v.extend_from_slice(value);
    v
}

struct Record {
    op: Op,
    key: Key,
    owner: i64,
    value: Vec<u8>,
}

fn decode_record(raw: &[u8]) -> Option<Record> {
    let op = Op::from_code(*raw.first()?)?;
    let len = u16::from_be_bytes([*raw.get(1)?, *raw.get(2)?]) as usize;
    let key = Key::new(std::str::from_utf8(raw.get(3..3 + len)?).ok()?).ok()?;
    let owner = i64::from_be_bytes(raw.get(3 + len..11 + len)?.try_into().ok()?);
    Some(Record {
        op,
        key,
        owner,
        value: raw.get(11 + len..)?.to_vec(),
    })
}

fn entry(key: Key, data: &[u8], stat: &Stat) -> Result<Option<Entry>> {
    if data.is_empty() {
        return Ok(None);
    }
    let value = Value::new(data[1..].to_vec()).map_err(|e| {
        Error::unexpected(format!(
            "key `{key}` holds a value written outside dprim: {}",
            e.message()
        ))
    })?;
    Ok(Some(Entry {
        key,
        value,
        version: version(stat.mzxid)?,
        session: (stat.ephemeral_owner != 0).then_some(SessionId(stat.ephemeral_owner as u64)),
    }))
}

fn precondition_error(key: &Key, precondition: Precondition, current: Option<&Stat>) -> Error {
    let current = current.filter(|s| s.data_length > 0).map(|s| s.mzxid);
    match (precondition, current) {
        (Precondition::Absent, Some(v)) => {
            Error::already_exists(format!("key `{key}` already exists (version {v})"))
        }
        (Precondition::Version(want), None) => Error::conflict(format!(
            "key `{key}` does not exist (expected version {want})"
        )),
        (Precondition::Version(want), Some(v)) => Error::conflict(format!(
            "key `{key}` has version {v}, not the expected {want}"
        )),
        _ => Error::unexpected("a precondition failed that held"),
    }
    .with_context("key", key)
}

fn holds(precondition: Precondition, stat: Option<&Stat>) -> bool {
    let current = stat.filter(|s| s.data_length > 0).map(|s| s.mzxid);
    match precondition {
        Precondition::None => true,
        Precondition::Absent => current.is_none(),
        Precondition::Version(v) => current == Some(v.get() as i64),
    }
}

/// Failures of a multi that mean "the state moved under us: read again".
fn is_race(e: &zookeeper_client::Error) -> bool {
    use zookeeper_client::Error as Z;
    matches!(e, Z::NodeExists | Z::BadVersion | Z::NoNode | Z::NotEmpty)
}

impl ZkKv {
    async fn stat(&self, client: &Client, path: &str) -> Result<Option<Stat>> {
        self.zk.call("exists", client.check_stat(path)).await
    }

    /// The client that must issue a write attached to `session` (ephemeral
    /// znodes belong to the session that creates them).
    async fn writer(&self, session: Option<SessionId>) -> Result<(Client, i64)> {
        match session {
            None => Ok((self.zk.client().await?, 0)),
            Some(id) => {
                let client = self.zk.session_client_by_id(id.0).ok_or_else(|| {
                    Error::session_lost(format!(
                        "session {id} is closed, lost, or not open on this backend instance"
                    ))
                })?;
                if crate::Terminated::is_terminated(&client.state()) {
                    return Err(Error::session_lost(format!(
                        "zookeeper session {id} has ended"
                    )));
                }
                Ok((client, id.0 as i64))
            }
        }
    }

    /// Adds the ops that put `value` at `path` given its current stat;
    /// returns whether they remove the key's znode (see [`Self::add_bump`]).
    fn plan_put(
        &self,
        w: &mut zookeeper_client::MultiWriter<'_>,
        n: &mut usize,
        key: &Key,
        value: &[u8],
        owner: i64,
        stat: Option<&Stat>,
    ) -> Result<bool> {
        let path = &self.zk.layout().kv_path(key);
        let mode = if owner != 0 {
            CreateMode::Ephemeral
        } else {
            CreateMode::Persistent
        };
        let options = self.zk.options(mode);
        let log_options = self.zk.options(CreateMode::PersistentSequential);
        let log = format!("{}/e-", self.zk.layout().log_dir());
        let data = encode_value(value);
        let map = |e: zookeeper_client::Error| crate::error::map_error(e);
        let op = match stat {
            Some(s) if s.ephemeral_owner != owner => {
                if s.num_children > 0 {
                    return Err(Error::invalid(format!(
                        "key `{key}` has keys under it; ZooKeeper cannot attach it to a session (ephemeral znodes have no children)"
                    )));
                }
                Op::Replace
            }
            _ => Op::Put,
        };
        w.add_create(&log, &encode_record(op, key, owner, value), &log_options)
            .map_err(map)?;
        *n += 1;
        match stat {
            // ZooKeeper 3.8 leaves the stat of a create inside a multi empty
            // (ZOOKEEPER-4026): create empty, then set the data, whose stat
            // carries the multi's zxid.
            None => {
                w.add_create(path, &[], &options).map_err(map)?;
                w.add_set_data(path, &data, Some(0)).map_err(map)?;
                *n += 2;
            }
            Some(s) if op == Op::Replace => {
                w.add_delete(path, Some(s.version)).map_err(map)?;
                w.add_create(path, &[], &options).map_err(map)?;
                w.add_set_data(path, &data, Some(0)).map_err(map)?;
                *n += 3;
            }
            Some(s) => {
                w.add_set_data(path, &data, Some(s.version)).map_err(map)?;
                *n += 1;
            }
        }
        Ok(op == Op::Replace)
    }

    /// Adds the ops that delete the key at `path` (which exists as an entry);
    /// returns whether they remove its znode.
    fn plan_delete(
        &self,
        w: &mut zookeeper_client::MultiWriter<'_>,
        n: &mut usize,
        key: &Key,
        path: &str,
        stat: &Stat,
    ) -> Result<bool> {
        let log_options = self.zk.options(CreateMode::PersistentSequential);
        let log = format!("{}/e-", self.zk.layout().log_dir());
        let map = |e: zookeeper_client::Error| crate::error::map_error(e);
        let op = if stat.num_children > 0 {
            Op::Clear
        } else {
            Op::Delete
        };
        w.add_create(&log, &encode_record(op, key, 0, &[]), &log_options)
            .map_err(map)?;
        if op == Op::Clear {
            w.add_set_data(path, &[], Some(stat.version)).map_err(map)?;
        } else {
            w.add_delete(path, Some(stat.version)).map_err(map)?;
        }
        *n += 2;
        Ok(op == Op::Delete)
    }

    /// Adds the generation bump a multi removing a key znode must carry;
    /// returns its index.
    fn add_bump(&self, w: &mut zookeeper_client::MultiWriter<'_>, n: &mut usize) -> Result<usize> {
        w.add_set_data(&self.zk.layout().gen_node(), &[], None)
            .map_err(crate::error::map_error)?;
        *n += 1;
        Ok(*n - 1)
    }

    /// Adds a check that no key znode was removed since generation `g`;
    /// returns its index.
    fn add_guard(
        &self,
        w: &mut zookeeper_client::MultiWriter<'_>,
        n: &mut usize,
        g: i64,
    ) -> Result<usize> {
        let g = i32::try_from(g).map_err(|_| Error::unexpected(format!("generation {g}")))?;
        w.add_check_version(&self.zk.layout().gen_node(), g)
            .map_err(crate::error::map_error)?;
        *n += 1;
        Ok(*n - 1)
    }

    /// The generation to guard a version-conditional write of the main
    /// session with (read now if this session has not observed one yet);
    /// `None` if it cannot be had.
    async fn guard_generation(&self, client: &Client, cell: &AtomicI64) -> Option<i64> {
        match cell.load(Ordering::SeqCst) {
            g if g >= 0 => Some(g),
            _ => refresh_generation(&self.zk, client, cell).await.ok(),
        }
    }

    /// The zxid of a committed multi, from the log record's stat (or a
    /// write's stat when the server leaves a create's stat empty).
    fn committed_version(results: &[MultiWriteResult]) -> Result<Version> {
        for r in results {
            match r {
                MultiWriteResult::Create { stat, .. } if stat.czxid > 0 => {
                    return version(stat.czxid)
                }
                MultiWriteResult::SetData { stat } if stat.mzxid > 0 => return version(stat.mzxid),
                _ => {}
            }
        }
        Err(Error::unexpected(
            "zookeeper returned no stat for a committed multi",
        ))
    }

    /// Records the log sequence of a committed multi and trims the log now
    /// and then so it stays bounded.
    fn after_commit(&self, results: &[MultiWriteResult]) {
        let log_dir = self.zk.layout().log_dir();
        let newest = results
            .iter()
            .filter_map(|r| match r {
                MultiWriteResult::Create { path, .. } if path.starts_with(&log_dir) => {
                    sequence(path)
                }
                _ => None,
            })
            .max();
        if let Some(seq) = newest {
            if seq % LOG_TRIM_EVERY == 0
                && seq > LOG_KEEP
                && !self.zk.0.kv.trimming.swap(true, Ordering::SeqCst)
            {
                let zk = self.zk.clone();
                tokio::spawn(async move {
                    if let Err(e) = trim_log(&zk, seq - LOG_KEEP).await {
                        tracing::debug!(error = %e, "trimming the zookeeper change log failed");
                    }
                    zk.0.kv.trimming.store(false, Ordering::SeqCst);
                });
            }
        }
    }
}

/// Deletes log records with a sequence below `below`, a chunk per `multi`
/// that also records the newest deleted record's zxid in the log directory,
/// so watches resuming from before it know history is gone. Another
/// trimmer's concurrent work fails the `multi` (a record already gone or the
/// directory's data moved): the next trim picks up what is left.
async fn trim_log(zk: &Zk, below: i64) -> Result<()> {
    let client = zk.client().await?;
    let dir = zk.layout().log_dir();
    let children = zk.call("list", client.list_children(&dir)).await?;
    let mut old: Vec<(i64, String)> = children
        .into_iter()
        .filter_map(|c| sequence(&c).map(|s| (s, c)))
        .filter(|(s, _)| *s < below)
        .collect();
    old.sort();
    for chunk in old.chunks(TRIM_CHUNK) {
        let Some((_, newest)) = chunk.last() else {
            break;
        };
        let Some(stat) = zk
            .call("exists", client.check_stat(&format!("{dir}/{newest}")))
            .await?
        else {
            return Ok(());
        };
        let (raw, dir_stat) = zk.call("get", client.get_data(&dir)).await?;
        let mut w = client.new_multi_writer();
        let map = crate::error::map_error;
        if stat.czxid > parse_trimmed(&raw) {
            w.add_set_data(
                &dir,
                stat.czxid.to_string().as_bytes(),
                Some(dir_stat.version),
            )
            .map_err(map)?;
        }
        for (_, name) in chunk {
            w.add_delete(&format!("{dir}/{name}"), None).map_err(map)?;
        }
        if let Err(e) = zk
            .call("trim", async { w.commit().await.map_err(Into::into) })
            .await
        {
            tracing::debug!(error = %e, "another client is trimming the change log");
            return Ok(());
        }
    }
    Ok(())
}

fn parse_trimmed(raw: &[u8]) -> i64 {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn multi_error(e: MultiWriteError) -> (Option<usize>, zookeeper_client::Error) {
    match e {
        MultiWriteError::RequestFailed { source } => (None, source),
        MultiWriteError::OperationFailed { index, source } => (Some(index), source),
    }
}

/// How many times a write re-reads and retries when the znode changed
/// between its read and its multi.
const RACE_RETRIES: usize = 64;

#[async_trait]
impl Kv for ZkKv {
    async fn get(&self, key: &Key) -> Result<Option<Entry>> {
        if key.is_root() {
            return Ok(None);
        }
        let (client, cell) = self.zk.main_client().await?;
        // Observed before the read is sent, so ordered before it.
        let generation = cell.load(Ordering::SeqCst);
        let path = self.zk.layout().kv_path(key);
        match self.zk.call("get", client.get_data(&path)).await {
            Ok((data, stat)) => {
                let remembered = (generation >= 0 && stat.ephemeral_owner == 0 && !data.is_empty())
                    .then_some(Remembered {
                        mzxid: stat.mzxid,
                        version: stat.version,
                        generation,
                    });
                self.zk.0.kv.remember(key, remembered);
                entry(key.clone(), &data, &stat)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.zk.0.kv.remember(key, None);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn put_with(&self, key: &Key, value: Value, options: PutOptions) -> Result<Version> {
        if key.is_root() {
            return Err(Error::invalid("cannot write the namespace root"));
        }
        // The main session's generation cell; writes through a dprim
        // session's connection read the generation anew and are not
        // remembered.
        let (client, owner, cell) = match options.session {
            None => {
                let (client, cell) = self.zk.main_client().await?;
                (client, 0, Some(cell))
            }
            Some(_) => {
                let (client, owner) = self.writer(options.session).await?;
                (client, owner, None)
            }
        };
        let path = self.zk.layout().kv_path(key);
        let kv = &self.zk.0.kv;
        // First try without reading the key where the read can be skipped:
        // a create assumes the key is absent (the multi fails NodeExists
        // otherwise), a CAS of the main session uses the stat.version
        // remembered with the expected mzxid.
        let mut guess = true;
        for _ in 0..RACE_RETRIES {
            let observed = cell.as_ref().map_or(-1, |c| c.load(Ordering::SeqCst));
            let remembered = match options.precondition {
                Precondition::Version(v) if guess && cell.is_some() => {
                    kv.recall(key, v.get() as i64)
                }
                _ => None,
            };
            let (stat, guard) = match (options.precondition, remembered) {
                (Precondition::Absent, _) if guess => (None, None),
                (_, Some(r)) => (Some(remembered_stat(&r)), Some(r.generation)),
                (precondition, None) => {
                    let guard = match (precondition, &cell) {
                        (Precondition::Version(_), Some(cell)) => {
                            self.guard_generation(&client, cell).await
                        }
                        // A dprim session's connection: read the generation
                        // through it, before the key.
                        (Precondition::Version(_), None) => {
                            refresh_generation(&self.zk, &client, &AtomicI64::new(-1))
                                .await
                                .ok()
                        }
                        _ => None,
                    };
                    (self.stat(&client, &path).await?, guard)
                }
            };
            if !holds(options.precondition, stat.as_ref()) {
                return Err(precondition_error(key, options.precondition, stat.as_ref()));
            }
            let mut w = client.new_multi_writer();
            let mut n = 0;
            let guard_at = match guard {
                Some(g) => Some(self.add_guard(&mut w, &mut n, g)?),
                None => None,
            };
            let removes =
                self.plan_put(&mut w, &mut n, key, value.as_bytes(), owner, stat.as_ref())?;
            let key_set_at = n - 1;
            let bump_at = match removes {
                true => Some(self.add_bump(&mut w, &mut n)?),
                false => None,
            };
            match w.commit().await {
                Ok(results) => {
                    self.after_commit(&results);
                    if let Some(cell) = &cell {
                        if let Some(MultiWriteResult::SetData { stat }) =
                            bump_at.and_then(|at| results.get(at))
                        {
                            cell.fetch_max(i64::from(stat.version), Ordering::SeqCst);
                        }
                        // Both were observed before the multi was sent.
                        let observed = observed.max(guard.unwrap_or(-1));
                        let remembered = match results.get(key_set_at) {
                            Some(MultiWriteResult::SetData { stat })
                                if owner == 0 && observed >= 0 =>
                            {
                                Some(Remembered {
                                    mzxid: stat.mzxid,
                                    version: stat.version,
                                    generation: observed,
                                })
                            }
                            _ => None,
                        };
                        kv.remember(key, remembered);
                    }
                    return Self::committed_version(&results);
                }
                Err(e) => {
                    let (index, source) = multi_error(e);
                    let at_generation = index.is_some() && (index == guard_at || index == bump_at);
                    if at_generation {
                        // A key znode was removed since (BadVersion) or the
                        // generation znode is missing (NoNode): learn it anew.
                        if let Some(cell) = &cell {
                            refresh_generation(&self.zk, &client, cell).await?;
                        } else {
                            self.zk
                                .mkdirs(&client, &self.zk.layout().gen_node())
                                .await?;
                        }
                        guess = false;
                        continue;
                    }
                    if matches!(source, zookeeper_client::Error::NoNode) && stat.is_none() {
                        self.zk.mkdirs(&client, parent(&path)).await?;
                        continue;
                    }
                    if matches!(source, zookeeper_client::Error::NoChildrenForEphemerals) {
                        return Err(Error::invalid(format!(
                            "key `{key}` is under a key attached to a session; ZooKeeper cannot nest keys under ephemeral ones"
                        )));
                    }
                    if is_race(&source) {
                        guess = false;
                        kv.remember(key, None);
                        continue;
                    }
                    return Err(crate::error::map_error(source).with_context("key", key));
                }
            }
        }
        Err(Error::new(
            ErrorKind::Unavailable,
            format!("key `{key}` kept changing under concurrent writers; try again"),
        )
        .temporary())
    }

    async fn delete_with(&self, key: &Key, precondition: Precondition) -> Result<bool> {
        if precondition == Precondition::Absent {
            return Err(Error::invalid(
                "a delete cannot require the key to be absent; use Precondition::None or Version",
            ));
        }
        if key.is_root() {
            return Ok(false);
        }
        let (client, cell) = self.zk.main_client().await?;
        let path = self.zk.layout().kv_path(key);
        let kv = &self.zk.0.kv;
        let mut guess = true;
        for _ in 0..RACE_RETRIES {
            let remembered = match precondition {
                Precondition::Version(v) if guess => kv.recall(key, v.get() as i64),
                _ => None,
            };
            let (stat, guard) = match (precondition, remembered) {
                (_, Some(r)) => (Some(remembered_stat(&r)), Some(r.generation)),
                (Precondition::Version(_), None) => {
                    let guard = self.guard_generation(&client, &cell).await;
                    (self.stat(&client, &path).await?, guard)
                }
                _ => (self.stat(&client, &path).await?, None),
            };
            if !holds(precondition, stat.as_ref()) {
                return Err(precondition_error(key, precondition, stat.as_ref()));
            }
            let Some(stat) = stat.filter(|s| s.data_length > 0) else {
                return Ok(false);
            };
            let mut w = client.new_multi_writer();
            let mut n = 0;
            let guard_at = match guard {
                Some(g) => Some(self.add_guard(&mut w, &mut n, g)?),
                None => None,
            };
            let removes = self.plan_delete(&mut w, &mut n, key, &path, &stat)?;
            let bump_at = match removes {
                true => Some(self.add_bump(&mut w, &mut n)?),
                false => None,
            };
            match w.commit().await {
                Ok(results) => {
                    self.after_commit(&results);
                    if let Some(MultiWriteResult::SetData { stat }) =
                        bump_at.and_then(|at| results.get(at))
                    {
                        cell.fetch_max(i64::from(stat.version), Ordering::SeqCst);
                    }
                    kv.remember(key, None);
                    return Ok(true);
                }
                Err(e) => {
                    let (index, source) = multi_error(e);
                    if index.is_some() && (index == guard_at || index == bump_at) {
                        refresh_generation(&self.zk, &client, &cell).await?;
                        guess = false;
                        continue;
                    }
                    if is_race(&source) {
                        guess = false;
                        kv.remember(key, None);
                        continue;
                    }
                    return Err(crate::error::map_error(source).with_context("key", key));
                }
            }
        }
        Err(Error::new(
            ErrorKind::Unavailable,
            format!("key `{key}` kept changing under concurrent writers; try again"),
        )
        .temporary())
    }

    async fn list(&self, dir: &Key, depth: Depth) -> Result<Listing> {
        let client = self.zk.client().await?;
        let log_dir = self.zk.layout().log_dir();
        let deadline = tokio::time::Instant::now() + self.zk.0.request_timeout;
        let mut attempt = 0u32;
        loop {
            // A listing is many reads; it is a snapshot at the log's head
            // when no logged change landed while it was taken.
            let before = self.log_head(&client, &log_dir).await?;
            let entries = self.collect(&client, dir, depth).await?;
            let after = self.log_head(&client, &log_dir).await?;
            if before == after || tokio::time::Instant::now() >= deadline {
                let mut entries = entries;
                entries.sort_by(|a, b| a.key.cmp(&b.key));
                return Ok(Listing {
                    entries,
                    revision: version(before)?,
                });
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(u64::from(attempt.min(20)))).await;
        }
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        txn.validate()?;
        let bytes: usize = txn
            .ops
            .iter()
            .map(|op| match op {
                TxnOp::Put { value, .. } => value.as_bytes().len(),
                TxnOp::Delete { .. } => 0,
            })
            .sum();
        if bytes > MAX_TXN_VALUE_BYTES {
            return Err(Error::invalid(format!(
                "transaction carries {bytes} value bytes; the zookeeper backend allows at most {MAX_TXN_VALUE_BYTES} per transaction (a ZooKeeper request is at most 1 MB)"
            )));
        }
        let mut sessions = txn.ops.iter().filter_map(|op| match op {
            TxnOp::Put { session, .. } => *session,
            TxnOp::Delete { .. } => None,
        });
        let first = sessions.next();
        if sessions.any(|s| Some(s) != first) {
            return Err(Error::invalid(
                "a zookeeper transaction can attach keys to at most one session",
            ));
        }
        for op in &txn.ops {
            if op.key().is_root() {
                return Err(Error::invalid("cannot write the namespace root"));
            }
        }
        let (client, owner) = self.writer(first).await?;
        // Version checks are guarded by the generation (see the module
        // docs), read through the connection that reads the keys.
        let cell = match first {
            None => Some(self.zk.main_client().await?.1),
            Some(_) => None,
        };
        let needs_guard = txn
            .checks
            .iter()
            .any(|(_, p)| matches!(p, Precondition::Version(_)));
        let layout = self.zk.layout();
        for _ in 0..RACE_RETRIES {
            let guard = match (&cell, needs_guard) {
                (Some(cell), true) => self.guard_generation(&client, cell).await,
                (None, true) => refresh_generation(&self.zk, &client, &AtomicI64::new(-1))
                    .await
                    .ok(),
                (_, false) => None,
            };
            let mut paths: Vec<String> = Vec::new();
            for (k, _) in &txn.checks {
                paths.push(layout.kv_path(k));
            }
            for op in &txn.ops {
                paths.push(layout.kv_path(op.key()));
            }
            let stats =
                futures::future::try_join_all(paths.iter().map(|p| self.stat(&client, p))).await?;
            let (check_stats, op_stats) = stats.split_at(txn.checks.len());
            for ((key, pre), stat) in txn.checks.iter().zip(check_stats) {
                if !holds(*pre, stat.as_ref()) {
                    let why = precondition_error(key, *pre, stat.as_ref());
                    return Err(Error::conflict(format!(
                        "transaction check failed, nothing was written: {}",
                        why.message()
                    ))
                    .with_context("key", key));
                }
            }
            let mut w = client.new_multi_writer();
            let map = crate::error::map_error;
            let mut n = 0;
            let guard_at = match guard {
                Some(g) => Some(self.add_guard(&mut w, &mut n, g)?),
                None => None,
            };
            let mut removes = false;
            // Checks become version checks (or create+delete for absence), so
            // the multi fails if anything moved since the reads above.
            let mut check_of_index: Vec<(usize, usize)> = Vec::new();
            for (i, ((key, pre), stat)) in txn.checks.iter().zip(check_stats).enumerate() {
                let path = layout.kv_path(key);
                match (pre, stat) {
                    (Precondition::None, _) => {}
                    (_, Some(s)) => {
                        w.add_check_version(&path, s.version).map_err(map)?;
                        check_of_index.push((n, i));
                        n += 1;
                    }
                    // Absent and put by this transaction: the put's create
                    // fails if the key appears, which is the check. A
                    // create + delete here would also show watchers a
                    // delete of a key that never existed.
                    (_, None)
                        if txn
                            .ops
                            .iter()
                            .any(|op| matches!(op, TxnOp::Put { key: k, .. } if k == key)) => {}
                    (_, None) => {
                        self.zk.mkdirs(&client, parent(&path)).await?;
                        w.add_create(&path, &[], &self.zk.options(CreateMode::Persistent))
                            .map_err(map)?;
                        w.add_delete(&path, None).map_err(map)?;
                        check_of_index.push((n, i));
                        n += 2;
                    }
                }
            }
            let mut is_put = Vec::new();
            for (op, stat) in txn.ops.iter().zip(op_stats) {
                let path = layout.kv_path(op.key());
                match op {
                    TxnOp::Put {
                        key,
                        value,
                        session,
                    } => {
                        if stat.is_none() {
                            self.zk.mkdirs(&client, parent(&path)).await?;
                        }
                        let o = if session.is_some() { owner } else { 0 };
                        removes |=
                            self.plan_put(&mut w, &mut n, key, value.as_bytes(), o, stat.as_ref())?;
                        is_put.push(true);
                    }
                    TxnOp::Delete { key } => {
                        match stat.as_ref().filter(|s| s.data_length > 0) {
                            Some(s) => {
                                removes |= self.plan_delete(&mut w, &mut n, key, &path, s)?
                            }
                            None => {
                                // Missing: assert it stays missing, so the
                                // delete is part of the atomic outcome.
                                if let Some(s) = stat {
                                    w.add_check_version(&path, s.version).map_err(map)?;
                                    n += 1;
                                }
                            }
                        }
                        is_put.push(false);
                    }
                }
            }
            let bump_at = match removes {
                true => Some(self.add_bump(&mut w, &mut n)?),
                false => None,
            };
            match w.commit().await {
                Ok(results) => {
                    self.after_commit(&results);
                    if let (Some(cell), Some(MultiWriteResult::SetData { stat })) =
                        (&cell, bump_at.and_then(|at| results.get(at)))
                    {
                        cell.fetch_max(i64::from(stat.version), Ordering::SeqCst);
                    }
                    for op in &txn.ops {
                        self.zk.0.kv.remember(op.key(), None);
                    }
                    let v = match Self::committed_version(&results) {
                        Ok(v) => Some(v),
                        Err(e) if is_put.iter().any(|p| *p) => return Err(e),
                        Err(_) => None,
                    };
                    return Ok(TxnResult {
                        versions: is_put
                            .into_iter()
                            .map(|p| if p { v } else { None })
                            .collect(),
                    });
                }
                Err(e) => {
                    let (index, source) = multi_error(e);
                    if index.is_some() && (index == guard_at || index == bump_at) {
                        match &cell {
                            Some(cell) => {
                                refresh_generation(&self.zk, &client, cell).await?;
                            }
                            None => {
                                self.zk.mkdirs(&client, &layout.gen_node()).await?;
                            }
                        }
                        continue;
                    }
                    if let Some((_, i)) = check_of_index
                        .iter()
                        .find(|(at, _)| index == Some(*at) || index == Some(*at + 1))
                    {
                        if is_race(&source) {
                            // A checked key changed after the read: re-read
                            // so the error names the state that failed.
                            let _ = i;
                            continue;
                        }
                    }
                    if matches!(source, zookeeper_client::Error::NoChildrenForEphemerals) {
                        return Err(Error::invalid(
                            "a key in the transaction is under a key attached to a session; ZooKeeper cannot nest keys under ephemeral ones",
                        ));
                    }
                    if is_race(&source) {
                        continue;
                    }
                    return Err(crate::error::map_error(source));
                }
            }
        }
        Err(Error::new(
            ErrorKind::Unavailable,
            "transaction keys kept changing under concurrent writers; try again",
        )
        .temporary())
    }

    async fn watch(&self, target: WatchTarget, start: WatchStart) -> Result<WatchStream> {
        let client = self.zk.client().await?;
        let layout = self.zk.layout();
        // Subscribe first, then read: nothing between is missed.
        let watcher = self
            .zk
            .call(
                "watch",
                client.watch(&layout.kv_root(), AddWatchMode::PersistentRecursive),
            )
            .await?;
        let (tx, rx) = mpsc::channel(256);
        let mut w = Watcher {
            zk: self.zk.clone(),
            client,
            target,
            after: match start {
                WatchStart::Now => 0,
                WatchStart::After(v) => v.get() as i64,
            },
            tx,
            last_seq: -1,
            install_point: 0,
            logged_deletes: HashMap::new(),
            last_version: HashMap::new(),
            ephemerals: HashSet::new(),
            quiet_checks: 0,
            checked_log: None,
        };
        let opening = w.open(start).await?;
        tokio::spawn(w.run(watcher, opening));
        let mut rx = rx;
        Ok(WatchStream::new(
            futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed(),
        ))
    }
}

impl ZkKv {
    async fn log_head(&self, client: &Client, log_dir: &str) -> Result<i64> {
        match self.stat(client, log_dir).await? {
            Some(s) => Ok(s.pzxid.max(s.mzxid)),
            None => {
                self.zk.mkdirs(client, log_dir).await?;
                Ok(self.stat(client, log_dir).await?.map_or(0, |s| s.pzxid))
            }
        }
    }

    async fn collect(&self, client: &Client, dir: &Key, depth: Depth) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut frontier = vec![dir.clone()];
        while !frontier.is_empty() {
            let listed = futures::future::try_join_all(frontier.iter().map(|d| async move {
                let path = self.zk.layout().kv_path(d);
                match self.zk.call("list", client.list_children(&path)).await {
                    Ok(children) => Ok((d.clone(), children)),
                    Err(e) if e.kind() == ErrorKind::NotFound => Ok((d.clone(), Vec::new())),
                    Err(e) => Err(e),
                }
            }))
            .await?;
            let mut keys = Vec::new();
            for (d, children) in listed {
                for c in children {
                    if c.starts_with('!') {
                        continue;
                    }
                    if let Ok(k) = d.join(&c) {
                        keys.push(k);
                    }
                }
            }
            let mut next = Vec::new();
            for chunk in keys.chunks(32) {
                let mut reader = client.new_multi_reader();
                for k in chunk {
                    reader
                        .add_get_data(&self.zk.layout().kv_path(k))
                        .map_err(crate::error::map_error)?;
                }
                let results = self.zk.call("multi read", reader.commit()).await?;
                for (k, r) in chunk.iter().zip(results) {
                    if let MultiReadResult::Data { data, stat } = r {
                        if let Some(e) = entry(k.clone(), &data, &stat)? {
                            out.push(e);
                        }
                        if depth == Depth::Recursive && stat.num_children > 0 {
                            next.push(k.clone());
                        }
                    }
                }
            }
            frontier = next;
        }
        Ok(out)
    }
}

struct Watcher {
    zk: Zk,
    client: Client,
    target: WatchTarget,
    /// Deliver only changes with a zxid above this.
    after: i64,
    tx: mpsc::Sender<Result<WatchEvent>>,
    /// The newest log record handled.
    last_seq: i64,
    /// The log head read right after the watch was installed: deletions in
    /// later records are certain to show up as NodeDeleted events too.
    install_point: i64,
    /// Quiet-time checks made so far (every tenth also checks ephemerals).
    quiet_checks: u64,
    /// The log directory's pzxid at the last full catch-up: while it is
    /// unchanged no record was added or trimmed, and listing the log again
    /// would find nothing new.
    checked_log: Option<i64>,
    /// Logged deletions whose NodeDeleted event is still to come, by path.
    logged_deletes: HashMap<String, usize>,
    last_version: HashMap<Key, i64>,
    /// Ephemeral keys seen, to check after a reconnect.
    ephemerals: HashSet<Key>,
}

enum Opening {
    Live,
    Resync(String),
}

impl Watcher {
    /// Reads the log after the watch is installed and replays what the
    /// start point asks for.
    async fn open(&mut self, start: WatchStart) -> Result<Opening> {
        let log_dir = self.zk.layout().log_dir();
        let (raw, stat) = match self.zk.call("get", self.client.get_data(&log_dir)).await {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.zk.mkdirs(&self.client, &log_dir).await?;
                self.zk.call("get", self.client.get_data(&log_dir)).await?
            }
            Err(e) => Err(e)?,
        };
        self.install_point = stat.pzxid;
        let trimmed = parse_trimmed(&raw);
        let records = self.list_log().await?;
        match start {
            WatchStart::Now => {
                self.last_seq = records.last().map_or(-1, |(s, _)| *s);
                Ok(Opening::Live)
            }
            WatchStart::After(v) => {
                if trimmed > v.get() as i64 {
                    return Ok(Opening::Resync(format!(
                        "zookeeper keeps no history and dprim's change log was trimmed past version {v}; re-list and watch from the listing's revision"
                    )));
                }
                match self.replay(records).await? {
                    true => Ok(Opening::Live),
                    false => Ok(Opening::Resync(
                        "change-log records were trimmed while a watch replayed them; re-list and watch from the listing's revision".into(),
                    )),
                }
            }
        }
    }

    async fn list_log(&self) -> Result<Vec<(i64, String)>> {
        let log_dir = self.zk.layout().log_dir();
        let children = self
            .zk
            .call("list", self.client.list_children(&log_dir))
            .await?;
        let mut records: Vec<(i64, String)> = children
            .into_iter()
            .filter_map(|c| sequence(&c).map(|s| (s, format!("{log_dir}/{c}"))))
            .collect();
        records.sort();
        Ok(records)
    }

    /// Delivers the records after `last_seq`; false if one vanished (trimmed).
    async fn replay(&mut self, records: Vec<(i64, String)>) -> Result<bool> {
        let pending: Vec<(i64, String)> = records
            .into_iter()
            .filter(|(s, _)| *s > self.last_seq)
            .collect();
        for chunk in pending.chunks(64) {
            let mut reader = self.client.new_multi_reader();
            for (_, path) in chunk {
                reader.add_get_data(path).map_err(crate::error::map_error)?;
            }
            let results = self.zk.call("multi read", reader.commit()).await?;
            for ((seq, _), r) in chunk.iter().zip(results) {
                match r {
                    MultiReadResult::Data { data, stat } => {
                        self.last_seq = *seq;
                        if !self.handle_record(&data, &stat).await {
                            return Ok(true);
                        }
                    }
                    _ => return Ok(false),
                }
            }
        }
        Ok(true)
    }

    /// Handles one log record; false once the reader has gone.
    async fn handle_record(&mut self, data: &[u8], stat: &Stat) -> bool {
        let Some(record) = decode_record(data) else {
            return true;
        };
        let path = self.zk.layout().kv_path(&record.key);
        if record.op.removes_node() && stat.czxid > self.install_point {
            *self.logged_deletes.entry(path).or_default() += 1;
        }
        if stat.czxid <= self.after || !self.target.covers(&record.key) {
            return true;
        }
        let Ok(v) = version(stat.czxid) else {
            return true;
        };
        self.last_version.insert(record.key.clone(), stat.czxid);
        let event = match record.op {
            Op::Put | Op::Replace => {
                let Ok(value) = Value::new(record.value) else {
                    return true;
                };
                if record.owner != 0 {
                    self.ephemerals.insert(record.key.clone());
                } else {
                    self.ephemerals.remove(&record.key);
                }
                WatchEvent::Put(Entry {
                    key: record.key,
                    value,
                    version: v,
                    session: (record.owner != 0).then_some(SessionId(record.owner as u64)),
                })
            }
            Op::Delete | Op::Clear => {
                self.ephemerals.remove(&record.key);
                WatchEvent::Delete {
                    key: record.key,
                    version: v,
                }
            }
        };
        self.tx.send(Ok(event)).await.is_ok()
    }

    /// A deletion with no log record (the server removed an ephemeral key
    /// when its session ended). Its version is the parent's pzxid, which is
    /// the deletion's zxid or a later child change of the same parent.
    async fn unlogged_delete(&mut self, key: Key) -> bool {
        let path = self.zk.layout().kv_path(&key);
        let pzxid = match self
            .zk
            .call("exists", self.client.check_stat(parent(&path)))
            .await
        {
            Ok(Some(s)) => s.pzxid,
            _ => 0,
        };
        let last = self.last_version.get(&key).copied().unwrap_or(0);
        let zxid = pzxid.max(last + 1);
        self.last_version.insert(key.clone(), zxid);
        self.ephemerals.remove(&key);
        if zxid <= self.after {
            return true;
        }
        let Ok(version) = version(zxid) else {
            return true;
        };
        self.tx
            .send(Ok(WatchEvent::Delete { key, version }))
            .await
            .is_ok()
    }

    async fn resync(&self, reason: String) {
        let _ = self.tx.send(Ok(WatchEvent::Resync { reason })).await;
    }

    /// The once-a-second safety net: a full catch-up only if the log
    /// changed since the last one (or every tenth time, for the ephemeral
    /// keys, whose server-side deletion leaves no log record). Every watch
    /// of every client runs it, so when nothing changed it must cost one
    /// `exists`, not a listing of the whole log.
    async fn quiet_check(&mut self) -> Result<bool> {
        self.quiet_checks += 1;
        let log_dir = self.zk.layout().log_dir();
        let pzxid = self
            .zk
            .call("exists", self.client.check_stat(&log_dir))
            .await?
            .map(|s| s.pzxid);
        if pzxid.is_some() && pzxid == self.checked_log && self.quiet_checks % 10 != 0 {
            return Ok(true);
        }
        let caught_up = self.catch_up().await?;
        if caught_up {
            self.checked_log = pzxid;
        }
        Ok(caught_up)
    }

    /// After a reconnect: persistent watches may miss events while
    /// disconnected (ZOOKEEPER-4698), so catch up from the log and check
    /// the ephemeral keys seen so far.
    async fn catch_up(&mut self) -> Result<bool> {
        let records = self.list_log().await?;
        if let Some((first, _)) = records.first() {
            if *first > self.last_seq + 1 && self.last_seq >= 0 {
                let (raw, _) = self
                    .zk
                    .call("get", self.client.get_data(&self.zk.layout().log_dir()))
                    .await?;
                if parse_trimmed(&raw) > self.last_version.values().copied().max().unwrap_or(0)
                    && parse_trimmed(&raw) > self.after
                {
                    return Ok(false);
                }
            }
        }
        if !self.replay(records).await? {
            return Ok(false);
        }
        let keys: Vec<Key> = self.ephemerals.iter().cloned().collect();
        for key in keys {
            let path = self.zk.layout().kv_path(&key);
            let gone = match self
                .zk
                .call("exists", self.client.check_stat(&path))
                .await?
            {
                None => true,
                Some(s) => s.data_length == 0 || s.ephemeral_owner == 0,
            };
            if gone && !self.unlogged_delete(key).await {
                return Ok(true);
            }
        }
        Ok(true)
    }

    async fn run(mut self, mut watcher: zookeeper_client::PersistentWatcher, opening: Opening) {
        if let Opening::Resync(reason) = opening {
            self.resync(reason).await;
            return;
        }
        let log_prefix = format!("{}/", self.zk.layout().log_dir());
        let mut disconnected = false;
        let mut states = self.client.state_watcher();
        // The log is the record of truth: when the watch is quiet, look at it
        // anyway, so an event lost in a reconnect (ZOOKEEPER-4698) is caught
        // up within a second.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                _ = self.tx.closed() => return,
                e = watcher.changed() => e,
                s = states.changed() => zookeeper_client::WatchedEvent::new_session(s),
                _ = tick.tick() => {
                    match self.quiet_check().await {
                        Ok(true) => continue,
                        Ok(false) => {
                            self.resync("change-log records were trimmed before the watch read them; re-list and watch from the listing's revision".into()).await;
                            return;
                        }
                        // Unreachable for now: the next tick tries again.
                        Err(_) => continue,
                    }
                }
            };
            match event.event_type {
                EventType::Session => match event.session_state {
                    SessionState::Disconnected => disconnected = true,
                    SessionState::SyncConnected | SessionState::ConnectedReadOnly
                        if disconnected =>
                    {
                        disconnected = false;
                        // Install the watch again in case the reconnect lost it.
                        if let Ok(w) = self
                            .zk
                            .call(
                                "watch",
                                self.client.watch(
                                    &self.zk.layout().kv_root(),
                                    AddWatchMode::PersistentRecursive,
                                ),
                            )
                            .await
                        {
                            watcher = w;
                        }
                        match self.catch_up().await {
                            Ok(true) => {}
                            Ok(false) => {
                                self.resync("change-log records were trimmed while the watch was disconnected; re-list and watch from the listing's revision".into()).await;
                                return;
                            }
                            Err(e) => {
                                self.resync(format!(
                                    "could not catch up after a reconnect ({e}); re-list and watch from the listing's revision"
                                ))
                                .await;
                                return;
                            }
                        }
                    }
                    SessionState::Expired | SessionState::Closed | SessionState::AuthFailed => {
                        self.resync(format!(
                            "the zookeeper session carrying the watch ended ({:?}); re-list and watch from the listing's revision",
                            event.session_state
                        ))
                        .await;
                        return;
                    }
                    _ => {}
                },
                EventType::NodeCreated if event.path.starts_with(&log_prefix) => {
                    let Some(seq) = sequence(&event.path) else {
                        continue;
                    };
                    if seq <= self.last_seq {
                        continue;
                    }
                    let read = tokio::time::timeout(
                        self.zk.0.request_timeout,
                        self.zk.0.kv.read_record(&self.client, seq, &event.path),
                    )
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()));
                    match read {
                        Ok(record) => {
                            self.last_seq = seq;
                            let (data, stat) = &*record;
                            if !self.handle_record(data, stat).await {
                                return;
                            }
                        }
                        Err(e) => {
                            // Trimmed before it could be read, or the
                            // connection broke: continuity is not proven.
                            self.resync(format!(
                                "a change-log record could not be read ({e}); re-list and watch from the listing's revision"
                            ))
                            .await;
                            return;
                        }
                    }
                }
                EventType::NodeDeleted if !event.path.starts_with(&log_prefix) => {
                    if let Some(n) = self.logged_deletes.get_mut(&event.path) {
                        *n -= 1;
                        if *n == 0 {
                            self.logged_deletes.remove(&event.path);
                        }
                        continue;
                    }
                    let Some(key) = self.zk.layout().app_key(&event.path) else {
                        continue;
                    };
                    if !self.target.covers(&key) {
                        continue;
                    }
                    if !self.unlogged_delete(key).await {
                        return;
                    }
                }
                _ => {}
            }
        }
    }
}
