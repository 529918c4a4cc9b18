//! PubSub: a message is a put of the topic's key; subscribers watch that key
//! from the moment they subscribe, so each put is delivered once per
//! subscriber, in revision order (which is publish order per publisher),
//! with no replay. Message keys hang off a short publisher lease so topics
//! do not keep their last message stored for long.

use crate::Etcd;
use async_trait::async_trait;
use dprim::{
    Error, ErrorKind, Key, Message, PubSub, Result, Subscription, SubscriptionItem, Value,
};
use etcd_client::{EventType, WatchOptions};
use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a published message stays stored at most.
const MESSAGE_LEASE_TTL: i64 = 30;
/// Re-grant the publisher lease this long before it could expire.
const MESSAGE_LEASE_REFRESH: Duration = Duration::from_secs(20);

pub(crate) struct EtcdPubSub {
    etcd: Etcd,
    lease: tokio::sync::Mutex<Option<(i64, Instant)>>,
}

impl EtcdPubSub {
    pub(crate) fn new(etcd: Etcd) -> EtcdPubSub {
        EtcdPubSub {
            etcd,
            lease: tokio::sync::Mutex::new(None),
        }
    }

    async fn lease(&self, fresh: bool) -> Result<i64> {
        let mut slot = self.lease.lock().await;
        if let Some((id, granted)) = *slot {
            if !fresh && granted.elapsed() < MESSAGE_LEASE_REFRESH {
                return Ok(id);
            }
        }
        let mut client = self.etcd.client.lease_client();
        let resp = self
            .etcd
            .call("lease grant", client.grant(MESSAGE_LEASE_TTL, None))
            .await?;
        *slot = Some((resp.id(), Instant::now()));
        Ok(resp.id())
    }
}

#[async_trait]
impl PubSub for EtcdPubSub {
    async fn publish(&self, topic: &Key, payload: Value) -> Result<()> {
        let key = self.etcd.layout.topic(topic);
        let bytes = payload.into_bytes();
        for fresh in [false, true] {
            let lease = self.lease(fresh).await?;
            let options = etcd_client::PutOptions::new().with_lease(lease);
            match self
                .etcd
                .call(
                    "put",
                    self.etcd
                        .kv()
                        .put(key.clone(), bytes.clone(), Some(options)),
                )
                .await
            {
                Ok(_) => return Ok(()),
                // The publisher lease expired (e.g. the process slept): grant
                // a new one and publish again.
                Err(e) if e.kind() == ErrorKind::SessionLost && !fresh => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::unexpected("publish failed twice on a fresh lease"))
    }

    /// A publish returns once etcd has committed its put.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn subscribe(&self, topic: &Key) -> Result<Subscription> {
        let key = self.etcd.layout.topic(topic);
        let mut client = self.etcd.client.watch_client();
        let mut stream = self
            .etcd
            .call("watch", client.watch(key.clone(), None))
            .await?;
        // The created response fixes the start point before we return.
        let created = self.etcd.call("watch", stream.message()).await?;
        let mut next = created
            .as_ref()
            .and_then(|r| r.header())
            .map_or(0, |h| h.revision())
            + 1;
        let buffer = Arc::new(Buffer::default());
        let feed = buffer.clone();
        let etcd = self.etcd.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = feed.closed.notified() => return,
                    msg = stream.message() => match msg {
                        Ok(Some(resp)) => {
                            for ev in resp.events() {
                                if ev.event_type() != EventType::Put {
                                    continue;
                                }
                                if let Some(kv) = ev.kv() {
                                    next = kv.mod_revision() + 1;
                                    if let Ok(payload) = Value::new(kv.value().to_vec()) {
                                        feed.push(Message { topic: topic.clone(), payload });
                                    }
                                }
                            }
                        }
                        _ => {
                            // Reconnect from the next revision; if history is
                            // gone the missed messages are counted as lag.
                            loop {
                                if feed.is_closed() { return; }
                                let mut client = etcd.client.watch_client();
                                let options = WatchOptions::new().with_start_revision(next);
                                match etcd.call("watch", client.watch(key.clone(), Some(options))).await {
                                    Ok(s) => { stream = s; break; }
                                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                                }
                            }
                        }
                    }
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

/// The subscriber's bounded buffer: when full, new messages are counted and
/// surfaced as one `Lagged(n)` item in their place.
#[derive(Default)]
struct Pending {
    items: VecDeque<SubscriptionItem>,
    /// Messages (not lag markers) in `items`.
    messages: usize,
}

#[derive(Default)]
struct Buffer {
    items: Mutex<Pending>,
    ready: Notify,
    closed: Notify,
    is_closed: std::sync::atomic::AtomicBool,
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

    fn is_closed(&self) -> bool {
        self.is_closed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Unsubscribes (stops the feeding task) when the subscription is dropped.
struct Reader(Arc<Buffer>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0
            .is_closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.closed.notify_one();
    }
}
