//! Where everything lives.
//!
//! Every key-like record is a message on one JetStream KV bucket (`dprim`,
//! stream `KV_dprim`). A dprim key maps onto KV key tokens: `/` becomes the
//! token separator `.`, and a `.` inside a segment becomes `=2E` (`=` is not
//! portable, so the escape is reversible and never collides). Each namespace
//! owns the subtree `<ns tokens>`; each primitive an area whose first token
//! starts with `=`, which no escaped app segment can produce:
//!
//! ```text
//! <ns>.=k.<key>                 app keys
//! <ns>.=s.<session>             session heartbeats (per-message TTL)
//! <ns>.=x.<session>.<hash>      index of a session's ephemeral records (value: subject)
//! <ns>.=l.<name>.=w.<uid>       lock line
//! <ns>.=e.<name>.=w.<uid>       election line
//! <ns>.=q.<queue>.=c.<seq>      queue claims (in-flight deliveries)
//! <ns>.=q.<queue>.=o            queue options
//! <ns>.=q.<queue>.=f.<hash>     queues dead-lettering into <queue> (value: name)
//! ```
//! Queue messages live on a work-queue stream (`DPRIM_QUEUES`) under
//! `dprimq.<ns>.<queue>.=m`; topics are core subjects `dprim.<ns>.=t.<topic>`.

use dprim::Key;

/// Its stream.
pub(crate) const KV_STREAM: &str = "KV_dprim";
/// Subject prefix of the bucket's keys.
pub(crate) const KV_PREFIX: &str = "$KV.dprim.";
/// The work-queue stream of every queue.
pub(crate) const QUEUE_STREAM: &str = "DPRIM_QUEUES";
/// Its subjects.
pub(crate) const QUEUE_SUBJECTS: &str = "dprimq.>";
/// A record written when the bucket is created, so the stream's last
/// sequence (a listing's revision) is never zero.
pub(crate) const META_SUBJECT: &str = "$KV.dprim.=meta";

/// A key's tokens: `/` -> `.`, `.` -> `=2E`.
pub(crate) fn tokens(key: &Key) -> String {
    key.segments()
        .map(|s| s.replace('.', "=2E"))
        .collect::<Vec<_>>()
        .join(".")
}

/// The inverse of [`tokens`].
pub(crate) fn key_of(tokens: &str) -> Option<Key> {
    let path = tokens
        .split('.')
        .map(|t| t.replace("=2E", "."))
        .collect::<Vec<_>>()
        .join("/");
    Key::new(path).ok()
}

/// FNV-1a, for short stable names (consumer names, index entries).
pub(crate) fn hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[derive(Clone, Debug)]
pub(crate) struct Layout {
    ns: String,
}

impl Layout {
    pub(crate) fn new(namespace: &Key) -> Layout {
        Layout {
            ns: tokens(namespace),
        }
    }

    fn area(&self, area: &str) -> String {
        format!("{KV_PREFIX}{}.{area}", self.ns)
    }

    /// The subject of an app key.
    pub(crate) fn kv_key(&self, key: &Key) -> String {
        format!("{}.{}", self.area("=k"), tokens(key))
    }

    /// The filter covering keys under `dir`: immediate children or all.
    pub(crate) fn kv_dir_filter(&self, dir: &Key, recursive: bool) -> String {
        let base = if dir.is_root() {
            self.area("=k")
        } else {
            format!("{}.{}", self.area("=k"), tokens(dir))
        };
        format!("{base}.{}", if recursive { ">" } else { "*" })
    }

    /// The app key of a subject in the kv area.
    pub(crate) fn app_key(&self, subject: &str) -> Option<Key> {
        let rest = subject.strip_prefix(&self.area("=k"))?.strip_prefix('.')?;
        key_of(rest)
    }

    pub(crate) fn heartbeat(&self, session: u64) -> String {
        format!("{}.{session:016x}", self.area("=s"))
    }

