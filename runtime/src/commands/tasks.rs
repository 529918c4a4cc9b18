//! `dprim task ...`, `dprim agent`, `dprim agents ls`, `dprim supervisor`.

use super::{ephemeral_hint, identity};
use crate::cli::{AgentArgs, AgentsCommand, Ctx, RestartArg, SupervisorArgs, TaskCommand};
use crate::exit::{Failure, OK};
use crate::output::{hex, write_raw, Out, PrintError};
use crate::tasks::agent::{read_checkpoint, Agent, AgentConfig};
use crate::tasks::client::TasksClient;
use crate::tasks::logs::{LogStream, CHUNK_BYTES};
use crate::tasks::placement::FirstFit;
use crate::tasks::resources::{parse_attributes, parse_bytes, parse_constraint, parse_resources};
use crate::tasks::supervisor::{Supervisor, SupervisorConfig};
use dprim::tasks::{Resources, RestartPolicy, TaskSpec, TaskStatus};
use dprim::{Depth, Error, TaskId, Tasks};
use futures::StreamExt;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

fn status_json(s: &TaskStatus) -> serde_json::Value {
    let updated = s
        .updated
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    json!({
        "id": s.id.0, "state": format!("{:?}", s.state).to_uppercase(),
        "agent": s.agent, "exit_code": s.exit_code, "message": s.message,
        "updated_unix_ms": updated,
    })
}

fn status_line(s: &TaskStatus) -> String {
    let state = format!("{:?}", s.state).to_uppercase();
    let agent = s.agent.as_deref().unwrap_or("-");
    format!("{:<24} {:<12} {:<12} {}", s.id.0, state, agent, s.message)
}

fn task_id(raw: &str) -> Result<TaskId, Failure> {
    if raw.trim().is_empty() {
        return Err(Failure::new(Error::invalid(
            "the task id is empty; `dprim task ls` lists them",
        )));
    }
    Ok(TaskId(raw.to_string()))
}

fn interval() -> Duration {
    Duration::from_millis(100)
}

pub(crate) async fn task(ctx: &Ctx, command: TaskCommand) -> Result<u8, Failure> {
    match command {
        TaskCommand::Launch {
            cpus,
            mem,
            disk,
            constraints,
            restart,
            env,
            command,
        } => {
            // Everything is checked before the backend is opened.
            let mut resources = parse_resources(&format!("cpus={cpus}"))?;
            resources.mem_bytes = parse_bytes(&mem)?;
            resources.disk_bytes = parse_bytes(&disk)?;
            let constraints = constraints
                .iter()
                .map(|c| parse_constraint(c))
                .collect::<Result<Vec<_>, _>>()?;
            let mut vars = BTreeMap::new();
            for e in env {
                let (k, v) = e.split_once('=').ok_or_else(|| {
                    Failure::new(Error::invalid(format!("--env `{e}` is not NAME=VALUE")))
                })?;
                vars.insert(k.to_string(), v.to_string());
            }
            let mut args = command.into_iter();
            let program = args.next().unwrap_or_default();
            let spec = TaskSpec {
                command: program,
                args: args.collect(),
                env: vars,
                resources,
                constraints,
                restart: match restart {
                    RestartArg::Never => RestartPolicy::Never,
                    RestartArg::OnFailure => RestartPolicy::OnFailure,
                    RestartArg::Always => RestartPolicy::Always,
                },
            };
            spec.validate()?;
            let (backend, _) = ctx.open().await?;
            let id = TasksClient::new(backend).launch(spec).await?;
            ctx.out.emit(&format!("task: {id}"), json!({"id": id.0}))?;
            Ok(OK)
        }
        TaskCommand::Ls => {
            let (backend, _) = ctx.open().await?;
            let client = TasksClient::new(backend);
            let mut page = None;
            loop {
                let p = client.reconcile(None, page).await?;
                for s in &p.statuses {
                    ctx.out.emit(&status_line(s), status_json(s))?;
                }
                match p.next {
                    Some(next) => page = Some(next),
                    None => break,
                }
            }
            Ok(OK)
        }
        TaskCommand::Status { id } => {
            let id = task_id(&id)?;
            let (backend, _) = ctx.open().await?;
            let s = TasksClient::new(backend).status(&id).await?;
            let exit = s
                .exit_code
                .map(|c| format!("\nexit_code: {c}"))
                .unwrap_or_default();
            let text = format!(
                "id: {}\nstate: {}\nagent: {}{exit}\nmessage: {}",
                s.id,
                format!("{:?}", s.state).to_uppercase(),
                s.agent.as_deref().unwrap_or("-"),
                s.message
            );
            ctx.out.emit(&text, status_json(&s))?;
            Ok(OK)
        }
        TaskCommand::Kill { id, grace } => {
            let id = task_id(&id)?;
            let (backend, _) = ctx.open().await?;
            TasksClient::new(backend).kill(&id, grace).await?;
            ctx.out.emit(
                &format!("kill requested: {id}"),
                json!({"id": id.0, "kill_requested": true}),
            )?;
            Ok(OK)
        }
        TaskCommand::Logs {
            id,
            stderr,
            launch,
            follow,
            tail,
        } => {
            let stream = if stderr {
                LogStream::Stderr
            } else {
                LogStream::Stdout
            };
            logs(ctx, &id, stream, launch, follow, tail.as_deref()).await
        }
        TaskCommand::Watch { count } => {
            let (backend, _) = ctx.open().await?;
            let mut updates = TasksClient::new(backend).watch().await?;
            let mut seen = 0u64;
            let interrupted = ctx.interrupted();
            tokio::pin!(interrupted);
            loop {
                if count.is_some_and(|c| seen >= c) {
                    return Ok(OK);
                }
                tokio::select! {
                    _ = &mut interrupted => return Ok(OK),
                    u = updates.next() => match u {
                        Some(Ok(s)) => {
                            seen += 1;
                            ctx.out.emit(&status_line(&s), status_json(&s))?;
                        }
                        Some(Err(e)) => return Err(Failure::new(e)),
                        None => return Ok(OK),
                    }
                }
            }
        }
    }
}

