//! Timer-driven behaviour of the memory backend under tokio's paused clock,
//! so expiry orderings are checked exactly rather than with sleeps.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use dprim::{BackendConfig, ErrorKind, Key, KvExt, PullOptions, Value};
use dprim_memory::MemoryServer;
use std::time::Duration;
use tokio::time::Instant;

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

#[tokio::test(start_paused = true)]
async fn stalled_session_is_lost_before_the_server_expires_it() {
    let backend = MemoryServer::new()
        .connect(&BackendConfig::memory())
        .unwrap();
    let ttl = Duration::from_secs(3);
    let session = backend.sessions().open(ttl).await.unwrap();
    backend
        .kv()
        .put_ephemeral(&key("e"), Value::empty(), &session)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(session.is_alive());
    backend
        .faults()
        .unwrap()
        .stall_session(session.id())
        .await
        .unwrap();
    let lost = session.lost().await;
    assert_eq!(lost.kind(), ErrorKind::SessionLost);
    let lost_at = Instant::now();
    // The server has not expired it yet: the ephemeral key is still there.
    assert!(backend.kv().get(&key("e")).await.unwrap().is_some());
    tokio::time::sleep(ttl).await;
    assert!(backend.kv().get(&key("e")).await.unwrap().is_none());
    assert!(lost_at.elapsed() >= ttl);
}

#[tokio::test(start_paused = true)]
async fn visibility_timeout_redelivers_with_next_attempt() {
    let backend = MemoryServer::new()
        .connect(&BackendConfig::memory())
        .unwrap();
    let q = backend.queues().open(&key("q"), None).await.unwrap();
    q.push(Value::new(b"m".to_vec()).unwrap()).await.unwrap();
    let opts = PullOptions {
        visibility_timeout: Duration::from_secs(10),
        ..PullOptions::default()
    };
    let first = q.pull(opts.clone()).await.unwrap().unwrap();
    assert!(q.pull(opts.clone()).await.unwrap().is_none());
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(q.pull(opts.clone()).await.unwrap().is_none());
    tokio::time::advance(Duration::from_secs(2)).await;
    let second = q.pull(opts.clone()).await.unwrap().unwrap();
    assert_eq!(second.id, first.id);
    assert_eq!(second.attempt, 2);
    assert_eq!(
        q.ack(&first.receipt).await.unwrap_err().kind(),
        ErrorKind::Conflict
    );
    q.ack(&second.receipt).await.unwrap();
    q.ack(&second.receipt).await.unwrap();
    assert_eq!(q.depth().await.unwrap().total(), 0);
}

#[tokio::test(start_paused = true)]
async fn waiting_pull_wakes_when_a_delivery_times_out() {
    let backend = MemoryServer::new()
        .connect(&BackendConfig::memory())
        .unwrap();
    let q = backend.queues().open(&key("q"), None).await.unwrap();
    q.push(Value::empty()).await.unwrap();
    let short = PullOptions {
        visibility_timeout: Duration::from_secs(5),
        ..PullOptions::default()
    };
    q.pull(short).await.unwrap().unwrap();
    let start = Instant::now();
    let again = q
        .pull(PullOptions {
            wait: Duration::from_secs(60),
            ..PullOptions::default()
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.attempt, 2);
    assert_eq!(start.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn lock_waiter_that_times_out_lets_nobody_jump_the_holder() {
    let backend = MemoryServer::new()
        .connect(&BackendConfig::memory())
        .unwrap();
    let ttl = Duration::from_secs(30);
    let (a, b, c) = (
        backend.sessions().open(ttl).await.unwrap(),
        backend.sessions().open(ttl).await.unwrap(),
        backend.sessions().open(ttl).await.unwrap(),
    );
    let name = key("l");
    let held = backend
        .locks()
        .lock(&name, &a, Duration::ZERO)
        .await
        .unwrap();
    let timed_out = backend
        .locks()
        .lock(&name, &b, Duration::from_secs(1))
        .await;
    assert_eq!(timed_out.unwrap_err().kind(), ErrorKind::Timeout);
    assert!(backend.locks().try_lock(&name, &c).await.unwrap().is_none());
    let token = held.fencing_token();
    held.unlock().await.unwrap();
    let next = backend.locks().try_lock(&name, &c).await.unwrap().unwrap();
    assert!(next.fencing_token() > token);
}
