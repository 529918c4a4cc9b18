//! Queue: durable, at-least-once work queues with visibility timeouts.

use crate::error::{Error, Result};
use crate::key::{Key, Value};
use crate::session::Session;
use async_trait::async_trait;
use futures::future::BoxFuture;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
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
    /// - A pull dropped before it returns holds no message: a delivery made
    ///   for it after its caller left is given back at once, as by `nack`
    ///   with no delay, and counts as an attempt.
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

/// Tells a pull run by [`pull_to_the_end`] that its caller stopped waiting
/// for it.
#[derive(Clone, Debug)]
pub struct Abandoned(Arc<AtomicBool>);

impl Abandoned {
    /// Whether the caller stopped waiting.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Resolves once the caller stopped waiting; a pull waiting for
    /// messages selects on it to stop waiting then.
    ///
    /// It registers no waker: the flag is set only when the caller drops
    /// the pull, which then moves into a task of its own, whose first poll
    /// finds it set.
    pub async fn wait(&self) {
        std::future::poll_fn(|_| {
            if self.is_set() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// Gives a delivery back; see [`pull_to_the_end`].
pub type GiveBack = Box<dyn FnOnce(Delivery) -> BoxFuture<'static, ()> + Send>;

/// Runs a backend's pull so that a caller that stops waiting for it (drops
/// the future, as a `select!` with a shutdown signal does) cannot leave a
/// message claimed by nobody, invisible until its visibility timeout.
///
/// The pull runs in the caller's task while the caller waits. Dropped
/// before it finished, it moves into a task of its own and goes on with
/// its [`Abandoned`] set, which tells it to stop waiting for messages. A
/// delivery it still makes (a claim already on its way, or a message a
/// server delivers for a request it still holds) is handed to
/// `give_back`, which nacks it with no delay: the message is visible again
/// at once, and the delivery counts as an attempt.
pub fn pull_to_the_end<F>(pull: impl FnOnce(Abandoned) -> F, give_back: GiveBack) -> PullToTheEnd
where
    F: Future<Output = Result<Option<Delivery>>> + Send + 'static,
{
    let abandoned = Arc::new(AtomicBool::new(false));
    PullToTheEnd {
        pulling: Some(Box::pin(pull(Abandoned(abandoned.clone())))),
        abandoned,
        give_back: Some(give_back),
    }
}

/// The future of [`pull_to_the_end`].
pub struct PullToTheEnd {
    /// `None` once it answered.
    pulling: Option<BoxFuture<'static, Result<Option<Delivery>>>>,
    abandoned: Arc<AtomicBool>,
    give_back: Option<GiveBack>,
}

impl Future for PullToTheEnd {
    type Output = Result<Option<Delivery>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(pulling) = this.pulling.as_mut() else {
            return Poll::Ready(Err(Error::unexpected(
                "a queue pull was polled after it answered",
            )));
        };
        let answer = std::task::ready!(pulling.as_mut().poll(cx));
        this.pulling = None;
        Poll::Ready(answer)
    }
}

impl Drop for PullToTheEnd {
    fn drop(&mut self) {
        let Some(pulling) = self.pulling.take() else {
            return;
        };
        self.abandoned.store(true, Ordering::Release);
        let give_back = self.give_back.take();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let (Ok(Some(delivery)), Some(give_back)) = (pulling.await, give_back) {
                    give_back(delivery).await;
                }
            });
        }
    }
}

/// Nacks a delivery nobody will process, with no delay, retrying for a
/// while where the failure may pass (a nack compares the claim, so a retry
/// never applies twice). For a backend's [`GiveBack`].
pub async fn give_back(queue: &(impl Queue + ?Sized), receipt: &Receipt) {
    let nacked = crate::retry::RetryPolicy::default()
        .run(|| queue.nack(receipt, Duration::ZERO))
        .await;
    if let Err(e) = nacked {
        tracing::debug!(queue = %queue.name(), %receipt, error = %e, "giving back the delivery of an abandoned pull failed; it comes back after its visibility timeout");
    }
}

/// [`give_back`] in the background, for a claim whose answer was lost: a
/// receipt that never held anything fails its nack harmlessly.
pub fn give_back_later(queue: Arc<impl Queue + 'static>, receipt: Receipt) {
    tokio::spawn(async move { give_back(queue.as_ref(), &receipt).await });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(n: u64) -> Delivery {
        Delivery {
            id: MessageId(n),
            payload: Value::new(b"m".to_vec()).unwrap_or_else(|_| unreachable!()),
            attempt: 1,
            receipt: Receipt(format!("r{n}")),
        }
    }

    fn recorder() -> (GiveBack, tokio::sync::mpsc::UnboundedReceiver<Receipt>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let give_back: GiveBack = Box::new(move |d: Delivery| {
            Box::pin(async move {
                let _ = tx.send(d.receipt);
            })
        });
        (give_back, rx)
    }

    #[tokio::test]
    async fn an_answered_pull_gives_nothing_back() {
        let (give_back, mut given) = recorder();
        let got = pull_to_the_end(|_| async { Ok(Some(delivery(1))) }, give_back).await;
        assert_eq!(got.ok().flatten().map(|d| d.id), Some(MessageId(1)));
        tokio::task::yield_now().await;
        assert!(given.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_claim_made_after_the_caller_left_is_given_back() {
        let (give_back, mut given) = recorder();
        let (claimed, claim) = tokio::sync::oneshot::channel::<()>();
        let (told, mut was_told) = tokio::sync::oneshot::channel();
        let pull = pull_to_the_end(
            move |abandoned| async move {
                // A claim on its way: it lands after the caller left.
                let _ = claim.await;
                let _ = told.send(abandoned.is_set());
                Ok(Some(delivery(2)))
            },
            give_back,
        );
        // The caller gives up while the claim is on its way.
        let gave_up = tokio::time::timeout(Duration::from_millis(20), pull).await;
        assert!(gave_up.is_err());
        let _ = claimed.send(());
        let back = tokio::time::timeout(Duration::from_secs(5), given.recv()).await;
        assert_eq!(back.ok().flatten(), Some(Receipt("r2".into())));
        assert_eq!(was_told.try_recv().ok(), Some(true));
    }

    #[tokio::test]
    async fn a_waiting_pull_is_told_its_caller_left() {
        let (give_back, mut given) = recorder();
        let (ended, mut end) = tokio::sync::oneshot::channel();
        let pull = pull_to_the_end(
            move |abandoned| async move {
                abandoned.wait().await;
                let _ = ended.send(());
                Ok(None)
            },
            give_back,
        );
        assert!(tokio::time::timeout(Duration::from_millis(20), pull)
            .await
            .is_err());
        let stopped = tokio::time::timeout(Duration::from_secs(5), &mut end).await;
        assert!(
            stopped.is_ok(),
            "the pull still waits after its caller left"
        );
        assert!(given.recv().await.is_none(), "nothing to give back");
    }
}
