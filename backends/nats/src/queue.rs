//! Queues on a JetStream work-queue stream (`DPRIM_QUEUES`), one subject and
//! one durable pull consumer per queue.
//!
//! - push = a JetStream publish; the stream sequence is the message id and
//!   the consumer delivers in stream order, redeliveries first (FIFO).
//! - pull = a fetch of one message; `delivered` is the attempt. The
//!   delivery's visibility timeout is a NAK with that delay, which keeps the
//!   message pending (invisible) and has the server redeliver it when the
//!   delay ends; `extend` is another delayed NAK, `nack(delay)` too.
//! - A claim record `<ns>.=q.<queue>.=c.<seq>` in the bucket names the
//!   current delivery (attempt, visible-until, nonce, ack subject), so any
//!   client can ack with the receipt and a stale receipt is a `Conflict`.
//!   Visible-until is wall-clock milliseconds: clients' clocks must agree to
//!   well under a visibility timeout.
//! - Dead-lettering is dprim's (the consumer's max-deliver is unlimited, as
//!   `max_attempts` may change): a message delivered more than
//!   `max_attempts` times, or nacked on its last attempt, is republished to
//!   the dead-letter queue's subject (deduplicated by message id) and
//!   deleted from the queue. A dead-letter queue sweeps the queues that feed
//!   it when it is pulled or measured, so dead messages reach it even when
//!   nobody uses the original queue again.
//! - A pull made with a session releases its delivery at once when that
//!   session ends: the pulling process does it when it learns of the end
//!   (close, loss), and the claim is also an owned record of the session
//!   (indexed like an ephemeral key), so when the session's heartbeat
//!   vanishes every client's reaper releases it too, which brings back the
//!   deliveries of a crashed or partitioned consumer.

use crate::layout::hash;
use crate::store::{owned, Record};
use crate::Nats;
use async_nats::jetstream::consumer::pull::{BatchConfig, Config as PullConfig};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::AckKind;
use async_nats::HeaderMap;
use async_nats::StatusCode;
use async_trait::async_trait;
use bytes::Bytes;
use dprim::queue::{
    give_back, pull_to_the_end, Abandoned, Delivery, MessageId, PullOptions, Queue, QueueDepth,
    QueueOptions, Queues, Receipt,
};
use dprim::{Error, ErrorKind, Key, Result, Session, Value};
use futures::StreamExt;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// The consumer's AckWait: a pull with exactly this visibility timeout (the
/// default) needs no extra NAK.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Marks a claim nobody holds (nacked, released).
const NOBODY: &str = "-";
/// How long a "this queue has no feeders" answer is trusted.
const FEEDER_CHECK: Duration = Duration::from_secs(1);

pub(crate) struct NatsQueues {
    nats: Nats,
}

impl NatsQueues {
    pub(crate) fn new(nats: Nats) -> NatsQueues {
        NatsQueues { nats }
    }
}

async fn read_options(nats: &Nats, name: &Key) -> Result<QueueOptions> {
    Ok(match nats.last(&nats.layout.queue_options(name)).await? {
        Some(r) => QueueOptions::decode(&r.payload, name),
        None => QueueOptions {
            dead_letter: name.join("dead-letter").ok(),
            ..QueueOptions::default()
        },
    })
}

#[async_trait]
impl Queues for NatsQueues {
    async fn open(&self, name: &Key, options: Option<QueueOptions>) -> Result<Arc<dyn Queue>> {
        QueueOptions::default().dead_letter_for(name)?;
        let effective = match options {
            Some(options) => {
                options.validate(name)?;
                let raw = options.encode(name)?;
                self.nats
                    .write(
                        &self.nats.layout.queue_options(name),
                        Bytes::from(raw),
                        HeaderMap::new(),
                        None,
                    )
                    .await?;
                options
            }
            None => read_options(&self.nats, name).await?,
        };
        // Tell the dead-letter queue who feeds it.
        let dlq = effective.dead_letter_for(name)?;
        self.nats
            .write(
                &self.nats.layout.queue_feeder(&dlq, name),
                Bytes::from(name.as_str().to_string()),
                HeaderMap::new(),
                None,
            )
            .await?;
        Ok(NatsQueue::open(self.nats.clone(), name.clone()).await?)
    }
}

