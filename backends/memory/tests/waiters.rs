//! Waiters (lock and election lines) whose session ends while they wait.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use dprim::{BackendConfig, ErrorKind, Key, Value};
use dprim_memory::MemoryServer;
use std::time::Duration;

// Closing a waiter's session both drops its place in line and resolves
// `lost()` with `Closed`; whichever the waiter sees first, it must report
// `SessionLost`. `select!` picks branches at random, so repeat.
#[tokio::test]
async fn waiter_whose_session_closes_reports_session_lost() {
    let backend = MemoryServer::new()
        .connect(&BackendConfig::memory())
        .unwrap();
    let name = Key::new("l").unwrap();
    let ttl = Duration::from_secs(30);
    let holder = backend.sessions().open(ttl).await.unwrap();
    let _held = backend
        .locks()
        .lock(&name, &holder, Duration::ZERO)
        .await
        .unwrap();
    for _ in 0..50 {
        let waiter = backend.sessions().open(ttl).await.unwrap();
        let b = backend.clone();
        let (n, w) = (name.clone(), waiter.clone());
        let task =
            tokio::spawn(async move { b.locks().lock(&n, &w, Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_millis(2)).await;
        waiter.close().await.unwrap();
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::SessionLost, "{err}");

        let candidate = backend.sessions().open(ttl).await.unwrap();
        let leader = backend.sessions().open(ttl).await.unwrap();
        let e = Key::new("e").unwrap();
        let lead = backend
            .elections()
            .campaign(&e, Value::empty(), &leader)
            .await
            .unwrap();
        let b = backend.clone();
        let (e2, c) = (e.clone(), candidate.clone());
        let task =
            tokio::spawn(async move { b.elections().campaign(&e2, Value::empty(), &c).await });
        tokio::time::sleep(Duration::from_millis(2)).await;
        candidate.close().await.unwrap();
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::SessionLost, "{err}");
        lead.resign().await.unwrap();
    }
}
