// Elections: leading alone, terms, resign / proclaim, observing, candidates
// in order, withdrawn candidacies, leaders' sessions ending, and many
// concurrent campaigners.

use super::case;
use crate::util::{
    completes, ensure, ensure_eq, expect_err, fail, key, val, within, Context, DROPS,
    DROP_WITHIN_MICROS, QUIET, WAIT,
};
use crate::{Case, CaseResult, Ctx, Fail, Requirement};
use dprim::{Backend, ErrorKind, Key, Leader, Leadership, Session, Term};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(
            "election::campaign_alone_leads",
            campaign_alone_leads,
            [],
            "At most one leader per election at a time; each leader's term is larger than every earlier term of that election."
        ),
        case!(
            "election::leader_shows_value_and_term",
            leader_shows_value_and_term,
            [],
            "The current leader, if any."
        ),
        case!(
            "election::resign_elects_next_with_larger_term",
            resign_elects_next_with_larger_term,
            [],
            "Another candidate (if any) is elected with a larger term."
        ),
        case!(
            "election::proclaim_keeps_term",
            proclaim_keeps_term,
            [],
            "Updates the value observers see, keeping the term."
        ),
        case!(
            "election::proclaim_after_close_not_leader",
            proclaim_after_close_not_leader,
            [],
            "Fails `NotLeader` if this leadership has ended (resigned, session lost)."
        ),
        case!(
            "election::proclaim_after_expiry_not_leader",
            proclaim_after_expiry_not_leader,
            [Requirement::FaultExpireSession],
            "Fails `NotLeader` if this leadership has ended (resigned, session lost)."
        ),
        case!(
            "election::observe_current_then_changes",
            observe_current_then_changes,
            [],
            "The first item is the current leader (or `None`); later items are changes. Updates may be coalesced, but terms never go backwards."
        ),
        case!(
            "election::candidates_elected_in_order",
            candidates_elected_in_order,
            [],
            "Candidates are elected in the order they campaigned."
        ),
        case!(
            "election::dropped_campaign_withdraws",
            dropped_campaign_withdraws,
            [],
            "Dropping the returned future withdraws the candidacy."
        ),
        case!(
            "election::campaign_dropped_at_any_point_withdraws",
            campaign_dropped_at_any_point_withdraws,
            [],
            "Dropping the returned future withdraws the candidacy."
        ),
        case!(
            "election::campaign_session_lost_fails",
            campaign_session_lost_fails,
            [],
            "Fails `SessionLost` if the session is or becomes lost while waiting."
        ),
        case!(
            "election::leader_close_elects_next",
            leader_close_elects_next,
            [],
            "When the leader's session ends, the next candidate is elected."
        ),
        case!(
            "election::leader_expiry_elects_next",
            leader_expiry_elects_next,
            [Requirement::FaultExpireSession],
            "When the leader's session ends, the next candidate is elected."
        ),
        case!(
            "election::stalled_leader_learns_first",
            stalled_leader_learns_first,
            [Requirement::FaultStallSession],
            "Resolves when leadership can no longer be proven: stop acting as leader. It resolves before another candidate can be elected."
        ),
        case!(
            "election::resign_after_lost_ok",
            resign_after_lost_ok,
            [],
            "Resigning after leadership was lost succeeds."
        ),
        case!(
            "election::concurrent_campaigners",
            concurrent_campaigners,
            [],
            "At most one leader per election at a time; each leader's term is larger than every earlier term of that election."
        ),
    ]
}

fn name() -> Result<Key, Fail> {
    key("elections/the-election")
}

/// Campaigns for `name` in its own task.
fn candidate(
    backend: &Backend,
    session: &Session,
    value: &str,
) -> Result<JoinHandle<dprim::Result<Leadership>>, Fail> {
    let backend = backend.clone();
    let session = session.clone();
    let value = val(value)?;
    let name = name()?;
    Ok(tokio::spawn(async move {
        backend.elections().campaign(&name, value, &session).await
    }))
}

async fn elected(
    handle: JoinHandle<dprim::Result<Leadership>>,
    limit: Duration,
    what: &str,
) -> Result<Leadership, Fail> {
    within(limit, what, handle)
        .await?
        .map_err(|e| Fail::Failed(format!("{what}: task failed: {e}")))?
        .ctx(what)
}

