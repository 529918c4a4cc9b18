//! Queues on znodes.
//!
//! Messages live in buckets: a message is a persistent-sequential znode
//! `!m/b-<k>/m-<seq>`, and the bucket number with the sequence is its place
//! in FIFO order and its id; its data is the attempt count (4 bytes) plus
//! the payload. A bucket takes about [`BUCKET_SPAN`] messages; then a pusher
//! seals it (sets its data, so its version is no longer 0) and creates the
//! next one. A push is one `multi` that checks its bucket's version is still
//! 0, so no message lands in a bucket once a later one has taken messages,
//! and bucket order stays push order. A pull lists the bucket names and then
//! only the buckets it walks, so what it reads follows the messages held, not
//! the backlog; an empty sealed bucket with a later one after it is deleted
//! by the pull that finds it (the last bucket never is, so bucket numbers
//! are never reused).
//!
//! An in-flight delivery is a claim znode `!c/<bucket>.<message>` holding
//! `<visible-at unix ms>:<nonce>`; when the pull names a session the claim is
//! an ephemeral znode of that session (created through its connection), so
//! session loss deletes it and the message is visible again at once.
//! Claiming is one `multi` guarded by both znodes' versions, so two consumers
//! never hold the same message. The claim of a message's last allowed
//! attempt (marked `:last`) also creates a persistent marker
//! `!l/<bucket>.<message>`, which outlives an ephemeral claim: the
//! dead-letter sweep reads the markers of its feeders, not their backlogs.
//! Visibility deadlines are wall-clock milliseconds: consumers' clocks should
//! agree to well under a visibility timeout (NTP-level).
//!
//! A pull that waits and wakes to find nothing to take (other pulls
//! compete) waits on in the queue's line of waiting pulls, an
//! ephemeral-sequential znode under `!w` of the backend's own session (see
//! `wait_for_turn`): only the first [`WATCHING_WAITERS`] in line watch the
//! queue's directories, so a push, claim or ack wakes that many of them,
//! not all of them.

use crate::error::map_error;
use crate::layout::sequence;
use crate::line::{LeaveOnDrop, Line, Place as LinePlace};
use crate::Zk;
use async_trait::async_trait;
use dprim::queue::{
    give_back, give_back_later, pull_to_the_end, Abandoned, Delivery, MessageId, PullOptions,
    Queue, QueueDepth, QueueOptions, Queues, Receipt,
};
use dprim::{Error, ErrorKind, Key, Result, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use zookeeper_client::{
    Client, CreateMode, MultiReadResult, MultiWriteError, MultiWriteResult, Stat,
};

/// Marks a claim that nobody holds (a nack with delay).
const NOBODY: &str = "-";

/// Marks the claim of a message's last allowed attempt.
const LAST: &str = "last";

/// Sequence numbers a queue's message bucket takes before it is sealed.
/// ZooKeeper numbers a directory's children by its child version, which
/// deletes advance too, so a bucket holds about this many messages at most
/// (a few more when pushes race the seal).
pub const BUCKET_SPAN: i64 = 1024;

/// Znodes read in one multi-read request.
const READ_BATCH: usize = 128;

/// How often an append looks for an open bucket before giving up; each miss
/// means another pusher sealed the bucket in between.
const APPEND_TRIES: usize = 16;

pub(crate) struct ZkQueues {
    zk: Zk,
}

impl ZkQueues {
    pub(crate) fn new(zk: Zk) -> ZkQueues {
        ZkQueues { zk }
    }
}

/// A queue name as one znode name (`/` cannot appear in one; `!` cannot
/// appear in a key, so the mapping is reversible).
fn flat(name: &Key) -> String {
    name.as_str().replace('/', "!")
}

fn unflat(s: &str) -> Option<Key> {
    Key::new(s.replace('!', "/")).ok()
}

fn bucket_name(bucket: u64) -> String {
    format!("b-{bucket:010}")
}

fn parse_bucket(name: &str) -> Option<u64> {
    name.strip_prefix("b-")?.parse().ok()
}

/// Where a message is: its bucket and its name in that bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Place {
    bucket: u64,
    name: String,
}

impl Place {
    /// `<bucket>.<message>`: the name of the message's claim and marker,
    /// and the first part of its receipts.
    fn id(&self) -> String {
        format!("{}.{}", bucket_name(self.bucket), self.name)
    }

    fn parse(id: &str) -> Option<Place> {
        let (bucket, name) = id.split_once('.')?;
        let valid = name.starts_with("m-") && !name.contains('/') && sequence(name).is_some();
        let bucket = parse_bucket(bucket).filter(|_| valid)?;
        Some(Place {
            bucket,
            name: name.to_string(),
        })
    }

    fn sequence(&self) -> i64 {
        sequence(&self.name).unwrap_or(0)
    }

    /// Unique in its queue: buckets are never renumbered and ZooKeeper
    /// sequences are 31-bit.
    fn message_id(&self) -> MessageId {
        MessageId((self.bucket << 32) | (self.sequence() as u64 & 0xffff_ffff))
    }
}

