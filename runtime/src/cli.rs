//! The `dprim` command line: its definition (clap derive) and [`run`].

use crate::commands::{self, Interrupts};
use crate::exit::{Failure, EXIT_CODES_HELP};
use crate::output::{self, Format, Out};
use clap::{Args, Parser, Subcommand, ValueEnum};
use dprim::Version;
use std::path::PathBuf;
use std::time::Duration;

const ABOUT: &str = "Portable distributed primitives from the shell: kv, locks, elections, \
pub/sub and queues on the backend named in a config file (default: the embedded in-memory \
backend, whose state lasts only as long as one dprim process)";

const LONG_ABOUT: &str = "\
Portable distributed primitives from the shell: key-value storage, locks, leader
elections, pub/sub and work queues, on whichever backend the config file names.

The backend comes from the TOML file given with --config (or $DPRIM_CONFIG):

    [backend]
    kind = \"etcd\"                  # memory | etcd | zookeeper | nats
    endpoints = [\"127.0.0.1:2379\"]
    namespace = \"prod/payments\"    # every key lives under this path
    session_ttl = \"10s\"            # default TTL for `dprim lock` and `dprim elect`

Without a config, dprim uses the embedded in-memory backend. It lives inside the
dprim process, so its state lasts only as long as that one invocation: a key
written by one `dprim kv put` is gone when that command exits. It is meant for
trying commands out and for `dprim conformance`; point --config at a real
backend to share state between processes. `dprim check` shows which backend a
config opens and what it can do.

Keys are `/`-separated segments of A-Z a-z 0-9 - _ . (at most 16 segments and
512 bytes); values are bytes, at most 256 KiB. Durations are written like
500ms, 10s, 1m. Set DPRIM_LOG (e.g. DPRIM_LOG=debug) for diagnostic logs on stderr.";

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Text for people.
    Text,
    /// One JSON object per line, for scripts.
    Json,
}

/// The `dprim` command line.
#[derive(Parser, Debug)]
#[command(
    name = "dprim",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    /// Config file naming the backend. Without one, the embedded in-memory
    /// backend is used (state lasts only as long as this process).
    #[arg(
        long,
        global = true,
        env = "DPRIM_CONFIG",
        hide_env_values = true,
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Read, write, list and watch keys.
    Kv {
        /// The kv command.
        #[command(subcommand)]
        command: KvCommand,
    },
    /// Take a lock and hold it until Ctrl-C, or while running a command.
    #[command(after_help = "\
Examples:
  dprim lock backups                       hold `backups` until Ctrl-C
  dprim lock backups -- ./backup.sh        run ./backup.sh while holding it;
                                           exit with its exit code

The command gets the fencing token in $DPRIM_FENCING_TOKEN and the lock name in
$DPRIM_LOCK. Ctrl-C (or SIGTERM) releases the lock; while a command runs, dprim
first waits for the command to exit, and a second Ctrl-C kills it. If the lock's
session is lost while the command runs, the command is killed (someone else may
hold the lock now) and dprim exits 4.")]
    Lock(LockArgs),
    /// Campaign for leadership and hold it until Ctrl-C; or show the leader.
    #[command(after_help = "\
Examples:
  dprim elect scheduler                    campaign; hold leadership until Ctrl-C
  dprim elect scheduler host-a:8080        campaign with a value observers see
  dprim elect scheduler --show             print the current leader (exit 1 if none)
  dprim elect scheduler --observe          print leader changes as they happen

