//! Kv on etcd KV: mod_revision is the version, CAS and transactions are
//! etcd txns, watches resume from the last delivered revision.

use crate::layout::prefix_end;
use crate::Etcd;
use async_trait::async_trait;
use dprim::{
    Depth, Entry, Error, Key, Kv, Listing, Precondition, PutOptions, Result, SessionId, Txn, TxnOp,
    TxnResult, Value, Version, WatchEvent, WatchStart, WatchStream, WatchTarget,
};
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KeyValue, TxnOpResponse, WatchOptions,
};
use futures::StreamExt;
use std::time::Duration;
use tokio::sync::mpsc;

pub(crate) struct EtcdKv {
    etcd: Etcd,
}

impl EtcdKv {
    /// Lists `dir` in pages of `LIST_PAGE` entries, every page read at the
    /// revision of the first: one snapshot, however large.
    async fn list_pages(&self, dir: &Key, depth: Depth) -> Result<Listing> {
        let prefix = self.etcd.layout.kv_dir_prefix(dir);
        let end = prefix_end(&prefix);
        let mut from = prefix;
        let mut revision: Option<Version> = None;
        let mut entries = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(crate::LIST_PAGE as i64);
            if let Some(r) = revision {
                options = options.with_revision(r.get() as i64);
            }
            let resp = self
                .etcd
                .call("list", self.etcd.kv().get(from.clone(), Some(options)))
                .await?;
            let at = match revision {
                Some(r) => r,
                None => *revision.insert(header_revision(resp.header())?),
            };
            for kv in resp.kvs() {
                if let Some(e) = entry(&self.etcd, kv)? {
                    if depth == Depth::Recursive || e.key.is_child_of(dir) {
                        entries.push(e);
                    }
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    // The next page starts just after the last key read.
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => {
                    return Ok(Listing {
                        entries,
                        revision: at,
                    })
                }
            }
        }
    }

    pub(crate) fn new(etcd: Etcd) -> EtcdKv {
        EtcdKv { etcd }
    }
}

fn version(raw: i64) -> Result<Version> {
    u64::try_from(raw)
        .ok()
        .and_then(Version::new)
        .ok_or_else(|| Error::unexpected(format!("etcd returned revision {raw}")))
}

