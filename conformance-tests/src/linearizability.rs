//! Records concurrent Kv operations and checks that they are linearizable:
//! that there is one order of all of them, consistent with real time (an
//! operation that returned before another was called comes first), in
//! which every outcome is what a single register per key would give.
//!
//! The check is the Wing–Gong search with Lowe's memoization (the algorithm
//! behind Knossos and Porcupine), run per key: linearizability is local, so
//! a history is linearizable exactly when the history of every key is.
//!
//! An operation that failed without a definite outcome (a timeout, a lost
//! connection: anything but `AlreadyExists` or `Conflict` on a conditional
//! write) may have taken effect at any moment after its call, or never.
//! The model then allows either, and a write whose version was never seen
//! leaves the key's version unknown until a later outcome pins it.
//!
//! ```no_run
//! # async fn example(kv: std::sync::Arc<dyn dprim::Kv>) -> dprim::Result<()> {
//! use dprim_conformance::linearizability::{History, KvCall};
//! let history = History::new();
//! let key = dprim::Key::new("x")?;
//! history.run(kv.as_ref(), 0, &key, KvCall::Put(dprim::Value::new(b"1".to_vec())?)).await;
//! history.run(kv.as_ref(), 1, &key, KvCall::Get).await;
//! history.check(true).map_err(|e| dprim::Error::unexpected(e))?;
//! # Ok(()) }
//! ```

use dprim::{Backend, ErrorKind, Key, Kv, KvExt, Precondition, PutOptions, Value, Version};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One Kv operation on one key.
#[derive(Clone, Debug)]
pub enum KvCall {
    /// `get`.
    Get,
    /// `put` without a precondition.
    Put(Value),
    /// `create` (`Precondition::Absent`).
    Create(Value),
    /// `put_if_version`.
    PutIfVersion(Value, Version),
    /// `delete` without a precondition.
    Delete,
    /// `delete_with(Precondition::Version)`.
    DeleteIfVersion(Version),
}

/// What an operation returned.
#[derive(Clone, Debug)]
pub enum KvReturn {
    /// A read: the value and version, or `None` for a missing key.
    Read(Option<(Value, Version)>),
    /// A write took effect with this version.
    Written(Version),
    /// A delete took effect (`true`: the key existed).
    Deleted(bool),
    /// A create found the key.
    AlreadyExists,
    /// A conditional write found another version (or no key).
    Conflict,
    /// Failed without a definite outcome: it may or may not have happened.
    Unknown(String),
}

/// One recorded operation.
#[derive(Clone, Debug)]
pub struct Op {
    /// Who called it (operations of one client never overlap).
    pub client: usize,
    /// The key.
    pub key: Key,
    /// The call.
    pub call: KvCall,
    /// Its outcome.
    pub ret: KvReturn,
    /// When it was called, on the history's clock.
    pub called: u64,
    /// When it returned; `None` for an unknown outcome, which may take
    /// effect at any later moment.
    pub returned: Option<u64>,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = |v: &Value| String::from_utf8_lossy(v.as_bytes()).into_owned();
        let call = match &self.call {
            KvCall::Get => "get".to_string(),
            KvCall::Put(x) => format!("put {}", v(x)),
            KvCall::Create(x) => format!("create {}", v(x)),
            KvCall::PutIfVersion(x, e) => format!("put {} if version {e}", v(x)),
            KvCall::Delete => "delete".to_string(),
            KvCall::DeleteIfVersion(e) => format!("delete if version {e}"),
        };
        let ret = match &self.ret {
            KvReturn::Read(None) => "none".to_string(),
            KvReturn::Read(Some((x, ver))) => format!("{} @ {ver}", v(x)),
            KvReturn::Written(ver) => format!("ok @ {ver}"),
            KvReturn::Deleted(existed) => format!("deleted (existed: {existed})"),
            KvReturn::AlreadyExists => "AlreadyExists".to_string(),
            KvReturn::Conflict => "Conflict".to_string(),
            KvReturn::Unknown(e) => format!("unknown ({e})"),
        };
        let returned = self
            .returned
            .map_or_else(|| "?".to_string(), |t| t.to_string());
        write!(
            f,
            "[{}..{returned}] client {} `{}`: {call} -> {ret}",
            self.called, self.client, self.key
        )
    }
}

