// Kv: reads, versioned and conditional writes, deletes, listings,
// transactions, watches, namespace isolation, hidden internal keys and
// ephemeral (session-attached) keys.

use super::{case, next_change, show};
use crate::linearizability::{race, registers, History};
use crate::util::{
    completes, ensure, ensure_eq, eventually, expect_err, fail, key, val, Context, QUIET, WAIT,
};
use crate::{Case, CaseResult, Ctx, Fail, Requirement};
use dprim::kv::MAX_TXN_OPS;
use dprim::{
    Depth, ErrorKind, Key, KvExt, Precondition, PullOptions, PutOptions, Txn, TxnOp, Version,
    WatchEvent, WatchStart, WatchTarget,
};
use std::collections::BTreeMap;
use std::time::Duration;

pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(
            "kv::get_missing_is_none",
            get_missing_is_none,
            [],
            "Returns `Ok(None)` for a missing key (never `NotFound`)."
        ),
        case!(
            "kv::put_versions_increase",
            put_versions_increase,
            [],
            "Returns the new version, greater than any earlier version of the key."
        ),
        case!(
            "kv::versions_totally_ordered",
            versions_totally_ordered,
            [],
            "Versions handed out by one backend namespace are totally ordered: a change that happens after another (as seen by any client) has a larger version."
        ),
        case!(
            "kv::concurrent_writes_linearizable",
            concurrent_writes_linearizable,
            [],
            "`Precondition::Absent` on an existing key fails `AlreadyExists`; `Precondition::Version(v)` fails `Conflict` unless the key exists with version `v`. A failed write changes nothing."
        ),
        case!(
            "kv::concurrent_reads_linearizable",
            concurrent_reads_linearizable,
            [Requirement::KvLinearizable],
            "On a backend declaring `linearizable`, reflects every write acknowledged before the call started."
        ),
        case!(
            "kv::create_existing_already_exists",
            create_existing_already_exists,
            [],
            "`Precondition::Absent` on an existing key fails `AlreadyExists`; `Precondition::Version(v)` fails `Conflict` unless the key exists with version `v`. A failed write changes nothing."
        ),
        case!(
            "kv::create_after_delete",
            create_after_delete,
            [],
            "Creating a key again after it was deleted succeeds."
        ),
        case!(
            "kv::cas_matching_version",
            cas_matching_version,
            [],
            "`Precondition::Absent` on an existing key fails `AlreadyExists`; `Precondition::Version(v)` fails `Conflict` unless the key exists with version `v`. A failed write changes nothing."
        ),
        case!(
            "kv::cas_conflict",
            cas_conflict,
            [],
            "`Precondition::Absent` on an existing key fails `AlreadyExists`; `Precondition::Version(v)` fails `Conflict` unless the key exists with version `v`. A failed write changes nothing."
        ),
        case!(
            "kv::cas_missing_key_conflict",
            cas_missing_key_conflict,
            [],
            "`Precondition::Absent` on an existing key fails `AlreadyExists`; `Precondition::Version(v)` fails `Conflict` unless the key exists with version `v`. A failed write changes nothing."
        ),
        case!(
            "kv::delete_reports_existence",
            delete_reports_existence,
            [],
            "Returns whether the key existed. Deleting a missing key with no precondition succeeds and returns `false`."
        ),
        case!(
            "kv::delete_if_version_conflict",
            delete_if_version_conflict,
            [],
            "`Precondition::Version(v)` fails `Conflict` unless the key exists with version `v` (a missing key is a conflict too)."
        ),
        case!(
            "kv::delete_absent_precondition_invalid",
            delete_absent_precondition_invalid,
            [],
            "`Precondition::Absent` is `InvalidArgument`."
        ),
        case!(
            "kv::list_children_vs_recursive",
            list_children_vs_recursive,
            [],
            "Returns entries strictly under `dir` (per segment), sorted by key; only immediate children with [`Depth::Children`]."
        ),
        case!(
            "kv::list_prefix_is_per_segment",
            list_prefix_is_per_segment,
            [],
            "Returns entries strictly under `dir` (per segment), sorted by key; only immediate children with [`Depth::Children`]."
        ),
        case!(
            "kv::list_sorted",
            list_sorted,
            [],
            "Returns entries strictly under `dir` (per segment), sorted by key; only immediate children with [`Depth::Children`]."
        ),
        case!(
            "kv::list_large_directory",
            list_large_directory,
            [],
            "Returns every entry however many there are and however large their values, as of one revision."
        ),
        case!(
            "kv::list_empty_dir",
            list_empty_dir,
            [],
            "A directory with no keys lists empty; it is not an error."
        ),
        case!(
            "kv::list_hides_prefix_only_children",
            list_hides_prefix_only_children,
            [],
            "With `Depth::Children`, a child that exists only as a prefix of deeper keys (`a/b` when only `a/b/c` exists) is not listed."
        ),
        case!(
            "kv::txn_all_or_nothing",
            txn_all_or_nothing,
            [Requirement::KvTransactions],
            "Applies a transaction: all of it or none of it."
        ),
        case!(
            "kv::txn_conflict_changes_nothing",
            txn_conflict_changes_nothing,
            [Requirement::KvTransactions],
            "Fails `Conflict` naming the first check that did not hold, and then changes nothing."
        ),
        case!(
            "kv::txn_duplicate_key_invalid",
            txn_duplicate_key_invalid,
            [Requirement::KvTransactions],
            "A transaction that writes the same key twice is `InvalidArgument` (etcd rejects it; dprim rejects it everywhere)."
        ),
        case!(
            "kv::txn_empty_invalid",
            txn_empty_invalid,
            [Requirement::KvTransactions],
            "A transaction with no operations is `InvalidArgument`."
        ),
        case!(
            "kv::txn_too_many_ops_invalid",
            txn_too_many_ops_invalid,
            [Requirement::KvTransactions],
            "More than [`MAX_TXN_OPS`] operations is `InvalidArgument`."
        ),
        case!(
            "kv::txn_unsupported_without_capability",
            txn_unsupported_without_capability,
            [],
            "On backends without the `transactions` capability, `Unsupported`."
        ),
        case!(
            "kv::watch_key_in_order",
            watch_key_in_order,
            [],
            "Delivers, per key, every change in version order after the start point, or an explicit `Resync` item (after which the stream ends)."
        ),
        case!(
            "kv::watch_dir_per_segment",
            watch_dir_per_segment,
            [],
            "Every key strictly under a directory, at any depth (per segment: `a/b` does not cover `a/bc`)."
        ),
        case!(
            "kv::watch_now_skips_current_value",
            watch_now_skips_current_value,
            [],
            "With `WatchStart::Now`, every change made after `watch` returned is delivered; the current value is not."
        ),
        case!(
            "kv::watch_after_replays_history",
            watch_after_replays_history,
            [Requirement::KvWatchHistory(8)],
            "Every change with a version greater than this one, including changes made before `watch` was called."
        ),
        case!(
            "kv::watch_from_list_revision",
            watch_from_list_revision,
            [Requirement::KvWatchHistory(256)],
            "The listing's `revision` is a start point for [`Kv::watch`]."
        ),
        case!(
            "kv::watch_after_races_write",
            watch_after_races_write,
            [],
            "A watch started `After(v)` sees the change with the next version after `v`, even if that write races the call to `watch`."
        ),
        case!(
            "kv::watch_many_writes_in_order",
            watch_many_writes_in_order,
            [],
            "Delivers, per key, every change in version order after the start point, or an explicit `Resync` item (after which the stream ends)."
        ),
        case!(
            "kv::watch_shows_no_txn_checks",
            watch_shows_no_txn_checks,
            [Requirement::KvTransactions],
            "A transaction shows watchers the keys it writes, each once: an `Absent` check on a key it puts produces no delete."
        ),
        case!(
            "kv::watch_sees_session_deletes",
            watch_sees_session_deletes,
            [],
            "The key was deleted (explicitly, by CAS delete, or because its session ended)."
        ),
        case!(
            "kv::namespace_isolation",
            namespace_isolation,
            [],
            "Keys live under the backend's namespace; internal keys of other primitives (locks, elections, sessions, queues) never appear here."
        ),
        case!(
            "kv::internal_keys_hidden",
            internal_keys_hidden,
            [],
            "Keys live under the backend's namespace; internal keys of other primitives (locks, elections, sessions, queues) never appear here."
        ),
        case!(
            "kv::ephemeral_deleted_on_close",
            ephemeral_deleted_on_close,
            [],
            "With a session, the key is deleted when that session is closed or expires; a session that is already lost or closed gives `SessionLost`."
        ),
        case!(
            "kv::ephemeral_deleted_on_expiry",
            ephemeral_deleted_on_expiry,
            [Requirement::FaultExpireSession],
            "With a session, the key is deleted when that session is closed or expires; a session that is already lost or closed gives `SessionLost`."
        ),
        case!(
            "kv::put_with_expired_session_fails",
            put_with_expired_session_fails,
            [Requirement::FaultExpireSession],
            "With a session, the key is deleted when that session is closed or expires; a session that is already lost or closed gives `SessionLost`."
        ),
        case!(
            "kv::put_with_closed_session_fails",
            put_with_closed_session_fails,
            [],
            "With a session, the key is deleted when that session is closed or expires; a session that is already lost or closed gives `SessionLost`."
        ),
    ]
}

