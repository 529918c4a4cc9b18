//! Queues on etcd.
//!
//! A message is a key under `!m/<order><random>` whose create revision is
//! its id; its value is the attempt count (4 bytes) plus the payload. The
//! order part is the store's revision read just before the push (16 hex
//! digits), so keys sort in push order: a push that starts after another
//! returned reads a revision at least that push's own. Pulls then read the
//! oldest messages as a plain key range with a limit, which etcd serves
//! without reading the rest of the queue (a sort by create revision makes
//! it read and sort every message, on every pull). An in-flight delivery
//! is a claim key under `!c/` holding `<visible-at unix ms>:<nonce>`, attached to the consumer's lease when the
//! pull names a session (so session loss deletes the claim and the message
//! is visible again at once). Claiming is one txn comparing both keys'
//! revisions, so two consumers never hold the same message. Visibility
//! deadlines are wall-clock milliseconds: consumers' clocks should agree to
//! well under a visibility timeout (NTP-level).
//!
//! A pull that waits and wakes to find nothing to take (other pulls
//! compete) waits on in the queue's line of waiting pulls, a key under
//! `!w/` on a lease of its own (see `wait_for_turn`): only the first
//! [`WATCHING_WAITERS`] in line watch the queue, so a push, claim or ack
//! wakes that many of them, not all of them.

use crate::layout::prefix_end;
use crate::line::{Line, Place as LinePlace};
use crate::Etcd;
use async_trait::async_trait;
use dprim::queue::{
    give_back, give_back_later, pull_to_the_end, Abandoned, Delivery, MessageId, PullOptions,
    Queue, QueueDepth, QueueOptions, Queues, Receipt,
};
use dprim::retry::RetryPolicy;
use dprim::{Error, Key, Result, Value};
use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, TxnOp, TxnOpResponse, WatchOptions};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Marks a claim that nobody holds (a nack with delay).
const NOBODY: &str = "-";

pub(crate) struct EtcdQueues {
    etcd: Etcd,
}

impl EtcdQueues {
    pub(crate) fn new(etcd: Etcd) -> EtcdQueues {
        EtcdQueues { etcd }
    }
}

#[async_trait]
impl Queues for EtcdQueues {
    async fn open(&self, name: &Key, options: Option<QueueOptions>) -> Result<Arc<dyn Queue>> {
        QueueOptions::default().dead_letter_for(name)?;
        let queue = EtcdQueue::new(self.etcd.clone(), name.clone());
        let effective = match options {
            Some(options) => {
                options.validate(name)?;
                let raw = options.encode(name)?;
                let key = self.etcd.layout.queue_options(name);
                self.etcd
                    .call("put", self.etcd.kv().put(key, raw, None))
                    .await?;
                options
            }
            None => queue.options().await?,
        };
        // Tell the dead-letter queue who feeds it, so using it sweeps dead
        // messages out of feeders nobody touches any more.
        let mut marker = self
            .etcd
            .layout
            .queue_feeders(&effective.dead_letter_for(name)?);
        marker.extend_from_slice(name.as_str().as_bytes());
        self.etcd
            .call("put", self.etcd.kv().put(marker, Vec::new(), None))
            .await?;
        Ok(queue)
    }
}

struct EtcdQueue {
    /// This queue, for a pull that outlives its caller (see `pull`).
    me: Weak<EtcdQueue>,
    etcd: Etcd,
    name: Key,
    messages: Vec<u8>,
    claims: Vec<u8>,
    /// The pulls waiting for a message (see `wait_for_turn`).
    waiters: Line,
}

/// Waiting pulls that watch the queue itself (see `wait_for_turn`).
const WATCHING_WAITERS: usize = 2;

/// The TTL of the lease a waiting pull's place is on (the pull's wait, if
/// shorter, plus 2 s): the place of a pull whose process died goes within
/// it, and a pull that waits longer takes a new place when its first one
/// expires.
const WAITER_TTL: Duration = Duration::from_secs(60);

/// A waiting pull's place in line, on a lease of its own.
struct Waiting {
    place: LinePlace,
    _lease: WaiterLease,
}

/// The lease of a waiting pull's place, revoked (removing the place) in
/// the background however the pull ends; if that fails, it runs out.
struct WaiterLease {
    etcd: Etcd,
    lease: i64,
}

