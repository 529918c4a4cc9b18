//! PubSub on core NATS subjects: at-most-once, fan-out, per-publisher
//! order, nothing stored. Each subscription drains its NATS subscriber into
//! a buffer of its own, bounded by messages and by payload bytes; when the
//! reader falls behind, further messages are counted and surfaced as one
//! `Lagged(n)` item.

use crate::error::map_error;
use crate::Nats;
use async_trait::async_trait;
use bytes::Bytes;
use dprim::{Key, Message, PubSub, Result, Subscription, SubscriptionItem, Value};
use futures::task::AtomicWaker;
use futures::{Stream, StreamExt};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::task::{Context, Poll, Wake, Waker};

pub(crate) struct NatsPubSub {
    nats: Nats,
    /// Window units (see `unit_cost`) published through this client.
    published: AtomicU64,
    /// The round trip confirming the latest window of publishes.
    confirm: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The subject of the topic published last, reused while it repeats
    /// (a `Subject` shares its bytes: no copy per publish).
    last_topic: Mutex<Option<(Key, async_nats::Subject)>>,
    /// The client's counters; `connects` tells one connection from the next.
    statistics: Arc<async_nats::Statistics>,
    /// The connection (by `connects` count) of the earliest publish not yet
    /// covered by a `flush`; `u64::MAX` when there is none. A reconnect may
    /// lose what was in flight on the old connection, which the round trip
    /// on the new one cannot see, so `flush` compares this with the
    /// connection its round trip was made on.
    unflushed_since: AtomicU64,
}

/// Window units per window: a publisher never gets more than two windows
/// ahead of what the server has routed (see `publish`). A window is a
/// quarter of a subscriber's buffer, in messages and in bytes, so that when
/// a publisher that sent twice a buffer's worth returns, more than a
/// buffer's worth has reached the subscribers, which then lag as they must.
const WINDOW: u64 = (crate::SUBSCRIBER_BUFFER / 4) as u64;
/// Payload bytes that cost one window unit more.
const BYTES_PER_UNIT: u64 = (crate::SUBSCRIBER_BUFFER_BYTES / crate::SUBSCRIBER_BUFFER) as u64;

/// What a publish costs of a window: one unit, plus one per
/// `BYTES_PER_UNIT` of payload. A window then holds at most `WINDOW`
/// messages and at most `WINDOW * BYTES_PER_UNIT` bytes (a quarter of the
/// byte bound), plus the one message that closes it.
fn unit_cost(payload_len: usize) -> u64 {
    1 + payload_len as u64 / BYTES_PER_UNIT
}

impl NatsPubSub {
    pub(crate) fn new(nats: Nats) -> NatsPubSub {
        NatsPubSub {
            published: AtomicU64::new(0),
            confirm: Mutex::new(None),
            last_topic: Mutex::new(None),
            statistics: nats.client.statistics(),
            unflushed_since: AtomicU64::new(u64::MAX),
            nats,
        }
    }

    fn subject(&self, topic: &Key) -> async_nats::Subject {
        let mut last = self.last_topic.lock().unwrap_or_else(|p| p.into_inner());
        match &*last {
            Some((k, s)) if k == topic => s.clone(),
            _ => {
                let s = async_nats::Subject::from(self.nats.layout.topic(topic));
                *last = Some((topic.clone(), s.clone()));
                s
            }
        }
    }
}

impl Drop for NatsPubSub {
    /// Publishes are buffered by the client: before the last handle of the
    /// connection goes away, make sure the server has taken them, so a
    /// publisher that returns and exits does not lose its final messages.
    /// Flushing them into the socket is not enough: the connection closes
    /// right after, and a publisher whose flush had returned still lost its
    /// last message in about one of 30 rounds under load; a round trip (see
    /// `routed`) never did. This runs only while the runtime does: a process
    /// about to exit calls [`PubSub::flush`] itself.
    fn drop(&mut self) {
        let client = self.nats.client.clone();
        let timeout = self.nats.request_timeout;
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                if let Err(e) = routed(&client, timeout).await {
                    tracing::debug!(error = %e, "confirming the last publishes of a closing NATS client failed");
                }
            });
        }
    }
}

