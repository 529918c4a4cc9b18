//! dprim-nats: every dprim primitive on NATS JetStream (nats-server 2.11+;
//! tested with 2.15).
//!
//! # Layout
//! - [`connect`] / [`constructor`]: config -> connected [`dprim::Backend`].
//! - `layout`: how keys map onto KV key tokens and where each primitive
//!   keeps its records (areas whose first token starts with `=`, which no
//!   escaped app key can produce).
//! - `error`: the one function mapping NATS errors to dprim errors.
//! - `store`: conditional writes, reads, scans and follows on the bucket.
//! - `kv`: Kv on the bucket (stream sequence as version, expected-last-
//!   subject-sequence for CAS and conditional delete, ordered consumers for
//!   list and watch).
//! - `session`: heartbeat records with a per-message TTL, renewed by dprim's
//!   keep-alive loop; a reaper in every client removes the records of
//!   sessions whose heartbeat vanished.
//! - `line`: the waiting line behind locks and elections (first sequence =
//!   place in line, fencing token and term).
//! - `lock`, `election`, `pubsub` (core NATS subjects), `queue` (work-queue
//!   stream, durable pull consumer, claims in the bucket).
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
mod store;

use async_nats::jetstream;
use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy, StorageType};
use dprim::capabilities::{
    Capabilities, KvCapabilities, LockCapabilities, PubSubCapabilities, QueueCapabilities,
    SessionCapabilities,
};
use dprim::config::TlsConfig;
use dprim::registry::Constructor;
use dprim::{Backend, BackendConfig, BackendParts, Error, Result};
use error::map_error;
use layout::Layout;
use std::sync::Arc;
use std::time::Duration;

/// Shortest session TTL: per-message TTLs are whole seconds.
pub const MIN_SESSION_TTL: Duration = Duration::from_secs(1);
/// How often a watch or an observer checks whether its client reconnected:
/// a change lost with the old connection leaves nothing else to notice.
pub(crate) const RECONNECT_CHECK: Duration = Duration::from_secs(1);
/// Messages a subscriber may fall behind before it gets `Lagged`. Core NATS
/// delivers at well over a million small messages a second, so a buffer of a
/// few milliseconds would make any scheduling hiccup of the reader a lag;
/// this is the client's own per-subscription default.
pub const SUBSCRIBER_BUFFER: usize = 64 * 1024;
/// Payload bytes a subscriber may hold unread before it gets `Lagged`: what
/// bounds its memory when messages are large.
pub const SUBSCRIBER_BUFFER_BYTES: usize = 32 * 1024 * 1024;
/// Revisions the bucket keeps per key: a watch can resume from this many
/// past changes.
pub const HISTORY: i64 = 256;

/// The capabilities this backend declares.
pub fn capabilities() -> Capabilities {
    Capabilities::new(
        // Reads are served by any replica (direct get); JetStream offers no
        // multi-subject conditional write, so transactions are absent.
        KvCapabilities::new(false, false, HISTORY as usize),
        SessionCapabilities::new(MIN_SESSION_TTL),
        LockCapabilities::new(true),
        PubSubCapabilities::new(SUBSCRIBER_BUFFER).with_buffer_bytes(SUBSCRIBER_BUFFER_BYTES),
        QueueCapabilities::new(true, true),
    )
}

/// A connected client plus what every primitive needs.
#[derive(Clone)]
pub(crate) struct Nats {
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    // Shared: a stream handle holds the stream's whole info, and `Nats`
    // is cloned on hot paths.
    pub(crate) kv: Arc<jetstream::stream::Stream>,
    pub(crate) queues: Arc<jetstream::stream::Stream>,
    pub(crate) layout: Layout,
    pub(crate) request_timeout: Duration,
}

