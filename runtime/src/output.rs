//! Printing: text for people, JSON (one object per line) for scripts.
//!
//! Nothing here panics on a closed pipe: writes return errors, and a closed
//! stdout ends the command quietly.

use crate::exit::Failure;
use dprim::{Error, ErrorKind, Value};
use serde_json::json;
use std::io::{self, Write};

/// Output format chosen with `--output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Text,
    Json,
}

/// Where a command prints.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Out {
    pub(crate) format: Format,
}

/// Why printing stopped.
#[derive(Debug)]
pub(crate) enum PrintError {
    /// The reader of stdout went away (`dprim ... | head`): stop quietly.
    Closed,
    /// Another I/O error.
    Io(io::Error),
}

impl From<PrintError> for Failure {
    fn from(e: PrintError) -> Failure {
        match e {
            PrintError::Closed => Failure::new(Error::closed("stdout was closed"))
                .with_code(0)
                .silent(),
            PrintError::Io(e) => Failure::new(
                Error::new(ErrorKind::Unexpected, "cannot write to stdout").with_source(e),
            ),
        }
    }
}

fn print_error(e: io::Error) -> PrintError {
    if e.kind() == io::ErrorKind::BrokenPipe {
        PrintError::Closed
    } else {
        PrintError::Io(e)
    }
}

fn write_line(line: &str) -> Result<(), PrintError> {
    let mut stdout = io::stdout().lock();
    let result = writeln!(stdout, "{line}").and_then(|_| stdout.flush());
    result.map_err(print_error)
}

/// Writes bytes to stdout exactly as they are (no newline added).
pub(crate) fn write_raw(bytes: &[u8]) -> Result<(), PrintError> {
    let mut stdout = io::stdout().lock();
    let result = stdout.write_all(bytes).and_then(|_| stdout.flush());
    result.map_err(print_error)
}

impl Out {
    pub(crate) fn is_json(&self) -> bool {
        self.format == Format::Json
    }

    /// Prints `text` in text mode, `json` (one line) in JSON mode.
    pub(crate) fn emit(&self, text: &str, json: serde_json::Value) -> Result<(), PrintError> {
        match self.format {
            Format::Text => write_line(text),
            Format::Json => write_line(&json.to_string()),
        }
    }

    /// Prints a line of text in text mode only.
    pub(crate) fn text(&self, text: &str) -> Result<(), PrintError> {
        match self.format {
            Format::Text => write_line(text),
            Format::Json => Ok(()),
        }
    }
}

/// Writes a line to stderr; a failure to do so is ignored (there is nowhere
/// left to report it).
pub(crate) fn note(line: &str) {
    let _ = writeln!(io::stderr().lock(), "{line}");
}

/// A value for text output: the UTF-8 text, or `hex:...` when it is not UTF-8,
/// with a flag saying which.
pub(crate) fn value_text(value: &Value) -> (String, bool) {
    match value.as_str() {
        Some(s) => (s.to_string(), true),
        None => (format!("hex:{}", hex(value.as_bytes())), false),
    }
}

/// A short one-line preview of a value for listings.
pub(crate) fn value_preview(value: &Value) -> String {
    const MAX: usize = 60;
    match value.as_str() {
        Some(s) if !s.contains(['\n', '\r', '\t']) => {
            if s.chars().count() > MAX {
                let cut: String = s.chars().take(MAX).collect();
                format!("{cut}... ({} bytes)", value.len())
            } else {
                s.to_string()
            }
        }
        Some(s) => {
            let escaped: String = s.escape_debug().take(MAX).collect();
            format!("\"{escaped}\" ({} bytes)", value.len())
        }
        None => format!("<{} bytes, not UTF-8>", value.len()),
    }
}

/// JSON fields for a value: `value` (UTF-8 text or hex) and `encoding`
/// (`utf8` or `hex`).
pub(crate) fn value_json(value: &Value) -> (serde_json::Value, serde_json::Value) {
    match value.as_str() {
        Some(s) => (json!(s), json!("utf8")),
        None => (json!(hex(value.as_bytes())), json!("hex")),
    }
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The note printed once when a value is shown as hex.
pub(crate) fn hex_note(len: usize) -> String {
    format!(
        "note: the value ({len} bytes) is not UTF-8 and is shown as hex; use --output json for \
         `value`/`encoding` fields, or `dprim kv get --raw` for the bytes"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_render() {
        let v = Value::new(vec![0u8, 255]).unwrap();
        assert_eq!(value_text(&v), ("hex:00ff".to_string(), false));
        assert_eq!(value_json(&v).1, json!("hex"));
        let t = Value::new(b"hi".to_vec()).unwrap();
        assert_eq!(value_text(&t), ("hi".to_string(), true));
        assert_eq!(value_preview(&t), "hi");
        let long = Value::new("x".repeat(100).into_bytes()).unwrap();
        assert!(value_preview(&long).ends_with("(100 bytes)"));
    }
}
