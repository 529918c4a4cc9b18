//! The waiting line behind locks and elections: each participant writes a
//! record `<line>.<uid>` owned by its session; the sequence it was first
//! written at is its place in line (and its fencing token or term, since
//! stream sequences only grow). A participant waits only for the removal of
//! the record just ahead of it, so a release wakes exactly one waiter (no
//! herd), and a waiter that leaves never lets anyone jump the holder (its
//! successor then waits on the record ahead of it).

use crate::store::{owned, Record};
use crate::Nats;
use bytes::Bytes;
use dprim::retry::RetryPolicy;
use dprim::{Error, Result, Session};
use futures::StreamExt;
use std::time::Duration;
use tokio::time::Instant;

/// One place in a line.
#[derive(Clone, Debug)]
pub(crate) struct Place {
    pub(crate) subject: String,
    pub(crate) seq: u64,
    pub(crate) session: u64,
}

#[derive(Clone)]
pub(crate) struct Line {
    nats: Nats,
    prefix: String,
}

impl Line {
    pub(crate) fn new(nats: Nats, prefix: String) -> Line {
        Line { nats, prefix }
    }

    pub(crate) fn nats(&self) -> &Nats {
        &self.nats
    }

    /// Joins the end of the line.
    pub(crate) async fn join(&self, session: &Session, value: Vec<u8>) -> Result<Place> {
        session.check()?;
        let subject = format!("{}.{:016x}", self.prefix, rand::random::<u64>());
        let place = Place {
            subject,
            seq: 0,
            session: session.id().0,
        };
        let joining = LeaveOnDrop::joining(self.clone(), place.clone());
        let written = self
            .nats
            .write_owned(
                &place.subject,
                Bytes::from(value),
                owned(None),
                Some(0),
                session.id().0,
            )
            .await;
        joining.keep();
        match written {
            Ok(seq) => Ok(Place { seq, ..place }),
            Err(e) => {
                // A place written with its answer lost would stand in line
                // for as long as the session lives, in front of this very
                // caller when it tries again.
                if e.may_have_applied() {
                    if let Err(gone) = self.leave(&place).await {
                        tracing::warn!(error = %gone, "removing a place whose join failed; the session's end will clear it");
                    }
                }
                Err(e)
            }
        }
    }

    /// Leaves the line (or gives up the head position), retrying temporary
    /// failures: a place left behind blocks everyone behind it for as long
    /// as its session lives, and purging it twice is harmless.
    pub(crate) async fn leave(&self, place: &Place) -> Result<()> {
        RetryPolicy::default()
            .run(|| async {
                self.nats.purge(&place.subject, None).await?;
                self.nats
                    .purge(
                        &self.nats.layout.index_entry(place.session, &place.subject),
                        None,
                    )
                    .await
                    .map(|_| ())
            })
            .await
    }

    /// Everyone in line, in order, and the revision of that read.
    pub(crate) async fn members(&self) -> Result<(Vec<Record>, u64)> {
        let (mut records, rev) = self.nats.scan_live(&format!("{}.*", self.prefix)).await?;
        records.sort_by_key(|r| r.first_seq());
        Ok((records, rev))
    }

    /// The head of the line, if anyone is in it.
    pub(crate) async fn head(&self) -> Result<(Option<Record>, u64)> {
        let (members, rev) = self.members().await?;
        Ok((members.into_iter().next(), rev))
    }

    /// Whether `place` is at the head now.
    pub(crate) async fn at_head(&self, place: &Place) -> Result<bool> {
        let (members, _) = self.members().await?;
        Ok(members.first().is_some_and(|r| r.subject == place.subject))
    }

    /// Waits until `place` is at the head of the line, the session is lost,
    /// or `deadline` passes.
    pub(crate) async fn wait_for_head(
        &self,
        place: &Place,
        session: &Session,
        deadline: Option<Instant>,
        what: &str,
    ) -> Result<()> {
        loop {
            session.check()?;
            let (members, rev) = self.members().await?;
            let Some(mine) = members.iter().position(|r| r.subject == place.subject) else {
                return Err(Error::session_lost(format!(
                    "session {} ended while waiting for {what}",
                    session.id()
                )));
            };
            if mine == 0 {
                return Ok(());
            }
            let ahead = members[mine - 1].subject.clone();
            let gone = self.nats.wait_deleted(&ahead, rev + 1);
            tokio::select! {
                r = gone => r?,
                e = session.lost() => return Err(session.check().err().unwrap_or(e)),
                _ = sleep_until(deadline) => {
                    return Err(Error::timeout(format!("{what} not granted in time")));
                }
            }
        }
    }

    /// Follows every change in the line from `from` on (for observers).
    pub(crate) async fn follow_all(
        &self,
        from: u64,
    ) -> Result<impl futures::Stream<Item = Result<Record>> + Send + 'static> {
        let follow = self
            .nats
            .follow(&format!("{}.*", self.prefix), Some(from))
            .await?;
        Ok(follow.changes.map(|r| r.map(|(r, _)| r)))
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// How long after removing the place of a cancelled join it is removed
/// once more: the server may store a write it had already received after a
/// purge requested later.
const REMOVE_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// Leaves the line in the background unless told the place was kept, so a
/// timed-out, cancelled or failed waiter never blocks the line.
pub(crate) struct LeaveOnDrop {
    line: Line,
    place: Option<Place>,
    /// For a place whose join may still be on its way: leave once more
    /// this long after the first time.
    again_after: Option<Duration>,
}

impl LeaveOnDrop {
    pub(crate) fn new(line: Line, place: Place) -> LeaveOnDrop {
        LeaveOnDrop {
            line,
            place: Some(place),
            again_after: None,
        }
    }

    /// Guards a join on its way: dropped before [`LeaveOnDrop::keep`] (a
    /// campaign or lock request cancelled), it removes the place the join
    /// may have made, which nobody would ever leave otherwise.
    fn joining(line: Line, place: Place) -> LeaveOnDrop {
        LeaveOnDrop {
            line,
            place: Some(place),
            again_after: Some(REMOVE_AGAIN_AFTER),
        }
    }

    pub(crate) fn place(&self) -> Option<&Place> {
        self.place.as_ref()
    }

    /// Keeps the place (it is now held by a guard or leadership).
    pub(crate) fn keep(mut self) -> Option<Place> {
        self.place.take()
    }
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        if let Some(place) = self.place.take() {
            let line = self.line.clone();
            let again_after = self.again_after;
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    let passes = [Some(Duration::ZERO), again_after];
                    for pause in passes.into_iter().flatten() {
                        tokio::time::sleep(pause).await;
                        if let Err(e) = line.leave(&place).await {
                            tracing::warn!(error = %e, "leaving a NATS line failed; the session's end will clear it");
                            return;
                        }
                    }
                });
            }
        }
    }
}
