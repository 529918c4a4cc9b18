//! Where everything lives in etcd's flat keyspace.
//!
//! ```text
//! <ns>/!kv/<key>                       app keys
//! <ns>/!lock/<name>/!/<lease>-<nonce>  lock waiters (create revision = place in line)
//! <ns>/!elect/<name>/!/<lease>-<nonce> candidates (value = candidate value)
//! <ns>/!topic/<topic>                  last message of a topic (watched, not read)
//! <ns>/!queue/<name>/!m/<id>           queue messages
//! <ns>/!queue/<name>/!c/<id>           claims (in-flight deliveries)
//! <ns>/!queue/<name>/!options          queue options
//! <ns>/!queue/<name>/!f/<queue>        <queue> dead-letters into <name>
//! ```
//! `!` is not in the portable key grammar, so no app key, name or nested
//! namespace can produce these paths.

use dprim::Key;

#[derive(Clone, Debug)]
pub(crate) struct Layout {
    root: String,
}

impl Layout {
    pub(crate) fn new(namespace: &str) -> Layout {
        Layout {
            root: format!("{namespace}/"),
        }
    }

    fn kv_root(&self) -> String {
        format!("{}!kv/", self.root)
    }

    /// The etcd key of an app key.
    pub(crate) fn kv_key(&self, key: &Key) -> Vec<u8> {
        format!("{}{}", self.kv_root(), key.as_str()).into_bytes()
    }

    /// The prefix holding every key strictly under `dir` (per segment).
    pub(crate) fn kv_dir_prefix(&self, dir: &Key) -> Vec<u8> {
        if dir.is_root() {
            self.kv_root().into_bytes()
        } else {
            format!("{}{}/", self.kv_root(), dir.as_str()).into_bytes()
        }
    }

    /// The app key of an etcd key under the kv area.
    pub(crate) fn app_key(&self, raw: &[u8]) -> Option<Key> {
        let s = std::str::from_utf8(raw).ok()?;
        Key::new(s.strip_prefix(&self.kv_root())?).ok()
    }

    pub(crate) fn lock_line(&self, name: &Key) -> Vec<u8> {
        format!("{}!lock/{}/!/", self.root, name.as_str()).into_bytes()
    }

    pub(crate) fn election_line(&self, name: &Key) -> Vec<u8> {
        format!("{}!elect/{}/!/", self.root, name.as_str()).into_bytes()
    }

    pub(crate) fn topic(&self, topic: &Key) -> Vec<u8> {
        format!("{}!topic/{}", self.root, topic.as_str()).into_bytes()
    }

    pub(crate) fn queue_messages(&self, queue: &Key) -> Vec<u8> {
        format!("{}!queue/{}/!m/", self.root, queue.as_str()).into_bytes()
    }

    pub(crate) fn queue_claims(&self, queue: &Key) -> Vec<u8> {
        format!("{}!queue/{}/!c/", self.root, queue.as_str()).into_bytes()
    }

    /// Markers naming the queues that dead-letter into `queue`.
    pub(crate) fn queue_feeders(&self, queue: &Key) -> Vec<u8> {
        format!("{}!queue/{}/!f/", self.root, queue.as_str()).into_bytes()
    }

    /// The line of a queue's waiting pulls. `!w/` sorts after every other
    /// `!` area of a queue, so a watch of those can leave it out.
    pub(crate) fn queue_waiters(&self, queue: &Key) -> Vec<u8> {
        format!("{}!queue/{}/!w/", self.root, queue.as_str()).into_bytes()
    }

    pub(crate) fn queue_options(&self, queue: &Key) -> Vec<u8> {
        format!("{}!queue/{}/!options", self.root, queue.as_str()).into_bytes()
    }
}

/// The end of the range holding every key that starts with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
