//! A forced ZooKeeper session expiry: every lock guard and leadership of
//! that session reports `SessionLost` (and proclaim `NotLeader`), its
//! ephemeral keys vanish, and the backend keeps serving new sessions,
//! locks, elections and kv work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::{Config, ErrorKind, Key, KvExt, Value};
use std::time::Duration;
use support::Servers;

const PORT: u16 = 2283;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiry_reports_session_lost_everywhere_and_backend_keeps_serving() {
    let servers = Servers::new("expiry", Some(PORT));
    servers.script(&["start"]);
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"zookeeper\"\nendpoints = [\"127.0.0.1:{PORT}\"]\nnamespace = \"expiry\"\n"
    ))
    .unwrap();
    let backend = dprim_zookeeper::connect(&config.backend).await.unwrap();
    let ttl = Duration::from_secs(4);
    let session = backend.sessions().open(ttl).await.unwrap();

    let lock_a = Key::new("locks/a").unwrap();
    let lock_b = Key::new("locks/b").unwrap();
    let election = Key::new("leader").unwrap();
    let eph = Key::new("members/me").unwrap();
    let guard_a = backend
        .locks()
        .lock(&lock_a, &session, Duration::from_secs(5))
        .await
        .unwrap();
    let guard_b = backend
        .locks()
        .try_lock(&lock_b, &session)
        .await
        .unwrap()
        .expect("lock b is free");
    let leadership = backend
        .elections()
        .campaign(&election, Value::new(b"old".to_vec()).unwrap(), &session)
        .await
        .unwrap();
    backend
        .kv()
        .put_ephemeral(&eph, Value::new(b"x".to_vec()).unwrap(), &session)
        .await
        .unwrap();

    backend
        .faults()
        .expect("zookeeper offers fault hooks")
        .expire_session(session.id())
        .await
        .unwrap();

    for (what, lost) in [
        (
            "lock a",
            tokio::time::timeout(Duration::from_secs(10), guard_a.lost()).await,
        ),
        (
            "lock b",
            tokio::time::timeout(Duration::from_secs(10), guard_b.lost()).await,
        ),
        (
            "leadership",
            tokio::time::timeout(Duration::from_secs(10), leadership.lost()).await,
        ),
    ] {
        let e = lost.unwrap_or_else(|_| panic!("{what}: lost() did not resolve"));
        assert_eq!(e.kind(), ErrorKind::SessionLost, "{what}: {e}");
    }
    assert_eq!(guard_a.check().unwrap_err().kind(), ErrorKind::SessionLost);
    assert_eq!(
        leadership.check().unwrap_err().kind(),
        ErrorKind::SessionLost
    );
    let e = leadership
        .proclaim(Value::new(b"stale".to_vec()).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotLeader, "{e}");
    // Work tied to the dead session is refused, never silently done.
    let e = backend
        .kv()
        .put_ephemeral(&eph, Value::new(b"y".to_vec()).unwrap(), &session)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::SessionLost, "{e}");
    let e = backend
        .locks()
        .try_lock(&Key::new("locks/c").unwrap(), &session)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::SessionLost, "{e}");
    assert_eq!(
        backend.kv().get(&eph).await.unwrap(),
        None,
        "ephemeral key outlived its session"
    );

    // The backend keeps serving new work on new sessions.
    let fresh = backend.sessions().open(ttl).await.unwrap();
    assert_ne!(fresh.id(), session.id());
    let new_a = backend
        .locks()
        .lock(&lock_a, &fresh, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(new_a.fencing_token() > guard_a.fencing_token());
    let new_lead = backend
        .elections()
        .campaign(&election, Value::new(b"new".to_vec()).unwrap(), &fresh)
        .await
        .unwrap();
    assert!(new_lead.term() > leadership.term());
    let current = backend
        .elections()
        .leader(&election)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(current.term, new_lead.term());
    assert_eq!(current.value.as_bytes(), b"new");
    backend
        .kv()
        .put(
            &Key::new("after").unwrap(),
            Value::new(b"ok".to_vec()).unwrap(),
        )
        .await
        .unwrap();
    // Releasing the old guard after its session was lost succeeds and does
    // not disturb the new holder.
    guard_a.unlock().await.unwrap();
    assert!(new_a.check().is_ok());
    new_a.unlock().await.unwrap();
    new_lead.resign().await.unwrap();
    fresh.close().await.unwrap();
}
