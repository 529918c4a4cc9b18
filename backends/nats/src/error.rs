//! The one place NATS errors become dprim errors.

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::{DirectGetErrorKind, LastRawMessageErrorKind};
use async_nats::ConnectErrorKind;
use dprim::{Error, ErrorKind};
use std::time::Duration;

/// Maps any async-nats error onto a portable kind. Transport failures,
/// timeouts and "no responders" (a stream or consumer leader being elected)
/// are temporary; refused credentials are `PermissionDenied` and never echo
/// a password; a failed expected-sequence check is `Conflict` (callers that
/// need `AlreadyExists` refine it).
pub(crate) fn map_error<E>(what: &str, e: E) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    let any: &dyn std::any::Any = &e;
    let text = e.to_string();
    let lower = text.to_lowercase();
    let kind = if let Some(p) = any.downcast_ref::<async_nats::jetstream::context::PublishError>() {
        match p.kind() {
            PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId => {
                ErrorKind::Conflict
            }
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => ErrorKind::Unavailable,
            PublishErrorKind::MaxPayloadExceeded => ErrorKind::InvalidArgument,
            PublishErrorKind::StreamNotFound => ErrorKind::Unavailable,
            _ => classify(&lower),
        }
    } else if let Some(d) = any.downcast_ref::<async_nats::jetstream::stream::DirectGetError>() {
        match d.kind() {
            DirectGetErrorKind::NotFound => ErrorKind::NotFound,
            DirectGetErrorKind::TimedOut | DirectGetErrorKind::Request => ErrorKind::Unavailable,
            _ => classify(&lower),
        }
    } else if let Some(l) = any.downcast_ref::<async_nats::jetstream::stream::LastRawMessageError>()
    {
        match l.kind() {
            LastRawMessageErrorKind::NoMessageFound => ErrorKind::NotFound,
            _ => classify(&lower),
        }
    } else if let Some(c) = any.downcast_ref::<async_nats::ConnectError>() {
        match c.kind() {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                ErrorKind::PermissionDenied
            }
            ConnectErrorKind::ServerParse | ConnectErrorKind::Dns => ErrorKind::ConfigInvalid,
            ConnectErrorKind::Tls => ErrorKind::Unavailable,
            _ => ErrorKind::Unavailable,
        }
    } else {
        classify(&lower)
    };
    let message = match kind {
        ErrorKind::PermissionDenied => format!(
            "NATS refused the credentials or the operation for this identity during {what} ({text}); check `username` and the password reference in [backend]"
        ),
        ErrorKind::Unavailable if any.is::<async_nats::ConnectError>() => format!(
            "cannot reach NATS during {what}: {text}; check `endpoints`, `tls` and that the server is running"
        ),
        _ => format!("NATS {what}: {text}"),
    };
    let err = Error::new(kind, message);
    // Nobody took the request (no stream, or its leader being elected), or
    // no connection could be made: it was not applied.
    let unsent = any.is::<async_nats::ConnectError>()
        || lower.contains("no responders")
        || any
            .downcast_ref::<async_nats::jetstream::context::PublishError>()
            .is_some_and(|p| p.kind() == PublishErrorKind::StreamNotFound);
    match kind {
        ErrorKind::Unavailable if unsent => err.temporary().not_applied(),
        ErrorKind::Unavailable | ErrorKind::Timeout => err.temporary(),
        _ => err,
    }
}

fn classify(lower: &str) -> ErrorKind {
    if lower.contains("authorization")
        || lower.contains("permission")
        || lower.contains("authentication")
    {
        ErrorKind::PermissionDenied
    } else if lower.contains("wrong last sequence") || lower.contains("wrong last msg") {
        ErrorKind::Conflict
    } else if lower.contains("timed out") || lower.contains("timeout") {
        ErrorKind::Timeout
    } else if lower.contains("no responders")
        || lower.contains("broken pipe")
        || lower.contains("connection")
        || lower.contains("leader")
        || lower.contains("insufficient resources")
        || lower.contains("io error")
        || lower.contains("temporarily")
        || lower.contains("jetstream not")
    {
        ErrorKind::Unavailable
    } else if lower.contains("not found") {
        ErrorKind::NotFound
    } else if lower.contains("invalid") || lower.contains("maximum payload") {
        ErrorKind::InvalidArgument
    } else {
        ErrorKind::Unexpected
    }
}

/// A request that did not finish within `request_timeout`.
pub(crate) fn timed_out(what: &str, after: Duration) -> Error {
    Error::timeout(format!("NATS {what} did not answer within {after:?}")).temporary()
}
