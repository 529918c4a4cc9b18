//! A backend instance: every primitive, its capabilities, and its namespace.

use crate::capabilities::Capabilities;
use crate::election::Elections;
use crate::error::Result;
use crate::kv::Kv;
use crate::lock::Locks;
use crate::pubsub::PubSub;
use crate::queue::Queues;
use crate::retry::{RetryPolicy, RetryingKv};
use crate::session::{SessionId, Sessions};
use async_trait::async_trait;
use std::fmt;
use std::sync::Arc;

/// Fault hooks a backend may offer to the conformance suite. Cases that need
/// a hook a backend lacks are reported skipped, naming the hook.
#[async_trait]
pub trait Faults: Send + Sync {
    /// Expires a session on the server side now, as if its TTL had passed
    /// without renewals (the client learns of it on its next renewal).
    async fn expire_session(&self, id: SessionId) -> Result<()>;
    /// Makes the server stop acknowledging the session's renewals (a
    /// partition between client and server), so the client must declare the
    /// session lost from its own safe-until deadline; the server then
    /// expires it after its TTL.
    async fn stall_session(&self, id: SessionId) -> Result<()>;
}

/// Everything a backend constructor hands over.
pub struct BackendParts {
    /// The kind (`memory`, `etcd`, ...).
    pub kind: String,
    /// The namespace every key lives under.
    pub namespace: String,
    /// Declared capabilities.
    pub capabilities: Capabilities,
    /// Kv.
    pub kv: Arc<dyn Kv>,
    /// Sessions.
    pub sessions: Arc<dyn Sessions>,
    /// Locks.
    pub locks: Arc<dyn Locks>,
    /// Elections.
    pub elections: Arc<dyn Elections>,
    /// PubSub.
    pub pubsub: Arc<dyn PubSub>,
    /// Queues.
    pub queues: Arc<dyn Queues>,
    /// Fault hooks, if the backend offers any.
    pub faults: Option<Arc<dyn Faults>>,
}

/// An open backend: the handle apps use. Cheap to clone.
#[derive(Clone)]
pub struct Backend {
    parts: Arc<BackendParts>,
}

impl Backend {
    /// Assembles a backend (for backend crates). Kv calls go through the
    /// retry layer ([`crate::retry`]) with the default policy, so apps do
    /// not see temporary failures it could have hidden.
    pub fn new(mut parts: BackendParts) -> Backend {
        parts.kv = Arc::new(RetryingKv::new(parts.kv, RetryPolicy::default()));
        Backend {
            parts: Arc::new(parts),
        }
    }
    /// The backend kind.
    pub fn kind(&self) -> &str {
        &self.parts.kind
    }
    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.parts.namespace
    }
    /// Declared capabilities.
    pub fn capabilities(&self) -> &Capabilities {
        &self.parts.capabilities
    }
    /// Kv.
    pub fn kv(&self) -> &dyn Kv {
        self.parts.kv.as_ref()
    }
    /// Sessions.
    pub fn sessions(&self) -> &dyn Sessions {
        self.parts.sessions.as_ref()
    }
    /// Locks.
    pub fn locks(&self) -> &dyn Locks {
        self.parts.locks.as_ref()
    }
    /// Elections.
    pub fn elections(&self) -> &dyn Elections {
        self.parts.elections.as_ref()
    }
    /// PubSub.
    pub fn pubsub(&self) -> &dyn PubSub {
        self.parts.pubsub.as_ref()
    }
    /// Queues.
    pub fn queues(&self) -> &dyn Queues {
        self.parts.queues.as_ref()
    }
    /// Fault hooks, if any.
    pub fn faults(&self) -> Option<&dyn Faults> {
        self.parts.faults.as_deref()
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("kind", &self.parts.kind)
            .field("namespace", &self.parts.namespace)
            .finish()
    }
}
