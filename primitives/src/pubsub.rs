//! PubSub: fire-and-forget fan-out.

use crate::error::Result;
use crate::key::{Key, Value};
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::Stream;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A published message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The topic it was published on.
    pub topic: Key,
    /// The payload, byte for byte.
    pub payload: Value,
}

/// One item of a subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubscriptionItem {
    /// A message.
    Message(Message),
    /// The subscriber fell behind and its bounded buffer overflowed: this many
    /// messages were dropped for it. The subscription continues.
    Lagged(u64),
}

/// A stream of [`SubscriptionItem`]s. Dropping it unsubscribes.
pub struct Subscription {
    inner: BoxStream<'static, Result<SubscriptionItem>>,
}

impl Subscription {
    /// Wraps a backend stream.
    pub fn new(inner: BoxStream<'static, Result<SubscriptionItem>>) -> Subscription {
        Subscription { inner }
    }
    /// The next item; `None` once the subscription has ended.
    pub async fn next(&mut self) -> Option<Result<SubscriptionItem>> {
        futures::StreamExt::next(&mut self.inner).await
    }
}

impl Stream for Subscription {
    type Item = Result<SubscriptionItem>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Subscription")
    }
}

/// Topics with at-most-once, non-durable delivery.
#[async_trait]
pub trait PubSub: Send + Sync {
    /// Publishes a message.
    ///
    /// # Behavior
    /// - Delivered at most once to every subscriber whose `subscribe` call
    ///   returned before `publish` was called, while it stays connected.
    /// - Not stored: a later subscriber never sees it.
    /// - Messages from one publisher arrive in publish order.
    /// - Publishing with no subscribers succeeds.
    async fn publish(&self, topic: &Key, payload: Value) -> Result<()>;

    /// Waits until the backend has taken every message this client
    /// published before the call.
    ///
    /// # Behavior
    /// - `publish` may return while its message is still queued in the
    ///   client (the NATS backend does this); once `flush` returns, every
    ///   earlier publish of this client reaches the subscribers it is
    ///   delivered to even if the client is dropped or its process exits
    ///   at once.
    /// - A publisher that exits right after publishing calls it last.
    /// - A flush that cannot confirm every earlier publish fails. When the
    ///   client's connection was re-established after one of them, that
    ///   message may or may not have been delivered, and the flush fails
    ///   [`ErrorKind::OutcomeUnknown`](crate::ErrorKind::OutcomeUnknown):
    ///   publish again what must arrive, knowing that subscribers may then
    ///   get it twice.
    async fn flush(&self) -> Result<()>;

    /// Subscribes to one topic (exact match; no wildcards).
    ///
    /// # Behavior
    /// - Receives every message published after this call returned.
    /// - Each subscriber has a bounded buffer (the `subscriber_buffer`
    ///   capability). When it overflows the subscriber gets `Lagged(n)` with the
    ///   number of messages it missed, never silent loss or unbounded memory.
    /// - The buffer also holds at most `subscriber_buffer_bytes` of unread
    ///   payload; a subscriber past that lags the same way.
    async fn subscribe(&self, topic: &Key) -> Result<Subscription>;
}
