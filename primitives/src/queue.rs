//! Queue: durable, at-least-once work queues with visibility timeouts.

use crate::error::{Error, Result};
use crate::key::{Key, Value};
use crate::session::Session;
use async_trait::async_trait;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Identifies a pushed message within its queue.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct MessageId(pub u64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Names one delivery of one message: what `ack`, `nack` and `extend` take.
/// Opaque; printable and parsable so a CLI user can pass it back.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Receipt(pub String);

impl fmt::Display for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message handed to one consumer.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The message's id (the same across redeliveries).
    pub id: MessageId,
    /// The payload.
    pub payload: Value,
    /// 1 on the first delivery, 2 on the first redelivery, ...
    pub attempt: u32,
    /// What to pass to ack / nack / extend.
    pub receipt: Receipt,
}

/// How a queue treats failing messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueOptions {
    /// Deliveries a message gets before it moves to the dead-letter queue.
    /// Default 5; must be at least 1.
    pub max_attempts: u32,
    /// Where dead messages go. Default: `<queue>/dead-letter`.
    pub dead_letter: Option<Key>,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            max_attempts: 5,
            dead_letter: None,
        }
    }
}

impl QueueOptions {
    /// The dead-letter queue for `queue` under these options.
    pub fn dead_letter_for(&self, queue: &Key) -> Result<Key> {
        match &self.dead_letter {
            Some(k) => Ok(k.clone()),
            None => queue.join("dead-letter"),
        }
    }
    /// The options as backends store them beside a queue: `max_attempts`
    /// and the dead-letter queue, one per line.
    pub fn encode(&self, queue: &Key) -> Result<Vec<u8>> {
        Ok(format!("{}\n{}", self.max_attempts, self.dead_letter_for(queue)?).into_bytes())
    }

    /// Reads what [`QueueOptions::encode`] wrote; anything unreadable falls
    /// back to the default for that field.
    pub fn decode(raw: &[u8], queue: &Key) -> QueueOptions {
        let text = String::from_utf8_lossy(raw);
        let mut lines = text.lines();
        let max_attempts = lines
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or(QueueOptions::default().max_attempts);
        let dead_letter = lines.next().and_then(|l| Key::new(l).ok());
        QueueOptions {
            max_attempts,
            dead_letter: dead_letter.or_else(|| queue.join("dead-letter").ok()),
        }
    }

    /// Checks the options.
    pub fn validate(&self, queue: &Key) -> Result<()> {
        if self.max_attempts == 0 {
            return Err(Error::invalid("max_attempts must be at least 1"));
        }
        if self.dead_letter.as_ref() == Some(queue) {
            return Err(Error::invalid(format!(
                "queue `{queue}` cannot be its own dead-letter queue"
            )));
        }
        Ok(())
    }
}

/// Options of [`Queue::pull`].
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// How long the delivery stays invisible to other consumers unless acked,
    /// nacked or extended.
    pub visibility_timeout: Duration,
    /// How long to wait for a message when the queue is empty (zero: don't wait).
    pub wait: Duration,
    /// The consumer's session: if it is lost, the delivery becomes visible
    /// again at once instead of after the visibility timeout.
    pub session: Option<Session>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            visibility_timeout: Duration::from_secs(30),
            wait: Duration::ZERO,
            session: None,
        }
    }
}

/// Message counts of a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QueueDepth {
    /// Messages waiting to be pulled (including nacked-with-delay ones).
    pub ready: u64,
    /// Messages currently held by a consumer.
    pub in_flight: u64,
}

impl QueueDepth {
    /// Messages not yet acked.
    pub fn total(&self) -> u64 {
        self.ready + self.in_flight
    }
}

/// One queue.
#[async_trait]
pub trait Queue: Send + Sync {
    /// The queue's name.
    fn name(&self) -> &Key;

    /// Adds a message.
    ///
    /// # Behavior
    /// Once `push` returns, the message is stored and will be delivered
    /// until acked or dead-lettered.
    async fn push(&self, payload: Value) -> Result<MessageId>;

    /// Takes the next visible message, waiting up to `options.wait`.
    ///
    /// # Behavior
    /// - Returns `Ok(None)` if nothing became visible in time.
    /// - A delivered message is invisible to every other consumer until it
    ///   is acked, nacked, its visibility timeout passes, or the consumer's
    ///   session is lost; then it is delivered again with `attempt + 1`.
    /// - Messages are delivered in push order (when the backend declares
    ///   `fifo_queues`), redeliveries first.
    /// - However many messages wait and however many are held, a pull finds
    ///   the next visible one.
    /// - A message whose `max_attempts`-th delivery fails moves to the
    ///   dead-letter queue with its payload intact, whether or not anyone
    ///   uses the original queue again: pulling from (or measuring) the
    ///   dead-letter queue finds it.
    async fn pull(&self, options: PullOptions) -> Result<Option<Delivery>>;

    /// Acknowledges a delivery: the message is removed for good.
    ///
    /// # Behavior
    /// - Acking twice (or acking a message that is gone) succeeds.
    /// - Acking a delivery whose visibility timeout passed and whose message
    ///   went back to the queue (or to another consumer) fails `Conflict`:
    ///   the message will be processed again.
    async fn ack(&self, receipt: &Receipt) -> Result<()>;

    /// Gives a delivery back: visible again after `delay`.
    ///
    /// # Behavior
    /// Counts as a failed attempt (dead-letters after `max_attempts`). A
    /// stale receipt fails `Conflict`.
    async fn nack(&self, receipt: &Receipt, delay: Duration) -> Result<()>;

    /// Keeps a delivery invisible for `visibility_timeout` from now.
    ///
    /// # Behavior
    /// A stale receipt fails `Conflict`.
    async fn extend(&self, receipt: &Receipt, visibility_timeout: Duration) -> Result<()>;

    /// Counts messages.
    async fn depth(&self) -> Result<QueueDepth>;
}

/// Opens queues.
#[async_trait]
pub trait Queues: Send + Sync {
    /// Opens (creating if needed) the queue `name`, setting its options when given.
    ///
    /// # Behavior
    /// - Options belong to the queue: opening it with `Some(options)` replaces
    ///   them for every consumer; `None` keeps the queue's current options
    ///   (the defaults for a queue never configured).
    /// - Invalid options (`max_attempts` 0, a queue as its own dead-letter
    ///   queue) are `InvalidArgument`.
    async fn open(&self, name: &Key, options: Option<QueueOptions>) -> Result<Arc<dyn Queue>>;
}
