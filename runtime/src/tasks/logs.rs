//! A task's output (`stdout` and `stderr` of one launch), read through the
//! backend, so `dprim task logs` works wherever the agent runs and on every
//! backend alike.
//!
//! Each agent runs a [`LogServer`]: it subscribes to its request topic
//! `_dprim/logs/request/<agent>` and answers each request
//! with one chunk of at most [`CHUNK_BYTES`] read from the launch's sandbox
//! file, published on the reply topic the request names (always under
//! `_dprim/logs/reply/`). The client ([`TaskLogs`]) finds the agent from the
//! task's record, subscribes to a fresh reply topic *before* it publishes a
//! request (pub/sub delivers only what is published after a subscribe), and
//! pages through the file with offsets; the reply carries the file's size so
//! the client knows when it has caught up.
//!
//! A reply is one message: a JSON header line, `\n`, then the raw bytes
//! (JSON-encoding the bytes would triple their size).
//!
//! Pub/sub is at-most-once: a lost request or reply shows up as a missing
//! answer, and the client asks again once before giving up.

use super::store::{self, Report, StatusRecord};
use dprim::{
    Backend, Error, ErrorKind, Key, Result, Subscription, SubscriptionItem, Value, MAX_VALUE_BYTES,
};
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Most bytes of output one reply carries: well under the value limit, so a
/// reply fits every backend's message size with its header.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// How long a client waits for an agent's answer by default.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a client asks before saying the agent does not answer: once
/// more covers a request or reply lost in flight.
const ATTEMPTS: u32 = 2;

/// Largest JSON header of a reply we accept (error messages included).
const MAX_HEADER_BYTES: usize = MAX_VALUE_BYTES - CHUNK_BYTES;

/// Which output file of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// The task's standard output (`<sandbox>/stdout`).
    Stdout,
    /// The task's standard error (`<sandbox>/stderr`).
    Stderr,
}

impl LogStream {
    /// The file's name in the sandbox, which is also how it is shown.
    pub fn name(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

/// A request from a client to an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct LogRequest {
    /// Chosen by the client, echoed in the reply: a late reply to an earlier
    /// (retried) request is recognised and skipped.
    id: u64,
    task: String,
    launch: u32,
    stream: LogStream,
    offset: u64,
    max_bytes: u64,
    reply_topic: String,
}

/// The header line of a reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ReplyHeader {
    id: u64,
    /// Offset of the first byte carried.
    #[serde(default)]
    offset: u64,
    /// The file's size when it was read.
    #[serde(default)]
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ReplyError>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ReplyError {
    kind: String,
    message: String,
}

fn request_topic(agent: &str) -> Result<Key> {
    store::key(format!("_dprim/logs/request/{agent}"))
}

fn reply_dir() -> Result<Key> {
    store::key("_dprim/logs/reply".into())
}

/// The error kinds an agent sends back, by name; anything else is shown as
/// unexpected.
fn kind_named(name: &str) -> ErrorKind {
    [
        ErrorKind::NotFound,
        ErrorKind::InvalidArgument,
        ErrorKind::Unavailable,
        ErrorKind::PermissionDenied,
    ]
    .into_iter()
    .find(|k| k.as_str() == name)
    .unwrap_or(ErrorKind::Unexpected)
}

/// A task id as a single, portable path segment, or an error naming it.
/// Only ids that pass are ever joined onto the work dir, so a request can
/// never name a path outside the sandboxes (the grammar has no `/`, and
/// rejects `.` and `..`).
fn task_segment(task: &str) -> Result<&str> {
    match Key::new(task) {
        Ok(k) if k.depth() == 1 && k.as_str() == task => Ok(task),
        _ => Err(Error::invalid(format!(
            "`{}` is not a task id",
            task.escape_debug()
        ))),
    }
}

/// The output of a launch running (or run) on some agent, read through the
/// backend. Made by [`TasksClient::logs`](super::client::TasksClient::logs).
pub struct TaskLogs {
    backend: Backend,
    task: String,
    launch: u32,
    agent: String,
    stream: LogStream,
    request_topic: Key,
    reply_topic: Key,
    replies: Subscription,
    next_id: u64,
    timeout: Duration,
}

impl std::fmt::Debug for TaskLogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskLogs")
            .field("task", &self.task)
            .field("launch", &self.launch)
            .field("agent", &self.agent)
            .field("stream", &self.stream)
            .finish()
    }
}

