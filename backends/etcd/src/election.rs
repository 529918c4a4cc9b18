//! Elections: the leader is the head of the election's line; its term is
//! its key's create revision; proclaim rewrites its key's value in place.

use crate::line::{LeaveOnDrop, Line, Place};
use crate::Etcd;
use async_trait::async_trait;
use dprim::election::LeadershipControl;
use dprim::retry::RetryPolicy;
use dprim::{Elections, Error, Key, Leader, Leadership, Result, Session, SessionId, Term, Value};
use etcd_client::{Compare, CompareOp, KeyValue};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::sync::Arc;
use tokio::sync::mpsc;

pub(crate) struct EtcdElections {
    etcd: Etcd,
}

impl EtcdElections {
    pub(crate) fn new(etcd: Etcd) -> EtcdElections {
        EtcdElections { etcd }
    }

    fn line(&self, name: &Key) -> Line {
        Line::new(self.etcd.clone(), self.etcd.layout.election_line(name))
    }
}

fn leader(kv: &KeyValue) -> Result<Leader> {
    Ok(Leader {
        value: Value::new(kv.value().to_vec())?,
        term: Term(kv.create_revision() as u64),
        session: SessionId(kv.lease() as u64),
    })
}

#[async_trait]
impl Elections for EtcdElections {
    async fn campaign(&self, name: &Key, value: Value, session: &Session) -> Result<Leadership> {
        let line = self.line(name);
        let place = line.join(session, value.into_bytes()).await?;
        let waiting = LeaveOnDrop::new(line.clone(), place);
        if let Some(place) = waiting.place() {
            line.wait_for_head(place, session, None, &format!("leadership of `{name}`"))
                .await?;
        }
        let place = waiting.keep();
        let term = Term(place.revision as u64);
        let control = EtcdLeadership {
            line,
            name: name.clone(),
            place,
            lease: session.id().0 as i64,
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
            Some(kv) => leader(&kv).map(Some),
            None => Ok(None),
        }
    }

    async fn observe(&self, name: &Key) -> Result<BoxStream<'static, Result<Option<Leader>>>> {
        let line = self.line(name);
        let (first, mut watch) = head_and_watch(&line).await?;
        let (tx, mut rx) = mpsc::channel(16);
        let _ = tx.send(Ok(first.clone())).await;
        tokio::spawn(async move {
            let mut last = first;
            loop {
                let broken = tokio::select! {
                    _ = tx.closed() => return,
                    msg = watch.message() => !matches!(msg, Ok(Some(_))),
                };
                // Re-read the head after any change in the line; updates
                // may coalesce, but terms never go back. A failure for a
                // moment (a reset connection) is retried, so observing
                // outlives it; a broken watch starts again from the read.
                let current = if broken {
                    RetryPolicy::default()
                        .run(|| head_and_watch(&line))
                        .await
                        .map(|(current, w)| {
                            watch = w;
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

/// The line's leader, and a watch of every change of the line after the
/// read.
async fn head_and_watch(line: &Line) -> Result<(Option<Leader>, etcd_client::WatchStream)> {
    let (head, rev) = line.head().await?;
    let current = head.as_ref().map(leader).transpose()?;
    let watch = line.watch_all(rev + 1).await?;
    Ok((current, watch))
}

struct EtcdLeadership {
    line: Line,
    name: Key,
    place: Place,
    lease: i64,
}

#[async_trait]
impl LeadershipControl for EtcdLeadership {
    async fn resign(&self) -> Result<()> {
        self.line.leave(&self.place).await
    }

    async fn proclaim(&self, value: Value) -> Result<()> {
        let etcd = self.line.etcd();
        let key = self.place.key.clone();
        let txn = etcd_client::Txn::new()
            .when([Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                self.place.revision,
            )])
            .and_then([etcd_client::TxnOp::put(
                key,
                value.into_bytes(),
                Some(etcd_client::PutOptions::new().with_lease(self.lease)),
            )]);
        let resp = etcd.call("txn", etcd.kv().txn(txn)).await?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(Error::not_leader(format!(
                "term {} of election `{}` is over; proclaim needs the current leader",
                self.place.revision, self.name
            )))
        }
    }
}