Ctrl-C (or SIGTERM) resigns. If leadership is lost (the session could not be
kept alive), dprim says so and exits 4.")]
    Elect(ElectArgs),
    /// Publish one message to a topic.
    Pub(PubArgs),
    /// Subscribe to a topic and print messages as they arrive.
    Sub(SubArgs),
    /// Push, pull, ack and count work-queue messages.
    Queue {
        /// The queue command.
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Launch, list, inspect, watch and kill tasks run by agents.
    #[command(after_help = "\
Examples:
  dprim task launch --cpus 0.5 --mem 256MiB -- ./worker --shard 3
  dprim task launch --constraint zone==z1 --restart on-failure -- sleep 60
  dprim task ls
  dprim task status t019bc7d4a1f-3e2a9c0d41b7
  dprim task logs t019bc7d4a1f-3e2a9c0d41b7 --follow
  dprim task kill t019bc7d4a1f-3e2a9c0d41b7 --grace 10s

Tasks are run by agents (`dprim agent`) and placed by a supervisor
(`dprim supervisor`); all of them must use the same shared backend (--config).")]
    Task {
        /// The task command.
        #[command(subcommand)]
        command: TaskCommand,
    },
    /// Run an agent: register this machine's resources and run assigned tasks.
    #[command(after_help = "\
Example:
  dprim agent --resources cpus=4,mem=8GiB,disk=20GiB --attributes rack=r1,zone=z1 \\
              --work-dir /var/lib/dprim/agent

Each task runs as a child process in its own process group, with its working
directory (sandbox) under --work-dir/<task>/<launch> holding its stdout and
stderr files, which `dprim task logs` reads through the backend; a sandbox is
deleted once its launch has been over for --sandbox-retention. A task's
memory and CPU are limited with a control group where the machine allows
(else memory with an rlimit); the agent prints which at start.
Ctrl-C kills the agent's tasks and leaves.

The agent keeps a checkpoint in --work-dir/agent.checkpoint.{0,1} (its tasks
and the reports not yet written to the backend; `dprim agents checkpoint`
prints it). If it dies, starting it again with the same --work-dir takes
back the tasks still running and reports those that ended meanwhile with
their exit code; nothing is launched twice.")]
    Agent(AgentArgs),
    /// Look at agents: the registered ones, or one agent's checkpoint.
    Agents {
        /// The agents command.
        #[command(subcommand)]
        command: AgentsCommand,
    },
    /// Run a supervisor: campaign, and while leader place tasks and track agents.
    #[command(
        long_about = "Run a supervisor: campaign, and while leader place tasks and track agents.

Several supervisors may run on one backend; one is elected and the others
stand by. The leader places waiting tasks on agents with room for them,
marks the tasks of an agent whose session ended UNREACHABLE, then GONE
after --gone-timeout, relaunches them per their restart policy, and forgets
a task that is done for good once --task-retention has passed (its status
is then unknown to `dprim task status`)."
    )]
    Supervisor(SupervisorArgs),
    /// A one-process demo cluster: a supervisor and three agents run a small
    /// workload; one agent crashes midway and its task moves.
    #[command(after_help = "\
Runs on the embedded in-memory backend unless --config names another. Task
state changes are printed as they happen; after --duration the demo kills
what is left, prints a summary and exits 0.")]
    Demo(DemoArgs),
    /// Validate the config, connect, and print the backend's capabilities.
    Check,
    /// Run the conformance suite against the configured backend.
    #[command(after_help = "\
Without --config the suite runs against the embedded in-memory backend. Each
case prints a line as it finishes, then a summary table; report.json and
report.md are written to --report. Exits 1 if any case failed.

The tasks:: cases run supervisors and agents on the backend (in this process
on memory, otherwise as child dprim processes reading a copy of --config)
and real task processes (sh, sleep) under the temporary directory; all of
them are stopped when each case ends.")]
    Conformance(ConformanceArgs),
}

/// When a task is launched again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RestartArg {
    /// Never.
    Never,
    /// After it fails or its agent is gone.
    OnFailure,
    /// After any end but a kill.
    Always,
}

