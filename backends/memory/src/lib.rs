//! dprim-memory: the in-process reference backend and embedded default.
//!
//! It implements the whole dprim contract with real timers: sessions expire,
//! watches replay history and resync, subscribers lag, queue deliveries time
//! out. It is what the conformance suite's expectations are first checked
//! against, and what the `dprim` CLI uses when no config is given.
//!
//! # Layout
//! - [`MemoryServer`]: the in-process "server". Each [`MemoryServer::connect`]
//!   is a new client of it; clients of the same namespace see the same data.
//!   [`constructor`] connects to one process-wide server, so state lives as
//!   long as the process.
//! - `state`: one namespace's state behind one mutex, and every operation on
//!   it as plain synchronous code (never held across an await).
//! - `kv`, `session`, `lock`, `election`, `pubsub`, `queue`: the trait
//!   implementations, thin async shells over `state`.
#![deny(missing_docs)]

mod election;
mod kv;
mod lock;
mod pubsub;
mod queue;
mod session;
mod state;

use dprim::capabilities::{
    Capabilities, KvCapabilities, LockCapabilities, PubSubCapabilities, QueueCapabilities,
    SessionCapabilities,
};
use dprim::registry::Constructor;
use dprim::{Backend, BackendConfig, BackendParts, Error, Result, SessionId};
use state::Namespace;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Changes kept per namespace for watches that resume from a version.
pub const WATCH_HISTORY: usize = 10_000;
/// Messages a subscriber may fall behind before it gets `Lagged`.
pub const SUBSCRIBER_BUFFER: usize = 1024;
/// Shortest session TTL accepted.
pub const MIN_SESSION_TTL: Duration = Duration::from_millis(100);

/// The capabilities this backend declares.
pub fn capabilities() -> Capabilities {
    Capabilities::new(
        KvCapabilities::new(true, true, WATCH_HISTORY),
        SessionCapabilities::new(MIN_SESSION_TTL),
        LockCapabilities::new(true),
        PubSubCapabilities::new(SUBSCRIBER_BUFFER),
        QueueCapabilities::new(true, true),
    )
}

/// An in-process server holding any number of namespaces.
#[derive(Clone, Default)]
pub struct MemoryServer {
    namespaces: Arc<Mutex<HashMap<String, Namespace>>>,
}

impl MemoryServer {
    /// A new, empty server.
    pub fn new() -> MemoryServer {
        MemoryServer::default()
    }

    /// The process-wide server the registry constructor uses.
    pub fn global() -> &'static MemoryServer {
        static GLOBAL: OnceLock<MemoryServer> = OnceLock::new();
        GLOBAL.get_or_init(MemoryServer::new)
    }

    /// Connects a new client rooted at the config's namespace.
    ///
    /// Must be called inside a tokio runtime (sessions run timers).
    pub fn connect(&self, config: &BackendConfig) -> Result<Backend> {
        if config.kind != "memory" {
            return Err(Error::config(format!(
                "the memory backend cannot open a `{}` config",
                config.kind
            )));
        }
        if !config.endpoints.is_empty() {
            return Err(Error::config(
                "the memory backend runs in-process and takes no `endpoints`; remove them or pick another `kind`",
            ));
        }
        let namespace_key = config.namespace_key()?;
        let ns = {
            let mut map = self
                .namespaces
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            map.entry(namespace_key.as_str().to_string())
                .or_insert_with(Namespace::new)
                .clone()
        };
        Ok(Backend::new(BackendParts {
            kind: "memory".into(),
            namespace: namespace_key.as_str().to_string(),
            capabilities: capabilities(),
            kv: Arc::new(kv::MemoryKv::new(ns.clone())),
            sessions: Arc::new(session::MemorySessions::new(ns.clone())),
            locks: Arc::new(lock::MemoryLocks::new(ns.clone())),
            elections: Arc::new(election::MemoryElections::new(ns.clone())),
            pubsub: Arc::new(pubsub::MemoryPubSub::new(ns.clone())),
            queues: Arc::new(queue::MemoryQueues::new(ns.clone())),
            faults: Some(Arc::new(MemoryFaults { ns })),
        }))
    }
}

impl std::fmt::Debug for MemoryServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryServer")
    }
}

/// The registry constructor: connects to the process-wide [`MemoryServer`].
pub fn constructor() -> Constructor {
    Arc::new(|config: BackendConfig| {
        Box::pin(async move { MemoryServer::global().connect(&config) })
    })
}

struct MemoryFaults {
    ns: Namespace,
}

#[async_trait::async_trait]
impl dprim::Faults for MemoryFaults {
    async fn expire_session(&self, id: SessionId) -> Result<()> {
        self.ns.with(|s| s.expire_session_now(id))
    }
    async fn stall_session(&self, id: SessionId) -> Result<()> {
        self.ns.with(|s| s.stall_session(id))
    }
}