pub(crate) struct NatsQueue {
    /// This queue, for a pull that outlives its caller (see `pull`).
    me: Weak<NatsQueue>,
    nats: Nats,
    name: Key,
    subject: String,
    consumer: PullConsumer,
    /// When the feeders were last found absent.
    no_feeders_at: Mutex<Option<Instant>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The current delivery of one message.
#[derive(Clone)]
struct Claim {
    attempt: u64,
    visible_at: i64,
    nonce: String,
    reply: String,
}

impl Claim {
    fn encode(&self) -> Bytes {
        Bytes::from(format!(
            "{} {} {} {}",
            self.attempt, self.visible_at, self.nonce, self.reply
        ))
    }

    fn decode(raw: &[u8]) -> Option<Claim> {
        let text = std::str::from_utf8(raw).ok()?;
        let mut parts = text.splitn(4, ' ');
        Some(Claim {
            attempt: parts.next()?.parse().ok()?,
            visible_at: parts.next()?.parse().ok()?,
            nonce: parts.next()?.to_string(),
            reply: parts.next()?.to_string(),
        })
    }

    fn held_by(&self, nonce: &str) -> bool {
        self.nonce == nonce && self.visible_at > now_ms()
    }
}

impl NatsQueue {
    async fn open(nats: Nats, name: Key) -> Result<Arc<NatsQueue>> {
        let subject = nats.layout.queue_messages(&name);
        let durable = format!("q{}", hash(&subject));
        let config = PullConfig {
            durable_name: Some(durable.clone()),
            filter_subject: subject.clone(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_deliver: -1,
            max_ack_pending: 100_000,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        };
        let consumer = nats
            .call(
                "open queue consumer",
                nats.queues.get_or_create_consumer(&durable, config),
            )
            .await?;
        Ok(Arc::new_cyclic(|me| NatsQueue {
            me: me.clone(),
            nats,
            name,
            subject,
            consumer,
            no_feeders_at: Mutex::new(None),
        }))
    }

    fn this(&self) -> Result<Arc<NatsQueue>> {
        self.me
            .upgrade()
            .ok_or_else(|| Error::unexpected("a NATS queue was used after it was dropped"))
    }

    fn claim_subject(&self, seq: u64) -> String {
        self.nats.layout.queue_claim(&self.name, seq)
    }

    /// Drops a claim that no longer holds a delivery from its session's
    /// index, so a long session's index does not grow with every message it
    /// pulled. A failure only leaves the entry until the session ends.
    async fn unindex(&self, held: &Held) {
        if let Some(owner) = held.owner {
            let entry = self
                .nats
                .layout
                .index_entry(owner, &self.claim_subject(held.seq));
            if let Err(e) = self.nats.purge(&entry, None).await {
                tracing::debug!(error = %e, "dropping a claim from its session's index failed; the session's end will");
            }
        }
    }

    fn parse_receipt(&self, receipt: &Receipt) -> Result<(u64, String)> {
        receipt
            .0
            .split_once('.')
            .and_then(|(s, n)| Some((s.parse().ok()?, n.to_string())))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "`{receipt}` is not a receipt of the nats backend; pass the receipt printed by pull"
                ))
            })
    }

    fn stale(&self, receipt: &Receipt) -> Error {
        Error::conflict(format!(
            "delivery {receipt} of queue `{}` expired or was given back, and the message may be delivered again",
            self.name
        ))
    }

    /// Fetches one message, waiting up to `wait`; `None` if none came, or
    /// if `abandoned` was set while the request waited.
    ///
    /// The request's inbox is this pull's own subscription, so that giving
    /// up loses nothing: the subscription is drained (unsubscribed, then a
    /// round trip), which takes every message the server sent before it
    /// dropped the request, and each is given back. Just dropping the
    /// subscription would lose one in flight (invisible for AckWait);
    /// keeping the request until it expires would let it take messages
    /// arriving meanwhile, costing each an attempt.
    async fn fetch(
        &self,
        wait: Duration,
        abandoned: &Abandoned,
    ) -> Result<Option<async_nats::jetstream::Message>> {
        let client = &self.nats.client;
        let inbox = async_nats::Subject::from(client.new_inbox());
        let mut inbox_messages = self
            .nats
            .call("pull", client.subscribe(inbox.clone()))
            .await?;
        let request = if wait < Duration::from_millis(10) {
            BatchConfig {
                batch: 1,
                no_wait: true,
                ..Default::default()
            }
        } else {
            BatchConfig {
                batch: 1,
                expires: Some(wait),
                ..Default::default()
            }
        };
        self.nats
            .call("pull", self.consumer.request_batch(request, inbox))
            .await?;
        let limit = tokio::time::sleep(wait + self.nats.request_timeout);
        tokio::pin!(limit);
        loop {
            let answer = tokio::select! {
                biased;
                answer = inbox_messages.next() => answer,
                _ = abandoned.wait() => {
                    self.give_up(inbox_messages).await;
                    return Ok(None);
                }
                _ = &mut limit => return Ok(None),
            };
            let Some(message) = answer else {
                return Ok(None);
            };
            match message.status.unwrap_or(StatusCode::OK) {
                StatusCode::OK => {
                    return Ok(Some(async_nats::jetstream::Message {
                        message,
                        context: self.nats.js.clone(),
                    }))
                }
                StatusCode::IDLE_HEARTBEAT => continue,
                // No message now (no wait), or the request expired.
                StatusCode::NOT_FOUND | StatusCode::TIMEOUT => return Ok(None),
                status => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "NATS pull from queue `{}`: the server answered {status} {}",
                            self.name,
                            message.description.unwrap_or_default()
                        ),
                    )
                    .temporary())
                }
            }
        }
    }

    /// Drains a fetch's inbox after its caller left and gives back every
    /// message the server had sent to it.
    async fn give_up(&self, mut inbox_messages: async_nats::Subscriber) {
        if inbox_messages.drain().await.is_err() {
            return;
        }
        let limit = tokio::time::sleep(self.nats.request_timeout);
        tokio::pin!(limit);
        loop {
            let message = tokio::select! {
                m = inbox_messages.next() => m,
                _ = &mut limit => return,
            };
            let Some(message) = message else { return };
            if message.status.is_none() {
                if let Some(reply) = &message.reply {
                    let _ = self.nak(reply, Duration::ZERO).await;
                }
            }
        }
    }

    /// The pull itself (see `pull`). When its caller leaves, a fetch still
    /// waiting is given up (see `fetch`): keeping it until it expires would
    /// let it take and give back messages arriving meanwhile, costing each
    /// an attempt per pull dropped while waiting, which a worker that drops
    /// its pull on every tick of a timer would turn into dead letters.
    async fn pull_unless_abandoned(
        &self,
        options: PullOptions,
        abandoned: Abandoned,
    ) -> Result<Option<Delivery>> {
        let deadline = Instant::now() + options.wait;
        loop {
            if abandoned.is_set() {
                return Ok(None);
            }
            let next_sweep = self.sweep_feeders().await?;
            let mut wait = deadline.saturating_duration_since(Instant::now());
            if let Some(at) = next_sweep {
                wait = wait.min(Duration::from_millis((at - now_ms()).max(0) as u64 + 20));
            }
            match self.fetch(wait, &abandoned).await? {
                Some(m) if abandoned.is_set() => {
                    if let Some(reply) = &m.reply {
                        self.nak(reply, Duration::ZERO).await?;
                    }
                    return Ok(None);
                }
                Some(m) => {
                    let reply = m.reply.clone();
                    match self.deliver(m, &options).await {
                        Ok(Some(d)) => return Ok(Some(d)),
                        Ok(None) => {}
                        Err(e) => {
                            // Nobody holds the message now (its claim may
                            // have been written with the answer lost):
                            // give it back rather than wait out AckWait.
                            if let (Some(reply), Ok(this)) = (reply, self.this()) {
                                tokio::spawn(async move {
                                    let _ = dprim::retry::RetryPolicy::default()
                                        .run(|| this.nak(&reply, Duration::ZERO))
                                        .await;
                                });
                            }
                            return Err(e);
                        }
                    }
                }
                None if Instant::now() >= deadline => return Ok(None),
                None => {}
            }
        }
    }

    /// Sends an acknowledgement of one delivery and waits for the server.
    async fn server_ack(&self, reply: &str, kind: AckKind) -> Result<()> {
        let payload: Bytes = kind.into();
        self.nats
            .call("ack", self.nats.client.request(reply.to_string(), payload))
            .await
            .map(|_| ())
    }

    /// Sends a NAK (with a delay: redeliver then) and waits for the server
    /// to take it, so a pull that follows sees its effect.
    async fn nak(&self, reply: &str, delay: Duration) -> Result<()> {
        let kind = if delay.is_zero() {
            AckKind::Nak(None)
        } else {
            AckKind::Nak(Some(delay))
        };
        self.server_ack(reply, kind).await
    }

    /// Moves message `seq` of this queue to its dead-letter queue.
    async fn dead_letter(&self, options: &QueueOptions, seq: u64, payload: Bytes) -> Result<()> {
        let dlq = options.dead_letter_for(&self.name)?;
        let target = self.nats.layout.queue_messages(&dlq);
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("dl-{}-{seq}", hash(&self.subject)));
        let ack = self
            .nats
            .call(
                "dead-letter",
                self.nats.js.publish_with_headers(target, headers, payload),
            )
            .await?;
        self.nats
            .call("dead-letter", std::future::IntoFuture::into_future(ack))
            .await?;
        match self
            .nats
            .call("dead-letter", self.nats.queues.delete_message(seq))
            .await
        {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) if e.message().contains("no message found") => {}
            Err(e) => return Err(e),
        }
        self.nats.purge(&self.claim_subject(seq), None).await?;
        Ok(())
    }

    async fn payload_of(&self, seq: u64) -> Result<Option<Bytes>> {
        let read = match self
            .nats
            .call("get", self.nats.queues.direct_get(seq))
            .await
        {
            Err(e) if crate::store::nobody_serves_direct_gets(&e) => {
                self.nats
                    .call("get", self.nats.queues.get_raw_message(seq))
                    .await
            }
            read => read,
        };
        match read {
            Ok(m) => Ok(Some(m.payload)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Dead-letters the messages of queues feeding this one that used up
    /// their attempts and are no longer held; returns when a feeder's
    /// held last attempt may time out next (wall-clock ms).
    async fn sweep_feeders(&self) -> Result<Option<i64>> {
        {
            let checked = self.no_feeders_at.lock().unwrap_or_else(|p| p.into_inner());
            if checked.is_some_and(|at| at.elapsed() < FEEDER_CHECK) {
                return Ok(None);
            }
        }
        let (feeders, _) = self
            .nats
            .scan_live(&self.nats.layout.queue_feeders(&self.name))
            .await?;
        if feeders.is_empty() {
            *self.no_feeders_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            return Ok(None);
        }
        let mut next: Option<i64> = None;
        for f in feeders {
            let Some(name) = std::str::from_utf8(&f.payload)
                .ok()
                .and_then(|s| Key::new(s).ok())
            else {
                continue;
            };
            let options = read_options(&self.nats, &name).await?;
            if options.dead_letter_for(&name).ok().as_ref() != Some(&self.name) {
                continue;
            }
            let feeder = NatsQueue::open(self.nats.clone(), name.clone()).await?;
            let (claims, _) = self
                .nats
                .scan_live(&self.nats.layout.queue_claims(&name))
                .await?;
            let now = now_ms();
            for c in claims {
                let Some(claim) = Claim::decode(&c.payload) else {
                    continue;
                };
                if claim.attempt < u64::from(options.max_attempts) {
                    continue;
                }
                if claim.visible_at > now {
                    next = Some(next.map_or(claim.visible_at, |n| n.min(claim.visible_at)));
                    continue;
                }
                let Some(seq) = c.subject.rsplit('.').next().and_then(|s| s.parse().ok()) else {
                    continue;
                };
                match feeder.payload_of(seq).await? {
                    Some(payload) => feeder.dead_letter(&options, seq, payload).await?,
                    None => {
                        let _ = self.nats.purge(&c.subject, Some(c.seq)).await;
                    }
                }
            }
        }
        Ok(next)
    }

    /// Turns a fetched message into a delivery, or dead-letters it.
    async fn deliver(
        &self,
        m: async_nats::jetstream::Message,
        options: &PullOptions,
    ) -> Result<Option<Delivery>> {
        let info = m
            .info()
            .map_err(|e| Error::unexpected(format!("NATS sent a message without metadata: {e}")))?;
        let (seq, attempt) = (info.stream_sequence, info.delivered.max(1) as u64);
        let Some(reply) = m.reply.as_ref().map(|r| r.to_string()) else {
            return Err(Error::unexpected(
                "NATS sent a queue message without an ack subject",
            ));
        };
        if attempt > 1 {
            let queue_options = read_options(&self.nats, &self.name).await?;
            if attempt > u64::from(queue_options.max_attempts) {
                self.dead_letter(&queue_options, seq, m.payload.clone())
                    .await?;
                return Ok(None);
            }
        }
        let nonce = format!("{:016x}", rand::random::<u64>());
        let vt = options.visibility_timeout;
        let claim = Claim {
            attempt,
            visible_at: now_ms() + vt.as_millis() as i64,
            nonce: nonce.clone(),
            reply: reply.clone(),
        };
        let subject = self.claim_subject(seq);
        let owner = options.session.as_ref().map(|s| s.id().0);
        if let Some(owner) = owner {
            // Indexed first, so the reapers find the claim once it exists.
            self.nats
                .write(
                    &self.nats.layout.index_entry(owner, &subject),
                    Bytes::from(subject.clone()),
                    async_nats::HeaderMap::new(),
                    None,
                )
                .await?;
        }
        self.nats
            .write(&subject, claim.encode(), owned(owner), None)
            .await?;
        if vt != ACK_WAIT {
            self.nak(&reply, vt).await?;
        }
        if let Some(session) = &options.session {
            tokio::spawn(release_on_loss(
                self.nats.clone(),
                session.clone(),
                subject,
                nonce.clone(),
            ));
        }
        Ok(Some(Delivery {
            id: MessageId(seq),
            payload: Value::new(m.payload.to_vec())?,
            attempt: attempt as u32,
            receipt: Receipt(format!("{seq}.{nonce}")),
        }))
    }

    /// The claim of a receipt that is still held; `None` if the message's
    /// claim or the message itself is gone (acked or dead-lettered).
    async fn current(&self, receipt: &Receipt) -> Result<Option<Held>> {
        let (seq, nonce) = self.parse_receipt(receipt)?;
        let Some(r) = self.nats.last(&self.claim_subject(seq)).await? else {
            return Ok(None);
        };
        match Claim::decode(&r.payload) {
            Some(claim) if claim.held_by(&nonce) => Ok(Some(Held {
                seq,
                rev: r.seq,
                owner: r.session(),
                claim,
            })),
            // No longer held by this receipt. A message that is gone was
            // acked, perhaps by an ack of this very receipt that was cut
            // off after the server took it and before its claim was
            // purged: nothing will deliver it again, so it is not stale.
            _ => match self.payload_of(seq).await? {
                None => Ok(None),
                Some(_) => Err(self.stale(receipt)),
            },
        }
    }
}

/// A delivery still held by its receipt, as its claim record says.
struct Held {
    /// The message's stream sequence.
    seq: u64,
    /// The claim record's sequence (for conditional rewrites).
    rev: u64,
    /// The session the delivery was pulled with, if any.
    owner: Option<u64>,
    claim: Claim,
}

/// Gives a delivery back at once when the pulling session ends while it
/// is still held.
async fn release_on_loss(nats: Nats, session: Session, subject: String, nonce: String) {
    loop {
        let record = match nats.last(&subject).await {
            Ok(Some(r)) => r,
            _ => return,
        };
        let Some(claim) = Claim::decode(&record.payload).filter(|c| c.held_by(&nonce)) else {
            return;
        };
        let wait = Duration::from_millis((claim.visible_at - now_ms()).max(0) as u64);
        tokio::select! {
            _ = session.lost() => {}
            _ = tokio::time::sleep(wait) => continue,
        }
        if let Err(e) = release_claim(&nats, &subject, &record).await {
            tracing::debug!(error = %e, "releasing a delivery of a lost session failed; a reaper or its visibility timeout will");
        }
        return;
    }
}

/// Gives back the delivery claim record `record` (of `subject`) holds, if
/// it holds one and nothing rewrote it since: the claim then says nobody
/// holds it, and the server is told to deliver the message again now.
/// The pulling process calls this when its session ends, and every client's
/// reaper when the session's heartbeat vanishes (a crashed or partitioned
/// consumer); the first one wins, the others find the claim rewritten.
pub(crate) async fn release_claim(nats: &Nats, subject: &str, record: &Record) -> Result<()> {
    let Some(claim) = Claim::decode(&record.payload) else {
        return Ok(());
    };
    if claim.nonce == NOBODY {
        return Ok(());
    }
    let released = Claim {
        visible_at: now_ms(),
        nonce: NOBODY.to_string(),
        ..claim
    };
    nats.write(subject, released.encode(), owned(None), Some(record.seq))
        .await?;
    let payload: Bytes = AckKind::Nak(None).into();
    nats.call("nak", nats.client.publish(released.reply, payload))
        .await
}

#[async_trait]
impl Queue for NatsQueue {
    fn name(&self) -> &Key {
        &self.name
    }

    async fn push(&self, payload: Value) -> Result<MessageId> {
        let ack = self
            .nats
            .call(
                "push",
                self.nats
                    .js
                    .publish(self.subject.clone(), payload.into_shared()),
            )
            .await?;
        Ok(MessageId(
            self.nats
                .call("push", std::future::IntoFuture::into_future(ack))
                .await?
                .sequence,
        ))
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
        let Some(held) = self.current(receipt).await? else {
            return Ok(());
        };
        self.server_ack(&held.claim.reply, AckKind::Ack).await?;
        match self
            .nats
            .purge(&self.claim_subject(held.seq), Some(held.rev))
            .await
        {
            Ok(_) => {
                self.unindex(&held).await;
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::Conflict => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn nack(&self, receipt: &Receipt, delay: Duration) -> Result<()> {
        let Some(held) = self.current(receipt).await? else {
            return Err(Error::conflict(format!(
                "delivery {receipt} of queue `{}` is no longer held (acked or dead-lettered)",
                self.name
            )));
        };
        let options = read_options(&self.nats, &self.name).await?;
        let seq = held.seq;
        if held.claim.attempt >= u64::from(options.max_attempts) {
            return match self.payload_of(seq).await? {
                Some(payload) => self.dead_letter(&options, seq, payload).await,
                None => Ok(()),
            };
        }
        let released = Claim {
            visible_at: now_ms() + delay.as_millis() as i64,
            nonce: NOBODY.to_string(),
            ..held.claim.clone()
        };
        match self
            .nats
            .write(
                &self.claim_subject(seq),
                released.encode(),
                owned(None),
                Some(held.rev),
            )
            .await
        {
            Ok(_) => {
                self.unindex(&held).await;
                self.nak(&released.reply, delay).await
            }
            Err(e) if e.kind() == ErrorKind::Conflict => Err(self.stale(receipt)),
            Err(e) => Err(e),
        }
    }

    async fn extend(&self, receipt: &Receipt, visibility_timeout: Duration) -> Result<()> {
        let Some(Held {
            seq,
            rev,
            owner,
            claim,
        }) = self.current(receipt).await?
        else {
            return Err(Error::conflict(format!(
                "delivery {receipt} of queue `{}` is no longer held (acked or dead-lettered)",
                self.name
            )));
        };
        let extended = Claim {
            visible_at: now_ms() + visibility_timeout.as_millis() as i64,
            ..claim
        };
        // Still held by the same delivery, so still its session's.
        match self
            .nats
            .write(
                &self.claim_subject(seq),
                extended.encode(),
                owned(owner),
                Some(rev),
            )
            .await
        {
            Ok(_) => self.nak(&extended.reply, visibility_timeout).await,
            Err(e) if e.kind() == ErrorKind::Conflict => Err(self.stale(receipt)),
            Err(e) => Err(e),
        }
    }

    async fn depth(&self) -> Result<QueueDepth> {
        self.sweep_feeders().await?;
        let mut subjects = self
            .nats
            .call("depth", self.nats.queues.info_with_subjects(&self.subject))
            .await?;
        let mut total = 0u64;
        while let Some(item) = subjects.next().await {
            let (subject, count) = item.map_err(|e| crate::error::map_error("depth", e))?;
            if subject == self.subject {
                total += count as u64;
            }
        }
        let (claims, _) = self
            .nats
            .scan_live(&self.nats.layout.queue_claims(&self.name))
            .await?;
        let now = now_ms();
        let in_flight = claims
            .iter()
            .filter_map(|c| Claim::decode(&c.payload))
            .filter(|c| c.nonce != NOBODY && c.visible_at > now)
            .count() as u64;
        let in_flight = in_flight.min(total);
        Ok(QueueDepth {
            ready: total - in_flight,
            in_flight,
        })
    }
}
