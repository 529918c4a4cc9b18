// PubSub: delivery after subscribe, order, fan-out, no replay, binary
// payloads, exact topic matching, and explicit lag for slow subscribers.

use super::case;
use crate::util::{completes, ensure, ensure_eq, fail, key, val, within, Context, QUIET, WAIT};
use crate::{Case, CaseResult, Ctx, Fail};
use dprim::{Key, Subscription, SubscriptionItem, Value};
use std::collections::HashMap;
use std::time::Duration;

pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(
            "pubsub::delivered_in_publish_order",
            delivered_in_publish_order,
            [],
            "Messages from one publisher arrive in publish order."
        ),
        case!(
            "pubsub::fan_out_to_every_subscriber",
            fan_out_to_every_subscriber,
            [],
            "Delivered at most once to every subscriber whose `subscribe` call returned before `publish` was called, while it stays connected."
        ),
        case!(
            "pubsub::publisher_leaving_at_once_delivers",
            publisher_leaving_at_once_delivers,
            [],
            "Receives every message published after this call returned."
        ),
        case!(
            "pubsub::no_replay_to_late_subscriber",
            no_replay_to_late_subscriber,
            [],
            "Not stored: a later subscriber never sees it."
        ),
        case!(
            "pubsub::binary_payloads_intact",
            binary_payloads_intact,
            [],
            "The payload, byte for byte."
        ),
        case!(
            "pubsub::publish_without_subscribers",
            publish_without_subscribers,
            [],
            "Publishing with no subscribers succeeds."
        ),
        case!(
            "pubsub::slow_subscriber_lagged",
            slow_subscriber_lagged,
            [],
            "When it overflows the subscriber gets `Lagged(n)` with the number of messages it missed, never silent loss or unbounded memory."
        ),
        case!(
            "pubsub::slow_subscriber_lagged_by_bytes",
            slow_subscriber_lagged_by_bytes,
            [],
            "The buffer also holds at most `subscriber_buffer_bytes` of unread payload; a subscriber past that lags the same way."
        ),
        case!(
            "pubsub::per_publisher_order",
            per_publisher_order,
            [],
            "Messages from one publisher arrive in publish order."
        ),
        case!(
            "pubsub::topics_match_exactly",
            topics_match_exactly,
            [],
            "Subscribes to one topic (exact match; no wildcards)."
        ),
    ]
}

fn topic() -> Result<Key, Fail> {
    key("topics/news")
}

/// The next message on `sub`, waiting up to [`WAIT`]; a lag, an error or the
/// end of the subscription fail the case.
async fn next_message(sub: &mut Subscription, what: &str) -> Result<dprim::Message, Fail> {
    match within(WAIT, what, sub.next()).await? {
        Some(Ok(SubscriptionItem::Message(m))) => Ok(m),
        Some(Ok(SubscriptionItem::Lagged(n))) => fail!("{what}: unexpected Lagged({n})"),
        Some(Err(e)) => fail!("{what}: subscription failed: {e}"),
        None => fail!("{what}: the subscription ended"),
    }
}

async fn nothing_more(sub: &mut Subscription, what: &str) -> CaseResult {
    if let Some(item) = completes(QUIET, sub.next()).await {
        fail!("{what}: unexpected item {item:?}");
    }
    Ok(())
}

async fn delivered_in_publish_order(ctx: Ctx) -> CaseResult {
    let t = topic()?;
    let mut sub = ctx.backend.pubsub().subscribe(&t).await.ctx("subscribe")?;
    let publisher = ctx.another_client().await.ctx("open another client")?;
    for i in 0..50 {
        publisher
            .pubsub()
            .publish(&t, val(format!("{i}"))?)
            .await
            .ctx("publish")?;
    }
    for i in 0..50 {
        let m = next_message(&mut sub, &format!("message {i}")).await?;
        ensure_eq!(
            m.payload.as_bytes(),
            format!("{i}").as_bytes(),
            "message #{i}"
        );
        ensure_eq!(m.topic, t, "the message's topic");
    }
    nothing_more(&mut sub, "after the last message").await
}

