// Key grammar and value limits: checked on `Key`/`Value` themselves and by
// round-tripping edge-case keys and values through the backend.

use super::case;
use crate::util::{ensure, ensure_eq, expect_err, key, val, within, Context, WAIT};
use crate::{Case, CaseResult, Ctx};
use dprim::{
    Depth, ErrorKind, Key, KvExt, PullOptions, SubscriptionItem, Value, MAX_KEY_BYTES,
    MAX_KEY_SEGMENTS, MAX_VALUE_BYTES,
};

pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(
            "keys::reject_non_portable_chars",
            reject_non_portable_chars,
            [],
            "Returns `InvalidArgument` naming the offending character and its position for any character outside `A-Z a-z 0-9 - _ .` and `/`."
        ),
        case!(
            "keys::reject_bad_shapes",
            reject_bad_shapes,
            [],
            "Returns `InvalidArgument` for empty segments (`a//b`, trailing `/`), `.`/`..` segments, more than 16 segments or more than 512 bytes."
        ),
        case!(
            "keys::portable_chars_round_trip",
            portable_chars_round_trip,
            [],
            "Each segment is one or more of `A-Z a-z 0-9 - _ .`, and is not `.` or `..`."
        ),
        case!(
            "keys::leading_slash_same_key",
            leading_slash_same_key,
            [],
            "One leading `/` is accepted and dropped, so `/a/b` and `a/b` are the same key."
        ),
        case!(
            "keys::longest_key_round_trip",
            longest_key_round_trip,
            [],
            "At most [`MAX_KEY_SEGMENTS`] segments and [`MAX_KEY_BYTES`] bytes."
        ),
        case!(
            "keys::oversize_value_rejected",
            oversize_value_rejected,
            [],
            "Returns `InvalidArgument` naming the size and the limit when `bytes` is larger than 256 KiB."
        ),
        case!(
            "keys::max_value_round_trip",
            max_value_round_trip,
            [],
            "Any byte sequence up to the limit (including empty and non-UTF-8) is a valid value and round-trips unchanged."
        ),
        case!(
            "keys::empty_and_binary_values_round_trip",
            empty_and_binary_values_round_trip,
            [],
            "Any byte sequence up to the limit (including empty and non-UTF-8) is a valid value and round-trips unchanged."
        ),
        case!(
            "keys::max_payload_through_queue_and_pubsub",
            max_payload_through_queue_and_pubsub,
            [],
            "Bytes stored under a key or carried by a message: at most [`MAX_VALUE_BYTES`] (256 KiB), checked when the value is made, so an oversize value never reaches a backend."
        ),
    ]
}

async fn reject_non_portable_chars(_ctx: Ctx) -> CaseResult {
    for (raw, needle) in [
        ("a b", "space"),
        ("a*b", "*"),
        ("a>b", ">"),
        ("a=b", "="),
        ("a:b", ":"),
        ("a\u{0}b", "\\0"),
        ("caf\u{e9}", "\u{e9}"),
        ("a/b c", "space"),
    ] {
        let e = expect_err(
            Key::new(raw),
            &[ErrorKind::InvalidArgument],
            &format!("Key::new({raw:?})"),
        )?;
        let text = e.to_string();
        ensure!(
            text.contains(needle),
            "Key::new({raw:?}): the error does not name the character `{needle}`: {text}"
        );
        ensure!(
            text.contains("byte") || text.contains("position"),
            "Key::new({raw:?}): the error does not give the position: {text}"
        );
    }
    Ok(())
}

async fn reject_bad_shapes(_ctx: Ctx) -> CaseResult {
    let seventeen = vec!["s"; MAX_KEY_SEGMENTS + 1].join("/");
    let too_long = "k".repeat(MAX_KEY_BYTES + 1);
    for raw in [
        "", "/", "a//b", "a/", "./a", "a/./b", "a/..", "..", &seventeen, &too_long,
    ] {
        expect_err(
            Key::new(raw),
            &[ErrorKind::InvalidArgument],
            &format!("Key::new({raw:?})"),
        )?;
    }
    let sixteen = vec!["s"; MAX_KEY_SEGMENTS].join("/");
    Key::new(&sixteen).ctx("a key of exactly 16 segments")?;
    Key::new("k".repeat(MAX_KEY_BYTES)).ctx("a key of exactly 512 bytes")?;
    Key::new("a/...").ctx("a `...` segment (only `.` and `..` are reserved)")?;
    Ok(())
}

