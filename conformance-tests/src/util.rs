// Small helpers shared by the cases: failing with a message, naming the
// context of a backend error, waiting with generous deadlines.

use crate::Fail;
use dprim::{Error, ErrorKind, Key, Value};
use std::future::Future;
use std::time::Duration;

/// How long the suite waits for something the contract says will happen
/// (much longer than it should take: cases check behaviour, not speed).
pub(crate) const WAIT: Duration = Duration::from_secs(5);

/// How long the suite watches for something that must NOT happen.
pub(crate) const QUIET: Duration = Duration::from_millis(300);

/// How many requests a cancellation case drops, each after a random time
/// below [`DROP_WITHIN_MICROS`]: on a loopback server most are dropped while
/// their first request is on its way.
pub(crate) const DROPS: u32 = 40;
/// See [`DROPS`].
pub(crate) const DROP_WITHIN_MICROS: u64 = 3_000;

/// Fails the case with a formatted message.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::Fail::Failed(format!($($arg)*)))
    };
}

/// Fails the case with a formatted message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err($crate::Fail::Failed(format!($($arg)*)));
        }
    };
}

/// Fails the case unless `left == right`, showing both.
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($arg:tt)*) => {
        match (&$left, &$right) {
            (l, r) => {
                if l != r {
                    return Err($crate::Fail::Failed(format!(
                        "{}: expected {:?}, got {:?}",
                        format!($($arg)*),
                        r,
                        l
                    )));
                }
            }
        }
    };
}

pub(crate) use {ensure, ensure_eq, fail};

/// Adds "what was being done" to a backend error.
pub(crate) trait Context<T> {
    /// Maps an error to a failure: `<what>: <error>`.
    fn ctx(self, what: &str) -> Result<T, Fail>;
}

impl<T> Context<T> for dprim::Result<T> {
    fn ctx(self, what: &str) -> Result<T, Fail> {
        self.map_err(|e| Fail::Failed(format!("{what}: unexpected error: {e}")))
    }
}

impl<T> Context<T> for Option<T> {
    fn ctx(self, what: &str) -> Result<T, Fail> {
        self.ok_or_else(|| Fail::Failed(format!("{what}: got nothing")))
    }
}

/// A key from a literal.
pub(crate) fn key(s: &str) -> Result<Key, Fail> {
    Key::new(s).map_err(|e| Fail::Failed(format!("the suite built an invalid key `{s}`: {e}")))
}

/// A value from bytes.
pub(crate) fn val(bytes: impl Into<Vec<u8>>) -> Result<Value, Fail> {
    Value::new(bytes.into())
        .map_err(|e| Fail::Failed(format!("the suite built an invalid value: {e}")))
}

/// Expects `result` to fail with one of `kinds`; returns the error.
pub(crate) fn expect_err<T: std::fmt::Debug>(
    result: dprim::Result<T>,
    kinds: &[ErrorKind],
    what: &str,
) -> Result<Error, Fail> {
    match result {
        Ok(v) => Err(Fail::Failed(format!(
            "{what}: expected {} but it succeeded with {v:?}",
            kinds_text(kinds)
        ))),
        Err(e) if kinds.contains(&e.kind()) => Ok(e),
        Err(e) => Err(Fail::Failed(format!(
            "{what}: expected {} but got {}: {e}",
            kinds_text(kinds),
            e.kind()
        ))),
    }
}

fn kinds_text(kinds: &[ErrorKind]) -> String {
    kinds
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Awaits `fut` for at most `limit`, failing with `what` when it takes longer.
pub(crate) async fn within<F: Future>(
    limit: Duration,
    what: &str,
    fut: F,
) -> Result<F::Output, Fail> {
    tokio::time::timeout(limit, fut).await.map_err(|_| {
        Fail::Failed(format!(
            "{what}: nothing after {}",
            humantime::format_duration(limit)
        ))
    })
}

/// Whether `fut` completes within `limit` (for things that must not happen).
pub(crate) async fn completes<F: Future>(limit: Duration, fut: F) -> Option<F::Output> {
    tokio::time::timeout(limit, fut).await.ok()
}

/// Polls `check` every 20 ms until it returns `true`, for at most `limit`.
pub(crate) async fn eventually<F, Fut>(
    limit: Duration,
    what: &str,
    mut check: F,
) -> Result<(), Fail>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, Fail>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            fail!(
                "{what}: still not true after {}",
                humantime::format_duration(limit)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Calls a fault hook, turning `Unsupported` into a skip naming the hook.
pub(crate) fn hook_result(result: dprim::Result<()>, hook: &str) -> Result<(), Fail> {
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::Unsupported => Err(Fail::Skipped(format!(
            "requires fault hook {hook} (Backend::faults() returned unsupported: {e})"
        ))),
        Err(e) => Err(Fail::Failed(format!("fault hook {hook} failed: {e}"))),
    }
}