async fn fan_out_to_every_subscriber(ctx: Ctx) -> CaseResult {
    let t = topic()?;
    let mut subs = Vec::new();
    for i in 0..3 {
        let client = if i == 0 {
            ctx.backend.clone()
        } else {
            ctx.another_client().await.ctx("open another client")?
        };
        subs.push((
            client.pubsub().subscribe(&t).await.ctx("subscribe")?,
            client,
        ));
    }
    // Two subscriptions on the same client both receive too.
    let mut twin = ctx
        .backend
        .pubsub()
        .subscribe(&t)
        .await
        .ctx("second subscribe on the first client")?;
    let publisher = ctx.another_client().await.ctx("open the publisher")?;
    for i in 0..5 {
        publisher
            .pubsub()
            .publish(&t, val(format!("m{i}"))?)
            .await
            .ctx("publish")?;
    }
    for (n, (sub, _)) in subs.iter_mut().enumerate() {
        for i in 0..5 {
            let m = next_message(sub, &format!("subscriber {n}, message {i}")).await?;
            ensure_eq!(
                m.payload.as_bytes(),
                format!("m{i}").as_bytes(),
                "subscriber {n}, message {i}"
            );
        }
        nothing_more(sub, &format!("subscriber {n} (each message at most once)")).await?;
    }
    for i in 0..5 {
        let m = next_message(&mut twin, &format!("second subscription, message {i}")).await?;
        ensure_eq!(
            m.payload.as_bytes(),
            format!("m{i}").as_bytes(),
            "second subscription, message {i}"
        );
    }
    Ok(())
}

async fn publisher_leaving_at_once_delivers(ctx: Ctx) -> CaseResult {
    const CLIENTS: u32 = 20;
    const EACH: u32 = 10;
    let t = topic()?;
    let mut sub = ctx.backend.pubsub().subscribe(&t).await.ctx("subscribe")?;
    // Each publisher's client goes away as soon as its last publish
    // returns, as a short-lived process that publishes and exits does.
    for c in 0..CLIENTS {
        let client = ctx.another_client().await.ctx("open a publisher client")?;
        for i in 0..EACH {
            client
                .pubsub()
                .publish(&t, val(format!("{c}:{i}"))?)
                .await
                .ctx("publish")?;
        }
        drop(client);
    }
    let mut missing: std::collections::BTreeSet<String> = (0..CLIENTS)
        .flat_map(|c| (0..EACH).map(move |i| format!("{c}:{i}")))
        .collect();
    let mut lagged = 0u64;
    while missing.len() as u64 > lagged {
        let what = format!(
            "messages of publishers that left ({} missing: {:?})",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        );
        match within(WAIT, &what, sub.next()).await? {
            Some(Ok(SubscriptionItem::Message(m))) => {
                let text = m.payload.as_str().ctx("a text payload")?.to_string();
                ensure!(
                    missing.remove(&text),
                    "`{text}` arrived twice or was never sent"
                );
            }
            // Not silent: a lag is reported with its count.
            Some(Ok(SubscriptionItem::Lagged(n))) => lagged += n,
            Some(Err(e)) => fail!("the subscription failed: {e}"),
            None => fail!("the subscription ended"),
        }
    }
    Ok(())
}

async fn no_replay_to_late_subscriber(ctx: Ctx) -> CaseResult {
    let t = topic()?;
    let mut early = ctx
        .backend
        .pubsub()
        .subscribe(&t)
        .await
        .ctx("subscribe early")?;
    ctx.backend
        .pubsub()
        .publish(&t, val("before")?)
        .await
        .ctx("publish before")?;
    next_message(&mut early, "the early subscriber's message").await?;
    let other = ctx.another_client().await.ctx("open another client")?;
    let mut late = other.pubsub().subscribe(&t).await.ctx("subscribe late")?;
    ctx.backend
        .pubsub()
        .publish(&t, val("after")?)
        .await
        .ctx("publish after")?;
    let m = next_message(&mut late, "the late subscriber's first message").await?;
    ensure_eq!(
        m.payload.as_bytes(),
        b"after",
        "the late subscriber's first message"
    );
    nothing_more(&mut late, "the late subscriber").await
}

async fn binary_payloads_intact(ctx: Ctx) -> CaseResult {
    let t = topic()?;
    let mut sub = ctx.backend.pubsub().subscribe(&t).await.ctx("subscribe")?;
    let all: Vec<u8> = (0..=255u8).collect();
    let payloads: Vec<Vec<u8>> = vec![
        Vec::new(),
        all.clone(),
        vec![0xff, 0xfe, 0x00, 0xc3, 0x28],
        vec![0; 1000],
        all.iter().rev().copied().collect(),
    ];
    let publisher = ctx.another_client().await.ctx("open another client")?;
    for p in &payloads {
        publisher
            .pubsub()
            .publish(&t, val(p.clone())?)
            .await
            .ctx("publish")?;
    }
    for (i, p) in payloads.iter().enumerate() {
        let m = next_message(&mut sub, &format!("payload {i}")).await?;
        ensure!(
            m.payload.as_bytes() == p.as_slice(),
            "payload {i} changed: sent {} bytes, got {:?}",
            p.len(),
            m.payload
        );
    }
    Ok(())
}

