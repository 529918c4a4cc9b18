//! `dprim elect NAME [VALUE]`, `--show`, `--observe`

use super::{ephemeral_hint, identity, key};
use crate::cli::{Ctx, ElectArgs};
use crate::exit::{self, Failure, OK};
use crate::output::{note, value_json, value_text};
use dprim::{Error, ErrorKind, Key, Leader, Value};
use futures::StreamExt;
use serde_json::json;

pub(crate) async fn run(ctx: &Ctx, args: ElectArgs) -> Result<u8, Failure> {
    let name = key(&args.name)?;
    if args.show {
        return show(ctx, &name).await;
    }
    if args.observe {
        return observe(ctx, &name, args.count).await;
    }
    let value = Value::new(args.value.unwrap_or_else(identity).into_bytes())?;
    let (backend, config) = ctx.open().await?;
    let ttl = args.ttl.unwrap_or(config.backend.session_ttl);
    let session = backend.sessions().open(ttl).await?;
    let result = campaign(ctx, &backend, &name, value, &session).await;
    if let Err(e) = session.close().await {
        note(&format!("warning: closing the session failed: {e}"));
    }
    result
}

async fn campaign(
    ctx: &Ctx,
    backend: &dprim::Backend,
    name: &Key,
    value: Value,
    session: &dprim::Session,
) -> Result<u8, Failure> {
    let shown = value_text(&value).0;
    if !ctx.out.is_json() {
        note(&format!(
            "campaigning for leadership of {name} as {shown} (Ctrl-C to stop)"
        ));
    }
    let leadership = tokio::select! {
        result = backend.elections().campaign(name, value, session) => result?,
        _ = ctx.interrupted() => {
            return Err(Failure::new(Error::new(
                ErrorKind::Closed,
                format!("interrupted before being elected leader of `{name}`; candidacy withdrawn"),
            ))
            .with_code(exit::INTERRUPTED));
        }
    };
    let term = leadership.term();
    // A closed stdout must not end leadership early.
    let _ = ctx.out.emit(
        &format!("elected leader of {name}, term {term}"),
        json!({
            "election": name.as_str(),
            "term": term.0,
            "value": shown,
            "session": session.id().to_string(),
        }),
    );
    let lost = tokio::select! {
        cause = leadership.lost() => Some(cause),
        _ = ctx.interrupted() => None,
    };
    if let Some(cause) = lost {
        return Err(Failure::new(Error::session_lost(format!(
            "lost leadership of `{name}` (term {term}): {}; stop acting as leader",
            cause.message()
        ))));
    }
    if let Err(e) = leadership.resign().await {
        note(&format!(
            "warning: resigning failed ({e}); leadership ends when the session does"
        ));
    }
    let _ = ctx.out.emit(
        &format!("resigned leadership of {name}, term {term}"),
        json!({"election": name.as_str(), "term": term.0, "resigned": true}),
    );
    Ok(OK)
}

fn leader_json(name: &Key, leader: Option<&Leader>) -> serde_json::Value {
    match leader {
        Some(l) => {
            let (value, encoding) = value_json(&l.value);
            json!({
                "election": name.as_str(),
                "leader": {
                    "value": value,
                    "encoding": encoding,
                    "term": l.term.0,
                    "session": l.session.to_string(),
                },
            })
        }
        None => json!({"election": name.as_str(), "leader": null}),
    }
}

fn leader_text(name: &Key, leader: Option<&Leader>) -> String {
    match leader {
        Some(l) => format!(
            "leader of {name}: {} (term {}, session {})",
            value_text(&l.value).0,
            l.term,
            l.session
        ),
        None => format!("{name} has no leader"),
    }
}

async fn show(ctx: &Ctx, name: &Key) -> Result<u8, Failure> {
    let (backend, _) = ctx.open().await?;
    let leader = backend.elections().leader(name).await?;
    match leader {
        Some(l) => {
            ctx.out
                .emit(&leader_text(name, Some(&l)), leader_json(name, Some(&l)))?;
            Ok(OK)
        }
        None => {
            if ctx.out.is_json() {
                ctx.out.emit("", leader_json(name, None))?;
                return Ok(exit::CONDITION);
            }
            let mut failure =
                Failure::new(Error::not_found(format!("election `{name}` has no leader")));
            if let Some(h) = ephemeral_hint(&backend, ctx.config.as_deref()) {
                failure = failure.hint(h);
            }
            Err(failure)
        }
    }
}

async fn observe(ctx: &Ctx, name: &Key, count: Option<u64>) -> Result<u8, Failure> {
    let (backend, _) = ctx.open().await?;
    let mut updates = backend.elections().observe(name).await?;
    if count == Some(0) {
        return Ok(OK);
    }
    let mut seen = 0u64;
    let mut interrupts = ctx.interrupts();
    loop {
        let update = tokio::select! {
            _ = interrupts.next() => return Ok(OK),
            update = updates.next() => update,
        };
        let leader = match update {
            Some(Ok(leader)) => leader,
            Some(Err(e)) => return Err(Failure::new(e)),
            None => {
                return Err(Failure::new(Error::closed(format!(
                    "the backend ended observing `{name}`"
                ))))
            }
        };
        ctx.out.emit(
            &leader_text(name, leader.as_ref()),
            leader_json(name, leader.as_ref()),
        )?;
        seen += 1;
        if count.is_some_and(|n| seen >= n) {
            return Ok(OK);
        }
    }
}