/// How often `dprim task logs --follow` asks for new output.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

/// `dprim task logs`.
async fn logs(
    ctx: &Ctx,
    id: &str,
    stream: LogStream,
    launch: Option<u32>,
    follow: bool,
    tail: Option<&str>,
) -> Result<u8, Failure> {
    let id = task_id(id)?;
    let tail = tail.map(parse_bytes).transpose()?;
    let (backend, _) = ctx.open().await?;
    let memory_hint = ephemeral_hint(&backend, ctx.config.as_deref());
    let client = TasksClient::new(backend);
    // Errors about the agent get a pointer to the agents, not the generic
    // "check endpoints" hint an `Unavailable` backend would get.
    let failure = |e: Error| {
        let about_agent = e.context().iter().any(|(name, _)| *name == "agent")
            && matches!(
                e.kind(),
                dprim::ErrorKind::Unavailable | dprim::ErrorKind::Timeout
            );
        let not_found = e.kind() == dprim::ErrorKind::NotFound;
        let mut f = Failure::new(e);
        if about_agent {
            f = f.hint("`dprim agents ls` lists the registered agents");
        } else if not_found {
            if let Some(h) = &memory_hint {
                f = f.hint(h.clone());
            }
        }
        f
    };
    let work = async {
        let mut logs = client.logs(&id, stream, launch).await.map_err(&failure)?;
        let mut offset = match tail {
            Some(n) => logs.size().await.map_err(&failure)?.saturating_sub(n),
            None => 0,
        };
        let mut printer = LogPrinter::new(ctx.out);
        loop {
            // Asked before reading: output written before the launch ended
            // is then read below, and nothing is left unread at the end.
            let ended = follow && logs.ended().await.map_err(&failure)?;
            loop {
                let chunk = logs.read(offset, CHUNK_BYTES).await.map_err(&failure)?;
                printer.print(offset, &chunk.data)?;
                offset += chunk.data.len() as u64;
                if chunk.data.is_empty() || offset >= chunk.size {
                    break;
                }
            }
            if !follow || ended {
                printer.finish()?;
                return Ok(OK);
            }
            tokio::time::sleep(FOLLOW_INTERVAL).await;
        }
    };
    let interrupted = ctx.interrupted();
    tokio::select! {
        _ = interrupted => Ok(OK),
        result = work => result,
    }
}

/// Prints task output: the raw bytes in text mode. In JSON mode one object
/// per piece, as UTF-8 text where it is, else hex; a UTF-8 character split
/// between two chunks is held back until its rest arrives, so text does not
/// turn into hex only because of where a chunk ended.
struct LogPrinter {
    out: Out,
    /// Bytes not printed yet (JSON mode), starting at `offset`.
    pending: Vec<u8>,
    offset: u64,
}

impl LogPrinter {
    fn new(out: Out) -> LogPrinter {
        LogPrinter {
            out,
            pending: Vec::new(),
            offset: 0,
        }
    }

