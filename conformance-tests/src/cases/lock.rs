// Locks: exclusion, non-reentrancy, timeouts, hand-over with larger fencing
// tokens, FIFO waiters, waiters giving up, holders' sessions ending, and many
// concurrent lockers.

use super::case;
use crate::util::{
    completes, ensure, ensure_eq, expect_err, fail, key, within, Context, DROPS,
    DROP_WITHIN_MICROS, QUIET, WAIT,
};
use crate::{Case, CaseResult, Ctx, Fail, Requirement};
use dprim::{Backend, ErrorKind, FencingToken, Key, LockGuard, Session};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(
            "lock::try_lock_held_returns_none",
            try_lock_held_returns_none,
            [],
            "Returns `Ok(None)` when the lock is held or others are already queued for it; never waits."
        ),
        case!(
            "lock::not_reentrant",
            not_reentrant,
            [],
            "Locks are not reentrant: a second acquire with the same session waits like any other contender (and `try_lock` returns `None`)."
        ),
        case!(
            "lock::lock_timeout",
            lock_timeout,
            [],
            "Fails `Timeout` after `timeout`; `SessionLost` if the session is or becomes lost while waiting."
        ),
        case!(
            "lock::unlock_hands_over_larger_token",
            unlock_hands_over_larger_token,
            [],
            "The next waiter in line is granted the lock with a larger token."
        ),
        case!(
            "lock::fifo_waiters",
            fifo_waiters,
            [Requirement::LockFair],
            "Waiters are granted the lock in the order they asked (FIFO, when the backend declares `fair_locks`), and a holder's release wakes only the next waiter."
        ),
        case!(
            "lock::waiter_giving_up_does_not_jump_holder",
            waiter_giving_up_does_not_jump_holder,
            [],
            "A waiter that gives up (timeout, dropped future, lost session) leaves the queue without letting anyone jump the current holder."
        ),
        case!(
            "lock::lock_dropped_at_any_point_leaves_the_line",
            lock_dropped_at_any_point_leaves_the_line,
            [],
            "A waiter that gives up (timeout, dropped future, lost session) leaves the queue without letting anyone jump the current holder."
        ),
        case!(
            "lock::waiter_session_lost_fails",
            waiter_session_lost_fails,
            [],
            "Fails `Timeout` after `timeout`; `SessionLost` if the session is or becomes lost while waiting."
        ),
        case!(
            "lock::holder_close_passes_lock",
            holder_close_passes_lock,
            [],
            "When the holder's session ends, the lock passes to the next waiter."
        ),
        case!(
            "lock::holder_expiry_passes_lock",
            holder_expiry_passes_lock,
            [Requirement::FaultExpireSession],
            "When the holder's session ends, the lock passes to the next waiter."
        ),
        case!(
            "lock::stalled_holder_learns_first",
            stalled_holder_learns_first,
            [Requirement::FaultStallSession],
            "Resolves when the holder's session is lost: from then on the lock may be granted to someone else, so stop acting on it."
        ),
        case!(
            "lock::dropped_guard_releases",
            dropped_guard_releases,
            [],
            "Release it with [`LockGuard::unlock`]; dropping it releases in the background, and the lock is freed anyway when the session ends."
        ),
        case!(
            "lock::unlock_after_lost_ok",
            unlock_after_lost_ok,
            [],
            "Unlocking after the session was lost succeeds (there is nothing left to release)."
        ),
        case!(
            "lock::concurrent_lockers_exclusive",
            concurrent_lockers_exclusive,
            [],
            "At most one guard per name exists at a time across all clients."
        ),
    ]
}

fn name() -> Result<Key, Fail> {
    key("locks/the-lock")
}

/// Starts a waiter for `name` on `backend` with `session`, in its own task.
fn waiter(
    backend: &Backend,
    session: &Session,
    timeout: Duration,
) -> Result<JoinHandle<dprim::Result<LockGuard>>, Fail> {
    let backend = backend.clone();
    let session = session.clone();
    let name = name()?;
    Ok(tokio::spawn(async move {
        backend.locks().lock(&name, &session, timeout).await
    }))
}

async fn acquired(
    handle: JoinHandle<dprim::Result<LockGuard>>,
    what: &str,
) -> Result<LockGuard, Fail> {
    within(WAIT, what, handle)
        .await?
        .map_err(|e| Fail::Failed(format!("{what}: task failed: {e}")))?
        .ctx(what)
}

