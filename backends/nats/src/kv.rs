//! Kv on the JetStream KV bucket: the stream sequence of a key's last
//! message is its version; create, CAS and conditional delete are publishes
//! with an expected last subject sequence; list and watch are ordered
//! consumers (last-per-subject, or from a start sequence). Delete markers
//! stay in the bucket (history) but are never shown as values.

use crate::store::{owned, Record, ROLLUP};
use crate::{Nats, HISTORY};
use async_trait::async_trait;
use dprim::{
    Depth, Entry, Error, ErrorKind, Key, Kv, Listing, Precondition, PutOptions, Result, SessionId,
    Txn, TxnResult, Value, Version, WatchEvent, WatchStart, WatchStream, WatchTarget,
};
use futures::StreamExt;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

pub(crate) struct NatsKv {
    nats: Nats,
}

impl NatsKv {
    pub(crate) fn new(nats: Nats) -> NatsKv {
        NatsKv { nats }
    }
}

fn version(seq: u64) -> Result<Version> {
    Version::new(seq).ok_or_else(|| Error::unexpected("NATS returned sequence 0"))
}

fn entry(nats: &Nats, r: &Record) -> Result<Option<Entry>> {
    let Some(key) = nats.layout.app_key(&r.subject) else {
        return Ok(None);
    };
    let value = Value::new(r.payload.to_vec()).map_err(|e| {
        Error::unexpected(format!(
            "key `{key}` holds a value written outside dprim: {}",
            e.message()
        ))
    })?;
    Ok(Some(Entry {
        key,
        value,
        version: version(r.seq)?,
        session: r.session().map(SessionId),
    }))
}

#[async_trait]
impl Kv for NatsKv {
    async fn get(&self, key: &Key) -> Result<Option<Entry>> {
        match self.nats.last(&self.nats.layout.kv_key(key)).await? {
            Some(r) => entry(&self.nats, &r),
            None => Ok(None),
        }
    }