/// Bytes of output starting at `offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogChunk {
    /// Offset of `data[0]` in the file.
    pub offset: u64,
    /// The bytes (empty at the end of what has been written so far).
    pub data: Vec<u8>,
    /// The file's size when the agent read it.
    pub size: u64,
}

impl TaskLogs {
    /// Finds the agent that ran `launch` (default: the latest launch) of
    /// the task in `record` and subscribes to a fresh reply topic.
    ///
    /// # Behavior
    /// - A launch outside `1..=launches` is `NotFound`, naming the range.
    /// - The latest launch not yet placed on an agent is `NotFound`, saying
    ///   so (and pointing at the previous launch, if any).
    /// - An earlier launch no agent reported on is `NotFound`.
    /// - An agent that is not registered is `Unavailable`, naming it.
    pub(crate) async fn open(
        backend: Backend,
        record: StatusRecord,
        launch: Option<u32>,
        stream: LogStream,
    ) -> Result<TaskLogs> {
        let task = record.id.clone();
        task_segment(&task)?;
        let latest = record.record.launches;
        let launch = launch.unwrap_or(latest);
        if launch == 0 || launch > latest {
            return Err(Error::not_found(format!(
                "task `{task}` has no launch {launch}; its launches are 1 to {latest}"
            )));
        }
        let agent = if launch == latest {
            match record.record.agent.clone() {
                Some(agent) => agent,
                None => {
                    let previous = if latest > 1 {
                        format!("; `--launch {}` shows the previous launch", latest - 1)
                    } else {
                        String::new()
                    };
                    return Err(Error::not_found(format!(
                        "task `{task}` is not placed on an agent yet, so it has no output \
                         ({}: {}){previous}",
                        format!("{:?}", record.record.state).to_uppercase(),
                        record.record.message
                    )));
                }
            }
        } else {
            // The record only names the current launch's agent; an
            // earlier launch is known by its agent's report.
            match store::get::<Report>(&backend, &store::report_key(&task, launch)?).await? {
                Some((report, _)) => report.agent,
                None => {
                    return Err(Error::not_found(format!(
                        "launch {launch} of task `{task}` never started on an agent, so it has \
                         no output"
                    )))
                }
            }
        };
        let request_topic = request_topic(&agent)?;
        let reply_topic = reply_dir()?.join(format!("{:016x}", rand::random::<u64>()))?;
        // Subscribed before any request is published: a reply is only
        // delivered to subscriptions that exist when it is published.
        let replies = backend.pubsub().subscribe(&reply_topic).await?;
        let logs = TaskLogs {
            backend,
            task,
            launch,
            agent,
            stream,
            request_topic,
            reply_topic,
            replies,
            next_id: 0,
            timeout: ANSWER_TIMEOUT,
        };
        logs.check_registered().await?;
        Ok(logs)
    }

