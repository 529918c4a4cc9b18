//! dprim-etcd: every dprim primitive on etcd v3, native.
//!
//! # Layout
//! - [`connect`] / [`constructor`]: config -> connected [`dprim::Backend`].
//! - `layout`: where each primitive keeps its keys under `<namespace>/`.
//!   Internal areas start with `!`, which no portable key segment can
//!   contain, so they never collide with app keys or nested namespaces.
//! - `error`: the one function mapping etcd errors to dprim errors.
//! - `kv`: Kv on etcd KV (mod_revision as version, txns, watch from revision).
//! - `session`: sessions as leases with dprim's keep-alive loop.
//! - `line`: the create-revision waiting line behind locks and elections
//!   (each waiter watches only its predecessor: no herd).
//! - `lock`, `election`, `pubsub`, `queue`: the other primitives.
#![deny(missing_docs)]

mod election;
mod error;
mod kv;
mod layout;
mod line;
mod lock;
mod pubsub;
mod queue;
mod session;

use dprim::capabilities::{
    Capabilities, KvCapabilities, LockCapabilities, PubSubCapabilities, QueueCapabilities,
    SessionCapabilities,
};
use dprim::registry::Constructor;
use dprim::{Backend, BackendConfig, BackendParts, Error, ErrorKind, Result};
use error::map_error;
use layout::Layout;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Shortest session TTL: etcd leases are whole seconds, and a server's
/// floor is ceil(1.5 x election timeout) (2 s with etcd's defaults; longer
/// requests are granted as asked, shorter ones are raised by the server).
pub const MIN_SESSION_TTL: Duration = Duration::from_secs(1);
/// Messages a subscriber may fall behind before it gets `Lagged`.
pub const SUBSCRIBER_BUFFER: usize = 1024;

/// The capabilities this backend declares.
pub fn capabilities() -> Capabilities {
    Capabilities::new(
        // History depth is the server's compaction policy; dprim cannot know
        // it, and a compacted start point is reported as Resync.
        KvCapabilities::new(true, true, 1000),
        SessionCapabilities::new(MIN_SESSION_TTL),
        LockCapabilities::new(true),
        PubSubCapabilities::new(SUBSCRIBER_BUFFER),
        QueueCapabilities::new(true, true),
    )
}

/// A connected etcd client plus what every primitive needs.
#[derive(Clone)]
pub(crate) struct Etcd {
    pub(crate) client: etcd_client::Client,
    pub(crate) layout: Layout,
    pub(crate) request_timeout: Duration,
    /// Linearizable revision reads shared by concurrent callers.
    revisions: Arc<std::sync::Mutex<RevisionReads>>,
}

/// What one revision read gives each caller that shares it (an error as
/// its parts: kind, message, temporary).
type RevisionRead = std::result::Result<i64, (ErrorKind, String, bool)>;

/// Callers waiting for a revision read, and whether one is being made.
#[derive(Default)]
struct RevisionReads {
    reading: bool,
    waiting: Vec<tokio::sync::oneshot::Sender<RevisionRead>>,
}

impl Etcd {
    /// A revision at least that of every write acknowledged before this
    /// call. Concurrent callers share reads: each read answers everyone
    /// who asked before it was sent, so there is one read in flight however
    /// many ask.
    pub(crate) async fn current_revision(&self) -> Result<i64> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = {
            let mut reads = self.revisions.lock().unwrap_or_else(|p| p.into_inner());
            reads.waiting.push(tx);
            !std::mem::replace(&mut reads.reading, true)
        };
        if start {
            tokio::spawn(self.clone().read_revisions());
        }
        match rx.await {
            Ok(Ok(revision)) => Ok(revision),
            Ok(Err((kind, message, temporary))) => {
                let e = Error::new(kind, message);
                Err(if temporary { e.temporary() } else { e })
            }
            Err(_) => Err(Error::unexpected("the revision read was dropped")),
        }
    }

    async fn read_revisions(self) {
        // If this task is dropped mid-read (its runtime shut down), the
        // next caller must start a reader again, and those waiting must not
        // wait forever.
        struct Abandoned {
            reads: Arc<std::sync::Mutex<RevisionReads>>,
            armed: bool,
        }
        impl Drop for Abandoned {
            fn drop(&mut self) {
                if self.armed {
                    let mut reads = self.reads.lock().unwrap_or_else(|p| p.into_inner());
                    reads.reading = false;
                    reads.waiting.clear();
                }
            }
        }
        let mut abandoned = Abandoned {
            reads: self.revisions.clone(),
            armed: true,
        };
        loop {
            let batch = {
                let mut reads = self.revisions.lock().unwrap_or_else(|p| p.into_inner());
                if reads.waiting.is_empty() {
                    reads.reading = false;
                    abandoned.armed = false;
                    return;
                }
                std::mem::take(&mut reads.waiting)
            };
            // A linearizable read of one key, counted only.
            let read = self
                .call(
                    "get",
                    self.kv().get(
                        self.layout.kv_key(&dprim::Key::root()),
                        Some(etcd_client::GetOptions::new().with_count_only()),
                    ),
                )
                .await
                .map(|resp| resp.header().map_or(0, |h| h.revision()))
                .map_err(|e| (e.kind(), e.message().to_string(), e.is_temporary()));
            for tx in batch {
                let _ = tx.send(read.clone());
            }
        }
    }

    /// Runs one unary request with the configured timeout.
    pub(crate) async fn call<T, F>(&self, what: &str, f: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.request_timeout, f).await {
            Ok(r) => r.map_err(map_error),
            Err(_) => Err(error::timed_out(what, self.request_timeout)),
        }
    }

    /// The kv client, taking responses as large as a page of a listing
    /// (or a transaction's reads) of the largest keys and values can be:
    /// the client's default of 4 MiB holds only 16 values of 256 KiB.
    pub(crate) fn kv(&self) -> etcd_client::KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
    }
}