async fn get_missing_is_none(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    for raw in ["missing", "a/b/c", "x.y"] {
        let got = kv
            .get(&key(raw)?)
            .await
            .ctx(&format!("get missing key {raw}"))?;
        ensure!(
            got.is_none(),
            "get {raw} returned {got:?} for a missing key"
        );
    }
    // A key whose parent exists as a key is still missing.
    kv.put(&key("p")?, val("x")?).await.ctx("put p")?;
    ensure!(
        kv.get(&key("p/q")?).await.ctx("get p/q")?.is_none(),
        "p/q is not missing"
    );
    Ok(())
}

async fn put_versions_increase(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let k = key("counter")?;
    let mut last: Option<Version> = None;
    for i in 0..20 {
        let v = kv.put(&k, val(format!("{i}"))?).await.ctx("put")?;
        if let Some(prev) = last {
            ensure!(
                v > prev,
                "put #{i} returned {v:?}, not greater than {prev:?}"
            );
        }
        let e = kv.get(&k).await.ctx("get")?.ctx("get after put")?;
        ensure_eq!(e.version, v, "version read back after put #{i}");
        last = Some(v);
    }
    Ok(())
}

async fn versions_totally_ordered(ctx: Ctx) -> CaseResult {
    let other = ctx.another_client().await.ctx("open another client")?;
    let mut last: Option<Version> = None;
    for i in 0..10 {
        let (client, name) = if i % 2 == 0 {
            (&ctx.backend, "a")
        } else {
            (&other, "b")
        };
        let v = client
            .kv()
            .put(&key(&format!("{name}/{i}"))?, val("x")?)
            .await
            .ctx("put")?;
        if let Some(prev) = last {
            ensure!(
                v > prev,
                "write #{i} (after #{}) got {v:?} <= {prev:?}",
                i - 1
            );
        }
        last = Some(v);
    }
    let deleted_at = ctx
        .backend
        .kv()
        .list(&Key::root(), Depth::Recursive)
        .await
        .ctx("list")?;
    if let Some(prev) = last {
        ensure!(
            deleted_at.revision >= prev,
            "a listing after all writes has revision {:?} < last write {prev:?}",
            deleted_at.revision
        );
    }
    Ok(())
}

async fn create_existing_already_exists(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let k = key("once")?;
    let v1 = kv.create(&k, val("first")?).await.ctx("create a new key")?;
    expect_err(
        kv.create(&k, val("second")?).await,
        &[ErrorKind::AlreadyExists],
        "create again",
    )?;
    let e = kv
        .get(&k)
        .await
        .ctx("get")?
        .ctx("get after failed create")?;
    ensure_eq!(e.value.as_bytes(), b"first", "value after a failed create");
    ensure_eq!(e.version, v1, "version after a failed create");
    Ok(())
}

async fn create_after_delete(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let k = key("phoenix")?;
    let v1 = kv.create(&k, val("1")?).await.ctx("create")?;
    ensure!(
        kv.delete(&k).await.ctx("delete")?,
        "delete returned false for an existing key"
    );
    ensure!(
        kv.get(&k).await.ctx("get")?.is_none(),
        "key still there after delete"
    );
    let v2 = kv.create(&k, val("2")?).await.ctx("create after delete")?;
    ensure!(
        v2 > v1,
        "re-created version {v2:?} is not greater than {v1:?}"
    );
    let e = kv.get(&k).await.ctx("get")?.ctx("get after re-create")?;
    ensure_eq!(e.value.as_bytes(), b"2", "value after re-create");
    // And via a CAS delete too.
    kv.delete_if_version(&k, v2)
        .await
        .ctx("delete_if_version")?;
    kv.create(&k, val("3")?)
        .await
        .ctx("create after CAS delete")?;
    Ok(())
}

async fn cas_matching_version(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let k = key("cas")?;
    let v1 = kv.put(&k, val("a")?).await.ctx("put")?;
    let v2 = kv
        .put_if_version(&k, val("b")?, v1)
        .await
        .ctx("put_if_version with the current version")?;
    ensure!(v2 > v1, "CAS returned {v2:?}, not greater than {v1:?}");
    let other = ctx.another_client().await.ctx("open another client")?;
    let v3 = other
        .kv()
        .put_if_version(&k, val("c")?, v2)
        .await
        .ctx("CAS from another client")?;
    let e = kv.get(&k).await.ctx("get")?.ctx("get after CAS")?;
    ensure_eq!(
        (e.value.as_bytes(), e.version),
        (&b"c"[..], v3),
        "value and version after CAS"
    );
    Ok(())
}

async fn cas_conflict(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let k = key("cas")?;
    let v1 = kv.put(&k, val("a")?).await.ctx("put")?;
    let v2 = kv.put(&k, val("b")?).await.ctx("put again")?;
    expect_err(
        kv.put_if_version(&k, val("stale")?, v1).await,
        &[ErrorKind::Conflict],
        "CAS with a stale version",
    )?;
    let e = kv.get(&k).await.ctx("get")?.ctx("get after failed CAS")?;
    ensure_eq!(
        (e.value.as_bytes(), e.version),
        (&b"b"[..], v2),
        "value and version after a failed CAS"
    );
    // A version from another key is not this key's version.
    let other_v = kv.put(&key("other")?, val("o")?).await.ctx("put other")?;
    expect_err(
        kv.put_if_version(&k, val("x")?, other_v).await,
        &[ErrorKind::Conflict],
        "CAS with another key's version",
    )?;
    Ok(())
}