async fn portable_chars_round_trip(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let keys = [
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ/abcdefghijklmnopqrstuvwxyz/0123456789",
        "dir/a.b",
        "dir/a-b",
        "dir/a_b",
        "dir/.hidden",
        "dir/...",
        "dir/-",
        "dir/_",
        "dir/x.y.z-1_2",
        "dir/a.b/c",
    ];
    for raw in keys {
        let k = key(raw)?;
        kv.put(&k, val(raw.as_bytes())?)
            .await
            .ctx(&format!("put {raw}"))?;
        let e = kv
            .get(&k)
            .await
            .ctx(&format!("get {raw}"))?
            .ctx(&format!("get {raw}"))?;
        ensure_eq!(e.key.as_str(), raw, "the key read back");
        ensure_eq!(e.value.as_bytes(), raw.as_bytes(), "the value of {raw}");
    }
    // The escaped forms must not collide: `a.b` and `a/b`-like neighbours are distinct keys.
    let listing = kv
        .list(&key("dir")?, Depth::Children)
        .await
        .ctx("list dir")?;
    let names: Vec<&str> = listing.entries.iter().map(|e| e.key.as_str()).collect();
    let mut expected = vec![
        "dir/-",
        "dir/.hidden",
        "dir/...",
        "dir/_",
        "dir/a-b",
        "dir/a.b",
        "dir/a_b",
        "dir/x.y.z-1_2",
    ];
    expected.sort_unstable();
    ensure_eq!(names, expected, "list dir (children, sorted)");
    let deep = kv
        .list(&key("dir/a.b")?, Depth::Children)
        .await
        .ctx("list dir/a.b")?;
    ensure_eq!(deep.entries.len(), 1, "entries under dir/a.b");
    Ok(())
}

async fn leading_slash_same_key(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    kv.put(&key("/a/b")?, val("slashed")?)
        .await
        .ctx("put /a/b")?;
    let e = kv
        .get(&key("a/b")?)
        .await
        .ctx("get a/b")?
        .ctx("get a/b after put /a/b")?;
    ensure_eq!(e.value.as_bytes(), b"slashed", "value of a/b");
    ensure_eq!(e.key.as_str(), "a/b", "the key as read back");
    let all = kv
        .list(&Key::root(), Depth::Recursive)
        .await
        .ctx("list root")?;
    ensure_eq!(all.entries.len(), 1, "keys in the namespace");
    Ok(())
}

async fn longest_key_round_trip(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    // 16 segments, 512 bytes: 15 segments of 31 chars + 15 slashes + a last segment of 32.
    let mut segments: Vec<String> = (0..MAX_KEY_SEGMENTS - 1)
        .map(|i| format!("{i:02}{}", "x".repeat(29)))
        .collect();
    let used: usize = segments.iter().map(String::len).sum::<usize>() + segments.len();
    segments.push("y".repeat(MAX_KEY_BYTES - used));
    let raw = segments.join("/");
    ensure_eq!(raw.len(), MAX_KEY_BYTES, "suite: length of the longest key");
    let k = key(&raw)?;
    ensure_eq!(
        k.depth(),
        MAX_KEY_SEGMENTS,
        "suite: depth of the longest key"
    );
    let v = kv.put(&k, val("deep")?).await.ctx("put the longest key")?;
    let e = kv
        .get(&k)
        .await
        .ctx("get the longest key")?
        .ctx("get the longest key")?;
    ensure_eq!(e.version, v, "version of the longest key");
    ensure_eq!(e.key, k, "the longest key read back");
    let listing = kv
        .list(&Key::root(), Depth::Recursive)
        .await
        .ctx("list root recursively")?;
    ensure_eq!(
        listing
            .entries
            .iter()
            .map(|e| e.key.clone())
            .collect::<Vec<_>>(),
        vec![k.clone()],
        "recursive listing"
    );
    ensure!(
        kv.delete(&k).await.ctx("delete the longest key")?,
        "delete returned false"
    );
    Ok(())
}