#[async_trait]
impl Queues for ZkQueues {
    async fn open(&self, name: &Key, options: Option<QueueOptions>) -> Result<Arc<dyn Queue>> {
        QueueOptions::default().dead_letter_for(name)?;
        let queue = ZkQueue::new(self.zk.clone(), name.clone());
        let client = self.zk.client().await?;
        self.zk.mkdirs(&client, &queue.messages).await?;
        self.zk.mkdirs(&client, &queue.claims).await?;
        self.zk.mkdirs(&client, &queue.markers).await?;
        self.zk.mkdirs(&client, queue.waiters.dir()).await?;
        let effective = match options {
            Some(options) => {
                options.validate(name)?;
                let raw = options.encode(name)?;
                let path = queue.options_path();
                match self
                    .zk
                    .call("set", client.set_data(&path, &raw, None))
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        let created = self
                            .zk
                            .call(
                                "create",
                                client.create(
                                    &path,
                                    &raw,
                                    &self.zk.options(CreateMode::Persistent),
                                ),
                            )
                            .await;
                        match created {
                            Ok(_) => {}
                            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                                self.zk
                                    .call("set", client.set_data(&path, &raw, None))
                                    .await?;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    Err(e) => return Err(e),
                }
                options
            }
            None => queue.options(&client).await?,
        };
        // Tell the dead-letter queue who feeds it, so using it sweeps dead
        // messages out of feeders nobody touches any more.
        let dlq = ZkQueue::new(self.zk.clone(), effective.dead_letter_for(name)?);
        let marker = format!("{}/!f/{}", dlq.dir, flat(name));
        self.zk.mkdirs(&client, &marker).await?;
        Ok(queue)
    }
}

struct ZkQueue {
    /// This queue, for a pull that outlives its caller (see `pull`).
    me: Weak<ZkQueue>,
    zk: Zk,
    name: Key,
    dir: String,
    messages: String,
    claims: String,
    markers: String,
    /// The pulls waiting for a message (see `wait_for_turn`).
    waiters: Line,
    /// The bucket this handle pushes to, once looked up.
    tail: Mutex<Option<u64>>,
    /// Held while looking the tail up, so concurrent pushes look once.
    finding_tail: tokio::sync::Mutex<()>,
}

