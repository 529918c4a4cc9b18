//! The one TOML config file that picks and configures a backend.
//!
//! ```toml
//! [backend]
//! kind = "etcd"                       # memory | etcd | zookeeper | nats
//! endpoints = ["127.0.0.1:2379"]
//! namespace = "prod/payments"
//! session_ttl = "10s"
//! connect_timeout = "5s"
//! request_timeout = "5s"
//! username = "app"
//! password = { env = "DPRIM_PASSWORD" }   # or { file = "/run/secrets/dprim" }
//! tls = { ca = "ca.pem", cert = "client.pem", key = "client-key.pem" }
//! ```
//!
//! Unknown keys are errors that name the key (and the closest known key).
//! Secrets are never inline: only env or file references, and a resolved
//! secret never appears in `Debug`, logs or errors.

use crate::error::{Error, Result};
use crate::key::Key;
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Backend kinds dprim knows about (whether or not compiled into this build).
pub const KNOWN_KINDS: &[&str] = &["memory", "etcd", "zookeeper", "nats"];

/// The whole config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// The `[backend]` table.
    pub backend: BackendConfig,
}

/// The `[backend]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BackendConfig {
    /// `memory`, `etcd`, `zookeeper` or `nats`.
    pub kind: String,
    /// Server addresses (`host:port`). Default: none (the backend's own default).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Every key of this backend instance lives under this path, so many apps
    /// and test runs share one cluster without seeing each other.
    /// Default: `dprim`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Default TTL for sessions opened by tools (the CLI, agents). Default: 10s.
    #[serde(default = "default_session_ttl", deserialize_with = "duration")]
    pub session_ttl: Duration,
    /// How long to wait for the first connection. Default: 5s.
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// How long one request may take. Default: 5s.
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// User name for backends with authentication. Default: none.
    #[serde(default)]
    pub username: Option<String>,
    /// Password, by reference only: `{ env = "VAR" }` or `{ file = "path" }`.
    #[serde(default)]
    pub password: Option<SecretRef>,
    /// TLS files. Default: plain TCP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// TLS settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TlsConfig {
    /// CA certificate (PEM) to verify the server.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for mutual TLS.
    pub cert: Option<PathBuf>,
    /// Client key (PEM), for mutual TLS.
    pub key: Option<PathBuf>,
}

impl TlsConfig {
    /// The client certificate and key files, for mutual TLS: both or none.
    ///
    /// # Errors
    /// `ConfigInvalid` when only one of `cert` and `key` is set.
    pub fn identity(&self) -> Result<Option<(&Path, &Path)>> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(Some((cert, key))),
            (None, None) => Ok(None),
            _ => Err(Error::config(
                "TLS needs both `cert` and `key` for a client certificate, or neither",
            )),
        }
    }

    /// Reads one of the TLS files.
    ///
    /// # Errors
    /// `ConfigInvalid` naming the file when it cannot be read.
    pub fn read(path: &Path) -> Result<Vec<u8>> {
        std::fs::read(path)
            .map_err(|e| Error::config(format!("cannot read TLS file `{}`: {e}", path.display())))
    }
}

/// Where a secret comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// An environment variable's value.
    Env(String),
    /// A file's contents (trailing newline dropped).
    File(PathBuf),
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(v) => write!(f, "{{ env = {v:?} }}"),
            SecretRef::File(p) => write!(f, "{{ file = {:?} }}", p.display()),
        }
    }
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            env: Option<String>,
            file: Option<PathBuf>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Inline(#[allow(dead_code)] String),
            Table(Table),
        }
        match Raw::deserialize(d)? {
            Raw::Inline(_) => Err(serde::de::Error::custom(
                "secrets may not be written inline; use `{ env = \"VAR\" }` or `{ file = \"path\" }`",
            )),
            Raw::Table(Table {
                env: Some(v),
                file: None,
            }) => Ok(SecretRef::Env(v)),
            Raw::Table(Table {
                env: None,
                file: Some(p),
            }) => Ok(SecretRef::File(p)),
            Raw::Table(_) => Err(serde::de::Error::custom(
                "a secret needs exactly one of `env` or `file`",
            )),
        }
    }
}

