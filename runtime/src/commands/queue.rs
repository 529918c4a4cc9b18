//! `dprim queue push|pull|ack|nack|depth`
//!
//! Queues are opened with the default options (5 attempts, then
//! `<queue>/dead-letter`).

use super::{ephemeral_hint, human, key, read_value};
use crate::cli::{Ctx, QueueCommand};
use crate::exit::{self, Failure, OK};
use crate::output::{hex_note, note, value_json, value_text};
use dprim::{Error, ErrorKind, Key, PullOptions, Queue, Receipt};
use serde_json::json;
use std::sync::Arc;

async fn open(ctx: &Ctx, name: &Key) -> Result<(dprim::Backend, Arc<dyn Queue>), Failure> {
    let (backend, _) = ctx.open().await?;
    let queue = backend.queues().open(name, None).await?;
    Ok((backend, queue))
}

fn receipt(raw: String) -> Result<Receipt, Failure> {
    if raw.trim().is_empty() {
        return Err(Failure::new(Error::invalid(
            "the receipt is empty; pass the receipt printed by `dprim queue pull`",
        )));
    }
    Ok(Receipt(raw))
}

fn stale(e: Error, q: &Key, what: &str) -> Failure {
    if e.kind() == ErrorKind::Conflict {
        Failure::new(Error::conflict(format!(
            "cannot {what} on queue `{q}`: the receipt is stale (its visibility timeout \
             passed, so the message went back to the queue or to another consumer)"
        )))
        .hint("the message will be delivered again; pull it again to get a fresh receipt")
    } else {
        Failure::new(e)
    }
}

pub(crate) async fn run(ctx: &Ctx, command: QueueCommand) -> Result<u8, Failure> {
    match command {
        QueueCommand::Push { queue, message } => {
            let q = key(&queue)?;
            let payload = read_value(message.into())?;
            let (_, queue) = open(ctx, &q).await?;
            let id = queue.push(payload).await?;
            ctx.out.emit(
                &format!("id: {id}"),
                json!({"queue": q.as_str(), "id": id.0}),
            )?;
            Ok(OK)
        }
        QueueCommand::Pull {
            queue,
            visibility,
            wait,
            ack,
        } => {
            let q = key(&queue)?;
            let (backend, queue) = open(ctx, &q).await?;
            let options = PullOptions {
                visibility_timeout: visibility,
                wait,
                session: None,
            };
            let Some(delivery) = queue.pull(options).await? else {
                let waited = if wait.is_zero() {
                    String::new()
                } else {
                    format!(" (waited {})", human(wait))
                };
                if ctx.out.is_json() {
                    ctx.out
                        .emit("", json!({"queue": q.as_str(), "message": null}))?;
                    return Ok(exit::CONDITION);
                }
                let mut failure =
                    Failure::new(Error::not_found(format!("queue `{q}` is empty{waited}")));
                if let Some(h) = ephemeral_hint(&backend, ctx.config.as_deref()) {
                    failure = failure.hint(h);
                }
                return Err(failure);
            };
            if ack {
                queue
                    .ack(&delivery.receipt)
                    .await
                    .map_err(|e| stale(e, &q, "ack"))?;
            }
            let (text, utf8) = value_text(&delivery.payload);
            let (payload, encoding) = value_json(&delivery.payload);
            let mut lines = format!(
                "id: {}\nattempt: {}\nreceipt: {}\npayload: {text}",
                delivery.id, delivery.attempt, delivery.receipt
            );
            if ack {
                lines.push_str("\nacked: true");
            } else {
                lines.push_str(&format!(
                    "\nvisible again in {} unless acked: dprim queue ack {q} {}",
                    human(visibility),
                    delivery.receipt
                ));
            }
            ctx.out.emit(
                &lines,
                json!({
                    "queue": q.as_str(),
                    "id": delivery.id.0,
                    "attempt": delivery.attempt,
                    "receipt": delivery.receipt.0,
                    "payload": payload,
                    "encoding": encoding,
                    "acked": ack,
                }),
            )?;
            if !utf8 && !ctx.out.is_json() {
                note(&hex_note(delivery.payload.len()));
            }
            Ok(OK)
        }
        QueueCommand::Ack { queue, receipt: r } => {
            let q = key(&queue)?;
            let r = receipt(r)?;
            let (_, queue) = open(ctx, &q).await?;
            queue.ack(&r).await.map_err(|e| stale(e, &q, "ack"))?;
            ctx.out.emit(
                &format!("acked {r}"),
                json!({"queue": q.as_str(), "receipt": r.0, "acked": true}),
            )?;
            Ok(OK)
        }
        QueueCommand::Nack {
            queue,
            receipt: r,
            delay,
        } => {
            let q = key(&queue)?;
            let r = receipt(r)?;
            let (_, queue) = open(ctx, &q).await?;
            queue
                .nack(&r, delay)
                .await
                .map_err(|e| stale(e, &q, "nack"))?;
            ctx.out.emit(
                &format!("nacked {r}; visible again in {}", human(delay)),
                json!({"queue": q.as_str(), "receipt": r.0, "nacked": true, "delay_ms": delay.as_millis() as u64}),
            )?;
            Ok(OK)
        }
        QueueCommand::Depth { queue } => {
            let q = key(&queue)?;
            let (_, queue) = open(ctx, &q).await?;
            let depth = queue.depth().await?;
            ctx.out.emit(
                &format!(
                    "ready: {}\nin_flight: {}\ntotal: {}",
                    depth.ready,
                    depth.in_flight,
                    depth.total()
                ),
                json!({
                    "queue": q.as_str(),
                    "ready": depth.ready,
                    "in_flight": depth.in_flight,
                    "total": depth.total(),
                }),
            )?;
            Ok(OK)
        }
    }
}
