//! Election: one leader per name, with terms usable as fencing tokens.

use crate::error::{Error, Result};
use crate::key::{Key, Value};
use crate::session::{Session, SessionId};
use async_trait::async_trait;
use futures::stream::BoxStream;
use std::fmt;
use std::sync::Arc;

/// A leadership term: strictly increases per election name, never reused.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Term(pub u64);

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The current leader of an election, as seen by anyone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    /// The value the leader campaigned with or last proclaimed.
    pub value: Value,
    /// The leader's term.
    pub term: Term,
    /// The leader's session.
    pub session: SessionId,
}

/// Whether an observer that last reported `last` should report `current`:
/// any change, except one that would take the term backwards (observers may
/// coalesce updates, but terms never go back).
pub fn observed_change(current: &Option<Leader>, last: &Option<Leader>) -> bool {
    match (current, last) {
        (Some(c), Some(l)) => c.term >= l.term && c != l,
        (a, b) => a != b,
    }
}

/// Hands an observer (for backends) the leader just read: sends it if
/// [`observed_change`] says so, or sends the error. Returns whether the
/// observation goes on: `false` once the read failed for good or nobody
/// observes any more.
pub async fn report_observed(
    tx: &tokio::sync::mpsc::Sender<Result<Option<Leader>>>,
    last: &mut Option<Leader>,
    current: Result<Option<Leader>>,
) -> bool {
    match current {
        Ok(current) => {
            if !observed_change(&current, last) {
                return true;
            }
            *last = current.clone();
            tx.send(Ok(current)).await.is_ok()
        }
        Err(e) => {
            let _ = tx.send(Err(e)).await;
            false
        }
    }
}

/// The backend side of a leadership.
#[async_trait]
pub trait LeadershipControl: Send + Sync {
    /// Gives up leadership; the next candidate is elected with a larger term.
    async fn resign(&self) -> Result<()>;
    /// Replaces the leader's value, keeping the term.
    async fn proclaim(&self, value: Value) -> Result<()>;
}

/// Being the leader of one election.
pub struct Leadership {
    name: Key,
    term: Term,
    session: Session,
    control: Arc<dyn LeadershipControl>,
}

impl Leadership {
    /// Assembles a leadership (for backends).
    pub fn new(
        name: Key,
        term: Term,
        session: Session,
        control: Arc<dyn LeadershipControl>,
    ) -> Leadership {
        Leadership {
            name,
            term,
            session,
            control,
        }
    }
    /// The election's name.
    pub fn name(&self) -> &Key {
        &self.name
    }
    /// This leadership's term; use it as a fencing token on every write made as leader.
    pub fn term(&self) -> Term {
        self.term
    }
    /// The session leadership is held with.
    pub fn session(&self) -> &Session {
        &self.session
    }
    /// `Ok` while leadership is still proven (the session is alive).
    pub fn check(&self) -> Result<()> {
        self.session.check()
    }
    /// Resolves when leadership can no longer be proven: stop acting as
    /// leader. It resolves before another candidate can be elected.
    pub async fn lost(&self) -> Error {
        self.session.lost().await
    }
    /// Gives up leadership.
    ///
    /// # Behavior
    /// Another candidate (if any) is elected with a larger term. Resigning
    /// after leadership was lost succeeds.
    pub async fn resign(self) -> Result<()> {
        self.control.resign().await
    }
    /// Updates the value observers see, keeping the term.
    ///
    /// # Behavior
    /// Fails `NotLeader` if this leadership has ended (resigned, session lost).
    pub async fn proclaim(&self, value: Value) -> Result<()> {
        self.check().map_err(|e| {
            Error::not_leader(format!(
                "cannot proclaim in election `{}`: leadership of term {} ended",
                self.name, self.term
            ))
            .with_context("cause", e)
        })?;
        self.control.proclaim(value).await
    }
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("name", &self.name)
            .field("term", &self.term)
            .finish()
    }
}

/// Named elections.
#[async_trait]
pub trait Elections: Send + Sync {
    /// Becomes a candidate and waits until elected.
    ///
    /// # Behavior
    /// - At most one leader per election at a time; each leader's term is
    ///   larger than every earlier term of that election.
    /// - Candidates are elected in the order they campaigned.
    /// - Dropping the returned future withdraws the candidacy.
    /// - Fails `SessionLost` if the session is or becomes lost while waiting.
    /// - When the leader's session ends, the next candidate is elected.
    async fn campaign(&self, name: &Key, value: Value, session: &Session) -> Result<Leadership>;

    /// The current leader, if any.
    async fn leader(&self, name: &Key) -> Result<Option<Leader>>;

    /// Follows leader changes.
    ///
    /// # Behavior
    /// - The first item is the current leader (or `None`); later items are
    ///   changes. Updates may be coalesced, but terms never go backwards.
    async fn observe(&self, name: &Key) -> Result<BoxStream<'static, Result<Option<Leader>>>>;
}
