//! Consumers waiting in pulls on one queue, for a backend's test of what a
//! message costs its server while many consumers wait (the herd effect,
//! read from the server's own counters):
//!
//! ```no_run
//! # async fn example(producer: dprim::Backend, consumers: Vec<dprim::Backend>) -> Result<(), String> {
//! use dprim_conformance::waiting::WaitingConsumers;
//! let name = dprim::Key::new("jobs").map_err(|e| e.to_string())?;
//! let queue = producer.queues().open(&name, None).await.map_err(|e| e.to_string())?;
//! let mut waiting = WaitingConsumers::start(consumers, &name).await?;
//! waiting.push_and_take(queue.as_ref(), 0).await?;
//! // ... read the server's counters, push more, read them again ...
//! # Ok(()) }
//! ```

use dprim::queue::{PullOptions, Queue};
use dprim::{Backend, Key, Value};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long each consumer's pull waits (it pulls again after that).
const WAIT: Duration = Duration::from_secs(30);

/// Consumers, one per backend, each pulling from one queue until it got a
/// message, which it acks. Dropping this stops those still waiting.
pub struct WaitingConsumers {
    taken: mpsc::UnboundedReceiver<Result<(usize, Value), String>>,
    consumers: Vec<JoinHandle<()>>,
}

impl WaitingConsumers {
    /// Opens queue `name` through each backend (consumer `i` is
    /// `backends[i]`, ideally each its own connection, as separate
    /// processes would have) and starts its consumer.
    pub async fn start(backends: Vec<Backend>, name: &Key) -> Result<WaitingConsumers, String> {
        let (tx, taken) = mpsc::unbounded_channel();
        let mut consumers = Vec::with_capacity(backends.len());
        for (c, backend) in backends.into_iter().enumerate() {
            let queue = backend
                .queues()
                .open(name, None)
                .await
                .map_err(|e| format!("consumer {c}: open queue `{name}`: {e}"))?;
            let tx = tx.clone();
            consumers.push(tokio::spawn(async move {
                let _backend = backend;
                loop {
                    let options = PullOptions {
                        wait: WAIT,
                        ..PullOptions::default()
                    };
                    let taken = match queue.pull(options).await {
                        Ok(None) => continue,
                        Ok(Some(d)) => match queue.ack(&d.receipt).await {
                            Ok(()) => Ok((c, d.payload)),
                            Err(e) => Err(format!("consumer {c}: ack: {e}")),
                        },
                        Err(e) => Err(format!("consumer {c}: pull: {e}")),
                    };
                    let _ = tx.send(taken);
                    return;
                }
            }));
        }
        Ok(WaitingConsumers { taken, consumers })
    }

    /// Pushes message `m<i>` through `queue`, waits until a consumer has
    /// taken and acked it, then lets the consumers settle for a moment;
    /// returns which consumer took it.
    pub async fn push_and_take(&mut self, queue: &dyn Queue, i: usize) -> Result<usize, String> {
        let payload = Value::new(format!("m{i}")).map_err(|e| e.to_string())?;
        queue
            .push(payload.clone())
            .await
            .map_err(|e| format!("push m{i}: {e}"))?;
        let (c, got) = tokio::time::timeout(Duration::from_secs(20), self.taken.recv())
            .await
            .map_err(|_| format!("no waiting consumer took m{i} within 20 s"))?
            .ok_or("every consumer has ended")??;
        if got.as_bytes() != payload.as_bytes() {
            return Err(format!("consumer {c} took {got:?} after m{i} was pushed"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(c)
    }
}

impl Drop for WaitingConsumers {
    fn drop(&mut self) {
        for c in &self.consumers {
            c.abort();
        }
    }
}
