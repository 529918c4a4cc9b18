//! Sessions (leases): liveness that other primitives hang off.
//!
//! A [`Session`] is kept alive in the background. It is *lost* when it can no
//! longer be proven alive: the client computes a safe-until deadline
//! (`last acknowledged renewal sent at` + `ttl` - margin) and declares the
//! session lost when it passes, which is before the server side can have
//! expired it. Everything tied to the session (ephemeral keys, lock guards,
//! leaderships, queue deliveries) then reports `SessionLost`.

use crate::error::{Error, ErrorKind, Result};
use async_trait::async_trait;
use futures::future::BoxFuture;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Identifies a session on its backend. Printed as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// Where a session stands.
#[derive(Clone, Debug)]
pub enum SessionState {
    /// Proven alive until `safe_until`.
    Alive {
        /// Deadline before which the server cannot have expired the session.
        safe_until: Instant,
    },
    /// Can no longer be proven alive; the error says why.
    Lost(Error),
    /// Closed by its owner.
    Closed,
}

/// The backend side of a session handle.
#[async_trait]
pub trait SessionControl: Send + Sync {
    /// Ends the session on the server so its ephemeral keys vanish at once.
    async fn close(&self) -> Result<()>;
}

struct Shared {
    id: SessionId,
    ttl: Duration,
    state: watch::Receiver<SessionState>,
    control: Arc<dyn SessionControl>,
}

/// A live session. Cheap to clone; every clone is the same session.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

impl Session {
    /// Assembles a session handle (for backends).
    pub fn new(
        id: SessionId,
        ttl: Duration,
        state: watch::Receiver<SessionState>,
        control: Arc<dyn SessionControl>,
    ) -> Session {
        Session {
            shared: Arc::new(Shared {
                id,
                ttl,
                state,
                control,
            }),
        }
    }

    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.shared.id
    }

    /// The TTL it was opened with.
    pub fn ttl(&self) -> Duration {
        self.shared.ttl
    }

    /// The current state.
    pub fn state(&self) -> SessionState {
        self.shared.state.borrow().clone()
    }

    /// Whether the session is still proven alive.
    pub fn is_alive(&self) -> bool {
        matches!(&*self.shared.state.borrow(), SessionState::Alive { safe_until } if Instant::now() < *safe_until)
    }

    /// The deadline until which the session is proven alive; `None` once lost or closed.
    pub fn safe_until(&self) -> Option<Instant> {
        match &*self.shared.state.borrow() {
            SessionState::Alive { safe_until } => Some(*safe_until),
            _ => None,
        }
    }

    /// `Ok` while alive; otherwise `SessionLost` (also for a closed session).
    pub fn check(&self) -> Result<()> {
        match &*self.shared.state.borrow() {
            SessionState::Alive { safe_until } if Instant::now() < *safe_until => Ok(()),
            SessionState::Alive { .. } => Err(Error::session_lost(format!(
                "session {} passed its safe-until deadline",
                self.shared.id
            ))),
            SessionState::Lost(e) => Err(e.clone()),
            // One kind for "this session can no longer back anything",
            // whether it was lost or closed by its owner; the message says which.
            SessionState::Closed => Err(Error::session_lost(format!(
                "session {} was closed by its owner",
                self.shared.id
            ))),
        }
    }

    /// Resolves when the session is lost or closed, with the reason.
    ///
    /// # Behavior
    /// - Resolves no later than the safe-until deadline when renewals stop
    ///   being acknowledged, which is before the server can expire the
    ///   session.
    /// - Resolves with `Closed` after [`Session::close`].
    pub async fn lost(&self) -> Error {
        let mut rx = self.shared.state.clone();
        loop {
            let deadline = match &*rx.borrow_and_update() {
                SessionState::Alive { safe_until } => *safe_until,
                SessionState::Lost(e) => return e.clone(),
                SessionState::Closed => {
                    return Error::closed(format!("session {} was closed", self.shared.id))
                }
            };
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Error::session_lost(format!(
                            "session {} lost: its keep-alive stopped", self.shared.id
                        ));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    // Re-check: a renewal may have landed just now.
                    if let SessionState::Alive { safe_until } = &*rx.borrow() {
                        if *safe_until <= Instant::now() {
                            return Error::session_lost(format!(
                                "session {} passed its safe-until deadline without an acknowledged renewal",
                                self.shared.id
                            ));
                        }
                    }
                }
            }
        }
    }

    /// Closes the session: its ephemeral keys are deleted at once, and
    /// everything tied to it reports the session closed.
    ///
    /// # Behavior
    /// Closing an already closed or lost session succeeds.
    pub async fn close(&self) -> Result<()> {
        self.shared.control.close().await
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.shared.id)
            .field("ttl", &self.shared.ttl)
            .finish()
    }
}