/// A concurrent history of Kv operations, recorded as they run.
#[derive(Default)]
pub struct History {
    clock: AtomicU64,
    ops: Mutex<Vec<Op>>,
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History::default()
    }

    /// Runs `call` on `key` through `kv` as `client` and records it with
    /// its outcome, which is also returned.
    pub async fn run(&self, kv: &dyn Kv, client: usize, key: &Key, call: KvCall) -> KvReturn {
        let called = self.clock.fetch_add(1, Ordering::SeqCst);
        let ret = match &call {
            KvCall::Get => match kv.get(key).await {
                Ok(e) => KvReturn::Read(e.map(|e| (e.value, e.version))),
                Err(e) => KvReturn::Unknown(e.to_string()),
            },
            KvCall::Put(v) => written(kv.put(key, v.clone()).await),
            KvCall::Create(v) => written(
                kv.put_with(
                    key,
                    v.clone(),
                    PutOptions {
                        precondition: Precondition::Absent,
                        ..PutOptions::default()
                    },
                )
                .await,
            ),
            KvCall::PutIfVersion(v, e) => written(kv.put_if_version(key, v.clone(), *e).await),
            KvCall::Delete => deleted(kv.delete(key).await),
            KvCall::DeleteIfVersion(e) => {
                deleted(kv.delete_with(key, Precondition::Version(*e)).await)
            }
        };
        let returned = self.clock.fetch_add(1, Ordering::SeqCst);
        let op = Op {
            client,
            key: key.clone(),
            call,
            ret: ret.clone(),
            called,
            returned: (!matches!(ret, KvReturn::Unknown(_))).then_some(returned),
        };
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
        ret
    }

    /// Runs `ops` random operations as `client` on `keys` (a key each
    /// time, at random) and records them: reads, writes, creates,
    /// conditional writes and deletes, each conditional one on the version
    /// this client saw last for that key, which makes most of them race the
    /// other clients. Values are unique per client and operation. Waits
    /// `pause` between operations. With `stop_on_unknown`, the first
    /// outcome that is not definite ends the run as an error naming it.
    pub async fn random_ops(
        &self,
        kv: &dyn Kv,
        client: usize,
        keys: &[Key],
        ops: usize,
        pause: Duration,
        stop_on_unknown: bool,
    ) -> Result<(), String> {
        if keys.is_empty() {
            return Err("random_ops needs at least one key".into());
        }
        let mut rng = StdRng::seed_from_u64(rand::random());
        let mut seen: Vec<Option<Version>> = vec![None; keys.len()];
        for i in 0..ops {
            let k = rng.random_range(0..keys.len());
            let value = Value::new(format!("c{client}-{i}").into_bytes())
                .map_err(|e| format!("building a value: {e}"))?;
            let call = match (rng.random_range(0..20), seen[k]) {
                (0..=6, _) => KvCall::Get,
                (7..=9, _) => KvCall::Put(value),
                (10..=11, _) => KvCall::Create(value),
                (12..=16, Some(v)) => KvCall::PutIfVersion(value, v),
                (17, _) => KvCall::Delete,
                (18..=19, Some(v)) => KvCall::DeleteIfVersion(v),
                // A conditional call before this client saw a version.
                _ => KvCall::Put(value),
            };
            match self.run(kv, client, &keys[k], call).await {
                KvReturn::Read(Some((_, v))) | KvReturn::Written(v) => seen[k] = Some(v),
                KvReturn::Unknown(e) if stop_on_unknown => {
                    return Err(format!(
                        "client {client}, operation {i} on `{}`: unexpected error: {e}",
                        keys[k]
                    ))
                }
                _ => {}
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        Ok(())
    }

    /// The operations recorded so far.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Checks the history key by key; with `reads` false, reads are left
    /// out (for a backend whose reads may lag: its writes, including the
    /// outcomes of conditional writes, must still be linearizable).
    ///
    /// On failure, the message names the key, how far a linearization got
    /// and the operations none of which could come next.
    pub fn check(&self, reads: bool) -> Result<Checked, String> {
        let mut by_key: BTreeMap<String, Vec<Op>> = BTreeMap::new();
        let mut unknown = 0;
        for op in self.ops() {
            unknown += usize::from(op.returned.is_none());
            let unknown_read =
                matches!(op.call, KvCall::Get) && matches!(op.ret, KvReturn::Unknown(_));
            if unknown_read || (!reads && matches!(op.call, KvCall::Get)) {
                continue;
            }
            by_key.entry(op.key.to_string()).or_default().push(op);
        }
        let mut checked = Checked {
            unknown,
            ..Checked::default()
        };
        for (key, ops) in by_key {
            checked.states += check_key(&ops).map_err(|e| format!("key `{key}`: {e}"))?;
            checked.operations += ops.len();
            checked.keys += 1;
        }
        Ok(checked)
    }
}

/// The two keys the races of the suite and of dprim's fault tests use:
/// few enough that clients keep running into each other.
pub fn registers() -> Vec<Key> {
    ["register/a", "register/b"]
        .into_iter()
        .filter_map(|k| Key::new(k).ok())
        .collect()
}

/// Runs [`History::random_ops`] on every client at once (client number
/// `i` is `clients[i]`, ideally each its own connection) and returns the
/// history when all are done; the first client error ends it.
pub async fn race(
    clients: Vec<Backend>,
    keys: Vec<Key>,
    ops: usize,
    pause: Duration,
    stop_on_unknown: bool,
) -> Result<History, String> {
    let history = Arc::new(History::new());
    let mut running = Vec::new();
    for (client, backend) in clients.into_iter().enumerate() {
        let (history, keys) = (history.clone(), keys.clone());
        running.push(tokio::spawn(async move {
            history
                .random_ops(backend.kv(), client, &keys, ops, pause, stop_on_unknown)
                .await
        }));
    }
    for r in running {
        r.await
            .map_err(|e| format!("a client task failed: {e}"))??;
    }
    Arc::try_unwrap(history).map_err(|_| "the history is still shared".to_string())
}

/// What a successful check covered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// Keys checked.
    pub keys: usize,
    /// Operations checked (reads included only when asked for).
    pub operations: usize,
    /// Search states visited.
    pub states: usize,
    /// Operations recorded with an unknown outcome (allowed either way).
    pub unknown: usize,
}

