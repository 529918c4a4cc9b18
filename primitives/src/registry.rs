//! The explicit map from config `kind` to backend constructor. No global
//! registration magic: the binary (or app) that links backends lists them.

use crate::backend::Backend;
use crate::config::{BackendConfig, KNOWN_KINDS};
use crate::error::{Error, Result};
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Builds a backend from its config.
pub type Constructor =
    Arc<dyn Fn(BackendConfig) -> BoxFuture<'static, Result<Backend>> + Send + Sync>;

/// Backend constructors by kind.
#[derive(Clone, Default)]
pub struct Registry {
    constructors: BTreeMap<String, Constructor>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds (or replaces) the constructor for `kind`.
    pub fn register(mut self, kind: &str, constructor: Constructor) -> Registry {
        self.constructors.insert(kind.to_string(), constructor);
        self
    }

    /// The kinds this registry can open.
    pub fn kinds(&self) -> Vec<&str> {
        self.constructors.keys().map(String::as_str).collect()
    }

    /// Opens a backend.
    ///
    /// # Behavior
    /// A kind whose crate is not compiled in (or that dprim does not know)
    /// is `ConfigInvalid`, listing the kinds available in this build.
    pub async fn open(&self, config: &BackendConfig) -> Result<Backend> {
        config.validate()?;
        match self.constructors.get(&config.kind) {
            Some(ctor) => ctor(config.clone()).await,
            None => {
                let known = KNOWN_KINDS.contains(&config.kind.as_str());
                Err(Error::config(format!(
                    "backend kind `{}` is {}; available in this build: {}",
                    config.kind,
                    if known {
                        "not compiled into this build"
                    } else {
                        "unknown"
                    },
                    self.kinds().join(", ")
                )))
            }
        }
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.kinds())
            .finish()
    }
}