/// Opens sessions.
#[async_trait]
pub trait Sessions: Send + Sync {
    /// Opens a session with a TTL and keeps it alive in the background.
    ///
    /// # Behavior
    /// - A TTL below the backend's `min_session_ttl` capability is
    ///   `InvalidArgument` naming the minimum.
    /// - The session stays alive while the backend is reachable, without any
    ///   action from the caller.
    /// - A session whose renewals stop being acknowledged is reported lost
    ///   (see [`Session::lost`]) before the server can expire it.
    /// - Keys attached to the session vanish when it is closed (at once) or
    ///   expires (after the TTL).
    async fn open(&self, ttl: Duration) -> Result<Session>;
}

/// Checks a requested TTL against a backend's floor.
pub fn check_ttl(ttl: Duration, min: Duration) -> Result<()> {
    if ttl < min {
        return Err(Error::invalid(format!(
            "session TTL {} is below this backend's minimum of {}",
            humantime::format_duration(ttl),
            humantime::format_duration(min)
        )));
    }
    Ok(())
}

/// The margin kept between the client's safe-until deadline and the earliest
/// moment the server may expire the session: a tenth of the TTL. It absorbs
/// scheduling delay and clock-rate drift between client and server.
pub fn safety_margin(ttl: Duration) -> Duration {
    ttl / 10
}

/// How long one renewal attempt may wait for its answer: a sixth of the
/// TTL, so that about three attempts fit between the first renewal
/// (`ttl / 3` after the last) and the safe-until deadline.
fn attempt_limit(ttl: Duration) -> Duration {
    ttl / 6
}

/// A renewal function for [`spawn_keep_alive`]: one renewal round trip.
pub type Renew = Box<dyn Fn() -> BoxFuture<'static, Result<()>> + Send + Sync>;

/// Runs the standard keep-alive loop shared by backends and returns the state
/// channel for [`Session::new`].
///
/// Renews every `ttl / 3`, retrying failures every `ttl / 12` and an attempt
/// unanswered after `ttl / 6` at once. A renewal may therefore be sent again
/// after an earlier one took effect unseen; `renew` must accept that. A renewal
/// acknowledged for a request sent at `t` proves the session alive until
/// `t + ttl - margin`. The session is declared lost when that deadline
/// passes, or at once when a renewal fails with `SessionLost`/`NotFound` (the
/// server says it is gone). The loop stops when every `Session` clone and the
/// returned sender are dropped, or when the sender reports `Closed`.
pub fn spawn_keep_alive(
    id: SessionId,
    ttl: Duration,
    renew: Renew,
) -> (watch::Sender<SessionState>, watch::Receiver<SessionState>) {
    let margin = safety_margin(ttl);
    let first = Instant::now() + ttl - margin;
    let (tx, rx) = watch::channel(SessionState::Alive { safe_until: first });
    let loop_tx = tx.clone();
    tokio::spawn(async move {
        let mut safe_until = first;
        loop {
            let interval = if loop_tx.borrow().is_alive_state() {
                ttl / 3
            } else {
                return;
            };
            let mut wait = interval;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = loop_tx.closed() => return,
                }
                if !loop_tx.borrow().is_alive_state() {
                    return;
                }
                let sent = Instant::now();
                if sent >= safe_until {
                    lose(
                        &loop_tx,
                        id,
                        "no renewal was acknowledged before the safe-until deadline",
                    );
                    return;
                }
                // One attempt may not take the whole rest of the window: a
                // request whose answer went with a reset connection is
                // never answered, and waiting it out would lose a session
                // that a retry on the new connection keeps alive.
                let attempt = tokio::time::timeout(
                    safe_until
                        .saturating_duration_since(sent)
                        .min(attempt_limit(ttl)),
                    renew(),
                )
                .await;
                match attempt {
                    Ok(Ok(())) => {
                        safe_until = sent + ttl - margin;
                        let _ = loop_tx.send_if_modified(|s| match s {
                            SessionState::Alive { safe_until: old } => {
                                *old = safe_until;
                                true
                            }
                            _ => false,
                        });
                        break;
                    }
                    Ok(Err(e))
                        if matches!(e.kind(), ErrorKind::SessionLost | ErrorKind::NotFound) =>
                    {
                        lose(&loop_tx, id, &format!("the server no longer has it: {e}"));
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(session = %id, error = %e, "session renewal failed; retrying");
                        wait = ttl / 12;
                    }
                    Err(_) => {
                        // Unanswered: the next iteration tries again at once,
                        // or declares the session lost if its deadline passed.
                        tracing::debug!(session = %id, "session renewal unanswered; retrying");
                        wait = Duration::ZERO;
                    }
                }
            }
        }
    });
    (tx, rx)
}

