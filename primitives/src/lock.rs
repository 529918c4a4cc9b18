//! Lock: mutual exclusion across processes, with fencing tokens.

use crate::error::{Error, Result};
use crate::key::Key;
use crate::session::Session;
use async_trait::async_trait;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A number that strictly increases per lock name across holders and
/// failovers. Pass it to the resource you protect; the resource rejects any
/// token lower than the highest it has seen.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The backend side of a held lock.
#[async_trait]
pub trait LockRelease: Send + Sync {
    /// Releases the lock; the next waiter in line acquires it.
    async fn release(&self) -> Result<()>;
}

/// Proof of holding a lock. Release it with [`LockGuard::unlock`]; dropping it
/// releases in the background, and the lock is freed anyway when the
/// session ends.
pub struct LockGuard {
    name: Key,
    token: FencingToken,
    session: Session,
    release: Option<Arc<dyn LockRelease>>,
}

impl LockGuard {
    /// Assembles a guard (for backends).
    pub fn new(
        name: Key,
        token: FencingToken,
        session: Session,
        release: Arc<dyn LockRelease>,
    ) -> LockGuard {
        LockGuard {
            name,
            token,
            session,
            release: Some(release),
        }
    }
    /// The lock's name.
    pub fn name(&self) -> &Key {
        &self.name
    }
    /// This holder's fencing token.
    pub fn fencing_token(&self) -> FencingToken {
        self.token
    }
    /// The session the lock is held with.
    pub fn session(&self) -> &Session {
        &self.session
    }
    /// `Ok` while the lock's session is proven alive.
    pub fn check(&self) -> Result<()> {
        self.session.check()
    }
    /// Resolves when the holder's session is lost: from then on the lock may
    /// be granted to someone else, so stop acting on it.
    pub async fn lost(&self) -> Error {
        self.session.lost().await
    }
    /// Releases the lock.
    ///
    /// # Behavior
    /// The next waiter in line is granted the lock with a larger token.
    /// Unlocking after the session was lost succeeds (there is nothing left to release).
    pub async fn unlock(mut self) -> Result<()> {
        match self.release.take() {
            Some(r) => r.release().await,
            None => Ok(()),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    if let Err(e) = release.release().await {
                        tracing::warn!(error = %e, "releasing a dropped lock guard failed; the session's end will free it");
                    }
                });
            }
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("name", &self.name)
            .field("token", &self.token)
            .field("session", &self.session.id())
            .finish()
    }
}

/// Named locks bound to sessions.
///
/// Locks are not reentrant: a second acquire with the same session waits like
/// any other contender (and `try_lock` returns `None`).
#[async_trait]
pub trait Locks: Send + Sync {
    /// Acquires `name`, waiting up to `timeout`.
    ///
    /// # Behavior
    /// - At most one guard per name exists at a time across all clients.
    /// - Fencing tokens strictly increase per name across holders and failovers.
    /// - Waiters are granted the lock in the order they asked (FIFO, when the
    ///   backend declares `fair_locks`), and a holder's release wakes only the next waiter.
    /// - A waiter that gives up (timeout, dropped future, lost session)
    ///   leaves the queue without letting anyone jump the current holder.
    /// - Fails `Timeout` after `timeout`; `SessionLost` if the session is or
    ///   becomes lost while waiting.
    /// - When the holder's session ends, the lock passes to the next waiter.
    async fn lock(&self, name: &Key, session: &Session, timeout: Duration) -> Result<LockGuard>;

    /// Acquires `name` only if it is free now.
    ///
    /// # Behavior
    /// Returns `Ok(None)` when the lock is held or others are already queued
    /// for it; never waits.
    async fn try_lock(&self, name: &Key, session: &Session) -> Result<Option<LockGuard>>;
}
