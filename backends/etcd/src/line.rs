//! The waiting line behind locks and elections: each participant puts a
//! unique key under the line's prefix, attached to its session's lease; the
//! key's create revision is its place in line (and its fencing token or
//! term, since etcd revisions only grow). A participant waits for the
//! deletion of the key just ahead of it only, so a release wakes exactly one
//! waiter (no herd), and a waiter that leaves never lets anyone jump the
//! holder (its successor then waits on the key ahead of it).

use crate::Etcd;
use dprim::retry::RetryPolicy;
use dprim::{Error, Result, Session};
use etcd_client::{EventType, GetOptions, KeyValue, SortOrder, SortTarget, WatchOptions};
use std::time::Duration;
use tokio::time::Instant;

use crate::layout::prefix_end;

/// One place in a line.
pub(crate) struct Place {
    pub(crate) key: Vec<u8>,
    pub(crate) revision: i64,
}

#[derive(Clone)]
pub(crate) struct Line {
    etcd: Etcd,
    prefix: Vec<u8>,
}

impl Line {
    pub(crate) fn new(etcd: Etcd, prefix: Vec<u8>) -> Line {
        Line { etcd, prefix }
    }

    /// Joins the end of the line, as a key of `session`'s lease.
    pub(crate) async fn join(&self, session: &Session, value: Vec<u8>) -> Result<Place> {
        session.check()?;
        self.join_on_lease(session.id().0 as i64, value).await
    }

    /// Joins the end of the line, as a key of `lease`.
    pub(crate) async fn join_on_lease(&self, lease: i64, value: Vec<u8>) -> Result<Place> {
        let mut key = self.prefix.clone();
        key.extend_from_slice(format!("{lease:016x}-{:016x}", rand::random::<u64>()).as_bytes());
        let options = etcd_client::PutOptions::new().with_lease(lease);
        let joining = LeaveOnDrop::joining(
            self.clone(),
            Place {
                key: key.clone(),
                revision: 0,
            },
        );
        let resp = match self
            .etcd
            .call("put", self.etcd.kv().put(key.clone(), value, Some(options)))
            .await
        {
            Ok(resp) => resp,
            Err(e) => {
                // A place put with its answer lost would stand in line for
                // as long as the session lives, in front of this very
                // caller when it tries again.
                if e.may_have_applied() {
                    if let Err(gone) = self.remove(&key).await {
                        tracing::warn!(error = %gone, "removing a place whose join failed; the session's lease will clear it");
                    }
                }
                joining.keep();
                return Err(e);
            }
        };
        joining.keep();
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok(Place { key, revision })
    }

    /// Leaves the line (or releases the head position).
    pub(crate) async fn leave(&self, place: &Place) -> Result<()> {
        self.remove(&place.key).await
    }

    /// Deletes a place of this client's, retrying temporary failures: a
    /// place left behind blocks everyone behind it for as long as its
    /// session lives, and deleting it twice is harmless.
    async fn remove(&self, key: &[u8]) -> Result<()> {
        RetryPolicy::default()
            .run(|| async {
                self.etcd
                    .call("delete", self.etcd.kv().delete(key.to_vec(), None))
                    .await
                    .map(|_| ())
            })
            .await
    }

    /// The newest `limit` places created at or before `max_create_revision`,
    /// newest first, and the revision of that read.
    async fn newest(
        &self,
        max_create_revision: i64,
        limit: usize,
        keys_only: bool,
    ) -> Result<(Vec<KeyValue>, i64)> {
        let mut options = GetOptions::new()
            .with_range(prefix_end(&self.prefix))
            .with_max_create_revision(max_create_revision)
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(limit as i64);
        if keys_only {
            options = options.with_keys_only();
        }
        let mut resp = self
            .etcd
            .call(
                "get",
                self.etcd.kv().get(self.prefix.clone(), Some(options)),
            )
            .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        Ok((resp.take_kvs(), rev))
    }

    /// The key just ahead of `place`, if any, and the revision of that read.
    async fn ahead(&self, place: &Place) -> Result<(Option<KeyValue>, i64)> {
        let (newest, rev) = self.newest(place.revision - 1, 1, false).await?;
        Ok((newest.into_iter().next(), rev))
    }

    /// The (at most) `count` keys just ahead of `place`, nearest last, and
    /// the revision of that read; `None` if `place` is no longer in line
    /// (its lease expired).
    pub(crate) async fn nearest_ahead(
        &self,
        place: &Place,
        count: usize,
    ) -> Result<Option<(Vec<Vec<u8>>, i64)>> {
        // `place` itself comes first, if it is still there.
        let (newest, rev) = self.newest(place.revision, count + 1, true).await?;
        let mut keys = newest.into_iter();
        match keys.next() {
            Some(own) if own.key() == place.key.as_slice() => {}
            _ => return Ok(None),
        }
        let mut ahead: Vec<Vec<u8>> = keys.map(|kv| kv.key().to_vec()).collect();
        ahead.reverse();
        Ok(Some((ahead, rev)))
    }

