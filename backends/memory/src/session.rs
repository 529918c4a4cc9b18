//! Sessions: the server side expires them on a timer; the client side runs
//! dprim's standard keep-alive loop against it.

use crate::state::Namespace;
use async_trait::async_trait;
use dprim::session::{check_ttl, spawn_keep_alive, Renew, SessionControl, SessionState};
use dprim::{Result, Session, SessionId, Sessions};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

pub(crate) struct MemorySessions {
    ns: Namespace,
}

impl MemorySessions {
    pub(crate) fn new(ns: Namespace) -> MemorySessions {
        MemorySessions { ns }
    }
}

#[async_trait]
impl Sessions for MemorySessions {
    async fn open(&self, ttl: Duration) -> Result<Session> {
        check_ttl(ttl, crate::MIN_SESSION_TTL)?;
        let id = self.ns.with(|s| s.open_session(ttl));
        let renew_ns = self.ns.clone();
        let renew: Renew = Box::new(move || {
            let ns = renew_ns.clone();
            Box::pin(async move { ns.with(|s| s.renew(id)) })
        });
        let (client, state) = spawn_keep_alive(id, ttl, renew);
        self.ns.with(|s| s.attach_client(id, client.clone()));
        spawn_server_expiry(self.ns.clone(), id);
        let control = MemorySessionControl {
            ns: self.ns.clone(),
            id,
            client,
        };
        Ok(Session::new(id, ttl, state, Arc::new(control)))
    }
}

/// The server's clock: expire the session once its deadline passes without renewal.
fn spawn_server_expiry(ns: Namespace, id: SessionId) {
    tokio::spawn(async move {
        loop {
            let Some(at) = ns.with(|s| s.session_expiry(id)) else {
                return;
            };
            tokio::time::sleep_until(at).await;
            let expired = ns.with(|s| {
                let due = s.session_expiry(id).is_some_and(|t| t <= Instant::now());
                if due {
                    s.end_session(id, None);
                }
                due
            });
            if expired {
                return;
            }
        }
    });
}

struct MemorySessionControl {
    ns: Namespace,
    id: SessionId,
    client: watch::Sender<SessionState>,
}

#[async_trait]
impl SessionControl for MemorySessionControl {
    async fn close(&self) -> Result<()> {
        self.ns
            .with(|s| s.end_session(self.id, Some(SessionState::Closed)));
        // Already lost or closed: keep that state, closing is a no-op.
        self.client.send_if_modified(|state| {
            if matches!(state, SessionState::Alive { .. }) {
                *state = SessionState::Closed;
                true
            } else {
                false
            }
        });
        Ok(())
    }
}