/// `dprim task ...`
#[derive(Subcommand, Debug)]
pub enum TaskCommand {
    /// Launch a task; prints its id.
    Launch {
        /// CPU shares (1.0 = one core).
        // A negative value is taken (and refused with a clear message)
        // rather than read as an unknown flag.
        #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
        cpus: f64,
        /// Memory, e.g. 256MiB.
        #[arg(long, default_value = "64MiB", allow_hyphen_values = true)]
        mem: String,
        /// Disk, e.g. 1GiB.
        #[arg(long, default_value = "0", allow_hyphen_values = true)]
        disk: String,
        /// Placement constraint on agent attributes: attr==value or attr!=value (repeatable).
        #[arg(long = "constraint", value_name = "ATTR==VALUE")]
        constraints: Vec<String>,
        /// When to launch it again.
        #[arg(long, value_enum, default_value_t = RestartArg::Never)]
        restart: RestartArg,
        /// Environment variable for the task, NAME=VALUE (repeatable).
        #[arg(long = "env", value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// List every task with its state.
    Ls,
    /// Show one task's status.
    Status {
        /// The task id printed by `dprim task launch`.
        id: String,
    },
    /// Kill a task: SIGTERM, then SIGKILL after the grace period.
    Kill {
        /// The task id.
        id: String,
        /// Time between SIGTERM and SIGKILL.
        #[arg(long, value_parser = humantime::parse_duration, allow_hyphen_values = true, default_value = "10s", value_name = "DURATION")]
        grace: Duration,
    },
    /// Print a task's output (stdout, or stderr with --stderr).
    #[command(after_help = "\
Examples:
  dprim task logs t019bc7d4a1f-3e2a9c0d41b7                  stdout of the latest launch
  dprim task logs t019bc7d4a1f-3e2a9c0d41b7 --stderr --launch 1
  dprim task logs t019bc7d4a1f-3e2a9c0d41b7 --follow --tail 4KiB

The output is read from the agent that ran the launch, through the backend,
so the agent must be running (`dprim agents ls`). The bytes are printed
exactly as the task wrote them. --follow keeps printing new output until the
launch has ended and everything it wrote is printed, then exits 0; Ctrl-C
stops it earlier. With --output json each piece of output is one line:
{\"offset\", \"data\", \"encoding\": \"utf8\" or \"hex\"}.")]
    Logs {
        /// The task id.
        id: String,
        /// Print the task's stderr instead of its stdout.
        #[arg(long)]
        stderr: bool,
        /// Which launch: 1 for the first (a restarted task has several).
        /// Default: the latest.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        launch: Option<u32>,
        /// Keep printing new output until the launch ends.
        #[arg(long, short)]
        follow: bool,
        /// Start this many bytes before the end, e.g. 4KiB.
        #[arg(long, value_name = "BYTES")]
        tail: Option<String>,
    },
    /// Print status updates as they happen.
    Watch {
        /// Stop after this many updates.
        #[arg(long, allow_negative_numbers = true)]
        count: Option<u64>,
    },
}

/// `dprim agents ...`
#[derive(Subcommand, Debug)]
pub enum AgentsCommand {
    /// List the registered agents with their resources and attributes.
    Ls,
    /// Print the checkpoint an agent keeps in its work dir, as JSON: the
    /// launches it runs and the reports it has not delivered yet. Reads
    /// the files only; the agent may be running or not.
    Checkpoint {
        /// The agent's --work-dir.
        #[arg(long)]
        work_dir: std::path::PathBuf,
    },
}

/// `dprim agent`
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The agent's id (a key segment). Default: host name and pid.
    #[arg(long)]
    pub id: Option<String>,
    /// What this agent offers: cpus=4,mem=8GiB,disk=20GiB,ports=8000-8010.
    #[arg(long, value_name = "RESOURCES")]
    pub resources: String,
    /// Attributes used by constraints: rack=r1,zone=z1.
    #[arg(long, default_value = "", value_name = "ATTRIBUTES")]
    pub attributes: String,
    /// Where task sandboxes and the agent's checkpoint go; restarting the
    /// agent with the same dir takes back the tasks still running there.
    #[arg(long, value_name = "DIR")]
    pub work_dir: PathBuf,
    /// TTL of the agent's session (default: the config's session_ttl).
    #[arg(long, value_parser = humantime::parse_duration, allow_hyphen_values = true, value_name = "DURATION")]
    pub ttl: Option<Duration>,
    /// How long the sandbox of an ended launch (its stdout, stderr and
    /// exit code, what `dprim task logs` reads) is kept; then it is deleted.
    #[arg(long, value_parser = humantime::parse_duration, allow_hyphen_values = true, default_value = "1h", value_name = "DURATION")]
    pub sandbox_retention: Duration,
}

