//! Kv: versioned keys and values for coordination.

use crate::error::{Error, Result};
use crate::key::{Key, Value};
use crate::session::{Session, SessionId};
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::Stream;
use std::collections::HashSet;
use std::fmt;
use std::num::NonZeroU64;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Most operations (puts plus deletes) one [`Txn`] may carry on any backend.
pub const MAX_TXN_OPS: usize = 64;

/// An opaque revision token. Never zero, so "missing" is never confused with
/// a first version (ZooKeeper versions start at 0; dprim's never do).
///
/// # Behavior
/// - A key's version increases on every change of that key.
/// - Versions handed out by one backend namespace are totally ordered: a
///   change that happens after another (as seen by any client) has a larger
///   version. This is what lets a watch resume "after version V".
/// - Apps must not do arithmetic on versions; compare them, store them, pass
///   them back.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(NonZeroU64);

impl Version {
    /// Builds a version from its wire form; `None` for 0.
    pub fn new(raw: u64) -> Option<Version> {
        NonZeroU64::new(raw).map(Version)
    }
    /// The wire form (what `Display` prints and `FromStr` parses).
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

impl std::str::FromStr for Version {
    type Err = Error;
    fn from_str(s: &str) -> Result<Version> {
        s.trim()
            .parse::<u64>()
            .ok()
            .and_then(Version::new)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "`{s}` is not a version; versions are positive integers as printed by `dprim kv get`"
                ))
            })
    }
}

/// One key's current state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The key, relative to the namespace.
    pub key: Key,
    /// The value.
    pub value: Value,
    /// The version of the last change.
    pub version: Version,
    /// The session the key is attached to, if it is ephemeral.
    pub session: Option<SessionId>,
}

/// What must hold for a write to happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precondition {
    /// Nothing: write unconditionally.
    #[default]
    None,
    /// The key must not exist (create).
    Absent,
    /// The key must exist with exactly this version (compare-and-swap).
    Version(Version),
}

/// Options of [`Kv::put_with`].
#[derive(Clone, Debug, Default)]
pub struct PutOptions {
    /// What must hold; a failed `Absent` gives `AlreadyExists`, a failed
    /// `Version` gives `Conflict`.
    pub precondition: Precondition,
    /// Attach the key to this session: it is deleted when the session is
    /// closed or expires (an ephemeral key).
    pub session: Option<SessionId>,
}

/// How deep [`Kv::list`] looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Depth {
    /// Only the directory's immediate children.
    #[default]
    Children,
    /// Every key under the directory, at any depth.
    Recursive,
}

/// The result of [`Kv::list`].
#[derive(Clone, Debug)]
pub struct Listing {
    /// Entries sorted by key.
    pub entries: Vec<Entry>,
    /// The namespace revision the listing reflects: a watch started
    /// [`WatchStart::After`] it sees every later change.
    pub revision: Version,
}

/// One operation inside a [`Txn`].
#[derive(Clone, Debug)]
pub enum TxnOp {
    /// Put a value, optionally attached to a session.
    Put {
        /// Key to write.
        key: Key,
        /// New value.
        value: Value,
        /// Session to attach the key to (ephemeral), if any.
        session: Option<SessionId>,
    },
    /// Delete a key (no error if it is missing).
    Delete {
        /// Key to delete.
        key: Key,
    },
}

impl TxnOp {
    /// The key the operation writes.
    pub fn key(&self) -> &Key {
        match self {
            TxnOp::Put { key, .. } | TxnOp::Delete { key } => key,
        }
    }
}

/// A multi-key transaction: if every check holds, apply every op atomically;
/// otherwise apply nothing.
#[derive(Clone, Debug, Default)]
pub struct Txn {
    /// Preconditions, each on one key.
    pub checks: Vec<(Key, Precondition)>,
    /// Writes applied together when all checks hold.
    pub ops: Vec<TxnOp>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Txn {
        Txn::default()
    }
    /// Adds a check.
    pub fn check(mut self, key: Key, precondition: Precondition) -> Txn {
        self.checks.push((key, precondition));
        self
    }
    /// Adds a put.
    pub fn put(mut self, key: Key, value: Value) -> Txn {
        self.ops.push(TxnOp::Put {
            key,
            value,
            session: None,
        });
        self
    }
    /// Adds a delete.
    pub fn delete(mut self, key: Key) -> Txn {
        self.ops.push(TxnOp::Delete { key });
        self
    }