async fn cas_missing_key_conflict(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let v = kv.put(&key("exists")?, val("e")?).await.ctx("put")?;
    let k = key("missing")?;
    expect_err(
        kv.put_if_version(&k, val("x")?, v).await,
        &[ErrorKind::Conflict],
        "CAS on a missing key",
    )?;
    ensure!(
        kv.get(&k).await.ctx("get")?.is_none(),
        "a failed CAS created the key"
    );
    Ok(())
}

async fn delete_reports_existence(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let k = key("d")?;
    ensure!(
        !kv.delete(&k).await.ctx("delete a missing key")?,
        "deleting a missing key returned true"
    );
    kv.put(&k, val("x")?).await.ctx("put")?;
    ensure!(
        kv.delete(&k).await.ctx("delete an existing key")?,
        "deleting an existing key returned false"
    );
    ensure!(
        !kv.delete(&k).await.ctx("delete again")?,
        "deleting a deleted key returned true"
    );
    ensure!(
        kv.get(&k).await.ctx("get")?.is_none(),
        "key still present after delete"
    );
    Ok(())
}

async fn delete_if_version_conflict(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let k = key("d")?;
    let v1 = kv.put(&k, val("1")?).await.ctx("put")?;
    let v2 = kv.put(&k, val("2")?).await.ctx("put again")?;
    expect_err(
        kv.delete_if_version(&k, v1).await,
        &[ErrorKind::Conflict],
        "delete with a stale version",
    )?;
    let e = kv
        .get(&k)
        .await
        .ctx("get")?
        .ctx("key after failed CAS delete")?;
    ensure_eq!(e.version, v2, "version after failed CAS delete");
    expect_err(
        kv.delete_if_version(&key("missing")?, v2).await,
        &[ErrorKind::Conflict],
        "CAS delete of a missing key",
    )?;
    kv.delete_if_version(&k, v2)
        .await
        .ctx("delete with the current version")?;
    ensure!(
        kv.get(&k).await.ctx("get")?.is_none(),
        "key present after CAS delete"
    );
    Ok(())
}

async fn delete_absent_precondition_invalid(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let k = key("d")?;
    expect_err(
        kv.delete_with(&k, Precondition::Absent).await,
        &[ErrorKind::InvalidArgument],
        "delete a missing key with Absent",
    )?;
    kv.put(&k, val("x")?).await.ctx("put")?;
    expect_err(
        kv.delete_with(&k, Precondition::Absent).await,
        &[ErrorKind::InvalidArgument],
        "delete an existing key with Absent",
    )?;
    ensure!(
        kv.get(&k).await.ctx("get")?.is_some(),
        "the invalid delete removed the key"
    );
    Ok(())
}

async fn put_all(ctx: &Ctx, keys: &[&str]) -> Result<(), Fail> {
    for raw in keys {
        ctx.backend
            .kv()
            .put(&key(raw)?, val(raw.as_bytes())?)
            .await
            .ctx(&format!("put {raw}"))?;
    }
    Ok(())
}

async fn listed(ctx: &Ctx, dir: &Key, depth: Depth) -> Result<Vec<String>, Fail> {
    let listing = ctx
        .backend
        .kv()
        .list(dir, depth)
        .await
        .ctx(&format!("list {dir} {depth:?}"))?;
    for e in &listing.entries {
        ensure_eq!(
            e.value.as_bytes(),
            e.key.as_str().as_bytes(),
            "listed value of {}",
            e.key
        );
    }
    Ok(listing
        .entries
        .into_iter()
        .map(|e| e.key.as_str().to_string())
        .collect())
}

async fn list_children_vs_recursive(ctx: Ctx) -> CaseResult {
    put_all(&ctx, &["a", "a/x", "a/y", "a/y/z", "a/y/z/w", "b/q"]).await?;
    let a = key("a")?;
    ensure_eq!(
        listed(&ctx, &a, Depth::Children).await?,
        vec!["a/x", "a/y"],
        "children of a"
    );
    ensure_eq!(
        listed(&ctx, &a, Depth::Recursive).await?,
        vec!["a/x", "a/y", "a/y/z", "a/y/z/w"],
        "everything under a"
    );
    ensure_eq!(
        listed(&ctx, &Key::root(), Depth::Children).await?,
        vec!["a"],
        "children of the root"
    );
    ensure_eq!(
        listed(&ctx, &Key::root(), Depth::Recursive).await?,
        vec!["a", "a/x", "a/y", "a/y/z", "a/y/z/w", "b/q"],
        "everything under the root"
    );
    Ok(())
}

async fn list_prefix_is_per_segment(ctx: Ctx) -> CaseResult {
    put_all(
        &ctx,
        &["a/b", "a/b/c", "a/bc", "a/bc/d", "a/b-", "a/b.x", "ab/c"],
    )
    .await?;
    let ab = key("a/b")?;
    ensure_eq!(
        listed(&ctx, &ab, Depth::Children).await?,
        vec!["a/b/c"],
        "children of a/b"
    );
    ensure_eq!(
        listed(&ctx, &ab, Depth::Recursive).await?,
        vec!["a/b/c"],
        "everything under a/b"
    );
    ensure_eq!(
        listed(&ctx, &key("a")?, Depth::Recursive).await?,
        vec!["a/b", "a/b-", "a/b.x", "a/b/c", "a/bc", "a/bc/d"],
        "everything under a"
    );
    Ok(())
}

async fn list_sorted(ctx: Ctx) -> CaseResult {
    let mut names: Vec<String> = (0..40)
        .map(|i| {
            format!(
                "s/{:x}{}",
                (i * 7919) % 97,
                ["", "-", "_", ".", "Z", "z"][i % 6]
            )
        })
        .collect();
    names.dedup();
    for name in names.iter().rev() {
        ctx.backend
            .kv()
            .put(&key(name)?, val(name.as_bytes())?)
            .await
            .ctx("put")?;
    }
    let mut expected = names.clone();
    expected.sort();
    expected.dedup();
    ensure_eq!(
        listed(&ctx, &key("s")?, Depth::Children).await?,
        expected,
        "children of s, sorted"
    );
    Ok(())
}