async fn oversize_value_rejected(ctx: Ctx) -> CaseResult {
    let e = expect_err(
        Value::new(vec![7u8; MAX_VALUE_BYTES + 1]),
        &[ErrorKind::InvalidArgument],
        "Value::new(256 KiB + 1)",
    )?;
    let text = e.to_string();
    ensure!(
        text.contains(&(MAX_VALUE_BYTES + 1).to_string()),
        "the error does not name the size: {text}"
    );
    ensure!(
        text.contains(&MAX_VALUE_BYTES.to_string()) || text.contains("256 KiB"),
        "the error does not name the limit: {text}"
    );
    expect_err(
        Value::try_from(vec![0u8; MAX_VALUE_BYTES * 2]),
        &[ErrorKind::InvalidArgument],
        "Value::try_from(512 KiB)",
    )?;
    // Nothing reached the backend.
    let all = ctx
        .backend
        .kv()
        .list(&Key::root(), Depth::Recursive)
        .await
        .ctx("list root")?;
    ensure!(all.entries.is_empty(), "keys appeared: {:?}", all.entries);
    Ok(())
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

async fn max_value_round_trip(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let bytes = pattern(MAX_VALUE_BYTES);
    let k = key("big")?;
    kv.put(&k, val(bytes.clone())?)
        .await
        .ctx("put a 256 KiB value")?;
    let other = ctx.another_client().await.ctx("open another client")?;
    for (who, backend) in [("same client", &ctx.backend), ("another client", &other)] {
        let e = backend
            .kv()
            .get(&k)
            .await
            .ctx("get the 256 KiB value")?
            .ctx("get big")?;
        ensure!(
            e.value.as_bytes() == bytes.as_slice(),
            "{who}: the 256 KiB value came back changed ({} bytes)",
            e.value.len()
        );
    }
    Ok(())
}

async fn empty_and_binary_values_round_trip(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let samples: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("all-bytes", all_bytes.clone()),
        ("reversed", all_bytes.iter().rev().copied().collect()),
        ("invalid-utf8", vec![0xff, 0xfe, 0xc3, 0x28, 0x00, 0x80]),
        ("nul", vec![0]),
        ("crlf", b"\r\n\r\n".to_vec()),
    ];
    let other = ctx.another_client().await.ctx("open another client")?;
    for (name, bytes) in &samples {
        let k = key(&format!("v/{name}"))?;
        kv.put(&k, val(bytes.clone())?)
            .await
            .ctx(&format!("put {name}"))?;
    }
    for (name, bytes) in &samples {
        let k = key(&format!("v/{name}"))?;
        let e = other
            .kv()
            .get(&k)
            .await
            .ctx(&format!("get {name}"))?
            .ctx(&format!("get {name}"))?;
        ensure_eq!(e.value.as_bytes(), bytes.as_slice(), "value {name}");
    }
    let listing = kv.list(&key("v")?, Depth::Children).await.ctx("list v")?;
    for e in &listing.entries {
        let name = e.key.name();
        let expected = samples
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, b)| b.as_slice());
        ensure_eq!(Some(e.value.as_bytes()), expected, "listed value of {name}");
    }
    ensure_eq!(listing.entries.len(), samples.len(), "listed entries");
    Ok(())
}

async fn max_payload_through_queue_and_pubsub(ctx: Ctx) -> CaseResult {
    let bytes = pattern(MAX_VALUE_BYTES);
    let payload = val(bytes.clone())?;
    let q = ctx
        .backend
        .queues()
        .open(&key("big-q")?, None)
        .await
        .ctx("open queue")?;
    q.push(payload.clone())
        .await
        .ctx("push a 256 KiB message")?;
    let d = q
        .pull(PullOptions {
            wait: WAIT,
            ..PullOptions::default()
        })
        .await
        .ctx("pull")?
        .ctx("pull the 256 KiB message")?;
    ensure!(
        d.payload.as_bytes() == bytes.as_slice(),
        "queue payload changed"
    );
    q.ack(&d.receipt).await.ctx("ack")?;

    let topic = key("big-topic")?;
    let mut sub = ctx
        .backend
        .pubsub()
        .subscribe(&topic)
        .await
        .ctx("subscribe")?;
    ctx.backend
        .pubsub()
        .publish(&topic, payload)
        .await
        .ctx("publish 256 KiB")?;
    match within(WAIT, "receive the 256 KiB message", sub.next()).await? {
        Some(Ok(SubscriptionItem::Message(m))) => {
            ensure!(
                m.payload.as_bytes() == bytes.as_slice(),
                "pubsub payload changed"
            );
            ensure_eq!(m.topic, topic, "message topic");
        }
        other => crate::util::fail!("expected the 256 KiB message, got {other:?}"),
    }
    Ok(())
}
