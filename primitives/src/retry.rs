//! The one retry layer: retries operations that failed with a `temporary`
//! error (the backend could not be reached, a leader election was under
//! way), with exponential backoff, for a bounded time. Backends never retry
//! on their own, so retries are never stacked.
//!
//! A retried conditional write whose first attempt was applied but whose
//! answer was lost reports `AlreadyExists`/`Conflict` on the retry, as with
//! any at-least-once transport; callers that must know re-read the key.

use crate::error::Result;
use crate::key::{Key, Value};
use crate::kv::{
    Depth, Entry, Kv, Listing, Precondition, PutOptions, Txn, TxnResult, Version, WatchStart,
    WatchStream, WatchTarget,
};
use async_trait::async_trait;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long and how often to retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Give up (returning the last error) once this much time has passed.
    pub max_elapsed: Duration,
    /// First pause between attempts; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest pause between attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 15 s in all, so an etcd or ZooKeeper leader election (about 1 s) or a
    /// NATS stream leader election (about 6 s) is ridden out.
    fn default() -> Self {
        RetryPolicy {
            max_elapsed: Duration::from_secs(15),
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// Runs `op` until it succeeds, fails with a non-temporary error, or the
    /// policy's time is up.
    pub async fn run<T, F, Fut>(&self, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let start = Instant::now();
        let mut backoff = self.initial_backoff;
        loop {
            match op().await {
                Err(e) if e.is_temporary() && start.elapsed() + backoff < self.max_elapsed => {
                    tracing::debug!(error = %e, ?backoff, "temporary failure; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.max_backoff);
                }
                result => return result,
            }
        }
    }
}

/// A [`Kv`] that retries temporary failures of another.
pub struct RetryingKv {
    inner: Arc<dyn Kv>,
    policy: RetryPolicy,
}

impl RetryingKv {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Kv>, policy: RetryPolicy) -> RetryingKv {
        RetryingKv { inner, policy }
    }
}

#[async_trait]
impl Kv for RetryingKv {
    async fn get(&self, key: &Key) -> Result<Option<Entry>> {
        self.policy.run(|| self.inner.get(key)).await
    }

    async fn put_with(&self, key: &Key, value: Value, options: PutOptions) -> Result<Version> {
        self.policy
            .run(|| self.inner.put_with(key, value.clone(), options.clone()))
            .await
    }

    async fn delete_with(&self, key: &Key, precondition: Precondition) -> Result<bool> {
        self.policy
            .run(|| self.inner.delete_with(key, precondition))
            .await
    }

    async fn list(&self, dir: &Key, depth: Depth) -> Result<Listing> {
        self.policy.run(|| self.inner.list(dir, depth)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        self.policy.run(|| self.inner.txn(txn.clone())).await
    }

    async fn watch(&self, target: WatchTarget, start: WatchStart) -> Result<WatchStream> {
        self.policy
            .run(|| self.inner.watch(target.clone(), start))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, ErrorKind};
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn retries_temporary_errors_only() {
        let policy = RetryPolicy::default();
        let calls = AtomicU32::new(0);
        let r: Result<u32> = policy
            .run(|| async {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                if n < 3 {
                    Err(Error::new(ErrorKind::Unavailable, "down").temporary())
                } else {
                    Ok(n)
                }
            })
            .await;
        assert_eq!(r.unwrap(), 3);

        let calls = AtomicU32::new(0);
        let r: Result<()> = policy
            .run(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Error::conflict("no"))
            })
            .await;
        assert_eq!(r.unwrap_err().kind(), ErrorKind::Conflict);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_elapsed() {
        let policy = RetryPolicy::default();
        let start = Instant::now();
        let r: Result<()> = policy
            .run(|| async { Err(Error::new(ErrorKind::Unavailable, "down").temporary()) })
            .await;
        assert_eq!(r.unwrap_err().kind(), ErrorKind::Unavailable);
        assert!(start.elapsed() <= policy.max_elapsed);
        assert!(start.elapsed() >= policy.max_elapsed - policy.max_backoff * 2);
    }
}