/// Entries per page of a listing.
pub(crate) const LIST_PAGE: usize = 512;
/// The largest response the client takes: a page of a listing of the
/// largest keys and values (transactions, at most `MAX_TXN_OPS` reads, are
/// smaller), with room for each entry's metadata.
const MAX_RESPONSE_BYTES: usize =
    LIST_PAGE * (dprim::MAX_VALUE_BYTES + 2 * dprim::MAX_KEY_BYTES + 1024);

/// Connects to etcd as the config says.
///
/// # Behavior
/// - `endpoints` default to `127.0.0.1:2379`.
/// - An unreachable cluster is `Unavailable` after `connect_timeout`, naming
///   the endpoints.
/// - Wrong credentials are `PermissionDenied`; the password never appears in
///   any error.
pub async fn connect(config: &BackendConfig) -> Result<Backend> {
    if config.kind != "etcd" {
        return Err(Error::config(format!(
            "the etcd backend cannot open a `{}` config",
            config.kind
        )));
    }
    config.validate()?;
    let namespace = config.namespace_key()?;
    let endpoints: Vec<String> = if config.endpoints.is_empty() {
        vec!["http://127.0.0.1:2379".to_string()]
    } else {
        config
            .endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else if config.tls.is_some() {
                    format!("https://{e}")
                } else {
                    format!("http://{e}")
                }
            })
            .collect()
    };
    let mut options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(config.connect_timeout)
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    if let Some(user) = &config.username {
        let password =
            match &config.password {
                Some(r) => r.resolve()?,
                None => return Err(Error::config(
                    "`username` is set but `password` is not; add `password = { env = \"VAR\" }`",
                )),
            };
        options = options.with_user(user.clone(), password.expose().to_string());
    }
    if let Some(tls) = &config.tls {
        options = options.with_tls(tls_options(tls)?);
    }
    let what = format!("connect to {}", endpoints.join(","));
    let client = match tokio::time::timeout(
        config.connect_timeout + config.request_timeout,
        etcd_client::Client::connect(&endpoints, Some(options)),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(map_error(e).with_context("endpoints", endpoints.join(","))),
        Err(_) => return Err(error::timed_out(&what, config.connect_timeout)),
    };
    let etcd = Etcd {
        client,
        layout: Layout::new(namespace.as_str()),
        request_timeout: config.request_timeout,
        revisions: Arc::default(),
    };
    // etcd-client connects lazily: prove the cluster answers (and that the
    // credentials work) before handing the backend out.
    let probe = etcd.layout.kv_key(&dprim::Key::root());
    etcd.call(
        &what,
        etcd.kv().get(
            probe,
            Some(etcd_client::GetOptions::new().with_count_only()),
        ),
    )
    .await
    .map_err(|e| e.with_context("endpoints", endpoints.join(",")))?;
    let sessions = session::EtcdSessions::new(etcd.clone());
    let faults = sessions.faults();
    Ok(Backend::new(BackendParts {
        kind: "etcd".into(),
        namespace: namespace.as_str().to_string(),
        capabilities: capabilities(),
        kv: Arc::new(kv::EtcdKv::new(etcd.clone())),
        sessions: Arc::new(sessions),
        locks: Arc::new(lock::EtcdLocks::new(etcd.clone())),
        elections: Arc::new(election::EtcdElections::new(etcd.clone())),
        pubsub: Arc::new(pubsub::EtcdPubSub::new(etcd.clone())),
        queues: Arc::new(queue::EtcdQueues::new(etcd)),
        faults: Some(Arc::new(faults)),
    }))
}

fn tls_options(tls: &dprim::config::TlsConfig) -> Result<etcd_client::TlsOptions> {
    use dprim::config::TlsConfig;
    let mut options = etcd_client::TlsOptions::new();
    if let Some(ca) = &tls.ca {
        options = options.ca_certificate(etcd_client::Certificate::from_pem(TlsConfig::read(ca)?));
    }
    if let Some((cert, key)) = tls.identity()? {
        options = options.identity(etcd_client::Identity::from_pem(
            TlsConfig::read(cert)?,
            TlsConfig::read(key)?,
        ));
    }
    Ok(options)
}

/// The registry constructor.
pub fn constructor() -> Constructor {
    Arc::new(|config: BackendConfig| Box::pin(async move { connect(&config).await }))
}
