//! Records on the KV bucket's stream, read and written with the plain
//! JetStream API so every record can carry headers (the owning session, a
//! line entry's original sequence) and every write can be conditional on
//! the subject's last sequence (`Nats-Expected-Last-Subject-Sequence`).

use crate::error::map_error;
use crate::Nats;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;
use bytes::Bytes;
use dprim::{Error, ErrorKind, Result};
use futures::StreamExt;
use std::time::Duration;
use tokio::time::Instant;

/// Header naming the session an ephemeral record belongs to (hex).
pub(crate) const SESSION_HEADER: &str = "Dprim-Session";
/// Header carrying a line entry's first sequence across rewrites.
pub(crate) const TERM_HEADER: &str = "Dprim-Term";
const OPERATION: &str = "KV-Operation";
const MARKER_REASON: &str = "Nats-Marker-Reason";
/// Set on a message that removed every earlier message of its subject.
pub(crate) const ROLLUP: &str = "Nats-Rollup";
/// How long the markers of removed internal records stay in the bucket.
const INTERNAL_MARKER_TTL: Duration = Duration::from_secs(60);
/// How long a scan waits for its next record before it looks again: a
/// record it was told about may have gone meanwhile.
const SCAN_IDLE: Duration = Duration::from_millis(300);

/// One message of the bucket.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub(crate) subject: String,
    pub(crate) seq: u64,
    pub(crate) payload: Bytes,
    pub(crate) headers: Option<HeaderMap>,
}

impl Record {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.as_ref()?.get(name).map(|v| v.as_str())
    }

    /// A delete or purge marker, or the server's marker of an expired record.
    pub(crate) fn is_deleted(&self) -> bool {
        matches!(self.header(OPERATION), Some("DEL") | Some("PURGE"))
            || self.header(MARKER_REASON).is_some()
    }

    pub(crate) fn session(&self) -> Option<u64> {
        self.header(SESSION_HEADER)
            .and_then(|s| u64::from_str_radix(s, 16).ok())
    }

    /// The sequence the record's line entry was first written at.
    pub(crate) fn first_seq(&self) -> u64 {
        self.header(TERM_HEADER)
            .and_then(|s| s.parse().ok())
            .unwrap_or(self.seq)
    }

    fn from_message(m: &async_nats::jetstream::Message) -> Result<Record> {
        let info = m
            .info()
            .map_err(|e| Error::unexpected(format!("NATS sent a message without metadata: {e}")))?;
        Ok(Record {
            subject: m.subject.to_string(),
            seq: info.stream_sequence,
            payload: m.payload.clone(),
            headers: m.headers.clone(),
        })
    }
}

/// Changes of the subjects matching a filter, from a start point.
pub(crate) struct Follow {
    /// Matching messages at or after the start point when the follow began.
    pub(crate) pending: u64,
    /// Each change with the count of matching messages after it.
    pub(crate) changes: futures::stream::BoxStream<'static, Result<(Record, u64)>>,
}

/// Headers of an owned (ephemeral) record.
pub(crate) fn owned(session: Option<u64>) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(s) = session {
        h.insert(SESSION_HEADER, format!("{s:016x}"));
    }
    h
}

