//! Queues on znodes.
//!
//! A message is a persistent-sequential znode under `!m/`: its sequence is
//! its place in FIFO order and its czxid its id; its data is the attempt
//! count (4 bytes) plus the payload. An in-flight delivery is a claim znode
//! under `!c/` with the message's name, holding `<visible-at unix ms>:<nonce>`;
//! when the pull names a session the claim is an ephemeral znode of that
//! session (created through its connection), so session loss deletes it and
//! the message is visible again at once. Claiming is one `multi` guarded by
//! both znodes' versions, so two consumers never hold the same message.
//! Visibility deadlines are wall-clock milliseconds: consumers' clocks should
//! agree to well under a visibility timeout (NTP-level).

use crate::layout::sequence;
use crate::Zk;
use async_trait::async_trait;
use dprim::queue::{
    Delivery, MessageId, PullOptions, Queue, QueueDepth, QueueOptions, Queues, Receipt,
};
use dprim::{Error, ErrorKind, Key, Result, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use zookeeper_client::{Client, CreateMode, Stat};

/// Marks a claim that nobody holds (a nack with delay).
const NOBODY: &str = "-";

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

#[async_trait]
impl Queues for ZkQueues {
    async fn open(&self, name: &Key, options: Option<QueueOptions>) -> Result<Arc<dyn Queue>> {
        QueueOptions::default().dead_letter_for(name)?;
        let queue = ZkQueue::new(self.zk.clone(), name.clone());
        let client = self.zk.client().await?;
        self.zk.mkdirs(&client, &queue.messages).await?;
        self.zk.mkdirs(&client, &queue.claims).await?;
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
        Ok(Arc::new(queue))
    }
}

struct ZkQueue {
    zk: Zk,
    name: Key,
    dir: String,
    messages: String,
    claims: String,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

struct Claim {
    visible_at: i64,
    nonce: String,
}

fn parse_claim(raw: &[u8]) -> Claim {
    let text = String::from_utf8_lossy(raw);
    let (at, nonce) = text.split_once(':').unwrap_or(("0", NOBODY));
    Claim {
        visible_at: at.parse().unwrap_or(0),
        nonce: nonce.to_string(),
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

impl ZkQueue {
    fn new(zk: Zk, name: Key) -> ZkQueue {
        let dir = zk.layout().queue(&name);
        ZkQueue {
            messages: format!("{dir}/!m"),
            claims: format!("{dir}/!c"),
            dir,
            zk,
            name,
        }
    }

    fn options_path(&self) -> String {
        format!("{}/!options", self.dir)
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

    async fn children(&self, client: &Client, dir: &str) -> Result<Vec<String>> {
        match self.zk.call("list", client.list_children(dir)).await {
            Ok(c) => Ok(c),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Message names in FIFO order, and every claim by message name.
    async fn snapshot(&self, client: &Client) -> Result<(Vec<String>, HashMap<String, Node>)> {
        let mut messages = self.children(client, &self.messages).await?;
        messages.sort_by_key(|m| sequence(m).unwrap_or(i64::MAX));
        let mut claims = HashMap::new();
        for c in self.children(client, &self.claims).await? {
            if let Some(node) = self.get(client, &format!("{}/{c}", self.claims)).await? {
                claims.insert(c, node);
            }
        }
        Ok((messages, claims))
    }

    /// Moves a message to the dead-letter queue if nobody changed it meanwhile.
    async fn dead_letter(
        &self,
        client: &Client,
        options: &QueueOptions,
        name: &str,
        msg: &Node,
        claim: Option<&Node>,
    ) -> Result<bool> {
        let dlq = ZkQueue::new(self.zk.clone(), options.dead_letter_for(&self.name)?);
        self.zk.mkdirs(client, &dlq.messages).await?;
        let (_, payload) = split_message(&msg.0);
        let mut w = client.new_multi_writer();
        let map = crate::error::map_error;
        w.add_delete(&format!("{}/{name}", self.messages), Some(msg.1.version))
            .map_err(map)?;
        if let Some(c) = claim {
            w.add_delete(&format!("{}/{name}", self.claims), Some(c.1.version))
                .map_err(map)?;
        }
        w.add_create(
            &format!("{}/m-", dlq.messages),
            &join_message(0, payload),
            &self.zk.options(CreateMode::PersistentSequential),
        )
        .map_err(map)?;
        Ok(w.commit().await.is_ok())
    }

    /// Dead-letters every visible message of each feeding queue that used
    /// up its attempts; returns the earliest moment a feeder's in-flight
    /// delivery may time out (and so need sweeping).
    async fn sweep_feeders(&self, client: &Client) -> Result<Option<i64>> {
        let mut next: Option<i64> = None;
        for f in self.children(client, &format!("{}/!f", self.dir)).await? {
            let Some(feeder) = unflat(&f) else { continue };
            let queue = ZkQueue::new(self.zk.clone(), feeder);
            let options = queue.options(client).await?;
            if options.dead_letter_for(&queue.name).ok().as_ref() != Some(&self.name) {
                continue;
            }
            let (messages, claims) = queue.snapshot(client).await?;
            let now = now_ms();
            for name in messages {
                let claim = claims.get(&name);
                match claim.map(|c| parse_claim(&c.0)) {
                    Some(c) if c.visible_at > now => {
                        next = Some(next.map_or(c.visible_at, |n| n.min(c.visible_at)));
                    }
                    _ => {
                        let Some(msg) = queue
                            .get(client, &format!("{}/{name}", queue.messages))
                            .await?
                        else {
                            continue;
                        };
                        if split_message(&msg.0).0 >= options.max_attempts {
                            queue
                                .dead_letter(client, &options, &name, &msg, claim)
                                .await?;
                        }
                    }
                }
            }
        }
        Ok(next)
    }

    /// One pass over the queue: claims the first visible message.
    async fn try_pull(&self, options: &PullOptions) -> Result<(Option<Delivery>, Option<i64>)> {
        let client = self.zk.client().await?;
        let mut next_change = self.sweep_feeders(&client).await?;
        let queue_options = self.options(&client).await?;
        let (messages, claims) = self.snapshot(&client).await?;
        // Claims are created through the consumer's session when it names one.
        let (writer, mode) = match &options.session {
            Some(s) => (self.zk.session_client(s)?, CreateMode::Ephemeral),
            None => (client.clone(), CreateMode::Persistent),
        };
        let now = now_ms();
        for name in messages {
            let claim = claims.get(&name);
            if let Some(c) = claim.map(|c| parse_claim(&c.0)) {
                if c.visible_at > now {
                    next_change = Some(next_change.map_or(c.visible_at, |n| n.min(c.visible_at)));
                    continue;
                }
            }
            let msg_path = format!("{}/{name}", self.messages);
            let claim_path = format!("{}/{name}", self.claims);
            // Read the message and its claim in one snapshot: every claim
            // change also bumps the message's version, so the versions read
            // together guard the claim below against a concurrent claimant.
            let mut reader = client.new_multi_reader();
            reader
                .add_get_data(&msg_path)
                .map_err(crate::error::map_error)?;
            reader
                .add_get_data(&claim_path)
                .map_err(crate::error::map_error)?;
            let mut read = self
                .zk
                .call("multi read", reader.commit())
                .await?
                .into_iter();
            let Some(zookeeper_client::MultiReadResult::Data { data, stat }) = read.next() else {
                continue;
            };
            let msg = (data, stat);
            let fresh_claim = match read.next() {
                Some(zookeeper_client::MultiReadResult::Data { data, stat }) => Some((data, stat)),
                _ => None,
            };
            let claim = fresh_claim.as_ref();
            if let Some(c) = claim.map(|c| parse_claim(&c.0)) {
                if c.visible_at > now {
                    next_change = Some(next_change.map_or(c.visible_at, |n| n.min(c.visible_at)));
                    continue;
                }
            }
            let (attempts, payload) = split_message(&msg.0);
            if attempts >= queue_options.max_attempts {
                self.dead_letter(&client, &queue_options, &name, &msg, claim)
                    .await?;
                continue;
            }
            let nonce = format!("{:016x}", rand::random::<u64>());
            let visible_at = now + options.visibility_timeout.as_millis() as i64;
            let mut w = writer.new_multi_writer();
            let map = crate::error::map_error;
            w.add_set_data(
                &msg_path,
                &join_message(attempts + 1, payload),
                Some(msg.1.version),
            )
            .map_err(map)?;
            if let Some(c) = claim {
                w.add_delete(&claim_path, Some(c.1.version)).map_err(map)?;
            }
            w.add_create(
                &claim_path,
                format!("{visible_at}:{nonce}").as_bytes(),
                &self.zk.options(mode),
            )
            .map_err(map)?;
            match w.commit().await {
                Ok(_) => {
                    return Ok((
                        Some(Delivery {
                            id: MessageId(msg.1.czxid as u64),
                            payload: Value::new(payload.to_vec())?,
                            attempt: attempts + 1,
                            receipt: Receipt(format!("{name}.{nonce}")),
                        }),
                        None,
                    ));
                }
                Err(e) => {
                    let e: zookeeper_client::Error = e.into();
                    if matches!(
                        e,
                        zookeeper_client::Error::BadVersion
                            | zookeeper_client::Error::NoNode
                            | zookeeper_client::Error::NodeExists
                    ) {
                        // Another consumer won this one; try the next.
                        continue;
                    }
                    return Err(crate::error::map_error(e));
                }
            }
        }
        Ok((None, next_change))
    }

    fn parse_receipt(&self, receipt: &Receipt) -> Result<(String, String)> {
        receipt
            .0
            .split_once('.')
            .filter(|(a, _)| a.starts_with("m-") && !a.contains('/'))
            .map(|(a, b)| (a.to_string(), b.to_string()))
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
    ) -> Result<Option<(String, Node, Node)>> {
        let (name, nonce) = self.parse_receipt(receipt)?;
        let msg = self
            .get(client, &format!("{}/{name}", self.messages))
            .await?;
        let claim = self.get(client, &format!("{}/{name}", self.claims)).await?;
        match (msg, claim) {
            (None, _) => Ok(None),
            (Some(m), Some(c)) => {
                let parsed = parse_claim(&c.0);
                if parsed.nonce == nonce && parsed.visible_at > now_ms() {
                    Ok(Some((name, m, c)))
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

    fn gone(&self, receipt: &Receipt) -> Error {
        Error::conflict(format!(
            "delivery {receipt} of queue `{}` is no longer held (acked or dead-lettered)",
            self.name
        ))
    }

    async fn wait_for_change(&self, client: &Client, until: tokio::time::Instant) {
        let watch = async {
            let m = client.get_and_watch_children(&self.messages);
            let c = client.get_and_watch_children(&self.claims);
            let (m, c) = futures::join!(m, c);
            match (m, c) {
                (Ok((_, _, wm)), Ok((_, _, wc))) => {
                    tokio::select! {
                        _ = wm.changed() => {}
                        _ = wc.changed() => {}
                    }
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        tokio::select! {
            _ = watch => {}
            _ = tokio::time::sleep_until(until) => {}
        }
    }
}

#[async_trait]
impl Queue for ZkQueue {
    fn name(&self) -> &Key {
        &self.name
    }

    async fn push(&self, payload: Value) -> Result<MessageId> {
        let client = self.zk.client().await?;
        let options = self.zk.options(CreateMode::PersistentSequential);
        let prefix = format!("{}/m-", self.messages);
        let data = join_message(0, payload.as_bytes());
        for _ in 0..3 {
            match self
                .zk
                .call("create", client.create(&prefix, &data, &options))
                .await
            {
                Ok((stat, _)) => return Ok(MessageId(stat.czxid as u64)),
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    self.zk.mkdirs(&client, &self.messages).await?;
                    self.zk.mkdirs(&client, &self.claims).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::unexpected(format!(
            "could not create the queue directory {}",
            self.messages
        )))
    }

    async fn pull(&self, options: PullOptions) -> Result<Option<Delivery>> {
        if let Some(s) = &options.session {
            s.check()?;
        }
        let deadline = tokio::time::Instant::now() + options.wait;
        loop {
            let (delivery, next_change) = self.try_pull(&options).await?;
            if delivery.is_some() {
                return Ok(delivery);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let until = match next_change {
                Some(at) => {
                    let wait = Duration::from_millis((at - now_ms()).max(0) as u64);
                    (now + wait).min(deadline)
                }
                None => deadline,
            };
            let client = self.zk.client().await?;
            self.wait_for_change(&client, until).await;
        }
    }

    async fn ack(&self, receipt: &Receipt) -> Result<()> {
        let client = self.zk.client().await?;
        let Some((name, msg, claim)) = self.current(&client, receipt).await? else {
            return Ok(());
        };
        let mut w = client.new_multi_writer();
        let map = crate::error::map_error;
        w.add_delete(&format!("{}/{name}", self.messages), Some(msg.1.version))
            .map_err(map)?;
        w.add_delete(&format!("{}/{name}", self.claims), Some(claim.1.version))
            .map_err(map)?;
        match w.commit().await {
            Ok(_) => Ok(()),
            Err(_) => match self.current(&client, receipt).await {
                Ok(None) => Ok(()),
                _ => Err(self.stale(receipt)),
            },
        }
    }

    async fn nack(&self, receipt: &Receipt, delay: Duration) -> Result<()> {
        let client = self.zk.client().await?;
        let Some((name, msg, claim)) = self.current(&client, receipt).await? else {
            return Err(self.gone(receipt));
        };
        let (attempts, _) = split_message(&msg.0);
        let options = self.options(&client).await?;
        if attempts >= options.max_attempts {
            return if self
                .dead_letter(&client, &options, &name, &msg, Some(&claim))
                .await?
            {
                Ok(())
            } else {
                Err(self.stale(receipt))
            };
        }
        let mut w = client.new_multi_writer();
        let map = crate::error::map_error;
        let claim_path = format!("{}/{name}", self.claims);
        w.add_check_version(&format!("{}/{name}", self.messages), msg.1.version)
            .map_err(map)?;
        w.add_delete(&claim_path, Some(claim.1.version))
            .map_err(map)?;
        if !delay.is_zero() {
            let at = now_ms() + delay.as_millis() as i64;
            w.add_create(
                &claim_path,
                format!("{at}:{NOBODY}").as_bytes(),
                &self.zk.options(CreateMode::Persistent),
            )
            .map_err(map)?;
        }
        match w.commit().await {
            Ok(_) => Ok(()),
            Err(_) => Err(self.stale(receipt)),
        }
    }

    async fn extend(&self, receipt: &Receipt, visibility_timeout: Duration) -> Result<()> {
        let client = self.zk.client().await?;
        let Some((name, msg, claim)) = self.current(&client, receipt).await? else {
            return Err(self.gone(receipt));
        };
        let nonce = parse_claim(&claim.0).nonce;
        let at = now_ms() + visibility_timeout.as_millis() as i64;
        let mut w = client.new_multi_writer();
        let map = crate::error::map_error;
        w.add_check_version(&format!("{}/{name}", self.messages), msg.1.version)
            .map_err(map)?;
        w.add_set_data(
            &format!("{}/{name}", self.claims),
            format!("{at}:{nonce}").as_bytes(),
            Some(claim.1.version),
        )
        .map_err(map)?;
        match w.commit().await {
            Ok(_) => Ok(()),
            Err(_) => Err(self.stale(receipt)),
        }
    }

    async fn depth(&self) -> Result<QueueDepth> {
        let client = self.zk.client().await?;
        self.sweep_feeders(&client).await?;
        let (messages, claims) = self.snapshot(&client).await?;
        let now = now_ms();
        let mut depth = QueueDepth::default();
        for name in messages {
            let held = claims
                .get(&name)
                .map(|c| parse_claim(&c.0))
                .is_some_and(|c| c.visible_at > now && c.nonce != NOBODY);
            if held {
                depth.in_flight += 1;
            } else {
                depth.ready += 1;
            }
        }
        Ok(depth)
    }
}