async fn publish_without_subscribers(ctx: Ctx) -> CaseResult {
    let t = topic()?;
    for i in 0..10 {
        ctx.backend
            .pubsub()
            .publish(&t, val(format!("{i}"))?)
            .await
            .ctx("publish with no subscribers")?;
    }
    ctx.backend
        .pubsub()
        .publish(&key("never/subscribed")?, Value::empty())
        .await
        .ctx("publish on a fresh topic")?;
    // A subscriber that comes and goes leaves no trace either.
    drop(ctx.backend.pubsub().subscribe(&t).await.ctx("subscribe")?);
    ctx.backend
        .pubsub()
        .publish(&t, val("after unsubscribe")?)
        .await
        .ctx("publish after the only subscriber left")?;
    Ok(())
}

async fn slow_subscriber_lagged(ctx: Ctx) -> CaseResult {
    let buffer = ctx.caps().pubsub.subscriber_buffer;
    if buffer > 100_000 {
        return Err(Fail::Skipped(format!(
            "the backend declares pubsub.subscriber_buffer = {buffer}; overflowing it would take too long"
        )));
    }
    lags_and_continues(&ctx, buffer as u64 * 2 + 50, 0).await
}

/// Payload size for overflowing a buffer by bytes: large enough that few
/// messages fill it, small enough for every backend's message limit.
const LARGE_PAYLOAD: usize = 64 * 1024;

async fn slow_subscriber_lagged_by_bytes(ctx: Ctx) -> CaseResult {
    let caps = &ctx.caps().pubsub;
    let (buffer, bytes) = (caps.subscriber_buffer, caps.subscriber_buffer_bytes);
    let to_fill = bytes / LARGE_PAYLOAD + 1;
    if to_fill >= buffer {
        return Err(Fail::Skipped(format!(
            "the backend bounds its subscriber buffer by message count ({buffer} messages of {LARGE_PAYLOAD} bytes fit within pubsub.subscriber_buffer_bytes = {bytes})"
        )));
    }
    if bytes > 256 * 1024 * 1024 {
        return Err(Fail::Skipped(format!(
            "the backend declares pubsub.subscriber_buffer_bytes = {bytes}; overflowing it would take too long"
        )));
    }
    lags_and_continues(&ctx, to_fill as u64 * 2 + 10, LARGE_PAYLOAD).await
}

/// Publishes `total` numbered messages (padded to `size` bytes) to a
/// subscriber that does not read, then reads: every message is either
/// received, in order, or counted in a `Lagged`, at least one `Lagged`
/// comes, and the subscription carries on.
async fn lags_and_continues(ctx: &Ctx, total: u64, size: usize) -> CaseResult {
    let t = topic()?;
    let mut sub = ctx.backend.pubsub().subscribe(&t).await.ctx("subscribe")?;
    for i in 0..total {
        let mut payload = format!("{i}:").into_bytes();
        payload.resize(payload.len().max(size), b'x');
        ctx.backend
            .pubsub()
            .publish(&t, Value::new(payload).ctx("a payload")?)
            .await
            .ctx("publish")?;
    }
    let mut received = 0u64;
    let mut missed = 0u64;
    let mut last: Option<u64> = None;
    let mut lags = Vec::new();
    while received + missed < total {
        match within(WAIT, "the backlog of a slow subscriber", sub.next()).await? {
            Some(Ok(SubscriptionItem::Message(m))) => {
                let i: u64 = m
                    .payload
                    .as_str()
                    .and_then(|s| s.split(':').next())
                    .and_then(|s| s.parse().ok())
                    .ctx("a message number")?;
                ensure_eq!(
                    m.payload.len(),
                    size.max(format!("{i}:").len()),
                    "payload size of message {i}"
                );
                if let Some(prev) = last {
                    ensure!(i > prev, "message {i} after {prev}");
                }
                last = Some(i);
                received += 1;
                ensure!(
                    received + missed == i + 1,
                    "message {i} arrived after {received} messages and {missed} reported missed: some were lost silently"
                );
            }
            Some(Ok(SubscriptionItem::Lagged(n))) => {
                ensure!(n > 0, "Lagged(0)");
                lags.push(n);
                missed += n;
            }
            Some(Err(e)) => fail!("the subscription failed: {e}"),
            None => fail!("the subscription ended after falling behind"),
        }
    }
    ensure_eq!(
        received + missed,
        total,
        "messages received plus reported missed"
    );
    ensure!(!lags.is_empty(), "published {total} messages of {size} bytes to a subscriber without reading, past its declared buffer, yet it never lagged");
    // The subscription continues.
    ctx.backend
        .pubsub()
        .publish(&t, val("after")?)
        .await
        .ctx("publish after the lag")?;
    let m = next_message(&mut sub, "a message after the lag").await?;
    ensure_eq!(m.payload.as_bytes(), b"after", "the message after the lag");
    Ok(())
}