/// Whether a `multi` failed because one of its conditions did not hold
/// (rather than for want of a server).
fn refused(e: &zookeeper_client::Error) -> bool {
    matches!(
        e,
        zookeeper_client::Error::BadVersion
            | zookeeper_client::Error::NoNode
            | zookeeper_client::Error::NodeExists
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

struct Claim {
    visible_at: i64,
    nonce: String,
    last: bool,
}

fn parse_claim(raw: &[u8]) -> Claim {
    let text = String::from_utf8_lossy(raw);
    let mut parts = text.splitn(3, ':');
    Claim {
        visible_at: parts.next().and_then(|at| at.parse().ok()).unwrap_or(0),
        nonce: parts.next().unwrap_or(NOBODY).to_string(),
        last: parts.next() == Some(LAST),
    }
}

fn claim_data(visible_at: i64, nonce: &str, last: bool) -> Vec<u8> {
    if last {
        format!("{visible_at}:{nonce}:{LAST}").into_bytes()
    } else {
        format!("{visible_at}:{nonce}").into_bytes()
    }
}

fn split_message(raw: &[u8]) -> (u32, &[u8]) {
    if raw.len() < 4 {
        return (0, raw);
    }
    let attempts = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
    (attempts, &raw[4..])
}

fn join_message(attempts: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 4);
    v.extend_from_slice(&attempts.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

type Node = (Vec<u8>, Stat);

/// What a pull that found nothing waits for: a change to one of these
/// directories (each with the child version the pull saw), or the moment a
/// held message may become visible.
#[derive(Default)]
struct Idle {
    dirs: Vec<(String, i32)>,
    next_change: Option<i64>,
}

impl Idle {
    fn visible_at(&mut self, at: i64) {
        self.next_change = Some(self.next_change.map_or(at, |n| n.min(at)));
    }
}

impl ZkQueue {
    fn new(zk: Zk, name: Key) -> Arc<ZkQueue> {
        let dir = zk.layout().queue(&name);
        Arc::new_cyclic(|me| ZkQueue {
            me: me.clone(),
            messages: format!("{dir}/!m"),
            claims: format!("{dir}/!c"),
            markers: format!("{dir}/!l"),
            waiters: Line::new(zk.clone(), format!("{dir}/!w")),
            dir,
            zk,
            name,
            tail: Mutex::new(None),
            finding_tail: tokio::sync::Mutex::new(()),
        })
    }

    fn this(&self) -> Result<Arc<ZkQueue>> {
        self.me
            .upgrade()
            .ok_or_else(|| Error::unexpected("a zookeeper queue was used after it was dropped"))
    }

    fn options_path(&self) -> String {
        format!("{}/!options", self.dir)
    }

    fn bucket_path(&self, bucket: u64) -> String {
        format!("{}/{}", self.messages, bucket_name(bucket))
    }

    fn message_path(&self, place: &Place) -> String {
        format!("{}/{}", self.bucket_path(place.bucket), place.name)
    }

    fn claim_path(&self, place: &Place) -> String {
        format!("{}/{}", self.claims, place.id())
    }

    fn marker_path(&self, place: &Place) -> String {
        format!("{}/{}", self.markers, place.id())
    }

    async fn options(&self, client: &Client) -> Result<QueueOptions> {
        match self
            .zk
            .call("get", client.get_data(&self.options_path()))
            .await
        {
            Ok((raw, _)) => Ok(QueueOptions::decode(&raw, &self.name)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(QueueOptions {
                dead_letter: self.name.join("dead-letter").ok(),
                ..QueueOptions::default()
            }),
            Err(e) => Err(e),
        }
    }

    async fn get(&self, client: &Client, path: &str) -> Result<Option<Node>> {
        match self.zk.call("get", client.get_data(path)).await {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A directory's children and stat; none for a missing directory.
    async fn children(&self, client: &Client, dir: &str) -> Result<(Vec<String>, Option<Stat>)> {
        match self.zk.call("list", client.get_children(dir)).await {
            Ok((children, stat)) => Ok((children, Some(stat))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok((Vec::new(), None)),
            Err(e) => Err(e),
        }
    }

    /// Reads znodes, [`READ_BATCH`] to a request; `None` for a missing one.
    async fn read_all(&self, client: &Client, paths: &[String]) -> Result<Vec<Option<Node>>> {
        let mut nodes = Vec::with_capacity(paths.len());
        for batch in paths.chunks(READ_BATCH) {
            let mut reader = client.new_multi_reader();
            for path in batch {
                reader.add_get_data(path).map_err(map_error)?;
            }
            for read in self.zk.call("multi read", reader.commit()).await? {
                nodes.push(match read {
                    MultiReadResult::Data { data, stat } => Some((data, stat)),
                    MultiReadResult::Error {
                        err: zookeeper_client::Error::NoNode,
                    } => None,
                    MultiReadResult::Error { err } => return Err(map_error(err)),
                    _ => None,
                });
            }
        }
        Ok(nodes)
    }

    /// Bucket numbers, oldest first, and the stat of their directory.
    async fn buckets(&self, client: &Client) -> Result<(Vec<u64>, Option<Stat>)> {
        let (names, stat) = self.children(client, &self.messages).await?;
        let mut buckets: Vec<u64> = names.iter().filter_map(|n| parse_bucket(n)).collect();
        buckets.sort_unstable();
        Ok((buckets, stat))
    }

    /// Every claim by message id, and the stat of their directory.
    async fn claims(&self, client: &Client) -> Result<(HashMap<String, Node>, Option<Stat>)> {
        let (names, stat) = self.children(client, &self.claims).await?;
        let paths: Vec<String> = names
            .iter()
            .map(|c| format!("{}/{c}", self.claims))
            .collect();
        let nodes = self.read_all(client, &paths).await?;
        let claims = names
            .into_iter()
            .zip(nodes)
            .filter_map(|(name, node)| Some((name, node?)))
            .collect();
        Ok((claims, stat))
    }

    fn cached_tail(&self) -> Option<u64> {
        *self.tail.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves the cached tail past `sealed` (never back).
    fn tail_sealed(&self, sealed: u64) {
        let mut tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        if tail.is_none_or(|t| t <= sealed) {
            *tail = Some(sealed + 1);
        }
    }

    /// Forgets the cached tail if it is still `bucket`.
    fn forget_tail(&self, bucket: u64) {
        let mut tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        if *tail == Some(bucket) {
            *tail = None;
        }
    }

    /// The bucket to push to: the cached one, or looked up once for all
    /// the pushes waiting for it.
    async fn tail(&self, client: &Client) -> Result<u64> {
        if let Some(bucket) = self.cached_tail() {
            return Ok(bucket);
        }
        let _finding = self.finding_tail.lock().await;
        if let Some(bucket) = self.cached_tail() {
            return Ok(bucket);
        }
        let bucket = self.find_tail(client).await?;
        *self.tail.lock().unwrap_or_else(PoisonError::into_inner) = Some(bucket);
        Ok(bucket)
    }

    /// The bucket to push to now: the last one, or the one after it
    /// (created here) when it is sealed.
    async fn find_tail(&self, client: &Client) -> Result<u64> {
        let (buckets, _) = self.buckets(client).await?;
        let Some(&last) = buckets.last() else {
            self.zk.mkdirs(client, &self.bucket_path(0)).await?;
            return Ok(0);
        };
        match self.get(client, &self.bucket_path(last)).await? {
            // A pusher sealed it and stopped before it created the next one.
            Some((_, stat)) if stat.version > 0 => {
                self.create_bucket(client, last + 1).await?;
                Ok(last + 1)
            }
            _ => Ok(last),
        }
    }

    async fn create_bucket(&self, client: &Client, bucket: u64) -> Result<()> {
        let options = self.zk.options(CreateMode::Persistent);
        let path = self.bucket_path(bucket);
        match self
            .zk
            .call("create", client.create(&path, &[], &options))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Seals `bucket` (its version leaves 0, so pushes checking it fail) and
    /// creates the next one.
    async fn seal(&self, client: &Client, bucket: u64) -> Result<()> {
        let path = self.bucket_path(bucket);
        match self
            .zk
            .call("seal", client.set_data(&path, b"sealed", Some(0)))
            .await
        {
            Ok(_) => {}
            // Sealed by another pusher already.
            Err(e) if e.kind() == ErrorKind::Conflict => {}
            Err(e) => return Err(e),
        }
        self.create_bucket(client, bucket + 1).await?;
        self.tail_sealed(bucket);
        Ok(())
    }

    /// Appends a message with attempt count 0, in one `multi` with
    /// `deletes` (path, version) that must happen with it. Returns its
    /// place, or `None` when one of `deletes` failed.
    async fn append(
        &self,
        client: &Client,
        payload: &[u8],
        deletes: &[(String, i32)],
    ) -> Result<Option<Place>> {
        let data = join_message(0, payload);
        let sequential = self.zk.options(CreateMode::PersistentSequential);
        let mut guessed = false;
        for _ in 0..APPEND_TRIES {
            let bucket = self.tail(client).await?;
            let bucket_path = self.bucket_path(bucket);
            let mut w = client.new_multi_writer();
            for (path, version) in deletes {
                w.add_delete(path, Some(*version)).map_err(map_error)?;
            }
            w.add_check_version(&bucket_path, 0).map_err(map_error)?;
            w.add_create(&format!("{bucket_path}/m-"), &data, &sequential)
                .map_err(map_error)?;
            match w.commit().await {
                Ok(results) => {
                    let name = results.into_iter().find_map(|r| match r {
                        MultiWriteResult::Create { path, .. } => {
                            path.rsplit('/').next().map(str::to_string)
                        }
                        _ => None,
                    });
                    let place = name
                        .map(|name| Place { bucket, name })
                        .filter(|p| sequence(&p.name).is_some())
                        .ok_or_else(|| {
                            Error::unexpected(format!(
                                "zookeeper did not name the message it created in {bucket_path}"
                            ))
                        })?;
                    if place.sequence() >= BUCKET_SPAN - 1 {
                        // The message is stored whatever happens here: a
                        // failed seal only lets the bucket grow until the
                        // next push past the span seals it.
                        if let Err(e) = self.seal(client, bucket).await {
                            tracing::debug!(bucket = %bucket_path, error = %e, "could not seal a full queue bucket");
                        }
                    }
                    return Ok(Some(place));
                }
                // Sealed: the pusher that sealed it opens the next one, so
                // try that once before looking the tail up.
                Err(MultiWriteError::OperationFailed {
                    index,
                    source: zookeeper_client::Error::BadVersion,
                }) if index == deletes.len() && !guessed => {
                    guessed = true;
                    self.tail_sealed(bucket);
                }
                // Gone, not there yet, or sealed again: look the tail up.
                Err(MultiWriteError::OperationFailed { index, .. }) if index == deletes.len() => {
                    self.forget_tail(bucket);
                }
                Err(MultiWriteError::OperationFailed { .. }) => return Ok(None),
                Err(MultiWriteError::RequestFailed { source }) => return Err(map_error(source)),
            }
        }
        Err(Error::unexpected(format!(
            "no open bucket in {} after {APPEND_TRIES} tries: other pushers keep sealing them",
            self.messages
        ))
        .temporary())
    }

    /// Moves a message to the dead-letter queue if nobody changed it meanwhile.
    async fn dead_letter(
        &self,
        client: &Client,
        options: &QueueOptions,
        place: &Place,
        msg: &Node,
        claim: Option<&Node>,
    ) -> Result<bool> {
        let dlq = ZkQueue::new(self.zk.clone(), options.dead_letter_for(&self.name)?);
        let (_, payload) = split_message(&msg.0);
        let mut deletes = vec![(self.message_path(place), msg.1.version)];
        if let Some(c) = claim {
            deletes.push((self.claim_path(place), c.1.version));
        }
        let moved = dlq.append(client, payload, &deletes).await?.is_some();
        if moved {
            self.forget_marker(client, place).await;
        }
        Ok(moved)
    }

    /// Deletes the last-attempt marker of a message that is gone. A marker
    /// left behind (this failed, or the process stopped) is deleted by the
    /// next dead-letter sweep, which finds its message gone.
    async fn forget_marker(&self, client: &Client, place: &Place) {
        let path = self.marker_path(place);
        if let Err(e) = self.zk.call("delete", client.delete(&path, None)).await {
            if e.kind() != ErrorKind::NotFound {
                tracing::debug!(marker = %path, error = %e, "could not delete a last-attempt marker");
            }
        }
    }

    /// Dead-letters every message of each feeding queue whose last attempt
    /// is over; returns the earliest moment a feeder's last attempt may time
    /// out (and so need sweeping).
    async fn sweep_feeders(&self, client: &Client) -> Result<Option<i64>> {
        let mut next = Idle::default();
        let (feeders, _) = self.children(client, &format!("{}/!f", self.dir)).await?;
        for f in feeders {
            let Some(feeder) = unflat(&f) else { continue };
            let queue = ZkQueue::new(self.zk.clone(), feeder);
            let options = queue.options(client).await?;
            if options.dead_letter_for(&queue.name).ok().as_ref() != Some(&self.name) {
                continue;
            }
            let (markers, _) = queue.children(client, &queue.markers).await?;
            let places: Vec<Place> = markers.iter().filter_map(|m| Place::parse(m)).collect();
            let paths: Vec<String> = places
                .iter()
                .flat_map(|p| [queue.message_path(p), queue.claim_path(p)])
                .collect();
            let mut nodes = queue.read_all(client, &paths).await?.into_iter();
            let now = now_ms();
            for place in places {
                let (msg, claim) = (nodes.next().flatten(), nodes.next().flatten());
                let Some(msg) = msg else {
                    queue.forget_marker(client, &place).await;
                    continue;
                };
                match claim.as_ref().map(|c| parse_claim(&c.0)) {
                    Some(c) if c.visible_at > now => next.visible_at(c.visible_at),
                    _ => {
                        if split_message(&msg.0).0 >= options.max_attempts {
                            queue
                                .dead_letter(client, &options, &place, &msg, claim.as_ref())
                                .await?;
                        }
                    }
                }
            }
        }
        Ok(next.next_change)
    }

    /// One pass over the queue: claims the first visible message, or says
    /// what to wait for.
    async fn try_pull(&self, options: &PullOptions) -> Result<std::result::Result<Delivery, Idle>> {
        let client = self.zk.client().await?;
        let mut idle = Idle::default();
        if let Some(at) = self.sweep_feeders(&client).await? {
            idle.visible_at(at);
        }
        let queue_options = self.options(&client).await?;
        let (buckets, buckets_stat) = self.buckets(&client).await?;
        let (claims, claims_stat) = self.claims(&client).await?;
        if let Some(s) = buckets_stat {
            idle.dirs.push((self.messages.clone(), s.cversion));
        }
        if let Some(s) = claims_stat {
            idle.dirs.push((self.claims.clone(), s.cversion));
        }
        // Claims are created through the consumer's session when it names one.
        let (writer, mode) = match &options.session {
            Some(s) => (self.zk.session_client(s)?, CreateMode::Ephemeral),
            None => (client.clone(), CreateMode::Persistent),
        };
        let claiming = Claiming {
            client: &client,
            writer: &writer,
            mode,
            options,
            queue_options: &queue_options,
            now: now_ms(),
        };
        for (i, &bucket) in buckets.iter().enumerate() {
            let is_last = i + 1 == buckets.len();
            let path = self.bucket_path(bucket);
            let (mut names, stat) = self.children(&client, &path).await?;
            let Some(stat) = stat else { continue };
            if is_last {
                idle.dirs.push((path.clone(), stat.cversion));
            }
            if names.is_empty() {
                if !is_last && stat.version > 0 {
                    // Sealed, empty and followed by another bucket: nothing
                    // lands here again. A failure only leaves it for the
                    // next pull.
                    let _ = self
                        .zk
                        .call("delete", client.delete(&path, Some(stat.version)))
                        .await;
                }
                continue;
            }
            names.sort_by_key(|m| sequence(m).unwrap_or(i64::MAX));
            for name in names {
                let place = Place { bucket, name };
                if let Some(c) = claims.get(&place.id()).map(|c| parse_claim(&c.0)) {
                    if c.visible_at > claiming.now {
                        idle.visible_at(c.visible_at);
                        continue;
                    }
                }
                if let Some(delivery) = self.try_claim(&claiming, &place, &mut idle).await? {
                    return Ok(Ok(delivery));
                }
            }
        }
        Ok(Err(idle))
    }

    /// Claims one message unless it is held or dead (then moves it to the
    /// dead-letter queue).
    async fn try_claim(
        &self,
        c: &Claiming<'_>,
        place: &Place,
        idle: &mut Idle,
    ) -> Result<Option<Delivery>> {
        let msg_path = self.message_path(place);
        let claim_path = self.claim_path(place);
        let marker_path = self.marker_path(place);
        // Read the message, its claim and its marker in one snapshot: every
        // claim change also bumps the message's version, so the versions
        // read together guard the claim below against a concurrent claimant.
        let paths = [msg_path.clone(), claim_path.clone(), marker_path.clone()];
        let mut read = self.read_all(c.client, &paths).await?.into_iter();
        let (msg, claim, marker) = (
            read.next().flatten(),
            read.next().flatten(),
            read.next().flatten(),
        );
        let Some(msg) = msg else { return Ok(None) };
        if let Some(held) = claim.as_ref().map(|c| parse_claim(&c.0)) {
            if held.visible_at > c.now {
                idle.visible_at(held.visible_at);
                return Ok(None);
            }
        }
        let (attempts, payload) = split_message(&msg.0);
        if attempts >= c.queue_options.max_attempts {
            self.dead_letter(c.client, c.queue_options, place, &msg, claim.as_ref())
                .await?;
            return Ok(None);
        }
        let attempt = attempts + 1;
        let last = marker.is_some() || attempt >= c.queue_options.max_attempts;
        let nonce = format!("{:016x}", rand::random::<u64>());
        let visible_at = c.now + c.options.visibility_timeout.as_millis() as i64;
        let mut w = c.writer.new_multi_writer();
        w.add_set_data(
            &msg_path,
            &join_message(attempt, payload),
            Some(msg.1.version),
        )
        .map_err(map_error)?;
        if let Some(old) = &claim {
            w.add_delete(&claim_path, Some(old.1.version))
                .map_err(map_error)?;
        }
        w.add_create(
            &claim_path,
            &claim_data(visible_at, &nonce, last),
            &self.zk.options(c.mode),
        )
        .map_err(map_error)?;
        if last && marker.is_none() {
            w.add_create(&marker_path, &[], &self.zk.options(CreateMode::Persistent))
                .map_err(map_error)?;
        }
        match w.commit().await {
            Ok(_) => Ok(Some(Delivery {
                id: place.message_id(),
                payload: Value::new(payload.to_vec())?,
                attempt,
                receipt: Receipt(format!("{}.{nonce}", place.id())),
            })),
            Err(e) => {
                let e: zookeeper_client::Error = e.into();
                if refused(&e) {
                    // Another consumer won this one; try the next.
                    Ok(None)
                } else {
                    let e = map_error(e);
                    // The claim may have been made with its answer lost:
                    // nobody would hold it until it timed out.
                    if let (false, Ok(queue)) = (e.is_not_applied(), self.this()) {
                        give_back_later(queue, Receipt(format!("{}.{nonce}", place.id())));
                    }
                    Err(e)
                }
            }
        }
    }

    fn parse_receipt(&self, receipt: &Receipt) -> Result<(Place, String)> {
        receipt
            .0
            .rsplit_once('.')
            .and_then(|(id, nonce)| Some((Place::parse(id)?, nonce.to_string())))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "`{receipt}` is not a receipt of the zookeeper backend; pass the receipt printed by pull"
                ))
            })
    }

    /// The message and claim of a receipt that is still current.
    async fn current(
        &self,
        client: &Client,
        receipt: &Receipt,
    ) -> Result<Option<(Place, Node, Node)>> {
        let (place, nonce) = self.parse_receipt(receipt)?;
        let paths = [self.message_path(&place), self.claim_path(&place)];
        let mut read = self.read_all(client, &paths).await?.into_iter();
        match (read.next().flatten(), read.next().flatten()) {
            (None, _) => Ok(None),
            (Some(m), Some(c)) => {
                let parsed = parse_claim(&c.0);
                if parsed.nonce == nonce && parsed.visible_at > now_ms() {
                    Ok(Some((place, m, c)))
                } else {
                    Err(self.stale(receipt))
                }
            }
            (Some(_), None) => Err(self.stale(receipt)),
        }
    }

    fn stale(&self, receipt: &Receipt) -> Error {
        Error::conflict(format!(
            "delivery {receipt} of queue `{}` expired and the message was made visible again; it will be processed again",
            self.name
        ))
    }

    /// The error of a change to a held delivery whose `multi` failed: a
    /// refused condition means the delivery changed hands, anything else
    /// (a lost connection) says what happened.
    fn failed_change(&self, e: zookeeper_client::Error, receipt: &Receipt) -> Error {
        if refused(&e) {
            self.stale(receipt)
        } else {
            map_error(e)
        }
    }

    fn gone(&self, receipt: &Receipt) -> Error {
        Error::conflict(format!(
            "delivery {receipt} of queue `{}` is no longer held (acked or dead-lettered)",
            self.name
        ))
    }

    /// The pull itself (see `pull`): stops waiting when its caller left.
    async fn pull_unless_abandoned(
        &self,
        options: PullOptions,
        abandoned: Abandoned,
    ) -> Result<Option<Delivery>> {
        let deadline = tokio::time::Instant::now() + options.wait;
        // This pull's place among the waiting ones; left (in the
        // background) however the pull ends.
        let mut waiting: Option<LeaveOnDrop> = None;
        let mut waited = false;
        loop {
            if abandoned.is_set() {
                return Ok(None);
            }
            let idle = match self.try_pull(&options).await? {
                Ok(delivery) => return Ok(Some(delivery)),
                Err(idle) => idle,
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let until = match idle.next_change {
                Some(at) => {
                    let wait = Duration::from_millis((at - now_ms()).max(0) as u64);
                    (now + wait).min(deadline)
                }
                None => deadline,
            };
            // A pull takes a place only once it woke and found nothing to
            // take: other pulls compete for the queue's messages then. A
            // lone consumer never pays for the place (two writes).
            if waiting.is_none() && waited {
                waiting = self.join_waiters().await;
            }
            waited = true;
            let client = self.zk.client().await?;
            let place = waiting.as_ref().and_then(|w| w.place());
            tokio::select! {
                // A waiter not watching the queue has no use for the
                // moment a held message becomes visible: those watching do.
                turn = self.wait_for_turn(&client, place, deadline) => match turn {
                    // Changes since the pull's read end this wait at once.
                    Turn::Watching => self.wait_for_change(&client, &idle.dirs, until).await,
                    Turn::Moved => {}
                    Turn::OutOfLine => waiting = None,
                },
                _ = abandoned.wait() => return Ok(None),
            }
        }
    }

    /// Takes a place among the waiting pulls, through the backend's own
    /// session; `None` if that fails, and the pull then watches the queue
    /// itself.
    async fn join_waiters(&self) -> Option<LeaveOnDrop> {
        let joined = async {
            let client = self.zk.client().await?;
            let owner = client.session_id().0;
            self.waiters.join_through(client, owner, &[]).await
        };
        match joined.await {
            Ok(place) => Some(LeaveOnDrop::new(self.waiters.clone(), place)),
            Err(e) => {
                tracing::debug!(error = %e, queue = %self.name, "joining the waiting pulls failed; watching the queue directly");
                None
            }
        }
    }

    /// Waits until `place` is among the first [`WATCHING_WAITERS`] waiting
    /// pulls, which are the ones that watch the queue, or until `deadline`.
    ///
    /// The others each watch the (at most) [`WATCHING_WAITERS`] places
    /// just ahead of them, so a push, claim or ack wakes those few pulls
    /// instead of every waiting one (the herd effect), and a waiter that
    /// leaves wakes at most that many behind it. More than one watches the
    /// queue so that a waiter whose process died, whose place stays until
    /// its session expires, does not stop the pulls behind it.
    async fn wait_for_turn(
        &self,
        client: &Client,
        place: Option<&LinePlace>,
        deadline: tokio::time::Instant,
    ) -> Turn {
        let Some(place) = place else {
            return Turn::Watching;
        };
        // A pull that waited in line reads the queue afresh before it
        // watches it: what it last read is old.
        let settled = |in_line: bool| if in_line { Turn::Moved } else { Turn::Watching };
        let mut in_line = false;
        loop {
            let ahead = match self.waiters.nearest_ahead(place, WATCHING_WAITERS).await {
                Ok(Some(ahead)) => ahead,
                Ok(None) => return Turn::OutOfLine,
                Err(_) => return settled(in_line),
            };
            if ahead.len() < WATCHING_WAITERS {
                return settled(in_line);
            }
            in_line = true;
            let mut watchers = Vec::with_capacity(ahead.len());
            for path in &ahead {
                match self
                    .zk
                    .call("exists", client.check_and_watch_stat(path))
                    .await
                {
                    Ok((Some(_), watcher)) => watchers.push(Box::pin(watcher.changed())),
                    // Left meanwhile: look at the line again.
                    Ok((None, _)) => break,
                    Err(_) => return settled(in_line),
                }
            }
            if watchers.len() < ahead.len() {
                continue;
            }
            tokio::select! {
                _ = futures::future::select_all(watchers) => {}
                _ = tokio::time::sleep_until(deadline) => return Turn::Moved,
            }
        }
    }

    /// Waits until one of the directories a pull saw changes, or `until`.
    /// A directory that changed since the pull looked ends the wait at once.
    async fn wait_for_change(
        &self,
        client: &Client,
        dirs: &[(String, i32)],
        until: tokio::time::Instant,
    ) {
        let watch = async {
            let mut watchers = Vec::with_capacity(dirs.len());
            for (dir, seen) in dirs {
                match client.get_and_watch_children(dir).await {
                    Ok((_, stat, watcher)) if stat.cversion == *seen => {
                        watchers.push(Box::pin(watcher.changed()));
                    }
                    Ok(_) => return,
                    Err(_) => break,
                }
            }
            if watchers.len() < dirs.len() || watchers.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
            futures::future::select_all(watchers).await;
        };
        tokio::select! {
            _ = watch => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }
}

/// Waiting pulls that watch the queue itself (see `wait_for_turn`).
const WATCHING_WAITERS: usize = 2;

/// How a waiting pull's turn came.
#[derive(Debug, PartialEq, Eq)]
enum Turn {
    /// It is to watch the queue from what it last read.
    Watching,
    /// It waited in line and is now to watch the queue, or its time is
    /// up: it reads the queue afresh first.
    Moved,
    /// Its place is gone (its session ended): it reads the queue again and
    /// takes a new place.
    OutOfLine,
}

/// What one pull claims with.
struct Claiming<'a> {
    client: &'a Client,
    writer: &'a Client,
    mode: CreateMode,
    options: &'a PullOptions,
    queue_options: &'a QueueOptions,
    now: i64,
}

#[async_trait]
impl Queue for ZkQueue {
    fn name(&self) -> &Key {
        &self.name
    }

    async fn push(&self, payload: Value) -> Result<MessageId> {
        let client = self.zk.client().await?;
        let place = self.append(&client, payload.as_bytes(), &[]).await?;
        let place = place.ok_or_else(|| {
            Error::unexpected(format!("push to {} failed without a reason", self.messages))
        })?;
        Ok(place.message_id())
    }

    async fn pull(&self, options: PullOptions) -> Result<Option<Delivery>> {
        if let Some(s) = &options.session {
            s.check()?;
        }
        let (this, back) = (self.this()?, self.this()?);
        pull_to_the_end(
            move |abandoned| async move { this.pull_unless_abandoned(options, abandoned).await },
            Box::new(move |d| Box::pin(async move { give_back(back.as_ref(), &d.receipt).await })),
        )
        .await
    }

    async fn ack(&self, receipt: &Receipt) -> Result<()> {
        let client = self.zk.client().await?;
        let Some((place, msg, claim)) = self.current(&client, receipt).await? else {
            return Ok(());
        };
        let mut w = client.new_multi_writer();
        w.add_delete(&self.message_path(&place), Some(msg.1.version))
            .map_err(map_error)?;
        w.add_delete(&self.claim_path(&place), Some(claim.1.version))
            .map_err(map_error)?;
        match w.commit().await {
            Ok(_) => {
                if parse_claim(&claim.0).last {
                    self.forget_marker(&client, &place).await;
                }
                Ok(())
            }
            Err(e) => {
                let e: zookeeper_client::Error = e.into();
                // Gone now: this ack (its answer lost) or another removed
                // it. Still held after a lost connection: the error says
                // so, and acking again is how to find out.
                match self.current(&client, receipt).await {
                    Ok(None) => Ok(()),
                    Err(stale) if stale.kind() == ErrorKind::Conflict => Err(stale),
                    _ if refused(&e) => Err(self.stale(receipt)),
                    _ => Err(map_error(e)),
                }
            }
        }
    }

    async fn nack(&self, receipt: &Receipt, delay: Duration) -> Result<()> {
        let client = self.zk.client().await?;
        let Some((place, msg, claim)) = self.current(&client, receipt).await? else {
            return Err(self.gone(receipt));
        };
        let (attempts, _) = split_message(&msg.0);
        let options = self.options(&client).await?;
        if attempts >= options.max_attempts {
            return if self
                .dead_letter(&client, &options, &place, &msg, Some(&claim))
                .await?
            {
                Ok(())
            } else {
                Err(self.stale(receipt))
            };
        }
        let mut w = client.new_multi_writer();
        let claim_path = self.claim_path(&place);
        w.add_check_version(&self.message_path(&place), msg.1.version)
            .map_err(map_error)?;
        w.add_delete(&claim_path, Some(claim.1.version))
            .map_err(map_error)?;
        if !delay.is_zero() {
            let at = now_ms() + delay.as_millis() as i64;
            w.add_create(
                &claim_path,
                &claim_data(at, NOBODY, false),
                &self.zk.options(CreateMode::Persistent),
            )
            .map_err(map_error)?;
        }
        match w.commit().await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.failed_change(e.into(), receipt)),
        }
    }

    async fn extend(&self, receipt: &Receipt, visibility_timeout: Duration) -> Result<()> {
        let client = self.zk.client().await?;
        let Some((place, msg, claim)) = self.current(&client, receipt).await? else {
            return Err(self.gone(receipt));
        };
        let held = parse_claim(&claim.0);
        let at = now_ms() + visibility_timeout.as_millis() as i64;
        let mut w = client.new_multi_writer();
        w.add_check_version(&self.message_path(&place), msg.1.version)
            .map_err(map_error)?;
        w.add_set_data(
            &self.claim_path(&place),
            &claim_data(at, &held.nonce, held.last),
            Some(claim.1.version),
        )
        .map_err(map_error)?;
        match w.commit().await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.failed_change(e.into(), receipt)),
        }
    }

    async fn depth(&self) -> Result<QueueDepth> {
        let client = self.zk.client().await?;
        self.sweep_feeders(&client).await?;
        // A bucket's stat counts its messages: one read per bucket, not per message.
        let (buckets, _) = self.buckets(&client).await?;
        let paths: Vec<String> = buckets.iter().map(|&b| self.bucket_path(b)).collect();
        let messages: u64 = self
            .read_all(&client, &paths)
            .await?
            .iter()
            .flatten()
            .map(|(_, stat)| u64::try_from(stat.num_children).unwrap_or(0))
            .sum();
        let (claims, _) = self.claims(&client).await?;
        let now = now_ms();
        let in_flight = claims
            .values()
            .map(|c| parse_claim(&c.0))
            .filter(|c| c.visible_at > now && c.nonce != NOBODY)
            .count() as u64;
        Ok(QueueDepth {
            ready: messages.saturating_sub(in_flight),
            in_flight,
        })
    }
}