/// `dprim demo`
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How long the demo runs.
    #[arg(long, value_parser = humantime::parse_duration, allow_hyphen_values = true, default_value = "12s", value_name = "DURATION")]
    pub duration: Duration,
    /// When the first agent crashes (0s: never).
    #[arg(long, value_parser = humantime::parse_duration, allow_hyphen_values = true, default_value = "3s", value_name = "DURATION")]
    pub crash_after: Duration,
}

/// `dprim supervisor`
#[derive(Args, Debug)]
pub struct SupervisorArgs {
    /// The supervisor's name in the election. Default: host name and pid.
    #[arg(long)]
    pub name: Option<String>,
    /// How long a task stays UNREACHABLE before it is declared GONE.
    #[arg(long, value_parser = humantime::parse_duration, allow_hyphen_values = true, default_value = "30s", value_name = "DURATION")]
    pub gone_timeout: Duration,
    /// How long a task that is done for good (FINISHED, FAILED, KILLED,
    /// GONE or DROPPED, no relaunch due) keeps its records; then they are
    /// deleted and `dprim task status` no longer knows it.
    #[arg(long, value_parser = humantime::parse_duration, allow_hyphen_values = true, default_value = "1h", value_name = "DURATION")]
    pub task_retention: Duration,
    /// TTL of the supervisor's session (default: the config's session_ttl).
    #[arg(long, value_parser = humantime::parse_duration, allow_hyphen_values = true, value_name = "DURATION")]
    pub ttl: Option<Duration>,
}

/// A value given as an argument, `-` for stdin, or `--file`.
#[derive(Args, Debug)]
pub struct ValueInput {
    /// The value. `-` reads it from stdin.
    #[arg(value_name = "VALUE", required_unless_present = "file")]
    pub value: Option<String>,
    /// Read the value from this file instead.
    #[arg(long, value_name = "PATH", conflicts_with = "value")]
    pub file: Option<PathBuf>,
}

/// A message given as an argument, `-` for stdin, or `--file`.
#[derive(Args, Debug)]
pub struct MessageInput {
    /// The message. `-` reads it from stdin.
    #[arg(value_name = "MESSAGE", required_unless_present = "file")]
    pub message: Option<String>,
    /// Read the message from this file instead.
    #[arg(long, value_name = "PATH", conflicts_with = "message")]
    pub file: Option<PathBuf>,
}

impl From<MessageInput> for ValueInput {
    fn from(m: MessageInput) -> ValueInput {
        ValueInput {
            value: m.message,
            file: m.file,
        }
    }
}

