//! `dprim kv ...`

use super::{dir, ephemeral_hint, key, read_value};
use crate::cli::{Ctx, KvCommand};
use crate::exit::{Failure, OK};
use crate::output::{hex_note, note, value_json, value_preview, value_text};
use dprim::{
    Depth, Entry, Error, ErrorKind, Key, KvExt, Precondition, Version, WatchEvent, WatchStart,
    WatchTarget,
};
use serde_json::json;
use std::io::Write;

pub(crate) async fn run(ctx: &Ctx, command: KvCommand) -> Result<u8, Failure> {
    match command {
        KvCommand::Get {
            key: raw,
            raw: bytes,
        } => get(ctx, &raw, bytes).await,
        KvCommand::Put { key: k, value } => {
            let (k, v) = (key(&k)?, read_value(value)?);
            let (backend, _) = ctx.open().await?;
            let version = backend.kv().put(&k, v).await?;
            print_version(ctx, &k, version)
        }
        KvCommand::Create { key: k, value } => {
            let (k, v) = (key(&k)?, read_value(value)?);
            let (backend, _) = ctx.open().await?;
            let version = backend.kv().create(&k, v).await.map_err(|e| {
                if e.kind() == ErrorKind::AlreadyExists {
                    Failure::new(Error::already_exists(format!(
                        "cannot create `{k}`: the key already exists; nothing was written"
                    )))
                    .hint(format!(
                        "use `dprim kv put {k} ...` to overwrite it, or `dprim kv cas {k} VERSION ...` \
                         to replace a version you read"
                    ))
                } else {
                    Failure::new(e)
                }
            })?;
            print_version(ctx, &k, version)
        }
        KvCommand::Cas {
            key: k,
            version,
            value,
        } => {
            let (k, v) = (key(&k)?, read_value(value)?);
            let (backend, _) = ctx.open().await?;
            let new = backend
                .kv()
                .put_if_version(&k, v, version)
                .await
                .map_err(|e| conflict(e, &k, version))?;
            print_version(ctx, &k, new)
        }
        KvCommand::Del { key: k, version } => {
            let k = key(&k)?;
            let (backend, _) = ctx.open().await?;
            let precondition = version.map_or(Precondition::None, Precondition::Version);
            let existed = backend
                .kv()
                .delete_with(&k, precondition)
                .await
                .map_err(|e| match version {
                    Some(v) => conflict(e, &k, v),
                    None => Failure::new(e),
                })?;
            let text = if existed {
                format!("deleted {k}")
            } else {
                format!("{k} did not exist; nothing was deleted")
            };
            ctx.out
                .emit(&text, json!({"key": k.as_str(), "deleted": existed}))?;
            Ok(OK)
        }
        KvCommand::Ls { dir: d, recursive } => list(ctx, &d, recursive).await,
        KvCommand::Watch {
            key: k,
            dir: is_dir,
            from,
            count,
        } => watch(ctx, &k, is_dir, from, count).await,
    }
}

fn conflict(e: Error, k: &Key, expected: Version) -> Failure {
    if e.kind() == ErrorKind::Conflict {
        Failure::new(Error::conflict(format!(
            "`{k}` is not at version {expected} (it changed or was deleted); nothing was changed"
        )))
        .hint(format!("read the current version with `dprim kv get {k}`"))
    } else {
        Failure::new(e)
    }
}

fn print_version(ctx: &Ctx, k: &Key, version: Version) -> Result<u8, Failure> {
    ctx.out.emit(
        &format!("version: {version}"),
        json!({"key": k.as_str(), "version": version.get()}),
    )?;
    Ok(OK)
}

fn entry_json(entry: &Entry) -> serde_json::Value {
    let (value, encoding) = value_json(&entry.value);
    json!({
        "key": entry.key.as_str(),
        "value": value,
        "encoding": encoding,
        "version": entry.version.get(),
        "session": entry.session.map(|s| s.to_string()),
    })
}

async fn get(ctx: &Ctx, raw_key: &str, raw: bool) -> Result<u8, Failure> {
    let k = key(raw_key)?;
    let (backend, _) = ctx.open().await?;
    let Some(entry) = backend.kv().get(&k).await? else {
        let mut failure = Failure::new(Error::not_found(format!(
            "key `{k}` not found in namespace `{}`",
            backend.namespace()
        )));
        if let Some(h) = ephemeral_hint(&backend, ctx.config.as_deref()) {
            failure = failure.hint(h);
        }
        return Err(failure);
    };
    if raw {
        let mut stdout = std::io::stdout().lock();
        let written = stdout
            .write_all(entry.value.as_bytes())
            .and_then(|_| stdout.flush());
        if let Err(e) = written {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(Failure::new(
                    Error::new(ErrorKind::Unexpected, "cannot write to stdout").with_source(e),
                ));
            }
        }
        return Ok(OK);
    }
    let (value, utf8) = value_text(&entry.value);
    let mut text = format!("key: {}\nversion: {}\n", entry.key, entry.version);
    if let Some(session) = entry.session {
        text.push_str(&format!("session: {session} (ephemeral)\n"));
    }
    text.push_str(&format!("value: {value}"));
    ctx.out.emit(&text, entry_json(&entry))?;
    if !utf8 && !ctx.out.is_json() {
        note(&hex_note(entry.value.len()));
    }
    Ok(OK)
}

