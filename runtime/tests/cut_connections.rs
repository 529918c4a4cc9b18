//! Connections cut under load, through a TCP proxy that resets every
//! connection every few hundred milliseconds:
//! - three clients race reads, creates, conditional writes and deletes on
//!   two keys, and their history must be linearizable (reads included
//!   where the backend declares `kv.linearizable`). A write the proxy
//!   forwarded before a cut may have been applied with its answer lost: it
//!   may come back as an error (its outcome unknown, which the checker
//!   allows either way), never as a wrong answer;
//! - a producer and two consumers work a queue: every push that returned is
//!   delivered and acked (a push retried after an error may be delivered
//!   twice, at least once being the contract);
//! - three clients take turns at a lock: holders never overlap, fencing
//!   tokens grow with every grant, and a lock request whose answer was lost
//!   never blocks the lock (a waiter's own lost place in line must not stand
//!   in front of it);
//! - a watcher behind the proxy follows a directory written by a client that
//!   is not: it sees every change, in order, unless it says `Resync` (then
//!   it re-lists and watches again from there).
//!
//! - three candidates take 20 terms each at one election (one of them drops
//!   some campaigns after 30 ms) while an observer follows: never two
//!   leaders at once, terms grow with every election, and the observer
//!   follows to the end without failing or going back;
//! - a publisher behind the proxy publishes numbered messages in batches,
//!   each ended by `flush`, to a subscriber that is not: the subscriber gets
//!   them in order, none twice, and every message of a batch whose publishes
//!   and flush all returned `Ok` (a flush that returns promises delivery);
//! - three sessions behind the proxy each hold an ephemeral key, read by a
//!   client that is not: while a session says it is alive its key exists
//!   (a session learns its loss before the server acts on it). Brief resets
//!   cost no session; a partition longer than the TTL loses them all, after
//!   which their keys go and the client serves new sessions;
//! - a lock holder and leader behind the proxy is partitioned from its
//!   server while a client that is not waits for both: it learns it lost
//!   them before that client gets them;
//! - a consumer behind the proxy holding a message with its session is
//!   partitioned: the message goes to a consumer outside once the session
//!   is lost, and the partitioned consumer's ack after the heal fails;
//! - a client partitioned for 20 s, longer than any of its timeouts, serves
//!   every primitive again soon after the heal, without a restart;
//! - an agent behind the proxy is partitioned for longer than its TTL while
//!   it runs a task: the task is relaunched on another agent, and after the
//!   heal the cut-off agent kills its replaced run;
//! - the leading supervisor is partitioned for longer than its TTL while
//!   tasks are launched: a standby takes over and every task runs once;
//! - a client behind the proxy launches tasks: every launch that returned an
//!   id is recorded, and one whose outcome is unknown names its task;
//! - a lock waiter and a candidate behind the proxy are partitioned: each
//!   fails `SessionLost` soon after, not at the end of its timeout;
//! - a client behind the proxy watches task statuses: it sees every task
//!   finish, or its watch says `Resync` and a reconciliation shows them;
//! - a supervisor and three agents behind the proxy run tasks launched by a
//!   client that is not: every task runs exactly once and ends FINISHED,
//!   or KILLED for the fifth that the client kills (an agent's report that
//!   cannot be written is kept and delivered later, never lost or applied
//!   twice).
//!
//! Runs on the real backends named in DPRIM_TEST_BACKENDS (`scripts/test.sh`
//! sets `etcd,zookeeper,nats` and starts their servers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::queue::{PullOptions, QueueOptions};
use dprim::{
    Config, Depth, ErrorKind, Key, KvExt, Tasks, Value, Version, WatchEvent, WatchStart,
    WatchTarget,
};
use dprim_conformance::faults::TcpProxy;
use dprim_conformance::linearizability::{race, registers};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

/// The server each backend's suite config names.
fn server(kind: &str) -> std::net::SocketAddr {
    match kind {
        "etcd" => "127.0.0.1:2379",
        "zookeeper" => "127.0.0.1:2181",
        "nats" => "127.0.0.1:4222",
        other => panic!("unknown backend kind `{other}` in DPRIM_TEST_BACKENDS"),
    }
    .parse()
    .unwrap()
}

/// A config for `kind` at `endpoint`, on a namespace of this run's own.
fn config_at(kind: &str, endpoint: impl std::fmt::Display, case: &str) -> Config {
    Config::from_toml(&format!(
        "[backend]\nkind = \"{kind}\"\nendpoints = [\"{endpoint}\"]\nnamespace = \"cut-{case}-{}\"\nrequest_timeout = \"2s\"\n",
        std::process::id()
    ))
    .unwrap()
}

/// A client of `kind`'s server that no proxy stands in front of.
async fn direct(kind: &str, case: &str) -> dprim::Backend {
    dprim_runtime::open_config(&config_at(kind, server(kind), case))
        .await
        .unwrap()
}

/// A proxy to `kind`'s server, and a config reaching the server through it.
async fn proxied(kind: &str, case: &str) -> (TcpProxy, Config) {
    let proxy = TcpProxy::start(server(kind)).await.unwrap();
    let config = config_at(kind, proxy.addr(), case);
    (proxy, config)
}

/// Cuts every connection through `proxy` every 150-300 ms until `done`;
/// returns how many cuts it made.
async fn cut_until<T>(proxy: &TcpProxy, done: &tokio::task::JoinHandle<T>) -> u32 {
    let mut cuts = 0;
    while !done.is_finished() {
        tokio::time::sleep(Duration::from_millis(150 + rand::random_range(0..150))).await;
        proxy.cut();
        cuts += 1;
    }
    cuts
}

async fn race_through_cuts(kind: &str) {
    let (proxy, config) = proxied(kind, "kv").await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(dprim_runtime::open_config(&config).await.unwrap());
    }
    let linearizable_reads = clients[0].capabilities().kv.linearizable;
    let racers = tokio::spawn(race(
        clients,
        registers(),
        300,
        Duration::from_millis(2),
        false,
    ));
    let cuts = cut_until(&proxy, &racers).await;
    let history = racers.await.unwrap().unwrap();
    let checked = history
        .check(linearizable_reads)
        .unwrap_or_else(|e| panic!("{kind}: the history through {cuts} cuts: {e}"));
    println!("{kind}: {checked:?} through {cuts} cuts");
}

const MESSAGES: u32 = 200;

