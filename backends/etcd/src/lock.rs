//! Locks: the holder is the head of the lock's line; the fencing token is
//! its key's create revision.

use crate::line::{LeaveOnDrop, Line, Place};
use crate::Etcd;
use async_trait::async_trait;
use dprim::lock::LockRelease;
use dprim::{FencingToken, Key, LockGuard, Locks, Result, Session};
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct EtcdLocks {
    etcd: Etcd,
}

impl EtcdLocks {
    pub(crate) fn new(etcd: Etcd) -> EtcdLocks {
        EtcdLocks { etcd }
    }

    fn line(&self, name: &Key) -> Line {
        Line::new(self.etcd.clone(), self.etcd.layout.lock_line(name))
    }
}

fn guard(line: Line, name: &Key, session: &Session, place: Place) -> LockGuard {
    let token = FencingToken(place.revision as u64);
    LockGuard::new(
        name.clone(),
        token,
        session.clone(),
        Arc::new(Release { line, place }),
    )
}

#[async_trait]
impl Locks for EtcdLocks {
    async fn lock(&self, name: &Key, session: &Session, timeout: Duration) -> Result<LockGuard> {
        let line = self.line(name);
        let deadline = tokio::time::Instant::now() + timeout;
        let place = line.join(session, Vec::new()).await?;
        let waiting = LeaveOnDrop::new(line.clone(), place);
        if let Some(place) = waiting.place() {
            line.wait_for_head(place, session, Some(deadline), &format!("lock `{name}`"))
                .await?;
        }
        Ok(guard(line, name, session, waiting.keep()))
    }

    async fn try_lock(&self, name: &Key, session: &Session) -> Result<Option<LockGuard>> {
        let line = self.line(name);
        let place = line.join(session, Vec::new()).await?;
        let waiting = LeaveOnDrop::new(line.clone(), place);
        let at_head = match waiting.place() {
            Some(p) => line.at_head(p).await?,
            None => false,
        };
        if !at_head {
            // Dropping `waiting` leaves the line.
            return Ok(None);
        }
        Ok(Some(guard(line, name, session, waiting.keep())))
    }
}

struct Release {
    line: Line,
    place: Place,
}

#[async_trait]
impl LockRelease for Release {
    async fn release(&self) -> Result<()> {
        self.line.leave(&self.place).await
    }
}