    /// Resolves once one of `keys` is deleted at or after `from` (or a
    /// watch breaks, in which case the caller simply looks again).
    pub(crate) async fn wait_any_deleted(&self, keys: &[Vec<u8>], from: i64) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let waits = keys.iter().map(|k| Box::pin(self.wait_deleted(k, from)));
        futures::future::select_all(waits).await.0
    }

    /// Whether `place` is still in line (its lease may have expired).
    async fn present(&self, place: &Place) -> Result<bool> {
        let resp = self
            .etcd
            .call(
                "get",
                self.etcd
                    .kv()
                    .get(place.key.clone(), Some(GetOptions::new().with_count_only())),
            )
            .await?;
        Ok(resp.count() > 0)
    }

    /// Whether `place` is at the head now.
    pub(crate) async fn at_head(&self, place: &Place) -> Result<bool> {
        Ok(self.ahead(place).await?.0.is_none())
    }

    /// Waits until `place` is at the head of the line, the session is lost,
    /// or `deadline` passes.
    pub(crate) async fn wait_for_head(
        &self,
        place: &Place,
        session: &Session,
        deadline: Option<Instant>,
        what: &str,
    ) -> Result<()> {
        loop {
            session.check()?;
            let (ahead, read_rev) = self.ahead(place).await?;
            let Some(ahead) = ahead else {
                if !self.present(place).await? {
                    return Err(Error::session_lost(format!(
                        "session {} ended while waiting for {what}",
                        session.id()
                    )));
                }
                return Ok(());
            };
            let gone = self.wait_deleted(ahead.key(), read_rev + 1);
            tokio::select! {
                r = gone => r?,
                e = session.lost() => return Err(session.check().err().unwrap_or(e)),
                _ = sleep_until(deadline) => {
                    return Err(Error::timeout(format!("{what} not granted in time")));
                }
            }
        }
    }

    /// Resolves once `key` is deleted at or after `from` (or the watch breaks,
    /// in which case the caller simply looks again).
    async fn wait_deleted(&self, key: &[u8], from: i64) -> Result<()> {
        let mut client = self.etcd.client.watch_client();
        let options = WatchOptions::new().with_start_revision(from);
        let mut stream = self
            .etcd
            .call("watch", client.watch(key.to_vec(), Some(options)))
            .await?;
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() || resp.compact_revision() > 0 {
                        return Ok(());
                    }
                    if resp
                        .events()
                        .iter()
                        .any(|e| e.event_type() == EventType::Delete)
                    {
                        return Ok(());
                    }
                }
                Ok(None) | Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return Ok(());
                }
            }
        }
    }

    /// The head of the line, if anyone is in it.
    pub(crate) async fn head(&self) -> Result<(Option<KeyValue>, i64)> {
        let options = GetOptions::new()
            .with_range(prefix_end(&self.prefix))
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let resp = self
            .etcd
            .call(
                "get",
                self.etcd.kv().get(self.prefix.clone(), Some(options)),
            )
            .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        Ok((resp.kvs().first().cloned(), rev))
    }

    /// A watch on the whole line from `from` (for observers).
    pub(crate) async fn watch_all(&self, from: i64) -> Result<etcd_client::WatchStream> {
        let mut client = self.etcd.client.watch_client();
        let options = WatchOptions::new()
            .with_range(prefix_end(&self.prefix))
            .with_start_revision(from);
        self.etcd
            .call("watch", client.watch(self.prefix.clone(), Some(options)))
            .await
    }

    pub(crate) fn etcd(&self) -> &Etcd {
        &self.etcd
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// How long after removing the place of a cancelled join it is removed
/// once more: the server may apply a put it had already received after a
/// delete sent later on another stream of the connection.
const REMOVE_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// Leaves the line in the background unless told the place was kept, so a
/// timed-out, cancelled or failed waiter never blocks the line.
pub(crate) struct LeaveOnDrop {
    line: Line,
    place: Option<Place>,
    /// For a place whose join may still be on its way: leave once more
    /// this long after the first time.
    again_after: Option<Duration>,
}

impl LeaveOnDrop {
    pub(crate) fn new(line: Line, place: Place) -> LeaveOnDrop {
        LeaveOnDrop {
            line,
            place: Some(place),
            again_after: None,
        }
    }

    /// Guards a join on its way: dropped before [`LeaveOnDrop::keep`] (a
    /// campaign or lock request cancelled), it removes the place the join
    /// may have made, which nobody would ever leave otherwise.
    fn joining(line: Line, place: Place) -> LeaveOnDrop {
        LeaveOnDrop {
            line,
            place: Some(place),
            again_after: Some(REMOVE_AGAIN_AFTER),
        }
    }

    pub(crate) fn place(&self) -> Option<&Place> {
        self.place.as_ref()
    }

    /// Keeps the place (it is now held by a guard or leadership).
    pub(crate) fn keep(mut self) -> Place {
        self.place.take().unwrap_or(Place {
            key: Vec::new(),
            revision: 0,
        })
    }
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        if let Some(place) = self.place.take() {
            let line = self.line.clone();
            let again_after = self.again_after;
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    let passes = [Some(Duration::ZERO), again_after];
                    for pause in passes.into_iter().flatten() {
                        tokio::time::sleep(pause).await;
                        if let Err(e) = line.leave(&place).await {
                            tracing::warn!(error = %e, "leaving an etcd line failed; the session's lease will clear it");
                            return;
                        }
                    }
                });
            }
        }
    }
}