async fn still_waiting(handle: &JoinHandle<dprim::Result<Leadership>>, what: &str) -> CaseResult {
    tokio::time::sleep(QUIET).await;
    ensure!(
        !handle.is_finished(),
        "{what} was elected (or failed) while another candidate led"
    );
    Ok(())
}

async fn current(backend: &Backend) -> Result<Option<Leader>, Fail> {
    backend.elections().leader(&name()?).await.ctx("leader()")
}

async fn campaign_alone_leads(ctx: Ctx) -> CaseResult {
    let s = ctx.session().await?;
    let l = within(
        WAIT,
        "campaign with no rivals",
        ctx.backend.elections().campaign(&name()?, val("solo")?, &s),
    )
    .await?
    .ctx("campaign")?;
    ensure_eq!(l.name(), &name()?, "the leadership's name");
    ensure_eq!(l.session().id(), s.id(), "the leadership's session");
    l.check().ctx("check() of a fresh leadership")?;
    let t1 = l.term();
    l.resign().await.ctx("resign")?;
    let l2 = within(
        WAIT,
        "campaign again",
        ctx.backend.elections().campaign(&name()?, val("solo")?, &s),
    )
    .await?
    .ctx("campaign again")?;
    ensure!(
        l2.term() > t1,
        "the second term {} is not larger than {t1}",
        l2.term()
    );
    Ok(())
}

async fn leader_shows_value_and_term(ctx: Ctx) -> CaseResult {
    ensure!(
        current(&ctx.backend).await?.is_none(),
        "a leader before anyone campaigned"
    );
    let s = ctx.session().await?;
    let l = ctx
        .backend
        .elections()
        .campaign(&name()?, val("node-1:8080")?, &s)
        .await
        .ctx("campaign")?;
    let other = ctx.another_client().await.ctx("open another client")?;
    let seen = current(&other).await?.ctx("leader() while someone leads")?;
    ensure_eq!(
        seen,
        Leader {
            value: val("node-1:8080")?,
            term: l.term(),
            session: s.id()
        },
        "leader() from another client"
    );
    ensure!(
        other
            .elections()
            .leader(&key("elections/other")?)
            .await
            .ctx("leader() of another election")?
            .is_none(),
        "another election has a leader"
    );
    l.resign().await.ctx("resign")?;
    ensure!(
        current(&other).await?.is_none(),
        "a leader after the only candidate resigned"
    );
    Ok(())
}

async fn resign_elects_next_with_larger_term(ctx: Ctx) -> CaseResult {
    let s1 = ctx.session().await?;
    let l1 = ctx
        .backend
        .elections()
        .campaign(&name()?, val("first")?, &s1)
        .await
        .ctx("campaign")?;
    let other = ctx.another_client().await.ctx("open another client")?;
    let s2 = ctx.session_on(&other).await?;
    let c2 = candidate(&other, &s2, "second")?;
    still_waiting(&c2, "the second candidate").await?;
    let t1 = l1.term();
    l1.resign().await.ctx("resign")?;
    let l2 = elected(c2, WAIT, "the second candidate after the first resigned").await?;
    ensure!(l2.term() > t1, "term {} after {t1}", l2.term());
    let seen = current(&ctx.backend)
        .await?
        .ctx("leader() after the hand-over")?;
    ensure_eq!(
        (seen.value.as_bytes(), seen.term),
        (&b"second"[..], l2.term()),
        "leader() after the hand-over"
    );
    Ok(())
}

async fn proclaim_keeps_term(ctx: Ctx) -> CaseResult {
    let s = ctx.session().await?;
    let l = ctx
        .backend
        .elections()
        .campaign(&name()?, val("v1")?, &s)
        .await
        .ctx("campaign")?;
    let other = ctx.another_client().await.ctx("open another client")?;
    let mut obs = other.elections().observe(&name()?).await.ctx("observe")?;
    l.proclaim(val("v2")?).await.ctx("proclaim")?;
    let seen = current(&other).await?.ctx("leader() after proclaim")?;
    ensure_eq!(
        (seen.value.as_bytes(), seen.term),
        (&b"v2"[..], l.term()),
        "leader() after proclaim"
    );
    wait_for(
        &mut obs,
        "the observer seeing the proclaimed value",
        |item| matches!(item, Some(ld) if ld.value.as_bytes() == b"v2" && ld.term == l.term()),
    )
    .await?;
    Ok(())
}

