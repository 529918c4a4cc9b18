// Sessions: the TTL floor, staying alive unattended, close, and loss (server
// side expiry and stalled renewals, through the backend's fault hooks).

use super::case;
use crate::util::{
    completes, ensure, ensure_eq, eventually, expect_err, key, val, within, Context, WAIT,
};
use crate::{Case, CaseResult, Ctx, Fail, Requirement};
use dprim::{ErrorKind, KvExt, SessionState};
use std::time::Duration;

pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(
            "session::ttl_below_min_invalid",
            ttl_below_min_invalid,
            [],
            "A TTL below the backend's `min_session_ttl` capability is `InvalidArgument` naming the minimum."
        ),
        case!(
            "session::stays_alive_without_action",
            stays_alive_without_action,
            [],
            "The session stays alive while the backend is reachable, without any action from the caller."
        ),
        case!(
            "session::close_resolves_lost_with_closed",
            close_resolves_lost_with_closed,
            [],
            "Resolves with `Closed` after [`Session::close`]."
        ),
        case!(
            "session::close_deletes_ephemerals_at_once",
            close_deletes_ephemerals_at_once,
            [],
            "Keys attached to the session vanish when it is closed (at once) or expires (after the TTL)."
        ),
        case!(
            "session::close_twice_ok",
            close_twice_ok,
            [],
            "Closing an already closed or lost session succeeds."
        ),
        case!(
            "session::check_after_close",
            check_after_close,
            [],
            "`Ok` while alive; otherwise `SessionLost` (also for a closed session)."
        ),
        case!(
            "session::expiry_reported_lost",
            expiry_reported_lost,
            [Requirement::FaultExpireSession],
            "Resolves no later than the safe-until deadline when renewals stop being acknowledged, which is before the server can expire the session."
        ),
        case!(
            "session::expiry_deletes_ephemerals",
            expiry_deletes_ephemerals,
            [Requirement::FaultExpireSession],
            "Keys attached to the session vanish when it is closed (at once) or expires (after the TTL)."
        ),
        case!(
            "session::stall_lost_before_server_expiry",
            stall_lost_before_server_expiry,
            [Requirement::FaultStallSession],
            "A session whose renewals stop being acknowledged is reported lost (see [`Session::lost`]) before the server can expire it."
        ),
    ]
}

async fn ttl_below_min_invalid(ctx: Ctx) -> CaseResult {
    let min = ctx.caps().session.min_ttl;
    if min < Duration::from_millis(2) {
        return Err(Fail::Skipped(format!(
            "the backend declares session.min_ttl = {}; there is no TTL below it to try",
            humantime::format_duration(min)
        )));
    }
    let e = expect_err(
        ctx.backend.sessions().open(min / 2).await,
        &[ErrorKind::InvalidArgument],
        "open(min_ttl / 2)",
    )?;
    let text = e.to_string();
    let named = [
        humantime::format_duration(min).to_string(),
        format!("{}ms", min.as_millis()),
        format!("{:?}", min),
    ];
    ensure!(
        named.iter().any(|n| text.contains(n.as_str())),
        "the error does not name the minimum ({}): {text}",
        named[0]
    );
    let s = ctx
        .backend
        .sessions()
        .open(min)
        .await
        .ctx("open(min_ttl)")?;
    ensure!(
        s.is_alive(),
        "a session opened with exactly min_ttl is not alive"
    );
    s.close().await.ctx("close")?;
    Ok(())
}

async fn stays_alive_without_action(ctx: Ctx) -> CaseResult {
    let ttl = ctx.session_ttl();
    let session = ctx.short_session().await?;
    let k = key("alive")?;
    ctx.backend
        .kv()
        .put_ephemeral(&k, val("x")?, &session)
        .await
        .ctx("put ephemeral")?;
    let span = ttl * 7 / 2;
    if let Some(e) = completes(span, session.lost()).await {
        crate::util::fail!(
            "the session was lost within {} (TTL {}): {e}",
            humantime::format_duration(span),
            humantime::format_duration(ttl)
        );
    }
    ensure!(
        session.is_alive(),
        "the session is not alive after 3.5 TTLs: {:?}",
        session.state()
    );
    session.check().ctx("session.check() after 3.5 TTLs")?;
    let other = ctx.another_client().await.ctx("open another client")?;
    ensure!(
        other.kv().get(&k).await.ctx("get")?.is_some(),
        "the ephemeral key expired while the session was alive"
    );
    session.close().await.ctx("close")?;
    Ok(())
}

