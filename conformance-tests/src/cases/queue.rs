// Queues: push / pull / ack, waiting pulls, FIFO, visibility timeouts,
// nack / extend, stale receipts, consumers' sessions, dead-lettering, depth,
// independence of queues, and concurrent consumers.

use super::case;
use crate::util::{
    completes, ensure, ensure_eq, expect_err, fail, key, val, within, Context, DROPS,
    DROP_WITHIN_MICROS, QUIET, WAIT,
};
use crate::{Case, CaseResult, Ctx, Fail, Requirement};
use dprim::{
    Backend, Delivery, ErrorKind, MessageId, PullOptions, Queue, QueueDepth, QueueOptions,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(
            "queue::push_pull_ack",
            push_pull_ack,
            [],
            "Acknowledges a delivery: the message is removed for good."
        ),
        case!(
            "queue::pull_empty_returns_none",
            pull_empty_returns_none,
            [],
            "Returns `Ok(None)` if nothing became visible in time."
        ),
        case!(
            "queue::pull_waits_for_push",
            pull_waits_for_push,
            [],
            "Takes the next visible message, waiting up to `options.wait`."
        ),
        case!(
            "queue::push_is_durable",
            push_is_durable,
            [],
            "Once `push` returns, the message is stored and will be delivered until acked or dead-lettered."
        ),
        case!(
            "queue::fifo_order",
            fifo_order,
            [Requirement::QueueFifo],
            "Messages are delivered in push order (when the backend declares `fifo_queues`), redeliveries first."
        ),
        case!(
            "queue::large_backlog",
            large_backlog,
            [],
            "However many messages wait and however many are held, a pull finds the next visible one."
        ),
        case!(
            "queue::redeliveries_first",
            redeliveries_first,
            [Requirement::QueueFifo],
            "Messages are delivered in push order (when the backend declares `fifo_queues`), redeliveries first."
        ),
        case!(
            "queue::invisible_while_held",
            invisible_while_held,
            [],
            "A delivered message is invisible to every other consumer until it is acked, nacked, its visibility timeout passes, or the consumer's session is lost; then it is delivered again with `attempt + 1`."
        ),
        case!(
            "queue::redelivered_after_visibility_timeout",
            redelivered_after_visibility_timeout,
            [],
            "A delivered message is invisible to every other consumer until it is acked, nacked, its visibility timeout passes, or the consumer's session is lost; then it is delivered again with `attempt + 1`."
        ),
        case!(
            "queue::nack_redelivers_at_once",
            nack_redelivers_at_once,
            [],
            "Gives a delivery back: visible again after `delay`."
        ),
        case!(
            "queue::nack_delay_hides_message",
            nack_delay_hides_message,
            [],
            "Gives a delivery back: visible again after `delay`."
        ),
        case!(
            "queue::extend_keeps_invisible",
            extend_keeps_invisible,
            [],
            "Keeps a delivery invisible for `visibility_timeout` from now."
        ),
        case!(
            "queue::double_ack_ok",
            double_ack_ok,
            [],
            "Acking twice (or acking a message that is gone) succeeds."
        ),
        case!(
            "queue::stale_ack_conflict",
            stale_ack_conflict,
            [],
            "Acking a delivery whose visibility timeout passed and whose message went back to the queue (or to another consumer) fails `Conflict`: the message will be processed again."
        ),
        case!(
            "queue::stale_nack_and_extend_conflict",
            stale_nack_and_extend_conflict,
            [],
            "A stale receipt fails `Conflict`."
        ),
        case!(
            "queue::consumer_session_lost_redelivers",
            consumer_session_lost_redelivers,
            [],
            "The consumer's session: if it is lost, the delivery becomes visible again at once instead of after the visibility timeout."
        ),
        case!(
            "queue::dead_letter_after_max_attempts",
            dead_letter_after_max_attempts,
            [Requirement::QueueDeadLetter],
            "A message whose `max_attempts`-th delivery fails moves to the dead-letter queue with its payload intact, whether or not anyone uses the original queue again: pulling from (or measuring) the dead-letter queue finds it."
        ),
        case!(
            "queue::dead_letter_after_timeouts",
            dead_letter_after_timeouts,
            [Requirement::QueueDeadLetter],
            "A message whose `max_attempts`-th delivery fails moves to the dead-letter queue with its payload intact, whether or not anyone uses the original queue again: pulling from (or measuring) the dead-letter queue finds it."
        ),
        case!(
            "queue::dead_letter_without_further_activity",
            dead_letter_without_further_activity,
            [Requirement::QueueDeadLetter],
            "A message whose `max_attempts`-th delivery fails moves to the dead-letter queue with its payload intact, whether or not anyone uses the original queue again: pulling from (or measuring) the dead-letter queue finds it."
        ),
        case!(
            "queue::dead_letter_after_session_loss",
            dead_letter_after_session_loss,
            [],
            "A message whose `max_attempts`-th delivery fails moves to the dead-letter queue with its payload intact, whether or not anyone uses the original queue again: pulling from (or measuring) the dead-letter queue finds it."
        ),
        case!(
            "queue::dead_letter_custom_target",
            dead_letter_custom_target,
            [Requirement::QueueDeadLetter],
            "Where dead messages go. Default: `<queue>/dead-letter`."
        ),
        case!(
            "queue::depth_counts_ready_and_in_flight",
            depth_counts_ready_and_in_flight,
            [],
            "Messages waiting to be pulled (including nacked-with-delay ones)."
        ),
        case!(
            "queue::queues_independent",
            queues_independent,
            [],
            "Opens (creating if needed) the queue `name`, setting its options when given."
        ),
        case!(
            "queue::reopen_without_options_keeps_them",
            reopen_without_options_keeps_them,
            [Requirement::QueueDeadLetter],
            "`None` keeps the queue's current options (the defaults for a queue never configured)."
        ),
        case!(
            "queue::pull_dropped_at_any_point_leaves_no_message_held",
            pull_dropped_at_any_point_leaves_no_message_held,
            [],
            "A pull dropped before it returns holds no message: a delivery made for it after its caller left is given back at once, as by `nack` with no delay, and counts as an attempt."
        ),
        case!(
            "queue::waiting_pull_dropped_leaves_later_messages_visible",
            waiting_pull_dropped_leaves_later_messages_visible,
            [],
            "A pull dropped before it returns holds no message: a delivery made for it after its caller left is given back at once, as by `nack` with no delay, and counts as an attempt."
        ),
        case!(
            "queue::concurrent_consumers",
            concurrent_consumers,
            [],
            "A delivered message is invisible to every other consumer until it is acked, nacked, its visibility timeout passes, or the consumer's session is lost; then it is delivered again with `attempt + 1`."
        ),
    ]
}