/// More entries than a backend may read in one page (etcd: 512), and more
/// bytes than a gRPC message (4 MiB by default) or a ZooKeeper packet
/// (1 MiB) carries.
async fn list_large_directory(ctx: Ctx) -> CaseResult {
    use futures::StreamExt;
    const MANY: usize = 1100;
    let names: Vec<String> = (0..MANY).map(|i| format!("many/k{i:04}")).collect();
    let puts = futures::stream::iter(names.clone().into_iter().map(|name| {
        let backend = ctx.backend.clone();
        async move {
            let k = key(&name)?;
            backend
                .kv()
                .put(&k, val(name.into_bytes())?)
                .await
                .ctx("put one of many keys")
        }
    }))
    .buffer_unordered(32)
    .collect::<Vec<_>>()
    .await;
    for put in puts {
        put?;
    }
    ensure_eq!(
        listed(&ctx, &key("many")?, Depth::Children).await?,
        names,
        "a directory of {MANY} keys"
    );

    const KEYS: usize = 24;
    let value = vec![b'v'; dprim::MAX_VALUE_BYTES - 1024];
    let stamp = |i: usize| format!("{i:08}").into_bytes();
    for i in 0..KEYS {
        let mut v = value.clone();
        v[..8].copy_from_slice(&stamp(i));
        ctx.backend
            .kv()
            .put(&key(&format!("big/k{i:02}"))?, val(v)?)
            .await
            .ctx("put a large value")?;
    }
    for depth in [Depth::Children, Depth::Recursive] {
        let listing = ctx
            .backend
            .kv()
            .list(&key("big")?, depth)
            .await
            .ctx("list a directory of more than 5 MiB")?;
        ensure_eq!(listing.entries.len(), KEYS, "entries ({depth:?})");
        for (i, e) in listing.entries.iter().enumerate() {
            ensure_eq!(
                e.key.as_str().to_string(),
                format!("big/k{i:02}"),
                "key {i} ({depth:?})"
            );
            let bytes = e.value.as_bytes();
            ensure!(
                bytes.len() == value.len() && bytes[..8] == stamp(i)[..],
                "value of big/k{i:02} ({depth:?}) is not the one written"
            );
        }
    }
    Ok(())
}

async fn list_empty_dir(ctx: Ctx) -> CaseResult {
    let listing = ctx
        .backend
        .kv()
        .list(&key("nothing/here")?, Depth::Children)
        .await
        .ctx("list an empty dir")?;
    ensure!(listing.entries.is_empty(), "entries: {:?}", listing.entries);
    let root = ctx
        .backend
        .kv()
        .list(&Key::root(), Depth::Recursive)
        .await
        .ctx("list an empty namespace")?;
    ensure!(
        root.entries.is_empty(),
        "entries in a fresh namespace: {:?}",
        root.entries
    );
    // A key (not a directory) lists empty too.
    ctx.backend
        .kv()
        .put(&key("leaf")?, val("x")?)
        .await
        .ctx("put leaf")?;
    ensure!(
        listed(&ctx, &key("leaf")?, Depth::Recursive)
            .await?
            .is_empty(),
        "a leaf key has children"
    );
    Ok(())
}

async fn list_hides_prefix_only_children(ctx: Ctx) -> CaseResult {
    put_all(&ctx, &["a/b/c", "a/d", "a/e/f/g"]).await?;
    ensure_eq!(
        listed(&ctx, &key("a")?, Depth::Children).await?,
        vec!["a/d"],
        "children of a"
    );
    ensure_eq!(
        listed(&ctx, &Key::root(), Depth::Children).await?,
        Vec::<String>::new(),
        "children of the root"
    );
    Ok(())
}

async fn txn_all_or_nothing(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let va = kv.put(&key("t/a")?, val("a0")?).await.ctx("put t/a")?;
    kv.put(&key("t/gone")?, val("g")?).await.ctx("put t/gone")?;
    let txn = Txn::new()
        .check(key("t/a")?, Precondition::Version(va))
        .check(key("t/new")?, Precondition::Absent)
        .put(key("t/a")?, val("a1")?)
        .put(key("t/new")?, val("n")?)
        .delete(key("t/gone")?)
        .delete(key("t/never-existed")?);
    let result = kv.txn(txn).await.ctx("a transaction whose checks hold")?;
    ensure_eq!(result.versions.len(), 4, "versions returned per op");
    ensure!(
        result.versions[2].is_none() && result.versions[3].is_none(),
        "deletes returned versions: {:?}",
        result.versions
    );
    let (Some(v_a), Some(v_new)) = (result.versions[0], result.versions[1]) else {
        fail!("puts returned no version: {:?}", result.versions);
    };
    ensure!(
        v_a > va,
        "t/a's new version {v_a:?} is not greater than {va:?}"
    );
    let a = kv
        .get(&key("t/a")?)
        .await
        .ctx("get t/a")?
        .ctx("t/a after txn")?;
    ensure_eq!(
        (a.value.as_bytes(), a.version),
        (&b"a1"[..], v_a),
        "t/a after txn"
    );
    let n = kv
        .get(&key("t/new")?)
        .await
        .ctx("get t/new")?
        .ctx("t/new after txn")?;
    ensure_eq!(
        (n.value.as_bytes(), n.version),
        (&b"n"[..], v_new),
        "t/new after txn"
    );
    ensure!(
        kv.get(&key("t/gone")?).await.ctx("get t/gone")?.is_none(),
        "t/gone survived the txn"
    );
    // An ephemeral put inside a transaction is attached to its session.
    let session = ctx.session().await?;
    kv.txn(Txn {
        checks: vec![],
        ops: vec![TxnOp::Put {
            key: key("t/eph")?,
            value: val("e")?,
            session: Some(session.id()),
        }],
    })
    .await
    .ctx("a transaction with an ephemeral put")?;
    let e = kv
        .get(&key("t/eph")?)
        .await
        .ctx("get t/eph")?
        .ctx("t/eph after txn")?;
    ensure_eq!(
        e.session,
        Some(session.id()),
        "session of the ephemeral key written by a txn"
    );
    session.close().await.ctx("close the session")?;
    eventually(WAIT, "t/eph deleted with its session", || async {
        Ok(kv.get(&key("t/eph")?).await.ctx("get t/eph")?.is_none())
    })
    .await
}

async fn txn_conflict_changes_nothing(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let v_ok = kv.put(&key("t/ok")?, val("ok")?).await.ctx("put t/ok")?;
    let v_guard = kv
        .put(&key("t/guard-first")?, val("g")?)
        .await
        .ctx("put t/guard-first")?;
    kv.put(&key("t/guard-first")?, val("g2")?)
        .await
        .ctx("change t/guard-first")?;
    kv.put(&key("t/guard-second")?, val("x")?)
        .await
        .ctx("put t/guard-second")?;
    let before = kv
        .list(&key("t")?, Depth::Recursive)
        .await
        .ctx("list before")?;
    let txn = Txn::new()
        .check(key("t/ok")?, Precondition::Version(v_ok))
        .check(key("t/guard-first")?, Precondition::Version(v_guard))
        .check(key("t/guard-second")?, Precondition::Absent)
        .put(key("t/ok")?, val("changed")?)
        .put(key("t/created")?, val("c")?)
        .delete(key("t/guard-second")?);
    let e = expect_err(
        kv.txn(txn).await,
        &[ErrorKind::Conflict],
        "a transaction with a failing check",
    )?;
    ensure!(
        e.to_string().contains("t/guard-first"),
        "the conflict does not name the first failing check (t/guard-first): {e}"
    );
    let after = kv
        .list(&key("t")?, Depth::Recursive)
        .await
        .ctx("list after")?;
    ensure_eq!(
        after.entries,
        before.entries,
        "keys after a failed transaction"
    );
    Ok(())
}

