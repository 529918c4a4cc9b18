//! PubSub: one bounded broadcast channel per topic; its lag detection is
//! exactly the contract's `Lagged(n)`.

use crate::state::Namespace;
use async_trait::async_trait;
use dprim::{Key, PubSub, Result, Subscription, SubscriptionItem, Value};
use futures::StreamExt;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

pub(crate) struct MemoryPubSub {
    ns: Namespace,
}

impl MemoryPubSub {
    pub(crate) fn new(ns: Namespace) -> MemoryPubSub {
        MemoryPubSub { ns }
    }
}

#[async_trait]
impl PubSub for MemoryPubSub {
    async fn publish(&self, topic: &Key, payload: Value) -> Result<()> {
        self.ns.with(|s| s.publish(topic, payload));
        Ok(())
    }

    /// A publish hands its message to the subscribers before it returns.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn subscribe(&self, topic: &Key) -> Result<Subscription> {
        let rx = self.ns.with(|s| s.subscribe(topic));
        let items = BroadcastStream::new(rx).map(|item| {
            Ok(match item {
                Ok(message) => SubscriptionItem::Message(message),
                Err(BroadcastStreamRecvError::Lagged(n)) => SubscriptionItem::Lagged(n),
            })
        });
        Ok(Subscription::new(items.boxed()))
    }
}