fn written(r: dprim::Result<Version>) -> KvReturn {
    match r {
        Ok(v) => KvReturn::Written(v),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => KvReturn::AlreadyExists,
        Err(e) if e.kind() == ErrorKind::Conflict => KvReturn::Conflict,
        Err(e) => KvReturn::Unknown(e.to_string()),
    }
}

fn deleted(r: dprim::Result<bool>) -> KvReturn {
    match r {
        Ok(existed) => KvReturn::Deleted(existed),
        Err(e) if e.kind() == ErrorKind::Conflict => KvReturn::Conflict,
        Err(e) => KvReturn::Unknown(e.to_string()),
    }
}

/// Search states a key's check may visit before it gives up.
const STATE_BUDGET: usize = 5_000_000;

/// The register one key is: its value (an index into the values of the
/// history) and version if it exists (`None` while the version of an
/// unknown-outcome write is unknown), and the highest version known to be
/// handed out so far (a write's version must exceed every earlier one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Register {
    current: Option<(usize, Option<Version>)>,
    floor: Option<Version>,
}

impl Register {
    fn above_floor(&self, v: Version) -> bool {
        self.floor.is_none_or(|f| v > f)
    }

    fn write(&self, value: usize, version: Option<Version>) -> Register {
        Register {
            current: Some((value, version)),
            floor: version.or(self.floor),
        }
    }

    fn deleted(&self) -> Register {
        Register {
            current: None,
            floor: self.floor,
        }
    }

    /// Whether the current version may be `e`, and the register with it
    /// pinned to `e` if it was unknown.
    fn version_may_be(&self, e: Version) -> Option<Register> {
        match self.current {
            Some((_, Some(v))) if v == e => Some(*self),
            Some((value, None)) if self.above_floor(e) => Some(Register {
                current: Some((value, Some(e))),
                floor: Some(e),
            }),
            _ => None,
        }
    }