async fn open(
    backend: &Backend,
    name: &str,
    options: Option<QueueOptions>,
) -> Result<Arc<dyn Queue>, Fail> {
    backend
        .queues()
        .open(&key(name)?, options)
        .await
        .ctx(&format!("open queue {name}"))
}

async fn jobs(ctx: &Ctx) -> Result<Arc<dyn Queue>, Fail> {
    open(&ctx.backend, "jobs", None).await
}

fn held(vt: Duration) -> PullOptions {
    PullOptions {
        visibility_timeout: vt,
        wait: Duration::ZERO,
        session: None,
    }
}

fn waiting(vt: Duration, wait: Duration) -> PullOptions {
    PullOptions {
        visibility_timeout: vt,
        wait,
        session: None,
    }
}

const LONG: Duration = Duration::from_secs(60);

async fn pull_one(q: &dyn Queue, options: PullOptions, what: &str) -> Result<Delivery, Fail> {
    let limit = options.wait + WAIT;
    within(limit, what, q.pull(options))
        .await?
        .ctx(what)?
        .ctx(what)
}

async fn pull_none(q: &dyn Queue, what: &str) -> CaseResult {
    let got = within(WAIT, what, q.pull(held(LONG))).await?.ctx(what)?;
    ensure!(
        got.is_none(),
        "{what}: got {:?} (attempt {})",
        got.as_ref().map(|d| d.id),
        got.as_ref().map_or(0, |d| d.attempt)
    );
    Ok(())
}

async fn depth(q: &dyn Queue) -> Result<QueueDepth, Fail> {
    q.depth().await.ctx("depth")
}

async fn push_pull_ack(ctx: Ctx) -> CaseResult {
    let q = jobs(&ctx).await?;
    ensure_eq!(q.name(), &key("jobs")?, "the queue's name");
    let id = q.push(val("job-1")?).await.ctx("push")?;
    let d = pull_one(q.as_ref(), held(LONG), "pull").await?;
    ensure_eq!(
        (d.id, d.payload.as_bytes(), d.attempt),
        (id, &b"job-1"[..], 1),
        "the first delivery"
    );
    q.ack(&d.receipt).await.ctx("ack")?;
    ensure_eq!(
        depth(q.as_ref()).await?,
        QueueDepth {
            ready: 0,
            in_flight: 0
        },
        "depth after ack"
    );
    pull_none(q.as_ref(), "pull after ack").await?;
    let other = ctx.another_client().await.ctx("open another client")?;
    pull_none(
        open(&other, "jobs", None).await?.as_ref(),
        "pull from another client after ack",
    )
    .await
}

async fn pull_empty_returns_none(ctx: Ctx) -> CaseResult {
    let q = jobs(&ctx).await?;
    pull_none(q.as_ref(), "pull with wait 0 on an empty queue").await?;
    let wait = Duration::from_millis(300);
    let started = Instant::now();
    let got = within(wait + WAIT, "pull with a wait", q.pull(waiting(LONG, wait)))
        .await?
        .ctx("pull with a wait")?;
    ensure!(
        got.is_none(),
        "pull with a wait on an empty queue returned {got:?}"
    );
    ensure!(
        started.elapsed() >= wait * 9 / 10,
        "pull returned None after {:?}, before its {wait:?} wait",
        started.elapsed()
    );
    Ok(())
}

async fn pull_waits_for_push(ctx: Ctx) -> CaseResult {
    let q = jobs(&ctx).await?;
    let other = ctx.another_client().await.ctx("open another client")?;
    let pusher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let q = open(&other, "jobs", None).await?;
        q.push(val("late")?).await.ctx("push")
    });
    let d = pull_one(
        q.as_ref(),
        waiting(LONG, WAIT * 2),
        "pull waiting for a push",
    )
    .await?;
    let id = pusher
        .await
        .map_err(|e| Fail::Failed(format!("pusher: {e}")))??;
    ensure_eq!(
        (d.id, d.payload.as_bytes()),
        (id, &b"late"[..]),
        "the message pushed during the wait"
    );
    Ok(())
}

