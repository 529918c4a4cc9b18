//! PubSub on core NATS subjects: at-most-once, fan-out, per-publisher
//! order, nothing stored. Each subscription drains its NATS subscriber into
//! a bounded buffer of its own; when the reader falls behind, further
//! messages are counted and surfaced as one `Lagged(n)` item.

use crate::error::map_error;
use crate::Nats;
use async_trait::async_trait;
use bytes::Bytes;
use dprim::{Key, Message, PubSub, Result, Subscription, SubscriptionItem, Value};
use futures::{FutureExt, StreamExt};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

pub(crate) struct NatsPubSub {
    nats: Nats,
    /// Publishes made through this client.
    published: AtomicU64,
    /// The round trip confirming the latest window of publishes.
    confirm: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The subject of the topic published last, reused while it repeats
    /// (a `Subject` shares its bytes: no copy per publish).
    last_topic: Mutex<Option<(Key, async_nats::Subject)>>,
}

/// Publishes per window: a publisher never gets more than two windows
/// ahead of what the server has taken (see `publish`).
const WINDOW: u64 = 512;

impl NatsPubSub {
    pub(crate) fn new(nats: Nats) -> NatsPubSub {
        NatsPubSub {
            nats,
            published: AtomicU64::new(0),
            confirm: Mutex::new(None),
            last_topic: Mutex::new(None),
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
    /// Publishes are buffered by the client: flush them before the last
    /// handle of the connection goes away, so a publisher that returns and
    /// exits does not lose its final messages.
    fn drop(&mut self) {
        let client = self.nats.client.clone();
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(5), client.flush()).await;
            });
        }
    }
}

#[async_trait]
impl PubSub for NatsPubSub {
    async fn publish(&self, topic: &Key, payload: Value) -> Result<()> {
        let subject = self.subject(topic);
        self.nats
            .client
            .publish(subject, Bytes::from(payload.into_bytes()))
            .await
            .map_err(|e| map_error("publish", e))?;
        // Core NATS publish is at-most-once and the client writes it out
        // on its own, so a publish does not wait for the socket. It must
        // not run unboundedly ahead of the server either: a publisher that
        // outpaces delivery would otherwise leave its subscribers' buffers
        // unfilled (no `Lagged`) while thousands of messages sit in its own
        // client. Every WINDOW publishes start a round trip on the
        // connection (the server answers after it has routed every earlier
        // publish, to subscribers on this connection too) and wait for the
        // previous one, so at most two windows are unconfirmed.
        let n = self.published.fetch_add(1, Ordering::Relaxed) + 1;
        if n % WINDOW == 0 {
            let client = self.nats.client.clone();
            let timeout = self.nats.request_timeout;
            let probe = client.new_inbox();
            let next = tokio::spawn(async move {
                let _ = tokio::time::timeout(timeout, client.request(probe, Bytes::new())).await;
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

    async fn subscribe(&self, topic: &Key) -> Result<Subscription> {
        let subject = self.nats.layout.topic(topic);
        let mut subscriber = self
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
        let buffer = Arc::new(Buffer::default());
        let feed = buffer.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            loop {
                let first = tokio::select! {
                    _ = feed.closed.notified() => return,
                    msg = subscriber.next() => msg,
                };
                let Some(m) = first else { return };
                // Take what else has already arrived, so the buffer is
                // locked and the reader woken once per batch.
                batch.push(m);
                while batch.len() < BATCH {
                    match subscriber.next().now_or_never() {
                        Some(Some(m)) => batch.push(m),
                        _ => break,
                    }
                }
                feed.push(&topic, batch.drain(..));
                if feed.is_closed.load(Ordering::SeqCst) {
                    return;
                }
            }
        });
        let reader = Reader {
            buffer,
            taken: VecDeque::new(),
        };
        let items = futures::stream::unfold(reader, |mut reader| async move {
            let item = reader.pop().await;
            Some((Ok(item), reader))
        });
        Ok(Subscription::new(items.boxed()))
    }
}

/// Messages the feed hands over at once at most.
const BATCH: usize = 256;

#[derive(Default)]
struct Buffer {
    /// Items the reader has not taken yet.
    items: Mutex<VecDeque<SubscriptionItem>>,
    /// Messages received and not yet read (here or in the reader's hands):
    /// bounded by the subscriber buffer.
    unread: AtomicUsize,
    ready: Notify,
    closed: Notify,
    is_closed: AtomicBool,
}

impl Buffer {
    fn push(&self, topic: &Key, batch: impl Iterator<Item = async_nats::Message>) {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        for m in batch {
            // Only this feed adds to `unread`, so the bound holds.
            if self.unread.load(Ordering::Acquire) < crate::SUBSCRIBER_BUFFER {
                let Ok(payload) = Value::new(m.payload) else {
                    continue;
                };
                items.push_back(SubscriptionItem::Message(Message {
                    topic: topic.clone(),
                    payload,
                }));
                self.unread.fetch_add(1, Ordering::AcqRel);
            } else if let Some(SubscriptionItem::Lagged(n)) = items.back_mut() {
                *n += 1;
            } else {
                items.push_back(SubscriptionItem::Lagged(1));
            }
        }
        drop(items);
        self.ready.notify_one();
    }
}

/// The reading side: takes the buffer's items a batch at a time.
/// Unsubscribes (stops the feeding task, dropping the NATS subscriber) when
/// the subscription is dropped.
struct Reader {
    buffer: Arc<Buffer>,
    taken: VecDeque<SubscriptionItem>,
}

impl Reader {
    async fn pop(&mut self) -> SubscriptionItem {
        loop {
            if let Some(item) = self.taken.pop_front() {
                if matches!(item, SubscriptionItem::Message(_)) {
                    self.buffer.unread.fetch_sub(1, Ordering::AcqRel);
                }
                return item;
            }
            let notified = self.buffer.ready.notified();
            {
                let mut items = self.buffer.items.lock().unwrap_or_else(|p| p.into_inner());
                if !items.is_empty() {
                    std::mem::swap(&mut *items, &mut self.taken);
                    continue;
                }
            }
            notified.await;
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.buffer.is_closed.store(true, Ordering::SeqCst);
        self.buffer.closed.notify_one();
    }
}
