//! `dprim check`: validate the config, connect, print capabilities.

use super::human;
use crate::cli::Ctx;
use crate::endpoints_text;
use crate::exit::{Failure, OK};
use serde_json::json;
use std::time::Instant;

/// Said about the in-memory backend wherever it is in use.
pub(crate) const MEMORY_NOTE: &str = "the in-memory backend lives inside this dprim process: \
its state is gone when the process exits, and other processes cannot see it";

pub(crate) async fn run(ctx: &Ctx) -> Result<u8, Failure> {
    let config = ctx.config()?;
    let started = Instant::now();
    let backend = crate::open_config(&config).await.map_err(Failure::new)?;
    let elapsed = started.elapsed();
    let b = &config.backend;
    let source = match &ctx.config {
        Some(path) => path.display().to_string(),
        None => "none (the embedded in-memory backend)".to_string(),
    };
    let capabilities = backend.capabilities().describe();
    let memory = backend.kind() == "memory";
    let compiled = crate::registry()
        .kinds()
        .iter()
        .map(|k| k.to_string())
        .collect::<Vec<_>>();
    if ctx.out.is_json() {
        let caps: serde_json::Map<String, serde_json::Value> = capabilities
            .iter()
            .map(|(n, v)| (n.to_string(), json!(v)))
            .collect();
        ctx.out.emit(
            "",
            json!({
                "config": ctx.config.as_ref().map(|p| p.display().to_string()),
                "kind": backend.kind(),
                "namespace": backend.namespace(),
                "endpoints": b.endpoints,
                "session_ttl_ms": b.session_ttl.as_millis() as u64,
                "connect_timeout_ms": b.connect_timeout.as_millis() as u64,
                "request_timeout_ms": b.request_timeout.as_millis() as u64,
                "connected_ms": elapsed.as_millis() as u64,
                "capabilities": caps,
                "compiled_kinds": compiled,
                "note": memory.then_some(MEMORY_NOTE),
            }),
        )?;
        return Ok(OK);
    }
    let mut text = String::new();
    text.push_str(&format!("config: {source}\n"));
    text.push_str(&format!("kind: {}\n", backend.kind()));
    text.push_str(&format!("namespace: {}\n", backend.namespace()));
    text.push_str(&format!("endpoints: {}\n", endpoints_text(&b.endpoints)));
    text.push_str(&format!("session_ttl: {}\n", human(b.session_ttl)));
    text.push_str(&format!(
        "connect_timeout: {}, request_timeout: {}\n",
        human(b.connect_timeout),
        human(b.request_timeout)
    ));
    if let Some(user) = &b.username {
        text.push_str(&format!("username: {user}\n"));
    }
    if b.tls.is_some() {
        text.push_str("tls: on\n");
    }
    text.push_str(&format!("connected: ok ({})\n", human_ms(elapsed)));
    text.push_str("capabilities:\n");
    let width = capabilities.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    for (name, value) in &capabilities {
        text.push_str(&format!("  {name:<width$}  {value}\n"));
    }
    text.push_str(&format!("backends in this build: {}", compiled.join(", ")));
    if memory {
        text.push_str(&format!("\nnote: {MEMORY_NOTE}"));
    }
    ctx.out.text(&text)?;
    Ok(OK)
}

fn human_ms(d: std::time::Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1000.0)
}