fn lose(tx: &watch::Sender<SessionState>, id: SessionId, why: &str) {
    tx.send_if_modified(|s| {
        if s.is_alive_state() {
            *s = SessionState::Lost(Error::session_lost(format!("session {id} lost: {why}")));
            true
        } else {
            false
        }
    });
}

impl SessionState {
    fn is_alive_state(&self) -> bool {
        matches!(self, SessionState::Alive { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct NoClose;
    #[async_trait]
    impl SessionControl for NoClose {
        async fn close(&self) -> Result<()> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lost_fires_at_safe_until_when_renewals_stall() {
        let ok = Arc::new(AtomicBool::new(true));
        let ok2 = ok.clone();
        let renew: Renew = Box::new(move || {
            let ok = ok2.clone();
            Box::pin(async move {
                if ok.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err(Error::new(ErrorKind::Unavailable, "down").temporary())
                }
            })
        });
        let ttl = Duration::from_secs(3);
        let (_tx, rx) = spawn_keep_alive(SessionId(1), ttl, renew);
        let s = Session::new(SessionId(1), ttl, rx, Arc::new(NoClose));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(s.is_alive(), "renewals succeed, session stays alive");
        ok.store(false, Ordering::SeqCst);
        let stalled_at = Instant::now();
        let e = s.lost().await;
        assert_eq!(e.kind(), ErrorKind::SessionLost);
        // Last acknowledged renewal was sent at most ttl/3 before the stall.
        let waited = stalled_at.elapsed();
        assert!(waited <= ttl - safety_margin(ttl), "{waited:?}");
        assert!(waited >= ttl - safety_margin(ttl) - ttl / 3, "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_renewal_is_retried_before_the_deadline() {
        // Every other renewal is never answered, like a request whose
        // connection was reset: the retry must keep the session alive.
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = calls.clone();
        let renew: Renew = Box::new(move || {
            let call = counted.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if call % 2 == 0 {
                    futures::future::pending::<()>().await;
                }
                Ok(())
            })
        });
        let ttl = Duration::from_secs(3);
        let (_tx, rx) = spawn_keep_alive(SessionId(1), ttl, renew);
        let s = Session::new(SessionId(1), ttl, rx, Arc::new(NoClose));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(s.is_alive(), "{:?}", s.check());
        assert!(calls.load(Ordering::SeqCst) >= 20);
    }

    #[test]
    fn ttl_floor_names_the_minimum() {
        let e = check_ttl(Duration::from_millis(100), Duration::from_secs(2)).unwrap_err();
        assert!(e.to_string().contains("minimum of 2s"), "{e}");
    }
}
