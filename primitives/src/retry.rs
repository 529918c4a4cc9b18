//! The one retry layer: retries operations that failed with a `temporary`
//! error (the backend could not be reached, a leader election was under
//! way), with exponential backoff, for a bounded time. Backends never retry
//! on their own, so retries are never stacked.
//!
//! Writes are retried only where a retry cannot apply them twice. A
//! temporary failure may come after the request reached the server (a
//! connection reset, a timeout while waiting for the answer): that attempt
//! may have been applied with its answer lost. After such a failure (any
//! temporary error the backend did not mark [`Error::not_applied`]):
//! - a write that compares versions (`put_if_version`, a conditional
//!   delete, a transaction checking only versions) is retried: an applied
//!   attempt changed the version, so the retry succeeds only if none was
//!   applied, and a retry that finds `Conflict` (what an applied attempt
//!   causes) fails [`ErrorKind::OutcomeUnknown`];
//! - any other write (unconditional put or delete, create, a transaction
//!   with absence checks or none) fails `OutcomeUnknown` at once, because a
//!   retry could apply it a second time after someone saw the first.
//!
//! `OutcomeUnknown` is never `temporary`: the caller reads the key to learn
//! whether the write took effect.

use crate::error::{Error, ErrorKind, Result};
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

    /// Like [`RetryPolicy::run`], for a write that may be retried as
    /// `retry` says once an attempt failed in a way that may have applied
    /// it (a temporary error not marked [`Error::is_not_applied`]).
    /// `what` names the write in an error (built only then).
    pub async fn run_write<T, F, Fut>(
        &self,
        what: impl Fn() -> String,
        retry: WriteRetry,
        mut op: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let start = Instant::now();
        let mut backoff = self.initial_backoff;
        // The first failure that may have applied the write.
        let mut lost: Option<Error> = None;
        loop {
            let result = op().await;
            let failure = match &result {
                Err(e) if e.is_temporary() => e,
                _ => {
                    return match (lost, retry) {
                        (Some(first), WriteRetry::Guarded(kinds))
                            if failed_with(&result, kinds) =>
                        {
                            let found = result.err().map(|e| {
                                format!(
                                    "a retry found {}, which that attempt would have caused itself",
                                    e.kind()
                                )
                            });
                            Err(outcome_unknown(&what(), &first, found.as_deref()))
                        }
                        _ => result,
                    };
                }
            };
            if failure.may_have_applied() {
                match retry {
                    WriteRetry::OnlyNotApplied => {
                        return Err(outcome_unknown(&what(), failure, None));
                    }
                    WriteRetry::Guarded(_) => {
                        lost.get_or_insert_with(|| failure.clone());
                    }
                }
            }
            if start.elapsed() + backoff >= self.max_elapsed {
                return match lost {
                    Some(first) => Err(outcome_unknown(
                        &what(),
                        &first,
                        Some(&format!("retries got no answer either ({failure})")),
                    )),
                    // Nothing was applied: the caller may try again.
                    None => result,
                };
            }
            tracing::debug!(error = %failure, ?backoff, "temporary failure of a write; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }
}

/// When a write may be retried after an attempt that may have been applied
/// with its answer lost. A retry of a write applied once could apply it a
/// second time, and a reader could see both; so only a write that can
/// succeed at most once is retried then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteRetry {
    /// Retried only after failures marked [`Error::not_applied`]: an
    /// unconditional write, a create, a transaction without version checks.
    OnlyNotApplied,
    /// Retried after any temporary failure: the write compares versions,
    /// which an applied attempt would have changed, so a retry succeeds only
    /// if no attempt was applied. A retry failing with one of these kinds
    /// is what an applied attempt causes, and the write then fails
    /// [`ErrorKind::OutcomeUnknown`].
    Guarded(&'static [ErrorKind]),
}

impl WriteRetry {
    /// How a write under `precondition` is retried.
    pub fn for_precondition(precondition: Precondition) -> WriteRetry {
        match precondition {
            Precondition::Version(_) => WriteRetry::Guarded(&[ErrorKind::Conflict]),
            Precondition::None | Precondition::Absent => WriteRetry::OnlyNotApplied,
        }
    }
}

fn outcome_unknown(what: &str, failure: &Error, then: Option<&str>) -> Error {
    let found = then.map(|t| format!(", and {t}")).unwrap_or_default();
    Error::new(
        ErrorKind::OutcomeUnknown,
        format!(
            "{what}: the outcome is unknown: an attempt failed after its request may have reached the server ({failure}){found}; read the key to learn whether the write took effect"
        ),
    )
}

fn failed_with(result: &Result<impl Sized>, kinds: &[ErrorKind]) -> bool {
    matches!(result, Err(e) if kinds.contains(&e.kind()))
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
            .run_write(
                || format!("put `{key}`"),
                WriteRetry::for_precondition(options.precondition),
                || self.inner.put_with(key, value.clone(), options.clone()),
            )
            .await
    }

    async fn delete_with(&self, key: &Key, precondition: Precondition) -> Result<bool> {
        self.policy
            .run_write(
                || format!("delete `{key}`"),
                WriteRetry::for_precondition(precondition),
                || self.inner.delete_with(key, precondition),
            )
            .await
    }

    async fn list(&self, dir: &Key, depth: Depth) -> Result<Listing> {
        self.policy.run(|| self.inner.list(dir, depth)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        // Guarded only if every check compares a version: a check for
        // absence would hold again after someone deleted what an applied
        // attempt created.
        let guarded = !txn.checks.is_empty()
            && txn
                .checks
                .iter()
                .all(|(_, p)| matches!(p, Precondition::Version(_)));
        let retry = if guarded {
            WriteRetry::Guarded(&[ErrorKind::Conflict])
        } else {
            WriteRetry::OnlyNotApplied
        };
        self.policy
            .run_write(
                || "transaction".to_string(),
                retry,
                || self.inner.txn(txn.clone()),
            )
            .await
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

    fn reset() -> Error {
        Error::new(ErrorKind::Unavailable, "connection reset").temporary()
    }

    /// Runs a write whose first attempt fails with `first` and whose later
    /// attempts answer `then`; returns the result and the number of attempts.
    async fn write(retry: WriteRetry, first: Error, then: Result<u32>) -> (Result<u32>, u32) {
        let calls = AtomicU32::new(0);
        let r = RetryPolicy::default()
            .run_write(
                || "put `k`".to_string(),
                retry,
                || async {
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        Err(first.clone())
                    } else {
                        then.clone()
                    }
                },
            )
            .await;
        (r, calls.load(Ordering::SeqCst))
    }

    /// A version-guarded write is retried after a failure that may have
    /// applied it; a retry finding `Conflict` (what that attempt would
    /// cause) reports the outcome unknown, a retry that succeeds is the answer.
    #[tokio::test(start_paused = true)]
    async fn guarded_write_retry_finding_conflict_is_outcome_unknown() {
        let guarded = WriteRetry::Guarded(&[ErrorKind::Conflict]);
        let (r, calls) = write(guarded, reset(), Err(Error::conflict("version 7"))).await;
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutcomeUnknown, "{e}");
        assert!(e.to_string().contains("connection reset"), "{e}");
        assert!(e.to_string().contains("conflict"), "{e}");
        assert!(!e.is_temporary());
        assert_eq!(calls, 2);

        let (r, calls) = write(guarded, reset(), Ok(9)).await;
        assert_eq!(r.unwrap(), 9);
        assert_eq!(calls, 2);

        // A conflict with no failure before it is the truth.
        let (r, _) = write(guarded, Error::conflict("version 7"), Ok(9)).await;
        assert_eq!(r.unwrap_err().kind(), ErrorKind::Conflict);

        // So is a conflict after a failure that certainly did not apply.
        let (r, _) = write(
            guarded,
            reset().not_applied(),
            Err(Error::conflict("version 7")),
        )
        .await;
        assert_eq!(r.unwrap_err().kind(), ErrorKind::Conflict);
    }

    /// Any other write is not retried after a failure that may have applied
    /// it, and is retried after one that certainly did not.
    #[tokio::test(start_paused = true)]
    async fn unguarded_write_is_retried_only_when_not_applied() {
        let (r, calls) = write(WriteRetry::OnlyNotApplied, reset(), Ok(9)).await;
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutcomeUnknown, "{e}");
        assert!(e.to_string().contains("connection reset"), "{e}");
        assert_eq!(calls, 1);

        let (r, calls) = write(WriteRetry::OnlyNotApplied, reset().not_applied(), Ok(9)).await;
        assert_eq!(r.unwrap(), 9);
        assert_eq!(calls, 2);
    }

    /// A guarded write whose retries run out of time after a failure that
    /// may have applied it reports the outcome unknown, not a temporary
    /// error a caller would retry into a misleading `Conflict`; one whose
    /// failures all certainly did not apply reports the last of them.
    #[tokio::test(start_paused = true)]
    async fn write_out_of_retries_after_a_possible_apply_is_outcome_unknown() {
        let guarded = WriteRetry::Guarded(&[ErrorKind::Conflict]);
        let (r, _) = write(guarded, reset(), Err(reset())).await;
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutcomeUnknown, "{e}");
        assert!(e.to_string().contains("no answer"), "{e}");

        let unsent = || reset().not_applied();
        let (r, _) = write(guarded, unsent(), Err(unsent())).await;
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.is_temporary());
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