async fn push_is_durable(ctx: Ctx) -> CaseResult {
    let producer = ctx.another_client().await.ctx("open a producer client")?;
    let id = {
        let q = open(&producer, "jobs", None).await?;
        q.push(val("keep me")?).await.ctx("push")?
    };
    drop(producer);
    let q = jobs(&ctx).await?;
    let d = pull_one(q.as_ref(), held(LONG), "pull after the producer went away").await?;
    ensure_eq!(
        (d.id, d.payload.as_bytes()),
        (id, &b"keep me"[..]),
        "the pushed message"
    );
    Ok(())
}

async fn fifo_order(ctx: Ctx) -> CaseResult {
    let q = jobs(&ctx).await?;
    let other = ctx.another_client().await.ctx("open another client")?;
    let q2 = open(&other, "jobs", None).await?;
    let mut ids = Vec::new();
    for i in 0..20 {
        let producer = if i % 2 == 0 { &q } else { &q2 };
        ids.push(producer.push(val(format!("{i}"))?).await.ctx("push")?);
    }
    for (i, id) in ids.iter().enumerate() {
        let consumer = if i % 3 == 0 { &q2 } else { &q };
        let d = pull_one(consumer.as_ref(), held(LONG), &format!("pull #{i}")).await?;
        ensure_eq!(
            (d.id, d.payload.as_bytes()),
            (*id, format!("{i}").as_bytes()),
            "delivery #{i}"
        );
        consumer.ack(&d.receipt).await.ctx("ack")?;
    }
    Ok(())
}

/// A backlog of more bytes than one response of a backend carries, and
/// more held deliveries than a backend reads at a time.
async fn large_backlog(ctx: Ctx) -> CaseResult {
    const BIG: usize = 24;
    const SMALL: usize = 120;
    const HELD: usize = 130;
    let q = jobs(&ctx).await?;
    let big = vec![b'b'; dprim::MAX_VALUE_BYTES - 1024];
    let mut pushed = Vec::new();
    for i in 0..BIG + SMALL {
        let mut payload = if i < BIG { big.clone() } else { vec![b's'; 16] };
        payload[..8].copy_from_slice(format!("{i:08}").as_bytes());
        pushed.push(q.push(val(payload)?).await.ctx("push")?);
    }
    let fifo = ctx.caps().queue.fifo;
    let mut held_ids = Vec::new();
    let mut receipts = Vec::new();
    for i in 0..HELD {
        let d = pull_one(q.as_ref(), held(LONG), &format!("pull #{i}")).await?;
        let stamp = String::from_utf8_lossy(&d.payload.as_bytes()[..8]).into_owned();
        let n: usize = stamp
            .parse()
            .map_err(|_| Fail::Failed(format!("delivery #{i} carries `{stamp}`")))?;
        ensure!(
            n < pushed.len() && d.id == pushed[n],
            "delivery #{i}: id {} with the payload of message {n}",
            d.id
        );
        if fifo {
            ensure_eq!(n, i, "delivery #{i} in push order");
        }
        held_ids.push(d.id);
        receipts.push(d.receipt);
    }
    ensure_eq!(
        depth(q.as_ref()).await?,
        QueueDepth {
            ready: (BIG + SMALL - HELD) as u64,
            in_flight: HELD as u64
        },
        "depth with {HELD} held"
    );
    for i in HELD..BIG + SMALL {
        let d = pull_one(
            q.as_ref(),
            held(LONG),
            &format!("pull #{i} behind {HELD} held"),
        )
        .await?;
        ensure!(
            !held_ids.contains(&d.id),
            "pull #{i} returned {}, which is held",
            d.id
        );
        held_ids.push(d.id);
        receipts.push(d.receipt);
    }
    pull_none(q.as_ref(), "pull with every message held").await?;
    for r in &receipts {
        q.ack(r).await.ctx("ack")?;
    }
    ensure_eq!(depth(q.as_ref()).await?.total(), 0, "messages left");
    Ok(())
}

async fn redeliveries_first(ctx: Ctx) -> CaseResult {
    let q = jobs(&ctx).await?;
    let first = q.push(val("first")?).await.ctx("push first")?;
    q.push(val("second")?).await.ctx("push second")?;
    let d = pull_one(q.as_ref(), held(LONG), "pull first").await?;
    ensure_eq!(d.id, first, "the first delivery");
    q.nack(&d.receipt, Duration::ZERO).await.ctx("nack")?;
    let again = pull_one(q.as_ref(), held(LONG), "pull after nack").await?;
    ensure_eq!(
        (again.id, again.attempt),
        (first, 2),
        "the delivery after a nack (redeliveries first)"
    );
    // Redelivery by visibility timeout comes first too.
    let vt = Duration::from_millis(300);
    q.ack(&again.receipt).await.ctx("ack")?;
    let third = q.push(val("third")?).await.ctx("push third")?;
    let d2 = pull_one(q.as_ref(), held(vt), "pull second").await?;
    tokio::time::sleep(vt * 2).await;
    let d2again = pull_one(
        q.as_ref(),
        waiting(LONG, WAIT),
        "pull after the visibility timeout",
    )
    .await?;
    ensure_eq!(
        (d2again.id, d2again.attempt),
        (d2.id, 2),
        "the delivery after a visibility timeout (redeliveries first)"
    );
    let d3 = pull_one(q.as_ref(), held(LONG), "pull third").await?;
    ensure_eq!(d3.id, third, "the last delivery");
    Ok(())
}