    pub(crate) fn heartbeats(&self) -> String {
        format!("{}.*", self.area("=s"))
    }

    /// The session id of a heartbeat subject.
    pub(crate) fn heartbeat_session(&self, subject: &str) -> Option<u64> {
        let rest = subject.strip_prefix(&self.area("=s"))?.strip_prefix('.')?;
        u64::from_str_radix(rest, 16).ok()
    }

    pub(crate) fn index_entry(&self, session: u64, subject: &str) -> String {
        format!("{}.{session:016x}.{}", self.area("=x"), hash(subject))
    }

    pub(crate) fn index_of(&self, session: u64) -> String {
        format!("{}.{session:016x}.*", self.area("=x"))
    }

    pub(crate) fn index_all(&self) -> String {
        format!("{}.*.*", self.area("=x"))
    }

    /// The session of an index subject.
    pub(crate) fn index_session(&self, subject: &str) -> Option<u64> {
        let rest = subject.strip_prefix(&self.area("=x"))?.strip_prefix('.')?;
        u64::from_str_radix(rest.split('.').next()?, 16).ok()
    }

    pub(crate) fn lock_line(&self, name: &Key) -> String {
        format!("{}.{}.=w", self.area("=l"), tokens(name))
    }

    pub(crate) fn election_line(&self, name: &Key) -> String {
        format!("{}.{}.=w", self.area("=e"), tokens(name))
    }

    fn queue_area(&self, queue: &Key) -> String {
        format!("{}.{}", self.area("=q"), tokens(queue))
    }

    pub(crate) fn queue_claim(&self, queue: &Key, seq: u64) -> String {
        format!("{}.=c.{seq}", self.queue_area(queue))
    }

    /// Whether `subject` is a queue's claim.
    pub(crate) fn is_queue_claim(&self, subject: &str) -> bool {
        subject
            .strip_prefix(&self.area("=q"))
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|rest| rest.rsplit_once(".=c."))
            .is_some_and(|(_, seq)| !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()))
    }

    pub(crate) fn queue_claims(&self, queue: &Key) -> String {
        format!("{}.=c.*", self.queue_area(queue))
    }

    pub(crate) fn queue_options(&self, queue: &Key) -> String {
        format!("{}.=o", self.queue_area(queue))
    }

    pub(crate) fn queue_feeder(&self, dead_letter: &Key, feeder: &Key) -> String {
        format!(
            "{}.=f.{}",
            self.queue_area(dead_letter),
            hash(feeder.as_str())
        )
    }

    pub(crate) fn queue_feeders(&self, dead_letter: &Key) -> String {
        format!("{}.=f.*", self.queue_area(dead_letter))
    }

    /// The work-queue subject of a queue's messages.
    pub(crate) fn queue_messages(&self, queue: &Key) -> String {
        format!("dprimq.{}.{}.=m", self.ns, tokens(queue))
    }

    /// The core subject of a topic.
    pub(crate) fn topic(&self, topic: &Key) -> String {
        format!("dprim.{}.=t.{}", self.ns, tokens(topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_dots_are_escaped() {
        for k in ["a", "a/b.c/d", ".x/..y./z", "A-Z_a.z/0-9"] {
            let key = Key::new(k).unwrap();
            let t = tokens(&key);
            assert_eq!(t.split('.').count(), key.depth(), "{t}");
            assert_eq!(key_of(&t).unwrap(), key);
        }
        let l = Layout::new(&Key::new("ns/x").unwrap());
        let k = Key::new("a.b/c").unwrap();
        assert_eq!(l.kv_key(&k), "$KV.dprim.ns.x.=k.a=2Eb.c");
        assert_eq!(l.app_key(&l.kv_key(&k)), Some(k));
        assert_eq!(
            l.kv_dir_filter(&Key::new("a").unwrap(), false),
            "$KV.dprim.ns.x.=k.a.*"
        );
    }
}
