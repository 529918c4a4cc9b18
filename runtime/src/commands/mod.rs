//! One module per command group; helpers shared by all of them.
//!
//! Every command validates its keys and values before opening the backend,
//! so a bad key or an oversize value is reported without any I/O.

mod check;
mod conformance;
mod demo;
mod elect;
mod kv;
mod lock;
mod pubsub;
mod queue;
mod tasks;

use crate::cli::{Command, Ctx, ValueInput};
use crate::exit::Failure;
use dprim::{Backend, Config, Error, Key, Value, MAX_VALUE_BYTES};
use std::io::Read;
use std::path::Path;
use tokio::sync::watch;

/// Runs a command; `Ok` carries the exit code.
pub(crate) async fn dispatch(ctx: &Ctx, command: Command) -> Result<u8, Failure> {
    match command {
        Command::Kv { command } => kv::run(ctx, command).await,
        Command::Lock(args) => lock::run(ctx, args).await,
        Command::Elect(args) => elect::run(ctx, args).await,
        Command::Pub(args) => pubsub::publish(ctx, args).await,
        Command::Sub(args) => pubsub::subscribe(ctx, args).await,
        Command::Queue { command } => queue::run(ctx, command).await,
        Command::Task { command } => tasks::task(ctx, command).await,
        Command::Agent(args) => tasks::agent(ctx, args).await,
        Command::Agents { command } => tasks::agents(ctx, command).await,
        Command::Supervisor(args) => tasks::supervisor(ctx, args).await,
        Command::Demo(args) => demo::run(ctx, args).await,
        Command::Check => check::run(ctx).await,
        Command::Conformance(args) => conformance::run(ctx, args).await,
    }
}

impl Ctx {
    /// Loads the config (or the in-memory default).
    pub(crate) fn config(&self) -> Result<Config, Failure> {
        crate::load_config(self.config.as_deref()).map_err(Failure::new)
    }

    /// Loads the config and opens its backend.
    pub(crate) async fn open(&self) -> Result<(Backend, Config), Failure> {
        let config = self.config()?;
        let backend = crate::open_config(&config).await.map_err(|e| {
            let timeout = e.kind() == dprim::ErrorKind::Timeout;
            let failure = Failure::new(e);
            if timeout {
                failure.hint(
                    "check `endpoints` in the config and that the servers are reachable, \
                     or raise `connect_timeout`",
                )
            } else {
                failure
            }
        })?;
        Ok((backend, config))
    }
}

/// A key argument.
pub(crate) fn key(raw: &str) -> Result<Key, Failure> {
    Key::new(raw).map_err(Failure::new)
}

/// A directory argument: `/` (or empty) is the namespace root.
pub(crate) fn dir(raw: &str) -> Result<Key, Failure> {
    if raw.is_empty() || raw == "/" {
        Ok(Key::root())
    } else {
        key(raw)
    }
}

/// Reads a value from its argument, stdin (`-`) or `--file`, checking the
/// size limit.
pub(crate) fn read_value(input: ValueInput) -> Result<Value, Failure> {
    let too_big = |source: &str| {
        Failure::new(Error::invalid(format!(
            "value read from {source} is larger than the limit of {MAX_VALUE_BYTES} bytes \
             (256 KiB); store large blobs elsewhere and keep a reference in dprim"
        )))
    };
    if let Some(path) = input.file {
        let shown = path.display().to_string();
        let cannot = |e: std::io::Error| {
            Failure::new(Error::invalid(format!(
                "cannot read value file `{shown}`: {e}"
            )))
        };
        let regular = std::fs::metadata(&path).map_err(cannot)?.is_file();
        if regular {
            let bytes = std::fs::read(&path).map_err(cannot)?;
            return Value::new(bytes)
                .map_err(|e| Failure::new(e.with_context("file", path.display())));
        }
        let file = std::fs::File::open(&path).map_err(cannot)?;
        let bytes = read_limited(file).map_err(cannot)?;
        return Value::new(bytes).map_err(|_| too_big(&format!("`{}`", path.display())));
    }
    match input.value.as_deref() {
        Some("-") => {
            let bytes = read_limited(std::io::stdin().lock()).map_err(|e| {
                Failure::new(Error::invalid(format!(
                    "cannot read the value from stdin: {e}"
                )))
            })?;
            Value::new(bytes).map_err(|_| too_big("stdin"))
        }
        Some(text) => Value::new(text.as_bytes().to_vec()).map_err(Failure::new),
        None => Err(Failure::new(Error::invalid(
            "no value given: pass it as an argument, `-` for stdin, or --file PATH",
        ))),
    }
}

/// Reads at most one byte more than the value limit, so an endless input
/// cannot exhaust memory.
fn read_limited(reader: impl Read) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader
        .take(MAX_VALUE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// For the in-memory backend: the reminder that it starts empty in every
/// process.
pub(crate) fn ephemeral_hint(backend: &Backend, config_path: Option<&Path>) -> Option<String> {
    if backend.kind() != "memory" {
        return None;
    }
    Some(match config_path {
        None => "no --config given, so this ran on the embedded in-memory backend, which starts \
                 empty in every dprim process; pass --config (or set DPRIM_CONFIG) to use a \
                 shared backend"
            .to_string(),
        Some(path) => format!(
            "`{}` selects the in-memory backend, which starts empty in every dprim process",
            path.display()
        ),
    })
}

/// Interrupt signals (Ctrl-C, and SIGTERM on Unix) counted from program start.
///
/// The handlers are installed before any command runs, so a signal that
/// arrives at any point is seen (never the default "terminate at once", which
/// would skip unlocking and resigning).
#[derive(Clone, Debug)]
pub(crate) struct Interrupts {
    count: watch::Receiver<u64>,
}

impl Interrupts {
    /// Installs the handlers. Must run inside the tokio runtime.
    pub(crate) fn install() -> Interrupts {
        let (tx, count) = watch::channel(0u64);
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            for kind in [SignalKind::interrupt(), SignalKind::terminate()] {
                if let Ok(mut signals) = signal(kind) {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        while signals.recv().await.is_some() {
                            tx.send_modify(|n| *n += 1);
                        }
                    });
                }
            }
        }
        #[cfg(not(unix))]
        {
            let tx = tx.clone();
            tokio::spawn(async move {
                while tokio::signal::ctrl_c().await.is_ok() {
                    tx.send_modify(|n| *n += 1);
                }
            });
        }
        drop(tx);
        Interrupts { count }
    }

    /// Resolves on the next interrupt not yet seen by this handle. Cancel-safe.
    pub(crate) async fn next(&mut self) {
        if self.count.changed().await.is_err() {
            // No handler could be installed: never resolves.
            std::future::pending::<()>().await;
        }
    }
}

impl Ctx {
    /// A handle that resolves on the next interrupt (one received since the
    /// program started counts, if no handle has seen it yet).
    pub(crate) fn interrupts(&self) -> Interrupts {
        self.interrupts.clone()
    }

    /// Resolves on an interrupt.
    pub(crate) fn interrupted(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut interrupts = self.interrupts();
        async move { interrupts.next().await }
    }
}

/// A default identity for this process: `<host>:<pid>`.
pub(crate) fn identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "localhost".to_string());
    format!("{host}:{}", std::process::id())
}

/// Formats a duration for messages.
pub(crate) fn human(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}