async fn txn_duplicate_key_invalid(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let k = key("dup")?;
    let txn = Txn::new()
        .put(k.clone(), val("1")?)
        .put(k.clone(), val("2")?);
    expect_err(
        kv.txn(txn).await,
        &[ErrorKind::InvalidArgument],
        "txn putting a key twice",
    )?;
    let txn = Txn::new().put(k.clone(), val("1")?).delete(k.clone());
    expect_err(
        kv.txn(txn).await,
        &[ErrorKind::InvalidArgument],
        "txn putting and deleting a key",
    )?;
    ensure!(
        kv.get(&k).await.ctx("get")?.is_none(),
        "a rejected transaction wrote the key"
    );
    Ok(())
}

async fn txn_empty_invalid(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    expect_err(
        kv.txn(Txn::new()).await,
        &[ErrorKind::InvalidArgument],
        "empty txn",
    )?;
    let checks_only = Txn::new().check(key("x")?, Precondition::Absent);
    expect_err(
        kv.txn(checks_only).await,
        &[ErrorKind::InvalidArgument],
        "txn with checks but no ops",
    )?;
    Ok(())
}

async fn txn_too_many_ops_invalid(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let mut txn = Txn::new();
    for i in 0..=MAX_TXN_OPS {
        txn = txn.put(key(&format!("many/{i}"))?, val("x")?);
    }
    expect_err(
        kv.txn(txn).await,
        &[ErrorKind::InvalidArgument],
        "txn with 65 ops",
    )?;
    ensure!(
        listed(&ctx, &key("many")?, Depth::Children)
            .await?
            .is_empty(),
        "a rejected transaction wrote keys"
    );
    let mut txn = Txn::new();
    for i in 0..MAX_TXN_OPS {
        txn = txn.put(key(&format!("many/{i:02}"))?, val(format!("many/{i:02}"))?);
    }
    kv.txn(txn).await.ctx("txn with exactly 64 ops")?;
    ensure_eq!(
        listed(&ctx, &key("many")?, Depth::Children).await?.len(),
        MAX_TXN_OPS,
        "keys written by 64 ops"
    );
    Ok(())
}

async fn txn_unsupported_without_capability(ctx: Ctx) -> CaseResult {
    if ctx.caps().kv.transactions {
        return Err(Fail::Skipped(
            "applies only to backends without kv.transactions (this one declares it)".into(),
        ));
    }
    let kv = ctx.backend.kv();
    expect_err(
        kv.txn(Txn::new().put(key("x")?, val("1")?)).await,
        &[ErrorKind::Unsupported],
        "txn",
    )?;
    ensure!(
        kv.get(&key("x")?).await.ctx("get")?.is_none(),
        "an unsupported txn wrote"
    );
    Ok(())
}

async fn watch_key_in_order(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let k = key("w")?;
    let mut w = kv
        .watch(WatchTarget::Key(k.clone()), WatchStart::Now)
        .await
        .ctx("watch")?;
    let writer = ctx.another_client().await.ctx("open another client")?;
    let v1 = writer.kv().put(&k, val("1")?).await.ctx("put 1")?;
    let v2 = writer.kv().put(&k, val("2")?).await.ctx("put 2")?;
    writer.kv().delete(&k).await.ctx("delete")?;
    let v4 = writer.kv().create(&k, val("4")?).await.ctx("create")?;
    writer
        .kv()
        .put(&key("w2")?, val("other key")?)
        .await
        .ctx("put another key")?;
    writer
        .kv()
        .delete_if_version(&k, v4)
        .await
        .ctx("CAS delete")?;
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(next_change(&mut w, "watch event").await?);
    }
    let expect_put = |e: &WatchEvent, value: &[u8], version: Version| -> CaseResult {
        match e {
            WatchEvent::Put(entry)
                if entry.key == k
                    && entry.value.as_bytes() == value
                    && entry.version == version =>
            {
                Ok(())
            }
            other => Err(Fail::Failed(format!(
                "expected put {k} = {:?} @{version}, got {}",
                String::from_utf8_lossy(value),
                show(other)
            ))),
        }
    };
    expect_put(&seen[0], b"1", v1)?;
    expect_put(&seen[1], b"2", v2)?;
    ensure!(
        matches!(&seen[2], WatchEvent::Delete { key: dk, .. } if *dk == k),
        "expected delete, got {}",
        show(&seen[2])
    );
    expect_put(&seen[3], b"4", v4)?;
    ensure!(
        matches!(&seen[4], WatchEvent::Delete { key: dk, .. } if *dk == k),
        "expected delete, got {}",
        show(&seen[4])
    );
    let versions: Vec<Version> = seen.iter().filter_map(WatchEvent::version).collect();
    ensure!(
        versions.windows(2).all(|p| p[0] < p[1]),
        "versions not increasing: {versions:?}"
    );
    if let Some(Some(extra)) = completes(QUIET, w.next()).await {
        fail!("unexpected extra event: {extra:?}");
    }
    Ok(())
}

async fn watch_dir_per_segment(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let mut w = kv
        .watch(WatchTarget::Dir(key("a/b")?), WatchStart::Now)
        .await
        .ctx("watch dir a/b")?;
    put_all(
        &ctx,
        &[
            "a/bc",
            "a/bc/d",
            "a/b",
            "ab/c",
            "a/b-x",
            "a/b/c",
            "a/b/c/d/e",
            "a",
            "a/b.c",
        ],
    )
    .await?;
    kv.delete(&key("a/b/c")?).await.ctx("delete a/b/c")?;
    kv.put(&key("a/b/zz-end")?, val("end")?)
        .await
        .ctx("put the end marker")?;
    let mut seen = Vec::new();
    loop {
        let e = next_change(&mut w, "watch event under a/b").await?;
        let text = show(&e);
        let done = matches!(&e, WatchEvent::Put(p) if p.key.as_str() == "a/b/zz-end");
        seen.push(text);
        if done {
            break;
        }
    }
    let keys: Vec<&str> = seen
        .iter()
        .map(|s| s.split(' ').nth(1).unwrap_or(""))
        .collect();
    ensure_eq!(
        keys,
        vec!["a/b/c", "a/b/c/d/e", "a/b/c", "a/b/zz-end"],
        "keys seen by a watch on a/b (events: {seen:?})"
    );
    Ok(())
}

async fn watch_now_skips_current_value(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let k = key("current")?;
    kv.put(&k, val("old")?).await.ctx("put")?;
    kv.put(&key("dir/x")?, val("old")?).await.ctx("put dir/x")?;
    let mut wk = kv
        .watch(WatchTarget::Key(k.clone()), WatchStart::Now)
        .await
        .ctx("watch key")?;
    let mut wd = kv
        .watch(WatchTarget::Dir(key("dir")?), WatchStart::Now)
        .await
        .ctx("watch dir")?;
    if let Some(item) = completes(QUIET, wk.next()).await {
        fail!("a watch started Now delivered {item:?} before any change");
    }
    if let Some(item) = completes(Duration::from_millis(50), wd.next()).await {
        fail!("a dir watch started Now delivered {item:?} before any change");
    }
    let v = kv.put(&k, val("new")?).await.ctx("put new")?;
    let vd = kv
        .put(&key("dir/x")?, val("new")?)
        .await
        .ctx("put dir/x new")?;
    match next_change(&mut wk, "the change after watch returned").await? {
        WatchEvent::Put(e) if e.value.as_bytes() == b"new" && e.version == v => {}
        other => fail!("expected put current = new @{v}, got {}", show(&other)),
    }
    match next_change(&mut wd, "the change after the dir watch returned").await? {
        WatchEvent::Put(e) if e.value.as_bytes() == b"new" && e.version == vd => {}
        other => fail!("expected put dir/x = new @{vd}, got {}", show(&other)),
    }
    Ok(())
}