async fn close_resolves_lost_with_closed(ctx: Ctx) -> CaseResult {
    let session = ctx.session().await?;
    let clone = session.clone();
    let waiter = tokio::spawn(async move { clone.lost().await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    ensure!(!waiter.is_finished(), "lost() resolved before close");
    session.close().await.ctx("close")?;
    let e = within(WAIT, "lost() after close", waiter)
        .await?
        .map_err(|e| Fail::Failed(format!("waiter: {e}")))?;
    ensure_eq!(
        e.kind(),
        ErrorKind::Closed,
        "kind of lost() after close ({e})"
    );
    let again = within(WAIT, "lost() called after close", session.lost()).await?;
    ensure_eq!(
        again.kind(),
        ErrorKind::Closed,
        "kind of lost() called after close ({again})"
    );
    Ok(())
}

async fn close_deletes_ephemerals_at_once(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let doomed = ctx.session().await?;
    let survivor = ctx.session().await?;
    for i in 0..5 {
        kv.put_ephemeral(&key(&format!("d/{i}"))?, val("x")?, &doomed)
            .await
            .ctx("put ephemeral")?;
    }
    kv.put_ephemeral(&key("s/0")?, val("x")?, &survivor)
        .await
        .ctx("put survivor's key")?;
    let other = ctx.another_client().await.ctx("open another client")?;
    doomed.close().await.ctx("close")?;
    let check_gone = || async {
        let listing = other
            .kv()
            .list(&key("d")?, dprim::Depth::Children)
            .await
            .ctx("list d")?;
        Ok::<bool, Fail>(listing.entries.is_empty())
    };
    if ctx.caps().kv.linearizable {
        ensure!(
            check_gone().await?,
            "ephemeral keys are still listed right after close"
        );
    } else {
        eventually(WAIT, "ephemeral keys gone after close", check_gone).await?;
    }
    ensure!(
        other.kv().get(&key("s/0")?).await.ctx("get s/0")?.is_some(),
        "closing one session deleted another session's key"
    );
    ensure!(survivor.is_alive(), "closing one session ended another");
    Ok(())
}

async fn close_twice_ok(ctx: Ctx) -> CaseResult {
    let session = ctx.session().await?;
    session.close().await.ctx("first close")?;
    session.close().await.ctx("second close")?;
    session.clone().close().await.ctx("close through a clone")?;
    Ok(())
}

async fn check_after_close(ctx: Ctx) -> CaseResult {
    let session = ctx.session().await?;
    session.check().ctx("check while alive")?;
    ensure!(
        session.safe_until().is_some(),
        "an alive session has no safe-until deadline"
    );
    session.close().await.ctx("close")?;
    expect_err(
        session.check(),
        &[ErrorKind::SessionLost],
        "check after close",
    )?;
    ensure!(!session.is_alive(), "is_alive() after close");
    ensure!(
        !matches!(session.state(), SessionState::Alive { .. }),
        "state after close: {:?}",
        session.state()
    );
    Ok(())
}

async fn expiry_reported_lost(ctx: Ctx) -> CaseResult {
    let session = ctx.short_session().await?;
    ctx.expire_session(session.id()).await?;
    let e = within(
        ctx.session_ttl() + WAIT,
        "lost() after server-side expiry",
        session.lost(),
    )
    .await?;
    ensure_eq!(
        e.kind(),
        ErrorKind::SessionLost,
        "kind of lost() after expiry ({e})"
    );
    ensure!(!session.is_alive(), "is_alive() after lost() resolved");
    expect_err(
        session.check(),
        &[ErrorKind::SessionLost],
        "check after loss",
    )?;
    session.close().await.ctx("closing a lost session")?;
    Ok(())
}

async fn expiry_deletes_ephemerals(ctx: Ctx) -> CaseResult {
    let session = ctx.short_session().await?;
    let keeper = ctx.session().await?;
    let kv = ctx.backend.kv();
    kv.put_ephemeral(&key("gone")?, val("x")?, &session)
        .await
        .ctx("put ephemeral")?;
    kv.put_ephemeral(&key("kept")?, val("x")?, &keeper)
        .await
        .ctx("put another session's key")?;
    ctx.expire_session(session.id()).await?;
    let other = ctx.another_client().await.ctx("open another client")?;
    eventually(
        ctx.session_ttl() + WAIT,
        "the expired session's key gone",
        || async { Ok(other.kv().get(&key("gone")?).await.ctx("get")?.is_none()) },
    )
    .await?;
    ensure!(
        other
            .kv()
            .get(&key("kept")?)
            .await
            .ctx("get kept")?
            .is_some(),
        "expiring one session deleted another's key"
    );
    Ok(())
}

async fn stall_lost_before_server_expiry(ctx: Ctx) -> CaseResult {
    // A few seconds of TTL leave a wide margin between the client's deadline
    // and the server's expiry, so the check below is not a race.
    let ttl = ctx.session_ttl().max(Duration::from_secs(3));
    let session = ctx
        .backend
        .sessions()
        .open(ttl)
        .await
        .ctx("open a session")?;
    let k = key("held")?;
    ctx.backend
        .kv()
        .put_ephemeral(&k, val("x")?, &session)
        .await
        .ctx("put ephemeral")?;
    let other = ctx.another_client().await.ctx("open another client")?;
    ctx.stall_session(session.id()).await?;
    let e = within(ttl + WAIT, "lost() after renewals stalled", session.lost()).await?;
    let present = other
        .kv()
        .get(&k)
        .await
        .ctx("get the key the moment lost() resolved")?;
    ensure_eq!(
        e.kind(),
        ErrorKind::SessionLost,
        "kind of lost() after a stall ({e})"
    );
    ensure!(
        present.is_some(),
        "the server had already deleted the session's key when the client reported the session lost"
    );
    eventually(
        ttl + WAIT,
        "the stalled session's key gone after the TTL",
        || async { Ok(other.kv().get(&k).await.ctx("get")?.is_none()) },
    )
    .await
}