/// `dprim kv ...`
#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Print a key's value and version (exit 1 if the key does not exist).
    Get {
        /// The key.
        key: String,
        /// Print only the value's bytes, exactly as stored.
        #[arg(long)]
        raw: bool,
    },
    /// Write a key unconditionally; prints the new version.
    Put {
        /// The key.
        key: String,
        /// The value.
        #[command(flatten)]
        value: ValueInput,
    },
    /// Write a key only if it does not exist (exit 1 if it does); prints the version.
    Create {
        /// The key.
        key: String,
        /// The value.
        #[command(flatten)]
        value: ValueInput,
    },
    /// Write a key only if it is at VERSION (exit 1 otherwise); prints the new version.
    Cas {
        /// The key.
        key: String,
        /// The version the key must have, as printed by `dprim kv get`.
        #[arg(id = "expected_version", value_name = "VERSION", value_parser = parse_version, allow_negative_numbers = true)]
        version: Version,
        /// The new value.
        #[command(flatten)]
        value: ValueInput,
    },
    /// Delete a key (only if it is at --version, when given).
    Del {
        /// The key.
        key: String,
        /// Delete only if the key is at this version (exit 1 otherwise).
        #[arg(long = "version", id = "expected_version", value_name = "VERSION", value_parser = parse_version, allow_negative_numbers = true)]
        version: Option<Version>,
    },
    /// List the keys in a directory.
    Ls {
        /// The directory; `/` (the default) is the namespace root.
        #[arg(default_value = "/")]
        dir: String,
        /// List every key below DIR, not only its immediate children.
        #[arg(long, short)]
        recursive: bool,
    },
    /// Print changes of a key (or, with --dir, of every key under a directory).
    Watch {
        /// The key (or directory with --dir; `/` is the namespace root).
        key: String,
        /// Watch every key under KEY, at any depth.
        #[arg(long)]
        dir: bool,
        /// Start after this version (including changes made before the
        /// watch started); default: only changes from now on.
        #[arg(long, value_parser = parse_version, value_name = "VERSION", allow_negative_numbers = true)]
        from: Option<Version>,
        /// Stop after this many events (default: until Ctrl-C).
        #[arg(long, allow_negative_numbers = true, value_name = "N")]
        count: Option<u64>,
    },
}

/// `dprim lock NAME [-- CMD ARGS...]`
#[derive(Args, Debug)]
pub struct LockArgs {
    /// The lock's name (a key).
    pub name: String,
    /// Session TTL: how long the lock survives this process dying without
    /// unlocking. Default: the config's `session_ttl`.
    #[arg(long, value_parser = humantime::parse_duration, allow_hyphen_values = true, value_name = "DURATION")]
    pub ttl: Option<Duration>,
    /// How long to wait for the lock (exit 1 when it is not acquired in time).
    #[arg(long, value_parser = humantime::parse_duration, allow_hyphen_values = true, default_value = "30s", value_name = "DURATION")]
    pub timeout: Duration,
    /// Command to run while holding the lock.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `dprim elect NAME [VALUE]`
#[derive(Args, Debug)]
pub struct ElectArgs {
    /// The election's name (a key).
    pub name: String,
    /// The value observers see for this leader. Default: `<host>:<pid>`.
    #[arg(conflicts_with_all = ["show", "observe"])]
    pub value: Option<String>,
    /// Session TTL: how long leadership survives this process dying without
    /// resigning. Default: the config's `session_ttl`.
    #[arg(long, value_parser = humantime::parse_duration, allow_hyphen_values = true, value_name = "DURATION", conflicts_with_all = ["show", "observe"])]
    pub ttl: Option<Duration>,
    /// Print the current leader instead of campaigning (exit 1 if there is none).
    #[arg(long, conflicts_with = "observe")]
    pub show: bool,
    /// Print the leader, then every change, instead of campaigning.
    #[arg(long)]
    pub observe: bool,
    /// With --observe: stop after this many updates.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        requires = "observe"
    )]
    pub count: Option<u64>,
}

/// `dprim pub TOPIC MESSAGE`
#[derive(Args, Debug)]
pub struct PubArgs {
    /// The topic (a key).
    pub topic: String,
    /// The message.
    #[command(flatten)]
    pub message: MessageInput,
}

/// `dprim sub TOPIC`
#[derive(Args, Debug)]
pub struct SubArgs {
    /// The topic (a key).
    pub topic: String,
    /// Stop after this many messages (default: until Ctrl-C).
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub count: Option<u64>,
}