async fn queue_through_cuts(kind: &str) {
    let (proxy, config) = proxied(kind, "queue").await;
    let name = Key::new("jobs").unwrap();
    let options = QueueOptions {
        max_attempts: 1000,
        dead_letter: None,
    };
    let producer = dprim_runtime::open_config(&config).await.unwrap();
    let q = producer.queues().open(&name, Some(options)).await.unwrap();
    // Message number -> times a consumer acked it.
    let acked: Arc<Mutex<BTreeMap<u32, u32>>> = Arc::default();
    let producing = tokio::spawn(async move {
        let mut pushed = BTreeSet::new();
        let mut errors = 0;
        for i in 0..MESSAGES {
            // At least once: an error may hide a push that was stored.
            while let Err(e) = q
                .push(Value::new(i.to_string().into_bytes()).unwrap())
                .await
            {
                errors += 1;
                assert!(errors < 1000, "push {i} keeps failing: {e}");
            }
            pushed.insert(i);
            // Spread the pushes over a dozen cuts or so.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (pushed, errors)
    });
    let done = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let backend = dprim_runtime::open_config(&config).await.unwrap();
        let (name, acked, done) = (name.clone(), acked.clone(), done.clone());
        consumers.push(tokio::spawn(async move {
            let q = backend.queues().open(&name, None).await.unwrap();
            // Longer than the wait for the last ack below: a delivery made
            // for a pull that failed (its answer lost with a connection)
            // must be given back, not wait out its visibility timeout.
            let options = PullOptions {
                visibility_timeout: Duration::from_secs(120),
                wait: Duration::from_millis(500),
                session: None,
            };
            while !done.load(Ordering::SeqCst) {
                let Ok(Some(d)) = q.pull(options.clone()).await else {
                    continue;
                };
                // An ack whose answer was lost may have been applied: ack
                // again (acking twice is harmless) until the answer comes.
                // `Conflict`: the delivery timed out and will come again.
                let acked_now = loop {
                    match q.ack(&d.receipt).await {
                        Ok(()) => break true,
                        Err(e) if e.kind() == ErrorKind::Conflict => break false,
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                };
                if acked_now {
                    let i: u32 = String::from_utf8_lossy(d.payload.as_bytes())
                        .parse()
                        .unwrap();
                    *acked.lock().unwrap().entry(i).or_default() += 1;
                }
            }
        }));
    }
    let cuts = cut_until(&proxy, &producing).await;
    let (pushed, push_errors) = producing.await.unwrap();
    // A message claimed for a pull that failed is given back at once; on
    // NATS a fetch whose answer was lost comes back after the consumer's
    // AckWait (30 s).
    let last_push = Instant::now();
    let all_acked = || pushed.iter().all(|i| acked.lock().unwrap().contains_key(i));
    while !all_acked() && last_push.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settled = last_push.elapsed();
    done.store(true, Ordering::SeqCst);
    for c in consumers {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let lost: Vec<u32> = pushed
        .iter()
        .filter(|i| !acked.contains_key(i))
        .copied()
        .collect();
    let twice = acked.values().filter(|n| **n > 1).count();
    println!(
        "{kind} queue: {} pushed through {cuts} cuts ({push_errors} push errors), {} acked ({twice} more than once), the last {:.1} s after the last push",
        pushed.len(),
        acked.len(),
        settled.as_secs_f64()
    );
    if !lost.is_empty() {
        // What the queue holds, seen without the proxy.
        let direct = config_at(kind, server(kind), "queue");
        let backend = dprim_runtime::open_config(&direct).await.unwrap();
        let q = backend.queues().open(&name, None).await.unwrap();
        let depth = q.depth().await;
        let next = q.pull(PullOptions::default()).await;
        panic!("{kind}: pushed but never acked: {lost:?}; the queue's depth now: {depth:?}; a pull now: {next:?}");
    }
}

/// `session`, or a new one when it is `None` (lost); `None` when opening
/// fails, noted in `failures`.
async fn reopened<'a>(
    backend: &dprim::Backend,
    session: &'a mut Option<dprim::Session>,
    failures: &mut Vec<String>,
) -> Option<&'a dprim::Session> {
    if session.is_none() {
        match backend.sessions().open(Duration::from_secs(3)).await {
            Ok(s) => *session = Some(s),
            Err(e) => failures.push(format!("open session: {e}")),
        }
    }
    session.as_ref()
}

const LOCK_ROUNDS: u32 = 30;

