//! The exit-code scheme of `dprim`, and [`Failure`]: an error with the exit
//! code and hints it is shown with.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | not found, already exists, version conflict, not leader, lock not acquired in time, queue empty; `conformance`: a case failed |
//! | 2 | usage or config error: bad arguments, invalid key or value, invalid config file |
//! | 3 | backend error: unavailable, timeout, a write's outcome unknown, permission denied, unsupported, watch resync, unexpected |
//! | 4 | the session was lost while holding a lock or leadership |
//! | 130 | interrupted (Ctrl-C) before a lock or leadership was acquired |
//!
//! `dprim lock NAME -- CMD` exits with CMD's own exit code (128 + N when it
//! is killed by signal N; 126 if it cannot be executed, 127 if it is not found).

use dprim::{Error, ErrorKind};
use std::fmt;

/// Success.
pub const OK: u8 = 0;
/// Not found, already exists, conflict, not leader, not acquired in time, empty.
pub const CONDITION: u8 = 1;
/// Bad arguments, invalid key or value, invalid config.
pub const USAGE: u8 = 2;
/// The backend failed (unavailable, timeout, permission denied, ...).
pub const BACKEND: u8 = 3;
/// A session was lost while holding a lock or leadership.
pub const SESSION_LOST: u8 = 4;
/// Interrupted by Ctrl-C before acquiring.
pub const INTERRUPTED: u8 = 130;

/// The exit-code table, for `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    success
  1    not found, already exists, version conflict, not leader, lock not
       acquired within --timeout, queue empty; conformance: a case failed
  2    usage or config error (bad arguments, invalid key or value, invalid config)
  3    backend error (unavailable, timeout, outcome unknown, permission denied,
       unsupported, ...)
  4    session lost while holding a lock or leadership
  130  interrupted (Ctrl-C) before a lock or leadership was acquired
  `dprim lock NAME -- CMD` exits with CMD's exit code.";

/// The exit code for an error of `kind`.
pub fn code_for(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::NotFound
        | ErrorKind::AlreadyExists
        | ErrorKind::Conflict
        | ErrorKind::NotLeader => CONDITION,
        ErrorKind::InvalidArgument | ErrorKind::ConfigInvalid => USAGE,
        ErrorKind::SessionLost => SESSION_LOST,
        _ => BACKEND,
    }
}

/// An error as shown to the user: the dprim error, the exit code, and hints.
#[derive(Debug)]
pub struct Failure {
    error: Error,
    code: u8,
    hints: Vec<String>,
    silent: bool,
}

impl Failure {
    /// Wraps an error with the exit code its kind maps to.
    pub fn new(error: Error) -> Failure {
        let code = code_for(error.kind());
        Failure {
            error,
            code,
            hints: Vec::new(),
            silent: false,
        }
    }

    /// Adds a hint line.
    pub fn hint(mut self, hint: impl Into<String>) -> Failure {
        self.hints.push(hint.into());
        self
    }

    /// Overrides the exit code.
    pub fn with_code(mut self, code: u8) -> Failure {
        self.code = code;
        self
    }

    /// Marks the failure as already reported (or not worth reporting): only
    /// the exit code is used.
    pub fn silent(mut self) -> Failure {
        self.silent = true;
        self
    }

    /// Whether nothing should be printed for this failure.
    pub fn is_silent(&self) -> bool {
        self.silent
    }

    /// The underlying error.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The exit code.
    pub fn code(&self) -> u8 {
        self.code
    }