/// Waits until the server has routed every publish this connection made
/// before the call. The server handles a connection's operations in order,
/// and answers a request to a subject nobody listens on ("no responders")
/// when it handles that request.
async fn routed(client: &async_nats::Client, timeout: std::time::Duration) -> Result<()> {
    let probe = client.new_inbox();
    match tokio::time::timeout(timeout, client.request(probe, Bytes::new())).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
        Ok(Err(e)) => Err(map_error("flush", e)),
        Err(_) => Err(crate::error::timed_out("flush", timeout)),
    }
}

#[async_trait]
impl PubSub for NatsPubSub {
    async fn publish(&self, topic: &Key, payload: Value) -> Result<()> {
        let subject = self.subject(topic);
        let cost = unit_cost(payload.len());
        let connection = self.statistics.connects.load(Ordering::Acquire);
        self.nats
            .client
            .publish(subject, payload.into_shared())
            .await
            .map_err(|e| map_error("publish", e))?;
        // Connection counts only grow: a recorded one is the earliest.
        if self.unflushed_since.load(Ordering::Relaxed) > connection {
            self.unflushed_since.fetch_min(connection, Ordering::AcqRel);
        }
        // Core NATS publish is at-most-once and the client writes it out
        // on its own, so a publish does not wait for the socket. It must
        // not run unboundedly ahead of the server either: a publisher that
        // outpaces delivery would otherwise leave its subscribers' buffers
        // unfilled (no `Lagged`) while thousands of messages sit in its own
        // client. The publish that closes a window starts a round trip on
        // the connection (the server answers after it has routed every
        // earlier publish, to subscribers on this connection too) and waits
        // for the previous one, so at most two windows are unconfirmed.
        let before = self.published.fetch_add(cost, Ordering::Relaxed);
        if (before + cost) / WINDOW != before / WINDOW {
            let client = self.nats.client.clone();
            let timeout = self.nats.request_timeout;
            let next = tokio::spawn(async move {
                // Only the wait matters: a failed round trip ends it early,
                // and the publishes themselves went out.
                let _ = routed(&client, timeout).await;
            });
            let previous = self
                .confirm
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .replace(next);
            if let Some(previous) = previous {
                let _ = previous.await;
            }
        }
        Ok(())
    }

    /// Publishes are queued in the client; a round trip confirms the server
    /// has routed them, unless the client reconnected since the earliest of
    /// them: what was in flight on the old connection may be lost, and the
    /// round trip on the new one cannot tell.
    async fn flush(&self) -> Result<()> {
        let since = self.unflushed_since.swap(u64::MAX, Ordering::AcqRel);
        routed(&self.nats.client, self.nats.request_timeout).await?;
        let now = self.statistics.connects.load(Ordering::Acquire);
        if since != u64::MAX && now != since {
            return Err(dprim::Error::new(
                dprim::ErrorKind::OutcomeUnknown,
                "flush: the connection to NATS was re-established after earlier publishes of this client, and messages in flight on the old connection may have been lost; publish again what must arrive (subscribers may then get it twice)",
            ));
        }
        Ok(())
    }

    async fn subscribe(&self, topic: &Key) -> Result<Subscription> {
        let subject = self.nats.layout.topic(topic);
        let subscriber = self
            .nats
            .call("subscribe", self.nats.client.subscribe(subject))
            .await?;
        // The server handles a connection's operations in order: once a
        // request on this connection has been answered (here: "no
        // responders" from a private subject), the subscription is in place
        // and every later publish, from any client, reaches it.
        let probe = self.nats.client.new_inbox();
        match tokio::time::timeout(
            self.nats.request_timeout,
            self.nats.client.request(probe, Bytes::new()),
        )
        .await
        {
            Ok(_) => {}
            Err(_) => {
                return Err(crate::error::timed_out(
                    "subscribe",
                    self.nats.request_timeout,
                ))
            }
        }
        let feed = Arc::new(Feed {
            state: Mutex::new(FeedState {
                subscriber: Some(subscriber),
                waker: None,
                added: Totals::default(),
                batch: Vec::with_capacity(BATCH),
            }),
            wanted: AtomicBool::new(false),
            buffer: Buffer::default(),
        });
        feed.state.lock().unwrap_or_else(|p| p.into_inner()).waker =
            Some(Waker::from(feed.clone()));
        // Registers the feed as the subscriber's waker (and takes anything
        // that already arrived).
        feed.drain();
        Ok(Subscription::new(
            Reader {
                feed,
                taken: VecDeque::new(),
                topic: topic.clone(),
                read: Totals::default(),
                told: Totals::default(),
            }
            .boxed(),
        ))
    }
}

