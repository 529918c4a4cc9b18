//! Sessions: NATS has no server-side session, so a session is a heartbeat
//! record `<ns>.=s.<id>` written with a per-message TTL (`Nats-TTL`, whole
//! seconds, rounded up so the server never forgets it before the client's
//! deadline) and rewritten by dprim's keep-alive loop. Each renewal expects
//! the heartbeat's last sequence, so a heartbeat that expired or was removed
//! fails the renewal and the session is lost at once.
//!
//! Records owned by a session (ephemeral keys, line entries) carry its id
//! and are indexed under `<ns>.=x.<id>.*`. `close` removes them at once;
//! when a heartbeat vanishes otherwise (TTL expiry: the server leaves a
//! marker; or a fault hook), every connected client's reaper sees it and
//! removes them. A client that starts also sweeps sessions whose heartbeat
//! is already gone, so nothing owned outlives a session by much more than
//! its TTL while any client of the namespace runs.

use crate::store::owned;
use crate::Nats;
use async_nats::HeaderMap;
use async_trait::async_trait;
use bytes::Bytes;
use dprim::session::{check_ttl, spawn_keep_alive, Renew, SessionControl, SessionState};
use dprim::{Error, ErrorKind, Result, Session, SessionId, Sessions};
use futures::StreamExt;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

type Stalled = Arc<Mutex<HashSet<u64>>>;

