//! PubSub on core NATS subjects: at-most-once, fan-out, per-publisher
//! order, nothing stored. Each subscription drains its NATS subscriber into
//! a bounded buffer of its own; when the reader falls behind, further
//! messages are counted and surfaced as one `Lagged(n)` item.

use crate::error::map_error;
use crate::Nats;
use async_trait::async_trait;
use bytes::Bytes;
use dprim::{Key, Message, PubSub, Result, Subscription, SubscriptionItem, Value};
use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

pub(crate) struct NatsPubSub {
    nats: Nats,
}

impl NatsPubSub {
    pub(crate) fn new(nats: Nats) -> NatsPubSub {
        NatsPubSub { nats }
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
        let subject = self.nats.layout.topic(topic);
        self.nats
            .client
            .publish(subject, Bytes::from(payload.into_bytes()))
            .await
            .map_err(|e| map_error("publish", e))?;
        // Hand the message to the socket before returning, so what a
        // publisher has published is on its way to the server (and to
        // subscribers) rather than sitting in the client's buffer.
        self.nats
            .client
            .flush()
            .await
            .map_err(|e| map_error("publish", e))
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
            loop {
                tokio::select! {
                    _ = feed.closed.notified() => return,
                    msg = subscriber.next() => match msg {
                        Some(m) => {
                            if let Ok(payload) = Value::new(m.payload.to_vec()) {
                                feed.push(Message { topic: topic.clone(), payload });
                            }
                        }
                        None => return,
                    }
                }
                if feed.is_closed.load(Ordering::SeqCst) {
                    return;
                }
            }
        });
        let items = futures::stream::unfold(Reader(buffer), |reader| async move {
            let item = reader.0.pop().await;
            Some((Ok(item), reader))
        });
        Ok(Subscription::new(items.boxed()))
    }
}

/// Items waiting for the reader, and how many of them are messages.
#[derive(Default)]
struct Pending {
    items: VecDeque<SubscriptionItem>,
    messages: usize,
}

#[derive(Default)]
struct Buffer {
    items: Mutex<Pending>,
    ready: Notify,
    closed: Notify,
    is_closed: AtomicBool,
}

impl Buffer {
    fn push(&self, message: Message) {
        let mut pending = self.items.lock().unwrap_or_else(|p| p.into_inner());
        if pending.messages < crate::SUBSCRIBER_BUFFER {
            pending.items.push_back(SubscriptionItem::Message(message));
            pending.messages += 1;
        } else if let Some(SubscriptionItem::Lagged(n)) = pending.items.back_mut() {
            *n += 1;
        } else {
            pending.items.push_back(SubscriptionItem::Lagged(1));
        }
        drop(pending);
        self.ready.notify_one();
    }

    async fn pop(&self) -> SubscriptionItem {
        loop {
            let notified = self.ready.notified();
            {
                let mut pending = self.items.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(item) = pending.items.pop_front() {
                    if matches!(item, SubscriptionItem::Message(_)) {
                        pending.messages -= 1;
                    }
                    return item;
                }
            }
            notified.await;
        }
    }
}

/// Unsubscribes (stops the feeding task, dropping the NATS subscriber) when
/// the subscription is dropped.
struct Reader(Arc<Buffer>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.is_closed.store(true, Ordering::SeqCst);
        self.0.closed.notify_one();
    }
}