async fn watch_after_replays_history(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let k = key("h")?;
    let v0 = kv.put(&k, val("0")?).await.ctx("put 0")?;
    let v1 = kv.put(&k, val("1")?).await.ctx("put 1")?;
    kv.delete(&k).await.ctx("delete")?;
    let v3 = kv.put(&k, val("3")?).await.ctx("put 3")?;
    let mut w = kv
        .watch(WatchTarget::Key(k.clone()), WatchStart::After(v0))
        .await
        .ctx("watch after v0")?;
    match next_change(&mut w, "replayed put 1").await? {
        WatchEvent::Put(e) if e.value.as_bytes() == b"1" && e.version == v1 => {}
        other => fail!("expected put h = 1 @{v1}, got {}", show(&other)),
    }
    match next_change(&mut w, "replayed delete").await? {
        WatchEvent::Delete { key: dk, version } if dk == k && version > v1 && version < v3 => {}
        other => fail!(
            "expected the delete between @{v1} and @{v3}, got {}",
            show(&other)
        ),
    }
    match next_change(&mut w, "replayed put 3").await? {
        WatchEvent::Put(e) if e.value.as_bytes() == b"3" && e.version == v3 => {}
        other => fail!("expected put h = 3 @{v3}, got {}", show(&other)),
    }
    let v4 = kv.put(&k, val("4")?).await.ctx("put 4")?;
    match next_change(&mut w, "live put 4").await? {
        WatchEvent::Put(e) if e.version == v4 => {}
        other => fail!("expected put h = 4 @{v4}, got {}", show(&other)),
    }
    // A dir watch replays from the same point.
    let mut wd = kv
        .watch(WatchTarget::Dir(Key::root()), WatchStart::After(v3))
        .await
        .ctx("watch root after v3")?;
    match next_change(&mut wd, "replayed put 4 on the root watch").await? {
        WatchEvent::Put(e) if e.version == v4 => Ok(()),
        other => fail!("expected put h = 4 @{v4}, got {}", show(&other)),
    }
}

async fn watch_from_list_revision(ctx: Ctx) -> CaseResult {
    let dir = key("items")?;
    let writer_backend = ctx.another_client().await.ctx("open another client")?;
    let writer = tokio::spawn(async move {
        let kv = writer_backend.kv();
        for i in 0..120u32 {
            let k = key(&format!("items/{}/{}", i % 3, i % 7))?;
            if i % 11 == 5 {
                kv.delete(&k).await.ctx("writer delete")?;
            } else {
                kv.put(&k, val(format!("{i}"))?).await.ctx("writer put")?;
            }
            if i % 10 == 0 {
                tokio::task::yield_now().await;
            }
        }
        Ok::<(), Fail>(())
    });
    tokio::time::sleep(Duration::from_millis(2)).await;
    let kv = ctx.backend.kv();
    let listing = kv.list(&dir, Depth::Recursive).await.ctx("list")?;
    let mut state: BTreeMap<Key, Vec<u8>> = listing
        .entries
        .iter()
        .map(|e| (e.key.clone(), e.value.as_bytes().to_vec()))
        .collect();
    let mut last_seen: BTreeMap<Key, Version> = listing
        .entries
        .iter()
        .map(|e| (e.key.clone(), e.version))
        .collect();
    // Changes certainly made between the listing and the watch call.
    let between = ctx.another_client().await.ctx("open another client")?;
    for i in 0..4 {
        between
            .kv()
            .put(&key(&format!("items/between/{i}"))?, val(format!("b{i}"))?)
            .await
            .ctx("put between list and watch")?;
    }
    between
        .kv()
        .delete(&key("items/between/0")?)
        .await
        .ctx("delete between list and watch")?;
    let mut w = kv
        .watch(
            WatchTarget::Dir(dir.clone()),
            WatchStart::After(listing.revision),
        )
        .await
        .ctx("watch from the listing's revision")?;
    writer
        .await
        .map_err(|e| Fail::Failed(format!("writer task: {e}")))??;
    let marker = key("items/zz-marker")?;
    let mv = kv.put(&marker, val("m")?).await.ctx("put marker")?;
    loop {
        let e = next_change(&mut w, "watch from listing revision").await?;
        let (k, version) = match &e {
            WatchEvent::Put(entry) => (entry.key.clone(), entry.version),
            WatchEvent::Delete { key, version } => (key.clone(), *version),
            WatchEvent::Resync { .. } => fail!("resync"),
        };
        ensure!(
            version > listing.revision,
            "event {} is not after the listing revision {}",
            show(&e),
            listing.revision
        );
        if let Some(prev) = last_seen.get(&k) {
            ensure!(
                version > *prev,
                "event {} is not after the version already seen ({prev})",
                show(&e)
            );
        }
        last_seen.insert(k.clone(), version);
        match e {
            WatchEvent::Put(entry) => {
                state.insert(entry.key, entry.value.into_bytes());
            }
            _ => {
                state.remove(&k);
            }
        }
        if version == mv {
            break;
        }
    }
    let fin = kv.list(&dir, Depth::Recursive).await.ctx("final list")?;
    let expected: BTreeMap<Key, Vec<u8>> = fin
        .entries
        .into_iter()
        .map(|e| (e.key, e.value.into_bytes()))
        .collect();
    if state != expected {
        let show_map =
            |m: &BTreeMap<Key, Vec<u8>>, other: &BTreeMap<Key, Vec<u8>>| -> Vec<String> {
                m.iter()
                    .filter(|(k, v)| other.get(*k) != Some(*v))
                    .map(|(k, v)| format!("{k}={:?}", String::from_utf8_lossy(v)))
                    .collect()
            };
        fail!(
            "the listing plus the watch events do not rebuild the final state: only rebuilt {:?}; only in the backend {:?}",
            show_map(&state, &expected),
            show_map(&expected, &state)
        );
    }
    Ok(())
}

async fn watch_after_races_write(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let other = ctx.another_client().await.ctx("open another client")?;
    let k = key("race")?;
    for i in 0..60u32 {
        let v = kv
            .put(&k, val(format!("base-{i}"))?)
            .await
            .ctx("put base")?;
        let writer_kv = other.clone();
        let wk = k.clone();
        let delay = i % 4;
        let writer = tokio::spawn(async move {
            for _ in 0..delay {
                tokio::task::yield_now().await;
            }
            writer_kv
                .kv()
                .put(&wk, val(format!("race-{i}"))?)
                .await
                .ctx("racing put")
        });
        let mut w = kv
            .watch(WatchTarget::Key(k.clone()), WatchStart::After(v))
            .await
            .ctx("watch after v")?;
        let wrote = writer
            .await
            .map_err(|e| Fail::Failed(format!("writer: {e}")))??;
        match next_change(&mut w, &format!("iteration {i}: the racing write")).await? {
            WatchEvent::Put(e)
                if e.version == wrote && e.value.as_bytes() == format!("race-{i}").as_bytes() => {}
            other => fail!(
                "iteration {i}: watch after @{v} expected the racing put @{wrote}, got {}",
                show(&other)
            ),
        }
    }
    Ok(())
}

