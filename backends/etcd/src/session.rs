//! Sessions are etcd leases, renewed by dprim's standard keep-alive loop
//! over one keep-alive stream per session.

use crate::Etcd;
use async_trait::async_trait;
use dprim::session::{check_ttl, spawn_keep_alive, Renew, SessionControl, SessionState};
use dprim::{Error, ErrorKind, Result, Session, SessionId, Sessions};
use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

type Stalled = Arc<Mutex<HashSet<i64>>>;

pub(crate) struct EtcdSessions {
    etcd: Etcd,
    stalled: Stalled,
}

impl EtcdSessions {
    pub(crate) fn new(etcd: Etcd) -> EtcdSessions {
        EtcdSessions {
            etcd,
            stalled: Arc::default(),
        }
    }

    pub(crate) fn faults(&self) -> EtcdFaults {
        EtcdFaults {
            etcd: self.etcd.clone(),
            stalled: self.stalled.clone(),
        }
    }
}

type Keeper = Arc<tokio::sync::Mutex<Option<(LeaseKeeper, LeaseKeepAliveStream)>>>;

async fn renew_once(etcd: Etcd, lease: i64, keeper: Keeper, stalled: Stalled) -> Result<()> {
    if stalled
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&lease)
    {
        return Err(Error::new(
            ErrorKind::Unavailable,
            "renewals are stalled by a fault hook",
        )
        .temporary());
    }
    let mut slot = keeper.lock().await;
    // The stream is taken out while in use and put back only after its
    // answer was read: if this attempt is abandoned midway, the stream goes
    // with it, so a later attempt never reads this request's late answer as
    // its own (which would date the lease's renewal too late).
    let (mut keeper_handle, mut stream) = match slot.take() {
        Some(open) => open,
        None => {
            let mut client = etcd.client.lease_client();
            etcd.call("lease keep-alive", client.keep_alive(lease))
                .await?
        }
    };
    let answer = async {
        keeper_handle.keep_alive().await?;
        stream.message().await
    };
    // On an error the stream is not put back: it may be broken.
    match etcd.call("lease keep-alive", answer).await? {
        Some(resp) if resp.ttl() > 0 => {
            *slot = Some((keeper_handle, stream));
            Ok(())
        }
        Some(_) => Err(Error::session_lost(format!(
            "etcd lease {lease:x} expired or was revoked"
        ))),
        None => {
            Err(Error::new(ErrorKind::Unavailable, "etcd closed the keep-alive stream").temporary())
        }
    }
}

#[async_trait]
impl Sessions for EtcdSessions {
    async fn open(&self, ttl: Duration) -> Result<Session> {
        check_ttl(ttl, crate::MIN_SESSION_TTL)?;
        // etcd TTLs are whole seconds: round up, never down, so the server
        // never expires a lease before the client's deadline.
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let mut lease = self.etcd.client.lease_client();
        let granted = self
            .etcd
            .call("lease grant", lease.grant(secs as i64, None))
            .await?;
        let lease_id = granted.id();
        let id = SessionId(lease_id as u64);
        let keeper: Keeper = Arc::default();
        let (etcd, stalled) = (self.etcd.clone(), self.stalled.clone());
        let renew: Renew = Box::new(move || {
            Box::pin(renew_once(
                etcd.clone(),
                lease_id,
                keeper.clone(),
                stalled.clone(),
            ))
        });
        let (client, state) = spawn_keep_alive(id, ttl, renew);
        let control = EtcdSessionControl {
            etcd: self.etcd.clone(),
            lease: lease_id,
            client,
        };
        Ok(Session::new(id, ttl, state, Arc::new(control)))
    }
}

struct EtcdSessionControl {
    etcd: Etcd,
    lease: i64,
    client: watch::Sender<SessionState>,
}

#[async_trait]
impl SessionControl for EtcdSessionControl {
    async fn close(&self) -> Result<()> {
        let was_alive = self.client.send_if_modified(|state| {
            if matches!(state, SessionState::Alive { .. }) {
                *state = SessionState::Closed;
                true
            } else {
                false
            }
        });
        let mut lease = self.etcd.client.lease_client();
        match self
            .etcd
            .call("lease revoke", lease.revoke(self.lease))
            .await
        {
            Ok(_) => Ok(()),
            // Already gone on the server: closing is done.
            Err(e) if e.kind() == ErrorKind::SessionLost || e.kind() == ErrorKind::NotFound => {
                Ok(())
            }
            Err(e) if was_alive => Err(e),
            Err(_) => Ok(()),
        }
    }
}

/// Fault hooks: expiry is a server-side lease revoke; a stall stops this
/// client's renewals (a partition as the client sees it).
pub(crate) struct EtcdFaults {
    etcd: Etcd,
    stalled: Stalled,
}

#[async_trait]
impl dprim::Faults for EtcdFaults {
    async fn expire_session(&self, id: SessionId) -> Result<()> {
        let mut lease = self.etcd.client.lease_client();
        self.etcd
            .call("lease revoke", lease.revoke(id.0 as i64))
            .await
            .map(|_| ())
    }

    async fn stall_session(&self, id: SessionId) -> Result<()> {
        self.stalled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.0 as i64);
        Ok(())
    }
}
