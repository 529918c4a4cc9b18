//! Keys (names of everything: kv keys, lock and election names, topics,
//! queues) and values (every payload).
//!
//! # The portable key grammar
//! A key is a path of `/`-separated segments, relative to the backend's
//! namespace. Each segment is one or more of `A-Z a-z 0-9 - _ .`, and is
//! not `.` or `..`. At most [`MAX_KEY_SEGMENTS`] segments and
//! [`MAX_KEY_BYTES`] bytes. One leading `/` is accepted and dropped, so `/a/b`
//! and `a/b` are the same key.
//!
//! Why this set: it maps losslessly onto an etcd key (anything goes), a
//! ZooKeeper path (no `.`/`..` segments, no NUL), and a NATS KV key / subject
//! (`/` becomes the token separator `.`; a `.` inside a segment is carried by
//! a reversible escape that uses `=`, which is therefore not portable). `*`,
//! `>`, spaces and control characters are special to NATS and rejected
//! everywhere. Invalid keys are rejected by [`Key::new`], before any I/O,
//! naming the offending character.

use crate::error::{Error, Result};
use bytes::Bytes;
use std::fmt;
use std::sync::Arc;

/// Most segments a key may have.
pub const MAX_KEY_SEGMENTS: usize = 16;
/// Most bytes a key may have (without the namespace).
pub const MAX_KEY_BYTES: usize = 512;
/// Most bytes a value or message payload may have: 256 KiB.
pub const MAX_VALUE_BYTES: usize = 256 * 1024;

/// A validated key. The empty key ([`Key::root`]) names the namespace root and
/// is only valid where a directory is expected (list, watch). Shared, so a
/// clone (one per delivered message or watch event) does not copy it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Key(Arc<str>);

fn is_portable(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
}

impl Key {
    /// Parses and validates a key.
    ///
    /// # Behavior
    /// - Returns `InvalidArgument` naming the offending character and its
    ///   position for any character outside `A-Z a-z 0-9 - _ .` and `/`.
    /// - Returns `InvalidArgument` for empty segments (`a//b`, trailing `/`),
    ///   `.`/`..` segments, more than 16 segments or more than 512 bytes.
    /// - The empty string is rejected; use [`Key::root`] for the root directory.
    pub fn new(key: impl AsRef<str>) -> Result<Key> {
        let raw = key.as_ref();
        let path = raw.strip_prefix('/').unwrap_or(raw);
        let err = |why: String| {
            Error::invalid(format!("invalid key `{}`: {why}", raw.escape_debug()))
                .with_context("grammar", "segments of A-Z a-z 0-9 - _ . separated by /")
        };
        if path.is_empty() {
            return Err(err("a key needs at least one segment".into()));
        }
        if path.len() > MAX_KEY_BYTES {
            return Err(err(format!(
                "{} bytes is longer than the limit of {MAX_KEY_BYTES}",
                path.len()
            )));
        }
        for (i, c) in path.char_indices() {
            if c != '/' && !is_portable(c) {
                let shown = if c == ' ' {
                    "space".to_string()
                } else {
                    format!("`{}`", c.escape_debug())
                };
                return Err(err(format!(
                    "character {shown} at byte {i} is not portable across backends"
                )));
            }
        }
        let mut segments = 0;
        for segment in path.split('/') {
            segments += 1;
            if segment.is_empty() {
                return Err(err("empty segment (`//` or a trailing `/`)".into()));
            }
            if segment == "." || segment == ".." {
                return Err(err(format!("segment `{segment}` is reserved")));
            }
        }
        if segments > MAX_KEY_SEGMENTS {
            return Err(err(format!(
                "{segments} segments is more than the limit of {MAX_KEY_SEGMENTS}"
            )));
        }
        Ok(Key(path.into()))
    }

    /// The namespace root: the directory holding every key.
    pub fn root() -> Key {
        Key("".into())
    }