async fn proclaim_after_close_not_leader(ctx: Ctx) -> CaseResult {
    let s = ctx.session().await?;
    let l = ctx
        .backend
        .elections()
        .campaign(&name()?, val("v1")?, &s)
        .await
        .ctx("campaign")?;
    s.close().await.ctx("close the leader's session")?;
    expect_err(
        l.proclaim(val("v2")?).await,
        &[ErrorKind::NotLeader],
        "proclaim after the session closed",
    )?;
    if let Some(seen) = current(&ctx.backend).await? {
        ensure!(
            seen.value.as_bytes() != b"v2",
            "the proclaimed value reached observers after the leadership ended"
        );
    }
    Ok(())
}

async fn proclaim_after_expiry_not_leader(ctx: Ctx) -> CaseResult {
    let s = ctx.short_session().await?;
    let l = ctx
        .backend
        .elections()
        .campaign(&name()?, val("v1")?, &s)
        .await
        .ctx("campaign")?;
    ctx.expire_session(s.id()).await?;
    // Straight away: the server knows the session is gone even if the client does not yet.
    expect_err(
        l.proclaim(val("v2")?).await,
        &[ErrorKind::NotLeader],
        "proclaim right after the session expired",
    )?;
    if let Some(seen) = current(&ctx.backend).await? {
        ensure!(
            seen.value.as_bytes() != b"v2",
            "an expired leader's proclaim reached observers"
        );
    }
    Ok(())
}

type Observer = BoxStream<'static, dprim::Result<Option<Leader>>>;

/// Reads an observer until `done` holds for an item, checking terms never go
/// backwards; returns the items read.
async fn wait_for(
    obs: &mut Observer,
    what: &str,
    done: impl Fn(&Option<Leader>) -> bool,
) -> Result<Vec<Option<Leader>>, Fail> {
    let mut items: Vec<Option<Leader>> = Vec::new();
    loop {
        let item = match within(WAIT, what, obs.next()).await? {
            Some(Ok(item)) => item,
            Some(Err(e)) => fail!("{what}: observe failed: {e}"),
            None => fail!("{what}: the observe stream ended"),
        };
        let last_term = items.iter().rev().find_map(|i| i.as_ref().map(|l| l.term));
        if let (Some(prev), Some(l)) = (last_term, &item) {
            ensure!(
                l.term >= prev,
                "{what}: term went backwards from {prev} to {}",
                l.term
            );
        }
        let finished = done(&item);
        items.push(item);
        if finished {
            return Ok(items);
        }
    }
}

async fn observe_current_then_changes(ctx: Ctx) -> CaseResult {
    let other = ctx.another_client().await.ctx("open another client")?;
    let mut before = other
        .elections()
        .observe(&name()?)
        .await
        .ctx("observe with no leader")?;
    let first = wait_for(&mut before, "the first observed item", |_| true).await?;
    ensure_eq!(first, vec![None], "the first item with no leader");
    let s1 = ctx.session().await?;
    let l1 = ctx
        .backend
        .elections()
        .campaign(&name()?, val("a")?, &s1)
        .await
        .ctx("campaign a")?;
    let t1 = l1.term();
    wait_for(
        &mut before,
        "the observer seeing a elected",
        |i| matches!(i, Some(l) if l.term == t1 && l.value.as_bytes() == b"a"),
    )
    .await?;
    let mut during = other
        .elections()
        .observe(&name()?)
        .await
        .ctx("observe while a leads")?;
    let first = wait_for(&mut during, "the first item while a leads", |_| true).await?;
    ensure_eq!(
        first,
        vec![Some(Leader {
            value: val("a")?,
            term: t1,
            session: s1.id()
        })],
        "the first item while a leads"
    );
    let s2 = ctx.session().await?;
    let c2 = candidate(&ctx.backend, &s2, "b")?;
    still_waiting(&c2, "candidate b").await?;
    l1.proclaim(val("a2")?).await.ctx("proclaim")?;
    l1.resign().await.ctx("resign a")?;
    let l2 = elected(c2, WAIT, "candidate b").await?;
    let t2 = l2.term();
    for (which, obs) in [
        ("first observer", &mut before),
        ("second observer", &mut during),
    ] {
        wait_for(
            obs,
            &format!("the {which} seeing b elected"),
            |i| matches!(i, Some(l) if l.term == t2 && l.value.as_bytes() == b"b"),
        )
        .await?;
    }
    l2.resign().await.ctx("resign b")?;
    wait_for(
        &mut before,
        "the observer seeing no leader",
        Option::is_none,
    )
    .await?;
    Ok(())
}

