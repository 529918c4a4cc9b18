//! Where everything lives in ZooKeeper's tree.
//!
//! ```text
//! /<ns>/!kv/<key>                      app keys (data: 1 header byte + value)
//! /<ns>/!kv/!log/e-<seq>               change log, one record per kv change
//! /<ns>/!kv/!gen                       generation (data version grows when a key znode is removed)
//! /<ns>/!lock/<name>/!/w-<seq>         lock waiters (ephemeral sequential)
//! /<ns>/!elect/<name>/!/c-<seq>        candidates (data = candidate value)
//! /<ns>/!topic/<topic>/!/m-<seq>       recent messages of a topic
//! /<ns>/!queue/<name>/!m/b-<k>/m-<seq> queue messages, in buckets of about BUCKET_SPAN
//! /<ns>/!queue/<name>/!c/b-<k>.m-<seq> claims (in-flight deliveries)
//! /<ns>/!queue/<name>/!l/b-<k>.m-<seq> last-attempt markers (for the dead-letter sweep)
//! /<ns>/!queue/<name>/!options         queue options
//! /<ns>/!queue/<name>/!f/<queue>       <queue> dead-letters into <name>
//! ```
//! `!` is not in the portable key grammar, so no app key, name or nested
//! namespace can produce these paths. A kv key maps segment by segment onto
//! znodes; znodes that only exist as parents of deeper keys hold no data
//! (data length 0), which is how they are told apart from entries.

use dprim::Key;

#[derive(Clone, Debug)]
pub(crate) struct Layout {
    root: String,
}

impl Layout {
    pub(crate) fn new(namespace: &str) -> Layout {
        Layout {
            root: format!("/{namespace}"),
        }
    }

    pub(crate) fn kv_root(&self) -> String {
        format!("{}/!kv", self.root)
    }

    /// The znode of an app key (the kv root for the root key).
    pub(crate) fn kv_path(&self, key: &Key) -> String {
        if key.is_root() {
            self.kv_root()
        } else {
            format!("{}/!kv/{}", self.root, key.as_str())
        }
    }

    /// The app key of a znode path under the kv area; `None` for internal nodes.
    pub(crate) fn app_key(&self, path: &str) -> Option<Key> {
        let rest = path.strip_prefix(&self.kv_root())?.strip_prefix('/')?;
        if rest.split('/').any(|s| s.starts_with('!')) {
            return None;
        }
        Key::new(rest).ok()
    }

    pub(crate) fn log_dir(&self) -> String {
        format!("{}/!kv/!log", self.root)
    }

    pub(crate) fn gen_node(&self) -> String {
        format!("{}/!kv/!gen", self.root)
    }

    pub(crate) fn lock_line(&self, name: &Key) -> String {
        format!("{}/!lock/{}/!", self.root, name.as_str())
    }

    pub(crate) fn election_line(&self, name: &Key) -> String {
        format!("{}/!elect/{}/!", self.root, name.as_str())
    }

    pub(crate) fn topic(&self, topic: &Key) -> String {
        format!("{}/!topic/{}/!", self.root, topic.as_str())
    }

    pub(crate) fn queue(&self, queue: &Key) -> String {
        format!("{}/!queue/{}", self.root, queue.as_str())
    }
}

/// The parent path of a znode path (`/a/b` -> `/a`).
pub(crate) fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// The sequence number at the end of a sequential node's name.
pub(crate) fn sequence(name: &str) -> Option<i64> {
    let digits = name.rsplit('-').next()?;
    digits.parse().ok()
}
