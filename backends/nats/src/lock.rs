//! Locks: the holder is the head of the lock's line; the fencing token is
//! its record's first sequence.

use crate::line::{LeaveOnDrop, Line, Place};
use crate::Nats;
use async_trait::async_trait;
use dprim::lock::LockRelease;
use dprim::{Error, FencingToken, Key, LockGuard, Locks, Result, Session};
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct NatsLocks {
    nats: Nats,
}

impl NatsLocks {
    pub(crate) fn new(nats: Nats) -> NatsLocks {
        NatsLocks { nats }
    }

    fn line(&self, name: &Key) -> Line {
        Line::new(self.nats.clone(), self.nats.layout.lock_line(name))
    }
}

fn guard(line: Line, name: &Key, session: &Session, place: Option<Place>) -> Result<LockGuard> {
    let place = place.ok_or_else(|| Error::unexpected("a lock place vanished"))?;
    Ok(LockGuard::new(
        name.clone(),
        FencingToken(place.seq),
        session.clone(),
        Arc::new(Release { line, place }),
    ))
}

#[async_trait]
impl Locks for NatsLocks {
    async fn lock(&self, name: &Key, session: &Session, timeout: Duration) -> Result<LockGuard> {
        let line = self.line(name);
        let deadline = tokio::time::Instant::now() + timeout;
        let place = line.join(session, Vec::new()).await?;
        let waiting = LeaveOnDrop::new(line.clone(), place);
        if let Some(place) = waiting.place() {
            line.wait_for_head(place, session, Some(deadline), &format!("lock `{name}`"))
                .await?;
        }
        guard(line, name, session, waiting.keep())
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