pub(crate) struct NatsSessions {
    nats: Nats,
    stalled: Stalled,
    _reaper: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl NatsSessions {
    pub(crate) fn new(nats: Nats) -> NatsSessions {
        let reaper = tokio::spawn(reap(nats.clone()));
        NatsSessions {
            nats,
            stalled: Arc::default(),
            _reaper: AbortOnDrop(reaper),
        }
    }

    pub(crate) fn faults(&self) -> NatsFaults {
        NatsFaults {
            nats: self.nats.clone(),
            stalled: self.stalled.clone(),
        }
    }
}

/// Follows the namespace's heartbeats and removes what ended sessions own.
async fn reap(nats: Nats) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match reap_once(&nats).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::debug!(error = %e, "session reaper failed; restarting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn reap_once(nats: &Nats) -> Result<()> {
    let mut ends = nats.follow(&nats.layout.heartbeats(), None).await?.changes;
    // Sessions that ended while no client was following them.
    let sweeper = nats.clone();
    tokio::spawn(async move {
        if let Err(e) = sweep_ended(&sweeper).await {
            tracing::debug!(error = %e, "sweeping ended sessions failed");
        }
    });
    while let Some(r) = ends.next().await {
        let (r, _) = r?;
        if r.is_deleted() {
            if let Some(s) = nats.layout.heartbeat_session(&r.subject) {
                if let Err(e) = nats.cleanup_session(s).await {
                    tracing::debug!(session = %format!("{s:016x}"), error = %e, "cleaning up an ended session failed");
                }
            }
        }
    }
    Ok(())
}

async fn sweep_ended(nats: &Nats) -> Result<()> {
    let (index, _) = nats.scan_live(&nats.layout.index_all()).await?;
    let owners: HashSet<u64> = index
        .iter()
        .filter_map(|r| nats.layout.index_session(&r.subject))
        .collect();
    for s in owners {
        if nats.require_session(s).await.is_err() {
            nats.cleanup_session(s).await?;
        }
    }
    Ok(())
}

fn heartbeat_headers(ttl: Duration) -> HeaderMap {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    let mut h = owned(None);
    h.insert("Nats-TTL", secs.to_string());
    h.insert("Nats-Rollup", "sub");
    h
}

async fn renew_once(
    nats: Nats,
    id: u64,
    ttl: Duration,
    last: Arc<Mutex<u64>>,
    stalled: Stalled,
) -> Result<()> {
    if stalled
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&id)
    {
        return Err(Error::new(
            ErrorKind::Unavailable,
            "renewals are stalled by a fault hook",
        )
        .temporary());
    }
    let expect = *last.lock().unwrap_or_else(|p| p.into_inner());
    let subject = nats.layout.heartbeat(id);
    match nats
        .write(&subject, Bytes::new(), heartbeat_headers(ttl), Some(expect))
        .await
    {
        Ok(seq) => {
            *last.lock().unwrap_or_else(|p| p.into_inner()) = seq;
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::Conflict => {
            // An earlier renewal whose answer was lost may have taken
            // effect: a live heartbeat after the expected one can only be
            // this session's own (expiry and removal leave markers). It
            // proves nothing about now, so renew once more on top of it.
            match nats.last_any(&subject).await? {
                Some(r) if !r.is_deleted() && r.seq > expect => {
                    let seq = nats
                        .write(&subject, Bytes::new(), heartbeat_headers(ttl), Some(r.seq))
                        .await
                        .map_err(|e| match e.kind() {
                            ErrorKind::Conflict => heartbeat_gone(id),
                            _ => e,
                        })?;
                    *last.lock().unwrap_or_else(|p| p.into_inner()) = seq;
                    Ok(())
                }
                _ => Err(heartbeat_gone(id)),
            }
        }
        Err(e) => Err(e),
    }
}

fn heartbeat_gone(id: u64) -> Error {
    Error::session_lost(format!(
        "the heartbeat of session {id:016x} expired or was removed"
    ))
}

#[async_trait]
impl Sessions for NatsSessions {
    async fn open(&self, ttl: Duration) -> Result<Session> {
        check_ttl(ttl, crate::MIN_SESSION_TTL)?;
        let id = loop {
            let id: u64 = rand::random();
            if id != 0 {
                break id;
            }
        };
        let subject = self.nats.layout.heartbeat(id);
        let seq = self
            .nats
            .write(&subject, Bytes::new(), heartbeat_headers(ttl), Some(0))
            .await?;
        let last = Arc::new(Mutex::new(seq));
        let (nats, stalled) = (self.nats.clone(), self.stalled.clone());
        let renew: Renew = Box::new(move || {
            Box::pin(renew_once(
                nats.clone(),
                id,
                ttl,
                last.clone(),
                stalled.clone(),
            ))
        });
        let (client, state) = spawn_keep_alive(SessionId(id), ttl, renew);
        let control = NatsSessionControl {
            nats: self.nats.clone(),
            id,
            client,
        };
        Ok(Session::new(SessionId(id), ttl, state, Arc::new(control)))
    }
}

struct NatsSessionControl {
    nats: Nats,
    id: u64,
    client: watch::Sender<SessionState>,
}

#[async_trait]
impl SessionControl for NatsSessionControl {
    async fn close(&self) -> Result<()> {
        let was_alive = self.client.send_if_modified(|state| {
            if matches!(state, SessionState::Alive { .. }) {
                *state = SessionState::Closed;
                true
            } else {
                false
            }
        });
        let ended = async {
            self.nats
                .purge(&self.nats.layout.heartbeat(self.id), None)
                .await?;
            self.nats.cleanup_session(self.id).await
        };
        match ended.await {
            Ok(()) => Ok(()),
            Err(e) if was_alive => Err(e),
            // Closing a lost session: the reapers finish the job.
            Err(_) => Ok(()),
        }
    }
}

/// Fault hooks: expiry removes the heartbeat (and, as any reaper would,
/// what the session owned); a stall stops this client's renewals.
pub(crate) struct NatsFaults {
    nats: Nats,
    stalled: Stalled,
}

#[async_trait]
impl dprim::Faults for NatsFaults {
    async fn expire_session(&self, id: SessionId) -> Result<()> {
        self.nats
            .purge(&self.nats.layout.heartbeat(id.0), None)
            .await?;
        self.nats.cleanup_session(id.0).await
    }

    async fn stall_session(&self, id: SessionId) -> Result<()> {
        self.stalled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.0);
        Ok(())
    }
}
