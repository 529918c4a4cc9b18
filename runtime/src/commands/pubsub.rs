//! `dprim pub TOPIC MESSAGE`, `dprim sub TOPIC`

use super::{key, read_value};
use crate::cli::{Ctx, PubArgs, SubArgs};
use crate::exit::{Failure, OK};
use crate::output::{hex_note, note, value_json, value_text};
use dprim::{Error, SubscriptionItem};
use serde_json::json;

pub(crate) async fn publish(ctx: &Ctx, args: PubArgs) -> Result<u8, Failure> {
    let topic = key(&args.topic)?;
    let payload = read_value(args.message.into())?;
    let bytes = payload.len();
    let (backend, _) = ctx.open().await?;
    backend.pubsub().publish(&topic, payload).await?;
    // The process exits next: make sure the message left with it.
    backend.pubsub().flush().await?;
    ctx.out.emit(
        &format!("published {bytes} bytes to {topic}"),
        json!({"topic": topic.as_str(), "bytes": bytes}),
    )?;
    Ok(OK)
}

pub(crate) async fn subscribe(ctx: &Ctx, args: SubArgs) -> Result<u8, Failure> {
    let topic = key(&args.topic)?;
    let (backend, _) = ctx.open().await?;
    let mut subscription = backend.pubsub().subscribe(&topic).await?;
    if !ctx.out.is_json() {
        note(&format!("subscribed to {topic} (Ctrl-C to stop)"));
    }
    if args.count == Some(0) {
        return Ok(OK);
    }
    let mut seen = 0u64;
    let mut hex_noted = false;
    let mut interrupts = ctx.interrupts();
    loop {
        let item = tokio::select! {
            _ = interrupts.next() => return Ok(OK),
            item = subscription.next() => item,
        };
        match item {
            Some(Ok(SubscriptionItem::Message(message))) => {
                let (text, utf8) = value_text(&message.payload);
                if !utf8 && !hex_noted && !ctx.out.is_json() {
                    note(&hex_note(message.payload.len()));
                    hex_noted = true;
                }
                let (payload, encoding) = value_json(&message.payload);
                ctx.out.emit(
                    &text,
                    json!({"topic": message.topic.as_str(), "payload": payload, "encoding": encoding}),
                )?;
                seen += 1;
                if args.count.is_some_and(|n| seen >= n) {
                    return Ok(OK);
                }
            }
            Some(Ok(SubscriptionItem::Lagged(missed))) => {
                ctx.out.emit(
                    &format!("lagged: missed {missed} messages"),
                    json!({"topic": topic.as_str(), "lagged": missed}),
                )?;
            }
            Some(Err(e)) => return Err(Failure::new(e)),
            None => {
                return Err(Failure::new(Error::closed(format!(
                    "the backend ended the subscription to {topic}"
                ))))
            }
        }
    }
}