/// `dprim queue ...`
#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// Add a message; prints its id.
    Push {
        /// The queue (a key).
        queue: String,
        /// The message.
        #[command(flatten)]
        message: MessageInput,
    },
    /// Take the next message; prints id, attempt, receipt and payload (exit 1 if empty).
    Pull {
        /// The queue (a key).
        queue: String,
        /// How long the message stays invisible to other consumers unless
        /// acked or nacked.
        #[arg(long, value_parser = humantime::parse_duration, allow_hyphen_values = true, default_value = "30s", value_name = "DURATION")]
        visibility: Duration,
        /// How long to wait for a message when the queue is empty.
        #[arg(long, value_parser = humantime::parse_duration, allow_hyphen_values = true, default_value = "0s", value_name = "DURATION")]
        wait: Duration,
        /// Acknowledge the message at once (remove it for good).
        #[arg(long)]
        ack: bool,
    },
    /// Acknowledge a delivery: the message is removed for good.
    Ack {
        /// The queue (a key).
        queue: String,
        /// The receipt printed by `dprim queue pull`.
        receipt: String,
    },
    /// Give a delivery back; it becomes visible again after --delay.
    Nack {
        /// The queue (a key).
        queue: String,
        /// The receipt printed by `dprim queue pull`.
        receipt: String,
        /// How long before the message may be delivered again.
        #[arg(long, value_parser = humantime::parse_duration, allow_hyphen_values = true, default_value = "0s", value_name = "DURATION")]
        delay: Duration,
    },
    /// Print how many messages are ready and in flight.
    Depth {
        /// The queue (a key).
        queue: String,
    },
}

/// `dprim conformance`
#[derive(Args, Debug)]
pub struct ConformanceArgs {
    /// Directory to write report.json and report.md to.
    #[arg(long, value_name = "DIR", default_value = "conformance-report")]
    pub report: PathBuf,
    /// Run only cases whose name contains this text (e.g. `kv::`).
    #[arg(long, value_name = "SUBSTR")]
    pub filter: Option<String>,
    /// Fail a case that runs longer than this. Default: the suite's own.
    #[arg(long, value_parser = humantime::parse_duration, allow_hyphen_values = true, value_name = "DURATION")]
    pub case_timeout: Option<Duration>,
}

fn parse_version(s: &str) -> Result<Version, String> {
    s.parse::<Version>().map_err(|e| e.message().to_string())
}

/// What every command gets: where the config is and how to print.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) config: Option<PathBuf>,
    pub(crate) out: Out,
    pub(crate) interrupts: Interrupts,
}

/// Runs one parsed command line and returns the process exit code. Errors
/// are printed to stderr (as JSON with `--output json`).
pub async fn run(cli: Cli) -> u8 {
    let ctx = Ctx {
        interrupts: Interrupts::install(),
        config: cli.config,
        out: Out {
            format: match cli.output {
                OutputFormat::Text => Format::Text,
                OutputFormat::Json => Format::Json,
            },
        },
    };
    match commands::dispatch(&ctx, cli.command).await {
        Ok(code) => code,
        Err(failure) => {
            report(&ctx.out, &failure);
            failure.code()
        }
    }
}

/// Prints a failure to stderr.
pub(crate) fn report(out: &Out, failure: &Failure) {
    if failure.is_silent() {
        return;
    }
    if out.is_json() {
        output::note(&failure.to_json().to_string());
    } else {
        output::note(&failure.to_string());
    }
}

/// Sends `tracing` output to stderr, filtered by `DPRIM_LOG` (default `warn`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DPRIM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_lock_with_command() {
        let cli = Cli::try_parse_from([
            "dprim", "lock", "jobs", "--ttl", "5s", "--", "sh", "-c", "true",
        ])
        .unwrap();
        let Command::Lock(args) = cli.command else {
            panic!("not a lock command");
        };
        assert_eq!(args.ttl, Some(Duration::from_secs(5)));
        assert_eq!(args.command, ["sh", "-c", "true"]);
    }

    #[test]
    fn version_arguments_parse() {
        let cli = Cli::try_parse_from(["dprim", "kv", "cas", "k", "7", "v"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Kv { command: KvCommand::Cas { version, .. } } if version.get() == 7
        ));
        assert!(Cli::try_parse_from(["dprim", "kv", "cas", "k", "0", "v"]).is_err());
        let cli = Cli::try_parse_from(["dprim", "kv", "del", "k", "--version", "3"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Kv { command: KvCommand::Del { version: Some(v), .. } } if v.get() == 3
        ));
    }
}
