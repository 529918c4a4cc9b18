//! dprim-zookeeper: every dprim primitive on ZooKeeper (3.6+), native.
//!
//! # Layout
//! - [`connect`] / [`constructor`]: config -> connected [`dprim::Backend`].
//! - `layout`: where each primitive keeps its znodes under `/<namespace>`.
//!   Internal areas start with `!`, which no portable key segment can
//!   contain, so they never collide with app keys or nested namespaces.
//! - `error`: the one function mapping ZooKeeper errors to dprim errors.
//! - `kv`: Kv on znodes (mzxid as version, multi for CAS and transactions, a
//!   change log so watches deliver every change with its value).
//! - `session`: each dprim session is its own ZooKeeper session.
//! - `line`: the ephemeral-sequential waiting line behind locks,
//!   elections (each waiter watches only its predecessor: no herd) and a
//!   queue's waiting pulls.
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

pub use queue::BUCKET_SPAN;

use dprim::capabilities::{
    Capabilities, KvCapabilities, LockCapabilities, PubSubCapabilities, QueueCapabilities,
    SessionCapabilities,
};
use dprim::registry::Constructor;
use dprim::{Backend, BackendConfig, BackendParts, Error, ErrorKind, Result};
use error::map_error;
use layout::Layout;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zookeeper_client::{Acls, Client, CreateMode, CreateOptions, SessionState};

/// Shortest session TTL. A ZooKeeper server's floor is 2 x tickTime (4 s
/// with the default tickTime of 2 s); a shorter request is raised by the
/// server, while dprim's `lost()` keeps using the requested TTL, so it
/// stays early.
pub const MIN_SESSION_TTL: Duration = Duration::from_secs(1);
/// Messages a subscriber may fall behind before it gets `Lagged`.
pub const SUBSCRIBER_BUFFER: usize = 256;
/// Change-log records kept per namespace; a watch can resume this far back.
pub const WATCH_HISTORY: usize = 1000;
/// Session timeout of the backend's own connection (non-session work).
const MAIN_SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The capabilities this backend declares.
pub fn capabilities() -> Capabilities {
    Capabilities::new(
        // Writes go through the leader; reads are served by the connected
        // server and may lag other clients' acknowledged writes (ZooKeeper
        // guarantees sequential consistency per client, not linearizable
        // reads), so this backend does not claim linearizable reads.
        KvCapabilities::new(false, true, WATCH_HISTORY),
        SessionCapabilities::new(MIN_SESSION_TTL),
        LockCapabilities::new(true),
        PubSubCapabilities::new(SUBSCRIBER_BUFFER),
        QueueCapabilities::new(true, true),
    )
}

/// How to open ZooKeeper sessions.
#[derive(Clone)]
pub(crate) struct Conn {
    pub(crate) cluster: String,
    connect_timeout: Duration,
    request_timeout: Duration,
    /// `user:password` for the digest scheme; never printed.
    auth: Option<Vec<u8>>,
    /// TLS to every endpoint (ZooKeeper's `secureClientPort`), when set.
    tls: Option<zookeeper_client::TlsOptions>,
}

impl Conn {
    /// Opens a new ZooKeeper session with the configured endpoints and auth.
    /// `fail_fast`: give up once every endpoint refused (the backend's first
    /// connection, so a wrong address is reported at once, as the other
    /// backends do); otherwise keep trying them until the timeout (a
    /// session opened while the ensemble elects a leader).
    async fn open(&self, timeout: Duration, fail_fast: bool) -> Result<Client> {
        let mut connector = Client::connector().with_session_timeout(timeout);
        if fail_fast {
            connector = connector.with_fail_eagerly();
        }
        if let Some(auth) = &self.auth {
            connector = connector.with_auth("digest", auth);
        }
        let cluster = self.cluster.clone();
        let tls = self.tls.is_some();
        let connecting = async {
            match &self.tls {
                Some(options) => {
                    connector
                        .with_tls(options.clone())
                        .secure_connect(&cluster)
                        .await
                }
                None => connector.connect(&cluster).await,
            }
        };
        // A failed TLS handshake looks like a server that never answers:
        // the client moves on to the next endpoint, round and round.
        let check = if tls {
            "check `endpoints` (the servers' secureClientPort), `tls.ca` (the CA that signed the servers' certificates), `tls.cert` and `tls.key` if the servers want a client certificate, and that the servers are running"
        } else {
            "check `endpoints` and that the servers are running"
        };
        match tokio::time::timeout(self.connect_timeout + self.request_timeout, connecting).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(zookeeper_client::Error::NoHosts)) => Err(Error::new(
                ErrorKind::Unavailable,
                format!("no zookeeper server could be reached; {check}"),
            )
            .with_context("endpoints", &cluster)
            .temporary()),
            Ok(Err(e)) => Err(map_error(e).with_context("endpoints", &cluster)),
            Err(_) => Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "no zookeeper server answered within {:?}; {check}",
                    self.connect_timeout
                ),
            )
            .with_context("endpoints", &cluster)
            .temporary()),
        }
    }
}