async fn candidates_elected_in_order(ctx: Ctx) -> CaseResult {
    let s0 = ctx.session().await?;
    let l0 = ctx
        .backend
        .elections()
        .campaign(&name()?, val("c0")?, &s0)
        .await
        .ctx("campaign")?;
    let mut handles = Vec::new();
    for i in 1..=3 {
        let client = ctx.another_client().await.ctx("open another client")?;
        let s = ctx.session_on(&client).await?;
        handles.push(candidate(&client, &s, &format!("c{i}"))?);
        tokio::time::sleep(QUIET).await;
    }
    let mut term = l0.term();
    l0.resign().await.ctx("resign c0")?;
    for (i, h) in handles.into_iter().enumerate() {
        let expected = format!("c{}", i + 1);
        // Whoever the backend elects next must be the earliest remaining candidate.
        let prev = term;
        let deadline = tokio::time::Instant::now() + WAIT;
        let seen = loop {
            if let Some(l) = current(&ctx.backend).await?.filter(|l| l.term > prev) {
                break l;
            }
            if tokio::time::Instant::now() >= deadline {
                fail!(
                    "no leader after term {prev} within {WAIT:?} of the previous leader resigning"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        ensure_eq!(
            String::from_utf8_lossy(seen.value.as_bytes()),
            expected.as_str(),
            "the candidate elected after term {prev}"
        );
        let l = elected(h, WAIT, &format!("candidate {expected}")).await?;
        ensure_eq!(
            l.term(),
            seen.term,
            "{expected}'s term as leader() reports it"
        );
        term = l.term();
        l.resign().await.ctx("resign")?;
    }
    Ok(())
}

async fn dropped_campaign_withdraws(ctx: Ctx) -> CaseResult {
    let s0 = ctx.session().await?;
    let l0 = ctx
        .backend
        .elections()
        .campaign(&name()?, val("leader")?, &s0)
        .await
        .ctx("campaign")?;
    let quitter = ctx.session().await?;
    let dropped = completes(
        QUIET,
        ctx.backend
            .elections()
            .campaign(&name()?, val("quitter")?, &quitter),
    )
    .await;
    ensure!(
        dropped.is_none(),
        "a second candidate was elected while the first led: {dropped:?}"
    );
    let s2 = ctx.session().await?;
    let c2 = candidate(&ctx.backend, &s2, "next")?;
    still_waiting(&c2, "the live candidate").await?;
    l0.resign().await.ctx("resign")?;
    let l2 = elected(c2, WAIT, "the live candidate after the withdrawn one").await?;
    let seen = current(&ctx.backend).await?.ctx("leader()")?;
    ensure_eq!(
        seen.value.as_bytes(),
        b"next",
        "the leader after the withdrawn candidacy"
    );
    ensure_eq!(seen.session, s2.id(), "the leader's session");
    ensure!(
        quitter.is_alive(),
        "withdrawing ended the quitter's session"
    );
    l2.resign().await.ctx("resign")?;
    Ok(())
}

/// Campaigns dropped at random moments, from before the first request to
/// long after joining the line, most of them while their request to join
/// is on its way: a candidacy joined by a request whose answer nobody
/// waits for must be withdrawn all the same.
async fn campaign_dropped_at_any_point_withdraws(ctx: Ctx) -> CaseResult {
    let s0 = ctx.session().await?;
    let l0 = ctx
        .backend
        .elections()
        .campaign(&name()?, val("leader")?, &s0)
        .await
        .ctx("campaign")?;
    let quitter = ctx.session().await?;
    for _ in 0..DROPS {
        let after = Duration::from_micros(rand::random_range(0..DROP_WITHIN_MICROS));
        let dropped = completes(
            after,
            ctx.backend
                .elections()
                .campaign(&name()?, val("quitter")?, &quitter),
        )
        .await;
        ensure!(
            dropped.is_none(),
            "a campaign ended while another candidate led: {dropped:?}"
        );
    }
    let s2 = ctx.session().await?;
    let c2 = candidate(&ctx.backend, &s2, "next")?;
    l0.resign().await.ctx("resign")?;
    let l2 = elected(
        c2,
        WAIT,
        "the live candidate after campaigns dropped on their way into line",
    )
    .await?;
    ensure!(
        quitter.is_alive(),
        "withdrawing ended the quitter's session"
    );
    l2.resign().await.ctx("resign")?;
    Ok(())
}

async fn campaign_session_lost_fails(ctx: Ctx) -> CaseResult {
    let s0 = ctx.session().await?;
    let _l0 = ctx
        .backend
        .elections()
        .campaign(&name()?, val("leader")?, &s0)
        .await
        .ctx("campaign")?;
    let s = ctx.session().await?;
    let c = candidate(&ctx.backend, &s, "doomed")?;
    still_waiting(&c, "the doomed candidate").await?;
    s.close().await.ctx("close the candidate's session")?;
    let r = within(WAIT, "the candidate after its session closed", c)
        .await?
        .map_err(|e| Fail::Failed(format!("task: {e}")))?;
    expect_err(
        r,
        &[ErrorKind::SessionLost],
        "campaign while the session becomes lost",
    )?;
    let r = within(
        WAIT,
        "campaign with a closed session",
        ctx.backend
            .elections()
            .campaign(&key("elections/free")?, val("x")?, &s),
    )
    .await?;
    expect_err(
        r,
        &[ErrorKind::SessionLost],
        "campaign with a closed session",
    )?;
    ensure!(
        ctx.backend
            .elections()
            .leader(&key("elections/free")?)
            .await
            .ctx("leader()")?
            .is_none(),
        "a closed session became leader"
    );
    Ok(())
}

async fn leader_close_elects_next(ctx: Ctx) -> CaseResult {
    let s1 = ctx.session().await?;
    let l1 = ctx
        .backend
        .elections()
        .campaign(&name()?, val("a")?, &s1)
        .await
        .ctx("campaign")?;
    let other = ctx.another_client().await.ctx("open another client")?;
    let s2 = ctx.session_on(&other).await?;
    let c2 = candidate(&other, &s2, "b")?;
    still_waiting(&c2, "candidate b").await?;
    s1.close().await.ctx("close the leader's session")?;
    let lost = within(WAIT, "leadership.lost() after close", l1.lost()).await?;
    ensure_eq!(
        lost.kind(),
        ErrorKind::Closed,
        "kind of lost() after close ({lost})"
    );
    let l2 = elected(c2, WAIT, "candidate b after the leader's session closed").await?;
    ensure!(
        l2.term() > l1.term(),
        "term {} after {}",
        l2.term(),
        l1.term()
    );
    Ok(())
}

async fn leader_expiry_elects_next(ctx: Ctx) -> CaseResult {
    let s1 = ctx.short_session().await?;
    let l1 = ctx
        .backend
        .elections()
        .campaign(&name()?, val("a")?, &s1)
        .await
        .ctx("campaign")?;
    let other = ctx.another_client().await.ctx("open another client")?;
    let s2 = ctx.session_on(&other).await?;
    let c2 = candidate(&other, &s2, "b")?;
    still_waiting(&c2, "candidate b").await?;
    ctx.expire_session(s1.id()).await?;
    let lost = within(
        ctx.session_ttl() + WAIT,
        "leadership.lost() after expiry",
        l1.lost(),
    )
    .await?;
    ensure_eq!(
        lost.kind(),
        ErrorKind::SessionLost,
        "kind of lost() after expiry ({lost})"
    );
    let l2 = elected(
        c2,
        ctx.session_ttl() + WAIT,
        "candidate b after the leader's session expired",
    )
    .await?;
    ensure!(
        l2.term() > l1.term(),
        "term {} after {}",
        l2.term(),
        l1.term()
    );
    l1.resign().await.ctx("resign after expiry")?;
    l2.check()
        .ctx("the new leader after the old one resigned")?;
    let seen = current(&ctx.backend).await?.ctx("leader()")?;
    ensure_eq!(
        seen.term,
        l2.term(),
        "leader() after the old leader's late resign"
    );
    Ok(())
}

async fn stalled_leader_learns_first(ctx: Ctx) -> CaseResult {
    let ttl = ctx.session_ttl().max(Duration::from_secs(3));
    let s1 = ctx
        .backend
        .sessions()
        .open(ttl)
        .await
        .ctx("open a session")?;
    let l1 = ctx
        .backend
        .elections()
        .campaign(&name()?, val("a")?, &s1)
        .await
        .ctx("campaign")?;
    let other = ctx.another_client().await.ctx("open another client")?;
    let s2 = ctx.session_on(&other).await?;
    let elected_flag = Arc::new(AtomicBool::new(false));
    let flag = elected_flag.clone();
    let (o, n) = (other.clone(), name()?);
    let c2 = tokio::spawn(async move {
        let r = o
            .elections()
            .campaign(&n, val("b")?, &s2)
            .await
            .ctx("campaign b");
        flag.store(true, Ordering::SeqCst);
        r
    });
    tokio::time::sleep(QUIET).await;
    ctx.stall_session(s1.id()).await?;
    let lost = within(ttl + WAIT, "the stalled leader's lost()", l1.lost()).await?;
    ensure!(
        !elected_flag.load(Ordering::SeqCst),
        "another candidate was elected before the stalled leader's lost() resolved ({lost})"
    );
    let l2 = within(
        ttl + WAIT,
        "candidate b after the stalled leader's session expired",
        c2,
    )
    .await?
    .map_err(|e| Fail::Failed(format!("task: {e}")))??;
    ensure!(
        l2.term() > l1.term(),
        "term {} after {}",
        l2.term(),
        l1.term()
    );
    Ok(())
}

async fn resign_after_lost_ok(ctx: Ctx) -> CaseResult {
    let s1 = ctx.session().await?;
    let l1 = ctx
        .backend
        .elections()
        .campaign(&name()?, val("a")?, &s1)
        .await
        .ctx("campaign")?;
    s1.close().await.ctx("close")?;
    let s2 = ctx.session().await?;
    let l2 = within(
        WAIT,
        "campaign after the leader's session closed",
        ctx.backend.elections().campaign(&name()?, val("b")?, &s2),
    )
    .await?
    .ctx("campaign b")?;
    l1.resign()
        .await
        .ctx("resign after the session was closed")?;
    let seen = current(&ctx.backend)
        .await?
        .ctx("leader() after the stale resign")?;
    ensure_eq!(
        (seen.value.as_bytes(), seen.term),
        (&b"b"[..], l2.term()),
        "the leader after the stale resign"
    );
    Ok(())
}

async fn concurrent_campaigners(ctx: Ctx) -> CaseResult {
    const CANDIDATES: usize = 8;
    const ROUNDS: usize = 2;
    let mut clients = vec![ctx.backend.clone()];
    for _ in 0..3 {
        clients.push(ctx.another_client().await.ctx("open another client")?);
    }
    let mut obs = clients[1]
        .elections()
        .observe(&name()?)
        .await
        .ctx("observe")?;
    let in_office = Arc::new(AtomicBool::new(false));
    let terms: Arc<Mutex<Vec<(usize, Term)>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..CANDIDATES {
        let client = clients[i % clients.len()].clone();
        let session = ctx.session_on(&client).await?;
        let (in_office, terms, n) = (in_office.clone(), terms.clone(), name()?);
        tasks.push(tokio::spawn(async move {
            for round in 0..ROUNDS {
                let l = client.elections().campaign(&n, val(format!("c{i}"))?, &session).await.ctx("campaign")?;
                if in_office.swap(true, Ordering::SeqCst) {
                    fail!("candidate {i} (round {round}) was elected while another leader was in office");
                }
                if let Ok(mut t) = terms.lock() {
                    t.push((i, l.term()));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                in_office.store(false, Ordering::SeqCst);
                l.resign().await.ctx("resign")?;
            }
            Ok::<(), Fail>(())
        }));
    }
    for t in tasks {
        within(Duration::from_secs(40), "a campaigner", t)
            .await?
            .map_err(|e| Fail::Failed(format!("campaigner task: {e}")))??;
    }
    let terms = terms
        .lock()
        .map(|t| t.clone())
        .map_err(|_| Fail::Failed("poisoned".into()))?;
    ensure_eq!(terms.len(), CANDIDATES * ROUNDS, "leaderships");
    for pair in terms.windows(2) {
        ensure!(
            pair[1].1 > pair[0].1,
            "candidate {} got term {} after candidate {} had {}",
            pair[1].0,
            pair[1].1,
            pair[0].0,
            pair[0].1
        );
    }
    // The observer's terms never went backwards.
    let mut last: Option<Term> = None;
    while let Some(Some(item)) = completes(Duration::from_millis(100), obs.next()).await {
        if let Some(l) = item.ctx("an observed item")? {
            if let Some(prev) = last {
                ensure!(
                    l.term >= prev,
                    "the observer saw term {} after {prev}",
                    l.term
                );
            }
            last = Some(l.term);
        }
    }
    Ok(())
}