async fn watch_many_writes_in_order(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let mut w = kv
        .watch(WatchTarget::Dir(key("m")?), WatchStart::Now)
        .await
        .ctx("watch")?;
    let writer_backend = ctx.another_client().await.ctx("open another client")?;
    const N: u32 = 300;
    let writer = tokio::spawn(async move {
        for i in 0..N {
            let k = key(if i % 3 == 0 { "m/x" } else { "m/y" })?;
            writer_backend
                .kv()
                .put(&k, val(format!("{i}"))?)
                .await
                .ctx("put")?;
        }
        Ok::<(), Fail>(())
    });
    let mut next_x = 0u32;
    let mut next_y = 1u32;
    let mut last: BTreeMap<Key, Version> = BTreeMap::new();
    let mut count = 0;
    while count < N {
        let item = crate::util::within(WAIT, "next of many watch events", w.next()).await?;
        let e = match item {
            Some(Ok(WatchEvent::Resync { .. })) => {
                // Allowed: the stream must then end.
                return match crate::util::within(WAIT, "end of the stream after resync", w.next())
                    .await?
                {
                    None => Ok(()),
                    Some(item) => fail!("the stream continued after a resync with {item:?}"),
                };
            }
            Some(Ok(WatchEvent::Put(e))) => e,
            other => fail!("unexpected watch item {other:?}"),
        };
        let i: u32 = e
            .value
            .as_str()
            .and_then(|s| s.parse().ok())
            .ctx("a write's value")?;
        // Writes 0, 3, 6, ... go to m/x; 1, 2, 4, 5, ... to m/y.
        let expected = if e.key.as_str() == "m/x" {
            &mut next_x
        } else {
            &mut next_y
        };
        ensure_eq!(i, *expected, "the next write seen on {}", e.key);
        *expected += match i % 3 {
            0 => 3,
            1 => 1,
            _ => 2,
        };
        if let Some(prev) = last.insert(e.key.clone(), e.version) {
            ensure!(
                e.version > prev,
                "{}: version {} after {prev}",
                e.key,
                e.version
            );
        }
        count += 1;
    }
    writer
        .await
        .map_err(|e| Fail::Failed(format!("writer: {e}")))??;
    Ok(())
}

async fn watch_shows_no_txn_checks(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let v0 = kv.put(&key("c/seen")?, val("0")?).await.ctx("put c/seen")?;
    let mut w = kv
        .watch(WatchTarget::Dir(key("c")?), WatchStart::After(v0))
        .await
        .ctx("watch c")?;
    // An Absent check on the key the transaction creates, and a version
    // check on a key it does not write.
    let txn = Txn::new()
        .check(key("c/new")?, Precondition::Absent)
        .check(key("c/seen")?, Precondition::Version(v0))
        .put(key("c/new")?, val("n")?);
    kv.txn(txn).await.ctx("a transaction whose checks hold")?;
    let v_end = kv.put(&key("c/end")?, val("e")?).await.ctx("put c/end")?;
    let mut seen = Vec::new();
    loop {
        let event = next_change(&mut w, "watch of c").await?;
        let done = matches!(&event, WatchEvent::Put(e) if e.version == v_end);
        seen.push(show(&event));
        if done {
            break;
        }
    }
    ensure_eq!(
        seen.len(),
        2,
        "events between the transaction and the next put (only the put of c/new belongs there): {seen:?}"
    );
    ensure!(
        seen[0].contains("c/new") && seen[0].starts_with("put"),
        "the transaction's event: {seen:?}"
    );
    Ok(())
}

async fn watch_sees_session_deletes(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let session = ctx.session().await?;
    let k = key("eph/a")?;
    let v = kv
        .put_ephemeral(&k, val("x")?, &session)
        .await
        .ctx("put ephemeral")?;
    let observer = ctx.another_client().await.ctx("open another client")?;
    let mut w = observer
        .kv()
        .watch(WatchTarget::Dir(key("eph")?), WatchStart::After(v))
        .await
        .ctx("watch")?;
    let mut wk = observer
        .kv()
        .watch(WatchTarget::Key(k.clone()), WatchStart::Now)
        .await
        .ctx("watch key")?;
    session.close().await.ctx("close the session")?;
    for (name, stream) in [("dir watch", &mut w), ("key watch", &mut wk)] {
        match next_change(stream, name).await? {
            WatchEvent::Delete { key: dk, version } if dk == k && version > v => {}
            other => fail!(
                "{name}: expected the session's delete of {k}, got {}",
                show(&other)
            ),
        }
    }
    Ok(())
}

async fn namespace_isolation(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let neighbour = ctx
        .sibling_namespace("neighbour")
        .await
        .ctx("open a second namespace")?;
    let nkv = neighbour.kv();
    let mut nwatch = nkv
        .watch(WatchTarget::Dir(Key::root()), WatchStart::Now)
        .await
        .ctx("watch the neighbour's root")?;
    kv.put(&key("shared/name")?, val("mine")?)
        .await
        .ctx("put")?;
    ensure!(
        nkv.get(&key("shared/name")?)
            .await
            .ctx("neighbour get")?
            .is_none(),
        "the neighbour namespace sees our key"
    );
    ensure!(
        nkv.list(&Key::root(), Depth::Recursive)
            .await
            .ctx("neighbour list")?
            .entries
            .is_empty(),
        "the neighbour lists our key"
    );
    nkv.create(&key("shared/name")?, val("theirs")?)
        .await
        .ctx("the neighbour creates the same key name")?;
    let mine = kv
        .get(&key("shared/name")?)
        .await
        .ctx("get")?
        .ctx("our key")?;
    ensure_eq!(
        mine.value.as_bytes(),
        b"mine",
        "our value after the neighbour wrote the same name"
    );
    match next_change(&mut nwatch, "the neighbour's own write").await? {
        WatchEvent::Put(e) if e.value.as_bytes() == b"theirs" => {}
        other => fail!("the neighbour's watch saw {}", show(&other)),
    }
    // Other primitives are per namespace too.
    let s1 = ctx.session().await?;
    let s2 = ctx.session_on(&neighbour).await?;
    let g1 = ctx
        .backend
        .locks()
        .try_lock(&key("lk")?, &s1)
        .await
        .ctx("lock here")?;
    let g2 = neighbour
        .locks()
        .try_lock(&key("lk")?, &s2)
        .await
        .ctx("lock in the neighbour")?;
    ensure!(
        g1.is_some() && g2.is_some(),
        "the same lock name is shared across namespaces"
    );
    let q = ctx
        .backend
        .queues()
        .open(&key("q")?, None)
        .await
        .ctx("open queue")?;
    q.push(val("job")?).await.ctx("push")?;
    let nq = neighbour
        .queues()
        .open(&key("q")?, None)
        .await
        .ctx("open neighbour queue")?;
    ensure!(
        nq.pull(PullOptions::default())
            .await
            .ctx("neighbour pull")?
            .is_none(),
        "the neighbour's queue got our message"
    );
    Ok(())
}