impl Drop for WaiterLease {
    fn drop(&mut self) {
        let (etcd, lease) = (self.etcd.clone(), self.lease);
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let revoked = RetryPolicy::default()
                    .run(|| async {
                        let mut leases = etcd.client.lease_client();
                        etcd.call("lease revoke", leases.revoke(lease))
                            .await
                            .map(|_| ())
                    })
                    .await;
                if let Err(e) = revoked {
                    tracing::debug!(error = %e, "revoking a waiting pull's lease failed; it runs out on its own");
                }
            });
        }
    }
}

/// How a waiting pull's turn came.
#[derive(Debug, PartialEq, Eq)]
enum Turn {
    /// It is to watch the queue from what it last read.
    Watching,
    /// It waited in line and is now to watch the queue, or its time is
    /// up: it reads the queue afresh first.
    Moved,
    /// Its place is gone (its lease expired): it reads the queue again and
    /// takes a new place.
    OutOfLine,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

struct Claim {
    visible_at: i64,
    nonce: String,
}

fn parse_claim(kv: &KeyValue) -> Claim {
    let text = String::from_utf8_lossy(kv.value());
    let (at, nonce) = text.split_once(':').unwrap_or(("0", NOBODY));
    Claim {
        visible_at: at.parse().unwrap_or(0),
        nonce: nonce.to_string(),
    }
}

fn split_message(raw: &[u8]) -> (u32, &[u8]) {
    if raw.len() < 4 {
        return (0, raw);
    }
    let attempts = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
    (attempts, &raw[4..])
}

fn join_message(attempts: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 4);
    v.extend_from_slice(&attempts.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// The answers to a txn's reads, in order.
fn gets(resp: etcd_client::TxnResponse) -> impl Iterator<Item = etcd_client::GetResponse> {
    resp.op_responses().into_iter().filter_map(|r| match r {
        TxnOpResponse::Get(g) => Some(g),
        _ => None,
    })
}

/// Every key under `prefix`, in key order (for messages: push order).
fn get_range(prefix: &[u8]) -> GetOptions {
    GetOptions::new().with_range(prefix_end(prefix))
}

/// Messages a pull reads at a time, oldest first, keys only: a pull looks
/// at the oldest messages only, and neither the backlog nor the payloads
/// of held messages travel to each pull (only the one it takes).
const PULL_PAGE: i64 = 64;

/// Which messages a snapshot reads.
#[derive(Clone, Copy)]
enum Messages {
    /// Every message's key and metadata, without values.
    KeysOnly,
    /// The oldest ones' keys and metadata, and the oldest one's value.
    Oldest(i64),
}

/// A consistent snapshot of one queue.
struct Snapshot {
    messages: Vec<KeyValue>,
    /// More messages follow those read (`Messages::Oldest`).
    more: bool,
    /// The oldest message with its value (`Messages::Oldest`): usually the
    /// one a pull takes.
    oldest: Option<KeyValue>,
    claims: HashMap<Vec<u8>, KeyValue>,
    options: QueueOptions,
    revision: i64,
}

impl EtcdQueue {
    fn new(etcd: Etcd, name: Key) -> Arc<EtcdQueue> {
        let messages = etcd.layout.queue_messages(&name);
        let claims = etcd.layout.queue_claims(&name);
        let waiters = Line::new(etcd.clone(), etcd.layout.queue_waiters(&name));
        Arc::new_cyclic(|me| EtcdQueue {
            me: me.clone(),
            etcd,
            name,
            messages,
            claims,
            waiters,
        })
    }

    fn this(&self) -> Result<Arc<EtcdQueue>> {
        self.me
            .upgrade()
            .ok_or_else(|| Error::unexpected("an etcd queue was used after it was dropped"))
    }

    fn claim_key(&self, message_key: &[u8]) -> Vec<u8> {
        let mut k = self.claims.clone();
        k.extend_from_slice(&message_key[self.messages.len()..]);
        k
    }

    fn message_key(&self, suffix: &str) -> Vec<u8> {
        let mut k = self.messages.clone();
        k.extend_from_slice(suffix.as_bytes());
        k
    }

    /// The queue's options alone (the defaults if it was never configured).
    async fn options(&self) -> Result<QueueOptions> {
        let key = self.etcd.layout.queue_options(&self.name);
        let resp = self.etcd.call("get", self.etcd.kv().get(key, None)).await?;
        Ok(match resp.kvs().first() {
            Some(kv) => QueueOptions::decode(kv.value(), &self.name),
            None => QueueOptions::default(),
        })
    }

    async fn snapshot(&self, which: Messages) -> Result<Snapshot> {
        let messages = match which {
            Messages::KeysOnly => get_range(&self.messages).with_keys_only(),
            Messages::Oldest(n) => get_range(&self.messages).with_keys_only().with_limit(n),
        };
        let mut reads = vec![
            TxnOp::get(self.messages.clone(), Some(messages)),
            TxnOp::get(self.claims.clone(), Some(get_range(&self.claims))),
            TxnOp::get(self.etcd.layout.queue_options(&self.name), None),
        ];
        if let Messages::Oldest(_) = which {
            reads.push(TxnOp::get(
                self.messages.clone(),
                Some(get_range(&self.messages).with_limit(1)),
            ));
        }
        let txn = etcd_client::Txn::new().and_then(reads);
        let resp = self.etcd.call("txn", self.etcd.kv().txn(txn)).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut gets = gets(resp);
        let (messages, more) = gets
            .next()
            .map(|g| (g.kvs().to_vec(), g.more()))
            .unwrap_or_default();
        let claims = gets
            .next()
            .map(|g| {
                g.kvs()
                    .iter()
                    .map(|kv| (kv.key()[self.claims.len()..].to_vec(), kv.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let options = gets
            .next()
            .and_then(|g| {
                g.kvs()
                    .first()
                    .map(|kv| QueueOptions::decode(kv.value(), &self.name))
            })
            .unwrap_or_else(|| QueueOptions {
                dead_letter: self.name.join("dead-letter").ok(),
                ..QueueOptions::default()
            });
        let oldest = gets.next().and_then(|g| g.kvs().first().cloned());
        Ok(Snapshot {
            messages,
            more,
            oldest,
            claims,
            options,
            revision,
        })
    }

    /// The keys of the `n` oldest messages after the message `after`, as
    /// of `revision`, and whether more follow.
    async fn messages_after(
        &self,
        after: &[u8],
        revision: i64,
        n: i64,
    ) -> Result<(Vec<KeyValue>, bool)> {
        let mut from = after.to_vec();
        from.push(0);
        let options = get_range(&self.messages)
            .with_keys_only()
            .with_revision(revision)
            .with_limit(n);
        let resp = self
            .etcd
            .call("get", self.etcd.kv().get(from, Some(options)))
            .await?;
        Ok((resp.kvs().to_vec(), resp.more()))
    }

    /// One message with its value, if it is still there.
    async fn read_message(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        let resp = self
            .etcd
            .call("get", self.etcd.kv().get(key.to_vec(), None))
            .await?;
        Ok(resp.kvs().first().cloned())
    }

    /// A new message key of queue `messages` (its `!m/` prefix), after
    /// every message whose push returned before this call.
    async fn new_message_key(&self, messages: &[u8]) -> Result<Vec<u8>> {
        let revision = self.etcd.current_revision().await?;
        let mut key = messages.to_vec();
        key.extend_from_slice(
            format!("{:016x}{:016x}", revision, rand::random::<u64>()).as_bytes(),
        );
        Ok(key)
    }

    /// Moves a message to the dead-letter queue if nobody changed it meanwhile.
    async fn dead_letter(
        &self,
        options: &QueueOptions,
        msg: &KeyValue,
        claim: Option<&KeyValue>,
    ) -> Result<bool> {
        let dlq = options.dead_letter_for(&self.name)?;
        let (_, payload) = split_message(msg.value());
        let new_key = self
            .new_message_key(&self.etcd.layout.queue_messages(&dlq))
            .await?;
        let claim_key = self.claim_key(msg.key());
        let claim_rev = claim.map_or(0, |c| c.mod_revision());
        let txn = etcd_client::Txn::new()
            .when([
                Compare::mod_revision(msg.key().to_vec(), CompareOp::Equal, msg.mod_revision()),
                Compare::mod_revision(claim_key.clone(), CompareOp::Equal, claim_rev),
            ])
            .and_then([
                TxnOp::delete(msg.key().to_vec(), None),
                TxnOp::delete(claim_key, None),
                TxnOp::put(new_key, join_message(0, payload), None),
            ]);
        Ok(self
            .etcd
            .call("txn", self.etcd.kv().txn(txn))
            .await?
            .succeeded())
    }

    /// Dead-letters every visible message of each feeding queue that used
    /// up its attempts; returns the earliest moment a feeder's in-flight
    /// delivery may time out (and so need sweeping).
    async fn sweep_feeders(&self) -> Result<Option<i64>> {
        let prefix = self.etcd.layout.queue_feeders(&self.name);
        let options = GetOptions::new()
            .with_range(prefix_end(&prefix))
            .with_keys_only();
        let resp = self
            .etcd
            .call("get", self.etcd.kv().get(prefix.clone(), Some(options)))
            .await?;
        let mut next: Option<i64> = None;
        for kv in resp.kvs() {
            let Some(feeder) = std::str::from_utf8(&kv.key()[prefix.len()..])
                .ok()
                .and_then(|k| Key::new(k).ok())
            else {
                continue;
            };
            let queue = EtcdQueue::new(self.etcd.clone(), feeder);
            // Keys only: only a message delivered `max_attempts` times can
            // be dead, and every delivery rewrites its message (the attempt
            // count is in the value), so a message whose key was written
            // fewer times needs no look at its value.
            let snap = queue.snapshot(Messages::KeysOnly).await?;
            if snap.options.dead_letter_for(&queue.name).ok().as_ref() != Some(&self.name) {
                continue;
            }
            let now = now_ms();
            for msg in &snap.messages {
                let claim = snap.claims.get(&msg.key()[queue.messages.len()..]);
                match claim.map(parse_claim) {
                    Some(c) if c.visible_at > now => {
                        next = Some(next.map_or(c.visible_at, |n| n.min(c.visible_at)));
                    }
                    _ if msg.version() - 1 < i64::from(snap.options.max_attempts) => {}
                    _ => {
                        let Some(msg) = queue.read_message(msg.key()).await? else {
                            continue;
                        };
                        if split_message(msg.value()).0 >= snap.options.max_attempts {
                            queue.dead_letter(&snap.options, &msg, claim).await?;
                        }
                    }
                }
            }
        }
        Ok(next)
    }

    /// One pass over the queue: claims the first visible message.
    async fn try_pull(
        &self,
        options: &PullOptions,
    ) -> Result<(Option<Delivery>, Option<i64>, i64)> {
        let mut next_change = self.sweep_feeders().await?;
        let mut snap = self.snapshot(Messages::Oldest(PULL_PAGE)).await?;
        let now = now_ms();
        let (mut page, mut more) = (std::mem::take(&mut snap.messages), snap.more);
        loop {
            for msg in &page {
                let suffix = &msg.key()[self.messages.len()..];
                let claim = snap.claims.get(suffix);
                if let Some(c) = claim.map(parse_claim) {
                    if c.visible_at > now {
                        next_change =
                            Some(next_change.map_or(c.visible_at, |n| n.min(c.visible_at)));
                        continue;
                    }
                }
                // The page holds keys only: the value comes with the
                // snapshot for the oldest message, else with one read (the
                // claim below is guarded by the revision read with it).
                let fetched;
                let msg = match &snap.oldest {
                    Some(o) if o.key() == msg.key() && o.mod_revision() == msg.mod_revision() => o,
                    _ => match self.read_message(msg.key()).await? {
                        Some(kv) => {
                            fetched = kv;
                            &fetched
                        }
                        // Acked or dead-lettered meanwhile.
                        None => continue,
                    },
                };
                let (attempts, payload) = split_message(msg.value());
                if attempts >= snap.options.max_attempts {
                    self.dead_letter(&snap.options, msg, claim).await?;
                    continue;
                }
                let nonce = format!("{:016x}", rand::random::<u64>());
                let claim_key = self.claim_key(msg.key());
                let claim_rev = claim.map_or(0, |c| c.mod_revision());
                let visible_at = now + options.visibility_timeout.as_millis() as i64;
                let put = options
                    .session
                    .as_ref()
                    .map(|s| etcd_client::PutOptions::new().with_lease(s.id().0 as i64));
                let txn = etcd_client::Txn::new()
                    .when([
                        Compare::mod_revision(
                            msg.key().to_vec(),
                            CompareOp::Equal,
                            msg.mod_revision(),
                        ),
                        Compare::mod_revision(claim_key.clone(), CompareOp::Equal, claim_rev),
                    ])
                    .and_then([
                        TxnOp::put(
                            msg.key().to_vec(),
                            join_message(attempts + 1, payload),
                            None,
                        ),
                        TxnOp::put(claim_key, format!("{visible_at}:{nonce}"), put),
                    ]);
                let claimed = match self.etcd.call("txn", self.etcd.kv().txn(txn)).await {
                    Ok(response) => response.succeeded(),
                    Err(e) => {
                        // The claim may have been made with its answer
                        // lost: nobody would hold it until it timed out.
                        if let (false, Ok(queue)) = (e.is_not_applied(), self.this()) {
                            let suffix = String::from_utf8_lossy(suffix);
                            give_back_later(queue, Receipt(format!("{suffix}.{nonce}")));
                        }
                        return Err(e);
                    }
                };
                if claimed {
                    let suffix = String::from_utf8_lossy(suffix).into_owned();
                    return Ok((
                        Some(Delivery {
                            id: MessageId(msg.create_revision() as u64),
                            payload: Value::new(payload.to_vec())?,
                            attempt: attempts + 1,
                            receipt: Receipt(format!("{suffix}.{nonce}")),
                        }),
                        None,
                        snap.revision,
                    ));
                }
                // Another consumer won this one; try the next.
            }
            // Every message of the page is held (or was just taken): the next
            // page, as of the same revision.
            match page.last() {
                Some(last) if more => {
                    (page, more) = self
                        .messages_after(last.key(), snap.revision, PULL_PAGE)
                        .await?;
                }
                _ => break,
            }
        }
        Ok((None, next_change, snap.revision))
    }

    fn parse_receipt(&self, receipt: &Receipt) -> Result<(String, String)> {
        receipt
            .0
            .split_once('.')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "`{receipt}` is not a receipt of the etcd backend; pass the receipt printed by pull"
                ))
            })
    }

    /// The message and claim of a receipt that is still current.
    async fn current(&self, receipt: &Receipt) -> Result<Option<(KeyValue, KeyValue)>> {
        let (suffix, nonce) = self.parse_receipt(receipt)?;
        let msg_key = self.message_key(&suffix);
        let claim_key = self.claim_key(&msg_key);
        let txn = etcd_client::Txn::new()
            .and_then([TxnOp::get(msg_key, None), TxnOp::get(claim_key, None)]);
        let resp = self.etcd.call("txn", self.etcd.kv().txn(txn)).await?;
        let mut gets = gets(resp);
        let msg = gets.next().and_then(|g| g.kvs().first().cloned());
        let claim = gets.next().and_then(|g| g.kvs().first().cloned());
        match (msg, claim) {
            (None, _) => Ok(None),
            (Some(m), Some(c)) => {
                let parsed = parse_claim(&c);
                if parsed.nonce == nonce && parsed.visible_at > now_ms() {
                    Ok(Some((m, c)))
                } else {
                    Err(self.stale(receipt))
                }
            }
            (Some(_), None) => Err(self.stale(receipt)),
        }
    }

    fn stale(&self, receipt: &Receipt) -> Error {
        Error::conflict(format!(
            "delivery {receipt} of queue `{}` expired and the message was made visible again; it will be processed again",
            self.name
        ))
    }

    async fn guarded(&self, msg: &KeyValue, claim: &KeyValue, ops: Vec<TxnOp>) -> Result<bool> {
        let txn = etcd_client::Txn::new()
            .when([
                Compare::mod_revision(msg.key().to_vec(), CompareOp::Equal, msg.mod_revision()),
                Compare::mod_revision(claim.key().to_vec(), CompareOp::Equal, claim.mod_revision()),
            ])
            .and_then(ops);
        Ok(self
            .etcd
            .call("txn", self.etcd.kv().txn(txn))
            .await?
            .succeeded())
    }

    /// The pull itself (see `pull`): stops waiting when its caller left.
    async fn pull_unless_abandoned(
        &self,
        options: PullOptions,
        abandoned: Abandoned,
    ) -> Result<Option<Delivery>> {
        let deadline = tokio::time::Instant::now() + options.wait;
        // This pull's place among the waiting ones; left (in the
        // background) however the pull ends.
        let mut waiting: Option<Waiting> = None;
        let mut waited = false;
        loop {
            if abandoned.is_set() {
                return Ok(None);
            }
            let (delivery, next_change, revision) = self.try_pull(&options).await?;
            if delivery.is_some() {
                return Ok(delivery);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let until = match next_change {
                Some(at) => {
                    let wait = Duration::from_millis((at - now_ms()).max(0) as u64);
                    (now + wait).min(deadline)
                }
                None => deadline,
            };
            // A pull takes a place only once it woke and found nothing to
            // take: other pulls compete for the queue's messages then. A
            // lone consumer never pays for the place (a lease and a key).
            if waiting.is_none() && waited {
                waiting = self.join_waiters(deadline - now).await;
            }
            waited = true;
            let place = waiting.as_ref().map(|w| &w.place);
            tokio::select! {
                // A waiter not watching the queue has no use for the
                // moment a held message becomes visible: those watching do.
                turn = self.wait_for_turn(place, deadline) => match turn {
                    // Changes since the pull's read end this wait at once.
                    Turn::Watching => self.wait_for_change(revision, until).await,
                    Turn::Moved => {}
                    Turn::OutOfLine => waiting = None,
                },
                _ = abandoned.wait() => return Ok(None),
            }
        }
    }

    /// Takes a place among the waiting pulls, on a lease that ends with
    /// the pull's wait (at most [`WAITER_TTL`]); `None` if that fails, and
    /// the pull then watches the queue itself.
    async fn join_waiters(&self, wait: Duration) -> Option<Waiting> {
        let joined = async {
            let ttl = wait.min(WAITER_TTL).as_secs() as i64 + 2;
            let mut leases = self.etcd.client.lease_client();
            let lease = self
                .etcd
                .call("lease grant", leases.grant(ttl, None))
                .await?
                .id();
            // From here on, the place goes with the lease however this ends.
            let lease = WaiterLease {
                etcd: self.etcd.clone(),
                lease,
            };
            let place = self.waiters.join_on_lease(lease.lease, Vec::new()).await?;
            Ok::<_, Error>(Waiting {
                place,
                _lease: lease,
            })
        };
        match joined.await {
            Ok(waiting) => Some(waiting),
            Err(e) => {
                tracing::debug!(error = %e, queue = %self.name, "joining the waiting pulls failed; watching the queue directly");
                None
            }
        }
    }

    /// Waits until `place` is among the first [`WATCHING_WAITERS`] waiting
    /// pulls, which are the ones that watch the queue, or until `deadline`.
    ///
    /// The others each watch the (at most) [`WATCHING_WAITERS`] places
    /// just ahead of them, so a push, claim or ack wakes those few pulls
    /// instead of every waiting one (the herd effect), and a waiter that
    /// leaves wakes at most that many behind it. More than one watches the
    /// queue so that a waiter whose process died, whose place stays until
    /// its lease expires, does not stop the pulls behind it.
    async fn wait_for_turn(
        &self,
        place: Option<&LinePlace>,
        deadline: tokio::time::Instant,
    ) -> Turn {
        let Some(place) = place else {
            return Turn::Watching;
        };
        // A pull that waited in line reads the queue afresh before it
        // watches it: what it last read is old.
        let settled = |in_line: bool| if in_line { Turn::Moved } else { Turn::Watching };
        let mut in_line = false;
        loop {
            let (ahead, read) = match self.waiters.nearest_ahead(place, WATCHING_WAITERS).await {
                Ok(Some(found)) => found,
                Ok(None) => return Turn::OutOfLine,
                Err(_) => return settled(in_line),
            };
            if ahead.len() < WATCHING_WAITERS {
                return settled(in_line);
            }
            in_line = true;
            tokio::select! {
                gone = self.waiters.wait_any_deleted(&ahead, read + 1) => {
                    if gone.is_err() {
                        return Turn::Moved;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Turn::Moved,
            }
        }
    }

    async fn wait_for_change(&self, after: i64, until: tokio::time::Instant) {
        let mut prefix = self.etcd.layout.queue_options(&self.name);
        // `<queue>/!options` -> `<queue>/!`: covers messages, claims,
        // options and feeders, up to the line of waiting pulls, whose
        // comings and goings are no change to the queue.
        prefix.truncate(prefix.len() - "options".len());
        let mut client = self.etcd.client.watch_client();
        let options = WatchOptions::new()
            .with_range(self.etcd.layout.queue_waiters(&self.name))
            .with_start_revision(after + 1);
        let watch = async {
            if let Ok(mut stream) = client.watch(prefix.clone(), Some(options)).await {
                loop {
                    match stream.message().await {
                        Ok(Some(r)) if r.events().is_empty() && !r.canceled() => continue,
                        _ => return,
                    }
                }
            }
        };
        tokio::select! {
            _ = watch => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }
}

#[async_trait]
impl Queue for EtcdQueue {
    fn name(&self) -> &Key {
        &self.name
    }

    async fn push(&self, payload: Value) -> Result<MessageId> {
        let key = self.new_message_key(&self.messages).await?;
        let resp = self
            .etcd
            .call(
                "put",
                self.etcd
                    .kv()
                    .put(key, join_message(0, payload.as_bytes()), None),
            )
            .await?;
        Ok(MessageId(resp.header().map_or(0, |h| h.revision()) as u64))
    }

    async fn pull(&self, options: PullOptions) -> Result<Option<Delivery>> {
        if let Some(s) = &options.session {
            s.check()?;
        }
        let (this, back) = (self.this()?, self.this()?);
        pull_to_the_end(
            move |abandoned| async move { this.pull_unless_abandoned(options, abandoned).await },
            Box::new(move |d| Box::pin(async move { give_back(back.as_ref(), &d.receipt).await })),
        )
        .await
    }

    async fn ack(&self, receipt: &Receipt) -> Result<()> {
        let Some((msg, claim)) = self.current(receipt).await? else {
            return Ok(());
        };
        let ops = vec![
            TxnOp::delete(msg.key().to_vec(), None),
            TxnOp::delete(claim.key().to_vec(), None),
        ];
        if self.guarded(&msg, &claim, ops).await? {
            Ok(())
        } else {
            Err(self.stale(receipt))
        }
    }

    async fn nack(&self, receipt: &Receipt, delay: Duration) -> Result<()> {
        let Some((msg, claim)) = self.current(receipt).await? else {
            return Err(Error::conflict(format!(
                "delivery {receipt} of queue `{}` is no longer held (acked or dead-lettered)",
                self.name
            )));
        };
        let (attempts, _) = split_message(msg.value());
        let snap_options = self.options().await?;
        if attempts >= snap_options.max_attempts {
            return if self.dead_letter(&snap_options, &msg, Some(&claim)).await? {
                Ok(())
            } else {
                Err(self.stale(receipt))
            };
        }
        let ops = if delay.is_zero() {
            vec![TxnOp::delete(claim.key().to_vec(), None)]
        } else {
            let at = now_ms() + delay.as_millis() as i64;
            vec![TxnOp::put(
                claim.key().to_vec(),
                format!("{at}:{NOBODY}"),
                None,
            )]
        };
        if self.guarded(&msg, &claim, ops).await? {
            Ok(())
        } else {
            Err(self.stale(receipt))
        }
    }

    async fn extend(&self, receipt: &Receipt, visibility_timeout: Duration) -> Result<()> {
        let Some((msg, claim)) = self.current(receipt).await? else {
            return Err(Error::conflict(format!(
                "delivery {receipt} of queue `{}` is no longer held (acked or dead-lettered)",
                self.name
            )));
        };
        let nonce = parse_claim(&claim).nonce;
        let at = now_ms() + visibility_timeout.as_millis() as i64;
        let lease = claim.lease();
        let put = (lease != 0).then(|| etcd_client::PutOptions::new().with_lease(lease));
        let ops = vec![TxnOp::put(
            claim.key().to_vec(),
            format!("{at}:{nonce}"),
            put,
        )];
        if self.guarded(&msg, &claim, ops).await? {
            Ok(())
        } else {
            Err(self.stale(receipt))
        }
    }

    async fn depth(&self) -> Result<QueueDepth> {
        self.sweep_feeders().await?;
        // Messages are counted, not read: a claim never outlives its
        // message (ack and dead-lettering delete both in one txn; a lease
        // removes only claims), so the held claims are the in-flight ones.
        let txn = etcd_client::Txn::new().and_then([
            TxnOp::get(
                self.messages.clone(),
                Some(get_range(&self.messages).with_count_only()),
            ),
            TxnOp::get(self.claims.clone(), Some(get_range(&self.claims))),
        ]);
        let resp = self.etcd.call("txn", self.etcd.kv().txn(txn)).await?;
        let mut gets = gets(resp);
        let total = gets.next().map_or(0, |g| g.count().max(0) as u64);
        let now = now_ms();
        let held = gets.next().map_or(0, |g| {
            g.kvs()
                .iter()
                .map(parse_claim)
                .filter(|c| c.visible_at > now && c.nonce != NOBODY)
                .count() as u64
        });
        let in_flight = held.min(total);
        Ok(QueueDepth {
            ready: total - in_flight,
            in_flight,
        })
    }
}
