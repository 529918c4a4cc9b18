//! Elections: a FIFO line of candidates per name; the head is the leader.

use crate::lock::InLine;
use crate::state::{Join, Namespace, State};
use async_trait::async_trait;
use dprim::election::LeadershipControl;
use dprim::{Elections, Error, Key, Leader, Leadership, Result, Session, Term, Value};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::sync::Arc;
use tokio_stream::wrappers::WatchStream;

pub(crate) struct MemoryElections {
    ns: Namespace,
}

impl MemoryElections {
    pub(crate) fn new(ns: Namespace) -> MemoryElections {
        MemoryElections { ns }
    }
}

#[async_trait]
impl Elections for MemoryElections {
    async fn campaign(&self, name: &Key, value: Value, session: &Session) -> Result<Leadership> {
        session.check()?;
        let joined = self.ns.with(|s| s.campaign(name, value, session.id()))?;
        let term = match joined {
            Join::Granted(term) => term,
            Join::Queued { ticket, rx } => {
                let line = InLine::new(
                    self.ns.clone(),
                    name.clone(),
                    ticket,
                    rx,
                    State::leave_campaign,
                );
                line.wait(session, None, &format!("leadership of `{name}`"))
                    .await?
            }
            Join::Busy => {
                return Err(Error::unexpected("a campaign was refused as busy"));
            }
        };
        let control = MemoryLeadership {
            ns: self.ns.clone(),
            name: name.clone(),
            term,
        };
        Ok(Leadership::new(
            name.clone(),
            Term(term),
            session.clone(),
            Arc::new(control),
        ))
    }

    async fn leader(&self, name: &Key) -> Result<Option<Leader>> {
        Ok(self.ns.with(|s| s.leader(name)))
    }

    async fn observe(&self, name: &Key) -> Result<BoxStream<'static, Result<Option<Leader>>>> {
        let rx = self.ns.with(|s| s.observe(name));
        Ok(WatchStream::new(rx).map(Ok).boxed())
    }
}

struct MemoryLeadership {
    ns: Namespace,
    name: Key,
    term: u64,
}

#[async_trait]
impl LeadershipControl for MemoryLeadership {
    async fn resign(&self) -> Result<()> {
        self.ns.with(|s| s.resign(&self.name, self.term));
        Ok(())
    }

    async fn proclaim(&self, value: Value) -> Result<()> {
        self.ns.with(|s| s.proclaim(&self.name, self.term, value))
    }
}