/// Connects to NATS as the config says.
///
/// # Behavior
/// - `endpoints` default to `127.0.0.1:4222`; with three or more endpoints
///   the bucket and the queue stream are created with 3 replicas.
/// - `username` + `password` authenticate with user/password; a password
///   reference holding an nkey seed (`SU...`) authenticates with that nkey.
/// - An unreachable server is `Unavailable`, naming the endpoints; refused
///   credentials are `PermissionDenied`; no secret appears in any error.
pub async fn connect(config: &BackendConfig) -> Result<Backend> {
    if config.kind != "nats" {
        return Err(Error::config(format!(
            "the nats backend cannot open a `{}` config",
            config.kind
        )));
    }
    config.validate()?;
    let namespace = config.namespace_key()?;
    let endpoints: Vec<String> = if config.endpoints.is_empty() {
        vec!["127.0.0.1:4222".to_string()]
    } else {
        config.endpoints.clone()
    };
    let addrs = endpoints
        .iter()
        .map(|e| {
            let url = if e.contains("://") {
                e.clone()
            } else if config.tls.is_some() {
                format!("tls://{e}")
            } else {
                format!("nats://{e}")
            };
            url.parse::<async_nats::ServerAddr>()
                .map_err(|err| Error::config(format!("invalid NATS endpoint `{e}`: {err}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut options = async_nats::ConnectOptions::new()
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(config.request_timeout))
        .subscription_capacity(64 * 1024);
    if let Some(user) = &config.username {
        let secret =
            match &config.password {
                Some(r) => r.resolve()?,
                None => return Err(Error::config(
                    "`username` is set but `password` is not; add `password = { env = \"VAR\" }`",
                )),
            };
        let secret = secret.expose();
        options = if secret.starts_with("SU") && user.starts_with('U') {
            options.nkey(secret.to_string())
        } else {
            options.user_and_password(user.clone(), secret.to_string())
        };
    }
    if let Some(tls) = &config.tls {
        options = options.require_tls(true);
        // The client reads the files itself; reading them here first
        // turns a missing or unreadable file into an error naming it.
        if let Some(ca) = &tls.ca {
            TlsConfig::read(ca)?;
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = tls.identity()? {
            TlsConfig::read(cert)?;
            TlsConfig::read(key)?;
            options = options.add_client_certificate(cert.to_path_buf(), key.to_path_buf());
        }
    }
    let what = format!("connect to {}", endpoints.join(","));
    let client = match tokio::time::timeout(
        config.connect_timeout + config.request_timeout,
        options.connect(addrs),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(map_error(&what, e).with_context("endpoints", endpoints.join(",")))
        }
        Err(_) => return Err(error::timed_out(&what, config.connect_timeout)),
    };
    let js = jetstream::ContextBuilder::new()
        .timeout(config.request_timeout)
        .build(client.clone());
    let replicas = if endpoints.len() >= 3 { 3 } else { 1 };
    let kv = ensure_stream(
        &js,
        jetstream::stream::Config {
            name: layout::KV_STREAM.to_string(),
            description: Some("dprim records (JetStream KV bucket `dprim`)".into()),
            subjects: vec![format!("{}>", layout::KV_PREFIX)],
            max_messages_per_subject: HISTORY,
            discard: DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            allow_message_ttl: true,
            // Markers of expired records need to live only until the reapers that
            // follow heartbeats have seen them; the server raises shorter
            // per-message TTLs to this value, so it must stay at the 1 s floor.
            subject_delete_marker_ttl: Some(Duration::from_secs(1)),
            duplicate_window: Duration::from_secs(120),
            num_replicas: replicas,
            storage: StorageType::File,
            ..Default::default()
        },
        &what,
    )
    .await?;
    let queues = ensure_stream(
        &js,
        jetstream::stream::Config {
            name: layout::QUEUE_STREAM.to_string(),
            description: Some("dprim queues".into()),
            subjects: vec![layout::QUEUE_SUBJECTS.to_string()],
            retention: RetentionPolicy::WorkQueue,
            allow_direct: true,
            duplicate_window: Duration::from_secs(120),
            num_replicas: replicas,
            storage: StorageType::File,
            ..Default::default()
        },
        &what,
    )
    .await?;
    let nats = Nats {
        client,
        js,
        kv: Arc::new(kv),
        queues: Arc::new(queues),
        layout: Layout::new(&namespace),
        request_timeout: config.request_timeout,
    };
    // A fresh bucket gets one record so its last sequence (a listing's
    // revision) is never zero; losing the race to another client is fine.
    if nats.last_any(layout::META_SUBJECT).await?.is_none() {
        let _ = nats
            .write(
                layout::META_SUBJECT,
                bytes::Bytes::from_static(b"dprim"),
                async_nats::HeaderMap::new(),
                Some(0),
            )
            .await;
    }
    let sessions = session::NatsSessions::new(nats.clone());
    let faults = sessions.faults();
    Ok(Backend::new(BackendParts {
        kind: "nats".into(),
        namespace: namespace.as_str().to_string(),
        capabilities: capabilities(),
        kv: Arc::new(kv::NatsKv::new(nats.clone())),
        sessions: Arc::new(sessions),
        locks: Arc::new(lock::NatsLocks::new(nats.clone())),
        elections: Arc::new(election::NatsElections::new(nats.clone())),
        pubsub: Arc::new(pubsub::NatsPubSub::new(nats.clone())),
        queues: Arc::new(queue::NatsQueues::new(nats)),
        faults: Some(Arc::new(faults)),
    }))
}

/// Gets the stream, creating it when missing (concurrent creators with the
/// same config all succeed).
async fn ensure_stream(
    js: &jetstream::Context,
    config: jetstream::stream::Config,
    what: &str,
) -> Result<jetstream::stream::Stream> {
    let name = config.name.clone();
    match tokio::time::timeout(Duration::from_secs(30), js.get_or_create_stream(config)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(map_error(&format!("{what}: open stream {name}"), e)),
        Err(_) => Err(error::timed_out(what, Duration::from_secs(30))),
    }
}

/// The registry constructor.
pub fn constructor() -> Constructor {
    Arc::new(|config: BackendConfig| Box::pin(async move { connect(&config).await }))
}
