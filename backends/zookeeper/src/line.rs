//! The waiting line behind locks and elections: each participant creates an
//! ephemeral-sequential znode under the line's directory through its own
//! session's connection; the sequence number is its place in line and the
//! znode's czxid its fencing token or term (zxids only grow, even if the
//! directory is deleted and recreated, unlike per-parent sequence
//! counters). A participant watches only the znode just ahead of it, so a
//! release wakes exactly one waiter (no herd), and a waiter that leaves
//! never lets anyone jump the holder (its successor then watches the znode
//! ahead of it). Before reporting itself at the head, a participant checks
//! that its znode still exists and is owned by its session (a holder whose
//! session was replaced must not act on a stale view).

use crate::layout::sequence;
use crate::Zk;
use dprim::retry::RetryPolicy;
use dprim::{Error, ErrorKind, Result, Session};
use std::time::Duration;
use tokio::time::Instant;
use zookeeper_client::{Client, CreateMode, Stat};

/// One place in a line.
#[derive(Clone)]
pub(crate) struct Place {
    pub(crate) path: String,
    pub(crate) seq: i64,
    pub(crate) czxid: i64,
    pub(crate) owner: i64,
}

#[derive(Clone)]
pub(crate) struct Line {
    zk: Zk,
    dir: String,
}

impl Line {
    pub(crate) fn new(zk: Zk, dir: String) -> Line {
        Line { zk, dir }
    }

    pub(crate) fn zk(&self) -> &Zk {
        &self.zk
    }

    pub(crate) fn dir(&self) -> &str {
        &self.dir
    }

    /// Joins the end of the line, as a node of `session`.
    pub(crate) async fn join(&self, session: &Session, value: &[u8]) -> Result<Place> {
        let client = self.zk.session_client(session)?;
        self.join_through(client, session.id().0 as i64, value)
            .await
    }

    /// Joins the end of the line as a node of the session of `client`,
    /// whose id is `owner`.
    pub(crate) async fn join_through(
        &self,
        client: Client,
        owner: i64,
        value: &[u8],
    ) -> Result<Place> {
        let options = self.zk.options(CreateMode::EphemeralSequential);
        // ZooKeeper names the node: the random part lets this client find
        // it again if the create's answer is lost.
        let prefix = format!("{}/n-{:016x}-", self.dir, rand::random::<u64>());
        let mut joining = Joining {
            line: self.clone(),
            client: client.clone(),
            prefix: Some(prefix.clone()),
        };
        for _ in 0..3 {
            match self
                .zk
                .call("create", client.create(&prefix, value, &options))
                .await
            {
                Ok((stat, seq)) => {
                    joining.prefix = None;
                    return Ok(Place {
                        path: format!("{prefix}{seq}"),
                        seq: seq.into_i64(),
                        czxid: stat.czxid,
                        owner,
                    });
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    let main = self.zk.client().await?;
                    self.zk.mkdirs(&main, &self.dir).await?;
                }
                Err(e) => {
                    // A node created with its answer lost would stand in
                    // line for as long as the session lives, in front of
                    // this very caller when it tries again.
                    if e.may_have_applied() {
                        if let Err(gone) = self.remove_created(&client, &prefix).await {
                            tracing::warn!(error = %gone, "removing a place whose join failed; the session's end will clear it");
                        }
                    }
                    joining.prefix = None;
                    return Err(e);
                }
            }
        }
        Err(Error::unexpected(format!(
            "could not create the line directory {}",
            self.dir
        )))
    }

    /// Leaves the line (or releases the head position), retrying
    /// temporary failures: a place left behind blocks everyone behind it
    /// for as long as its session lives, and deleting it twice is harmless.
    pub(crate) async fn leave(&self, place: &Place) -> Result<()> {
        RetryPolicy::default()
            .run(|| self.delete(&place.path))
            .await
    }