async fn try_lock_held_returns_none(ctx: Ctx) -> CaseResult {
    let s1 = ctx.session().await?;
    let other = ctx.another_client().await.ctx("open another client")?;
    let s2 = ctx.session_on(&other).await?;
    let n = name()?;
    let g = ctx
        .backend
        .locks()
        .try_lock(&n, &s1)
        .await
        .ctx("try_lock a free lock")?
        .ctx("try_lock a free lock")?;
    ensure_eq!(g.name(), &n, "the guard's name");
    ensure_eq!(g.session().id(), s1.id(), "the guard's session");
    let attempt = within(
        WAIT,
        "try_lock a held lock (it must not wait)",
        other.locks().try_lock(&n, &s2),
    )
    .await?;
    ensure!(
        attempt.ctx("try_lock a held lock")?.is_none(),
        "try_lock returned a second guard"
    );
    let same_client = ctx.session().await?;
    ensure!(
        ctx.backend
            .locks()
            .try_lock(&n, &same_client)
            .await
            .ctx("try_lock")?
            .is_none(),
        "try_lock from the holder's client returned a guard"
    );
    // Another name is independent.
    ensure!(
        other
            .locks()
            .try_lock(&key("locks/other")?, &s2)
            .await
            .ctx("try_lock another name")?
            .is_some(),
        "another lock name is held too"
    );
    g.unlock().await.ctx("unlock")?;
    ensure!(
        other
            .locks()
            .try_lock(&n, &s2)
            .await
            .ctx("try_lock after unlock")?
            .is_some(),
        "the lock is still held after unlock"
    );
    Ok(())
}

async fn not_reentrant(ctx: Ctx) -> CaseResult {
    let s = ctx.session().await?;
    let n = name()?;
    let g = ctx
        .backend
        .locks()
        .try_lock(&n, &s)
        .await
        .ctx("try_lock")?
        .ctx("first try_lock")?;
    ensure!(
        ctx.backend
            .locks()
            .try_lock(&n, &s)
            .await
            .ctx("second try_lock")?
            .is_none(),
        "try_lock with the holder's session returned a second guard"
    );
    expect_err(
        ctx.backend
            .locks()
            .lock(&n, &s, Duration::from_millis(300))
            .await,
        &[ErrorKind::Timeout],
        "lock again with the holder's session",
    )?;
    g.check()
        .ctx("the first guard after the reentrant attempts")?;
    Ok(())
}

async fn lock_timeout(ctx: Ctx) -> CaseResult {
    let holder = ctx.session().await?;
    let other = ctx.session().await?;
    let n = name()?;
    let _g = ctx
        .backend
        .locks()
        .lock(&n, &holder, WAIT)
        .await
        .ctx("lock")?;
    let timeout = Duration::from_millis(400);
    let started = Instant::now();
    let result = within(
        timeout + WAIT,
        "lock on a held lock",
        ctx.backend.locks().lock(&n, &other, timeout),
    )
    .await?;
    let waited = started.elapsed();
    expect_err(result, &[ErrorKind::Timeout], "lock on a held lock")?;
    ensure!(
        waited >= timeout * 9 / 10,
        "Timeout came after {waited:?}, before the {timeout:?} timeout"
    );
    Ok(())
}

async fn unlock_hands_over_larger_token(ctx: Ctx) -> CaseResult {
    let other = ctx.another_client().await.ctx("open another client")?;
    let s1 = ctx.session().await?;
    let s2 = ctx.session_on(&other).await?;
    let g1 = ctx
        .backend
        .locks()
        .lock(&name()?, &s1, WAIT)
        .await
        .ctx("lock")?;
    let w = waiter(&other, &s2, WAIT * 2)?;
    if completes(QUIET, async {
        while !w.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await
        }
    })
    .await
    .is_some()
    {
        fail!("the waiter finished while the lock was held");
    }
    let t1 = g1.fencing_token();
    g1.unlock().await.ctx("unlock")?;
    let g2 = acquired(w, "the waiter after unlock").await?;
    ensure!(
        g2.fencing_token() > t1,
        "token {} after {t1}",
        g2.fencing_token()
    );
    let t2 = g2.fencing_token();
    g2.unlock().await.ctx("unlock 2")?;
    // The first holder coming back gets a token larger than every earlier one.
    let g3 = ctx
        .backend
        .locks()
        .lock(&name()?, &s1, WAIT)
        .await
        .ctx("lock again")?;
    ensure!(
        g3.fencing_token() > t2,
        "token {} after {t2}",
        g3.fencing_token()
    );
    Ok(())
}