impl SecretRef {
    /// Reads the secret.
    ///
    /// # Behavior
    /// A missing variable or unreadable file is `ConfigInvalid` naming the
    /// variable or file, never the secret.
    pub fn resolve(&self) -> Result<Secret> {
        match self {
            SecretRef::Env(var) => std::env::var(var).map(Secret).map_err(|_| {
                Error::config(format!(
                    "environment variable `{var}` named by the password reference is not set"
                ))
            }),
            SecretRef::File(path) => std::fs::read_to_string(path)
                .map(|s| Secret(s.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|e| {
                    Error::config(format!("cannot read secret file `{}`: {e}", path.display()))
                }),
        }
    }
}

/// A resolved secret. `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself: hand it to the client library and nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

fn default_namespace() -> String {
    "dprim".to_string()
}
fn default_session_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{s}` is not a duration ({e}); write e.g. \"500ms\", \"10s\", \"1m\""
        ))
    })
}

const CONFIG_KEYS: &[&str] = &[
    "backend",
    "kind",
    "endpoints",
    "namespace",
    "session_ttl",
    "connect_timeout",
    "request_timeout",
    "username",
    "password",
    "tls",
    "ca",
    "cert",
    "key",
    "env",
    "file",
];

impl Config {
    /// The embedded default: the in-memory backend, namespace `dprim`.
    pub fn memory() -> Config {
        Config {
            backend: BackendConfig::memory(),
        }
    }

    /// Parses a config from TOML text.
    ///
    /// # Behavior
    /// Unknown keys, bad durations, inline secrets and invalid namespaces are
    /// `ConfigInvalid` errors naming the key (with the closest known key when
    /// one is close) and the line.
    pub fn from_toml(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            let mut err = Error::config(msg.clone());
            if let Some(span) = e.span() {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                err = err.with_context("line", line);
            }
            if let Some(unknown) = msg
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
            {
                if let Some(best) = CONFIG_KEYS
                    .iter()
                    .filter(|k| strsim::jaro_winkler(unknown, k) > 0.8)
                    .max_by(|a, b| {
                        strsim::jaro_winkler(unknown, a)
                            .total_cmp(&strsim::jaro_winkler(unknown, b))
                    })
                {
                    err = err.with_context("did you mean", format!("`{best}`"));
                }
            }
            err
        })?;
        config.backend.validate()?;
        Ok(config)
    }

    /// Reads and parses a config file.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!("cannot read config file `{}`: {e}", path.display()))
        })?;
        Config::from_toml(&text).map_err(|e| e.with_context("file", path.display()))
    }
}

impl BackendConfig {
    /// The embedded in-memory backend's config.
    pub fn memory() -> BackendConfig {
        BackendConfig {
            kind: "memory".into(),
            endpoints: Vec::new(),
            namespace: default_namespace(),
            session_ttl: default_session_ttl(),
            connect_timeout: default_timeout(),
            request_timeout: default_timeout(),
            username: None,
            password: None,
            tls: None,
        }
    }

    /// Checks values serde cannot: kind, namespace grammar, positive durations.
    pub fn validate(&self) -> Result<()> {
        if !KNOWN_KINDS.contains(&self.kind.as_str()) {
            return Err(Error::config(format!(
                "unknown backend kind `{}`; expected one of: {}",
                self.kind,
                KNOWN_KINDS.join(", ")
            )));
        }
        self.namespace_key()?;
        for (name, d) in [
            ("session_ttl", self.session_ttl),
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::config(format!("`{name}` must be greater than zero")));
            }
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(Error::config("`password` is set but `username` is not"));
        }
        Ok(())
    }

    /// The namespace as a key.
    pub fn namespace_key(&self) -> Result<Key> {
        Key::new(&self.namespace)
            .map_err(|e| Error::config(format!("invalid `namespace`: {}", e.message())))
    }

    /// A copy with another namespace (the conformance harness isolates cases this way).
    pub fn with_namespace(&self, namespace: impl Into<String>) -> BackendConfig {
        BackendConfig {
            namespace: namespace.into(),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn minimal_and_defaults() {
        let c = Config::from_toml("[backend]\nkind = \"memory\"\n").unwrap();
        assert_eq!(c.backend.namespace, "dprim");
        assert_eq!(c.backend.session_ttl, Duration::from_secs(10));
    }

    #[test]
    fn unknown_key_is_named_with_suggestion() {
        let e = Config::from_toml("[backend]\nkind = \"etcd\"\nendpoint = [\"x\"]\n").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        let s = e.to_string();
        assert!(s.contains("unknown field `endpoint`"), "{s}");
        assert!(s.contains("did you mean: `endpoints`"), "{s}");
        assert!(s.contains("line: 3"), "{s}");
    }

    #[test]
    fn unknown_kind_lists_kinds() {
        let e = Config::from_toml("[backend]\nkind = \"redis\"\n").unwrap_err();
        assert!(
            e.to_string().contains("memory, etcd, zookeeper, nats"),
            "{e}"
        );
    }

    #[test]
    fn inline_password_rejected_and_refs_hidden() {
        let e = Config::from_toml(
            "[backend]\nkind = \"etcd\"\nusername = \"u\"\npassword = \"hunter2\"\n",
        )
        .unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("inline"), "{e}");
        let c = Config::from_toml(
            "[backend]\nkind = \"etcd\"\nusername = \"u\"\npassword = { env = \"DPRIM_TEST_PW_X\" }\n",
        )
        .unwrap();
        std::env::set_var("DPRIM_TEST_PW_X", "hunter2");
        let secret = c.backend.password.as_ref().unwrap().resolve().unwrap();
        assert_eq!(secret.expose(), "hunter2");
        assert!(!format!("{secret:?} {secret} {c:?}").contains("hunter2"));
    }

    #[test]
    fn bad_duration_and_namespace() {
        let e =
            Config::from_toml("[backend]\nkind = \"memory\"\nsession_ttl = \"ten\"\n").unwrap_err();
        assert!(e.to_string().contains("not a duration"), "{e}");
        let e =
            Config::from_toml("[backend]\nkind = \"memory\"\nnamespace = \"a b\"\n").unwrap_err();
        assert!(e.to_string().contains("namespace"), "{e}");
    }
}
