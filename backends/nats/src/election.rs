//! Elections: the leader is the head of the election's line; its term is
//! its record's first sequence (kept in a header across proclaims, which
//! rewrite the record in place, conditional on its last sequence).

use crate::line::{LeaveOnDrop, Line, Place};
use crate::store::{owned, Record, TERM_HEADER};
use crate::Nats;
use async_trait::async_trait;
use dprim::election::LeadershipControl;
use dprim::retry::RetryPolicy;
use dprim::{
    Elections, Error, ErrorKind, Key, Leader, Leadership, Result, Session, SessionId, Term, Value,
};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

pub(crate) struct NatsElections {
    nats: Nats,
}

impl NatsElections {
    pub(crate) fn new(nats: Nats) -> NatsElections {
        NatsElections { nats }
    }

    fn line(&self, name: &Key) -> Line {
        Line::new(self.nats.clone(), self.nats.layout.election_line(name))
    }
}

fn leader(r: &Record) -> Result<Leader> {
    Ok(Leader {
        value: Value::new(r.payload.to_vec())?,
        term: Term(r.first_seq()),
        session: SessionId(r.session().unwrap_or(0)),
    })
}

#[async_trait]
impl Elections for NatsElections {
    async fn campaign(&self, name: &Key, value: Value, session: &Session) -> Result<Leadership> {
        let line = self.line(name);
        let place = line.join(session, value.into_bytes()).await?;
        let waiting = LeaveOnDrop::new(line.clone(), place);
        if let Some(place) = waiting.place() {
            line.wait_for_head(place, session, None, &format!("leadership of `{name}`"))
                .await?;
        }
        let place = waiting
            .keep()
            .ok_or_else(|| Error::unexpected("a candidate's place vanished"))?;
        let term = Term(place.seq);
        let control = NatsLeadership {
            line,
            name: name.clone(),
            last: Mutex::new(place.seq),
            place,
        };
        Ok(Leadership::new(
            name.clone(),
            term,
            session.clone(),
            Arc::new(control),
        ))
    }

    async fn leader(&self, name: &Key) -> Result<Option<Leader>> {
        match self.line(name).head().await?.0 {
            Some(r) => leader(&r).map(Some),
            None => Ok(None),
        }
    }

    async fn observe(&self, name: &Key) -> Result<BoxStream<'static, Result<Option<Leader>>>> {
        let line = self.line(name);
        let statistics = self.nats.client.statistics();
        let mut connects = statistics.connects.load(Ordering::SeqCst);
        let (first, mut changes) = head_and_changes(&line).await?;
        let (tx, mut rx) = mpsc::channel(16);
        let _ = tx.send(Ok(first.clone())).await;
        tokio::spawn(async move {
            let mut last = first;
            // A change lost with a reset connection would go unseen until
            // the line changes again: after a reconnect, read it again.
            let mut check = tokio::time::interval(crate::RECONNECT_CHECK);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let broken = tokio::select! {
                    _ = tx.closed() => return,
                    item = changes.next() => !matches!(item, Some(Ok(_))),
                    _ = check.tick() => {
                        if statistics.connects.load(Ordering::SeqCst) == connects {
                            continue;
                        }
                        true
                    }
                };
                // Re-read the head after any change in the line; updates
                // may coalesce, but terms never go back. A failure for a
                // moment (a reconnect) is retried, so observing outlives it.
                let current = if broken {
                    connects = statistics.connects.load(Ordering::SeqCst);
                    RetryPolicy::default()
                        .run(|| head_and_changes(&line))
                        .await
                        .map(|(current, follow)| {
                            changes = follow;
                            current
                        })
                } else {
                    RetryPolicy::default()
                        .run(|| async {
                            let (head, _) = line.head().await?;
                            head.as_ref().map(leader).transpose()
                        })
                        .await
                };
                if !dprim::election::report_observed(&tx, &mut last, current).await {
                    return;
                }
            }
        });
        Ok(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed())
    }
}

type Changes = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Record>> + Send>>;

/// The line's leader, and every change of the line after the read.
async fn head_and_changes(line: &Line) -> Result<(Option<Leader>, Changes)> {
    let (head, rev) = line.head().await?;
    let current = head.as_ref().map(leader).transpose()?;
    let changes: Changes = Box::pin(line.follow_all(rev + 1).await?);
    Ok((current, changes))
}

struct NatsLeadership {
    line: Line,
    name: Key,
    place: Place,
    /// The sequence of the leader record's latest write.
    last: Mutex<u64>,
}

#[async_trait]
impl LeadershipControl for NatsLeadership {
    async fn resign(&self) -> Result<()> {
        self.line.leave(&self.place).await
    }

    async fn proclaim(&self, value: Value) -> Result<()> {
        let nats: &Nats = self.line.nats();
        let expect = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        let mut headers = owned(Some(self.place.session));
        headers.insert(TERM_HEADER, self.place.seq.to_string());
        match nats
            .write(
                &self.place.subject,
                value.into_shared(),
                headers,
                Some(expect),
            )
            .await
        {
            Ok(seq) => {
                *self.last.lock().unwrap_or_else(|p| p.into_inner()) = seq;
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::Conflict => Err(Error::not_leader(format!(
                "term {} of election `{}` is over; proclaim needs the current leader",
                self.place.seq, self.name
            ))),
            Err(e) => Err(e),
        }
    }
}