async fn fifo_waiters(ctx: Ctx) -> CaseResult {
    let holder = ctx.session().await?;
    let g = ctx
        .backend
        .locks()
        .lock(&name()?, &holder, WAIT)
        .await
        .ctx("lock")?;
    let order: Arc<Mutex<Vec<(usize, FencingToken)>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 1..=3 {
        let client = ctx.another_client().await.ctx("open another client")?;
        let session = ctx.session_on(&client).await?;
        let order = order.clone();
        let n = name()?;
        tasks.push(tokio::spawn(async move {
            let g = client.locks().lock(&n, &session, WAIT * 4).await?;
            if let Ok(mut o) = order.lock() {
                o.push((i, g.fencing_token()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            g.unlock().await
        }));
        // Let the waiter queue up before the next one asks.
        tokio::time::sleep(QUIET).await;
    }
    let t0 = g.fencing_token();
    g.unlock().await.ctx("unlock")?;
    for t in tasks {
        within(WAIT * 2, "a waiter", t)
            .await?
            .map_err(|e| Fail::Failed(format!("waiter task: {e}")))?
            .ctx("a waiter")?;
    }
    let order = order
        .lock()
        .map(|o| o.clone())
        .map_err(|_| Fail::Failed("poisoned".into()))?;
    ensure_eq!(
        order.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "order the waiters acquired the lock"
    );
    let mut last = t0;
    for (i, t) in order {
        ensure!(t > last, "waiter {i} got token {t} after {last}");
        last = t;
    }
    Ok(())
}

async fn waiter_giving_up_does_not_jump_holder(ctx: Ctx) -> CaseResult {
    let n = name()?;
    let holder = ctx.session().await?;
    let g = ctx
        .backend
        .locks()
        .lock(&n, &holder, WAIT)
        .await
        .ctx("lock")?;
    let other = ctx.another_client().await.ctx("open another client")?;

    // 1. A waiter that times out.
    let s_timeout = ctx.session_on(&other).await?;
    expect_err(
        other
            .locks()
            .lock(&n, &s_timeout, Duration::from_millis(200))
            .await,
        &[ErrorKind::Timeout],
        "a waiter timing out",
    )?;
    // 2. A waiter whose future is dropped.
    let s_drop = ctx.session_on(&other).await?;
    let dropped = completes(
        Duration::from_millis(200),
        other.locks().lock(&n, &s_drop, WAIT * 4),
    )
    .await;
    ensure!(
        dropped.is_none(),
        "a waiter acquired a held lock: {dropped:?}"
    );
    // 3. A waiter whose session is lost.
    let s_lost = ctx.session_on(&other).await?;
    let w_lost = waiter(&other, &s_lost, WAIT * 4)?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    s_lost.close().await.ctx("close the waiter's session")?;
    let r = within(WAIT, "the waiter whose session closed", w_lost)
        .await?
        .map_err(|e| Fail::Failed(format!("task: {e}")))?;
    expect_err(
        r,
        &[ErrorKind::SessionLost],
        "the waiter whose session closed",
    )?;

    // Nobody jumped the holder.
    g.check().ctx("the holder's guard")?;
    let s_probe = ctx.session_on(&other).await?;
    ensure!(
        other
            .locks()
            .try_lock(&n, &s_probe)
            .await
            .ctx("try_lock")?
            .is_none(),
        "the lock is free although its holder never released it"
    );
    // The next real waiter gets it on release, not a ghost of the ones that gave up.
    let s_next = ctx.session_on(&other).await?;
    let w_next = waiter(&other, &s_next, WAIT * 2)?;
    tokio::time::sleep(QUIET).await;
    ensure!(
        !w_next.is_finished(),
        "a waiter acquired the lock while it was held"
    );
    let t0 = g.fencing_token();
    g.unlock().await.ctx("unlock")?;
    let g2 = acquired(w_next, "the live waiter after release").await?;
    ensure!(
        g2.fencing_token() > t0,
        "token {} after {t0}",
        g2.fencing_token()
    );
    ensure_eq!(g2.session().id(), s_next.id(), "the new holder's session");
    Ok(())
}

/// Lock requests dropped at random moments, from before the first request
/// to long after joining the line, most of them while their request to join
/// is on its way: a place joined by a request whose answer nobody waits for
/// must be given up all the same.
async fn lock_dropped_at_any_point_leaves_the_line(ctx: Ctx) -> CaseResult {
    let n = name()?;
    let holder = ctx.session().await?;
    let g = ctx
        .backend
        .locks()
        .lock(&n, &holder, WAIT)
        .await
        .ctx("lock")?;
    let quitter = ctx.session().await?;
    for _ in 0..DROPS {
        let after = Duration::from_micros(rand::random_range(0..DROP_WITHIN_MICROS));
        let dropped = completes(after, ctx.backend.locks().lock(&n, &quitter, WAIT * 4)).await;
        ensure!(
            dropped.is_none(),
            "a lock request ended while the lock was held: {dropped:?}"
        );
    }
    let s_next = ctx.session().await?;
    let w_next = waiter(&ctx.backend, &s_next, WAIT * 2)?;
    g.unlock().await.ctx("unlock")?;
    let g2 = acquired(
        w_next,
        "the live waiter after requests dropped on their way into line",
    )
    .await?;
    ensure!(quitter.is_alive(), "giving up ended the quitter's session");
    g2.unlock().await.ctx("unlock")?;
    Ok(())
}

async fn waiter_session_lost_fails(ctx: Ctx) -> CaseResult {
    let n = name()?;
    let holder = ctx.session().await?;
    let _g = ctx
        .backend
        .locks()
        .lock(&n, &holder, WAIT)
        .await
        .ctx("lock")?;
    let s = ctx.session().await?;
    let w = waiter(&ctx.backend, &s, WAIT * 4)?;
    tokio::time::sleep(QUIET).await;
    s.close().await.ctx("close the waiter's session")?;
    let r = within(WAIT, "the waiter after its session closed", w)
        .await?
        .map_err(|e| Fail::Failed(format!("task: {e}")))?;
    expect_err(
        r,
        &[ErrorKind::SessionLost],
        "lock while the session becomes lost",
    )?;
    // A session that is already lost fails at once, even on a free lock.
    let free = key("locks/free")?;
    let r = within(
        WAIT,
        "lock with a closed session",
        ctx.backend.locks().lock(&free, &s, WAIT * 4),
    )
    .await?;
    expect_err(r, &[ErrorKind::SessionLost], "lock with a closed session")?;
    Ok(())
}

async fn holder_close_passes_lock(ctx: Ctx) -> CaseResult {
    let n = name()?;
    let holder = ctx.session().await?;
    let g = ctx
        .backend
        .locks()
        .lock(&n, &holder, WAIT)
        .await
        .ctx("lock")?;
    let other = ctx.another_client().await.ctx("open another client")?;
    let s2 = ctx.session_on(&other).await?;
    let w = waiter(&other, &s2, WAIT * 2)?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    holder.close().await.ctx("close the holder's session")?;
    let lost = within(WAIT, "the guard's lost()", g.lost()).await?;
    ensure_eq!(
        lost.kind(),
        ErrorKind::Closed,
        "kind of guard.lost() after close ({lost})"
    );
    let g2 = acquired(w, "the waiter after the holder's session closed").await?;
    ensure!(
        g2.fencing_token() > g.fencing_token(),
        "token {} after {}",
        g2.fencing_token(),
        g.fencing_token()
    );
    Ok(())
}

async fn holder_expiry_passes_lock(ctx: Ctx) -> CaseResult {
    let n = name()?;
    let holder = ctx.short_session().await?;
    let g = ctx
        .backend
        .locks()
        .lock(&n, &holder, WAIT)
        .await
        .ctx("lock")?;
    let other = ctx.another_client().await.ctx("open another client")?;
    let s2 = ctx.session_on(&other).await?;
    let w = waiter(&other, &s2, WAIT * 4)?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    ctx.expire_session(holder.id()).await?;
    let lost = within(
        ctx.session_ttl() + WAIT,
        "the guard's lost() after expiry",
        g.lost(),
    )
    .await?;
    ensure_eq!(
        lost.kind(),
        ErrorKind::SessionLost,
        "kind of guard.lost() after expiry ({lost})"
    );
    let g2 = acquired(w, "the waiter after the holder's session expired").await?;
    ensure!(
        g2.fencing_token() > g.fencing_token(),
        "token {} after {}",
        g2.fencing_token(),
        g.fencing_token()
    );
    g.unlock().await.ctx("unlock after the session expired")?;
    g2.check()
        .ctx("the new holder after the old one's unlock")?;
    Ok(())
}

async fn stalled_holder_learns_first(ctx: Ctx) -> CaseResult {
    let n = name()?;
    let ttl = ctx.session_ttl().max(Duration::from_secs(3));
    let holder = ctx
        .backend
        .sessions()
        .open(ttl)
        .await
        .ctx("open a session")?;
    let g = ctx
        .backend
        .locks()
        .lock(&n, &holder, WAIT)
        .await
        .ctx("lock")?;
    let other = ctx.another_client().await.ctx("open another client")?;
    let s2 = ctx.session_on(&other).await?;
    let granted = Arc::new(AtomicBool::new(false));
    let flag = granted.clone();
    let o = other.clone();
    let n2 = n.clone();
    let w = tokio::spawn(async move {
        let g = o.locks().lock(&n2, &s2, ttl * 4).await;
        flag.store(true, Ordering::SeqCst);
        g
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    ctx.stall_session(holder.id()).await?;
    let lost = within(ttl + WAIT, "the stalled holder's lost()", g.lost()).await?;
    ensure!(!granted.load(Ordering::SeqCst), "the lock was granted to the next waiter before the stalled holder's lost() resolved ({lost})");
    let g2 = within(
        ttl + WAIT,
        "the waiter after the stalled holder's session expired",
        w,
    )
    .await?
    .map_err(|e| Fail::Failed(format!("task: {e}")))?
    .ctx("the waiter")?;
    ensure!(
        g2.fencing_token() > g.fencing_token(),
        "token {} after {}",
        g2.fencing_token(),
        g.fencing_token()
    );
    Ok(())
}

async fn dropped_guard_releases(ctx: Ctx) -> CaseResult {
    let n = name()?;
    let s1 = ctx.session().await?;
    let g = ctx.backend.locks().lock(&n, &s1, WAIT).await.ctx("lock")?;
    let t1 = g.fencing_token();
    let s2 = ctx.session().await?;
    let w = waiter(&ctx.backend, &s2, WAIT * 2)?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(g);
    let g2 = acquired(w, "the waiter after the guard was dropped").await?;
    ensure!(
        g2.fencing_token() > t1,
        "token {} after {t1}",
        g2.fencing_token()
    );
    ensure!(s1.is_alive(), "dropping the guard ended its session");
    Ok(())
}

async fn unlock_after_lost_ok(ctx: Ctx) -> CaseResult {
    let n = name()?;
    let s1 = ctx.session().await?;
    let g = ctx.backend.locks().lock(&n, &s1, WAIT).await.ctx("lock")?;
    s1.close().await.ctx("close the holder's session")?;
    let s2 = ctx.session().await?;
    let g2 = ctx
        .backend
        .locks()
        .lock(&n, &s2, WAIT)
        .await
        .ctx("lock after the holder's session closed")?;
    g.unlock()
        .await
        .ctx("unlock after the session was closed")?;
    g2.check()
        .ctx("the new holder after the old guard's unlock")?;
    let s3 = ctx.session().await?;
    ensure!(
        ctx.backend
            .locks()
            .try_lock(&n, &s3)
            .await
            .ctx("try_lock")?
            .is_none(),
        "the stale unlock released the new holder's lock"
    );
    Ok(())
}

async fn concurrent_lockers_exclusive(ctx: Ctx) -> CaseResult {
    const LOCKERS: usize = 16;
    const ROUNDS: usize = 4;
    let mut clients = vec![ctx.backend.clone()];
    for _ in 0..3 {
        clients.push(ctx.another_client().await.ctx("open another client")?);
    }
    let in_section = Arc::new(AtomicBool::new(false));
    let tokens: Arc<Mutex<Vec<(usize, FencingToken)>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..LOCKERS {
        let client = clients[i % clients.len()].clone();
        let session = ctx.session_on(&client).await?;
        let in_section = in_section.clone();
        let tokens = tokens.clone();
        let n = name()?;
        tasks.push(tokio::spawn(async move {
            for round in 0..ROUNDS {
                let g = client
                    .locks()
                    .lock(&n, &session, Duration::from_secs(40))
                    .await
                    .ctx("lock")?;
                if in_section.swap(true, Ordering::SeqCst) {
                    fail!("locker {i} (round {round}) entered while another locker held the lock");
                }
                if let Ok(mut t) = tokens.lock() {
                    t.push((i, g.fencing_token()));
                }
                tokio::time::sleep(Duration::from_millis(2 + (i as u64 % 3))).await;
                in_section.store(false, Ordering::SeqCst);
                g.unlock().await.ctx("unlock")?;
            }
            Ok::<(), Fail>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| Fail::Failed(format!("locker task: {e}")))??;
    }
    let tokens = tokens
        .lock()
        .map(|t| t.clone())
        .map_err(|_| Fail::Failed("poisoned".into()))?;
    ensure_eq!(tokens.len(), LOCKERS * ROUNDS, "acquisitions");
    for pair in tokens.windows(2) {
        ensure!(
            pair[1].1 > pair[0].1,
            "locker {} got token {} after locker {} had {}",
            pair[1].0,
            pair[1].1,
            pair[0].0,
            pair[0].1
        );
    }
    Ok(())
}
