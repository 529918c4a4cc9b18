//! Queues: messages in push order with per-delivery visibility deadlines,
//! evaluated lazily on each operation (no background timers).

use crate::state::{Namespace, Pulled};
use async_trait::async_trait;
use dprim::queue::{
    Delivery, MessageId, PullOptions, Queue, QueueDepth, QueueOptions, Queues, Receipt,
};
use dprim::{Key, Result, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

pub(crate) struct MemoryQueues {
    ns: Namespace,
}

impl MemoryQueues {
    pub(crate) fn new(ns: Namespace) -> MemoryQueues {
        MemoryQueues { ns }
    }
}

#[async_trait]
impl Queues for MemoryQueues {
    async fn open(&self, name: &Key, options: Option<QueueOptions>) -> Result<Arc<dyn Queue>> {
        self.ns.with(|s| s.open_queue(name, options))?;
        Ok(Arc::new(MemoryQueue {
            ns: self.ns.clone(),
            name: name.clone(),
        }))
    }
}

struct MemoryQueue {
    ns: Namespace,
    name: Key,
}

#[async_trait]
impl Queue for MemoryQueue {
    fn name(&self) -> &Key {
        &self.name
    }

    async fn push(&self, payload: Value) -> Result<MessageId> {
        Ok(self.ns.with(|s| s.push(&self.name, payload)))
    }

    async fn pull(&self, options: PullOptions) -> Result<Option<Delivery>> {
        if let Some(session) = &options.session {
            session.check()?;
        }
        let session = options.session.as_ref().map(|s| s.id());
        let deadline = Instant::now() + options.wait;
        loop {
            let notify = self.ns.with(|s| s.queue_notify(&self.name));
            // Register for wake-ups before looking, so a push between the
            // look and the wait is not missed.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let pulled = self
                .ns
                .with(|s| s.pull(&self.name, options.visibility_timeout, session))?;
            match pulled {
                Pulled::Delivery(d) => return Ok(Some(d)),
                Pulled::Empty { next_change } => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(None);
                    }
                    let wake = next_change.map_or(deadline, |t| t.min(deadline));
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(wake) => {}
                    }
                }
            }
        }
    }

    async fn ack(&self, receipt: &Receipt) -> Result<()> {
        self.ns.with(|s| s.ack(&self.name, receipt))
    }

    async fn nack(&self, receipt: &Receipt, delay: Duration) -> Result<()> {
        self.ns.with(|s| s.nack(&self.name, receipt, delay))
    }

    async fn extend(&self, receipt: &Receipt, visibility_timeout: Duration) -> Result<()> {
        self.ns
            .with(|s| s.extend(&self.name, receipt, visibility_timeout))
    }

    async fn depth(&self) -> Result<QueueDepth> {
        Ok(self.ns.with(|s| s.depth(&self.name)))
    }
}
