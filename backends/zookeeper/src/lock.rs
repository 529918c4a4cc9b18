//! Locks: the holder is the head of the lock's line; the fencing token is
//! its znode's czxid.

use crate::line::{LeaveOnDrop, Line, Place};
use crate::Zk;
use async_trait::async_trait;
use dprim::lock::LockRelease;
use dprim::{Error, FencingToken, Key, LockGuard, Locks, Result, Session};
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct ZkLocks {
    zk: Zk,
}

impl ZkLocks {
    pub(crate) fn new(zk: Zk) -> ZkLocks {
        ZkLocks { zk }
    }

    fn line(&self, name: &Key) -> Line {
        Line::new(self.zk.clone(), self.zk.layout().lock_line(name))
    }
}

fn guard(line: Line, name: &Key, session: &Session, place: Option<Place>) -> Result<LockGuard> {
    let place = place.ok_or_else(|| Error::unexpected("a granted lock lost its place"))?;
    let token = FencingToken(place.czxid as u64);
    Ok(LockGuard::new(
        name.clone(),
        token,
        session.clone(),
        Arc::new(Release { line, place }),
    ))
}

#[async_trait]
impl Locks for ZkLocks {
    async fn lock(&self, name: &Key, session: &Session, timeout: Duration) -> Result<LockGuard> {
        let line = self.line(name);
        let deadline = tokio::time::Instant::now() + timeout;
        let place = line.join(session, &[]).await?;
        let waiting = LeaveOnDrop::new(line.clone(), place);
        if let Some(place) = waiting.place() {
            line.wait_for_head(place, session, Some(deadline), &format!("lock `{name}`"))
                .await?;
        }
        guard(line, name, session, waiting.keep())
    }

    async fn try_lock(&self, name: &Key, session: &Session) -> Result<Option<LockGuard>> {
        let line = self.line(name);
        let place = line.join(session, &[]).await?;
        let waiting = LeaveOnDrop::new(line.clone(), place);
        let at_head = match waiting.place() {
            Some(p) => line.at_head(p).await?,
            None => false,
        };
        if !at_head {
            // Dropping `waiting` leaves the line.
            return Ok(None);
        }
        guard(line, name, session, waiting.keep()).map(Some)
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