    /// Hints: the explicit ones, then those derived from the error's context
    /// (`did you mean`) and kind.
    pub fn hints(&self) -> Vec<String> {
        let mut hints = self.hints.clone();
        for (name, value) in self.error.context() {
            if *name == "did you mean" {
                hints.push(format!("did you mean {value}?"));
            }
            if *name == "task" && self.error.kind() == ErrorKind::OutcomeUnknown {
                hints.push(format!(
                    "`dprim task status {value}` tells whether the task was launched"
                ));
            }
        }
        let generic = match self.error.kind() {
            ErrorKind::InvalidArgument if self.has_context("grammar") => Some(
                "keys are `/`-separated segments of A-Z a-z 0-9 - _ . (at most 16 segments, 512 bytes)",
            ),
            ErrorKind::Unavailable => Some(
                "check `endpoints` in the config and that the servers are reachable; `dprim check` tests the connection",
            ),
            ErrorKind::PermissionDenied => {
                Some("check `username`, `password` and `tls` in the config")
            }
            ErrorKind::OutcomeUnknown => Some(
                "the operation may or may not have taken effect; check before repeating it (for a key: `dprim kv get KEY`)",
            ),
            _ => None,
        };
        if let Some(h) = generic {
            if self.hints.is_empty() {
                hints.push(h.to_string());
            }
        }
        hints
    }

    fn has_context(&self, name: &str) -> bool {
        self.error.context().iter().any(|(n, _)| *n == name)
    }

    /// The message with its context pairs (except those turned into hints).
    pub fn message(&self) -> String {
        let mut s = self.error.message().to_string();
        let context: Vec<String> = self
            .error
            .context()
            .iter()
            .filter(|(n, _)| !matches!(*n, "did you mean" | "grammar"))
            .map(|(n, v)| format!("{n}: {v}"))
            .collect();
        if !context.is_empty() {
            s.push_str(" (");
            s.push_str(&context.join(", "));
            s.push(')');
        }
        if let Some(source) = std::error::Error::source(&self.error) {
            s.push_str(&format!(": {source}"));
        }
        s
    }

    /// The failure as JSON: `{"error": {"kind", "message", "context", "hints"}, "exit_code"}`.
    pub fn to_json(&self) -> serde_json::Value {
        let context: serde_json::Map<String, serde_json::Value> = self
            .error
            .context()
            .iter()
            .map(|(n, v)| (n.to_string(), serde_json::Value::String(v.clone())))
            .collect();
        serde_json::json!({
            "error": {
                "kind": self.error.kind().as_str(),
                "message": self.error.message(),
                "context": context,
                "hints": self.hints(),
                "temporary": self.error.is_temporary(),
            },
            "exit_code": self.code,
        })
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Failure {
        Failure::new(error)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error: {}", self.message())?;
        for hint in self.hints() {
            write!(f, "\nhint: {hint}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_by_kind() {
        assert_eq!(code_for(ErrorKind::NotFound), CONDITION);
        assert_eq!(code_for(ErrorKind::InvalidArgument), USAGE);
        assert_eq!(code_for(ErrorKind::ConfigInvalid), USAGE);
        assert_eq!(code_for(ErrorKind::Unavailable), BACKEND);
        assert_eq!(code_for(ErrorKind::SessionLost), SESSION_LOST);
    }

    #[test]
    fn did_you_mean_becomes_a_hint() {
        let e = Error::config("unknown field `endpoint`")
            .with_context("line", 3)
            .with_context("did you mean", "`endpoints`")
            .with_context("file", "x.toml");
        let f = Failure::new(e);
        let text = f.to_string();
        assert!(text.starts_with("error: unknown field `endpoint` (line: 3, file: x.toml)"));
        assert!(text.contains("hint: did you mean `endpoints`?"), "{text}");
        assert_eq!(f.code(), USAGE);
    }

    #[test]
    fn an_unknown_outcome_says_to_read_the_key() {
        let f = Failure::new(Error::new(
            ErrorKind::OutcomeUnknown,
            "put `a`: the outcome is unknown",
        ));
        assert_eq!(f.code(), BACKEND);
        let text = f.to_string();
        assert!(
            text.contains("hint: the operation may or may not have taken effect; check before repeating it (for a key: `dprim kv get KEY`)"),
            "{text}"
        );
    }

    #[test]
    fn a_launch_of_unknown_outcome_names_the_task_to_look_up() {
        let f = Failure::new(
            Error::new(
                ErrorKind::OutcomeUnknown,
                "transaction: the outcome is unknown",
            )
            .with_context("task", "t1a2b"),
        );
        let text = f.to_string();
        assert!(
            text.contains("hint: `dprim task status t1a2b` tells whether the task was launched"),
            "{text}"
        );
    }
}