    async fn delete(&self, path: &str) -> Result<()> {
        let client = self.zk.client().await?;
        match self.zk.call("delete", client.delete(path, None)).await {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes the node a create under `prefix` through `client` may have
    /// made. The listing goes through that same client: ZooKeeper answers a
    /// client's requests in order, so it sees the create if it was applied.
    async fn remove_created(&self, client: &Client, prefix: &str) -> Result<()> {
        let name = prefix.rsplit('/').next().unwrap_or_default().to_string();
        RetryPolicy::default()
            .run(|| async {
                let children = match self.zk.call("list", client.list_children(&self.dir)).await {
                    Ok(c) => c,
                    Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
                    Err(e) => return Err(e),
                };
                for child in children.iter().filter(|c| c.starts_with(&name)) {
                    self.delete(&format!("{}/{child}", self.dir)).await?;
                }
                Ok(())
            })
            .await
    }

    /// Everyone in line, in order: (sequence, path).
    async fn members(&self) -> Result<Vec<(i64, String)>> {
        let client = self.zk.client().await?;
        let children = match self.zk.call("list", client.list_children(&self.dir)).await {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut members: Vec<(i64, String)> = children
            .into_iter()
            .filter_map(|c| sequence(&c).map(|s| (s, format!("{}/{c}", self.dir))))
            .collect();
        members.sort();
        Ok(members)
    }

    /// The znode just ahead of `place`, if any.
    async fn ahead(&self, place: &Place) -> Result<Option<String>> {
        Ok(self
            .members()
            .await?
            .into_iter()
            .rfind(|(s, _)| *s < place.seq)
            .map(|(_, p)| p))
    }

    /// The (at most) `count` places just ahead of `place`, nearest last;
    /// `None` if `place` is no longer in line (its session ended).
    pub(crate) async fn nearest_ahead(
        &self,
        place: &Place,
        count: usize,
    ) -> Result<Option<Vec<String>>> {
        let members = self.members().await?;
        let Some(at) = members.iter().position(|(s, _)| *s == place.seq) else {
            return Ok(None);
        };
        Ok(Some(
            members[at.saturating_sub(count)..at]
                .iter()
                .map(|(_, p)| p.clone())
                .collect(),
        ))
    }

    /// Whether `place` still exists and belongs to its session.
    async fn owned(&self, place: &Place) -> Result<bool> {
        let client = self.zk.client().await?;
        Ok(
            match self
                .zk
                .call("exists", client.check_stat(&place.path))
                .await?
            {
                Some(s) => s.ephemeral_owner == place.owner && s.czxid == place.czxid,
                None => false,
            },
        )
    }

    /// Whether `place` is at the head now.
    pub(crate) async fn at_head(&self, place: &Place) -> Result<bool> {
        Ok(self.ahead(place).await?.is_none() && self.owned(place).await?)
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
            let Some(ahead) = self.ahead(place).await? else {
                if !self.owned(place).await? {
                    return Err(Error::session_lost(format!(
                        "session {} ended while waiting for {what}",
                        session.id()
                    )));
                }
                return Ok(());
            };
            let client = self.zk.client().await?;
            let (stat, watcher) = match self
                .zk
                .call("exists", client.check_and_watch_stat(&ahead))
                .await
            {
                Ok(r) => r,
                Err(e) if e.is_temporary() => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if stat.is_none() {
                continue;
            }
            tokio::select! {
                _ = watcher.changed() => {}
                e = session.lost() => return Err(session.check().err().unwrap_or(e)),
                _ = sleep_until(deadline) => {
                    return Err(Error::timeout(format!("{what} not granted in time")));
                }
            }
        }
    }

    /// The head of the line, if anyone is in it: its data and stat.
    pub(crate) async fn head(&self) -> Result<Option<(Vec<u8>, Stat)>> {
        let client = self.zk.client().await?;
        for (_, path) in self.members().await? {
            match self.zk.call("get", client.get_data(&path)).await {
                Ok(r) => return Ok(Some(r)),
                // Left between the listing and the read: the next is the head.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Removes, in the background, the place a join may have created when the
/// join is dropped before it returns (a campaign or lock request cancelled
/// while its create was on its way): nobody would ever leave that place,
/// and it would stand in line for as long as its session lives.
struct Joining {
    line: Line,
    client: Client,
    /// `None` once the join returned.
    prefix: Option<String>,
}

impl Drop for Joining {
    fn drop(&mut self) {
        let Some(prefix) = self.prefix.take() else {
            return;
        };
        let (line, client) = (self.line.clone(), self.client.clone());
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                if let Err(e) = line.remove_created(&client, &prefix).await {
                    tracing::warn!(error = %e, "removing the place of a cancelled join failed; the session's end will clear it");
                }
            });
        }
    }
}

/// Leaves the line in the background unless told the place was kept, so a
/// timed-out, cancelled or failed waiter never blocks the line.
pub(crate) struct LeaveOnDrop {
    line: Line,
    place: Option<Place>,
}

impl LeaveOnDrop {
    pub(crate) fn new(line: Line, place: Place) -> LeaveOnDrop {
        LeaveOnDrop {
            line,
            place: Some(place),
        }
    }

    pub(crate) fn place(&self) -> Option<&Place> {
        self.place.as_ref()
    }

    /// Keeps the place (it is now held by a guard or leadership).
    pub(crate) fn keep(mut self) -> Option<Place> {
        self.place.take()
    }
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        if let Some(place) = self.place.take() {
            let line = self.line.clone();
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    if let Err(e) = line.leave(&place).await {
                        tracing::warn!(error = %e, "leaving a zookeeper line failed; the session's end will clear it");
                    }
                });
            }
        }
    }
}
