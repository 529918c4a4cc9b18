//! dprim-runtime: turns a config file into an open [`Backend`], and the
//! `dprim` command line that drives every primitive from a shell.
//!
//! # Layout
//! - [`registry`]: the explicit list of backends compiled into this build
//!   (`memory` always; the others will be added behind cargo features).
//! - [`load_config`] / [`open`]: config file (or the embedded in-memory
//!   default) -> validated [`Config`] -> open [`Backend`].
//! - [`cli`]: the command line definition (clap) and [`cli::run`], which
//!   executes one parsed command and returns the process exit code.
//! - [`exit`]: the exit-code scheme shared by every command, and
//!   [`exit::Failure`], an error ready to be shown to a user.
//! - `commands` (private): one module per command group (`kv`, `lock`,
//!   `elect`, `pub`/`sub`, `queue`, `check`, `conformance`).
//! - `output` (private): text and JSON printing, value rendering.
//! - [`tasks`]: task launch on top of the primitives (so far: the pure task
//!   state machine).
//!
//! Without a config file the embedded in-memory backend is used. It lives
//! inside the process that opened it, so with the CLI its state lasts only
//! as long as one `dprim` invocation.
#![deny(missing_docs)]

pub mod cli;
mod commands;
pub mod exit;
mod output;
pub mod tasks;

use dprim::{Backend, Config, Error, Registry, Result};
use std::path::Path;

/// The backends compiled into this build, by config `kind`.
///
/// This is the one place a backend is linked in: adding a backend means one
/// `register` line here (behind its cargo feature).
pub fn registry() -> Registry {
    let registry = Registry::new().register("memory", dprim_memory::constructor());
    #[cfg(feature = "etcd")]
    let registry = registry.register("etcd", dprim_etcd::constructor());
    #[cfg(feature = "zookeeper")]
    let registry = registry.register("zookeeper", dprim_zookeeper::constructor());
    #[cfg(feature = "nats")]
    let registry = registry.register("nats", dprim_nats::constructor());
    registry
}

/// Reads and validates the config file, or returns the embedded in-memory
/// default ([`Config::memory`]) when `config` is `None`.
///
/// # Behavior
/// A missing file, invalid TOML, unknown keys and bad values are
/// `ConfigInvalid`, naming the key and the file. A `kind` dprim knows but this
/// build does not include is reported when opening ([`open`]).
pub fn load_config(config: Option<&Path>) -> Result<Config> {
    match config {
        Some(path) => Config::from_file(path),
        None => Ok(Config::memory()),
    }
}

/// Loads the config (see [`load_config`]) and opens its backend with
/// [`registry`], giving up after the config's `connect_timeout`.
///
/// # Behavior
/// - `None` opens the embedded in-memory backend: its state lives only as
///   long as this process.
/// - A kind not compiled into this build is `ConfigInvalid`, listing the
///   kinds that are.
/// - Not connecting within `connect_timeout` is `Timeout`, naming the
///   endpoints.
pub async fn open(config: Option<&Path>) -> Result<(Backend, Config)> {
    let config = load_config(config)?;
    let backend = open_config(&config).await?;
    Ok((backend, config))
}

/// Opens the backend a loaded config describes (see [`open`]).
pub async fn open_config(config: &Config) -> Result<Backend> {
    let backend_config = &config.backend;
    let registry = registry();
    let timeout = backend_config.connect_timeout;
    match tokio::time::timeout(timeout, registry.open(backend_config)).await {
        Ok(result) => result,
        Err(_) => Err(Error::timeout(format!(
            "could not open the `{}` backend within connect_timeout ({}); check `endpoints`, that the servers run and are reachable, and that `tls` matches how they listen",
            backend_config.kind,
            humantime::format_duration(timeout)
        ))
        .with_context("endpoints", endpoints_text(&backend_config.endpoints))),
    }
}

/// Endpoints as one line, `(none)` when the list is empty.
pub(crate) fn endpoints_text(endpoints: &[String]) -> String {
    if endpoints.is_empty() {
        "(none)".to_string()
    } else {
        endpoints.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_has_memory() {
        assert!(registry().kinds().contains(&"memory"));
    }

    #[test]
    fn no_config_is_memory() {
        let c = load_config(None).unwrap();
        assert_eq!(c.backend.kind, "memory");
    }

    #[tokio::test]
    async fn opens_memory_without_config() {
        let (backend, config) = open(None).await.unwrap();
        assert_eq!(backend.kind(), "memory");
        assert_eq!(config.backend.namespace, "dprim");
    }
}