pub(crate) struct Shared {
    pub(crate) conn: Conn,
    pub(crate) request_timeout: Duration,
    pub(crate) layout: Layout,
    /// The backend's own client with the generation version last observed
    /// through it (`kv::Generation`). Cloned on every request, so a plain
    /// mutex held for the clone only; `reconnect` serializes replacing it.
    main: Mutex<(Client, Arc<AtomicI64>)>,
    reconnect: tokio::sync::Mutex<()>,
    /// State the kv shares across its instances (the log trimmer, the
    /// per-key version cache).
    pub(crate) kv: kv::KvState,
    /// The client of every open dprim session, by ZooKeeper session id:
    /// ephemeral znodes must be created through their session's client.
    sessions: Mutex<HashMap<u64, Client>>,
}

/// A connected ZooKeeper backend: what every primitive needs. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Zk(pub(crate) Arc<Shared>);

impl Zk {
    pub(crate) fn layout(&self) -> &Layout {
        &self.0.layout
    }

    /// ACLs for every node dprim creates: only the configured identity may
    /// touch them when auth is configured; open otherwise.
    pub(crate) fn acls(&self) -> Acls<'static> {
        if self.0.conn.auth.is_some() {
            Acls::creator_all()
        } else {
            Acls::anyone_all()
        }
    }

    pub(crate) fn options(&self, mode: CreateMode) -> CreateOptions<'static> {
        mode.with_acls(self.acls())
    }

    /// Opens a new ZooKeeper session with the configured endpoints and auth.
    pub(crate) async fn open_client(&self, timeout: Duration) -> Result<Client> {
        self.0.conn.open(timeout, false).await
    }

    /// The backend's own client. ZooKeeper clients never open a new session
    /// after expiry, so an expired one is replaced here: new work always
    /// gets a live session.
    pub(crate) async fn client(&self) -> Result<Client> {
        Ok(self.main_client().await?.0)
    }

    /// The backend's own client and the generation version observed through
    /// that session (-1: not known yet). A replacement session starts with
    /// an unknown generation: observations are only ordered with the reads
    /// of the session that made them.
    pub(crate) async fn main_client(&self) -> Result<(Client, Arc<AtomicI64>)> {
        if let Some(main) = self.live_main() {
            return Ok(main);
        }
        let _replacing = self.0.reconnect.lock().await;
        if let Some(main) = self.live_main() {
            return Ok(main);
        }
        tracing::info!("zookeeper session of the backend ended; opening a new one");
        let fresh = (
            self.open_client(MAIN_SESSION_TIMEOUT).await?,
            Arc::new(AtomicI64::new(-1)),
        );
        *self.0.main.lock().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        Ok(fresh)
    }

    fn live_main(&self) -> Option<(Client, Arc<AtomicI64>)> {
        let main = self.0.main.lock().unwrap_or_else(|p| p.into_inner());
        (!main.0.state().is_terminated()).then(|| main.clone())
    }

    /// The client of an open dprim session.
    pub(crate) fn session_client(&self, session: &dprim::Session) -> Result<Client> {
        session.check()?;
        self.0
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&session.id().0)
            .cloned()
            .ok_or_else(|| {
                Error::session_lost(format!(
                    "session {} is not open on this backend instance",
                    session.id()
                ))
            })
    }

    pub(crate) fn session_client_by_id(&self, id: u64) -> Option<Client> {
        self.0
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    pub(crate) fn register_session(&self, id: u64, client: Client) {
        self.0
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, client);
    }

    pub(crate) fn forget_session(&self, id: u64) -> Option<Client> {
        self.0
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
    }

    /// Runs one request with the configured timeout.
    pub(crate) async fn call<T, F>(&self, what: &str, f: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, zookeeper_client::Error>>,
    {
        match tokio::time::timeout(self.0.request_timeout, f).await {
            Ok(r) => r.map_err(map_error),
            Err(_) => Err(error::timed_out(what, self.0.request_timeout)),
        }
    }

    /// Creates `path` and its missing parents as empty persistent nodes.
    pub(crate) async fn mkdirs(&self, client: &Client, path: &str) -> Result<()> {
        let options = self.options(CreateMode::Persistent);
        match self.call("mkdir", client.mkdir(path, &options)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e.with_context("path", path)),
        }
    }
}

trait Terminated {
    fn is_terminated(&self) -> bool;
}

impl Terminated for SessionState {
    fn is_terminated(&self) -> bool {
        matches!(
            self,
            SessionState::Expired | SessionState::Closed | SessionState::AuthFailed
        )
    }
}