async fn list(ctx: &Ctx, raw_dir: &str, recursive: bool) -> Result<u8, Failure> {
    let d = dir(raw_dir)?;
    let (backend, _) = ctx.open().await?;
    let depth = if recursive {
        Depth::Recursive
    } else {
        Depth::Children
    };
    let listing = backend.kv().list(&d, depth).await?;
    if ctx.out.is_json() {
        let entries: Vec<_> = listing.entries.iter().map(entry_json).collect();
        ctx.out.emit(
            "",
            json!({"dir": d.as_str(), "revision": listing.revision.get(), "entries": entries}),
        )?;
        return Ok(OK);
    }
    if listing.entries.is_empty() {
        note(&format!(
            "no keys {} {d} (namespace `{}`)",
            if recursive { "under" } else { "directly in" },
            backend.namespace()
        ));
        if let Some(h) = ephemeral_hint(&backend, ctx.config.as_deref()) {
            note(&format!("hint: {h}"));
        }
        return Ok(OK);
    }
    let key_width = listing
        .entries
        .iter()
        .map(|e| e.key.as_str().len())
        .max()
        .unwrap_or(0);
    let version_width = listing
        .entries
        .iter()
        .map(|e| e.version.to_string().len())
        .max()
        .unwrap_or(0);
    for e in &listing.entries {
        ctx.out.text(&format!(
            "{:<key_width$}  {:>version_width$}  {}",
            e.key.as_str(),
            e.version.to_string(),
            value_preview(&e.value)
        ))?;
    }
    note(&format!(
        "{} keys at revision {} (watch for later changes with --from {})",
        listing.entries.len(),
        listing.revision,
        listing.revision
    ));
    Ok(OK)
}

async fn watch(
    ctx: &Ctx,
    raw: &str,
    is_dir: bool,
    from: Option<Version>,
    count: Option<u64>,
) -> Result<u8, Failure> {
    let target = if is_dir {
        WatchTarget::Dir(dir(raw)?)
    } else {
        WatchTarget::Key(key(raw)?)
    };
    let shown = match &target {
        WatchTarget::Key(k) => format!("key {k}"),
        WatchTarget::Dir(d) => format!("directory {d}"),
    };
    let start = from.map_or(WatchStart::Now, WatchStart::After);
    let (backend, _) = ctx.open().await?;
    let mut stream = backend.kv().watch(target, start).await?;
    if !ctx.out.is_json() {
        note(&format!("watching {shown} (Ctrl-C to stop)"));
    }
    if count == Some(0) {
        return Ok(OK);
    }
    let mut seen = 0u64;
    let mut hex_noted = false;
    let mut interrupts = ctx.interrupts();
    loop {
        let event = tokio::select! {
            _ = interrupts.next() => return Ok(OK),
            event = stream.next() => event,
        };
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(e)) => return Err(Failure::new(e)),
            None => {
                return Err(Failure::new(Error::closed(format!(
                    "the backend ended the watch on {shown}"
                ))))
            }
        };
        match &event {
            WatchEvent::Put(entry) => {
                let (value, utf8) = value_text(&entry.value);
                if !utf8 && !hex_noted && !ctx.out.is_json() {
                    note(&hex_note(entry.value.len()));
                    hex_noted = true;
                }
                let mut j = entry_json(entry);
                j["event"] = json!("put");
                ctx.out.emit(
                    &format!("put {} version {}: {value}", entry.key, entry.version),
                    j,
                )?;
            }
            WatchEvent::Delete { key, version } => {
                ctx.out.emit(
                    &format!("delete {key} version {version}"),
                    json!({"event": "delete", "key": key.as_str(), "version": version.get()}),
                )?;
            }
            WatchEvent::Resync { reason } => {
                ctx.out.emit(
                    &format!("resync: {reason}"),
                    json!({"event": "resync", "reason": reason}),
                )?;
                return Err(Failure::new(Error::new(
                    ErrorKind::Resync,
                    format!("the watch on {shown} lost continuity: {reason}"),
                ))
                .hint(
                    "list the current state with `dprim kv ls`, then watch again with --from \
                     the revision it prints",
                ));
            }
        }
        seen += 1;
        if count.is_some_and(|n| seen >= n) {
            return Ok(OK);
        }
    }
}