    /// Whether this is the root directory.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The key as a path without a leading `/` (`""` for the root).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key's segments.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|s| !s.is_empty())
    }

    /// Number of segments (0 for the root).
    pub fn depth(&self) -> usize {
        self.segments().count()
    }

    /// The key one segment down: `a/b`.join("c") = `a/b/c`.
    ///
    /// # Behavior
    /// Validates `segment` as a single segment and the result against the
    /// length limits.
    pub fn join(&self, segment: impl AsRef<str>) -> Result<Key> {
        let segment = segment.as_ref();
        if segment.contains('/') {
            return Err(Error::invalid(format!(
                "segment `{}` must not contain `/`",
                segment.escape_debug()
            )));
        }
        if self.is_root() {
            Key::new(segment)
        } else {
            Key::new(format!("{}/{}", self.0, segment))
        }
    }

    /// The parent directory (`a/b` -> `a`, `a` -> root); `None` for the root.
    pub fn parent(&self) -> Option<Key> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.rfind('/') {
            Some(i) => Key(self.0[..i].into()),
            None => Key::root(),
        })
    }

    /// The last segment (`""` for the root).
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or("")
    }

    /// Whether `self` lies strictly inside directory `dir`, matching whole
    /// segments: `a/b/c` is under `a/b`, `a/bc` is not.
    pub fn is_under(&self, dir: &Key) -> bool {
        if dir.is_root() {
            return !self.is_root();
        }
        self.0.len() > dir.0.len()
            && self.0.starts_with(&*dir.0)
            && self.0.as_bytes()[dir.0.len()] == b'/'
    }

    /// Whether `self` is a direct child of `dir`.
    pub fn is_child_of(&self, dir: &Key) -> bool {
        self.is_under(dir) && self.depth() == dir.depth() + 1
    }

    /// Key relative to `dir` (`a/b/c` relative to `a` is `b/c`); `None` if not under it.
    pub fn strip_dir(&self, dir: &Key) -> Option<&str> {
        if dir.is_root() {
            return (!self.is_root()).then_some(&*self.0);
        }
        self.is_under(dir).then(|| &self.0[dir.0.len() + 1..])
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            f.write_str("/")
        } else {
            f.write_str(&self.0)
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

impl std::str::FromStr for Key {
    type Err = Error;
    fn from_str(s: &str) -> Result<Key> {
        Key::new(s)
    }
}

impl TryFrom<&str> for Key {
    type Error = Error;
    fn try_from(s: &str) -> Result<Key> {
        Key::new(s)
    }
}

/// Bytes stored under a key or carried by a message: at most
/// [`MAX_VALUE_BYTES`] (256 KiB), checked when the value is made, so an
/// oversize value never reaches a backend. The bytes are a shared,
/// reference-counted buffer: cloning a value, or handing a received payload
/// to the app, copies nothing.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Value(Bytes);

impl Value {
    /// Wraps bytes, checking the size limit.
    ///
    /// # Behavior
    /// Returns `InvalidArgument` naming the size and the limit when `bytes` is
    /// larger than 256 KiB. Any byte sequence up to the limit (including empty
    /// and non-UTF-8) is a valid value and round-trips unchanged.
    pub fn new(bytes: impl Into<Bytes>) -> Result<Value> {
        let bytes = bytes.into();
        if bytes.len() > MAX_VALUE_BYTES {
            return Err(Error::invalid(format!(
                "value of {} bytes is larger than the limit of {MAX_VALUE_BYTES} bytes (256 KiB); \
                 store large blobs elsewhere and keep a reference in dprim",
                bytes.len()
            )));
        }
        Ok(Value(bytes))
    }

    /// The empty value.
    pub fn empty() -> Value {
        Value(Bytes::new())
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Takes the bytes out (copied only if the buffer is shared).
    pub fn into_bytes(self) -> Vec<u8> {
        self.0.into()
    }

    /// The bytes as the shared buffer they are kept in, without a copy.
    pub fn into_shared(self) -> Bytes {
        self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bytes as UTF-8, if they are.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_str() {
            Some(s) if s.len() <= 64 => write!(f, "Value({s:?})"),
            _ => write!(f, "Value({} bytes)", self.0.len()),
        }
    }
}

impl TryFrom<Vec<u8>> for Value {
    type Error = Error;
    fn try_from(v: Vec<u8>) -> Result<Value> {
        Value::new(v)
    }
}

impl TryFrom<&str> for Value {
    type Error = Error;
    fn try_from(v: &str) -> Result<Value> {
        Value::new(Bytes::copy_from_slice(v.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn accepts_portable_keys_and_normalizes_leading_slash() {
        assert_eq!(Key::new("a/b-c/d_e.f").unwrap().as_str(), "a/b-c/d_e.f");
        assert_eq!(Key::new("/a/b").unwrap(), Key::new("a/b").unwrap());
    }

    #[test]
    fn rejects_non_portable_characters_by_name() {
        for (k, needle) in [
            ("a b", "space"),
            ("a*b", "`*`"),
            ("a>b", "`>`"),
            ("a=b", "`=`"),
            ("a\0b", "`\\0`"),
            ("é", "`é`"),
        ] {
            let e = Key::new(k).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert!(e.to_string().contains(needle), "{k}: {e}");
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        for k in [
            "",
            "/",
            "a//b",
            "a/",
            "a/./b",
            "..",
            &"x/".repeat(16).to_string(),
        ] {
            assert!(Key::new(k).is_err(), "{k:?}");
        }
        let seventeen = vec!["s"; 17].join("/");
        assert!(Key::new(seventeen)
            .unwrap_err()
            .to_string()
            .contains("17 segments"));
        let sixteen = vec!["s"; 16].join("/");
        assert!(Key::new(sixteen).is_ok());
        assert!(Key::new("k".repeat(512)).is_ok());
        assert!(Key::new("k".repeat(513)).is_err());
    }

    #[test]
    fn prefix_matching_is_per_segment() {
        let ab = Key::new("a/b").unwrap();
        assert!(Key::new("a/b/c").unwrap().is_under(&ab));
        assert!(!Key::new("a/bc").unwrap().is_under(&ab));
        assert!(!ab.is_under(&ab));
        assert!(Key::new("a/b/c").unwrap().is_child_of(&ab));
        assert!(!Key::new("a/b/c/d").unwrap().is_child_of(&ab));
        assert!(ab.is_child_of(&Key::new("a").unwrap()));
        assert!(Key::new("a").unwrap().is_child_of(&Key::root()));
        assert_eq!(Key::new("a/b/c").unwrap().strip_dir(&ab), Some("c"));
        assert_eq!(ab.parent().unwrap().parent(), Some(Key::root()));
        assert_eq!(ab.join("c").unwrap().as_str(), "a/b/c");
        assert!(ab.join("c/d").is_err());
    }

    #[test]
    fn value_limit() {
        assert!(Value::new(vec![0u8; MAX_VALUE_BYTES]).is_ok());
        let e = Value::new(vec![0u8; MAX_VALUE_BYTES + 1]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("262145 bytes"));
    }
}