    /// Validates the portable transaction rules; every backend calls this
    /// before any I/O.
    ///
    /// # Behavior
    /// - A transaction that writes the same key twice is `InvalidArgument`
    ///   (etcd rejects it; dprim rejects it everywhere).
    /// - More than [`MAX_TXN_OPS`] operations is `InvalidArgument`.
    /// - A transaction with no operations is `InvalidArgument`.
    pub fn validate(&self) -> Result<()> {
        if self.ops.is_empty() {
            return Err(Error::invalid("transaction has no operations"));
        }
        if self.ops.len() > MAX_TXN_OPS {
            return Err(Error::invalid(format!(
                "transaction has {} operations; the portable limit is {MAX_TXN_OPS}",
                self.ops.len()
            )));
        }
        let mut seen = HashSet::new();
        for op in &self.ops {
            if !seen.insert(op.key()) {
                return Err(Error::invalid(format!(
                    "transaction writes key `{}` more than once; merge the operations",
                    op.key()
                )));
            }
        }
        Ok(())
    }
}

/// What a committed transaction produced.
#[derive(Clone, Debug)]
pub struct TxnResult {
    /// For each op in order: the new version for a put, `None` for a delete.
    pub versions: Vec<Option<Version>>,
}

/// What a watch follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchTarget {
    /// Exactly one key.
    Key(Key),
    /// Every key strictly under a directory, at any depth (per segment:
    /// `a/b` does not cover `a/bc`).
    Dir(Key),
}

impl WatchTarget {
    /// Whether `key` is covered by this target.
    pub fn covers(&self, key: &Key) -> bool {
        match self {
            WatchTarget::Key(k) => k == key,
            WatchTarget::Dir(d) => key.is_under(d),
        }
    }
}

/// Where a watch starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WatchStart {
    /// Changes made after `watch` returned. The current value is not delivered.
    #[default]
    Now,
    /// Every change with a version greater than this one, including changes
    /// made before `watch` was called.
    After(Version),
}

/// One item of a watch stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or changed; carries the new entry.
    Put(Entry),
    /// The key was deleted (explicitly, by CAS delete, or because its session ended).
    Delete {
        /// The deleted key.
        key: Key,
        /// The revision of the deletion.
        version: Version,
    },
    /// Continuity could not be proven; events may have been missed. The
    /// stream ends after this item: re-list, then watch again from the
    /// listing's revision.
    Resync {
        /// Why (history compacted, subscriber lagged, reconnected).
        reason: String,
    },
}

impl WatchEvent {
    /// The version of a put or delete; `None` for a resync.
    pub fn version(&self) -> Option<Version> {
        match self {
            WatchEvent::Put(e) => Some(e.version),
            WatchEvent::Delete { version, .. } => Some(*version),
            WatchEvent::Resync { .. } => None,
        }
    }
    /// The key of a put or delete; `None` for a resync.
    pub fn key(&self) -> Option<&Key> {
        match self {
            WatchEvent::Put(e) => Some(&e.key),
            WatchEvent::Delete { key, .. } => Some(key),
            WatchEvent::Resync { .. } => None,
        }
    }
}

/// A stream of [`WatchEvent`]s. Dropping it cancels the watch.
pub struct WatchStream {
    inner: BoxStream<'static, Result<WatchEvent>>,
}

impl WatchStream {
    /// Wraps a backend stream.
    pub fn new(inner: BoxStream<'static, Result<WatchEvent>>) -> WatchStream {
        WatchStream { inner }
    }
    /// The next event; `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<Result<WatchEvent>> {
        futures::StreamExt::next(&mut self.inner).await
    }
}

impl Stream for WatchStream {
    type Item = Result<WatchEvent>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WatchStream")
    }
}

/// Versioned key-value storage for coordination data.
///
/// Keys live under the backend's namespace; internal keys of other
/// primitives (locks, elections, sessions, queues) never appear here.
#[async_trait]
pub trait Kv: Send + Sync {
    /// Reads one key.
    ///
    /// # Behavior
    /// - Returns `Ok(None)` for a missing key (never `NotFound`).
    /// - On a backend declaring `linearizable`, reflects every write
    ///   acknowledged before the call started.
    async fn get(&self, key: &Key) -> Result<Option<Entry>>;

