// The case catalogue: one module per primitive (and `tasks`, the app-level
// scenarios), plus helpers every case uses (sessions, fault hooks, reading
// watch and subscription streams).

mod election;
mod keys;
mod kv;
mod lock;
mod pubsub;
mod queue;
mod session;
mod tasks;

use crate::util::{hook_result, within, Context, WAIT};
use crate::{Case, Ctx, Fail};
use dprim::{Backend, Session, SessionId, WatchEvent, WatchStream};
use std::time::Duration;

/// Builds a [`Case`] from a name, an async fn, its requirements and the
/// contract sentence it checks.
macro_rules! case {
    ($name:literal, $body:path, [$($req:expr),* $(,)?], $contract:literal $(,)?) => {
        $crate::Case {
            name: $name,
            contract: $contract,
            requires: &[$($req),*],
            run: |ctx| Box::pin($body(ctx)),
        }
    };
}
pub(crate) use case;

/// Every case, grouped by primitive, in a stable order.
pub(crate) fn all() -> Vec<Case> {
    let mut all = Vec::new();
    all.extend(keys::cases());
    all.extend(kv::cases());
    all.extend(session::cases());
    all.extend(lock::cases());
    all.extend(election::cases());
    all.extend(pubsub::cases());
    all.extend(queue::cases());
    all.extend(tasks::cases());
    all
}

/// A TTL for sessions that are only closed explicitly: long enough that
/// nothing in a case depends on renewal timing.
pub(crate) fn long_ttl(ctx: &Ctx) -> Duration {
    ctx.caps().session.min_ttl.max(Duration::from_secs(10))
}

impl Ctx {
    /// Opens a long-lived session on `backend`.
    pub(crate) async fn session_on(&self, backend: &Backend) -> Result<Session, Fail> {
        backend
            .sessions()
            .open(long_ttl(self))
            .await
            .ctx("open a session")
    }

    /// Opens a long-lived session on the first client.
    pub(crate) async fn session(&self) -> Result<Session, Fail> {
        self.session_on(&self.backend).await
    }

    /// Opens a session with the short expiry TTL ([`Ctx::session_ttl`]).
    pub(crate) async fn short_session(&self) -> Result<Session, Fail> {
        self.backend
            .sessions()
            .open(self.session_ttl())
            .await
            .ctx("open a session")
    }

    /// Expires `id` on the server side through the fault hook.
    pub(crate) async fn expire_session(&self, id: SessionId) -> Result<(), Fail> {
        let faults = self.backend.faults().ok_or_else(|| {
            Fail::Skipped("requires fault hook expire_session (Backend::faults())".into())
        })?;
        hook_result(faults.expire_session(id).await, "expire_session")
    }

    /// Stops the server acknowledging `id`'s renewals through the fault hook.
    pub(crate) async fn stall_session(&self, id: SessionId) -> Result<(), Fail> {
        let faults = self.backend.faults().ok_or_else(|| {
            Fail::Skipped("requires fault hook stall_session (Backend::faults())".into())
        })?;
        hook_result(faults.stall_session(id).await, "stall_session")
    }
}

/// The next watch event, waiting up to [`WAIT`]; a `Resync`, an error, the
/// end of the stream or silence fail the case.
pub(crate) async fn next_change(stream: &mut WatchStream, what: &str) -> Result<WatchEvent, Fail> {
    match within(WAIT, what, stream.next()).await? {
        Some(Ok(WatchEvent::Resync { reason })) => {
            Err(Fail::Failed(format!("{what}: unexpected resync: {reason}")))
        }
        Some(Ok(event)) => Ok(event),
        Some(Err(e)) => Err(Fail::Failed(format!("{what}: watch failed: {e}"))),
        None => Err(Fail::Failed(format!("{what}: the watch stream ended"))),
    }
}

/// Describes a watch event briefly, for failure messages.
pub(crate) fn show(event: &WatchEvent) -> String {
    match event {
        WatchEvent::Put(e) => format!(
            "put {} = {:?} @{}",
            e.key,
            String::from_utf8_lossy(e.value.as_bytes()),
            e.version
        ),
        WatchEvent::Delete { key, version } => format!("delete {key} @{version}"),
        WatchEvent::Resync { reason } => format!("resync ({reason})"),
    }
}