/// Connects to ZooKeeper as the config says.
///
/// # Behavior
/// - `endpoints` default to `127.0.0.1:2181`.
/// - An unreachable ensemble is `Unavailable` after `connect_timeout`,
///   naming the endpoints.
/// - With `username` and `password`, the session authenticates with the
///   digest scheme and every node dprim creates carries an ACL granting
///   only that identity; wrong credentials or another identity's nodes are
///   `PermissionDenied`. The password never appears in any error.
/// - With `tls`, every endpoint is reached over TLS (the servers'
///   `secureClientPort`), verified against `tls.ca` (required) and the
///   endpoint's host name or IP; `tls.cert` and `tls.key` give the client
///   certificate servers with `ssl.clientAuth=need` ask for.
pub async fn connect(config: &BackendConfig) -> Result<Backend> {
    if config.kind != "zookeeper" {
        return Err(Error::config(format!(
            "the zookeeper backend cannot open a `{}` config",
            config.kind
        )));
    }
    config.validate()?;
    let tls = config.tls.as_ref().map(tls_options).transpose()?;
    let namespace = config.namespace_key()?;
    let cluster = if config.endpoints.is_empty() {
        "127.0.0.1:2181".to_string()
    } else {
        config.endpoints.join(",")
    };
    let auth = match &config.username {
        Some(user) => {
            let password = match &config.password {
                Some(r) => r.resolve()?,
                None => return Err(Error::config(
                    "`username` is set but `password` is not; add `password = { env = \"VAR\" }`",
                )),
            };
            Some(format!("{user}:{}", password.expose()).into_bytes())
        }
        None => None,
    };
    let conn = Conn {
        cluster,
        connect_timeout: config.connect_timeout,
        request_timeout: config.request_timeout,
        auth,
        tls,
    };
    let first = conn.open(MAIN_SESSION_TIMEOUT, true).await?;
    let shared = Shared {
        conn,
        request_timeout: config.request_timeout,
        layout: Layout::new(namespace.as_str()),
        main: Mutex::new((first.clone(), Arc::new(AtomicI64::new(-1)))),
        reconnect: tokio::sync::Mutex::new(()),
        kv: kv::KvState::default(),
        sessions: Mutex::new(HashMap::new()),
    };
    let zk = Zk(Arc::new(shared));
    // Prove the ensemble answers and lay out the namespace's areas (another
    // identity's namespace is left alone: its nodes answer for themselves).
    let log_dir = zk.layout().log_dir();
    if zk
        .call("exists", first.check_stat(&log_dir))
        .await?
        .is_none()
    {
        zk.mkdirs(&first, &log_dir).await?;
    }
    kv::prepare_generation(&zk).await?;
    let sessions = session::ZkSessions::new(zk.clone());
    let faults = sessions.faults();
    Ok(Backend::new(BackendParts {
        kind: "zookeeper".into(),
        namespace: namespace.as_str().to_string(),
        capabilities: capabilities(),
        kv: Arc::new(kv::ZkKv::new(zk.clone())),
        sessions: Arc::new(sessions),
        locks: Arc::new(lock::ZkLocks::new(zk.clone())),
        elections: Arc::new(election::ZkElections::new(zk.clone())),
        pubsub: Arc::new(pubsub::ZkPubSub::new(zk.clone())),
        queues: Arc::new(queue::ZkQueues::new(zk)),
        faults: Some(Arc::new(faults)),
    }))
}

/// The client's TLS settings from the config's `tls` table.
fn tls_options(tls: &dprim::config::TlsConfig) -> Result<zookeeper_client::TlsOptions> {
    use dprim::config::TlsConfig;
    let read_pem = |path: &std::path::Path| {
        String::from_utf8(TlsConfig::read(path)?)
            .map_err(|_| Error::config(format!("TLS file `{}` is not PEM text", path.display())))
    };
    let unusable = |path: &std::path::Path, e: zookeeper_client::Error| {
        Error::config(format!(
            "TLS file `{}` holds no usable PEM certificate or key: {e}",
            path.display()
        ))
    };
    // The client verifies servers only against a given CA (no system roots).
    let Some(ca) = &tls.ca else {
        return Err(Error::config(
            "the zookeeper backend needs `tls.ca`: the CA (PEM) that signed the servers' certificates",
        ));
    };
    let mut options = zookeeper_client::TlsOptions::new()
        .with_pem_ca(&read_pem(ca)?)
        .map_err(|e| unusable(ca, e))?;
    if let Some((cert, key)) = tls.identity()? {
        options = options
            .with_pem_identity(&read_pem(cert)?, &read_pem(key)?)
            .map_err(|e| unusable(cert, e))?;
    }
    Ok(options)
}

/// The registry constructor.
pub fn constructor() -> Constructor {
    Arc::new(|config: BackendConfig| Box::pin(async move { connect(&config).await }))
}