/// Moves messages from the NATS subscriber into the subscription's bounded
/// buffer. It is the subscriber's waker, so it runs inside the client's
/// connection task, right when that task hands a message over: the client's
/// own channel (which drops messages silently when full) never fills, and
/// every message is either buffered or counted in a `Lagged`. A separate
/// task would be a second hop, and one the scheduler can starve while the
/// connection task keeps reading.
struct Feed {
    state: Mutex<FeedState>,
    /// Set by a wake-up that found `state` held: the holder drains again
    /// after letting go, so that wake-up is not lost.
    wanted: AtomicBool,
    buffer: Buffer,
}

struct FeedState {
    /// `None` once the subscription is dropped (which unsubscribes).
    subscriber: Option<async_nats::Subscriber>,
    /// This feed as a waker, made once (`None` once the subscription is
    /// dropped: the feed holding its own waker is a cycle until then).
    waker: Option<Waker>,
    /// Everything the feed has put in the buffer.
    added: Totals,
    /// Messages taken from the subscriber and not yet in the buffer (kept
    /// here so that a drain, which usually finds one message, does not
    /// allocate).
    batch: Vec<async_nats::Message>,
}

/// Messages and payload bytes, counted since the subscription began.
#[derive(Clone, Copy, Default)]
struct Totals {
    messages: u64,
    bytes: u64,
}

impl Wake for Feed {
    fn wake(self: Arc<Self>) {
        self.drain();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.drain();
    }
}