    async fn put_with(&self, key: &Key, value: Value, options: PutOptions) -> Result<Version> {
        if key.is_root() {
            return Err(Error::invalid("cannot write the namespace root"));
        }
        let subject = self.nats.layout.kv_key(key);
        let payload = value.into_shared();
        let session = options.session.map(|s| s.0);
        let nats = &self.nats;
        let write = |expect: Option<u64>| {
            let (subject, payload) = (&subject, payload.clone());
            async move {
                match session {
                    Some(s) => {
                        nats.write_owned(subject, payload, owned(None), expect, s)
                            .await
                    }
                    None => nats.write(subject, payload, owned(None), expect).await,
                }
            }
        };
        let seq = match options.precondition {
            Precondition::None => write(None).await?,
            Precondition::Version(v) => write(Some(v.get())).await.map_err(|e| {
                if e.kind() == ErrorKind::Conflict {
                    Error::conflict(format!(
                        "key `{key}` does not exist with the expected version {v}"
                    ))
                    .with_context("key", key)
                } else {
                    e
                }
            })?,
            Precondition::Absent => {
                // A delete marker counts as absent: expect its sequence.
                let mut expect = 0;
                loop {
                    match write(Some(expect)).await {
                        Ok(seq) => break seq,
                        Err(e) if e.kind() == ErrorKind::Conflict => {
                            match self.nats.last_any_from_leader(&subject).await? {
                                Some(r) if r.is_deleted() && r.seq != expect => expect = r.seq,
                                None if expect != 0 => expect = 0,
                                Some(r) if !r.is_deleted() => {
                                    return Err(Error::already_exists(format!(
                                        "key `{key}` already exists (version {})",
                                        r.seq
                                    ))
                                    .with_context("key", key))
                                }
                                _ => {
                                    return Err(Error::already_exists(format!(
                                        "key `{key}` was created concurrently"
                                    ))
                                    .with_context("key", key))
                                }
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        };
        version(seq)
    }

    async fn delete_with(&self, key: &Key, precondition: Precondition) -> Result<bool> {
        let subject = self.nats.layout.kv_key(key);
        match precondition {
            Precondition::Absent => Err(Error::invalid(
                "a delete cannot require the key to be absent; use Precondition::None or Version",
            )),
            Precondition::Version(v) => {
                // The client has no conditional delete: publish the marker
                // with an expected last subject sequence.
                match self.nats.delete_marker(&subject, Some(v.get())).await {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == ErrorKind::Conflict => Err(Error::conflict(format!(
                        "key `{key}` does not exist with the expected version {v}"
                    ))
                    .with_context("key", key)),
                    Err(e) => Err(e),
                }
            }
            Precondition::None => loop {
                // From the leader: "nothing to delete" must be true now.
                let current = self.nats.last_any_from_leader(&subject).await?;
                let Some(current) = current.filter(|r| !r.is_deleted()) else {
                    return Ok(false);
                };
                match self.nats.delete_marker(&subject, Some(current.seq)).await {
                    Ok(_) => return Ok(true),
                    // Changed under us: look again.
                    Err(e) if e.kind() == ErrorKind::Conflict => continue,
                    Err(e) => return Err(e),
                }
            },
        }
    }

    async fn list(&self, dir: &Key, depth: Depth) -> Result<Listing> {
        let filter = self
            .nats
            .layout
            .kv_dir_filter(dir, depth == Depth::Recursive);
        let (records, revision) = self.nats.scan_live(&filter).await?;
        let mut entries = Vec::with_capacity(records.len());
        for r in &records {
            if let Some(e) = entry(&self.nats, r)? {
                entries.push(e);
            }
        }
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Listing {
            entries,
            revision: version(revision)?,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        txn.validate()?;
        Err(Error::unsupported(
            "the nats backend has no atomic multi-key transactions (capability kv.transactions is false)",
        ))
    }

    async fn watch(&self, target: WatchTarget, start: WatchStart) -> Result<WatchStream> {
        let filter = match &target {
            WatchTarget::Key(k) => self.nats.layout.kv_key(k),
            WatchTarget::Dir(d) => self.nats.layout.kv_dir_filter(d, true),
        };
        let resync_now = |reason: String| {
            Ok(WatchStream::new(
                futures::stream::iter([Ok(WatchEvent::Resync { reason })]).boxed(),
            ))
        };
        let from = match start {
            WatchStart::Now => None,
            WatchStart::After(v) => {
                let (first, _) = self.nats.last_seq().await?;
                if first > v.get() + 1 {
                    return resync_now(format!(
                        "the bucket no longer holds changes after version {v} (its oldest is {first}); re-list and watch from the listing's revision"
                    ));
                }
                Some(v.get() + 1)
            }
        };
        // Connections made so far: a reconnect may lose changes in transit
        // (the ordered consumer then recreates itself, but one lost with
        // the connection was seen to go missing with no gap reported), so
        // the watch cannot prove continuity across one.
        let stats = self.nats.client.statistics();
        let connects = stats.connects.load(Ordering::SeqCst);
        // The consumer exists before `watch` returns, so every later change
        // is covered.
        let follow = self.nats.follow(&filter, from).await?;
        if let Some(from) = from {
            // A key keeps HISTORY revisions: one whose changes after the
            // start point were trimmed holds HISTORY messages after it, so
            // fewer pending messages prove nothing was trimmed. Otherwise
            // look at every full key under the filter.
            if follow.pending >= HISTORY as u64 {
                for subject in self.nats.full_subjects(&filter).await? {
                    if !self.nats.history_intact(&subject, from - 1).await? {
                        let key = self
                            .nats
                            .layout
                            .app_key(&subject)
                            .map_or(subject.clone(), |k| k.to_string());
                        return resync_now(format!(
                            "key `{key}` changed more than {HISTORY} times after version {}, and the bucket keeps only its last {HISTORY} changes; re-list and watch from the listing's revision",
                            from - 1
                        ));
                    }
                }
            }
        }
        let mut changes = follow.changes;
        let (tx, rx) = mpsc::channel(256);
        let nats = self.nats.clone();
        tokio::spawn(async move {
            // A change lost with the connection leaves nothing to deliver:
            // a reconnect must end the watch even if no change follows it.
            let mut check = tokio::time::interval(crate::RECONNECT_CHECK);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let item = tokio::select! {
                    _ = tx.closed() => return,
                    item = changes.next() => Some(item),
                    _ = check.tick() => None,
                };
                let reconnected = stats.connects.load(Ordering::SeqCst) != connects;
                let Some(item) = item else {
                    if reconnected {
                        let _ = tx
                            .send(Ok(WatchEvent::Resync {
                                reason: RECONNECTED.into(),
                            }))
                            .await;
                        return;
                    }
                    continue;
                };
                let event = match item {
                    Some(Ok(_)) if reconnected => Ok(WatchEvent::Resync {
                        reason: RECONNECTED.into(),
                    }),
                    Some(Ok((r, pending))) => match trimmed_before(&nats, &r, pending).await {
                        Ok(false) => match event(&nats, &r) {
                            Ok(Some(e)) => Ok(e),
                            Ok(None) => continue,
                            Err(e) => Err(e),
                        },
                        Ok(true) => Ok(WatchEvent::Resync {
                            reason: format!(
                                "the watch fell more than {HISTORY} changes of one key behind and the bucket trimmed some of them; re-list and watch again"
                            ),
                        }),
                        Err(e) => Ok(WatchEvent::Resync {
                            reason: format!(
                                "the NATS watch could not check its history ({e}); re-list and watch again"
                            ),
                        }),
                    },
                    Some(Err(e)) => Ok(WatchEvent::Resync {
                        reason: format!("the NATS watch broke ({e}); re-list and watch again"),
                    }),
                    None => Ok(WatchEvent::Resync {
                        reason: "the NATS watch ended; re-list and watch again".into(),
                    }),
                };
                let end = !matches!(
                    event,
                    Ok(WatchEvent::Put(_)) | Ok(WatchEvent::Delete { .. })
                );
                if tx.send(event).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(WatchStream::new(receiver(rx).boxed()))
    }
}

/// Why a watch ends when its client reconnected.
const RECONNECTED: &str = "the connection to NATS was re-established and changes may have been lost with it; re-list and watch again";

/// Whether changes of `r`'s key that the watch owes may have been trimmed
/// just before `r` was delivered (so `r` must not be delivered after the
/// gap).
///
/// The consumer delivers in stream order. If a change of the key older than
/// `r` was trimmed before the consumer reached it, the key had HISTORY newer
/// changes then, all of them at or after `r` (none between was delivered),
/// so at least HISTORY - 1 matching messages were pending after `r`. The
/// server's pending count needs only to be in the right range to skip the
/// exact check: it is trusted below half of that, with a wide margin.
/// The exact check (`history_intact`) then asks the bucket.
async fn trimmed_before(nats: &Nats, r: &Record, pending: u64) -> Result<bool> {
    if r.header(ROLLUP).is_some() && nats.layout.app_key(&r.subject).is_some() {
        // A rollup (never written by dprim on app keys) removed the key's
        // earlier changes, which the watch may not have seen.
        return Ok(true);
    }
    if pending.saturating_add(1) < HISTORY as u64 / 2 {
        return Ok(false);
    }
    Ok(!nats.history_intact(&r.subject, r.seq - 1).await?)
}

fn event(nats: &Nats, r: &Record) -> Result<Option<WatchEvent>> {
    if r.is_deleted() {
        return match nats.layout.app_key(&r.subject) {
            Some(key) => Ok(Some(WatchEvent::Delete {
                key,
                version: version(r.seq)?,
            })),
            None => Ok(None),
        };
    }
    Ok(entry(nats, r)?.map(WatchEvent::Put))
}

fn receiver(
    mut rx: mpsc::Receiver<Result<WatchEvent>>,
) -> impl futures::Stream<Item = Result<WatchEvent>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