async fn invisible_while_held(ctx: Ctx) -> CaseResult {
    let q = jobs(&ctx).await?;
    let other = ctx.another_client().await.ctx("open another client")?;
    let q2 = open(&other, "jobs", None).await?;
    let id1 = q.push(val("one")?).await.ctx("push")?;
    let d1 = pull_one(q.as_ref(), held(LONG), "pull").await?;
    ensure_eq!(d1.id, id1, "the delivery");
    pull_none(
        q2.as_ref(),
        "another consumer's pull while the only message is held",
    )
    .await?;
    pull_none(
        q.as_ref(),
        "the same client's pull while the only message is held",
    )
    .await?;
    let id2 = q.push(val("two")?).await.ctx("push two")?;
    let d2 = pull_one(q2.as_ref(), held(LONG), "another consumer's pull").await?;
    ensure_eq!(
        d2.id,
        id2,
        "another consumer gets the next message, not the held one"
    );
    q.ack(&d1.receipt).await.ctx("ack one")?;
    q2.ack(&d2.receipt).await.ctx("ack two")?;
    pull_none(q.as_ref(), "pull after both acks").await
}

async fn redelivered_after_visibility_timeout(ctx: Ctx) -> CaseResult {
    let q = jobs(&ctx).await?;
    let id = q.push(val("slow job")?).await.ctx("push")?;
    let vt = Duration::from_millis(500);
    let d1 = pull_one(q.as_ref(), held(vt), "pull").await?;
    let pulled = Instant::now();
    let other = ctx.another_client().await.ctx("open another client")?;
    let q2 = open(&other, "jobs", None).await?;
    let d2 = pull_one(
        q2.as_ref(),
        waiting(LONG, vt + WAIT),
        "another consumer's pull after the visibility timeout",
    )
    .await?;
    ensure_eq!(
        (d2.id, d2.attempt, d2.payload.as_bytes()),
        (id, 2, &b"slow job"[..]),
        "the redelivery"
    );
    ensure!(
        pulled.elapsed() >= vt * 9 / 10,
        "redelivered after {:?}, before the {vt:?} visibility timeout",
        pulled.elapsed()
    );
    ensure!(
        d2.receipt != d1.receipt,
        "the redelivery reuses the first delivery's receipt"
    );
    q2.ack(&d2.receipt).await.ctx("ack the redelivery")
}

async fn nack_redelivers_at_once(ctx: Ctx) -> CaseResult {
    let q = jobs(&ctx).await?;
    let id = q.push(val("retry me")?).await.ctx("push")?;
    for attempt in 1..=3 {
        let d = pull_one(q.as_ref(), held(LONG), &format!("pull attempt {attempt}")).await?;
        ensure_eq!(
            (d.id, d.attempt, d.payload.as_bytes()),
            (id, attempt, &b"retry me"[..]),
            "delivery {attempt}"
        );
        if attempt < 3 {
            q.nack(&d.receipt, Duration::ZERO).await.ctx("nack")?;
        } else {
            q.ack(&d.receipt).await.ctx("ack")?;
        }
    }
    pull_none(q.as_ref(), "pull after ack").await
}

async fn nack_delay_hides_message(ctx: Ctx) -> CaseResult {
    let q = jobs(&ctx).await?;
    let id = q.push(val("later")?).await.ctx("push")?;
    let d = pull_one(q.as_ref(), held(LONG), "pull").await?;
    let delay = Duration::from_millis(800);
    q.nack(&d.receipt, delay).await.ctx("nack with a delay")?;
    let nacked = Instant::now();
    pull_none(q.as_ref(), "pull right after a delayed nack").await?;
    let dep = depth(q.as_ref()).await?;
    ensure_eq!(
        dep,
        QueueDepth {
            ready: 1,
            in_flight: 0
        },
        "depth while a nacked message waits out its delay"
    );
    let again = pull_one(
        q.as_ref(),
        waiting(LONG, delay + WAIT),
        "pull after the delay",
    )
    .await?;
    ensure!(
        nacked.elapsed() >= delay * 9 / 10,
        "redelivered after {:?}, before the {delay:?} delay",
        nacked.elapsed()
    );
    ensure_eq!(
        (again.id, again.attempt),
        (id, 2),
        "the redelivery after a delayed nack"
    );
    Ok(())
}

async fn extend_keeps_invisible(ctx: Ctx) -> CaseResult {
    let q = jobs(&ctx).await?;
    q.push(val("long job")?).await.ctx("push")?;
    let vt = Duration::from_millis(400);
    let d = pull_one(q.as_ref(), held(vt), "pull").await?;
    q.extend(&d.receipt, Duration::from_secs(30))
        .await
        .ctx("extend")?;
    tokio::time::sleep(vt * 3).await;
    pull_none(q.as_ref(), "pull after the original visibility timeout").await?;
    q.extend(&d.receipt, Duration::from_secs(30))
        .await
        .ctx("extend again")?;
    q.ack(&d.receipt).await.ctx("ack after extending")?;
    pull_none(q.as_ref(), "pull after ack").await
}