    /// Waits at most `timeout` for each answer (default [`ANSWER_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> TaskLogs {
        self.timeout = timeout;
        self
    }

    /// The task's id.
    pub fn task(&self) -> &str {
        &self.task
    }

    /// The launch being read (1 for the first).
    pub fn launch(&self) -> u32 {
        self.launch
    }

    /// The agent that ran it.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// Which output file.
    pub fn stream(&self) -> LogStream {
        self.stream
    }

    async fn check_registered(&self) -> Result<()> {
        let registered = self
            .backend
            .kv()
            .get(&store::agent_key(&self.agent)?)
            .await?
            .is_some();
        if registered {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "agent `{}`, which ran launch {} of task `{}`, is not registered (stopped, or its \
                 session expired), so nobody can read its output; it stays in that agent's \
                 work dir under {}/{}/{}",
                self.agent,
                self.launch,
                self.task,
                self.task,
                self.launch,
                self.stream.name()
            ),
        )
        .with_context("agent", &self.agent))
    }

    /// Reads at most `max_bytes` (capped at [`CHUNK_BYTES`]) from `offset`.
    /// `max_bytes` 0 asks only for the size.
    ///
    /// # Behavior
    /// - Asks the agent; a request or reply lost in flight is asked again
    ///   once. An agent that does not answer is `Timeout` (or `Unavailable`
    ///   when it is no longer registered), naming it.
    /// - An error the agent answers with (e.g. `NotFound`: it has no
    ///   sandbox for this launch) is returned with its kind.
    pub async fn read(&mut self, offset: u64, max_bytes: usize) -> Result<LogChunk> {
        for _ in 0..ATTEMPTS {
            self.next_id += 1;
            let request = LogRequest {
                id: self.next_id,
                task: self.task.clone(),
                launch: self.launch,
                stream: self.stream,
                offset,
                max_bytes: max_bytes.min(CHUNK_BYTES) as u64,
                reply_topic: self.reply_topic.as_str().to_string(),
            };
            let bytes = serde_json::to_vec(&request)
                .map_err(|e| Error::unexpected(format!("encoding a log request: {e}")))?;
            self.backend
                .pubsub()
                .publish(&self.request_topic, Value::new(bytes)?)
                .await?;
            if let Some(chunk) = self.answer(self.next_id).await? {
                return Ok(chunk);
            }
        }
        self.check_registered().await?;
        Err(Error::timeout(format!(
            "agent `{}` did not answer within {} (asked {ATTEMPTS} times); is it running?",
            self.agent,
            humantime::format_duration(self.timeout)
        ))
        .with_context("agent", &self.agent))
    }

    /// The reply to request `id`, or `None` when it did not come in time.
    async fn answer(&mut self, id: u64) -> Result<Option<LogChunk>> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let item = match tokio::time::timeout_at(deadline, self.replies.next()).await {
                Err(_) => return Ok(None),
                Ok(None) => {
                    return Err(Error::closed(
                        "the subscription for the agent's answers ended",
                    ))
                }
                Ok(Some(item)) => item?,
            };
            let message = match item {
                SubscriptionItem::Message(m) => m,
                // Our reply may be among those missed; the deadline, then
                // the retry, covers it.
                SubscriptionItem::Lagged(_) => continue,
            };
            let Some((header, data)) = split_reply(message.payload.as_bytes()) else {
                tracing::debug!(topic = %message.topic, "ignoring an unreadable log reply");
                continue;
            };
            if header.id != id {
                continue; // a late answer to an earlier attempt
            }
            if let Some(e) = header.error {
                return Err(
                    Error::new(kind_named(&e.kind), e.message).with_context("agent", &self.agent)
                );
            }
            return Ok(Some(LogChunk {
                offset: header.offset,
                data: data.to_vec(),
                size: header.size,
            }));
        }
    }

    /// The file's current size.
    pub async fn size(&mut self) -> Result<u64> {
        Ok(self.read(0, 0).await?.size)
    }

    /// Everything from `offset` to the end of what is written so far.
    pub async fn read_to_end(&mut self, mut offset: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let chunk = self.read(offset, CHUNK_BYTES).await?;
            offset += chunk.data.len() as u64;
            let empty = chunk.data.is_empty();
            out.extend_from_slice(&chunk.data);
            if empty || offset >= chunk.size {
                return Ok(out);
            }
        }
    }

    /// Whether this launch has ended: the task is in a terminal state of
    /// this launch, or a later launch exists. Its output no longer grows
    /// (except by processes it left behind).
    pub async fn ended(&self) -> Result<bool> {
        let key = store::status_key(&self.task)?;
        match store::get::<StatusRecord>(&self.backend, &key).await? {
            Some((r, _)) => Ok(r.record.launches > self.launch
                || (r.record.launches == self.launch && r.record.state.is_terminal())),
            // The record is gone: nothing will write to this launch again.
            None => Ok(true),
        }
    }
}

fn encode_reply(header: &ReplyHeader, data: &[u8]) -> Result<Value> {
    let mut bytes = serde_json::to_vec(header)
        .map_err(|e| Error::unexpected(format!("encoding a log reply: {e}")))?;
    bytes.push(b'\n');
    bytes.extend_from_slice(data);
    Value::new(bytes)
}

/// Header and data of a reply; `None` when it is not one. Compact JSON never
/// contains a raw newline, so the first one ends the header.
fn split_reply(bytes: &[u8]) -> Option<(ReplyHeader, &[u8])> {
    let end = bytes.iter().position(|b| *b == b'\n')?;
    if end > MAX_HEADER_BYTES {
        return None;
    }
    let header = serde_json::from_slice(&bytes[..end]).ok()?;
    Some((header, &bytes[end + 1..]))
}