impl Feed {
    fn drain(self: &Arc<Self>) {
        loop {
            let mut guard = match self.state.try_lock() {
                Ok(guard) => guard,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    // Busy: ask the holder to drain again, then look once
                    // more in case it let go before it could see the ask.
                    self.wanted.store(true, Ordering::SeqCst);
                    fence(Ordering::SeqCst);
                    match self.state.try_lock() {
                        Ok(guard) => guard,
                        Err(TryLockError::Poisoned(p)) => p.into_inner(),
                        Err(TryLockError::WouldBlock) => return,
                    }
                }
            };
            // Whatever was asked is done by the polling below.
            if self.wanted.load(Ordering::Relaxed) {
                self.wanted.store(false, Ordering::Relaxed);
            }
            let FeedState {
                subscriber,
                waker,
                added,
                batch,
            } = &mut *guard;
            let (Some(sub), Some(waker)) = (subscriber.as_mut(), waker.as_ref()) else {
                return;
            };
            let mut cx = Context::from_waker(waker);
            // Unconstrained: this may run inside a task whose cooperative
            // budget is spent, and a spent budget makes a poll return
            // `Pending` after waking its waker (this feed) at once, which
            // would spin here.
            let mut next =
                tokio::task::unconstrained(futures::future::poll_fn(|cx| sub.poll_next_unpin(cx)));
            let mut ended = false;
            loop {
                match Pin::new(&mut next).poll(&mut cx) {
                    Poll::Ready(Some(m)) => {
                        batch.push(m);
                        if batch.len() == BATCH {
                            self.buffer.push(added, batch.drain(..));
                        }
                    }
                    Poll::Ready(None) => {
                        ended = true;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if !batch.is_empty() {
                self.buffer.push(added, batch.drain(..));
            }
            if ended {
                self.buffer.ended.store(true, Ordering::SeqCst);
                self.buffer.reader_waiting.store(false, Ordering::Relaxed);
                self.buffer.reader.wake();
            }
            drop(guard);
            fence(Ordering::SeqCst);
            if !self.wanted.load(Ordering::Relaxed) {
                return;
            }
        }
    }
}

/// Messages the feed hands over at once at most.
const BATCH: usize = 256;

/// Messages the reader hands out before it tells the buffer. The buffer
/// counts up to this many read messages as unread, so a subscriber may get
/// `Lagged` that many messages early.
const READ_BATCH: u64 = 64;

/// What the buffer holds: payloads only. The reader adds the topic, so the
/// topic's shared key is cloned and dropped on the reader's side only
/// instead of bouncing between the two threads with every message.
enum Item {
    Payload(Value),
    Lagged(u64),
}

#[derive(Default)]
struct Buffer {
    /// Items the reader has not taken yet.
    items: Mutex<VecDeque<Item>>,
    /// What the reader has taken out (written by the reader only, every
    /// `READ_BATCH` messages): with the feed's own `added`, what is unread
    /// (here or in the reader's hands), which the subscriber buffer bounds.
    read_messages: AtomicU64,
    read_bytes: AtomicU64,
    /// The reader, when it found nothing to read.
    reader: AtomicWaker,
    /// The reader found nothing and waits to be woken. Both sides set or
    /// read it around a look at `items` under its lock, so a push after the
    /// reader's look sees it set.
    reader_waiting: AtomicBool,
    /// The client closed the subscription (the connection was closed).
    ended: AtomicBool,
}

impl Buffer {
    fn push(&self, added: &mut Totals, batch: impl Iterator<Item = async_nats::Message>) {
        // The reader's totals only grow, so a stale read over-counts what
        // is unread and the bound still holds.
        let mut messages = added.messages - self.read_messages.load(Ordering::Acquire);
        let mut bytes = added.bytes - self.read_bytes.load(Ordering::Acquire);
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        for m in batch {
            let len = m.payload.len() as u64;
            if messages < crate::SUBSCRIBER_BUFFER as u64
                && bytes + len <= crate::SUBSCRIBER_BUFFER_BYTES as u64
            {
                let Ok(payload) = Value::new(m.payload) else {
                    continue;
                };
                items.push_back(Item::Payload(payload));
                messages += 1;
                bytes += len;
                added.messages += 1;
                added.bytes += len;
            } else if let Some(Item::Lagged(n)) = items.back_mut() {
                *n += 1;
            } else {
                items.push_back(Item::Lagged(1));
            }
        }
        drop(items);
        // A plain read first: the reader is usually busy, and then the feed
        // touches nothing the reader writes.
        if self.reader_waiting.load(Ordering::Relaxed)
            && self.reader_waiting.swap(false, Ordering::AcqRel)
        {
            self.reader.wake();
        }
    }
}

/// The reading side: takes the buffer's items a batch at a time.
/// Unsubscribes (drops the NATS subscriber) when the subscription is
/// dropped.
struct Reader {
    feed: Arc<Feed>,
    taken: VecDeque<Item>,
    topic: Key,
    /// Messages handed out.
    read: Totals,
    /// What the buffer has been told of `read`.
    told: Totals,
}

impl Reader {
    /// Tells the buffer about the messages read since the last time.
    fn tell(&mut self) {
        if self.read.messages != self.told.messages {
            let buffer = &self.feed.buffer;
            buffer.read_bytes.store(self.read.bytes, Ordering::Release);
            buffer
                .read_messages
                .store(self.read.messages, Ordering::Release);
            self.told = self.read;
        }
    }
}

impl Stream for Reader {
    type Item = Result<SubscriptionItem>;

    /// The next item; `None` once the client has closed the subscription
    /// and everything before was read.
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match this.taken.pop_front() {
                Some(Item::Payload(payload)) => {
                    this.read.messages += 1;
                    this.read.bytes += payload.len() as u64;
                    if this.read.messages - this.told.messages == READ_BATCH {
                        this.tell();
                    }
                    return Poll::Ready(Some(Ok(SubscriptionItem::Message(Message {
                        topic: this.topic.clone(),
                        payload,
                    }))));
                }
                Some(Item::Lagged(n)) => return Poll::Ready(Some(Ok(SubscriptionItem::Lagged(n)))),
                None => {}
            }
            this.tell();
            let buffer = &this.feed.buffer;
            // Registered before looking, so a push after the look wakes us.
            buffer.reader.register(cx.waker());
            buffer.reader_waiting.store(true, Ordering::Relaxed);
            {
                let mut items = buffer.items.lock().unwrap_or_else(|p| p.into_inner());
                if !items.is_empty() {
                    std::mem::swap(&mut *items, &mut this.taken);
                    drop(items);
                    buffer.reader_waiting.store(false, Ordering::Relaxed);
                    continue;
                }
            }
            if buffer.ended.load(Ordering::SeqCst) {
                return Poll::Ready(None);
            }
            return Poll::Pending;
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // Dropping the subscriber unsubscribes; the client then drops its
        // end of the channel, and with it the waker that refers to the feed.
        let (subscriber, waker) = {
            let mut state = self.feed.state.lock().unwrap_or_else(|p| p.into_inner());
            (state.subscriber.take(), state.waker.take())
        };
        drop(subscriber);
        drop(waker);
    }
}