    /// The registers `op` can lead to from this one (none: it cannot
    /// happen now). An unknown outcome lists only the ways it took effect:
    /// not taking effect is leaving it out of the linearization.
    fn step(&self, op: &Op, value_of: &dyn Fn(&Value) -> usize) -> Vec<Register> {
        let unknown = matches!(op.ret, KvReturn::Unknown(_));
        let exists = self.current.is_some();
        let mut next = Vec::new();
        match (&op.call, &op.ret) {
            (KvCall::Get, KvReturn::Read(None)) if !exists => next.push(*self),
            (KvCall::Get, KvReturn::Read(Some((v, ver)))) if matches!(self.current, Some((cur, _)) if cur == value_of(v)) =>
            {
                next.extend(self.version_may_be(*ver));
            }
            (KvCall::Put(v), KvReturn::Written(w)) if self.above_floor(*w) => {
                next.push(self.write(value_of(v), Some(*w)));
            }
            (KvCall::Put(v), _) if unknown => next.push(self.write(value_of(v), None)),
            (KvCall::Create(v), KvReturn::Written(w)) if !exists && self.above_floor(*w) => {
                next.push(self.write(value_of(v), Some(*w)));
            }
            (KvCall::Create(_), KvReturn::AlreadyExists) if exists => next.push(*self),
            (KvCall::Create(v), _) if unknown && !exists => {
                next.push(self.write(value_of(v), None));
            }
            (KvCall::PutIfVersion(v, e), KvReturn::Written(w)) => {
                if let Some(r) = self.version_may_be(*e) {
                    if r.above_floor(*w) {
                        next.push(r.write(value_of(v), Some(*w)));
                    }
                }
            }
            (KvCall::PutIfVersion(_, e), KvReturn::Conflict)
            | (KvCall::DeleteIfVersion(e), KvReturn::Conflict) => match self.current {
                Some((_, Some(v))) if v == *e => {}
                _ => next.push(*self),
            },
            (KvCall::PutIfVersion(v, e), _) if unknown => {
                if let Some(r) = self.version_may_be(*e) {
                    next.push(r.write(value_of(v), None));
                }
            }
            (KvCall::Delete, KvReturn::Deleted(existed)) if exists == *existed => {
                next.push(self.deleted());
            }
            (KvCall::Delete, _) if unknown => next.push(self.deleted()),
            (KvCall::DeleteIfVersion(e), KvReturn::Deleted(true)) => {
                next.extend(self.version_may_be(*e).map(|r| r.deleted()));
            }
            (KvCall::DeleteIfVersion(e), _) if unknown => {
                next.extend(self.version_may_be(*e).map(|r| r.deleted()));
            }
            // An outcome this call cannot have from this register.
            _ => {}
        }
        next
    }
}

/// Checks one key's operations; returns the number of states visited.
fn check_key(ops: &[Op]) -> Result<usize, String> {
    let mut values: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut names: Vec<Vec<u8>> = Vec::new();
    for op in ops {
        if let KvCall::Put(v) | KvCall::Create(v) | KvCall::PutIfVersion(v, _) = &op.call {
            values.entry(v.as_bytes().to_vec()).or_insert_with(|| {
                names.push(v.as_bytes().to_vec());
                names.len() - 1
            });
        }
    }
    // A read of a value nobody wrote matches no write.
    let unwritten = values.len();
    let value_of = |v: &Value| values.get(v.as_bytes()).copied().unwrap_or(unwritten);
    let mut search = Search {
        ops,
        value_of: &value_of,
        seen: HashSet::new(),
        deepest: (0, Vec::new(), Register::default()),
        visited: 0,
    };
    let done = vec![0u64; ops.len().div_ceil(64)];
    match search.linearize(&done, Register::default()) {
        Found::Yes => Ok(search.visited),
        Found::GaveUp => Err(format!(
            "the check gave up after {} search states ({} operations); record a shorter history",
            search.visited,
            ops.len()
        )),
        Found::No => {
            let (depth, stuck, register) = &search.deepest;
            let mut msg = format!(
                "not linearizable: of {} operations, at most {depth} can be put in one order \
                 that explains their outcomes; after them the key is {}, and none of these can \
                 come next:",
                ops.len(),
                describe(register, &names),
            );
            for i in stuck {
                msg.push_str(&format!("\n  {}", ops[*i]));
            }
            Err(msg)
        }
    }
}