async fn per_publisher_order(ctx: Ctx) -> CaseResult {
    const EACH: u32 = 100;
    let t = topic()?;
    let mut sub = ctx.backend.pubsub().subscribe(&t).await.ctx("subscribe")?;
    let mut publishers = Vec::new();
    for p in 0..2u32 {
        let client = ctx.another_client().await.ctx("open a publisher client")?;
        let t = t.clone();
        publishers.push(tokio::spawn(async move {
            for i in 0..EACH {
                client
                    .pubsub()
                    .publish(&t, val(format!("{p}:{i}"))?)
                    .await
                    .ctx("publish")?;
                if i % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            Ok::<(), Fail>(())
        }));
    }
    let mut next: HashMap<u32, u32> = HashMap::new();
    let mut accounted = 0u32;
    while accounted < EACH * 2 {
        let what = format!(
            "messages from two publishers ({accounted} of {} so far, next expected {next:?})",
            EACH * 2
        );
        match within(WAIT, &what, sub.next()).await? {
            Some(Ok(SubscriptionItem::Message(m))) => {
                let text = m.payload.as_str().ctx("a text payload")?.to_string();
                let (p, i) = text.split_once(':').ctx("publisher:index")?;
                let (p, i): (u32, u32) = (
                    p.parse().map_err(|_| Fail::Failed(text.clone()))?,
                    i.parse().map_err(|_| Fail::Failed(text.clone()))?,
                );
                let expected = next.entry(p).or_insert(0);
                ensure!(
                    i >= *expected,
                    "publisher {p}: message {i} arrived after {}",
                    *expected - 1
                );
                *expected = i + 1;
                accounted += 1;
            }
            // A lag is allowed (the reader may fall behind); order among what arrives is what counts.
            Some(Ok(SubscriptionItem::Lagged(n))) => {
                accounted += u32::try_from(n).unwrap_or(u32::MAX)
            }
            Some(Err(e)) => fail!("the subscription failed: {e}"),
            None => fail!("the subscription ended"),
        }
    }
    for p in publishers {
        p.await
            .map_err(|e| Fail::Failed(format!("publisher task: {e}")))??;
    }
    Ok(())
}

async fn topics_match_exactly(ctx: Ctx) -> CaseResult {
    let a = key("a")?;
    let ab = key("a/b")?;
    let mut sub_a = ctx
        .backend
        .pubsub()
        .subscribe(&a)
        .await
        .ctx("subscribe a")?;
    let mut sub_ab = ctx
        .backend
        .pubsub()
        .subscribe(&ab)
        .await
        .ctx("subscribe a/b")?;
    let ps = ctx.backend.pubsub();
    for (topic, payload) in [
        ("a/b", "to a/b"),
        ("a/b/c", "to a/b/c"),
        ("ab", "to ab"),
        ("a.b", "to a.b"),
        ("b", "to b"),
    ] {
        ps.publish(&key(topic)?, val(payload)?)
            .await
            .ctx("publish")?;
    }
    ps.publish(&a, val("to a")?).await.ctx("publish a")?;
    let m = next_message(&mut sub_a, "subscriber of a").await?;
    ensure_eq!(
        (m.topic.as_str(), m.payload.as_bytes()),
        ("a", &b"to a"[..]),
        "the first message for the subscriber of a"
    );
    let m = next_message(&mut sub_ab, "subscriber of a/b").await?;
    ensure_eq!(
        (m.topic.as_str(), m.payload.as_bytes()),
        ("a/b", &b"to a/b"[..]),
        "the first message for the subscriber of a/b"
    );
    if let Some(item) = completes(Duration::from_millis(200), sub_ab.next()).await {
        fail!("the subscriber of a/b got {item:?}");
    }
    nothing_more(&mut sub_a, "the subscriber of a").await
}