/// Reads what a request asks for from the agent's work dir.
///
/// The path is built only from the work dir, a task id that is one portable
/// key segment, the launch number and a fixed file name; the file must be a
/// regular file, not a symlink (a task could plant one to expose another
/// file), and is opened without following one.
fn read_chunk(
    agent: &str,
    work_dir: &Path,
    task: &str,
    launch: u32,
    stream: LogStream,
    offset: u64,
    max_bytes: u64,
) -> Result<(u64, Vec<u8>)> {
    let task = task_segment(task)?;
    let sandbox = work_dir.join(task).join(launch.to_string());
    // Both levels the agent created must be real directories: a symlink
    // there (planted by a task) would lead outside the work dir.
    let real_dir = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_dir());
    if !real_dir(&work_dir.join(task)) || !real_dir(&sandbox) {
        return Err(Error::not_found(format!(
            "agent `{agent}` has no launch {launch} of task `{task}` (no sandbox directory at {}; \
             an ended launch's sandbox is deleted after the agent's --sandbox-retention, 1h by default)",
            sandbox.display()
        )));
    }
    let path = sandbox.join(stream.name());
    let io = |e: std::io::Error| {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            _ => ErrorKind::Unavailable,
        };
        Error::new(
            kind,
            format!("agent `{agent}` cannot read {}: {e}", path.display()),
        )
    };
    let link = std::fs::symlink_metadata(&path).map_err(io)?;
    if !link.file_type().is_file() {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "agent `{agent}` does not serve {}: it is not a regular file",
                path.display()
            ),
        ));
    }
    let mut file = std::fs::File::open(&path).map_err(io)?;
    let opened = file.metadata().map_err(io)?;
    // The name may have been swapped for a symlink between the check and
    // the open: serve it only if it is still the file that was checked.
    {
        use std::os::unix::fs::MetadataExt;
        if opened.dev() != link.dev() || opened.ino() != link.ino() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "{} changed while agent `{agent}` opened it; ask again",
                    path.display()
                ),
            ));
        }
    }
    let size = opened.len();
    if offset >= size || max_bytes == 0 {
        return Ok((size, Vec::new()));
    }
    file.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut data = Vec::new();
    file.take(max_bytes.min(CHUNK_BYTES as u64))
        .read_to_end(&mut data)
        .map_err(io)?;
    // The file may have grown since its size was taken.
    Ok((size.max(offset + data.len() as u64), data))
}

/// Answers log requests for one agent until dropped.
#[derive(Debug)]
pub struct LogServer {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LogServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LogServer {
    /// Subscribes to the agent's request topic, then serves in the
    /// background until the returned server is dropped.
    ///
    /// Subscribing before returning means that once the agent has
    /// registered, its requests are heard. A failure to subscribe is not
    /// fatal to the agent (its tasks run regardless): it is logged and the
    /// server keeps trying.
    pub async fn start(backend: Backend, agent: &str, work_dir: PathBuf) -> LogServer {
        let agent = agent.to_string();
        let subscription = match request_topic(&agent) {
            Ok(topic) => match backend.pubsub().subscribe(&topic).await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(agent = %agent, error = %e, "cannot listen for log requests yet; retrying");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(agent = %agent, error = %e, "no log requests can reach this agent");
                None
            }
        };
        LogServer {
            task: tokio::spawn(serve(backend, agent, work_dir, subscription)),
        }
    }
}