async fn double_ack_ok(ctx: Ctx) -> CaseResult {
    let q = jobs(&ctx).await?;
    q.push(val("x")?).await.ctx("push")?;
    let d = pull_one(q.as_ref(), held(LONG), "pull").await?;
    q.ack(&d.receipt).await.ctx("ack")?;
    q.ack(&d.receipt).await.ctx("ack again")?;
    let other = ctx.another_client().await.ctx("open another client")?;
    open(&other, "jobs", None)
        .await?
        .ack(&d.receipt)
        .await
        .ctx("ack again from another client")?;
    ensure_eq!(depth(q.as_ref()).await?.total(), 0, "messages left");
    Ok(())
}

async fn stale_ack_conflict(ctx: Ctx) -> CaseResult {
    let q = jobs(&ctx).await?;
    let vt = Duration::from_millis(300);
    // Went back to the queue (nobody pulled it since).
    let id = q.push(val("a")?).await.ctx("push")?;
    let d1 = pull_one(q.as_ref(), held(vt), "pull").await?;
    tokio::time::sleep(vt * 3).await;
    expect_err(
        q.ack(&d1.receipt).await,
        &[ErrorKind::Conflict],
        "ack after the visibility timeout passed",
    )?;
    // Went to another consumer.
    let other = ctx.another_client().await.ctx("open another client")?;
    let q2 = open(&other, "jobs", None).await?;
    let d2 = pull_one(q2.as_ref(), held(LONG), "the second consumer's pull").await?;
    ensure_eq!(
        (d2.id, d2.attempt),
        (id, 2),
        "the second consumer's delivery"
    );
    expect_err(
        q.ack(&d1.receipt).await,
        &[ErrorKind::Conflict],
        "stale ack while another consumer holds the message",
    )?;
    q2.extend(&d2.receipt, LONG)
        .await
        .ctx("the holder's extend after the stale ack")?;
    q2.ack(&d2.receipt).await.ctx("the holder's ack")?;
    pull_none(q.as_ref(), "pull after the holder's ack").await
}

async fn stale_nack_and_extend_conflict(ctx: Ctx) -> CaseResult {
    let q = jobs(&ctx).await?;
    let vt = Duration::from_millis(300);
    q.push(val("a")?).await.ctx("push")?;
    let d1 = pull_one(q.as_ref(), held(vt), "pull").await?;
    let d2 = pull_one(
        q.as_ref(),
        waiting(LONG, vt + WAIT),
        "pull after the visibility timeout",
    )
    .await?;
    expect_err(
        q.nack(&d1.receipt, Duration::ZERO).await,
        &[ErrorKind::Conflict],
        "nack with a stale receipt",
    )?;
    expect_err(
        q.extend(&d1.receipt, LONG).await,
        &[ErrorKind::Conflict],
        "extend with a stale receipt",
    )?;
    pull_none(
        q.as_ref(),
        "pull while the current delivery is held (the stale nack must not release it)",
    )
    .await?;
    q.ack(&d2.receipt).await.ctx("ack the current delivery")
}

async fn consumer_session_lost_redelivers(ctx: Ctx) -> CaseResult {
    let q = jobs(&ctx).await?;
    let id = q.push(val("orphan")?).await.ctx("push")?;
    let session = ctx.session().await?;
    let options = PullOptions {
        visibility_timeout: LONG,
        wait: Duration::ZERO,
        session: Some(session.clone()),
    };
    let d1 = pull_one(q.as_ref(), options, "pull with a session").await?;
    pull_none(q.as_ref(), "pull while the session's delivery is held").await?;
    session.close().await.ctx("close the consumer's session")?;
    let other = ctx.another_client().await.ctx("open another client")?;
    let q2 = open(&other, "jobs", None).await?;
    let d2 = pull_one(
        q2.as_ref(),
        waiting(LONG, WAIT),
        "pull after the consumer's session closed",
    )
    .await?;
    ensure_eq!(
        (d2.id, d2.attempt),
        (id, 2),
        "the redelivery after the session ended"
    );
    expect_err(
        q.ack(&d1.receipt).await,
        &[ErrorKind::Conflict],
        "ack by the consumer whose session ended",
    )?;
    q2.ack(&d2.receipt).await.ctx("ack")
}

async fn dead_letter_after_max_attempts(ctx: Ctx) -> CaseResult {
    let options = QueueOptions {
        max_attempts: 2,
        dead_letter: None,
    };
    let q = open(&ctx.backend, "jobs", Some(options)).await?;
    let payload: Vec<u8> = (0..=255u8).chain([0, 1, 2]).collect();
    let id = q.push(val(payload.clone())?).await.ctx("push")?;
    let survivor = q.push(val("fine")?).await.ctx("push a healthy message")?;
    for attempt in 1..=2 {
        let d = pull_one(q.as_ref(), held(LONG), &format!("pull attempt {attempt}")).await?;
        ensure_eq!((d.id, d.attempt), (id, attempt), "delivery {attempt}");
        q.nack(&d.receipt, Duration::ZERO).await.ctx("nack")?;
    }
    let d = pull_one(q.as_ref(), held(LONG), "pull after the message died").await?;
    ensure_eq!(
        d.id,
        survivor,
        "the next delivery after the failing message was dead-lettered"
    );
    q.ack(&d.receipt).await.ctx("ack")?;
    pull_none(q.as_ref(), "pull from the main queue").await?;
    let dlq = open(&ctx.backend, "jobs/dead-letter", None).await?;
    let dead = pull_one(
        dlq.as_ref(),
        waiting(LONG, WAIT),
        "pull from jobs/dead-letter",
    )
    .await?;
    ensure!(
        dead.payload.as_bytes() == payload.as_slice(),
        "the dead-lettered payload changed: {:?}",
        dead.payload
    );
    ensure_eq!(
        dead.attempt,
        1,
        "the first delivery from the dead-letter queue"
    );
    dlq.ack(&dead.receipt)
        .await
        .ctx("ack in the dead-letter queue")?;
    ensure_eq!(
        depth(q.as_ref()).await?.total(),
        0,
        "messages left in the main queue"
    );
    Ok(())
}

