//! Elections: the leader is the head of the election's line; its term is
//! its znode's czxid; proclaim rewrites its znode's data in place, only
//! while the znode is still owned by the leader's session.

use crate::line::{LeaveOnDrop, Line, Place};
use crate::Zk;
use async_trait::async_trait;
use dprim::election::LeadershipControl;
use dprim::retry::RetryPolicy;
use dprim::{Elections, Error, Key, Leader, Leadership, Result, Session, SessionId, Term, Value};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::sync::Arc;
use tokio::sync::mpsc;
use zookeeper_client::{AddWatchMode, Stat};

pub(crate) struct ZkElections {
    zk: Zk,
}

impl ZkElections {
    pub(crate) fn new(zk: Zk) -> ZkElections {
        ZkElections { zk }
    }

    fn line(&self, name: &Key) -> Line {
        Line::new(self.zk.clone(), self.zk.layout().election_line(name))
    }
}

fn leader(data: Vec<u8>, stat: &Stat) -> Result<Leader> {
    Ok(Leader {
        value: Value::new(data)?,
        term: Term(stat.czxid as u64),
        session: SessionId(stat.ephemeral_owner as u64),
    })
}

async fn current(line: &Line) -> Result<Option<Leader>> {
    match line.head().await? {
        Some((data, stat)) => leader(data, &stat).map(Some),
        None => Ok(None),
    }
}

#[async_trait]
impl Elections for ZkElections {
    async fn campaign(&self, name: &Key, value: Value, session: &Session) -> Result<Leadership> {
        let line = self.line(name);
        let place = line.join(session, value.as_bytes()).await?;
        let waiting = LeaveOnDrop::new(line.clone(), place);
        if let Some(place) = waiting.place() {
            line.wait_for_head(place, session, None, &format!("leadership of `{name}`"))
                .await?;
        }
        let place = waiting
            .keep()
            .ok_or_else(|| Error::unexpected("an elected candidate lost its place"))?;
        let term = Term(place.czxid as u64);
        let control = ZkLeadership {
            line,
            name: name.clone(),
            place,
            session: session.clone(),
        };
        Ok(Leadership::new(
            name.clone(),
            term,
            session.clone(),
            Arc::new(control),
        ))
    }

    async fn leader(&self, name: &Key) -> Result<Option<Leader>> {
        current(&self.line(name)).await
    }

    async fn observe(&self, name: &Key) -> Result<BoxStream<'static, Result<Option<Leader>>>> {
        let line = self.line(name);
        let client = self.zk.client().await?;
        // Watch first, then read: no change between is missed.
        let mut watcher = self
            .zk
            .call(
                "watch",
                client.watch(line.dir(), AddWatchMode::PersistentRecursive),
            )
            .await?;
        let first = current(&line).await?;
        let (tx, mut rx) = mpsc::channel(16);
        let _ = tx.send(Ok(first.clone())).await;
        tokio::spawn(async move {
            let mut last = first;
            loop {
                let event = tokio::select! {
                    _ = tx.closed() => return,
                    e = watcher.changed() => e,
                };
                let terminal = matches!(
                    event.session_state,
                    zookeeper_client::SessionState::Expired
                        | zookeeper_client::SessionState::Closed
                        | zookeeper_client::SessionState::AuthFailed
                ) && event.event_type == zookeeper_client::EventType::Session;
                // Re-read the head after any change in the line; updates
                // may coalesce, but terms never go back. A failure for a
                // moment (a reset connection) is retried: skipping the read
                // would leave a change unreported until the next one.
                let now = RetryPolicy::default().run(|| current(&line)).await;
                if !dprim::election::report_observed(&tx, &mut last, now).await {
                    return;
                }
                if terminal {
                    // The watch died with its session: watch again on a new one.
                    let zk = line.zk().clone();
                    let renewed = async {
                        let client = zk.client().await?;
                        zk.call(
                            "watch",
                            client.watch(line.dir(), AddWatchMode::PersistentRecursive),
                        )
                        .await
                    };
                    match renewed.await {
                        Ok(w) => watcher = w,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
            }
        });
        Ok(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed())
    }
}

struct ZkLeadership {
    line: Line,
    name: Key,
    place: Place,
    session: Session,
}

#[async_trait]
impl LeadershipControl for ZkLeadership {
    async fn resign(&self) -> Result<()> {
        self.line.leave(&self.place).await
    }

    async fn proclaim(&self, value: Value) -> Result<()> {
        let zk = self.line.zk();
        let not_leader = || {
            Error::not_leader(format!(
                "term {} of election `{}` is over; proclaim needs the current leader",
                self.place.czxid, self.name
            ))
        };
        let client = zk.session_client(&self.session).map_err(|_| not_leader())?;
        let stat = match zk
            .call("exists", client.check_stat(&self.place.path))
            .await?
        {
            Some(s) if s.ephemeral_owner == self.place.owner && s.czxid == self.place.czxid => s,
            _ => return Err(not_leader()),
        };
        match zk
            .call(
                "set",
                client.set_data(&self.place.path, value.as_bytes(), Some(stat.version)),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == dprim::ErrorKind::NotFound => Err(not_leader()),
            // A concurrent proclaim by the same leader: retry once on the new version.
            Err(e) if e.kind() == dprim::ErrorKind::Conflict => {
                match zk
                    .call(
                        "set",
                        client.set_data(&self.place.path, value.as_bytes(), None),
                    )
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == dprim::ErrorKind::NotFound => Err(not_leader()),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }
}