async fn lock_through_cuts(kind: &str) {
    let (proxy, config) = proxied(kind, "lock").await;
    let name = Key::new("turn").unwrap();
    // Who is inside, and the grants in order: (client, token).
    let inside: Arc<Mutex<Option<usize>>> = Arc::default();
    let grants: Arc<Mutex<Vec<(usize, u64)>>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..3 {
        let backend = dprim_runtime::open_config(&config).await.unwrap();
        let (name, inside, grants) = (name.clone(), inside.clone(), grants.clone());
        clients.push(tokio::spawn(async move {
            let mut session = None;
            let (mut held, mut failures) = (0, Vec::new());
            let started = Instant::now();
            while held < LOCK_ROUNDS {
                assert!(
                    started.elapsed() < Duration::from_secs(90),
                    "client {c}: {held} of {LOCK_ROUNDS} turns in 90 s; failures: {failures:?}"
                );
                let Some(s) = reopened(&backend, &mut session, &mut failures).await else {
                    continue;
                };
                let guard = match backend
                    .locks()
                    .lock(&name, s, Duration::from_secs(10))
                    .await
                {
                    Ok(g) => g,
                    Err(e) => {
                        if e.kind() == ErrorKind::SessionLost {
                            session = None;
                        }
                        failures.push(format!("lock: {e}"));
                        continue;
                    }
                };
                {
                    let mut who = inside.lock().unwrap();
                    assert_eq!(*who, None, "client {c} got the lock while {who:?} held it");
                    *who = Some(c);
                }
                grants.lock().unwrap().push((c, guard.fencing_token().0));
                tokio::time::sleep(Duration::from_millis(5)).await;
                // Leave before the release: after it, someone else may enter.
                *inside.lock().unwrap() = None;
                if let Err(e) = guard.unlock().await {
                    failures.push(format!("unlock: {e}"));
                }
                held += 1;
                // Spread the turns over a dozen cuts or so.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            failures.len()
        }));
    }
    let all = tokio::spawn(futures::future::join_all(clients));
    let cuts = cut_until(&proxy, &all).await;
    let failures: usize = all.await.unwrap().into_iter().map(|r| r.unwrap()).sum();
    let grants = grants.lock().unwrap().clone();
    assert!(
        grants.windows(2).all(|w| w[0].1 < w[1].1),
        "{kind}: fencing tokens did not grow with every grant: {grants:?}"
    );
    println!(
        "{kind} lock: {} turns through {cuts} cuts, {failures} failed lock or unlock calls",
        grants.len()
    );
}

const TERMS: u32 = 20;

async fn election_through_cuts(kind: &str) {
    let (proxy, config) = proxied(kind, "election").await;
    let name = Key::new("leader").unwrap();
    // Who leads, and the terms in the order they were won: (client, term).
    let leading: Arc<Mutex<Option<usize>>> = Arc::default();
    let terms: Arc<Mutex<Vec<(usize, u64)>>> = Arc::default();
    let observer = dprim_runtime::open_config(&config).await.unwrap();
    let mut observed = observer.elections().observe(&name).await.unwrap();
    let mut candidates = Vec::new();
    for c in 0..3 {
        let backend = dprim_runtime::open_config(&config).await.unwrap();
        let (name, leading, terms) = (name.clone(), leading.clone(), terms.clone());
        candidates.push(tokio::spawn(async move {
            let mut session = None;
            let (mut won, mut withdrawn, mut failures) = (0, 0, Vec::new());
            let started = Instant::now();
            while won < TERMS {
                assert!(
                    started.elapsed() < Duration::from_secs(90),
                    "candidate {c}: {won} of {TERMS} terms in 90 s; failures: {failures:?}"
                );
                let Some(s) = reopened(&backend, &mut session, &mut failures).await else {
                    continue;
                };
                let value = Value::new(format!("candidate {c}").into_bytes()).unwrap();
                // Candidate 2 gives up some campaigns early: a candidacy
                // withdrawn through the cuts must not stay in line.
                let patience = if c == 2 && won % 3 == 0 {
                    Duration::from_millis(30)
                } else {
                    Duration::from_secs(10)
                };
                let leadership = match tokio::time::timeout(
                    patience,
                    backend.elections().campaign(&name, value, s),
                )
                .await
                {
                    Err(_) => {
                        withdrawn += 1;
                        continue;
                    }
                    Ok(Ok(l)) => l,
                    Ok(Err(e)) => {
                        if e.kind() == ErrorKind::SessionLost {
                            session = None;
                        }
                        failures.push(format!("campaign: {e}"));
                        continue;
                    }
                };
                {
                    let mut who = leading.lock().unwrap();
                    assert_eq!(*who, None, "candidate {c} was elected while {who:?} led");
                    *who = Some(c);
                }
                terms.lock().unwrap().push((c, leadership.term().0));
                let proclaimed = Value::new(format!("candidate {c}, busy").into_bytes()).unwrap();
                if let Err(e) = leadership.proclaim(proclaimed).await {
                    failures.push(format!("proclaim: {e}"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                // Step down before resigning: after it, someone else may lead.
                *leading.lock().unwrap() = None;
                if let Err(e) = leadership.resign().await {
                    failures.push(format!("resign: {e}"));
                }
                won += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (failures.len(), withdrawn)
        }));
    }
    let all = tokio::spawn(futures::future::join_all(candidates));
    // The observer behind the proxy: terms never go backwards, and it
    // follows to the end (no leader) without failing.
    let (done_tx, mut done) = tokio::sync::watch::channel(false);
    let observing = tokio::spawn(async move {
        use futures::StreamExt;
        let (mut last, mut seen, mut errors) = (None::<dprim::Leader>, 0, Vec::new());
        loop {
            let item = tokio::select! {
                item = observed.next() => item,
                _ = async {
                    let _ = done.wait_for(|d| *d).await;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                } => break,
            };
            match item {
                None => {
                    errors.push(format!("the observation ended after {seen} leaders"));
                    break;
                }
                Some(Ok(leader)) => {
                    if let (Some(now), Some(before)) = (&leader, &last) {
                        assert!(
                            now.term >= before.term,
                            "the observer saw term {} after term {}",
                            now.term,
                            before.term
                        );
                    }
                    last = leader;
                    seen += 1;
                }
                Some(Err(e)) => errors.push(format!("after {seen} leaders: {e}")),
            }
        }
        (seen, last, errors)
    });
    let cuts = cut_until(&proxy, &all).await;
    let results: Vec<(usize, u32)> = all.await.unwrap().into_iter().map(|r| r.unwrap()).collect();
    done_tx.send_replace(true);
    let (seen, last, errors) = observing.await.unwrap();
    assert!(
        errors.is_empty() && last.is_none(),
        "{kind}: the observer failed or fell behind: errors {errors:?}, last saw {last:?}"
    );
    drop(observer);
    let terms = terms.lock().unwrap().clone();
    assert!(
        terms.windows(2).all(|w| w[0].1 < w[1].1),
        "{kind}: terms did not grow with every election: {terms:?}"
    );
    println!(
        "{kind} election: {} terms through {cuts} cuts; (failed calls, withdrawn campaigns) per candidate: {results:?}; the observer saw {seen} changes",
        terms.len()
    );
}

const WATCHED_WRITES: u64 = 300;

async fn watch_through_cuts(kind: &str) {
    let (proxy, config) = proxied(kind, "watch").await;
    let writer = direct(kind, "watch").await;
    let watcher = dprim_runtime::open_config(&config).await.unwrap();
    let dir = Key::new("w").unwrap();
    let start = watcher
        .kv()
        .list(&dir, Depth::Recursive)
        .await
        .unwrap()
        .revision;
    let writing = tokio::spawn(async move {
        let mut versions = Vec::new();
        for i in 0..WATCHED_WRITES {
            let key = Key::new(format!("w/k{}", i % 5)).unwrap();
            let value = Value::new(i.to_string().into_bytes()).unwrap();
            let version = writer.kv().put(&key, value).await.unwrap();
            versions.push((key, version));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        versions
    });
    // The writer's last version of each key, once it is done.
    let (last_tx, last_rx) = tokio::sync::oneshot::channel::<BTreeMap<Key, Version>>();
    let kind_name = kind.to_string();
    let watching = tokio::spawn(async move {
        let kind = kind_name;
        let mut last_rx = last_rx;
        let (mut seen, mut resyncs, mut after) = (Vec::new(), 0, start);
        // What the watcher believes each key holds.
        let mut view: BTreeMap<Key, Version> = BTreeMap::new();
        let mut expected = None;
        let mut watch = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(last) = last_rx.try_recv() {
                expected = Some(last);
            }
            if expected.as_ref() == Some(&view) {
                break;
            }
            let stream = match &mut watch {
                Some(w) => w,
                None => match watcher
                    .kv()
                    .watch(WatchTarget::Dir(dir.clone()), WatchStart::After(after))
                    .await
                {
                    Ok(w) => watch.insert(w),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            match tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
                Ok(Some(Ok(WatchEvent::Put(e)))) => {
                    assert!(
                        e.version > after,
                        "{kind}: the watch went back: {:?} after {after:?}",
                        e.version
                    );
                    after = e.version;
                    seen.push(e.version);
                    view.insert(e.key, e.version);
                }
                Ok(Some(Ok(WatchEvent::Resync { .. }))) => {
                    // Continuity is not proven: re-list and follow on from
                    // the listing.
                    resyncs += 1;
                    if let Ok(l) = watcher.kv().list(&dir, Depth::Recursive).await {
                        for e in l.entries {
                            view.insert(e.key, e.version);
                        }
                        after = l.revision;
                    }
                    watch = None;
                }
                Ok(Some(Ok(other))) => panic!("{kind}: unexpected watch event {other:?}"),
                // The stream failed or ended (an error is not a silent gap);
                // watch again from the last change seen.
                Ok(Some(Err(_))) | Ok(None) => watch = None,
                Err(_) => {}
            }
        }
        (seen, resyncs, view)
    });
    let cuts = cut_until(&proxy, &writing).await;
    let versions = writing.await.unwrap();
    let last: BTreeMap<Key, Version> = versions.iter().cloned().collect();
    let _ = last_tx.send(last.clone());
    let (seen, resyncs, view) = watching.await.unwrap();
    println!(
        "{kind} watch: {} changes through {cuts} cuts, {} seen, {resyncs} resyncs",
        versions.len(),
        seen.len()
    );
    // Changes and re-lists together show every key as it ended.
    assert_eq!(
        view, last,
        "{kind}: the watcher's view is not what was written"
    );
    if resyncs == 0 {
        // Without a Resync the watcher must have seen every change.
        let versions: Vec<Version> = versions.into_iter().map(|(_, v)| v).collect();
        let missed: Vec<_> = versions.iter().filter(|v| !seen.contains(v)).collect();
        assert_eq!(
            seen, versions,
            "{kind}: the watcher missed changes without a Resync: {missed:?}"
        );
    }
}

const BATCHES: u32 = 150;
const BATCH: u32 = 20;

async fn pubsub_through_cuts(kind: &str) {
    let (proxy, config) = proxied(kind, "pubsub").await;
    let direct = direct(kind, "pubsub").await;
    let publisher = dprim_runtime::open_config(&config).await.unwrap();
    let topic = Key::new("numbers").unwrap();
    let (done_tx, done) = tokio::sync::watch::channel(false);
    let subscription = direct.pubsub().subscribe(&topic).await.unwrap();
    let subscribing = tokio::spawn(numbers(subscription, done.clone()));
    // A second subscriber behind the proxy may lose messages while its
    // connection is down, but never gets one twice or out of order.
    let cut_off = dprim_runtime::open_config(&config).await.unwrap();
    let subscription = cut_off.pubsub().subscribe(&topic).await.unwrap();
    let subscribing_cut_off = tokio::spawn(numbers(subscription, done));
    let publishing = tokio::spawn(async move {
        // The batches whose publishes and flush all returned Ok.
        let mut confirmed = BTreeSet::new();
        let mut errors = 0;
        for b in 0..BATCHES {
            let mut ok = true;
            for i in b * BATCH..(b + 1) * BATCH {
                let payload = Value::new(i.to_string().into_bytes()).unwrap();
                if publisher.pubsub().publish(&topic, payload).await.is_err() {
                    ok = false;
                    errors += 1;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            match publisher.pubsub().flush().await {
                Ok(()) if ok => {
                    confirmed.insert(b);
                }
                Ok(()) => {}
                Err(_) => errors += 1,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (confirmed, errors)
    });
    let cuts = cut_until(&proxy, &publishing).await;
    let (confirmed, errors) = publishing.await.unwrap();
    done_tx.send_replace(true);
    let (received, _) = subscribing.await.unwrap();
    let (received_cut_off, errors_cut_off) = subscribing_cut_off.await.unwrap();
    let disorder: Vec<_> = received_cut_off
        .windows(2)
        .filter(|w| w[0] >= w[1])
        .collect();
    assert!(
        disorder.is_empty(),
        "{kind}: the subscriber behind the proxy got messages out of order or twice: {disorder:?}"
    );
    let disorder: Vec<_> = received.windows(2).filter(|w| w[0] >= w[1]).collect();
    assert!(
        disorder.is_empty(),
        "{kind}: messages out of order or twice: {disorder:?}"
    );
    let got: BTreeSet<u32> = received.iter().copied().collect();
    let lost: Vec<u32> = confirmed
        .iter()
        .flat_map(|b| b * BATCH..(b + 1) * BATCH)
        .filter(|i| !got.contains(i))
        .collect();
    assert!(
        lost.is_empty(),
        "{kind}: {} messages of confirmed batches never arrived (first: {:?}); {cuts} cuts, {errors} errors",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    println!(
        "{kind}: {} of {} batches confirmed, {} messages received in order, {errors} errors, {cuts} cuts; behind the proxy: {} messages in order, {errors_cut_off} errors",
        confirmed.len(),
        BATCHES,
        received.len(),
        received_cut_off.len(),
    );
}

/// The numbers a subscription delivers until `done` is set and two quiet
/// seconds passed (everything was routed once the last flush returned;
/// what is still on its way arrives well within them), and how many errors
/// it returned meanwhile.
async fn numbers(
    mut subscription: dprim::Subscription,
    mut done: tokio::sync::watch::Receiver<bool>,
) -> (Vec<u32>, u32) {
    let mut received = Vec::new();
    let mut errors = 0;
    loop {
        let item = tokio::select! {
            item = subscription.next() => item,
            _ = async {
                let _ = done.wait_for(|d| *d).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            } => break,
        };
        match item {
            None => break,
            Some(Err(_)) => errors += 1,
            Some(Ok(dprim::pubsub::SubscriptionItem::Message(m))) => received.push(
                String::from_utf8_lossy(m.payload.as_bytes())
                    .parse::<u32>()
                    .unwrap(),
            ),
            Some(Ok(dprim::pubsub::SubscriptionItem::Lagged(n))) => {
                panic!("a subscriber reading all along lagged by {n}")
            }
        }
    }
    (received, errors)
}

async fn sessions_through_cuts(kind: &str) {
    let (proxy, config) = proxied(kind, "sessions").await;
    let direct = direct(kind, "sessions").await;
    let holder = dprim_runtime::open_config(&config).await.unwrap();
    let mut held = Vec::new();
    for i in 0..3 {
        let session = holder
            .sessions()
            .open(Duration::from_secs(3))
            .await
            .unwrap();
        let key = Key::new(format!("held/{i}")).unwrap();
        let value = Value::new(b"mine".to_vec()).unwrap();
        holder
            .kv()
            .put_ephemeral(&key, value, &session)
            .await
            .unwrap();
        held.push((session, key));
    }
    let sessions: Vec<dprim::Session> = held.iter().map(|(s, _)| s.clone()).collect();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let checking = tokio::spawn(async move {
        let (mut reads, mut failed_reads) = (0, 0);
        while !*stopped.borrow_and_update() {
            for (session, key) in &held {
                let read = direct.kv().get(key).await;
                // Checked after the read: a session alive now was alive
                // when the key was read (a lost session stays lost).
                if !session.is_alive() {
                    continue;
                }
                match read {
                    Ok(Some(_)) => reads += 1,
                    Ok(None) => panic!(
                        "{key}: the key of session {} is gone while the session says it is alive",
                        session.id()
                    ),
                    Err(_) => failed_reads += 1,
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(30), stopped.changed()).await;
        }
        (direct, held, reads, failed_reads)
    });
    // Brief resets first: they must cost no session.
    let brief = tokio::spawn(tokio::time::sleep(Duration::from_secs(8)));
    let cuts = cut_until(&proxy, &brief).await;
    let lost: Vec<String> = sessions
        .iter()
        .filter(|s| !s.is_alive())
        .map(|s| format!("{}: {}", s.id(), s.check().unwrap_err()))
        .collect();
    assert!(
        lost.is_empty(),
        "{kind}: sessions lost through {cuts} brief cuts: {lost:?}"
    );
    // Then a partition longer than the TTL: every session must learn it is
    // lost, and before the server drops its keys (checked all along).
    proxy.isolate();
    let isolated = Instant::now();
    for s in &sessions {
        let noticed = tokio::time::timeout(Duration::from_secs(10), s.lost()).await;
        assert!(
            noticed.is_ok(),
            "{kind}: session {} still says it is alive {:?} into a partition (TTL 3 s)",
            s.id(),
            isolated.elapsed()
        );
    }
    // Long enough for every server to have expired them.
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.heal();
    stop.send_replace(true);
    let (direct, held, reads, failed_reads) = checking.await.unwrap();
    // Their keys go, and the client serves new work.
    for (_, key) in &held {
        let mut gone = false;
        for _ in 0..100 {
            if direct.kv().get(key).await.unwrap().is_none() {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(gone, "{kind}: {key} outlived its lost session by 10 s");
    }
    let fresh = holder
        .sessions()
        .open(Duration::from_secs(3))
        .await
        .unwrap();
    let key = Key::new("held/fresh").unwrap();
    holder
        .kv()
        .put_ephemeral(&key, Value::new(b"mine".to_vec()).unwrap(), &fresh)
        .await
        .unwrap();
    assert!(direct.kv().get(&key).await.unwrap().is_some());
    fresh.close().await.unwrap();
    println!("{kind}: 3 sessions alive through {cuts} brief cuts and lost in a partition before their keys went; keys read {reads} times ({failed_reads} reads failed)");
}

/// A holder of a lock and a leader behind the proxy are partitioned from
/// their server while a client that is not waits for both: each learns it
/// lost the lock or the leadership before the other client gets it.
async fn partitioned_holder(kind: &str) {
    let (proxy, config) = proxied(kind, "partition").await;
    let direct = direct(kind, "partition").await;
    let holder = dprim_runtime::open_config(&config).await.unwrap();
    let (lock, election) = (
        Key::new("the-lock").unwrap(),
        Key::new("the-election").unwrap(),
    );
    let ttl = Duration::from_secs(3);
    let session = holder.sessions().open(ttl).await.unwrap();
    let guard = holder.locks().lock(&lock, &session, ttl).await.unwrap();
    let value = Value::new(b"partitioned".to_vec()).unwrap();
    let leadership = holder
        .elections()
        .campaign(&election, value, &session)
        .await
        .unwrap();
    let noticed = tokio::spawn(async move {
        guard.lost().await;
        let lock_lost = Instant::now();
        leadership.lost().await;
        (lock_lost, Instant::now())
    });
    let waiting = direct.sessions().open(ttl).await.unwrap();
    let (direct_lock, direct_election) = (direct.clone(), direct.clone());
    let (w1, w2) = (waiting.clone(), waiting.clone());
    let taker = tokio::spawn(async move {
        let guard = direct_lock
            .locks()
            .lock(&lock, &w1, Duration::from_secs(30))
            .await
            .unwrap();
        (Instant::now(), guard)
    });
    let successor = tokio::spawn(async move {
        let value = Value::new(b"successor".to_vec()).unwrap();
        let leadership = direct_election
            .elections()
            .campaign(&election, value, &w2)
            .await
            .unwrap();
        (Instant::now(), leadership)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!taker.is_finished() && !successor.is_finished());
    proxy.isolate();
    let (lock_lost, leadership_lost) = noticed.await.unwrap();
    let (taken, guard) = taker.await.unwrap();
    let (elected, leadership) = successor.await.unwrap();
    proxy.heal();
    assert!(
        lock_lost < taken,
        "{kind}: the partitioned holder learned it lost the lock {:?} after another client took it",
        lock_lost - taken
    );
    assert!(
        leadership_lost < elected,
        "{kind}: the partitioned leader learned it lost {:?} after another candidate was elected",
        leadership_lost - elected
    );
    println!(
        "{kind}: the partitioned holder learned of its loss {:?} before the lock was taken and {:?} before the next leader was elected",
        taken - lock_lost,
        elected - leadership_lost
    );
    guard.unlock().await.unwrap();
    leadership.resign().await.unwrap();
}

/// A consumer behind the proxy holds a message with its session when a
/// partition cuts it off: the message goes to a consumer outside once the
/// session is lost, and the partitioned consumer's ack, made after the
/// heal, fails instead of removing the message the other one now holds.
async fn partitioned_consumer(kind: &str) {
    let (proxy, config) = proxied(kind, "partition-queue").await;
    let direct = direct(kind, "partition-queue").await;
    let name = Key::new("jobs").unwrap();
    let outside = direct.queues().open(&name, None).await.unwrap();
    outside
        .push(Value::new(b"the job".to_vec()).unwrap())
        .await
        .unwrap();
    let consumer = dprim_runtime::open_config(&config).await.unwrap();
    let inside = consumer.queues().open(&name, None).await.unwrap();
    let session = consumer
        .sessions()
        .open(Duration::from_secs(3))
        .await
        .unwrap();
    let held = inside
        .pull(PullOptions {
            visibility_timeout: Duration::from_secs(120),
            wait: Duration::from_secs(5),
            session: Some(session.clone()),
        })
        .await
        .unwrap()
        .expect("the pushed message");
    proxy.isolate();
    tokio::time::timeout(Duration::from_secs(10), session.lost())
        .await
        .expect("the partitioned consumer's session is lost within 10 s");
    let again = outside
        .pull(PullOptions {
            visibility_timeout: Duration::from_secs(120),
            wait: Duration::from_secs(20),
            session: None,
        })
        .await
        .unwrap()
        .unwrap_or_else(|| {
            panic!("{kind}: a message held by a lost session was not delivered again in 20 s")
        });
    assert_eq!(again.id, held.id);
    assert_eq!(again.attempt, held.attempt + 1);
    proxy.heal();
    // Temporary failures (the connection coming back) are retried, as an
    // app would.
    let mut stale = inside.ack(&held.receipt).await;
    let retrying = Instant::now();
    while matches!(&stale, Err(e) if e.is_temporary())
        && retrying.elapsed() < Duration::from_secs(15)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stale = inside.ack(&held.receipt).await;
    }
    assert!(
        matches!(&stale, Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::SessionLost)),
        "{kind}: the partitioned consumer's ack of a message delivered again since gave {stale:?}"
    );
    outside.ack(&again.receipt).await.unwrap();
    let depth = outside.depth().await.unwrap();
    assert_eq!((depth.ready, depth.in_flight), (0, 0), "{kind}: {depth:?}");
    println!(
        "{kind}: a partitioned consumer's message went to another, and its stale ack failed: {}",
        stale.unwrap_err()
    );
}

/// A client partitioned from its server for longer than every timeout it
/// has serves again soon after the partition heals: Kv, sessions, locks,
/// queues, pub/sub and watches, with no restart of the client.
async fn long_partition(kind: &str) {
    let (proxy, config) = proxied(kind, "long-partition").await;
    let client = dprim_runtime::open_config(&config).await.unwrap();
    let key = Key::new("k").unwrap();
    client
        .kv()
        .put(&key, Value::new(b"before".to_vec()).unwrap())
        .await
        .unwrap();
    let mut watch = client
        .kv()
        .watch(WatchTarget::Key(key.clone()), WatchStart::Now)
        .await
        .unwrap();
    proxy.isolate();
    tokio::time::sleep(Duration::from_secs(20)).await;
    proxy.heal();
    let healed = Instant::now();
    // Whatever failed meanwhile, each operation works again within 30 s.
    async fn soon<T, F, Fut>(kind: &str, what: &str, mut op: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = dprim::Result<T>>,
    {
        let started = Instant::now();
        loop {
            match tokio::time::timeout(Duration::from_secs(5), op()).await {
                Ok(Ok(v)) => return v,
                Ok(Err(e)) if started.elapsed() > Duration::from_secs(30) => {
                    panic!("{kind}: {what} still fails 30 s after the partition healed: {e}")
                }
                Err(_) if started.elapsed() > Duration::from_secs(30) => {
                    panic!("{kind}: {what} still hangs 30 s after the partition healed")
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    let after = Value::new(b"after".to_vec()).unwrap();
    soon(kind, "put", || client.kv().put(&key, after.clone())).await;
    let read = soon(kind, "get", || client.kv().get(&key)).await;
    assert_eq!(read.map(|e| e.value), Some(after.clone()));
    // The watch says where it stands: the change, or `Resync`, or its end.
    let seen = tokio::time::timeout(Duration::from_secs(30), watch.next()).await;
    assert!(
        matches!(
            &seen,
            Ok(Some(Ok(WatchEvent::Put { .. } | WatchEvent::Resync { .. })) | Some(Err(_)) | None)
        ),
        "{kind}: the watch after the partition gave {seen:?}"
    );
    let session = soon(kind, "open a session", || {
        client.sessions().open(Duration::from_secs(3))
    })
    .await;
    let lock = Key::new("lock").unwrap();
    let guard = soon(kind, "lock", || {
        client.locks().lock(&lock, &session, Duration::from_secs(5))
    })
    .await;
    guard.unlock().await.unwrap();
    let queue_name = Key::new("q").unwrap();
    let queue = soon(kind, "open a queue", || {
        client.queues().open(&queue_name, None)
    })
    .await;
    soon(kind, "push", || queue.push(after.clone())).await;
    let delivery = soon(kind, "pull", || {
        queue.pull(PullOptions {
            wait: Duration::from_secs(2),
            ..PullOptions::default()
        })
    })
    .await
    .expect("the pushed message");
    queue.ack(&delivery.receipt).await.unwrap();
    let topic = Key::new("t").unwrap();
    let mut subscription = soon(kind, "subscribe", || client.pubsub().subscribe(&topic)).await;
    soon(kind, "publish", || {
        client.pubsub().publish(&topic, after.clone())
    })
    .await;
    soon(kind, "flush", || client.pubsub().flush()).await;
    let got = tokio::time::timeout(Duration::from_secs(5), subscription.next()).await;
    assert!(
        matches!(
            &got,
            Ok(Some(Ok(dprim::pubsub::SubscriptionItem::Message(_))))
        ),
        "{kind}: {got:?}"
    );
    session.close().await.unwrap();
    println!(
        "{kind}: serving every primitive {:?} after a 20 s partition healed; the watch gave {seen:?}",
        healed.elapsed()
    );
}

/// An agent behind the proxy runs a task when a partition cuts it off for
/// longer than its session's TTL: the supervisor (outside) declares the
/// task GONE and relaunches it on another agent, and once the partition
/// heals the cut-off agent kills its own, replaced, run. One run is left.
async fn partitioned_agent(kind: &str) {
    let (proxy, config) = proxied(kind, "partition-agent").await;
    let direct = direct(kind, "partition-agent").await;
    let (stop, _) = tokio::sync::watch::channel(false);
    let work = support::temp_dir("cut", &format!("agent-{kind}"));
    let supervisor = support::supervisor(&direct, Duration::from_secs(2));
    let mut running = vec![tokio::spawn(supervisor.run(support::stopped(&stop)))];
    let agent = |id: &str, backend: dprim::Backend| {
        let mut config =
            support::agent_config(work.join(id), Duration::from_secs(3), Default::default());
        config.id = id.into();
        tokio::spawn(
            dprim_runtime::tasks::agent::Agent::new(backend, config).run(support::stopped(&stop)),
        )
    };
    running.push(agent(
        "cut-off",
        dprim_runtime::open_config(&config).await.unwrap(),
    ));
    let client = dprim_runtime::tasks::client::TasksClient::new(direct.clone());
    let runs = work.join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    // Each run leaves a file named by its shell's pid.
    let mut spec = support::shell(&format!("touch {}/$$; exec sleep 300", runs.display()), 0.5);
    spec.restart = dprim::tasks::RestartPolicy::OnFailure;
    let id = client.launch(spec).await.unwrap();
    let first = support::wait_for(&client, &id, dprim::tasks::TaskState::Running).await;
    assert_eq!(first.agent.as_deref(), Some("cut-off"));
    running.push(agent("outside", direct.clone()));
    proxy.isolate();
    // Replaced: running on the other agent.
    let started = Instant::now();
    loop {
        let s = client.status(&id).await.unwrap();
        if s.state == dprim::tasks::TaskState::Running && s.agent.as_deref() == Some("outside") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{kind}: the task of a partitioned agent was not relaunched elsewhere in 30 s: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let relaunched = started.elapsed();
    proxy.heal();
    // The cut-off agent's run ends; the relaunched one goes on.
    let alive = |pid: &str| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let pids = || -> Vec<String> {
        std::fs::read_dir(&runs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let healed = Instant::now();
    loop {
        let all = pids();
        let live: Vec<&String> = all.iter().filter(|p| alive(p)).collect();
        if all.len() >= 2 && live.len() == 1 {
            break;
        }
        assert!(
            healed.elapsed() < Duration::from_secs(30),
            "{kind}: 30 s after the heal {} of the task's runs {all:?} are alive",
            live.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pids().len(), 2, "{kind}: runs {:?}", pids());
    let s = client.status(&id).await.unwrap();
    assert_eq!(
        (s.state, s.agent.as_deref()),
        (dprim::tasks::TaskState::Running, Some("outside")),
        "{kind}: {s:?}"
    );
    client.kill(&id, Duration::from_secs(1)).await.unwrap();
    support::wait_for(&client, &id, dprim::tasks::TaskState::Killed).await;
    stop.send_replace(true);
    for handle in running {
        handle.await.unwrap().unwrap();
    }
    println!(
        "{kind}: a partitioned agent's task was relaunched elsewhere after {relaunched:?}; the cut-off run ended {:?} after the heal",
        healed.elapsed()
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// The leading supervisor is behind the proxy, a standby and the agents are
/// not; tasks are launched all along while the leader is partitioned for
/// longer than its TTL and then healed: the standby takes over, the old
/// leader stands down (and stands by after the heal), and every task runs
/// exactly once and finishes.
async fn partitioned_supervisor(kind: &str) {
    let (proxy, config) = proxied(kind, "partition-supervisor").await;
    let direct = direct(kind, "partition-supervisor").await;
    let (stop, _) = tokio::sync::watch::channel(false);
    let work = support::temp_dir("cut", &format!("supervisor-{kind}"));
    let runs = work.join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    let cut_off = dprim_runtime::open_config(&config).await.unwrap();
    let mut running = vec![tokio::spawn(
        support::supervisor(&cut_off, Duration::from_secs(60)).run(support::stopped(&stop)),
    )];
    let client = dprim_runtime::tasks::client::TasksClient::new(direct.clone());
    // s1 leads before anyone else runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let standby = support::named_supervisor(&direct, "s2", Duration::from_secs(60));
    running.push(tokio::spawn(standby.run(support::stopped(&stop))));
    for i in 0..2 {
        let mut agent = support::agent_config(
            work.join(format!("agent-{i}")),
            Duration::from_secs(5),
            Default::default(),
        );
        agent.id = format!("a{i}");
        running.push(tokio::spawn(
            dprim_runtime::tasks::agent::Agent::new(direct.clone(), agent)
                .run(support::stopped(&stop)),
        ));
    }
    let runs_dir = runs.clone();
    let launching = tokio::spawn(async move {
        let mut ids = Vec::new();
        for n in 0..TASKS {
            let dir = runs_dir.display();
            let spec = support::shell(&format!("echo ran >> {dir}/{n}"), 0.25);
            ids.push(client.launch(spec).await.unwrap());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        until_done(&client, &ids, Duration::from_secs(90)).await
    });
    // The supervisors' election (see the tasks store).
    let election = Key::new("_dprim/tasks/supervisor").unwrap();
    let leader = || async {
        let l = direct.elections().leader(&election).await.unwrap();
        l.map(|l| String::from_utf8_lossy(l.value.as_bytes()).into_owned())
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(leader().await.as_deref(), Some("s1"), "{kind}");
    proxy.isolate();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        leader().await.as_deref(),
        Some("s2"),
        "{kind}: the standby took over"
    );
    proxy.heal();
    let statuses = launching.await.unwrap();
    stop.send_replace(true);
    for handle in running {
        handle.await.unwrap().unwrap();
    }
    let mut problems = Vec::new();
    for (n, status) in statuses.iter().enumerate() {
        finished_once(n, status, &runs, &mut problems);
    }
    assert!(
        problems.is_empty(),
        "{kind}: with the leading supervisor partitioned:\n{}",
        problems.join("\n")
    );
    println!("{kind}: {TASKS} tasks each ran once while the leading supervisor was partitioned");
    let _ = std::fs::remove_dir_all(&work);
}

/// A client behind the proxy launches tasks through connection resets:
/// every launch that returned an id is recorded, and a launch whose outcome
/// is unknown names its task, which a read then finds or not.
async fn launches_through_cuts(kind: &str) {
    let (proxy, config) = proxied(kind, "launches").await;
    let direct = direct(kind, "launches").await;
    let cut_off = dprim_runtime::open_config(&config).await.unwrap();
    let launching = tokio::spawn(async move {
        let client = dprim_runtime::tasks::client::TasksClient::new(cut_off);
        let (mut launched, mut unknown, mut failed) = (Vec::new(), Vec::new(), 0);
        for _ in 0..300 {
            match client.launch(support::shell("true", 0.1)).await {
                Ok(id) => launched.push(id),
                Err(e) if e.kind() == ErrorKind::OutcomeUnknown => {
                    let task = e
                        .context()
                        .iter()
                        .find(|(name, _)| *name == "task")
                        .map(|(_, id)| dprim::TaskId(id.clone()))
                        .unwrap_or_else(|| {
                            panic!("a launch of unknown outcome names no task: {e}")
                        });
                    unknown.push(task);
                }
                Err(_) => failed += 1,
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (launched, unknown, failed)
    });
    let cuts = cut_until(&proxy, &launching).await;
    let (launched, unknown, failed) = launching.await.unwrap();
    let client = dprim_runtime::tasks::client::TasksClient::new(direct);
    for id in &launched {
        let status = client.status(id).await;
        assert!(status.is_ok(), "{kind}: launched task {id}: {status:?}");
    }
    let mut found = 0;
    for id in &unknown {
        match client.status(id).await {
            Ok(_) => found += 1,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => panic!("{kind}: reading task {id} of a launch of unknown outcome: {e}"),
        }
    }
    println!(
        "{kind}: {} launches recorded, {} of unknown outcome ({found} of them happened), {failed} failed, through {cuts} cuts",
        launched.len(),
        unknown.len()
    );
}

/// A lock waiter and a candidate behind the proxy are partitioned while
/// they wait: their session is lost, and each wait fails `SessionLost`
/// soon after, not at the end of its own timeout.
async fn partitioned_waiters(kind: &str) {
    let (proxy, config) = proxied(kind, "partition-waiters").await;
    let direct = direct(kind, "partition-waiters").await;
    let (lock, election) = (
        Key::new("the-lock").unwrap(),
        Key::new("the-election").unwrap(),
    );
    let holder = direct
        .sessions()
        .open(Duration::from_secs(10))
        .await
        .unwrap();
    let guard = direct
        .locks()
        .lock(&lock, &holder, Duration::from_secs(5))
        .await
        .unwrap();
    let leadership = direct
        .elections()
        .campaign(&election, Value::new(b"leader".to_vec()).unwrap(), &holder)
        .await
        .unwrap();
    let cut_off = dprim_runtime::open_config(&config).await.unwrap();
    let session = cut_off
        .sessions()
        .open(Duration::from_secs(3))
        .await
        .unwrap();
    let (b1, b2, s1, s2) = (
        cut_off.clone(),
        cut_off.clone(),
        session.clone(),
        session.clone(),
    );
    let waiting = tokio::spawn(async move {
        let r = b1.locks().lock(&lock, &s1, Duration::from_secs(60)).await;
        (r.map(|_| ()), Instant::now())
    });
    let campaigning = tokio::spawn(async move {
        let value = Value::new(b"waiting".to_vec()).unwrap();
        let r = b2.elections().campaign(&election, value, &s2).await;
        (r.map(|_| ()), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished() && !campaigning.is_finished());
    proxy.isolate();
    let isolated = Instant::now();
    for (what, handle) in [("lock", waiting), ("campaign", campaigning)] {
        let (result, ended) = tokio::time::timeout(Duration::from_secs(15), handle)
            .await
            .unwrap_or_else(|_| panic!("{kind}: a {what} waiting when its session was partitioned away still waits 15 s later"))
            .unwrap();
        let kind_of = result.as_ref().map_err(|e| e.kind());
        assert_eq!(
            kind_of,
            Err(ErrorKind::SessionLost),
            "{kind}: the partitioned {what}: {result:?}"
        );
        println!(
            "{kind}: the partitioned {what} failed SessionLost {:?} into the partition",
            ended - isolated
        );
    }
    proxy.heal();
    guard.unlock().await.unwrap();
    leadership.resign().await.unwrap();
    holder.close().await.unwrap();
}

/// A client behind the proxy watches task statuses while a supervisor and
/// an agent outside run tasks through connection resets: it sees every
/// task finish, or its watch ends with `Resync` and a reconciliation then
/// shows every task finished.
async fn task_watch_through_cuts(kind: &str) {
    use futures::StreamExt;
    let (proxy, config) = proxied(kind, "task-watch").await;
    let direct = direct(kind, "task-watch").await;
    let (stop, _) = tokio::sync::watch::channel(false);
    let work = support::temp_dir("cut", &format!("task-watch-{kind}"));
    let supervisor = support::supervisor(&direct, Duration::from_secs(60));
    let agent = support::agent_config(work.clone(), Duration::from_secs(5), Default::default());
    let running = [
        tokio::spawn(supervisor.run(support::stopped(&stop))),
        tokio::spawn(
            dprim_runtime::tasks::agent::Agent::new(direct.clone(), agent)
                .run(support::stopped(&stop)),
        ),
    ];
    let watcher = dprim_runtime::tasks::client::TasksClient::new(
        dprim_runtime::open_config(&config).await.unwrap(),
    );
    let mut updates = watcher.watch().await.unwrap();
    let launcher = dprim_runtime::tasks::client::TasksClient::new(direct.clone());
    let launching = tokio::spawn(async move {
        let mut ids = Vec::new();
        for _ in 0..20 {
            ids.push(
                launcher
                    .launch(support::shell("sleep 0.5", 0.1))
                    .await
                    .unwrap(),
            );
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        ids
    });
    let watching = tokio::spawn(async move {
        let mut finished = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while finished.len() < 20 && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(1), updates.next()).await {
                Ok(Some(Ok(s))) if s.state == dprim::tasks::TaskState::Finished => {
                    finished.insert(s.id);
                }
                Ok(Some(Ok(_))) | Err(_) => {}
                Ok(Some(Err(e))) if e.kind() == ErrorKind::Resync => return (finished, true),
                Ok(Some(Err(e))) => panic!("the task watch failed: {e}"),
                Ok(None) => panic!("the task watch ended without saying Resync"),
            }
        }
        (finished, false)
    });
    let cuts = cut_until(&proxy, &watching).await;
    let (finished, resynced) = watching.await.unwrap();
    let ids = launching.await.unwrap();
    if resynced {
        // Reconcile through the same client, as the error says.
        let statuses = until_done(&watcher, &ids, Duration::from_secs(60)).await;
        assert!(
            statuses
                .iter()
                .all(|s| s.state == dprim::tasks::TaskState::Finished),
            "{kind}: {statuses:?}"
        );
    } else {
        let wanted: BTreeSet<dprim::TaskId> = ids.iter().cloned().collect();
        assert_eq!(finished, wanted, "{kind}: the finishes seen");
    }
    stop.send_replace(true);
    for handle in running {
        handle.await.unwrap().unwrap();
    }
    println!(
        "{kind}: the task watch behind the proxy saw {} of {} tasks finish{} through {cuts} cuts",
        finished.len(),
        ids.len(),
        if resynced {
            " before saying Resync (reconciled after)"
        } else {
            ""
        }
    );
    let _ = std::fs::remove_dir_all(&work);
}

const TASKS: usize = 40;

/// Adds to `problems` unless task `n` ended FINISHED with exit code 0 and
/// ran once: its runs add a line each to the file `runs/<n>`.
fn finished_once(
    n: usize,
    status: &dprim::tasks::TaskStatus,
    runs: &std::path::Path,
    problems: &mut Vec<String>,
) {
    if status.state != dprim::tasks::TaskState::Finished || status.exit_code != Some(0) {
        problems.push(format!("task {n} ({}) ended {status:?}", status.id));
    }
    let ran = std::fs::read_to_string(runs.join(n.to_string())).unwrap_or_default();
    if ran.lines().count() != 1 {
        problems.push(format!(
            "task {n} ({}) ran {} times",
            status.id,
            ran.lines().count()
        ));
    }
}

/// The statuses of `ids` once all are done for good, or as they are after
/// `limit`.
async fn until_done(
    client: &dprim_runtime::tasks::client::TasksClient,
    ids: &[dprim::TaskId],
    limit: Duration,
) -> Vec<dprim::tasks::TaskStatus> {
    let deadline = Instant::now() + limit;
    loop {
        let mut statuses = Vec::new();
        for id in ids {
            statuses.push(client.status(id).await.unwrap());
        }
        if Instant::now() >= deadline || statuses.iter().all(|s| s.state.is_terminal()) {
            return statuses;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether task `n` of the cut-connection run is one that gets killed.
fn killed(n: usize) -> bool {
    n % 5 == 4
}

async fn tasks_through_cuts(kind: &str) {
    let (proxy, config) = proxied(kind, "tasks").await;
    let direct = direct(kind, "tasks").await;
    let (stop, _) = tokio::sync::watch::channel(false);
    let work = support::temp_dir("cut", &format!("tasks-{kind}"));
    let runs = work.join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    let mut running = Vec::new();
    let supervisor = dprim_runtime::open_config(&config).await.unwrap();
    let supervisor = support::supervisor(&supervisor, Duration::from_secs(120));
    running.push(tokio::spawn(supervisor.run(support::stopped(&stop))));
    for i in 0..3 {
        let backend = dprim_runtime::open_config(&config).await.unwrap();
        let mut agent = support::agent_config(
            work.join(format!("agent-{i}")),
            Duration::from_secs(5),
            Default::default(),
        );
        agent.id = format!("a{i}");
        let agent = dprim_runtime::tasks::agent::Agent::new(backend, agent);
        running.push(tokio::spawn(agent.run(support::stopped(&stop))));
    }
    let client = dprim_runtime::tasks::client::TasksClient::new(direct);
    let runs_dir = runs.clone();
    let launching = tokio::spawn(async move {
        let mut ids = Vec::new();
        for n in 0..TASKS {
            // Each run of task n adds a line to its own file. Some run long
            // enough to report RUNNING across a cut; those to be killed
            // would run for a minute.
            let pause = if killed(n) {
                "60".to_string()
            } else {
                format!("0.{}", n % 8)
            };
            let dir = runs_dir.display();
            let script =
                format!("echo started >> {dir}/{n}.started; sleep {pause}; echo ran >> {dir}/{n}");
            let spec = support::shell(&script, 0.5);
            ids.push(client.launch(spec).await.unwrap());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (n, id) in ids.iter().enumerate() {
            if killed(n) {
                client.kill(id, Duration::from_secs(1)).await.unwrap();
            }
        }
        until_done(&client, &ids, Duration::from_secs(150)).await
    });
    let cuts = cut_until(&proxy, &launching).await;
    let statuses = launching.await.unwrap();
    stop.send_replace(true);
    for handle in running {
        handle.await.unwrap().unwrap();
    }
    let mut problems = Vec::new();
    for (n, status) in statuses.iter().enumerate() {
        let started = std::fs::read_to_string(runs.join(format!("{n}.started")))
            .unwrap_or_default()
            .lines()
            .count();
        if started > 1 {
            problems.push(format!("task {n} ({}) started {started} times", status.id));
        }
        if killed(n) {
            if status.state != dprim::tasks::TaskState::Killed {
                problems.push(format!(
                    "task {n} ({}) was killed but ended {status:?}",
                    status.id
                ));
            }
            continue;
        }
        finished_once(n, status, &runs, &mut problems);
    }
    assert!(
        problems.is_empty(),
        "{kind}: through {cuts} cuts (sandboxes in {}):\n{}",
        work.display(),
        problems.join("\n")
    );
    println!(
        "{kind}: {TASKS} tasks, each started once and finished or was killed, through {cuts} cuts"
    );
    let _ = std::fs::remove_dir_all(&work);
}

fn backends() -> Vec<String> {
    match std::env::var("DPRIM_TEST_BACKENDS") {
        Ok(list) => list
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(String::from)
            .collect(),
        Err(_) => {
            eprintln!("DPRIM_TEST_BACKENDS is not set: the connection-cut tests did not run (scripts/test.sh runs them on etcd, zookeeper and nats)");
            Vec::new()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn histories_stay_linearizable_when_connections_are_cut() {
    for kind in backends() {
        race_through_cuts(&kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queues_lose_no_push_when_connections_are_cut() {
    for kind in backends() {
        queue_through_cuts(&kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn locks_stay_exclusive_when_connections_are_cut() {
    for kind in backends() {
        lock_through_cuts(&kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watches_miss_nothing_silently_when_connections_are_cut() {
    for kind in backends() {
        watch_through_cuts(&kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_run_once_and_finish_when_connections_are_cut() {
    for kind in backends() {
        tasks_through_cuts(&kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flushed_publishes_arrive_in_order_when_connections_are_cut() {
    for kind in backends() {
        pubsub_through_cuts(&kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn elections_stay_exclusive_when_connections_are_cut() {
    for kind in backends() {
        election_through_cuts(&kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_outlive_brief_cuts_and_never_outlive_their_keys() {
    for kind in backends() {
        sessions_through_cuts(&kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_holder_learns_its_loss_before_anyone_takes_over() {
    for kind in backends() {
        partitioned_holder(&kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_consumer_cannot_ack_a_message_delivered_again() {
    for kind in backends() {
        partitioned_consumer(&kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_serves_again_after_a_long_partition() {
    for kind in backends() {
        long_partition(&kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_agent_kills_its_replaced_run_after_the_heal() {
    for kind in backends() {
        partitioned_agent(&kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_run_once_when_the_leading_supervisor_is_partitioned() {
    for kind in backends() {
        partitioned_supervisor(&kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn launches_are_recorded_or_name_their_task_when_connections_are_cut() {
    for kind in backends() {
        launches_through_cuts(&kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_waiters_fail_session_lost() {
    for kind in backends() {
        partitioned_waiters(&kind).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn task_watches_miss_nothing_silently_when_connections_are_cut() {
    for kind in backends() {
        task_watch_through_cuts(&kind).await;
    }
}
