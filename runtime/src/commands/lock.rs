//! `dprim lock NAME [-- CMD ARGS...]`

use super::{human, key};
use crate::cli::{Ctx, LockArgs};
use crate::exit::{self, Failure, OK};
use crate::output::note;
use dprim::{Error, ErrorKind, Key, LockGuard, Session};
use serde_json::json;
use std::process::ExitStatus;
use std::time::Duration;

/// How long acquiring may take before dprim says it is waiting.
const WAITING_NOTICE: Duration = Duration::from_millis(500);

pub(crate) async fn run(ctx: &Ctx, args: LockArgs) -> Result<u8, Failure> {
    let name = key(&args.name)?;
    let (backend, config) = ctx.open().await?;
    let ttl = args.ttl.unwrap_or(config.backend.session_ttl);
    let session = backend.sessions().open(ttl).await?;
    let result = async {
        let guard = acquire(ctx, &backend, &name, &session, args.timeout).await?;
        if args.command.is_empty() {
            hold(ctx, guard).await
        } else {
            run_command(ctx, guard, &args.command).await
        }
    }
    .await;
    if let Err(e) = session.close().await {
        note(&format!("warning: closing the session failed: {e}"));
    }
    result
}

async fn acquire(
    ctx: &Ctx,
    backend: &dprim::Backend,
    name: &Key,
    session: &Session,
    timeout: Duration,
) -> Result<LockGuard, Failure> {
    let locking = backend.locks().lock(name, session, timeout);
    tokio::pin!(locking);
    let mut interrupts = ctx.interrupts();
    let notice = tokio::time::sleep(WAITING_NOTICE);
    tokio::pin!(notice);
    let mut noticed = false;
    let result = loop {
        tokio::select! {
            result = &mut locking => break result,
            _ = interrupts.next() => {
                return Err(Failure::new(Error::new(
                    ErrorKind::Closed,
                    format!("interrupted while waiting for lock `{name}`; it was not acquired"),
                ))
                .with_code(exit::INTERRUPTED));
            }
            _ = &mut notice, if !noticed => {
                noticed = true;
                note(&format!(
                    "waiting for lock `{name}` (held by another client; giving up after {})",
                    human(timeout)
                ));
            }
        }
    };
    result.map_err(|e| match e.kind() {
        ErrorKind::Timeout => Failure::new(Error::timeout(format!(
            "lock `{name}` was not acquired within {}: another client holds it",
            human(timeout)
        )))
        .with_code(exit::CONDITION)
        .hint("wait longer with --timeout"),
        _ => Failure::new(e),
    })
}

fn acquired_json(guard: &LockGuard) -> serde_json::Value {
    json!({
        "lock": guard.name().as_str(),
        "fencing_token": guard.fencing_token().0,
        "session": guard.session().id().to_string(),
    })
}

fn lost_failure(guard: &LockGuard, cause: &Error, what: &str) -> Failure {
    Failure::new(Error::session_lost(format!(
        "lost lock `{}` (fencing token {}){what}: {}; another client may hold it now",
        guard.name(),
        guard.fencing_token(),
        cause.message()
    )))
}

async fn unlock(guard: LockGuard) {
    let name = guard.name().clone();
    if let Err(e) = guard.unlock().await {
        note(&format!(
            "warning: unlocking `{name}` failed ({e}); it is freed when the session ends"
        ));
    }
}

/// Holds the lock until Ctrl-C (exit 0) or until its session is lost (exit 4).
async fn hold(ctx: &Ctx, guard: LockGuard) -> Result<u8, Failure> {
    // A closed stdout must not cut the hold short; the lock is still held.
    let _ = ctx.out.emit(
        &format!(
            "acquired lock {}, fencing token {}; holding until Ctrl-C",
            guard.name(),
            guard.fencing_token()
        ),
        acquired_json(&guard),
    );
    let lost = tokio::select! {
        cause = guard.lost() => Some(cause),
        _ = ctx.interrupted() => None,
    };
    if let Some(cause) = lost {
        return Err(lost_failure(&guard, &cause, ""));
    }
    let name = guard.name().clone();
    unlock(guard).await;
    let _ = ctx.out.emit(
        &format!("released lock {name}"),
        json!({"lock": name.as_str(), "released": true}),
    );
    Ok(OK)
}

/// Runs `command` while holding the lock; exits with its exit code.
async fn run_command(ctx: &Ctx, guard: LockGuard, command: &[String]) -> Result<u8, Failure> {
    let Some((program, args)) = command.split_first() else {
        return hold(ctx, guard).await;
    };
    let acquired = format!(
        "acquired lock {}, fencing token {}; running {program}",
        guard.name(),
        guard.fencing_token()
    );
    // stdout belongs to the command.
    if ctx.out.is_json() {
        note(&acquired_json(&guard).to_string());
    } else {
        note(&acquired);
    }
    let spawned = tokio::process::Command::new(program)
        .args(args)
        .env("DPRIM_FENCING_TOKEN", guard.fencing_token().to_string())
        .env("DPRIM_LOCK", guard.name().as_str())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            unlock(guard).await;
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return Err(
                Failure::new(Error::invalid(format!("cannot run `{program}`: {e}")))
                    .with_code(code),
            );
        }
    };
    let mut interrupted = false;
    let mut interrupts = ctx.interrupts();
    let outcome = {
        let lost = guard.lost();
        tokio::pin!(lost);
        loop {
            tokio::select! {
                status = child.wait() => break Ok(status),
                cause = &mut lost => break Err(cause),
                _ = interrupts.next() => {
                    if interrupted {
                        note(&format!("killing `{program}`"));
                        let _ = child.start_kill();
                    } else {
                        interrupted = true;
                        note(&format!(
                            "interrupted: waiting for `{program}` to exit, then unlocking \
                             (Ctrl-C again to kill it)"
                        ));
                    }
                }
            }
        }
    };
    match outcome {
        Ok(Ok(status)) => {
            unlock(guard).await;
            Ok(status_code(status))
        }
        Ok(Err(e)) => {
            unlock(guard).await;
            Err(Failure::new(
                Error::new(
                    ErrorKind::Unexpected,
                    format!("waiting for `{program}` failed"),
                )
                .with_source(e),
            ))
        }
        Err(cause) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            Err(lost_failure(
                &guard,
                &cause,
                &format!(" while `{program}` was running, so it was killed"),
            ))
        }
    }
}

/// The exit code to pass on: the command's own, or 128 + the signal that killed it.
fn status_code(status: ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        return u8::try_from(code & 0xff).unwrap_or(1);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return u8::try_from(128 + (signal & 0x7f)).unwrap_or(1);
        }
    }
    1
}
