//! The one error type every dprim primitive returns.
//!
//! Backends map their native errors onto [`ErrorKind`] in exactly one place
//! (their `error.rs`), mark transport failures `temporary`, and never retry on
//! their own: retrying is the caller's (or a retry layer's) decision.

use std::fmt;

/// Shorthand for results carrying a dprim [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, portably. Apps match on this, never on backend errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The key, queue message, task or receipt does not exist.
    NotFound,
    /// A create found the key already present.
    AlreadyExists,
    /// A compare (expected version, expected absence) did not hold; nothing changed.
    Conflict,
    /// The session this operation depends on is lost; what it held is gone or going.
    SessionLost,
    /// The caller is no longer (or never was) the leader.
    NotLeader,
    /// A watch could not prove continuity (history compacted, reconnect, lag):
    /// re-list, then watch again from the listing's revision.
    Resync,
    /// The operation did not finish in the time allowed.
    Timeout,
    /// The backend could not be reached or refused service for now.
    Unavailable,
    /// The request itself is invalid (bad key, oversize value, bad option).
    InvalidArgument,
    /// The configuration is invalid (unknown key, bad value, unknown backend kind).
    ConfigInvalid,
    /// The backend refused the credentials or the operation for this identity.
    PermissionDenied,
    /// The backend does not offer this capability.
    Unsupported,
    /// The handle (backend, session, subscription) was closed.
    Closed,
    /// A write may or may not have taken effect: an attempt failed after
    /// its request may have reached the server, and what the retry found
    /// (e.g. `Conflict` or `AlreadyExists`, which that attempt would cause
    /// itself) cannot tell. Read the key to learn which. From
    /// `PubSub::flush`: messages published before it may or may not have
    /// been delivered (the connection was re-established meanwhile).
    OutcomeUnknown,
    /// Anything else: a bug or a backend behaving outside its documented contract.
    Unexpected,
}

impl ErrorKind {
    /// Stable snake_case name, used in JSON output and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::Conflict => "conflict",
            ErrorKind::SessionLost => "session_lost",
            ErrorKind::NotLeader => "not_leader",
            ErrorKind::Resync => "resync",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::ConfigInvalid => "config_invalid",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Closed => "closed",
            ErrorKind::OutcomeUnknown => "outcome_unknown",
            ErrorKind::Unexpected => "unexpected",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A dprim error: a portable kind, a message for humans, context pairs, an
/// optional source, whether retrying the same request may succeed, and
/// whether the request certainly did not take effect.
pub struct Error {
    kind: ErrorKind,
    message: String,
    context: Vec<(&'static str, String)>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    temporary: bool,
    not_applied: bool,
}

impl Error {
    /// A new error of `kind` with a human message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            context: Vec::new(),
            source: None,
            temporary: false,
            not_applied: false,
        }
    }

    /// Adds a context pair (`key = "a/b"`, `backend = "etcd"`, ...).
    pub fn with_context(mut self, name: &'static str, value: impl fmt::Display) -> Self {
        self.context.push((name, value.to_string()));
        self
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Marks the error temporary: the same request may succeed if retried.
    pub fn temporary(mut self) -> Self {
        self.temporary = true;
        self
    }

    /// Marks a failed request as certainly not applied: it never reached
    /// the server (no connection could be made), or the server refused it
    /// before acting on it. Without this mark a temporary failure of a
    /// write may have come after the server applied it (a connection reset
    /// or a timeout while waiting for the answer), and the retry layer
    /// treats it so.
    pub fn not_applied(mut self) -> Self {
        self.not_applied = true;
        self
    }

    /// Whether the request certainly did not take effect (see
    /// [`Error::not_applied`]).
    pub fn is_not_applied(&self) -> bool {
        self.not_applied
    }

    /// Whether a failed write may still have taken effect: a temporary
    /// failure not marked [`Error::not_applied`] (a definite answer such as
    /// `Conflict` changed nothing).
    pub fn may_have_applied(&self) -> bool {
        self.temporary && !self.not_applied
    }

    /// The portable kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The human message, without context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Context pairs in the order they were added.
    pub fn context(&self) -> &[(&'static str, String)] {
        &self.context
    }

    /// Whether retrying the same request may succeed.
    pub fn is_temporary(&self) -> bool {
        self.temporary
    }

    // Constructors for the common kinds keep call sites short and uniform.

    /// [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// [`ErrorKind::AlreadyExists`].
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::AlreadyExists, message)
    }
    /// [`ErrorKind::Conflict`].
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }
    /// [`ErrorKind::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    /// [`ErrorKind::ConfigInvalid`].
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ConfigInvalid, message)
    }
    /// [`ErrorKind::SessionLost`].
    pub fn session_lost(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::SessionLost, message)
    }
    /// [`ErrorKind::Timeout`].
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }
    /// [`ErrorKind::Closed`].
    pub fn closed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Closed, message)
    }
    /// [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    /// [`ErrorKind::NotLeader`].
    pub fn not_leader(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotLeader, message)
    }
    /// [`ErrorKind::Unexpected`].
    pub fn unexpected(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unexpected, message)
    }
}

impl Clone for Error {
    /// Clones everything but the source, which is rendered into the context
    /// (sources are not `Clone`; session-loss reasons are shared by many waiters).
    fn clone(&self) -> Self {
        let mut context = self.context.clone();
        if let Some(source) = &self.source {
            context.push(("cause", source.to_string()));
        }
        Error {
            kind: self.kind,
            message: self.message.clone(),
            context,
            source: None,
            temporary: self.temporary,
            not_applied: self.not_applied,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if !self.context.is_empty() {
            f.write_str(" (")?;
            for (i, (k, v)) in self.context.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{k}: {v}")?;
            }
            f.write_str(")")?;
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if !self.context.is_empty() {
            d.field("context", &self.context);
        }
        if let Some(source) = &self.source {
            d.field("source", &format_args!("{source}"));
        }
        d.field("temporary", &self.temporary)
            .field("not_applied", &self.not_applied)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_kind_message_and_context() {
        let e = Error::invalid("bad key").with_context("key", "a b");
        assert_eq!(e.to_string(), "invalid_argument: bad key (key: a b)");
        assert!(!e.is_temporary());
        assert!(Error::new(ErrorKind::Unavailable, "x")
            .temporary()
            .is_temporary());
    }

    #[test]
    fn clone_keeps_source_text() {
        let io = std::io::Error::other("connection reset");
        let e = Error::new(ErrorKind::Unavailable, "lost").with_source(io);
        let c = e.clone();
        assert!(c.to_string().contains("connection reset"));
    }
}