/// The record a read of a subject's last message found; `None` if the
/// subject has none.
fn record_of(
    read: Result<async_nats::jetstream::message::StreamMessage>,
) -> Result<Option<Record>> {
    match read {
        Ok(m) => Ok(Some(Record {
            subject: m.subject.to_string(),
            seq: m.sequence,
            payload: m.payload,
            headers: Some(m.headers),
        })),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a direct get failed because nobody serves direct gets of the
/// stream at this moment: the replicas of a stream just created, or
/// catching up, have not subscribed yet ("no responders"). The stream's
/// leader then answers the same read as a plain message get.
pub(crate) fn nobody_serves_direct_gets(e: &Error) -> bool {
    e.kind() == ErrorKind::Unavailable && e.is_not_applied()
}

impl Nats {
    /// Awaits `f` for at most the request timeout, mapping errors.
    pub(crate) async fn call<T, E, F>(&self, what: &str, f: F) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<T, E>>,
        E: std::error::Error + Send + Sync + 'static,
    {
        match tokio::time::timeout(self.request_timeout, f).await {
            Ok(r) => r.map_err(|e| map_error(what, e)),
            Err(_) => Err(crate::error::timed_out(what, self.request_timeout)),
        }
    }

    /// The last message of `subject`, deleted or not; `None` if there is none.
    pub(crate) async fn last_any(&self, subject: &str) -> Result<Option<Record>> {
        match self
            .call("get", self.kv.direct_get_last_for_subject(subject))
            .await
        {
            // The stream's leader answers the same read.
            Err(e) if nobody_serves_direct_gets(&e) => self.last_any_from_leader(subject).await,
            read => record_of(read),
        }
    }

    /// Like `last_any`, read from the stream's leader. A direct get may be
    /// answered by a replica that trails the leader, so a decision taken on
    /// its answer (the key exists, the key is gone) may have been false
    /// since before the read began; what a conditional write was just
    /// refused for is read here.
    pub(crate) async fn last_any_from_leader(&self, subject: &str) -> Result<Option<Record>> {
        record_of(
            self.call("get", self.kv.get_last_raw_message_by_subject(subject))
                .await,
        )
    }

    /// The live record of `subject`; `None` if missing or deleted.
    pub(crate) async fn last(&self, subject: &str) -> Result<Option<Record>> {
        Ok(self.last_any(subject).await?.filter(|r| !r.is_deleted()))
    }

    /// Publishes a record; with `expect`, only if the subject's last
    /// sequence is exactly that (0: the subject has no message). Returns the
    /// new sequence; a failed expectation is `Conflict`.
    pub(crate) async fn write(
        &self,
        subject: &str,
        payload: Bytes,
        headers: HeaderMap,
        expect: Option<u64>,
    ) -> Result<u64> {
        let mut publish = PublishMessage::build().payload(payload);
        // Without headers the server has none to parse.
        if !headers.is_empty() {
            publish = publish.headers(headers);
        }
        if let Some(seq) = expect {
            publish = publish.expected_last_subject_sequence(seq);
        }
        let ack = self
            .call(
                "publish",
                self.js.send_publish(subject.to_string(), publish),
            )
            .await?;
        Ok(self
            .call("publish", std::future::IntoFuture::into_future(ack))
            .await?
            .sequence)
    }

    /// Writes a delete marker (`KV-Operation: DEL`): the key's history stays.
    pub(crate) async fn delete_marker(&self, subject: &str, expect: Option<u64>) -> Result<u64> {
        let mut h = HeaderMap::new();
        h.insert(OPERATION, "DEL");
        self.write(subject, Bytes::new(), h, expect).await
    }

    /// Removes an internal record and its history, leaving a marker that
    /// itself expires.
    pub(crate) async fn purge(&self, subject: &str, expect: Option<u64>) -> Result<u64> {
        let mut h = HeaderMap::new();
        h.insert(OPERATION, "PURGE");
        h.insert(ROLLUP, "sub");
        h.insert("Nats-TTL", INTERNAL_MARKER_TTL.as_secs().to_string());
        self.write(subject, Bytes::new(), h, expect).await
    }

    /// The stream's last sequence.
    pub(crate) async fn last_seq(&self) -> Result<(u64, u64)> {
        let info = self.call("stream info", self.kv.get_info()).await?;
        Ok((info.state.first_sequence, info.state.last_sequence))
    }

    /// The latest record of every subject matching `filter` (deleted ones
    /// included), in stream order, plus a revision R such that every later
    /// change of a matching subject has a sequence greater than R and every
    /// returned record's sequence is at most R.
    pub(crate) async fn scan(&self, filter: &str) -> Result<(Vec<Record>, u64)> {
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let (_, before) = self.last_seq().await?;
            let consumer = self
                .call(
                    "list",
                    self.kv.create_consumer(OrderedConfig {
                        filter_subject: filter.to_string(),
                        deliver_policy: DeliverPolicy::LastPerSubject,
                        ..Default::default()
                    }),
                )
                .await?;
            let name = consumer.cached_info().name.clone();
            let result = self.drain_scan(consumer, before).await;
            // Delete it now rather than wait for the ordered consumer's 30 s
            // inactivity threshold: clients that list often would otherwise
            // pile up consumers past the server's default limit of 1,000 per
            // stream.
            let kv = self.kv.clone();
            tokio::spawn(async move {
                let _ = kv.delete_consumer(&name).await;
            });
            match result? {
                Some(scanned) => return Ok(scanned),
                // Silence before every record the scan must return came in:
                // a record counted at the start went away before it could
                // be delivered (expired, or rolled up), or the server or
                // this process stalled. Start over, counting only what is
                // there now, rather than return a short list.
                None if Instant::now() < deadline => {}
                None => return Err(crate::error::timed_out("list", self.request_timeout)),
            }
        }
    }

    /// Reads a scan's consumer to the end: `None` if it fell silent before
    /// every record that existed at `before` came in.
    async fn drain_scan(
        &self,
        consumer: async_nats::jetstream::consumer::Consumer<OrderedConfig>,
        before: u64,
    ) -> Result<Option<(Vec<Record>, u64)>> {
        if consumer.cached_info().num_pending == 0 {
            return Ok(Some((Vec::new(), before)));
        }
        let mut messages = self.call("list", consumer.messages()).await?;
        let mut records = Vec::new();
        // The highest sequence received. Records come in sequence order, so
        // once it reaches `before` every record the scan must return is in,
        // and a silence ends the scan.
        let mut seen = 0;
        loop {
            let m = match tokio::time::timeout(SCAN_IDLE, messages.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(map_error("list", e)),
                Ok(None) | Err(_) if seen >= before => break,
                Ok(None) | Err(_) => return Ok(None),
            };
            let pending = m.info().map(|i| i.pending).unwrap_or(0);
            let record = Record::from_message(&m)?;
            seen = seen.max(record.seq);
            records.push(record);
            if pending == 0 {
                break;
            }
        }
        Ok(Some((records, seen.max(before))))
    }

    /// The live latest records matching `filter`.
    pub(crate) async fn scan_live(&self, filter: &str) -> Result<(Vec<Record>, u64)> {
        let (records, rev) = self.scan(filter).await?;
        Ok((
            records.into_iter().filter(|r| !r.is_deleted()).collect(),
            rev,
        ))
    }

    /// Follows every change of subjects matching `filter`, from sequence
    /// `from` (inclusive) or, with `None`, from now on. Each record comes
    /// with the server's count of matching messages after it.
    pub(crate) async fn follow(&self, filter: &str, from: Option<u64>) -> Result<Follow> {
        let deliver_policy = match from {
            Some(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
            None => DeliverPolicy::New,
        };
        let consumer = self
            .call(
                "watch",
                self.kv.create_consumer(OrderedConfig {
                    filter_subject: filter.to_string(),
                    deliver_policy,
                    ..Default::default()
                }),
            )
            .await?;
        let pending = consumer.cached_info().num_pending;
        let messages = self.call("watch", consumer.messages()).await?;
        Ok(Follow {
            pending,
            changes: Box::pin(messages.map(|m| match m {
                Ok(m) => {
                    let pending = m.info().map(|i| i.pending).unwrap_or(u64::MAX);
                    Record::from_message(&m).map(|r| (r, pending))
                }
                Err(e) => Err(map_error("watch", e)),
            })),
        })
    }

    /// Whether `subject` still holds every message it got after sequence
    /// `after`, judged from what the bucket holds now.
    ///
    /// The bucket removes a subject's messages only oldest first: by the
    /// per-subject limit (`HISTORY`), which leaves the subject full, or by a
    /// rollup (never used on app keys by dprim), whose marker stays as the
    /// subject's oldest message. So history after `after` is intact when the
    /// subject's oldest message is at or before `after`, or when the subject
    /// holds fewer than `HISTORY` messages and its oldest is no rollup. A
    /// full subject whose oldest message is newer than `after` may have
    /// lost some (or may have had exactly `HISTORY` changes since): `false`.
    pub(crate) async fn history_intact(&self, subject: &str, after: u64) -> Result<bool> {
        let read = match self
            .call("watch", self.kv.direct_get_first_for_subject(subject))
            .await
        {
            Err(e) if nobody_serves_direct_gets(&e) => {
                self.call(
                    "watch",
                    self.kv.get_first_raw_message_by_subject(subject, 1),
                )
                .await
            }
            read => read,
        };
        let oldest = match read {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(e),
        };
        if oldest.sequence <= after {
            return Ok(true);
        }
        if oldest.headers.get(ROLLUP).is_some() {
            return Ok(false);
        }
        let mut counts = self
            .call("watch", self.kv.info_with_subjects(subject))
            .await?;
        while let Some(item) = counts.next().await {
            let (s, count) = item.map_err(|e| map_error("watch", e))?;
            if s == subject {
                return Ok((count as i64) < crate::HISTORY);
            }
        }
        Ok(true)
    }

    /// The subjects matching `filter` that hold `HISTORY` messages (the
    /// only ones the per-subject limit can have trimmed).
    pub(crate) async fn full_subjects(&self, filter: &str) -> Result<Vec<String>> {
        let mut counts = self
            .call("watch", self.kv.info_with_subjects(filter))
            .await?;
        let mut full = Vec::new();
        while let Some(item) = counts.next().await {
            let (s, count) = item.map_err(|e| map_error("watch", e))?;
            if count as i64 >= crate::HISTORY {
                full.push(s);
            }
        }
        Ok(full)
    }

    /// Waits until `subject` gets a deleted record at or after `from`, the
    /// watch breaks (the caller then looks again).
    pub(crate) async fn wait_deleted(&self, subject: &str, from: u64) -> Result<()> {
        let mut changes = self.follow(subject, Some(from)).await?.changes;
        while let Some(r) = changes.next().await {
            match r {
                Ok((r, _)) if r.is_deleted() => return Ok(()),
                Ok(_) => {}
                Err(_) => return Ok(()),
            }
        }
        Ok(())
    }

    /// Writes a record owned by `session`: refused with `SessionLost` when the
    /// session's heartbeat is gone; indexed so the session's end removes it.
    pub(crate) async fn write_owned(
        &self,
        subject: &str,
        payload: Bytes,
        mut headers: HeaderMap,
        expect: Option<u64>,
        session: u64,
    ) -> Result<u64> {
        self.require_session(session).await?;
        let index = self.layout.index_entry(session, subject);
        self.write(
            &index,
            Bytes::from(subject.to_string()),
            HeaderMap::new(),
            None,
        )
        .await?;
        headers.insert(SESSION_HEADER, format!("{session:016x}"));
        let seq = self.write(subject, payload, headers, expect).await?;
        // The session may have ended between the check and the write, after
        // its cleanup ran: then remove the record ourselves.
        if let Err(e) = self.require_session(session).await {
            let _ = self.delete_marker(subject, Some(seq)).await;
            return Err(e);
        }
        Ok(seq)
    }

    /// `SessionLost` unless the session's heartbeat is present.
    pub(crate) async fn require_session(&self, session: u64) -> Result<()> {
        match self.last(&self.layout.heartbeat(session)).await? {
            Some(_) => Ok(()),
            None => Err(Error::session_lost(format!(
                "session {session:016x} is closed or expired"
            ))),
        }
    }

    /// Removes every record a session owns (its ephemeral keys and line
    /// entries, and gives back the queue deliveries it holds), each only if
    /// the session still owns it.
    pub(crate) async fn cleanup_session(&self, session: u64) -> Result<()> {
        let (index, _) = self.scan_live(&self.layout.index_of(session)).await?;
        for entry in index {
            let Ok(subject) = std::str::from_utf8(&entry.payload) else {
                continue;
            };
            if let Some(r) = self.last(subject).await? {
                if r.session() == Some(session) {
                    let removed = if self.layout.is_queue_claim(subject) {
                        // A delivery held by the session goes back at once.
                        crate::queue::release_claim(self, subject, &r).await
                    } else if self.layout.app_key(subject).is_some() {
                        self.delete_marker(subject, Some(r.seq)).await.map(drop)
                    } else {
                        self.purge(subject, Some(r.seq)).await.map(drop)
                    };
                    match removed {
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::Conflict => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            self.purge(&entry.subject, None).await?;
        }
        Ok(())
    }
}
