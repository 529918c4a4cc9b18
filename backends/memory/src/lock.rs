//! Locks: a FIFO line per name in the namespace state.

use crate::state::{Join, Namespace, State};
use async_trait::async_trait;
use dprim::lock::LockRelease;
use dprim::{Error, FencingToken, Key, LockGuard, Locks, Result, Session};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

pub(crate) struct MemoryLocks {
    ns: Namespace,
}

impl MemoryLocks {
    pub(crate) fn new(ns: Namespace) -> MemoryLocks {
        MemoryLocks { ns }
    }

    fn guard(&self, name: &Key, session: &Session, token: u64) -> LockGuard {
        let release = MemoryRelease {
            ns: self.ns.clone(),
            name: name.clone(),
            token,
        };
        LockGuard::new(
            name.clone(),
            FencingToken(token),
            session.clone(),
            Arc::new(release),
        )
    }
}

/// A place in a line (lock or election) that is left properly however the
/// waiting ends: granted, timed out, session lost, or the future dropped.
pub(crate) struct InLine {
    ns: Namespace,
    name: Key,
    ticket: u64,
    rx: oneshot::Receiver<u64>,
    settled: bool,
    leave: fn(&mut State, &Key, u64, Option<u64>),
}

impl InLine {
    pub(crate) fn new(
        ns: Namespace,
        name: Key,
        ticket: u64,
        rx: oneshot::Receiver<u64>,
        leave: fn(&mut State, &Key, u64, Option<u64>),
    ) -> InLine {
        InLine {
            ns,
            name,
            ticket,
            rx,
            settled: false,
            leave,
        }
    }

    /// Waits for the grant, up to `timeout`, while the session lives.
    pub(crate) async fn wait(
        mut self,
        session: &Session,
        timeout: Option<Duration>,
        what: &str,
    ) -> Result<u64> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let granted = tokio::select! {
            r = &mut self.rx => r.map_err(|_| Error::session_lost(format!(
                "session {} ended while waiting for {what}", session.id()
            ))),
            // `check` reports a closed session as SessionLost, as waiting demands.
            e = session.lost() => Err(session.check().err().unwrap_or(e)),
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => Err(Error::timeout(format!(
                "{what} not granted within {}", humantime_like(timeout)
            ))),
        };
        if granted.is_ok() {
            self.settled = true;
        }
        granted
    }
}

fn humantime_like(d: Option<Duration>) -> String {
    d.map(|d| format!("{d:?}")).unwrap_or_default()
}

impl Drop for InLine {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let granted = self.rx.try_recv().ok();
        let (name, ticket, leave) = (self.name.clone(), self.ticket, self.leave);
        self.ns.with(|s| leave(s, &name, ticket, granted));
    }
}

#[async_trait]
impl Locks for MemoryLocks {
    async fn lock(&self, name: &Key, session: &Session, timeout: Duration) -> Result<LockGuard> {
        session.check()?;
        let joined = self.ns.with(|s| s.join_lock(name, session.id(), true))?;
        let token = match joined {
            Join::Granted(token) => token,
            Join::Queued { ticket, rx } => {
                let line = InLine::new(
                    self.ns.clone(),
                    name.clone(),
                    ticket,
                    rx,
                    State::leave_lock_line,
                );
                line.wait(session, Some(timeout), &format!("lock `{name}`"))
                    .await?
            }
            Join::Busy => unreachable_busy()?,
        };
        Ok(self.guard(name, session, token))
    }

    async fn try_lock(&self, name: &Key, session: &Session) -> Result<Option<LockGuard>> {
        session.check()?;
        match self.ns.with(|s| s.join_lock(name, session.id(), false))? {
            Join::Granted(token) => Ok(Some(self.guard(name, session, token))),
            _ => Ok(None),
        }
    }
}

fn unreachable_busy() -> Result<u64> {
    Err(Error::unexpected(
        "a waiting lock request was refused as busy",
    ))
}

struct MemoryRelease {
    ns: Namespace,
    name: Key,
    token: u64,
}

#[async_trait]
impl LockRelease for MemoryRelease {
    async fn release(&self) -> Result<()> {
        self.ns.with(|s| s.release_lock(&self.name, self.token));
        Ok(())
    }
}