/// Converts a stored etcd pair into an entry; `None` for keys outside the kv area.
pub(crate) fn entry(etcd: &Etcd, kv: &KeyValue) -> Result<Option<Entry>> {
    let Some(key) = etcd.layout.app_key(kv.key()) else {
        return Ok(None);
    };
    let value = Value::new(kv.value().to_vec()).map_err(|e| {
        Error::unexpected(format!(
            "key `{key}` holds a value written outside dprim: {}",
            e.message()
        ))
    })?;
    Ok(Some(Entry {
        key,
        value,
        version: version(kv.mod_revision())?,
        session: (kv.lease() != 0).then_some(SessionId(kv.lease() as u64)),
    }))
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Result<Version> {
    version(h.map_or(0, |h| h.revision()))
}

fn compare(raw: &[u8], precondition: Precondition) -> Option<Compare> {
    match precondition {
        Precondition::None => None,
        Precondition::Absent => Some(Compare::create_revision(raw, CompareOp::Equal, 0)),
        Precondition::Version(v) => {
            Some(Compare::mod_revision(raw, CompareOp::Equal, v.get() as i64))
        }
    }
}

/// Why a precondition failed, given the key's current revision (`0` if missing).
fn precondition_error(key: &Key, precondition: Precondition, current: i64) -> Error {
    match precondition {
        Precondition::Absent => {
            Error::already_exists(format!("key `{key}` already exists (version {current})"))
        }
        Precondition::Version(want) if current == 0 => Error::conflict(format!(
            "key `{key}` does not exist (expected version {want})"
        )),
        Precondition::Version(want) => Error::conflict(format!(
            "key `{key}` has version {current}, not the expected {want}"
        )),
        Precondition::None => Error::unexpected("an unconditional write failed its compare"),
    }
    .with_context("key", key)
}

fn current_revision(resp: Option<&TxnOpResponse>) -> i64 {
    match resp {
        Some(TxnOpResponse::Get(g)) => g.kvs().first().map_or(0, |kv| kv.mod_revision()),
        _ => 0,
    }
}

fn put_options(session: Option<SessionId>) -> Option<etcd_client::PutOptions> {
    session.map(|s| etcd_client::PutOptions::new().with_lease(s.0 as i64))
}

#[async_trait]
impl Kv for EtcdKv {
    async fn get(&self, key: &Key) -> Result<Option<Entry>> {
        let raw = self.etcd.layout.kv_key(key);
        let resp = self.etcd.call("get", self.etcd.kv().get(raw, None)).await?;
        match resp.kvs().first() {
            Some(kv) => entry(&self.etcd, kv),
            None => Ok(None),
        }
    }

    async fn put_with(&self, key: &Key, value: Value, options: PutOptions) -> Result<Version> {
        if key.is_root() {
            return Err(Error::invalid("cannot write the namespace root"));
        }
        let raw = self.etcd.layout.kv_key(key);
        let put = put_options(options.session);
        let Some(cmp) = compare(&raw, options.precondition) else {
            let resp = self
                .etcd
                .call("put", self.etcd.kv().put(raw, value.into_bytes(), put))
                .await?;
            return header_revision(resp.header());
        };
        let txn = etcd_client::Txn::new()
            .when([cmp])
            .and_then([etcd_client::TxnOp::put(
                raw.clone(),
                value.into_bytes(),
                put,
            )])
            .or_else([etcd_client::TxnOp::get(raw, None)]);
        let resp = self.etcd.call("txn", self.etcd.kv().txn(txn)).await?;
        if resp.succeeded() {
            header_revision(resp.header())
        } else {
            let current = current_revision(resp.op_responses().first());
            Err(precondition_error(key, options.precondition, current))
        }
    }

    async fn delete_with(&self, key: &Key, precondition: Precondition) -> Result<bool> {
        let raw = self.etcd.layout.kv_key(key);
        match precondition {
            Precondition::Absent => Err(Error::invalid(
                "a delete cannot require the key to be absent; use Precondition::None or Version",
            )),
            Precondition::None => {
                let resp = self
                    .etcd
                    .call("delete", self.etcd.kv().delete(raw, None))
                    .await?;
                Ok(resp.deleted() > 0)
            }
            Precondition::Version(_) => {
                let cmp = compare(&raw, precondition);
                let txn = etcd_client::Txn::new()
                    .when(cmp.into_iter().collect::<Vec<_>>())
                    .and_then([etcd_client::TxnOp::delete(raw.clone(), None)])
                    .or_else([etcd_client::TxnOp::get(raw, None)]);
                let resp = self.etcd.call("txn", self.etcd.kv().txn(txn)).await?;
                if resp.succeeded() {
                    Ok(true)
                } else {
                    let current = current_revision(resp.op_responses().first());
                    Err(precondition_error(key, precondition, current))
                }
            }
        }
    }

    async fn list(&self, dir: &Key, depth: Depth) -> Result<Listing> {
        // A listing past the last compaction's reach starts again (it can
        // only happen between pages, when a compaction lands meanwhile).
        let mut attempts = 0;
        loop {
            match self.list_pages(dir, depth).await {
                Err(e) if e.kind() == dprim::ErrorKind::Resync && attempts < 3 => attempts += 1,
                other => return other,
            }
        }
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        txn.validate()?;
        let layout = &self.etcd.layout;
        let mut compares = Vec::new();
        let mut reads = Vec::new();
        for (key, precondition) in &txn.checks {
            let raw = layout.kv_key(key);
            if let Some(c) = compare(&raw, *precondition) {
                compares.push(c);
            }
            reads.push(etcd_client::TxnOp::get(raw, None));
        }
        let mut ops = Vec::new();
        let mut is_put = Vec::new();
        for op in &txn.ops {
            if op.key().is_root() {
                return Err(Error::invalid("cannot write the namespace root"));
            }
            match op {
                TxnOp::Put {
                    key,
                    value,
                    session,
                } => {
                    ops.push(etcd_client::TxnOp::put(
                        layout.kv_key(key),
                        value.as_bytes().to_vec(),
                        put_options(*session),
                    ));
                    is_put.push(true);
                }
                TxnOp::Delete { key } => {
                    ops.push(etcd_client::TxnOp::delete(layout.kv_key(key), None));
                    is_put.push(false);
                }
            }
        }
        let request = etcd_client::Txn::new()
            .when(compares)
            .and_then(ops)
            .or_else(reads);
        let resp = self.etcd.call("txn", self.etcd.kv().txn(request)).await?;
        if !resp.succeeded() {
            let current = resp.op_responses();
            for (i, (key, precondition)) in txn.checks.iter().enumerate() {
                let rev = current_revision(current.get(i));
                let holds = match precondition {
                    Precondition::None => true,
                    Precondition::Absent => rev == 0,
                    Precondition::Version(v) => rev == v.get() as i64,
                };
                if !holds {
                    let why = precondition_error(key, *precondition, rev);
                    return Err(Error::conflict(format!(
                        "transaction check failed, nothing was written: {}",
                        why.message()
                    ))
                    .with_context("key", key));
                }
            }
            return Err(Error::conflict(
                "transaction check failed, nothing was written",
            ));
        }
        let revision = header_revision(resp.header())?;
        Ok(TxnResult {
            versions: is_put.into_iter().map(|p| p.then_some(revision)).collect(),
        })
    }

    async fn watch(&self, target: WatchTarget, start: WatchStart) -> Result<WatchStream> {
        let (raw, prefix) = match &target {
            WatchTarget::Key(k) => (self.etcd.layout.kv_key(k), false),
            WatchTarget::Dir(d) => (self.etcd.layout.kv_dir_prefix(d), true),
        };
        let from = match start {
            WatchStart::Now => 0,
            WatchStart::After(v) => v.get() as i64 + 1,
        };
        let (tx, rx) = mpsc::channel(256);
        let watcher = Watcher {
            etcd: self.etcd.clone(),
            raw,
            prefix,
            tx,
        };
        // Open the first server-side watch before returning, so every
        // change after `watch` returns is covered.
        let opened = watcher.open(from).await?;
        tokio::spawn(watcher.run(opened));
        Ok(WatchStream::new(tokio_stream_from(rx).boxed()))
    }
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<WatchEvent>>,
) -> impl futures::Stream<Item = Result<WatchEvent>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

struct Watcher {
    etcd: Etcd,
    raw: Vec<u8>,
    prefix: bool,
    tx: mpsc::Sender<Result<WatchEvent>>,
}

/// A server-side watch and the first revision it will deliver.
enum Opened {
    Live(Box<etcd_client::WatchStream>, i64),
    Compacted(String),
}

impl Watcher {
    async fn open(&self, from: i64) -> Result<Opened> {
        let mut options = WatchOptions::new().with_start_revision(from);
        if self.prefix {
            options = options.with_range(prefix_end(&self.raw));
        }
        let mut client = self.etcd.client.watch_client();
        let mut stream = self
            .etcd
            .call("watch", client.watch(self.raw.clone(), Some(options)))
            .await?;
        let first = self
            .etcd
            .call("watch", stream.message())
            .await?
            .ok_or_else(|| {
                Error::new(
                    dprim::ErrorKind::Unavailable,
                    "etcd closed the watch at once",
                )
                .temporary()
            })?;
        if first.compact_revision() > 0 || first.canceled() {
            return Ok(Opened::Compacted(format!(
                "history before revision {} was compacted ({}); re-list and watch from the listing's revision",
                first.compact_revision(),
                first.cancel_reason()
            )));
        }
        // etcd never puts events in the "created" response; the first
        // revision to deliver is the requested one, or the one after the
        // creation point for a watch from now.
        let next = if from > 0 {
            from
        } else {
            first.header().map_or(0, |h| h.revision()) + 1
        };
        Ok(Opened::Live(Box::new(stream), next))
    }

    fn event(&self, ev: &etcd_client::Event) -> Result<Option<WatchEvent>> {
        let Some(kv) = ev.kv() else {
            return Ok(None);
        };
        Ok(match ev.event_type() {
            EventType::Put => entry(&self.etcd, kv)?.map(WatchEvent::Put),
            EventType::Delete => self
                .etcd
                .layout
                .app_key(kv.key())
                .map(|key| -> Result<WatchEvent> {
                    Ok(WatchEvent::Delete {
                        key,
                        version: version(kv.mod_revision())?,
                    })
                })
                .transpose()?,
        })
    }

    /// Forwards events; after a broken stream, reopens from the next
    /// undelivered revision, or ends with Resync if history is gone.
    async fn run(self, mut opened: Opened) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let (mut stream, mut next) = match opened {
                Opened::Compacted(reason) => {
                    let _ = self.tx.send(Ok(WatchEvent::Resync { reason })).await;
                    return;
                }
                Opened::Live(s, n) => (s, n),
            };
            loop {
                tokio::select! {
                    _ = self.tx.closed() => return,
                    msg = stream.message() => match msg {
                        Ok(Some(resp)) => {
                            if resp.compact_revision() > 0 || resp.canceled() {
                                let reason = format!(
                                    "etcd cancelled the watch ({}); compacted through revision {}",
                                    resp.cancel_reason(), resp.compact_revision()
                                );
                                let _ = self.tx.send(Ok(WatchEvent::Resync { reason })).await;
                                return;
                            }
                            for ev in resp.events() {
                                match self.event(ev) {
                                    Ok(Some(e)) => {
                                        next = e.version().map_or(next, |v| v.get() as i64 + 1);
                                        if self.tx.send(Ok(e)).await.is_err() {
                                            return;
                                        }
                                    }
                                    Ok(None) => {}
                                    Err(e) => {
                                        let _ = self.tx.send(Err(e)).await;
                                        return;
                                    }
                                }
                            }
                            backoff = Duration::from_millis(50);
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            // Reconnect from the first revision not yet delivered.
            opened = loop {
                if self.tx.is_closed() {
                    return;
                }
                match self.open(next).await {
                    Ok(o) => break o,
                    Err(e) => {
                        tracing::debug!(error = %e, "etcd watch reconnect failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
            };
        }
    }
}
