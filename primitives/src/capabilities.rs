//! What a backend declares it can do. The conformance suite checks the
//! declared level and skips (with the capability's name as the reason) any
//! case a backend does not claim.

use std::time::Duration;

/// A backend's capability set, grouped by primitive.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Kv.
    pub kv: KvCapabilities,
    /// Sessions.
    pub session: SessionCapabilities,
    /// Locks.
    pub lock: LockCapabilities,
    /// PubSub.
    pub pubsub: PubSubCapabilities,
    /// Queues.
    pub queue: QueueCapabilities,
}

impl Capabilities {
    /// Assembles a capability set.
    pub fn new(
        kv: KvCapabilities,
        session: SessionCapabilities,
        lock: LockCapabilities,
        pubsub: PubSubCapabilities,
        queue: QueueCapabilities,
    ) -> Capabilities {
        Capabilities {
            kv,
            session,
            lock,
            pubsub,
            queue,
        }
    }

    /// Flattened `(name, value)` pairs, for `dprim check` and reports.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        vec![
            ("kv.linearizable", self.kv.linearizable.to_string()),
            ("kv.transactions", self.kv.transactions.to_string()),
            ("kv.watch_history", self.kv.watch_history.to_string()),
            (
                "session.min_ttl",
                humantime::format_duration(self.session.min_ttl).to_string(),
            ),
            ("lock.fair", self.lock.fair.to_string()),
            (
                "pubsub.subscriber_buffer",
                self.pubsub.subscriber_buffer.to_string(),
            ),
            (
                "pubsub.subscriber_buffer_bytes",
                self.pubsub.subscriber_buffer_bytes.to_string(),
            ),
            ("queue.fifo", self.queue.fifo.to_string()),
            ("queue.dead_letter", self.queue.dead_letter.to_string()),
        ]
    }
}

/// Kv capabilities.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct KvCapabilities {
    /// Reads reflect every write acknowledged before they started.
    pub linearizable: bool,
    /// Atomic multi-key transactions.
    pub transactions: bool,
    /// How many past changes a watch can resume from (0: none).
    pub watch_history: usize,
}

impl KvCapabilities {
    /// Assembles Kv capabilities.
    pub fn new(linearizable: bool, transactions: bool, watch_history: usize) -> Self {
        KvCapabilities {
            linearizable,
            transactions,
            watch_history,
        }
    }
}

/// Session capabilities.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionCapabilities {
    /// The shortest TTL the backend accepts.
    pub min_ttl: Duration,
}

impl SessionCapabilities {
    /// Assembles session capabilities.
    pub fn new(min_ttl: Duration) -> Self {
        SessionCapabilities { min_ttl }
    }
}

/// Lock capabilities.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockCapabilities {
    /// Waiters are granted the lock in arrival order.
    pub fair: bool,
}

impl LockCapabilities {
    /// Assembles lock capabilities.
    pub fn new(fair: bool) -> Self {
        LockCapabilities { fair }
    }
}

/// PubSub capabilities.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PubSubCapabilities {
    /// Messages a subscriber may fall behind before it gets `Lagged`.
    pub subscriber_buffer: usize,
    /// Payload bytes a subscriber may hold unread before it gets `Lagged`,
    /// whichever of the two limits is reached first.
    pub subscriber_buffer_bytes: usize,
}

impl PubSubCapabilities {
    /// Assembles PubSub capabilities for a buffer bounded by message count
    /// alone (its byte bound is then `subscriber_buffer` values of the
    /// largest size).
    pub fn new(subscriber_buffer: usize) -> Self {
        PubSubCapabilities {
            subscriber_buffer,
            subscriber_buffer_bytes: subscriber_buffer.saturating_mul(crate::MAX_VALUE_BYTES),
        }
    }

    /// Bounds the buffer by payload bytes as well.
    pub fn with_buffer_bytes(mut self, subscriber_buffer_bytes: usize) -> Self {
        self.subscriber_buffer_bytes = subscriber_buffer_bytes;
        self
    }
}

/// Queue capabilities.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueCapabilities {
    /// Messages are delivered in push order (redeliveries first).
    pub fifo: bool,
    /// Messages move to a dead-letter queue after `max_attempts`.
    pub dead_letter: bool,
}

impl QueueCapabilities {
    /// Assembles queue capabilities.
    pub fn new(fifo: bool, dead_letter: bool) -> Self {
        QueueCapabilities { fifo, dead_letter }
    }
}