async fn reopen_without_options_keeps_them(ctx: Ctx) -> CaseResult {
    let options = QueueOptions {
        max_attempts: 1,
        dead_letter: None,
    };
    open(&ctx.backend, "jobs", Some(options)).await?;
    // Another client (say, an operator's CLI) opens the queue without options.
    let other = ctx.another_client().await.ctx("open another client")?;
    let q = open(&other, "jobs", None).await?;
    let id = q.push(val("fails once")?).await.ctx("push")?;
    let d = pull_one(q.as_ref(), held(LONG), "pull").await?;
    ensure_eq!(d.id, id, "delivered message");
    q.nack(&d.receipt, Duration::ZERO).await.ctx("nack")?;
    pull_none(q.as_ref(), "pull after the only allowed attempt failed").await?;
    let dlq = open(&other, "jobs/dead-letter", None).await?;
    let dead = pull_one(
        dlq.as_ref(),
        waiting(LONG, WAIT),
        "pull from jobs/dead-letter",
    )
    .await?;
    ensure!(
        dead.payload.as_bytes() == b"fails once",
        "dead-lettered payload {:?}",
        dead.payload
    );
    Ok(())
}

async fn dead_letter_after_timeouts(ctx: Ctx) -> CaseResult {
    let options = QueueOptions {
        max_attempts: 2,
        dead_letter: None,
    };
    let q = open(&ctx.backend, "jobs", Some(options)).await?;
    let id = q.push(val("times out")?).await.ctx("push")?;
    let vt = Duration::from_millis(300);
    let d1 = pull_one(q.as_ref(), held(vt), "pull attempt 1").await?;
    ensure_eq!((d1.id, d1.attempt), (id, 1), "delivery 1");
    let d2 = pull_one(q.as_ref(), waiting(vt, vt + WAIT), "pull attempt 2").await?;
    ensure_eq!((d2.id, d2.attempt), (id, 2), "delivery 2");
    let left = within(
        vt + WAIT,
        "pull from the main queue",
        q.pull(waiting(LONG, vt * 3)),
    )
    .await?
    .ctx("pull")?;
    ensure!(
        left.is_none(),
        "the dead message was delivered a third time (attempt {})",
        left.map_or(0, |d| d.attempt)
    );
    let dlq = open(&ctx.backend, "jobs/dead-letter", None).await?;
    let dead = pull_one(
        dlq.as_ref(),
        waiting(LONG, WAIT),
        "pull from jobs/dead-letter after the last timeout",
    )
    .await?;
    ensure_eq!(
        dead.payload.as_bytes(),
        b"times out",
        "the dead-lettered payload"
    );
    Ok(())
}

async fn dead_letter_without_further_activity(ctx: Ctx) -> CaseResult {
    let options = QueueOptions {
        max_attempts: 1,
        dead_letter: None,
    };
    let q = open(&ctx.backend, "jobs", Some(options)).await?;
    q.push(val("abandoned")?).await.ctx("push")?;
    let vt = Duration::from_millis(300);
    // The only consumer takes the message and goes away: nobody touches the
    // main queue again, yet the failed message must reach the dead-letter queue.
    let d = pull_one(q.as_ref(), held(vt), "pull the only delivery").await?;
    ensure_eq!(d.attempt, 1, "the delivery's attempt");
    drop(q);
    let dlq = open(&ctx.backend, "jobs/dead-letter", None).await?;
    let dead = pull_one(
        dlq.as_ref(),
        waiting(LONG, vt + WAIT),
        "pull from jobs/dead-letter while the main queue is idle",
    )
    .await?;
    ensure_eq!(
        dead.payload.as_bytes(),
        b"abandoned",
        "the dead-lettered payload"
    );
    Ok(())
}

