//! Writes made through a failure (a leader killed, a partition) and the
//! check that none that was acknowledged got lost, for a backend's failover
//! tests:
//!
//! ```no_run
//! # async fn example(backend: dprim::Backend) -> Result<(), String> {
//! use dprim_conformance::failover::write_numbers;
//! use std::time::{Duration, Instant};
//! let dir = dprim::Key::new("w").map_err(|e| e.to_string())?;
//! let until = Instant::now() + Duration::from_secs(8);
//! let writer = tokio::spawn(write_numbers(backend.clone(), dir, move |_| Instant::now() < until));
//! // ... kill the leader, restart it ...
//! let writes = writer.await.map_err(|e| e.to_string())??;
//! writes.check_stored(&backend).await?;
//! # Ok(()) }
//! ```

use dprim::{Backend, Entry, ErrorKind, Key, KvExt, Value, Version};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What a writer did: its acknowledged writes and those whose outcome is
/// unknown. Write `n` puts the value `n` (in decimal).
#[derive(Debug, Default)]
pub struct Writes {
    /// Acknowledged writes in order: key, number, the version returned, and
    /// when the acknowledgement came.
    pub acked: Vec<(Key, u64, Version, Instant)>,
    /// Writes that failed `OutcomeUnknown` (they may have been applied):
    /// key and number.
    pub unknown: Vec<(Key, u64)>,
}

/// Keys written, in turn.
const KEYS: u64 = 10;
/// Pause after each acknowledged write.
const PAUSE: Duration = Duration::from_millis(20);

/// Puts 0, 1, 2, ... in turn into `dir/k0` to `dir/k9`, pausing 20 ms after
/// each acknowledged write, as long as `go_on` says so (it sees what was
/// done so far). `OutcomeUnknown` is the only failure allowed: a write in
/// flight when the server failed may have been applied, and no retry can
/// hide that without risking a second application. Any other failure is
/// returned: the retry layer should have hidden it.
pub async fn write_numbers(
    backend: Backend,
    dir: Key,
    mut go_on: impl FnMut(&Writes) -> bool + Send,
) -> Result<Writes, String> {
    let mut writes = Writes::default();
    let mut n = 0u64;
    while go_on(&writes) {
        let key = dir
            .join(format!("k{}", n % KEYS))
            .map_err(|e| e.to_string())?;
        let value = Value::new(n.to_string().into_bytes()).map_err(|e| e.to_string())?;
        match backend.kv().put(&key, value).await {
            Ok(version) => {
                writes.acked.push((key, n, version, Instant::now()));
                tokio::time::sleep(PAUSE).await;
            }
            Err(e) if e.kind() == ErrorKind::OutcomeUnknown => writes.unknown.push((key, n)),
            Err(e) => return Err(format!("write {n} failed through the retry layer: {e}")),
        }
        n += 1;
    }
    Ok(writes)
}

impl Writes {
    /// The last acknowledged write of each key: number and version.
    pub fn last_acked(&self) -> BTreeMap<Key, (u64, Version)> {
        self.acked
            .iter()
            .map(|(k, n, v, _)| (k.clone(), (*n, *v)))
            .collect()
    }

    /// Whether `entry` is what its key may hold now: its last acknowledged
    /// write (value and version), or a later write whose outcome is unknown.
    pub fn explains(&self, entry: &Entry) -> bool {
        let last = self.acked.iter().rev().find(|w| w.0 == entry.key);
        let Some(&(_, n, version, _)) = last else {
            return true;
        };
        let holds = |m: u64| entry.value.as_bytes() == m.to_string().as_bytes();
        (holds(n) && entry.version == version)
            || self
                .unknown
                .iter()
                .any(|(k, m)| k == &entry.key && *m > n && holds(*m))
    }

    /// Checks that every acknowledged write is there: each key written
    /// holds its last acknowledged write or a later one whose outcome is
    /// unknown. The error names the first key that does not.
    pub async fn check_stored(&self, backend: &Backend) -> Result<(), String> {
        for (key, (n, version)) in self.last_acked() {
            let entry = backend
                .kv()
                .get(&key)
                .await
                .map_err(|e| format!("reading {key}: {e}"))?
                .ok_or_else(|| {
                    format!("{key} is gone: write {n} ({version:?}) was acknowledged")
                })?;
            if !self.explains(&entry) {
                return Err(format!(
                    "{key} holds {:?} at {:?}, not write {n} ({version:?}) or a later one whose outcome is unknown",
                    entry.value, entry.version
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(raw: u64) -> Version {
        Version::new(raw).unwrap()
    }

    fn entry(key: &Key, value: u64, version: u64) -> Entry {
        Entry {
            key: key.clone(),
            value: Value::new(value.to_string().into_bytes()).unwrap(),
            version: v(version),
            session: None,
        }
    }

    #[test]
    fn a_key_must_hold_its_last_acked_write_or_a_later_unknown_one() {
        let (a, b) = (Key::new("w/a").unwrap(), Key::new("w/b").unwrap());
        let now = Instant::now();
        let writes = Writes {
            acked: vec![
                (a.clone(), 1, v(10), now),
                (b.clone(), 2, v(11), now),
                (a.clone(), 3, v(12), now),
            ],
            unknown: vec![(a.clone(), 0), (a.clone(), 4)],
        };
        assert!(writes.explains(&entry(&a, 3, 12)));
        // A later write whose outcome is unknown may have been applied.
        assert!(writes.explains(&entry(&a, 4, 13)));
        // An acknowledged write lost, or one older than it back.
        assert!(!writes.explains(&entry(&a, 1, 10)));
        assert!(!writes.explains(&entry(&a, 0, 9)));
        // The right value under another version than acknowledged.
        assert!(!writes.explains(&entry(&a, 3, 14)));
        assert!(writes.explains(&entry(&b, 2, 11)));
        // A key nobody acknowledged a write of says nothing.
        assert!(writes.explains(&entry(&Key::new("w/c").unwrap(), 7, 1)));
    }
}