fn describe(r: &Register, names: &[Vec<u8>]) -> String {
    match r.current {
        None => "missing".to_string(),
        Some((value, version)) => {
            let text = names
                .get(value)
                .map_or_else(String::new, |v| String::from_utf8_lossy(v).into_owned());
            let version = version.map_or_else(|| "unknown".to_string(), |v| v.to_string());
            format!("`{text}` at version {version}")
        }
    }
}

enum Found {
    Yes,
    No,
    GaveUp,
}

struct Search<'a> {
    ops: &'a [Op],
    value_of: &'a dyn Fn(&Value) -> usize,
    /// (linearized set, register) pairs already explored.
    seen: HashSet<(Vec<u64>, Register)>,
    /// The furthest the search got: how many operations, which could not
    /// follow, and the register there.
    deepest: (usize, Vec<usize>, Register),
    visited: usize,
}

impl Search<'_> {
    fn linearize(&mut self, done: &[u64], register: Register) -> Found {
        self.visited += 1;
        if self.visited > STATE_BUDGET {
            return Found::GaveUp;
        }
        let is_done = |i: usize| done[i / 64] & (1 << (i % 64)) != 0;
        // Everything that returned must be placed; an unknown outcome may
        // stay out (it never took effect).
        let first_return = (0..self.ops.len())
            .filter(|&i| !is_done(i))
            .filter_map(|i| self.ops[i].returned)
            .min();
        let Some(first_return) = first_return else {
            return Found::Yes;
        };
        // What can come next: anything called before the earliest return
        // among the operations not placed yet.
        let candidates: Vec<usize> = (0..self.ops.len())
            .filter(|&i| !is_done(i) && self.ops[i].called < first_return)
            .collect();
        let placed = done.iter().map(|w| w.count_ones() as usize).sum::<usize>();
        for &i in &candidates {
            for next in register.step(&self.ops[i], self.value_of) {
                let mut after = done.to_vec();
                after[i / 64] |= 1 << (i % 64);
                if !self.seen.insert((after.clone(), next)) {
                    continue;
                }
                match self.linearize(&after, next) {
                    Found::No => {}
                    found => return found,
                }
            }
        }
        if placed >= self.deepest.0 {
            self.deepest = (placed, candidates, register);
        }
        Found::No
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn version(n: u64) -> Version {
        Version::new(n).unwrap()
    }

    fn value(s: &str) -> Value {
        Value::new(s.as_bytes().to_vec()).unwrap()
    }

    /// Builds an op from (client, called, returned, call, ret).
    fn op(client: usize, called: u64, returned: Option<u64>, call: KvCall, ret: KvReturn) -> Op {
        Op {
            client,
            key: Key::new("k").unwrap(),
            call,
            ret,
            called,
            returned,
        }
    }

    fn check(ops: Vec<Op>) -> Result<usize, String> {
        check_key(&ops)
    }

    #[test]
    fn sequential_history_passes() {
        let ops = vec![
            op(0, 0, Some(1), KvCall::Get, KvReturn::Read(None)),
            op(
                0,
                2,
                Some(3),
                KvCall::Put(value("a")),
                KvReturn::Written(version(5)),
            ),
            op(
                1,
                4,
                Some(5),
                KvCall::Get,
                KvReturn::Read(Some((value("a"), version(5)))),
            ),
            op(
                1,
                6,
                Some(7),
                KvCall::PutIfVersion(value("b"), version(5)),
                KvReturn::Written(version(9)),
            ),
            op(
                0,
                8,
                Some(9),
                KvCall::PutIfVersion(value("c"), version(5)),
                KvReturn::Conflict,
            ),
            op(
                0,
                10,
                Some(11),
                KvCall::Create(value("d")),
                KvReturn::AlreadyExists,
            ),
            op(
                1,
                12,
                Some(13),
                KvCall::DeleteIfVersion(version(9)),
                KvReturn::Deleted(true),
            ),
            op(0, 14, Some(15), KvCall::Delete, KvReturn::Deleted(false)),
            op(
                0,
                16,
                Some(17),
                KvCall::Create(value("e")),
                KvReturn::Written(version(12)),
            ),
        ];
        check(ops).unwrap();
    }

    #[test]
    fn stale_read_after_a_write_returned_fails() {
        // The put returned before the read was called, yet the read missed it.
        let ops = vec![
            op(
                0,
                0,
                Some(1),
                KvCall::Put(value("a")),
                KvReturn::Written(version(2)),
            ),
            op(1, 2, Some(3), KvCall::Get, KvReturn::Read(None)),
        ];
        let e = check(ops).unwrap_err();
        assert!(e.contains("not linearizable"), "{e}");
        assert!(e.contains("get -> none"), "{e}");
    }

    #[test]
    fn overlapping_operations_may_go_either_way() {
        // The read overlaps the put: seeing either the old or the new value is fine.
        for seen in [None, Some((value("a"), version(2)))] {
            let ops = vec![
                op(
                    0,
                    0,
                    Some(3),
                    KvCall::Put(value("a")),
                    KvReturn::Written(version(2)),
                ),
                op(1, 1, Some(2), KvCall::Get, KvReturn::Read(seen)),
            ];
            check(ops).unwrap();
        }
    }

    #[test]
    fn two_successful_cas_from_one_version_fail() {
        let ops = vec![
            op(
                0,
                0,
                Some(1),
                KvCall::Put(value("a")),
                KvReturn::Written(version(2)),
            ),
            op(
                1,
                2,
                Some(5),
                KvCall::PutIfVersion(value("b"), version(2)),
                KvReturn::Written(version(3)),
            ),
            op(
                2,
                3,
                Some(6),
                KvCall::PutIfVersion(value("c"), version(2)),
                KvReturn::Written(version(4)),
            ),
        ];
        assert!(check(ops).is_err());
    }

    #[test]
    fn versions_must_grow() {
        let ops = vec![
            op(
                0,
                0,
                Some(1),
                KvCall::Put(value("a")),
                KvReturn::Written(version(7)),
            ),
            op(0, 2, Some(3), KvCall::Delete, KvReturn::Deleted(true)),
            op(
                0,
                4,
                Some(5),
                KvCall::Create(value("b")),
                KvReturn::Written(version(6)),
            ),
        ];
        assert!(check(ops).is_err());
    }

    #[test]
    fn delete_reporting_a_missing_key_as_existing_fails() {
        // Two overlapping deletes of one existing key cannot both have found it.
        let ops = vec![
            op(
                0,
                0,
                Some(1),
                KvCall::Put(value("a")),
                KvReturn::Written(version(2)),
            ),
            op(1, 2, Some(5), KvCall::Delete, KvReturn::Deleted(true)),
            op(2, 3, Some(6), KvCall::Delete, KvReturn::Deleted(true)),
        ];
        assert!(check(ops).is_err());
    }

    #[test]
    fn unknown_outcome_may_or_may_not_have_happened() {
        // The put timed out: a later read may see it (with a version nobody
        // was told) or not.
        for seen in [None, Some((value("a"), version(4)))] {
            let ops = vec![
                op(
                    0,
                    0,
                    None,
                    KvCall::Put(value("a")),
                    KvReturn::Unknown("timeout".into()),
                ),
                op(1, 2, Some(3), KvCall::Get, KvReturn::Read(seen.clone())),
            ];
            check(ops).unwrap();
        }
        // But once seen, it cannot be unseen.
        let ops = vec![
            op(
                0,
                0,
                None,
                KvCall::Put(value("a")),
                KvReturn::Unknown("timeout".into()),
            ),
            op(
                1,
                2,
                Some(3),
                KvCall::Get,
                KvReturn::Read(Some((value("a"), version(4)))),
            ),
            op(1, 4, Some(5), KvCall::Get, KvReturn::Read(None)),
        ];
        assert!(check(ops).is_err());
    }

    #[test]
    fn a_read_of_a_value_nobody_wrote_fails() {
        let ops = vec![op(
            0,
            0,
            Some(1),
            KvCall::Get,
            KvReturn::Read(Some((value("z"), version(1)))),
        )];
        assert!(check(ops).is_err());
    }
}
