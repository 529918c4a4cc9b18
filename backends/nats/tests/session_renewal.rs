//! A session renewal whose answer was lost may still have taken effect on
//! the server. The keep-alive then sends its next renewal expecting the
//! heartbeat it knew of, which is no longer the last one. This must not
//! lose the session: a live later heartbeat can only be the session's own.
//! A removed heartbeat must still lose it at once.
//!
//! The lost answer is played here by writing a heartbeat the way a renewal
//! does, with a second, raw client, onto the session's heartbeat subject
//! (`$KV.dprim.<namespace>.=s.<session id>` in stream `KV_dprim`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use dprim::{Config, ErrorKind, Key, KvExt, Value};
use std::time::Duration;

const NAMESPACE: &str = "renewals";

async fn write_heartbeat(js: &jetstream::Context, subject: &str, headers: HeaderMap) -> u64 {
    js.publish_with_headers(subject.to_string(), headers, Bytes::new())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_took_effect_unseen_keeps_the_session() {
    let servers = support::Servers::new("session-renewal", 4320);
    servers.script(&["start"]);
    let config = Config::from_toml(&format!(
        "[backend]\nkind = \"nats\"\nendpoints = [\"127.0.0.1:{}\"]\nnamespace = \"{NAMESPACE}\"\n",
        servers.port
    ))
    .unwrap();
    let backend = dprim_nats::connect(&config.backend).await.unwrap();
    let raw = async_nats::connect(format!("127.0.0.1:{}", servers.port))
        .await
        .unwrap();
    let js = jetstream::new(raw);

    let ttl = Duration::from_secs(3);
    let session = backend.sessions().open(ttl).await.unwrap();
    let subject = format!("$KV.dprim.{NAMESPACE}.=s.{}", session.id());
    let stream = js.get_stream("KV_dprim").await.unwrap();
    let opened = stream.get_last_raw_message_by_subject(&subject).await;
    assert!(
        opened.is_ok(),
        "the session's heartbeat is not at {subject}: {opened:?}"
    );

    // Twice, a renewal "lands unseen" right after one the session saw.
    for _ in 0..2 {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-TTL", ttl.as_secs().to_string());
        headers.insert("Nats-Rollup", "sub");
        write_heartbeat(&js, &subject, headers).await;
        // Past the next renewals (every TTL / 3) and the deadline the
        // first of them would have had.
        tokio::time::sleep(ttl).await;
        assert!(
            session.is_alive(),
            "the session was lost after a renewal took effect unseen: {:?}",
            session.check()
        );
    }
    let key = Key::new("still-mine").unwrap();
    backend
        .kv()
        .put_ephemeral(&key, Value::new(b"x".to_vec()).unwrap(), &session)
        .await
        .unwrap();

    // Removed (as by a reaper that saw it expire): lost at the next renewal.
    let mut purge = HeaderMap::new();
    purge.insert("KV-Operation", "PURGE");
    purge.insert("Nats-Rollup", "sub");
    write_heartbeat(&js, &subject, purge).await;
    let lost = tokio::time::timeout(ttl, session.lost())
        .await
        .expect("a removed heartbeat loses its session at the next renewal");
    assert_eq!(lost.kind(), ErrorKind::SessionLost, "{lost}");
    assert!(
        lost.to_string().contains("expired or was removed"),
        "{lost}"
    );
}