async fn dead_letter_after_session_loss(ctx: Ctx) -> CaseResult {
    let options = QueueOptions {
        max_attempts: 1,
        dead_letter: None,
    };
    let q = open(&ctx.backend, "jobs", Some(options)).await?;
    q.push(val("lost with its consumer")?).await.ctx("push")?;
    // The last attempt is held through a session that then ends; nobody
    // pulls from the main queue again.
    let session = ctx.session().await?;
    let held = PullOptions {
        visibility_timeout: LONG,
        wait: Duration::ZERO,
        session: Some(session.clone()),
    };
    let d = pull_one(q.as_ref(), held, "pull the last attempt with a session").await?;
    ensure_eq!(d.attempt, 1, "the delivery's attempt");
    session.close().await.ctx("close the consumer's session")?;
    drop(q);
    let other = ctx.another_client().await.ctx("open another client")?;
    let dlq = open(&other, "jobs/dead-letter", None).await?;
    let dead = pull_one(
        dlq.as_ref(),
        waiting(LONG, WAIT),
        "pull from jobs/dead-letter after the consumer's session ended",
    )
    .await?;
    ensure_eq!(
        dead.payload.as_bytes(),
        b"lost with its consumer",
        "the dead-lettered payload"
    );
    let main = open(&other, "jobs", None).await?;
    pull_none(
        main.as_ref(),
        "pull from the main queue after dead-lettering",
    )
    .await
}

async fn dead_letter_custom_target(ctx: Ctx) -> CaseResult {
    let options = QueueOptions {
        max_attempts: 1,
        dead_letter: Some(key("graveyard")?),
    };
    let q = open(&ctx.backend, "jobs", Some(options)).await?;
    q.push(val("doomed")?).await.ctx("push")?;
    let d = pull_one(q.as_ref(), held(LONG), "pull").await?;
    q.nack(&d.receipt, Duration::ZERO).await.ctx("nack")?;
    let grave = open(&ctx.backend, "graveyard", None).await?;
    let dead = pull_one(
        grave.as_ref(),
        waiting(LONG, WAIT),
        "pull from the custom dead-letter queue",
    )
    .await?;
    ensure_eq!(
        dead.payload.as_bytes(),
        b"doomed",
        "the dead-lettered payload"
    );
    let default_dlq = open(&ctx.backend, "jobs/dead-letter", None).await?;
    pull_none(
        default_dlq.as_ref(),
        "pull from the default dead-letter queue",
    )
    .await
}

async fn depth_counts_ready_and_in_flight(ctx: Ctx) -> CaseResult {
    let q = jobs(&ctx).await?;
    ensure_eq!(
        depth(q.as_ref()).await?,
        QueueDepth::default(),
        "depth of a new queue"
    );
    for i in 0..3 {
        q.push(val(format!("{i}"))?).await.ctx("push")?;
    }
    ensure_eq!(
        depth(q.as_ref()).await?,
        QueueDepth {
            ready: 3,
            in_flight: 0
        },
        "depth after 3 pushes"
    );
    let d1 = pull_one(q.as_ref(), held(LONG), "pull").await?;
    let d2 = pull_one(q.as_ref(), held(LONG), "pull").await?;
    ensure_eq!(
        depth(q.as_ref()).await?,
        QueueDepth {
            ready: 1,
            in_flight: 2
        },
        "depth with 2 held"
    );
    q.ack(&d1.receipt).await.ctx("ack")?;
    q.nack(&d2.receipt, Duration::from_secs(30))
        .await
        .ctx("nack with a delay")?;
    let other = ctx.another_client().await.ctx("open another client")?;
    let q2 = open(&other, "jobs", None).await?;
    ensure_eq!(
        depth(q2.as_ref()).await?,
        QueueDepth {
            ready: 2,
            in_flight: 0
        },
        "depth after an ack and a delayed nack (from another client)"
    );
    Ok(())
}

async fn queues_independent(ctx: Ctx) -> CaseResult {
    let a = open(&ctx.backend, "qa", None).await?;
    let b = open(&ctx.backend, "qb", None).await?;
    let nested = open(&ctx.backend, "qa/sub", None).await?;
    a.push(val("for a")?).await.ctx("push to qa")?;
    pull_none(b.as_ref(), "pull from qb").await?;
    pull_none(nested.as_ref(), "pull from qa/sub").await?;
    ensure_eq!(depth(b.as_ref()).await?.total(), 0, "depth of qb");
    let d = pull_one(a.as_ref(), held(LONG), "pull from qa").await?;
    ensure_eq!(d.payload.as_bytes(), b"for a", "qa's message");
    Ok(())
}

