//! One namespace's state and every operation on it.
//!
//! Everything lives behind one `std::sync::Mutex`: operations are short and
//! never await while holding it, so a std mutex is cheaper than tokio's and
//! makes every operation atomic, which is what gives the memory backend its
//! linearizability. Timers (session expiry, visibility timeouts) are checked
//! against `tokio::time::Instant`, so tests may pause and advance time.

use dprim::election::Leader;
use dprim::queue::{Delivery, MessageId, QueueDepth, QueueOptions, Receipt};
use dprim::session::SessionState;
use dprim::{
    Depth, Entry, Error, ErrorKind, Key, Listing, Message, Precondition, PutOptions, Result,
    SessionId, Term, Txn, TxnOp, TxnResult, Value, Version, WatchEvent, WatchStart, WatchTarget,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

/// Events a watcher may have queued before it is cut off with a resync.
const WATCHER_BUFFER: usize = 4096;

/// A namespace: cheap to clone, shared by every client of it.
#[derive(Clone)]
pub(crate) struct Namespace {
    inner: Arc<Mutex<State>>,
}

impl Namespace {
    pub(crate) fn new() -> Namespace {
        Namespace {
            inner: Arc::new(Mutex::new(State::new())),
        }
    }

    /// Runs `f` with the state locked.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut guard = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }
}

struct Stored {
    value: Value,
    version: Version,
    session: Option<SessionId>,
}

pub(crate) struct Watcher {
    target: WatchTarget,
    tx: mpsc::Sender<WatchEvent>,
    overflowed: Arc<AtomicBool>,
}

/// What a new watch starts with.
pub(crate) enum WatchOpen {
    /// Events to replay, then live events from the receiver; `overflowed` is
    /// set if the live feed was cut because the reader fell behind.
    Live {
        replay: Vec<WatchEvent>,
        rx: mpsc::Receiver<WatchEvent>,
        overflowed: Arc<AtomicBool>,
    },
    /// The start point is older than the retained history.
    Compacted { reason: String },
}

struct SessionRec {
    ttl: Duration,
    expires_at: Instant,
    stalled: bool,
    client: Option<watch::Sender<SessionState>>,
}

/// One waiter in a turnstile queue.
struct Waiter {
    ticket: u64,
    session: SessionId,
    value: Value,
    tx: oneshot::Sender<u64>,
}

struct Holder {
    session: SessionId,
    token: u64,
    value: Value,
}

/// A holder plus a FIFO line of waiters: the shape shared by locks (the
/// holder has the lock) and elections (the holder is the leader).
#[derive(Default)]
struct Turnstile {
    holder: Option<Holder>,
    waiters: VecDeque<Waiter>,
}

/// The outcome of joining a turnstile.
pub(crate) enum Join {
    /// Granted at once with this token/term.
    Granted(u64),
    /// Queued: the receiver yields the token when granted.
    Queued {
        ticket: u64,
        rx: oneshot::Receiver<u64>,
    },
    /// Busy and the caller did not want to wait.
    Busy,
}

struct Election {
    line: Turnstile,
    observers: watch::Sender<Option<Leader>>,
}

#[derive(Clone, Copy)]
enum MsgStatus {
    Ready,
    Delayed(Instant),
    InFlight {
        seq: u64,
        deadline: Instant,
        session: Option<SessionId>,
    },
}

struct QueuedMsg {
    payload: Value,
    attempts: u32,
    status: MsgStatus,
}

/// A queue's messages, indexed so that no operation walks the backlog: a
/// pull takes the first ready id, time is applied from the earliest timer,
/// and a session's end finds the deliveries it held.
struct QueueState {
    options: QueueOptions,
    next_id: u64,
    messages: BTreeMap<u64, QueuedMsg>,
    /// Ids of the messages visible now; the lowest (oldest push) goes first.
    ready: BTreeSet<u64>,
    /// When a delayed message becomes visible or a delivery times out.
    timers: BTreeSet<(Instant, u64)>,
    /// Deliveries held by each session.
    held: HashMap<SessionId, BTreeSet<u64>>,
    in_flight: usize,
    notify: Arc<Notify>,
}

impl QueueState {
    fn new(options: QueueOptions) -> QueueState {
        QueueState {
            options,
            next_id: 1,
            messages: BTreeMap::new(),
            ready: BTreeSet::new(),
            timers: BTreeSet::new(),
            held: HashMap::new(),
            in_flight: 0,
            notify: Arc::new(Notify::new()),
        }
    }

    fn index(&mut self, id: u64, status: MsgStatus) {
        match status {
            MsgStatus::Ready => {
                self.ready.insert(id);
            }
            MsgStatus::Delayed(until) => {
                self.timers.insert((until, id));
            }
            MsgStatus::InFlight {
                deadline, session, ..
            } => {
                self.timers.insert((deadline, id));
                self.in_flight += 1;
                if let Some(s) = session {
                    self.held.entry(s).or_default().insert(id);
                }
            }
        }
    }

    fn unindex(&mut self, id: u64, status: MsgStatus) {
        match status {
            MsgStatus::Ready => {
                self.ready.remove(&id);
            }
            MsgStatus::Delayed(until) => {
                self.timers.remove(&(until, id));
            }
            MsgStatus::InFlight {
                deadline, session, ..
            } => {
                self.timers.remove(&(deadline, id));
                self.in_flight -= 1;
                if let Some(s) = session {
                    if let Some(ids) = self.held.get_mut(&s) {
                        ids.remove(&id);
                        if ids.is_empty() {
                            self.held.remove(&s);
                        }
                    }
                }
            }
        }
    }

    fn insert(&mut self, id: u64, message: QueuedMsg) {
        self.index(id, message.status);
        self.messages.insert(id, message);
    }

    fn remove(&mut self, id: u64) -> Option<QueuedMsg> {
        let message = self.messages.remove(&id)?;
        self.unindex(id, message.status);
        Some(message)
    }

    fn set_status(&mut self, id: u64, status: MsgStatus) {
        let Some(m) = self.messages.get_mut(&id) else {
            return;
        };
        let old = std::mem::replace(&mut m.status, status);
        self.unindex(id, old);
        self.index(id, status);
    }

    /// The earliest moment a message changes by itself.
    fn next_timer(&self) -> Option<Instant> {
        self.timers.first().map(|(at, _)| *at)
    }
}

/// What a pull found.
pub(crate) enum Pulled {
    Delivery(Delivery),
    /// Nothing visible; something may become visible at `next_change`.
    Empty {
        next_change: Option<Instant>,
    },
}

pub(crate) struct State {
    /// Kv revision; the next change gets `revision + 1`.
    revision: u64,
    kv: BTreeMap<String, Stored>,
    history: VecDeque<(u64, WatchEvent)>,
    /// Highest revision dropped from `history`.
    compacted_through: u64,
    watchers: Vec<Watcher>,
    /// Source of session ids, tickets, lock tokens, terms and receipts.
    /// Separate from `revision` so coordination traffic does not move the Kv
    /// revision.
    sequence: u64,
    sessions: HashMap<SessionId, SessionRec>,
    locks: HashMap<Key, Turnstile>,
    elections: HashMap<Key, Election>,
    topics: HashMap<Key, broadcast::Sender<Message>>,
    queues: HashMap<Key, QueueState>,
}

fn version(raw: u64) -> Version {
    // Revisions start at 1 and only grow, so this never sees 0.
    Version::new(raw.max(1)).unwrap_or(Version::new(1).expect("1 is a valid version"))
}

impl State {
    fn new() -> State {
        State {
            revision: 1,
            kv: BTreeMap::new(),
            history: VecDeque::new(),
            compacted_through: 0,
            watchers: Vec::new(),
            sequence: 0,
            sessions: HashMap::new(),
            locks: HashMap::new(),
            elections: HashMap::new(),
            topics: HashMap::new(),
            queues: HashMap::new(),
        }
    }

    fn next_sequence(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence
    }

    // ---------------------------------------------------------------- kv

    fn entry(key: &str, s: &Stored) -> Entry {
        Entry {
            key: Key::new(key).unwrap_or_default(),
            value: s.value.clone(),
            version: s.version,
            session: s.session,
        }
    }

    pub(crate) fn get(&self, key: &Key) -> Option<Entry> {
        self.kv
            .get(key.as_str())
            .map(|s| Self::entry(key.as_str(), s))
    }

    fn check_session(&self, id: SessionId) -> Result<()> {
        if self.sessions.contains_key(&id) {
            Ok(())
        } else {
            Err(Error::session_lost(format!(
                "session {id} is not alive on the server (it expired or was closed)"
            )))
        }
    }

    fn check_precondition(&self, key: &Key, precondition: Precondition) -> Result<()> {
        let current = self.kv.get(key.as_str()).map(|s| s.version);
        match (precondition, current) {
            (Precondition::None, _) => Ok(()),
            (Precondition::Absent, None) => Ok(()),
            (Precondition::Absent, Some(v)) => Err(Error::already_exists(format!(
                "key `{key}` already exists (version {v})"
            ))
            .with_context("key", key)),
            (Precondition::Version(want), Some(have)) if want == have => Ok(()),
            (Precondition::Version(want), Some(have)) => Err(Error::conflict(format!(
                "key `{key}` has version {have}, not the expected {want}"
            ))
            .with_context("key", key)),
            (Precondition::Version(want), None) => Err(Error::conflict(format!(
                "key `{key}` does not exist (expected version {want})"
            ))
            .with_context("key", key)),
        }
    }

    pub(crate) fn put(&mut self, key: &Key, value: Value, options: PutOptions) -> Result<Version> {
        if key.is_root() {
            return Err(Error::invalid("cannot write the namespace root"));
        }
        if let Some(s) = options.session {
            self.check_session(s)?;
        }
        self.check_precondition(key, options.precondition)?;
        self.revision += 1;
        let rev = self.revision;
        self.apply_put(key, value, options.session, rev);
        Ok(version(rev))
    }

    fn apply_put(&mut self, key: &Key, value: Value, session: Option<SessionId>, rev: u64) {
        let stored = Stored {
            value,
            version: version(rev),
            session,
        };
        let event = WatchEvent::Put(Self::entry(key.as_str(), &stored));
        self.kv.insert(key.as_str().to_string(), stored);
        self.emit(rev, event);
    }

    fn apply_delete(&mut self, key: &Key, rev: u64) -> bool {
        if self.kv.remove(key.as_str()).is_some() {
            self.emit(
                rev,
                WatchEvent::Delete {
                    key: key.clone(),
                    version: version(rev),
                },
            );
            true
        } else {
            false
        }
    }

    pub(crate) fn delete(&mut self, key: &Key, precondition: Precondition) -> Result<bool> {
        if precondition == Precondition::Absent {
            return Err(Error::invalid(
                "a delete cannot require the key to be absent; use Precondition::None or Version",
            ));
        }
        self.check_precondition(key, precondition)?;
        if !self.kv.contains_key(key.as_str()) {
            return Ok(false);
        }
        self.revision += 1;
        let rev = self.revision;
        Ok(self.apply_delete(key, rev))
    }

    pub(crate) fn list(&self, dir: &Key, depth: Depth) -> Listing {
        let entries = self
            .range_under(dir)
            .filter(|(k, _)| match depth {
                Depth::Recursive => true,
                Depth::Children => {
                    let rest = if dir.is_root() {
                        k.as_str()
                    } else {
                        &k[dir.as_str().len() + 1..]
                    };
                    !rest.contains('/')
                }
            })
            .map(|(k, s)| Self::entry(k, s))
            .collect();
        Listing {
            entries,
            revision: version(self.revision),
        }
    }

    /// Keys strictly under `dir`, per segment: the range [`dir/`, `dir0`)
    /// (`0` follows `/` in ASCII), so `a/bc` never matches `a/b`.
    fn range_under<'a>(
        &'a self,
        dir: &Key,
    ) -> Box<dyn Iterator<Item = (&'a String, &'a Stored)> + 'a> {
        if dir.is_root() {
            return Box::new(self.kv.iter());
        }
        let start = format!("{}/", dir.as_str());
        let end = format!("{}0", dir.as_str());
        Box::new(self.kv.range(start..end))
    }

    pub(crate) fn txn(&mut self, txn: Txn) -> Result<TxnResult> {
        txn.validate()?;
        for op in &txn.ops {
            if op.key().is_root() {
                return Err(Error::invalid("cannot write the namespace root"));
            }
            if let TxnOp::Put {
                session: Some(s), ..
            } = op
            {
                self.check_session(*s)?;
            }
        }
        for (key, precondition) in &txn.checks {
            if let Err(e) = self.check_precondition(key, *precondition) {
                // A failed create check is still a failed compare: Conflict.
                return Err(Error::conflict(format!(
                    "transaction check failed, nothing was written: {}",
                    e.message()
                ))
                .with_context("key", key));
            }
        }
        // One revision for the whole transaction, as etcd does: its changes
        // happen at one instant.
        self.revision += 1;
        let rev = self.revision;
        let mut versions = Vec::with_capacity(txn.ops.len());
        for op in txn.ops {
            match op {
                TxnOp::Put {
                    key,
                    value,
                    session,
                } => {
                    self.apply_put(&key, value, session, rev);
                    versions.push(Some(version(rev)));
                }
                TxnOp::Delete { key } => {
                    self.apply_delete(&key, rev);
                    versions.push(None);
                }
            }
        }
        Ok(TxnResult { versions })
    }

    fn emit(&mut self, rev: u64, event: WatchEvent) {
        self.history.push_back((rev, event.clone()));
        while self.history.len() > crate::WATCH_HISTORY {
            if let Some((r, _)) = self.history.pop_front() {
                self.compacted_through = r;
            }
        }
        let Some(key) = event.key().cloned() else {
            return;
        };
        self.watchers.retain(|w| {
            if !w.target.covers(&key) {
                return !w.tx.is_closed();
            }
            match w.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // The reader fell behind: cut it off with a resync
                    // rather than buffer without bound or skip silently.
                    w.overflowed.store(true, Ordering::SeqCst);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    pub(crate) fn watch(&mut self, target: WatchTarget, start: WatchStart) -> WatchOpen {
        let replay = match start {
            WatchStart::Now => Vec::new(),
            WatchStart::After(v) => {
                let from = v.get();
                if from < self.compacted_through {
                    return WatchOpen::Compacted {
                        reason: format!(
                            "history after version {from} is gone (compacted through {}); re-list and watch from the listing's revision",
                            self.compacted_through
                        ),
                    };
                }
                self.history
                    .iter()
                    .filter(|(rev, e)| *rev > from && e.key().is_some_and(|k| target.covers(k)))
                    .map(|(_, e)| e.clone())
                    .collect()
            }
        };
        let (tx, rx) = mpsc::channel(WATCHER_BUFFER);
        let overflowed = Arc::new(AtomicBool::new(false));
        self.watchers.push(Watcher {
            target,
            tx,
            overflowed: overflowed.clone(),
        });
        WatchOpen::Live {
            replay,
            rx,
            overflowed,
        }
    }

    // ----------------------------------------------------------- sessions

    pub(crate) fn open_session(&mut self, ttl: Duration) -> SessionId {
        let id = SessionId(0x5e55_0000_0000_0000 | self.next_sequence());
        self.sessions.insert(
            id,
            SessionRec {
                ttl,
                expires_at: Instant::now() + ttl,
                stalled: false,
                client: None,
            },
        );
        id
    }

    pub(crate) fn attach_client(&mut self, id: SessionId, client: watch::Sender<SessionState>) {
        if let Some(rec) = self.sessions.get_mut(&id) {
            rec.client = Some(client);
        }
    }

    /// A renewal reaching the server.
    pub(crate) fn renew(&mut self, id: SessionId) -> Result<()> {
        match self.sessions.get_mut(&id) {
            None => Err(Error::session_lost(format!(
                "session {id} expired or was closed on the server"
            ))),
            Some(rec) if rec.stalled => Err(Error::new(
                ErrorKind::Unavailable,
                format!("renewal of session {id} got no answer"),
            )
            .temporary()),
            Some(rec) => {
                rec.expires_at = Instant::now() + rec.ttl;
                Ok(())
            }
        }
    }

    /// When the server will expire the session, if it still exists.
    pub(crate) fn session_expiry(&self, id: SessionId) -> Option<Instant> {
        self.sessions.get(&id).map(|r| r.expires_at)
    }

    pub(crate) fn stall_session(&mut self, id: SessionId) -> Result<()> {
        match self.sessions.get_mut(&id) {
            Some(rec) => {
                rec.stalled = true;
                Ok(())
            }
            None => Err(Error::not_found(format!("no session {id}"))),
        }
    }

    pub(crate) fn expire_session_now(&mut self, id: SessionId) -> Result<()> {
        if !self.sessions.contains_key(&id) {
            return Err(Error::not_found(format!("no session {id}")));
        }
        self.end_session(id, None);
        Ok(())
    }

    /// Ends a session: deletes its ephemeral keys, releases its locks and
    /// leaderships, withdraws its waiters, and makes its queue deliveries
    /// visible again. `client_state` is what its client handle is told now
    /// (`Closed` on close); on expiry the client learns at its next renewal,
    /// as it would from a real server.
    pub(crate) fn end_session(&mut self, id: SessionId, client_state: Option<SessionState>) {
        let Some(rec) = self.sessions.remove(&id) else {
            return;
        };
        if let (Some(client), Some(state)) = (rec.client, client_state) {
            client.send_replace(state);
        }
        let ephemeral: Vec<Key> = self
            .kv
            .iter()
            .filter(|(_, s)| s.session == Some(id))
            .filter_map(|(k, _)| Key::new(k).ok())
            .collect();
        if !ephemeral.is_empty() {
            self.revision += 1;
            let rev = self.revision;
            for key in ephemeral {
                self.apply_delete(&key, rev);
            }
        }
        let lock_names: Vec<Key> = self.locks.keys().cloned().collect();
        for name in lock_names {
            if let Some(line) = self.locks.get_mut(&name) {
                line.waiters.retain(|w| w.session != id);
            }
            let held = self
                .locks
                .get(&name)
                .and_then(|l| l.holder.as_ref())
                .is_some_and(|h| h.session == id);
            if held {
                if let Some(line) = self.locks.get_mut(&name) {
                    line.holder = None;
                }
                self.grant_next_lock(&name);
            }
        }
        let election_names: Vec<Key> = self.elections.keys().cloned().collect();
        for name in election_names {
            if let Some(e) = self.elections.get_mut(&name) {
                e.line.waiters.retain(|w| w.session != id);
            }
            let leads = self
                .elections
                .get(&name)
                .and_then(|e| e.line.holder.as_ref())
                .is_some_and(|h| h.session == id);
            if leads {
                self.step_down(&name);
            }
        }
        // Deliveries held by the session fail their attempt now.
        let held: Vec<(Key, Vec<u64>)> = self
            .queues
            .iter()
            .filter_map(|(name, q)| {
                Some((name.clone(), q.held.get(&id)?.iter().copied().collect()))
            })
            .collect();
        for (name, ids) in held {
            for message in ids {
                self.fail_attempt(&name, message, Duration::ZERO);
            }
        }
    }

    // -------------------------------------------------------------- locks

    pub(crate) fn join_lock(&mut self, name: &Key, session: SessionId, wait: bool) -> Result<Join> {
        self.check_session(session)?;
        let token = self.sequence + 1;
        let line = self.locks.entry(name.clone()).or_default();
        if line.holder.is_none() && line.waiters.is_empty() {
            line.holder = Some(Holder {
                session,
                token,
                value: Value::empty(),
            });
            self.sequence = token;
            return Ok(Join::Granted(token));
        }
        if !wait {
            return Ok(Join::Busy);
        }
        let ticket = self.next_sequence();
        let (tx, rx) = oneshot::channel();
        self.locks
            .entry(name.clone())
            .or_default()
            .waiters
            .push_back(Waiter {
                ticket,
                session,
                value: Value::empty(),
                tx,
            });
        Ok(Join::Queued { ticket, rx })
    }

    pub(crate) fn release_lock(&mut self, name: &Key, token: u64) {
        let held = self
            .locks
            .get(name)
            .and_then(|l| l.holder.as_ref())
            .is_some_and(|h| h.token == token);
        if held {
            if let Some(line) = self.locks.get_mut(name) {
                line.holder = None;
            }
            self.grant_next_lock(name);
        }
    }

    /// A waiter gave up. If it was granted in the meantime, give the lock
    /// back so the next waiter gets it; either way nobody jumps the holder.
    pub(crate) fn leave_lock_line(&mut self, name: &Key, ticket: u64, granted: Option<u64>) {
        if let Some(line) = self.locks.get_mut(name) {
            line.waiters.retain(|w| w.ticket != ticket);
        }
        if let Some(token) = granted {
            self.release_lock(name, token);
        }
    }

    fn grant_next_lock(&mut self, name: &Key) {
        loop {
            let Some(line) = self.locks.get_mut(name) else {
                return;
            };
            if line.holder.is_some() {
                return;
            }
            let Some(waiter) = line.waiters.pop_front() else {
                self.locks.remove(name);
                return;
            };
            self.sequence += 1;
            let token = self.sequence;
            if let Some(line) = self.locks.get_mut(name) {
                line.holder = Some(Holder {
                    session: waiter.session,
                    token,
                    value: Value::empty(),
                });
            }
            if waiter.tx.send(token).is_ok() {
                return;
            }
            // The waiter's future is gone; pass over it.
            if let Some(line) = self.locks.get_mut(name) {
                line.holder = None;
            }
        }
    }

    // ---------------------------------------------------------- elections

    fn election(&mut self, name: &Key) -> &mut Election {
        self.elections
            .entry(name.clone())
            .or_insert_with(|| Election {
                line: Turnstile::default(),
                observers: watch::channel(None).0,
            })
    }

    pub(crate) fn campaign(
        &mut self,
        name: &Key,
        value: Value,
        session: SessionId,
    ) -> Result<Join> {
        self.check_session(session)?;
        let ticket = self.next_sequence();
        let e = self.election(name);
        if e.line.holder.is_none() && e.line.waiters.is_empty() {
            e.line.holder = Some(Holder {
                session,
                token: ticket,
                value: value.clone(),
            });
            e.observers.send_replace(Some(Leader {
                value,
                term: Term(ticket),
                session,
            }));
            return Ok(Join::Granted(ticket));
        }
        let (tx, rx) = oneshot::channel();
        e.line.waiters.push_back(Waiter {
            ticket,
            session,
            value,
            tx,
        });
        Ok(Join::Queued { ticket, rx })
    }

    /// The leader (if any) leaves; the next candidate is elected.
    fn step_down(&mut self, name: &Key) {
        loop {
            let next_term = self.sequence + 1;
            let e = self.election(name);
            e.line.holder = None;
            let Some(candidate) = e.line.waiters.pop_front() else {
                e.observers.send_replace(None);
                return;
            };
            let leader = Leader {
                value: candidate.value.clone(),
                term: Term(next_term),
                session: candidate.session,
            };
            e.line.holder = Some(Holder {
                session: candidate.session,
                token: next_term,
                value: candidate.value,
            });
            let accepted = candidate.tx.send(next_term).is_ok();
            if accepted {
                e.observers.send_replace(Some(leader));
            }
            self.sequence = next_term;
            if accepted {
                return;
            }
        }
    }

    fn leads(&self, name: &Key, term: u64) -> bool {
        self.elections
            .get(name)
            .and_then(|e| e.line.holder.as_ref())
            .is_some_and(|h| h.token == term)
    }

    pub(crate) fn resign(&mut self, name: &Key, term: u64) {
        if self.leads(name, term) {
            self.step_down(name);
        }
    }

    pub(crate) fn leave_campaign(&mut self, name: &Key, ticket: u64, granted: Option<u64>) {
        if let Some(e) = self.elections.get_mut(name) {
            e.line.waiters.retain(|w| w.ticket != ticket);
        }
        if let Some(term) = granted {
            self.resign(name, term);
        }
    }

    pub(crate) fn proclaim(&mut self, name: &Key, term: u64, value: Value) -> Result<()> {
        if !self.leads(name, term) {
            return Err(Error::not_leader(format!(
                "term {term} of election `{name}` is over; proclaim needs the current leader"
            )));
        }
        let e = self.election(name);
        if let Some(h) = e.line.holder.as_mut() {
            h.value = value.clone();
            let session = h.session;
            e.observers.send_replace(Some(Leader {
                value,
                term: Term(term),
                session,
            }));
        }
        Ok(())
    }

    pub(crate) fn leader(&self, name: &Key) -> Option<Leader> {
        self.elections
            .get(name)
            .and_then(|e| e.line.holder.as_ref())
            .map(|h| Leader {
                value: h.value.clone(),
                term: Term(h.token),
                session: h.session,
            })
    }

    pub(crate) fn observe(&mut self, name: &Key) -> watch::Receiver<Option<Leader>> {
        self.election(name).observers.subscribe()
    }

    // ------------------------------------------------------------- pubsub

    pub(crate) fn publish(&mut self, topic: &Key, payload: Value) {
        if let Some(tx) = self.topics.get(topic) {
            let message = Message {
                topic: topic.clone(),
                payload,
            };
            if tx.send(message).is_err() {
                // No subscriber left: forget the topic.
                self.topics.remove(topic);
            }
        }
    }

    pub(crate) fn subscribe(&mut self, topic: &Key) -> broadcast::Receiver<Message> {
        self.topics
            .entry(topic.clone())
            .or_insert_with(|| broadcast::channel(crate::SUBSCRIBER_BUFFER).0)
            .subscribe()
    }

    // ------------------------------------------------------------- queues

    pub(crate) fn open_queue(&mut self, name: &Key, options: Option<QueueOptions>) -> Result<()> {
        match options {
            Some(options) => {
                options.validate(name)?;
                options.dead_letter_for(name)?;
                self.queue(name).options = options;
            }
            None => {
                QueueOptions::default().dead_letter_for(name)?;
                self.queue(name);
            }
        }
        Ok(())
    }

    fn queue(&mut self, name: &Key) -> &mut QueueState {
        self.queues
            .entry(name.clone())
            .or_insert_with(|| QueueState::new(QueueOptions::default()))
    }

    pub(crate) fn queue_notify(&mut self, name: &Key) -> Arc<Notify> {
        self.queue(name).notify.clone()
    }

    pub(crate) fn push(&mut self, name: &Key, payload: Value) -> MessageId {
        let q = self.queue(name);
        let id = q.next_id;
        q.next_id += 1;
        q.insert(
            id,
            QueuedMsg {
                payload,
                attempts: 0,
                status: MsgStatus::Ready,
            },
        );
        q.notify.notify_waiters();
        MessageId(id)
    }

    /// Applies what time and session loss have done to a queue and to every
    /// queue dead-lettering into it, so a dead message shows up in its
    /// dead-letter queue even if nobody touches the original queue again.
    fn tick(&mut self, name: &Key) {
        for q in self.feeders(name) {
            self.tick_one(&q);
        }
        self.tick_one(name);
    }

    /// Queues whose dead-letter queue is `name`.
    fn feeders(&self, name: &Key) -> Vec<Key> {
        self.queues
            .iter()
            .filter(|(q, state)| {
                *q != name && state.options.dead_letter_for(q).ok().as_ref() == Some(name)
            })
            .map(|(q, _)| q.clone())
            .collect()
    }

    fn tick_one(&mut self, name: &Key) {
        let now = Instant::now();
        let Some(q) = self.queues.get_mut(name) else {
            return;
        };
        let due: Vec<u64> = q
            .timers
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| *id)
            .collect();
        let mut failed = Vec::new();
        for id in due {
            match q.messages.get(&id).map(|m| m.status) {
                Some(MsgStatus::Delayed(_)) => q.set_status(id, MsgStatus::Ready),
                Some(MsgStatus::InFlight { .. }) => failed.push(id),
                _ => {}
            }
        }
        for id in failed {
            self.fail_attempt(name, id, Duration::ZERO);
        }
    }

    /// A delivery failed (timeout, nack, lost session): retry or dead-letter.
    fn fail_attempt(&mut self, name: &Key, id: u64, delay: Duration) {
        let Some(q) = self.queues.get_mut(name) else {
            return;
        };
        let max = q.options.max_attempts;
        let dead_letter = q.options.dead_letter_for(name);
        let Some(m) = q.messages.get(&id) else {
            return;
        };
        if m.attempts >= max {
            if let (Ok(dlq), Some(m)) = (dead_letter, q.remove(id)) {
                self.push(&dlq, m.payload);
            }
            return;
        }
        let status = if delay.is_zero() {
            MsgStatus::Ready
        } else {
            MsgStatus::Delayed(Instant::now() + delay)
        };
        q.set_status(id, status);
        q.notify.notify_waiters();
    }

    pub(crate) fn pull(
        &mut self,
        name: &Key,
        visibility_timeout: Duration,
        session: Option<SessionId>,
    ) -> Result<Pulled> {
        if let Some(s) = session {
            self.check_session(s)?;
        }
        self.tick(name);
        let seq = self.next_sequence();
        let q = self.queue(name);
        let now = Instant::now();
        let next = q.ready.first().copied();
        if let Some((id, m)) = next.and_then(|id| Some((id, q.messages.get_mut(&id)?))) {
            m.attempts += 1;
            let (payload, attempt) = (m.payload.clone(), m.attempts);
            q.set_status(
                id,
                MsgStatus::InFlight {
                    seq,
                    deadline: now + visibility_timeout,
                    session,
                },
            );
            return Ok(Pulled::Delivery(Delivery {
                id: MessageId(id),
                payload,
                attempt,
                receipt: Receipt(format!("{id}.{seq}")),
            }));
        }
        // A delivery timing out in a feeding queue may dead-letter a message
        // into this one: wake up for those deadlines too.
        let next_change = self
            .feeders(name)
            .iter()
            .chain([name])
            .filter_map(|q| self.queues.get(q))
            .filter_map(QueueState::next_timer)
            .min();
        Ok(Pulled::Empty { next_change })
    }

    fn parse_receipt(receipt: &Receipt) -> Result<(u64, u64)> {
        receipt
            .0
            .split_once('.')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "`{receipt}` is not a receipt of the memory backend; pass the receipt printed by pull"
                ))
            })
    }

    /// Whether `receipt` names the message's current delivery: `Ok(None)` if
    /// the message is gone, `Ok(Some(id))` if current, `Conflict` if stale.
    fn current_delivery(&mut self, name: &Key, receipt: &Receipt) -> Result<Option<u64>> {
        let (id, seq) = Self::parse_receipt(receipt)?;
        self.tick(name);
        let q = self.queue(name);
        match q.messages.get(&id) {
            None => Ok(None),
            Some(QueuedMsg {
                status: MsgStatus::InFlight { seq: s, .. },
                ..
            }) if *s == seq => Ok(Some(id)),
            Some(_) => Err(Error::conflict(format!(
                "delivery {receipt} of queue `{name}` expired and the message was made visible again; it will be processed again"
            ))),
        }
    }

    pub(crate) fn ack(&mut self, name: &Key, receipt: &Receipt) -> Result<()> {
        if let Some(id) = self.current_delivery(name, receipt)? {
            self.queue(name).remove(id);
        }
        Ok(())
    }

    pub(crate) fn nack(&mut self, name: &Key, receipt: &Receipt, delay: Duration) -> Result<()> {
        match self.current_delivery(name, receipt)? {
            Some(id) => {
                self.fail_attempt(name, id, delay);
                Ok(())
            }
            None => Err(Error::conflict(format!(
                "delivery {receipt} of queue `{name}` is no longer held (acked or dead-lettered)"
            ))),
        }
    }

    pub(crate) fn extend(
        &mut self,
        name: &Key,
        receipt: &Receipt,
        timeout: Duration,
    ) -> Result<()> {
        match self.current_delivery(name, receipt)? {
            Some(id) => {
                let q = self.queue(name);
                if let Some(MsgStatus::InFlight { seq, session, .. }) =
                    q.messages.get(&id).map(|m| m.status)
                {
                    let deadline = Instant::now() + timeout;
                    q.set_status(
                        id,
                        MsgStatus::InFlight {
                            seq,
                            deadline,
                            session,
                        },
                    );
                }
                Ok(())
            }
            None => Err(Error::conflict(format!(
                "delivery {receipt} of queue `{name}` is no longer held (acked or dead-lettered)"
            ))),
        }
    }

    pub(crate) fn depth(&mut self, name: &Key) -> QueueDepth {
        self.tick(name);
        let q = self.queue(name);
        QueueDepth {
            ready: (q.messages.len() - q.in_flight) as u64,
            in_flight: q.in_flight as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Recounts a queue from its messages and compares with its indexes.
    fn assert_indexed(q: &QueueState) {
        let mut ready = BTreeSet::new();
        let mut timers = BTreeSet::new();
        let mut held: HashMap<SessionId, BTreeSet<u64>> = HashMap::new();
        let mut in_flight = 0;
        for (id, m) in &q.messages {
            match m.status {
                MsgStatus::Ready => {
                    ready.insert(*id);
                }
                MsgStatus::Delayed(at) => {
                    timers.insert((at, *id));
                }
                MsgStatus::InFlight {
                    deadline, session, ..
                } => {
                    timers.insert((deadline, *id));
                    in_flight += 1;
                    if let Some(s) = session {
                        held.entry(s).or_default().insert(*id);
                    }
                }
            }
        }
        assert_eq!(q.ready, ready, "ready index");
        assert_eq!(q.timers, timers, "timer index");
        assert_eq!(q.held, held, "per-session index");
        assert_eq!(q.in_flight, in_flight, "in-flight count");
    }

    /// Random pushes, pulls (with and without sessions), acks, nacks,
    /// extends, session ends and clock moves keep every index equal to what
    /// the messages say, and a pull always takes the oldest visible message.
    #[tokio::test(start_paused = true)]
    async fn queue_indexes_follow_every_operation() {
        let mut state = State::new();
        let name = Key::new("jobs").unwrap();
        let dead = Key::new("jobs/dead-letter").unwrap();
        let options = QueueOptions {
            max_attempts: 3,
            dead_letter: None,
        };
        state.open_queue(&name, Some(options)).unwrap();
        let mut sessions: Vec<SessionId> = Vec::new();
        let mut receipts: Vec<Receipt> = Vec::new();
        let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for _ in 0..6_000 {
            match next(9) {
                0 | 1 => {
                    state.push(&name, Value::new(vec![1]).unwrap());
                }
                2 | 3 => {
                    let session = match next(3) {
                        0 if !sessions.is_empty() => {
                            Some(sessions[next(sessions.len() as u64) as usize])
                        }
                        1 => {
                            let s = state.open_session(Duration::from_secs(3600));
                            sessions.push(s);
                            Some(s)
                        }
                        _ => None,
                    };
                    let oldest_ready = {
                        state.tick(&name);
                        state.queue(&name).ready.first().copied()
                    };
                    let vt = Duration::from_millis(1 + next(50));
                    match state.pull(&name, vt, session).unwrap() {
                        Pulled::Delivery(d) => {
                            assert_eq!(Some(d.id.0), oldest_ready, "pull takes the oldest");
                            receipts.push(d.receipt);
                        }
                        Pulled::Empty { .. } => assert_eq!(oldest_ready, None),
                    }
                }
                4 if !receipts.is_empty() => {
                    let r = receipts.swap_remove(next(receipts.len() as u64) as usize);
                    let _ = state.ack(&name, &r);
                }
                5 if !receipts.is_empty() => {
                    let r = receipts.swap_remove(next(receipts.len() as u64) as usize);
                    let _ = state.nack(&name, &r, Duration::from_millis(next(20)));
                }
                6 if !receipts.is_empty() => {
                    let r = &receipts[next(receipts.len() as u64) as usize];
                    let _ = state.extend(&name, r, Duration::from_millis(1 + next(50)));
                }
                7 if !sessions.is_empty() => {
                    let s = sessions.swap_remove(next(sessions.len() as u64) as usize);
                    state.end_session(s, None);
                    assert!(!state.queue(&name).held.contains_key(&s));
                }
                _ => tokio::time::advance(Duration::from_millis(next(10))).await,
            }
            let depth = state.depth(&name);
            let q = state.queue(&name);
            assert_indexed(q);
            assert_eq!(depth.total(), q.messages.len() as u64);
            assert_indexed(state.queue(&dead));
        }
        // The run went through every kind of state, not just a few.
        let dead_letters = state.queue(&dead).messages.len();
        assert!(dead_letters > 0, "nothing was dead-lettered");
    }
}
