//! Sessions: each dprim session is its own ZooKeeper session (its own
//! client connection, session timeout = TTL), renewed by dprim's standard
//! keep-alive loop with a cheap round trip on that connection. ZooKeeper
//! keeps a session alive across reconnects (a disconnected client is not
//! yet lost); the client's safe-until deadline still rules, and expiry is
//! final: everything tied to the session reports `SessionLost`, and new work
//! uses new sessions.

use crate::Zk;
use async_trait::async_trait;
use dprim::session::{check_ttl, spawn_keep_alive, Renew, SessionControl, SessionState};
use dprim::{Error, ErrorKind, Result, Session, SessionId, Sessions};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use zookeeper_client::Client;

type Stalled = Arc<Mutex<HashSet<u64>>>;

pub(crate) struct ZkSessions {
    zk: Zk,
    stalled: Stalled,
}

impl ZkSessions {
    pub(crate) fn new(zk: Zk) -> ZkSessions {
        ZkSessions {
            zk,
            stalled: Arc::default(),
        }
    }

    pub(crate) fn faults(&self) -> ZkFaults {
        ZkFaults {
            zk: self.zk.clone(),
            stalled: self.stalled.clone(),
        }
    }
}

async fn renew_once(zk: Zk, id: u64, stalled: Stalled) -> Result<()> {
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
    let Some(client) = zk.session_client_by_id(id) else {
        return Err(Error::session_lost(format!(
            "zookeeper session {id:016x} is closed"
        )));
    };
    if crate::Terminated::is_terminated(&client.state()) {
        return Err(Error::session_lost(format!(
            "zookeeper session {id:016x} expired"
        )));
    }
    // Any answered request proves the session alive as of its sending.
    zk.call("exists", client.check_stat("/")).await.map(|_| ())
}

#[async_trait]
impl Sessions for ZkSessions {
    async fn open(&self, ttl: Duration) -> Result<Session> {
        check_ttl(ttl, crate::MIN_SESSION_TTL)?;
        let client = self.zk.open_client(ttl).await?;
        let raw = client.session_id().0 as u64;
        let id = SessionId(raw);
        // The server may grant a shorter timeout than asked (its maximum is
        // 20 x tickTime): the client's deadline must follow the shorter one.
        let effective = ttl.min(client.session_timeout().max(crate::MIN_SESSION_TTL));
        self.zk.register_session(raw, client.clone());
        let (zk, stalled) = (self.zk.clone(), self.stalled.clone());
        let renew: Renew = Box::new(move || Box::pin(renew_once(zk.clone(), raw, stalled.clone())));
        let (state_tx, state) = spawn_keep_alive(id, effective, renew);
        // Forget the client once the session is lost, so nothing new is
        // attached to a dead session; dropping it also closes the session.
        {
            let zk = self.zk.clone();
            let mut rx = state.clone();
            tokio::spawn(async move {
                loop {
                    if !matches!(&*rx.borrow_and_update(), SessionState::Alive { .. }) {
                        break;
                    }
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
                zk.forget_session(raw);
            });
        }
        // A server-side end (expiry) is reported at once, not at the next renewal.
        {
            let tx = state_tx.clone();
            let mut states = client.state_watcher();
            tokio::spawn(async move {
                loop {
                    let s = tokio::select! {
                        s = states.changed() => s,
                        _ = tx.closed() => return,
                    };
                    if matches!(
                        s,
                        zookeeper_client::SessionState::Expired
                            | zookeeper_client::SessionState::AuthFailed
                    ) {
                        tx.send_if_modified(|state| {
                            if matches!(state, SessionState::Alive { .. }) {
                                *state = SessionState::Lost(Error::session_lost(format!(
                                    "session {id} lost: zookeeper expired it"
                                )));
                                true
                            } else {
                                false
                            }
                        });
                        return;
                    }
                    if matches!(s, zookeeper_client::SessionState::Closed) {
                        return;
                    }
                }
            });
        }
        drop(client);
        let control = ZkSessionControl {
            zk: self.zk.clone(),
            id: raw,
            state: state_tx,
        };
        Ok(Session::new(id, ttl, state, Arc::new(control)))
    }
}

struct ZkSessionControl {
    zk: Zk,
    id: u64,
    state: watch::Sender<SessionState>,
}

impl ZkSessionControl {
    /// Deletes the session's kv keys through the change log, so watchers see
    /// the deletions with their versions like any other delete.
    async fn delete_ephemeral_keys(&self, client: &Client) -> Result<()> {
        let kv_root = self.zk.layout().kv_root();
        let paths = self
            .zk
            .call("list ephemerals", client.list_ephemerals(&kv_root))
            .await?;
        let kv = crate::kv::ZkKv::new(self.zk.clone());
        for path in paths {
            if let Some(key) = self.zk.layout().app_key(&path) {
                dprim::KvExt::delete(&kv, &key).await?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl SessionControl for ZkSessionControl {
    async fn close(&self) -> Result<()> {
        let was_alive = self.state.send_if_modified(|state| {
            if matches!(state, SessionState::Alive { .. }) {
                *state = SessionState::Closed;
                true
            } else {
                false
            }
        });
        let Some(client) = self.zk.forget_session(self.id) else {
            return Ok(());
        };
        if was_alive {
            if let Err(e) = self.delete_ephemeral_keys(&client).await {
                tracing::debug!(error = %e, "deleting a closing session's keys failed; closing removes them anyway");
            }
        }
        let mut states = client.state_watcher();
        // Dropping the last client of a session closes it on the server,
        // which deletes its ephemeral znodes at once; wait for that.
        drop(client);
        let _ = tokio::time::timeout(self.zk.0.request_timeout, async {
            loop {
                if matches!(
                    states.peek_state(),
                    zookeeper_client::SessionState::Closed
                        | zookeeper_client::SessionState::Expired
                ) {
                    return;
                }
                states.changed().await;
            }
        })
        .await;
        Ok(())
    }
}

/// Fault hooks: expiry ends the session on the server from under its
/// owner; a stall stops this client's renewals (a partition as the client
/// sees it), after which the lost session's connection is dropped so the
/// server ends it too.
pub(crate) struct ZkFaults {
    zk: Zk,
    stalled: Stalled,
}

#[async_trait]
impl dprim::Faults for ZkFaults {
    async fn expire_session(&self, id: SessionId) -> Result<()> {
        // Ends the session on the server from under its owner: the
        // connection is dropped, which closes the ZooKeeper session (its
        // ephemeral znodes vanish at once), and the owner learns of it on
        // its next renewal, exactly as after a server-side expiry.
        let client = self
            .zk
            .forget_session(id.0)
            .ok_or_else(|| Error::not_found(format!("session {id} is not open on this backend")))?;
        let mut states = client.state_watcher();
        drop(client);
        let _ = tokio::time::timeout(self.zk.0.request_timeout, async {
            loop {
                if matches!(
                    states.peek_state(),
                    zookeeper_client::SessionState::Closed
                        | zookeeper_client::SessionState::Expired
                ) {
                    return;
                }
                states.changed().await;
            }
        })
        .await;
        Ok(())
    }

    async fn stall_session(&self, id: SessionId) -> Result<()> {
        self.stalled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.0);
        Ok(())
    }
}