async fn serve(
    backend: Backend,
    agent: String,
    work_dir: PathBuf,
    mut subscription: Option<Subscription>,
) {
    let Ok(topic) = request_topic(&agent) else {
        return;
    };
    let Ok(replies) = reply_dir() else {
        return;
    };
    loop {
        let mut requests = match subscription.take() {
            Some(s) => s,
            None => match backend.pubsub().subscribe(&topic).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(agent = %agent, error = %e, "cannot listen for log requests; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        while let Some(item) = requests.next().await {
            match item {
                Ok(SubscriptionItem::Message(m)) => {
                    answer(&backend, &agent, &work_dir, &replies, m.payload.as_bytes()).await
                }
                // Clients whose requests were dropped ask again.
                Ok(SubscriptionItem::Lagged(n)) => {
                    tracing::warn!(agent = %agent, missed = n, "log requests arrived faster than they were answered")
                }
                Err(e) => {
                    tracing::warn!(agent = %agent, error = %e, "log request subscription failed; subscribing again");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn answer(backend: &Backend, agent: &str, work_dir: &Path, replies: &Key, request: &[u8]) {
    let request: LogRequest = match serde_json::from_slice(request) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(agent = %agent, error = %e, "ignoring an unreadable log request");
            return;
        }
    };
    // Replies go only to the reply area: an agent never publishes on an
    // app's topics on someone's behalf.
    let reply_topic = match Key::new(&request.reply_topic) {
        Ok(k) if k.is_child_of(replies) => k,
        _ => {
            tracing::debug!(agent = %agent, topic = %request.reply_topic.escape_debug(), "ignoring a log request with a bad reply topic");
            return;
        }
    };
    let read = {
        let agent = agent.to_string();
        let work_dir = work_dir.to_path_buf();
        let r = request.clone();
        tokio::task::spawn_blocking(move || {
            read_chunk(
                &agent,
                &work_dir,
                &r.task,
                r.launch,
                r.stream,
                r.offset,
                r.max_bytes,
            )
        })
        .await
        .unwrap_or_else(|e| Err(Error::unexpected(format!("reading task output: {e}"))))
    };
    let (header, data) = match read {
        Ok((size, data)) => (
            ReplyHeader {
                id: request.id,
                offset: request.offset,
                size,
                error: None,
            },
            data,
        ),
        Err(e) => (
            ReplyHeader {
                id: request.id,
                offset: request.offset,
                size: 0,
                error: Some(ReplyError {
                    kind: e.kind().as_str().to_string(),
                    message: e.message().to_string(),
                }),
            },
            Vec::new(),
        ),
    };
    let published = match encode_reply(&header, &data) {
        Ok(value) => backend.pubsub().publish(&reply_topic, value).await,
        Err(e) => Err(e),
    };
    if let Err(e) = published {
        tracing::warn!(agent = %agent, error = %e, "cannot answer a log request");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dprim-logs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("t1").join("1")).unwrap();
        d
    }

    #[test]
    fn reads_chunks_and_sizes() {
        let d = dir("chunks");
        std::fs::write(d.join("t1/1/stdout"), b"hello world").unwrap();
        let read = |offset, max| read_chunk("a1", &d, "t1", 1, LogStream::Stdout, offset, max);
        assert_eq!(read(0, 5).unwrap(), (11, b"hello".to_vec()));
        assert_eq!(read(6, 100).unwrap(), (11, b"world".to_vec()));
        assert_eq!(read(11, 100).unwrap(), (11, Vec::new()));
        assert_eq!(read(50, 100).unwrap(), (11, Vec::new()));
        assert_eq!(read(0, 0).unwrap(), (11, Vec::new()));
        let big = vec![7u8; CHUNK_BYTES * 2];
        std::fs::write(d.join("t1/1/stderr"), &big).unwrap();
        let (size, data) = read_chunk("a1", &d, "t1", 1, LogStream::Stderr, 0, u64::MAX).unwrap();
        assert_eq!((size, data.len()), (big.len() as u64, CHUNK_BYTES));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn never_reads_outside_a_sandbox() {
        let d = dir("outside");
        for task in ["..", ".", "../t1", "t1/1", "", "a b", "/etc"] {
            let e = read_chunk("a1", &d, task, 1, LogStream::Stdout, 0, 10).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{task:?}: {e}");
        }
        let e = read_chunk("a1", &d, "t2", 1, LogStream::Stdout, 0, 10).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.message().contains("no launch 1 of task `t2`"), "{e}");
        let e = read_chunk("a1", &d, "t1", 2, LogStream::Stdout, 0, 10).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        // A symlink planted in place of the output file is not followed.
        std::fs::write(d.join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink(d.join("secret"), d.join("t1/1/stdout")).unwrap();
        let e = read_chunk("a1", &d, "t1", 1, LogStream::Stdout, 0, 10).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn replies_round_trip_binary_data() {
        let header = ReplyHeader {
            id: 3,
            offset: 10,
            size: 20,
            error: None,
        };
        let data: Vec<u8> = (0..=255u8).chain([b'\n', 0]).collect();
        let value = encode_reply(&header, &data).unwrap();
        let (h, d) = split_reply(value.as_bytes()).unwrap();
        assert_eq!((h, d), (header.clone(), data.as_slice()));
        let most = encode_reply(&header, &vec![0u8; CHUNK_BYTES]).unwrap();
        assert!(most.len() < MAX_VALUE_BYTES);
        assert!(split_reply(b"no newline").is_none());
        assert!(split_reply(b"{not json}\nxx").is_none());
    }

    #[test]
    fn error_kinds_survive_the_reply() {
        assert_eq!(kind_named("not_found"), ErrorKind::NotFound);
        assert_eq!(kind_named("invalid_argument"), ErrorKind::InvalidArgument);
        assert_eq!(kind_named("something_new"), ErrorKind::Unexpected);
    }
}
