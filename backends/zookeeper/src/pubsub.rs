//! PubSub: a message is a persistent-sequential znode under the topic's
//! directory; subscribers follow the directory with a persistent recursive
//! watch installed before they return, so they see exactly the messages
//! created after subscribing, in creation order (which is publish order per
//! publisher). Publishers trim old messages so a topic's directory stays
//! bounded; a subscriber that falls so far behind that a message is gone
//! before it was read gets `Lagged`, never silent loss.

use crate::layout::sequence;
use crate::Zk;
use async_trait::async_trait;
use dprim::retry::RetryPolicy;
use dprim::{ErrorKind, Key, Message, PubSub, Result, Subscription, SubscriptionItem, Value};
use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use zookeeper_client::{AddWatchMode, CreateMode, EventType, SessionState};

/// Messages kept per topic directory.
const KEEP: i64 = 1024;
/// Trim a topic every this many messages.
const TRIM_EVERY: i64 = 128;

pub(crate) struct ZkPubSub {
    zk: Zk,
}

impl ZkPubSub {
    pub(crate) fn new(zk: Zk) -> ZkPubSub {
        ZkPubSub { zk }
    }
}

async fn trim(zk: Zk, dir: String, below: i64) -> Result<()> {
    let client = zk.client().await?;
    let children = zk.call("list", client.list_children(&dir)).await?;
    for c in children {
        if sequence(&c).is_some_and(|s| s < below) {
            let _ = client.delete(&format!("{dir}/{c}"), None).await;
        }
    }
    Ok(())
}

#[async_trait]
impl PubSub for ZkPubSub {
    async fn publish(&self, topic: &Key, payload: Value) -> Result<()> {
        let client = self.zk.client().await?;
        let dir = self.zk.layout().topic(topic);
        let options = self.zk.options(CreateMode::PersistentSequential);
        let prefix = format!("{dir}/m-");
        for _ in 0..3 {
            match self
                .zk
                .call(
                    "create",
                    client.create(&prefix, payload.as_bytes(), &options),
                )
                .await
            {
                Ok((_, seq)) => {
                    let seq = seq.into_i64();
                    if seq % TRIM_EVERY == 0 && seq > KEEP {
                        let zk = self.zk.clone();
                        tokio::spawn(async move {
                            if let Err(e) = trim(zk, dir, seq - KEEP).await {
                                tracing::debug!(error = %e, "trimming a zookeeper topic failed");
                            }
                        });
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    self.zk.mkdirs(&client, &dir).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(dprim::Error::unexpected(format!(
            "could not create the topic directory {dir}"
        )))
    }

    /// A publish returns once ZooKeeper has committed its znode.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn subscribe(&self, topic: &Key) -> Result<Subscription> {
        let client = self.zk.client().await?;
        let dir = self.zk.layout().topic(topic);
        self.zk.mkdirs(&client, &dir).await?;
        let mut watcher = self
            .zk
            .call(
                "watch",
                client.watch(&dir, AddWatchMode::PersistentRecursive),
            )
            .await?;
        // Messages already there when the watch was in place are not ours.
        let children = self.zk.call("list", client.list_children(&dir)).await?;
        let mut last = children
            .iter()
            .filter_map(|c| sequence(c))
            .max()
            .unwrap_or(-1);
        let buffer = Arc::new(Buffer::default());
        let feed = buffer.clone();
        let zk = self.zk.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let prefix = format!("{dir}/");
            let mut disconnected = false;
            // A read that fails for a moment (a connection reset) is tried
            // again: only a message trimmed before it was read is lost.
            let fetch = |path: String, client: zookeeper_client::Client, zk: Zk| async move {
                RetryPolicy::default()
                    .run(|| zk.call("get", client.get_data(&path)))
                    .await
            };
            loop {
                let event = tokio::select! {
                    _ = feed.closed.notified() => return,
                    e = watcher.changed() => e,
                };
                let mut paths: Vec<(i64, String)> = Vec::new();
                match event.event_type {
                    EventType::NodeCreated if event.path.starts_with(&prefix) => {
                        if let Some(seq) = sequence(&event.path) {
                            paths.push((seq, event.path.clone()));
                        }
                    }
                    EventType::Session => match event.session_state {
                        SessionState::Disconnected => disconnected = true,
                        SessionState::SyncConnected if disconnected => {
                            // Events may be lost while disconnected: catch up
                            // from the directory itself.
                            disconnected = false;
                            let listed = RetryPolicy::default()
                                .run(|| zk.call("list", client.list_children(&dir)))
                                .await;
                            let Ok(children) = listed else {
                                // Messages published meanwhile cannot be
                                // found: end rather than skip them silently.
                                feed.end();
                                return;
                            };
                            let mut found: Vec<(i64, String)> = children
                                .iter()
                                .filter_map(|c| sequence(c).map(|s| (s, format!("{dir}/{c}"))))
                                .collect();
                            found.sort();
                            paths.extend(found);
                        }
                        SessionState::Expired | SessionState::Closed | SessionState::AuthFailed => {
                            // The watch died with its session: everything
                            // from now on is missed; report it as lag per
                            // message is impossible, so end the subscription.
                            feed.end();
                            return;
                        }
                        _ => {}
                    },
                    _ => {}
                }
                for (seq, path) in paths {
                    if seq <= last {
                        continue;
                    }
                    last = seq;
                    match fetch(path, client.clone(), zk.clone()).await {
                        Ok((data, _)) => {
                            if let Ok(payload) = Value::new(data) {
                                feed.push(Message {
                                    topic: topic.clone(),
                                    payload,
                                });
                            }
                        }
                        // Trimmed before this slow subscriber read it, or
                        // unreadable for longer than the retries wait.
                        Err(_) => feed.lag(1),
                    }
                }
            }
        });
        let items = futures::stream::unfold(Reader(buffer), |reader| async move {
            let item = reader.0.pop().await?;
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
    ended: bool,
}

#[derive(Default)]
struct Buffer {
    items: Mutex<Pending>,
    ready: Notify,
    closed: Notify,
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

    fn lag(&self, n: u64) {
        let mut pending = self.items.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(SubscriptionItem::Lagged(m)) = pending.items.back_mut() {
            *m += n;
        } else {
            pending.items.push_back(SubscriptionItem::Lagged(n));
        }
        drop(pending);
        self.ready.notify_one();
    }

    fn end(&self) {
        self.items.lock().unwrap_or_else(|p| p.into_inner()).ended = true;
        self.ready.notify_one();
    }

    async fn pop(&self) -> Option<SubscriptionItem> {
        loop {
            let notified = self.ready.notified();
            {
                let mut pending = self.items.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(item) = pending.items.pop_front() {
                    if matches!(item, SubscriptionItem::Message(_)) {
                        pending.messages -= 1;
                    }
                    return Some(item);
                }
                if pending.ended {
                    return None;
                }
            }
            notified.await;
        }
    }
}

/// Unsubscribes (stops the feeding task) when the subscription is dropped.
struct Reader(Arc<Buffer>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.closed.notify_one();
    }
}