    fn print(&mut self, offset: u64, data: &[u8]) -> Result<(), PrintError> {
        if !self.out.is_json() {
            return if data.is_empty() {
                Ok(())
            } else {
                write_raw(data)
            };
        }
        if self.pending.is_empty() {
            self.offset = offset;
        }
        self.pending.extend_from_slice(data);
        let ready = ready_len(&self.pending);
        if ready > 0 {
            let piece: Vec<u8> = self.pending.drain(..ready).collect();
            self.emit(&piece)?;
            self.offset += ready as u64;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), PrintError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let piece = std::mem::take(&mut self.pending);
        self.emit(&piece)
    }

    fn emit(&self, piece: &[u8]) -> Result<(), PrintError> {
        let (data, encoding) = match std::str::from_utf8(piece) {
            Ok(text) => (json!(text), "utf8"),
            Err(_) => (json!(hex(piece)), "hex"),
        };
        self.out.emit(
            "",
            json!({"offset": self.offset, "data": data, "encoding": encoding}),
        )
    }
}

/// How many of `bytes` can be printed now: all, except an incomplete UTF-8
/// character at the very end (its rest may come with the next chunk).
fn ready_len(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        _ => bytes.len(),
    }
}

pub(crate) async fn agents(ctx: &Ctx, command: AgentsCommand) -> Result<u8, Failure> {
    match command {
        AgentsCommand::Ls => {
            let (backend, _) = ctx.open().await?;
            let dir = dprim::Key::new("_dprim/agents")?;
            for e in backend.kv().list(&dir, Depth::Children).await?.entries {
                let info: serde_json::Value = serde_json::from_slice(e.value.as_bytes())
                    .map_err(|err| Error::unexpected(format!("unreadable agent record: {err}")))?;
                let text = format!("{:<20} {}", e.key.name(), info);
                ctx.out.emit(&text, info)?;
            }
            Ok(OK)
        }
        AgentsCommand::Checkpoint { work_dir } => {
            let state = read_checkpoint(&work_dir)?;
            let text = serde_json::to_string_pretty(&state)
                .map_err(|e| Error::unexpected(format!("printing the checkpoint: {e}")))?;
            ctx.out.emit(&text, state)?;
            Ok(OK)
        }
    }
}

pub(crate) async fn agent(ctx: &Ctx, args: AgentArgs) -> Result<u8, Failure> {
    let resources: Resources = parse_resources(&args.resources)?;
    let attributes = parse_attributes(&args.attributes)?;
    let id = args.id.unwrap_or_else(|| identity().replace(':', "-"));
    dprim::Key::new(&id).map_err(|e| {
        Failure::new(Error::invalid(format!(
            "agent id `{id}` is not a valid key segment: {}",
            e.message()
        )))
    })?;
    let (backend, config) = ctx.open().await?;
    let agent = Agent::new(
        backend,
        AgentConfig {
            id: id.clone(),
            resources,
            attributes,
            work_dir: args.work_dir,
            session_ttl: args.ttl.unwrap_or(config.backend.session_ttl),
            interval: interval(),
            sandbox_retention: args.sandbox_retention,
        },
    );
    crate::output::note(&format!(
        "agent {id} running (Ctrl-C to stop); resources held with {}",
        agent.enforcement().describe()
    ));
    agent.run(ctx.interrupted()).await?;
    Ok(OK)
}

pub(crate) async fn supervisor(ctx: &Ctx, args: SupervisorArgs) -> Result<u8, Failure> {
    let name = args.name.unwrap_or_else(identity);
    let (backend, config) = ctx.open().await?;
    let supervisor = Supervisor::new(
        backend,
        SupervisorConfig {
            name: name.clone(),
            session_ttl: args.ttl.unwrap_or(config.backend.session_ttl),
            gone_timeout: args.gone_timeout,
            interval: interval(),
            placer: Arc::new(FirstFit),
            task_retention: args.task_retention,
        },
    );
    crate::output::note(&format!("supervisor {name} campaigning (Ctrl-C to stop)"));
    supervisor.run(ctx.interrupted()).await?;
    Ok(OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_utf8_character_is_held_back() {
        let text = "héllo".as_bytes();
        assert_eq!(ready_len(text), text.len());
        // `é` is two bytes; a chunk ending after its first byte holds it.
        assert_eq!(ready_len(&text[..2]), 1);
        assert_eq!(ready_len(&text[..3]), 3);
        // Bytes that are not UTF-8 at all are not held (they print as hex).
        assert_eq!(ready_len(&[0xff, b'a']), 2);
        assert_eq!(ready_len(b""), 0);
    }
}