async fn concurrent_consumers(ctx: Ctx) -> CaseResult {
    const MESSAGES: u64 = 200;
    const CONSUMERS: usize = 4;
    let vt = Duration::from_secs(2);
    let q = jobs(&ctx).await?;
    let mut ids = Vec::new();
    for i in 0..MESSAGES {
        ids.push(q.push(val(format!("{i}"))?).await.ctx("push")?);
    }
    // Who holds what since when; successful acks per message.
    let holders: Arc<Mutex<HashMap<MessageId, (usize, Instant)>>> = Arc::default();
    let acks: Arc<Mutex<HashMap<MessageId, u32>>> = Arc::default();
    let acked_total = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..CONSUMERS {
        let client = if c == 0 {
            ctx.backend.clone()
        } else {
            ctx.another_client().await.ctx("open another client")?
        };
        let q = open(
            &client,
            "jobs",
            Some(QueueOptions {
                max_attempts: 1000,
                dead_letter: None,
            }),
        )
        .await?;
        let (holders, acks, acked_total) = (holders.clone(), acks.clone(), acked_total.clone());
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(40);
            let mut n = 0u64;
            while acked_total.load(Ordering::SeqCst) < MESSAGES {
                if Instant::now() > deadline {
                    fail!("consumer {c}: not every message was acked in time");
                }
                let Some(d) = q.pull(waiting(vt, Duration::from_millis(200))).await.ctx("pull")? else {
                    continue;
                };
                n += 1;
                {
                    let mut h = holders.lock().map_err(|_| Fail::Failed("poisoned".into()))?;
                    if let Some((other, since)) = h.get(&d.id) {
                        if since.elapsed() + Duration::from_millis(100) < vt {
                            fail!("message {} delivered to consumer {c} while consumer {other} held it ({:?} into its {vt:?} visibility timeout)", d.id, since.elapsed());
                        }
                    }
                    h.insert(d.id, (c, Instant::now()));
                }
                let release = |h: &Mutex<HashMap<MessageId, (usize, Instant)>>| -> Result<(), Fail> {
                    let mut h = h.lock().map_err(|_| Fail::Failed("poisoned".into()))?;
                    if matches!(h.get(&d.id), Some((holder, _)) if *holder == c) {
                        h.remove(&d.id);
                    }
                    Ok(())
                };
                match (n + c as u64) % 10 {
                    // Give it back explicitly now and then.
                    3 if d.attempt == 1 => {
                        release(&holders)?;
                        q.nack(&d.receipt, Duration::ZERO).await.ctx("nack")?;
                    }
                    // Abandon it now and then: it comes back after the visibility timeout.
                    7 if d.attempt == 1 && d.id.0 % 4 == 0 => {
                        release(&holders)?;
                    }
                    _ => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        release(&holders)?;
                        match q.ack(&d.receipt).await {
                            Ok(()) => {
                                let mut a = acks.lock().map_err(|_| Fail::Failed("poisoned".into()))?;
                                *a.entry(d.id).or_insert(0) += 1;
                                acked_total.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) if e.kind() == ErrorKind::Conflict => {}
                            Err(e) => fail!("consumer {c}: ack failed: {e}"),
                        }
                    }
                }
            }
            Ok::<(), Fail>(())
        }));
    }
    for t in tasks {
        within(Duration::from_secs(50), "a consumer", t)
            .await?
            .map_err(|e| Fail::Failed(format!("consumer task: {e}")))??;
    }
    let acks = acks
        .lock()
        .map(|a| a.clone())
        .map_err(|_| Fail::Failed("poisoned".into()))?;
    for id in &ids {
        let n = acks.get(id).copied().unwrap_or(0);
        ensure!(n == 1, "message {id} was acked successfully {n} times");
    }
    ensure_eq!(acks.len(), ids.len(), "messages acked");
    pull_none(q.as_ref(), "pull after every message was acked").await?;
    ensure_eq!(depth(q.as_ref()).await?.total(), 0, "messages left");
    Ok(())
}

/// Options under which giving deliveries back never dead-letters.
fn many_attempts() -> QueueOptions {
    QueueOptions {
        max_attempts: 1000,
        dead_letter: None,
    }
}

/// Pulls dropped at random moments, from before their first request to
/// after their answer, most of them while their claim is on its way: a
/// message claimed for a pull nobody waits for any more must be visible
/// again at once, not after its (long) visibility timeout.
async fn pull_dropped_at_any_point_leaves_no_message_held(ctx: Ctx) -> CaseResult {
    let q = open(&ctx.backend, "jobs", Some(many_attempts())).await?;
    let id = q.push(val("job")?).await.ctx("push")?;
    let mut answered = 0;
    for _ in 0..DROPS {
        let after = Duration::from_micros(rand::random_range(0..DROP_WITHIN_MICROS));
        // A pull that answered in time is nacked as a worker would.
        if let Some(Ok(Some(d))) = completes(after, q.pull(held(LONG))).await {
            answered += 1;
            q.nack(&d.receipt, Duration::ZERO).await.ctx("nack")?;
        }
    }
    let d = pull_one(
        q.as_ref(),
        waiting(LONG, WAIT),
        &format!("pull after {DROPS} pulls were dropped ({answered} answered in time)"),
    )
    .await?;
    ensure_eq!(d.id, id, "the message");
    q.ack(&d.receipt).await.ctx("ack")?;
    pull_none(q.as_ref(), "pull after ack").await
}

/// A pull waiting on an empty queue is dropped; a message pushed afterwards
/// must reach the next pull at once, on its first delivery: the dropped
/// pull stopped waiting and took nothing (a worker that drops its pull on
/// every tick of a timer must not use up its messages' attempts).
async fn waiting_pull_dropped_leaves_later_messages_visible(ctx: Ctx) -> CaseResult {
    let q = open(&ctx.backend, "jobs", Some(many_attempts())).await?;
    let dropped = completes(Duration::from_millis(300), q.pull(waiting(LONG, WAIT * 2))).await;
    ensure!(
        dropped.is_none(),
        "a pull on an empty queue returned: {dropped:?}"
    );
    // A message pushed while the drop is still on its way may go to the
    // dropped pull and come back on its second delivery; one pushed later
    // must not.
    tokio::time::sleep(QUIET).await;
    let id = q.push(val("after")?).await.ctx("push")?;
    let d = pull_one(
        q.as_ref(),
        waiting(LONG, WAIT),
        "pull after a waiting pull was dropped",
    )
    .await?;
    ensure_eq!(
        (d.id, d.attempt),
        (id, 1),
        "the message pushed after the drop, on its first delivery"
    );
    q.ack(&d.receipt).await.ctx("ack")?;
    Ok(())
}
