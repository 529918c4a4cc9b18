//! `dprim task ...`, `dprim agent`, `dprim agents ls`, `dprim supervisor`.

use super::identity;
use crate::cli::{AgentArgs, AgentsCommand, Ctx, RestartArg, SupervisorArgs, TaskCommand};
use crate::exit::{Failure, OK};
use crate::tasks::agent::{Agent, AgentConfig};
use crate::tasks::client::TasksClient;
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
        },
    );
    crate::output::note(&format!("agent {id} running (Ctrl-C to stop)"));
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
        },
    );
    crate::output::note(&format!("supervisor {name} campaigning (Ctrl-C to stop)"));
    supervisor.run(ctx.interrupted()).await?;
    Ok(OK)
}