    /// Writes one key under a precondition, optionally attached to a session.
    ///
    /// # Behavior
    /// - Returns the new version, greater than any earlier version of the key.
    /// - `Precondition::Absent` on an existing key fails `AlreadyExists`;
    ///   `Precondition::Version(v)` fails `Conflict` unless the key exists
    ///   with version `v`. A failed write changes nothing.
    /// - Creating a key again after it was deleted succeeds.
    /// - With a session, the key is deleted when that session is closed or
    ///   expires; a session that is already lost or closed gives `SessionLost`.
    async fn put_with(&self, key: &Key, value: Value, options: PutOptions) -> Result<Version>;

    /// Deletes one key under a precondition.
    ///
    /// # Behavior
    /// - Returns whether the key existed. Deleting a missing key with no
    ///   precondition succeeds and returns `false`.
    /// - `Precondition::Version(v)` fails `Conflict` unless the key exists
    ///   with version `v` (a missing key is a conflict too).
    /// - `Precondition::Absent` is `InvalidArgument`.
    async fn delete_with(&self, key: &Key, precondition: Precondition) -> Result<bool>;

    /// Lists a directory.
    ///
    /// # Behavior
    /// - Returns entries strictly under `dir` (per segment), sorted by key;
    ///   only immediate children with [`Depth::Children`].
    /// - A directory with no keys lists empty; it is not an error.
    /// - With `Depth::Children`, a child that exists only as a prefix of
    ///   deeper keys (`a/b` when only `a/b/c` exists) is not listed.
    /// - The listing's `revision` is a start point for [`Kv::watch`].
    /// - Returns every entry however many there are and however large
    ///   their values, as of one revision.
    async fn list(&self, dir: &Key, depth: Depth) -> Result<Listing>;

    /// Applies a transaction: all of it or none of it.
    ///
    /// # Behavior
    /// - Fails `Conflict` naming the first check that did not hold, and then
    ///   changes nothing.
    /// - Rejects what [`Txn::validate`] rejects with `InvalidArgument` before
    ///   any I/O.
    /// - On backends without the `transactions` capability, `Unsupported`.
    async fn txn(&self, txn: Txn) -> Result<TxnResult>;

    /// Watches a key or a directory.
    ///
    /// # Behavior
    /// - Delivers, per key, every change in version order after the start
    ///   point, or an explicit `Resync` item (after which the stream ends).
    /// - A transaction shows watchers the keys it writes, each once: an
    ///   `Absent` check on a key it puts produces no delete.
    /// - A watch started `After(v)` sees the change with the next version
    ///   after `v`, even if that write races the call to `watch`.
    /// - With `WatchStart::Now`, every change made after `watch` returned is
    ///   delivered; the current value is not.
    /// - Starting from a version older than the backend's retained history
    ///   yields `Resync` as the first item, never silent loss.
    /// - A slow reader is never silently skipped: if the backend must drop
    ///   events it delivers `Resync`.
    async fn watch(&self, target: WatchTarget, start: WatchStart) -> Result<WatchStream>;
}

/// Conveniences over [`Kv`], implemented for every `Kv` (wrappers cannot lose them).
#[async_trait]
pub trait KvExt: Kv {
    /// Unconditional put.
    async fn put(&self, key: &Key, value: Value) -> Result<Version> {
        self.put_with(key, value, PutOptions::default()).await
    }
    /// Put only if absent; `AlreadyExists` otherwise.
    async fn create(&self, key: &Key, value: Value) -> Result<Version> {
        let options = PutOptions {
            precondition: Precondition::Absent,
            session: None,
        };
        self.put_with(key, value, options).await
    }
    /// Put only if the key has version `expected`; `Conflict` otherwise.
    async fn put_if_version(&self, key: &Key, value: Value, expected: Version) -> Result<Version> {
        let options = PutOptions {
            precondition: Precondition::Version(expected),
            session: None,
        };
        self.put_with(key, value, options).await
    }
    /// Put attached to a session (an ephemeral key).
    async fn put_ephemeral(&self, key: &Key, value: Value, session: &Session) -> Result<Version> {
        let options = PutOptions {
            precondition: Precondition::None,
            session: Some(session.id()),
        };
        self.put_with(key, value, options).await
    }
    /// Unconditional delete; returns whether the key existed.
    async fn delete(&self, key: &Key) -> Result<bool> {
        self.delete_with(key, Precondition::None).await
    }
    /// Delete only if the key has version `expected`; `Conflict` otherwise.
    async fn delete_if_version(&self, key: &Key, expected: Version) -> Result<()> {
        self.delete_with(key, Precondition::Version(expected))
            .await
            .map(|_| ())
    }
}

impl<T: Kv + ?Sized> KvExt for T {}