async fn internal_keys_hidden(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let mut w = kv
        .watch(WatchTarget::Dir(Key::root()), WatchStart::Now)
        .await
        .ctx("watch the root")?;
    let session = ctx.session().await?;
    let guard = ctx
        .backend
        .locks()
        .lock(&key("locks/l1")?, &session, WAIT)
        .await
        .ctx("lock")?;
    let leadership = ctx
        .backend
        .elections()
        .campaign(&key("elections/e1")?, val("me")?, &session)
        .await
        .ctx("campaign")?;
    leadership
        .proclaim(val("me again")?)
        .await
        .ctx("proclaim")?;
    let q = ctx
        .backend
        .queues()
        .open(&key("queues/q1")?, None)
        .await
        .ctx("open queue")?;
    q.push(val("job")?).await.ctx("push")?;
    let d = q
        .pull(PullOptions {
            session: Some(session.clone()),
            ..PullOptions::default()
        })
        .await
        .ctx("pull")?;
    let mut sub = ctx
        .backend
        .pubsub()
        .subscribe(&key("topics/t1")?)
        .await
        .ctx("subscribe")?;
    ctx.backend
        .pubsub()
        .publish(&key("topics/t1")?, val("hello")?)
        .await
        .ctx("publish")?;
    let _ = crate::util::within(WAIT, "the published message", sub.next()).await?;
    q.push(val("job2")?).await.ctx("push 2")?;
    let listing = kv
        .list(&Key::root(), Depth::Recursive)
        .await
        .ctx("list root while everything is held")?;
    ensure!(
        listing.entries.is_empty(),
        "internal keys listed: {:?}",
        listing
            .entries
            .iter()
            .map(|e| e.key.as_str())
            .collect::<Vec<_>>()
    );
    for dir in ["locks", "elections", "queues", "topics"] {
        let l = kv.list(&key(dir)?, Depth::Recursive).await.ctx("list")?;
        ensure!(
            l.entries.is_empty(),
            "internal keys listed under {dir}: {:?}",
            l.entries
        );
        ensure!(
            kv.get(&key(&format!("{dir}/{}1", &dir[..1]))?)
                .await
                .ctx("get")?
                .is_none(),
            "get finds an internal key under {dir}"
        );
    }
    if let Some(d) = d {
        q.ack(&d.receipt).await.ctx("ack")?;
    }
    guard.unlock().await.ctx("unlock")?;
    leadership.resign().await.ctx("resign")?;
    session.close().await.ctx("close the session")?;
    let marker = key("app/marker")?;
    kv.put(&marker, val("m")?).await.ctx("put marker")?;
    let first = next_change(&mut w, "the marker on the root watch").await?;
    ensure!(
        first.key() == Some(&marker),
        "the root watch saw an internal change first: {}",
        show(&first)
    );
    let listing = kv
        .list(&Key::root(), Depth::Recursive)
        .await
        .ctx("list root at the end")?;
    ensure_eq!(
        listing
            .entries
            .iter()
            .map(|e| e.key.as_str())
            .collect::<Vec<_>>(),
        vec!["app/marker"],
        "keys at the end"
    );
    Ok(())
}

async fn ephemeral_deleted_on_close(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let session = ctx.session().await?;
    let k = key("eph")?;
    kv.put_ephemeral(&k, val("x")?, &session)
        .await
        .ctx("put ephemeral")?;
    kv.put(&key("durable")?, val("d")?)
        .await
        .ctx("put durable")?;
    let e = kv.get(&k).await.ctx("get")?.ctx("the ephemeral key")?;
    ensure_eq!(e.session, Some(session.id()), "the entry's session");
    let other = ctx.another_client().await.ctx("open another client")?;
    ensure!(
        other
            .kv()
            .get(&k)
            .await
            .ctx("get via another client")?
            .is_some(),
        "another client does not see the ephemeral key"
    );
    session.close().await.ctx("close")?;
    if ctx.caps().kv.linearizable {
        ensure!(
            kv.get(&k).await.ctx("get after close")?.is_none(),
            "the ephemeral key is still there right after close"
        );
        ensure!(
            other.kv().get(&k).await.ctx("get after close")?.is_none(),
            "another client still sees the key right after close"
        );
    } else {
        eventually(WAIT, "the ephemeral key gone after close", || async {
            Ok(other.kv().get(&k).await.ctx("get")?.is_none())
        })
        .await?;
    }
    ensure!(
        kv.get(&key("durable")?).await.ctx("get durable")?.is_some(),
        "closing a session deleted a durable key"
    );
    Ok(())
}

async fn ephemeral_deleted_on_expiry(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let session = ctx.short_session().await?;
    let k = key("eph")?;
    kv.put_ephemeral(&k, val("x")?, &session)
        .await
        .ctx("put ephemeral")?;
    ctx.expire_session(session.id()).await?;
    let other = ctx.another_client().await.ctx("open another client")?;
    eventually(
        WAIT + ctx.session_ttl(),
        "the ephemeral key gone after expiry",
        || async { Ok(other.kv().get(&k).await.ctx("get")?.is_none()) },
    )
    .await
}

async fn put_with_expired_session_fails(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let session = ctx.short_session().await?;
    ctx.expire_session(session.id()).await?;
    let k = key("late")?;
    expect_err(
        kv.put_ephemeral(&k, val("x")?, &session).await,
        &[ErrorKind::SessionLost],
        "put with an expired session",
    )?;
    ensure!(
        kv.get(&k).await.ctx("get")?.is_none(),
        "the rejected put wrote the key"
    );
    Ok(())
}

async fn put_with_closed_session_fails(ctx: Ctx) -> CaseResult {
    let kv = ctx.backend.kv();
    let session = ctx.session().await?;
    session.close().await.ctx("close")?;
    let k = key("late")?;
    let options = PutOptions {
        precondition: Precondition::None,
        session: Some(session.id()),
    };
    expect_err(
        kv.put_with(&k, val("x")?, options).await,
        &[ErrorKind::SessionLost],
        "put with a closed session",
    )?;
    let other = ctx.another_client().await.ctx("open another client")?;
    expect_err(
        other.kv().put_ephemeral(&k, val("x")?, &session).await,
        &[ErrorKind::SessionLost],
        "put with a closed session from another client",
    )?;
    ensure!(
        kv.get(&k).await.ctx("get")?.is_none(),
        "the rejected put wrote the key"
    );
    Ok(())
}

/// Four clients (separate connections) run random reads, writes, creates,
/// conditional writes and deletes on two keys at once
/// ([`History::random_ops`]); every outcome is recorded.
async fn concurrent_history(ctx: &Ctx) -> Result<History, Fail> {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(ctx.another_client().await.ctx("open a client")?);
    }
    race(clients, registers(), 60, Duration::ZERO, true)
        .await
        .map_err(Fail::Failed)
}

async fn concurrent_writes_linearizable(ctx: Ctx) -> CaseResult {
    // Reads are left out: a backend that does not declare `linearizable`
    // may serve them from a lagging replica. Its writes (the outcomes of
    // creates and conditional writes and deletes, and the versions
    // returned) must still fit one order consistent with real time.
    let history = concurrent_history(&ctx).await?;
    history.check(false).map_err(Fail::Failed)?;
    Ok(())
}

async fn concurrent_reads_linearizable(ctx: Ctx) -> CaseResult {
    let history = concurrent_history(&ctx).await?;
    history.check(true).map_err(Fail::Failed)?;
    Ok(())
}
