//! Running one task as a process on an agent: its own process group (so a
//! kill reaches everything it started), its own sandbox directory, stdout
//! and stderr kept in files there, and a kill that sends SIGTERM to the
//! group and SIGKILL after a grace period.
//!
//! # Surviving the agent
//!
//! A task must outlive its agent: when the agent dies (crash, SIGKILL,
//! upgrade) and is started again on the same work dir, it takes its tasks
//! back ([`TaskProcess::adopt`]). A restarted agent is not the task's
//! parent, so it cannot `wait()` for it and would never learn its exit
//! code. So every task runs under a small `/bin/sh` wrapper, the process
//! group leader, which runs the command as its child and, when the command
//! ends, writes the exit code to `<sandbox>/exit` (read only once the
//! wrapper is gone, so never half-written) and exits with that same code.
//! With control groups, the wrapper joins the launch's group before it
//! starts the command, so everything the task starts is inside:
//!
//! - the code is the command's own, or 128 + N when signal N ended it (the
//!   shell's `$?`, the same convention as [`exit_code`]);
//! - the wrapper traps the signals a kill sends (SIGTERM, and HUP, INT,
//!   QUIT, ALRM, USR1, USR2), so a group-wide SIGTERM ends the command and
//!   still leaves the wrapper to record 143; the command itself starts with
//!   the default dispositions (traps are reset on exec);
//! - only an uncatchable SIGKILL of the group ends the wrapper without an
//!   `exit` file. An adopted task that ends that way reports 137 if this
//!   agent sent the SIGKILL, else [`UNKNOWN_EXIT`] (-1): it ended, its code
//!   is unknown.
//!
//! The wrapper's pid is the group id, kept in `<sandbox>/pid`; an operator
//! signals the task with `kill -TERM -- -<pid>`. A process is taken back
//! only if it is still the one started (same start time in
//! `/proc/<pid>/stat`, or the sandbox as working directory), never a
//! process that reused the pid.

use super::cgroup::{Cgroups, TaskCgroup};
use dprim::tasks::TaskSpec;
use dprim::{Error, ErrorKind, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};

/// How an agent holds tasks to the resources they asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Memory and CPU through control groups (v2, else v1): one group per
    /// launch, see [`super::cgroup`]. A task over its memory is stopped by
    /// the kernel (SIGKILL: exit code 137).
    Cgroup {
        /// The agent's groups.
        cgroups: Cgroups,
    },
    /// Memory as a data-segment rlimit (RLIMIT_DATA, which covers the heap
    /// and private anonymous mappings), applied through util-linux
    /// `prlimit`; CPU shares are not enforced. Used where control groups
    /// cannot be (the reason is kept for the description).
    Rlimit {
        /// Path of the `prlimit` program.
        prlimit: PathBuf,
        /// Why control groups are not used.
        no_cgroups: String,
    },
    /// Nothing is enforced; resources only steer placement.
    None,
}

impl Enforcement {
    /// What this machine allows for agent `agent`: control groups where
    /// the agent may make them (v2, else v1), else memory by rlimit where
    /// `prlimit` is installed, else nothing.
    pub fn detect(agent: &str) -> Enforcement {
        let no_cgroups = match Cgroups::detect(agent) {
            Ok(cgroups) => return Enforcement::Cgroup { cgroups },
            Err(why) => why,
        };
        Enforcement::rlimit(no_cgroups)
    }

    /// Memory by rlimit if `prlimit` is installed, else nothing.
    pub fn rlimit(no_cgroups: String) -> Enforcement {
        for dir in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
            let p = Path::new(dir).join("prlimit");
            if p.exists() {
                return Enforcement::Rlimit {
                    prlimit: p,
                    no_cgroups,
                };
            }
        }
        Enforcement::None
    }

    /// A one-line description for logs and the agent's registration.
    pub fn describe(&self) -> String {
        match self {
            Enforcement::Cgroup { cgroups } => cgroups.describe(),
            Enforcement::Rlimit { no_cgroups, .. } => format!(
                "rlimit: memory as RLIMIT_DATA; cpu not enforced (no control groups: {no_cgroups})"
            ),
            Enforcement::None => "none: resources steer placement only".into(),
        }
    }
}

/// The exit code reported for a task that ended without leaving its code:
/// its wrapper was killed by SIGKILL from outside while the agent was not
/// its parent.
pub const UNKNOWN_EXIT: i32 = -1;

/// The file in the sandbox where the wrapper leaves the exit code.
pub const EXIT_FILE: &str = "exit";

/// How often an adopted task (not this agent's child) is checked.
const ADOPTED_POLL: Duration = Duration::from_millis(100);

/// The wrapper: its arguments are the command. The exit file is written
/// in place, without a rename (which would cost one more process per
/// task): it is only read once the wrapper is gone, and a wrapper killed
/// while writing it leaves a file that does not parse, read as no code.
/// The command runs in a subshell that `exec`s it, with the wrapper's stderr
/// moved aside, so the shell's own messages ("Terminated") never land in
/// the task's stderr file. The trap handlers make the wrapper outlive the
/// signals a kill sends to the whole group.
const WRAPPER: &str = r#"trap : HUP INT QUIT ALRM TERM USR1 USR2
if [ -n "$DPRIM_CGROUP_PROCS" ]; then
  IFS=:; for f in $DPRIM_CGROUP_PROCS; do echo $$ > "$f" || exit 125; done; unset IFS
fi
unset DPRIM_CGROUP_PROCS
exec 3>&2 2>/dev/null
(exec "$@" 2>&3 3>&-)
code=$?
printf '%s\n' "$code" > exit
exit "$code"
"#;

/// A started (or adopted) task process.
#[derive(Debug)]
pub struct TaskProcess {
    /// The wrapper, when this agent started it; `None` once adopted.
    child: Option<Child>,
    pgid: Pid,
    start_time: Option<u64>,
    sandbox: PathBuf,
    /// `kill` escalated to SIGKILL: an adopted task that then ends without
    /// an exit file ended by it (137).
    sent_sigkill: bool,
    /// The launch's control group, removed once the task has ended.
    cgroup: Option<TaskCgroup>,
}

/// What [`TaskProcess::adopt`] found.
#[derive(Debug)]
pub enum Adoption {
    /// The task still runs; watch it with [`TaskProcess::wait`].
    Running(Box<TaskProcess>),
    /// The task has ended: its exit code from the sandbox's exit file, or
    /// `None` if it left none (see [`UNKNOWN_EXIT`]).
    Ended(Option<i32>),
}

/// The exit code dprim reports: the process's own code, or 128 + N when
/// signal N ended it (the shell convention).
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => -1,
    }
}

/// The exit code the wrapper left in `sandbox`, if any.
pub fn recorded_exit(sandbox: &Path) -> Option<i32> {
    std::fs::read_to_string(sandbox.join(EXIT_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What `/proc/<pid>/stat` says about a process.
struct ProcStat {
    state: char,
    pgrp: i32,
    /// Clock ticks after boot when it started: with the pid, its identity.
    start_time: u64,
}

fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may itself hold
    // spaces and parentheses; the fields after the last `)` are plain.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// The start time of process `pid` (clock ticks after boot), where `/proc`
/// tells it.
pub(crate) fn start_time_of(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|s| s.start_time)
}

/// Whether process `pid` still runs and, if `start_time` is given, is the
/// process that started then (not a later one that reused the pid).
pub(crate) fn is_same_process(pid: i32, start_time: Option<u64>) -> bool {
    if pid <= 0 {
        return false;
    }
    match proc_stat(pid) {
        Some(stat) if matches!(stat.state, 'Z' | 'X' | 'x') => false,
        Some(stat) => start_time.is_none_or(|t| t == stat.start_time),
        None if Path::new("/proc/self/stat").exists() => false,
        None => nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok(),
    }
}

/// Whether the process group led by `pgid` is still the task started in
/// `sandbox` (at `start_time`, when known) and still running.
fn still_running(pgid: Pid, start_time: Option<u64>, sandbox: &Path) -> bool {
    if killpg(pgid, None).is_err() {
        return false;
    }
    let pid = pgid.as_raw();
    match proc_stat(pid) {
        // A zombie has ended; only its parent's wait is missing.
        Some(stat) if matches!(stat.state, 'Z' | 'X' | 'x') || stat.pgrp != pid => false,
        Some(stat) => match start_time {
            Some(t) => stat.start_time == t,
            // Recorded before its start time was: the wrapper's working
            // directory is the sandbox, which no unrelated process has.
            None => match (
                std::fs::read_link(format!("/proc/{pid}/cwd")),
                sandbox.canonicalize(),
            ) {
                (Ok(cwd), Ok(sandbox)) => cwd == sandbox,
                _ => false,
            },
        },
        // Gone, or no /proc on this system: the group answering is all
        // there is to go by.
        None => !Path::new("/proc/self/stat").exists(),
    }
}

/// The longest a kill waits for a task's start to pass the moments where
/// SIGTERM would be lost (see [`term_would_be_lost`]).
const START_SETTLE: Duration = Duration::from_millis(200);

/// Waits, briefly, until a SIGTERM to the group of wrapper `leader` would
/// reach the task's command.
async fn until_term_reaches_the_command(leader: i32) {
    let deadline = tokio::time::Instant::now() + START_SETTLE;
    while term_would_be_lost(leader) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Whether the wrapper `leader` is at a moment of its start where SIGTERM
/// would not reach the task's command:
/// - it has not set its trap yet: the signal would end it before it starts
///   the command, but it may set the trap between this look and the
///   signal, and then swallow it (the trap lets it outlive the command
///   and record its exit);
/// - it has set the trap but not yet started the command (no child);
/// - a child is between fork and exec: still the shell, still running the
///   inherited trap.
///
/// Once the command runs it gets the signal. A leader that is gone (or a
/// zombie) has nothing left to lose.
fn term_would_be_lost(leader: i32) -> bool {
    if !is_same_process(leader, None) {
        return false;
    }
    if !catches_term(leader) {
        return true;
    }
    let Ok(children) = std::fs::read_to_string(format!("/proc/{leader}/task/{leader}/children"))
    else {
        // No way to look (a kernel without the children file): send.
        return false;
    };
    let mut children = children.split_whitespace().peekable();
    if children.peek().is_none() {
        // Nothing started yet, or the command has ended and the wrapper is
        // recording its exit: either way a moment only.
        return true;
    }
    let shell = std::fs::read_link(format!("/proc/{leader}/exe")).ok();
    children.any(|pid| {
        pid.parse().is_ok_and(catches_term)
            && std::fs::read_link(format!("/proc/{pid}/exe")).ok() == shell
    })
}

/// Whether process `pid` has a handler for SIGTERM (`SigCgt` in
/// `/proc/<pid>/status`, a hex mask with bit N-1 for signal N).
fn catches_term(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << (Signal::SIGTERM as i32 - 1)) != 0)
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The program `spec.command` names, as an absolute path (relative paths
/// are taken from the sandbox, bare names looked up in the task's PATH),
/// the way `execvp` would find it. Resolved here so a command that cannot
/// run fails the launch instead of becoming the wrapper's exit code 127,
/// and so the wrapper runs exactly that file, never a shell builtin.
fn resolve_command(spec: &TaskSpec, sandbox: &Path) -> Result<PathBuf> {
    let command = Path::new(&spec.command);
    if spec.command.contains('/') {
        let path = if command.is_absolute() {
            command.to_path_buf()
        } else {
            sandbox.join(command)
        };
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(Error::invalid(format!(
                "cannot start `{}`: no executable file at {}",
                spec.command,
                path.display()
            )))
        };
    }
    let search = spec
        .env
        .get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in search.split(':') {
        // An empty entry is the working directory, as for the shell.
        let dir = if dir.is_empty() { "." } else { dir };
        let path = sandbox.join(dir).join(command);
        if is_executable(&path) {
            return Ok(path);
        }
    }
    Err(Error::invalid(format!(
        "cannot start `{}`: not found in PATH ({search})",
        spec.command
    )))
}

/// A launch's group name from its sandbox `<work_dir>/<task>/<launch>`:
/// `<task>-<launch>`.
pub(crate) fn cgroup_name(sandbox: &Path) -> String {
    let mut parts = sandbox
        .iter()
        .rev()
        .take(2)
        .map(|p| p.to_string_lossy().into_owned());
    let launch = parts.next().unwrap_or_default();
    let task = parts.next().unwrap_or_default();
    format!("{task}-{launch}")
}

impl TaskProcess {
    /// Starts `spec` with `sandbox` as its working directory (created if
    /// needed), stdout in `sandbox/stdout`, stderr in `sandbox/stderr`, its
    /// process (group) id in `sandbox/pid` and, once it ends, its exit code
    /// in `sandbox/exit`.
    ///
    /// # Behavior
    /// A command that cannot be started (not found, not executable) is an
    /// `InvalidArgument` error naming it; nothing keeps running.
    pub fn spawn(
        spec: &TaskSpec,
        sandbox: &Path,
        enforcement: &Enforcement,
    ) -> Result<TaskProcess> {
        spec.validate()?;
        let io = |e: std::io::Error, what: &str| {
            Error::new(
                ErrorKind::Unavailable,
                format!("{what} in sandbox `{}`: {e}", sandbox.display()),
            )
        };
        std::fs::create_dir_all(sandbox).map_err(|e| io(e, "cannot create the sandbox"))?;
        // A sandbox is per launch; an exit file already there is not this
        // run's and must not be mistaken for it.
        for stale in [EXIT_FILE] {
            match std::fs::remove_file(sandbox.join(stale)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e, "cannot remove an old exit file")),
            }
        }
        let program = resolve_command(spec, sandbox)?;
        let stdout = std::fs::File::create(sandbox.join("stdout"))
            .map_err(|e| io(e, "cannot create stdout"))?;
        let stderr = std::fs::File::create(sandbox.join("stderr"))
            .map_err(|e| io(e, "cannot create stderr"))?;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(WRAPPER).arg("sh");
        let mut cgroup = None;
        match enforcement {
            Enforcement::Rlimit { prlimit, .. } if spec.resources.mem_bytes > 0 => {
                cmd.arg(prlimit)
                    .arg(format!("--data={}", spec.resources.mem_bytes))
                    .arg("--");
            }
            Enforcement::Cgroup { cgroups } => {
                let group = cgroups.create(&cgroup_name(sandbox), &spec.resources)?;
                let procs: Vec<String> = group
                    .procs_files()
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                // The wrapper joins before it starts the command, so
                // everything the task starts is inside.
                cmd.env("DPRIM_CGROUP_PROCS", procs.join(":"));
                cgroup = Some(group);
            }
            _ => {}
        }
        cmd.arg(&program)
            .args(&spec.args)
            .envs(&spec.env)
            .env("DPRIM_SANDBOX", sandbox)
            .current_dir(sandbox)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            // Its own process group: a kill reaches the task's children too,
            // and a Ctrl-C aimed at the agent does not reach the task.
            .process_group(0)
            // It must outlive the agent, to be adopted by the next one.
            .kill_on_drop(false);
        let child = cmd.spawn().map_err(|e| {
            if let Some(group) = &cgroup {
                group.remove();
            }
            Error::invalid(format!(
                "cannot start `{}` (through /bin/sh): {e}",
                spec.command
            ))
        })?;
        let pid = child
            .id()
            .ok_or_else(|| Error::unexpected("the started process has no pid"))?;
        // The pid (which is also the process group id) is kept in the
        // sandbox for operators.
        let _ = std::fs::write(sandbox.join("pid"), format!("{pid}\n"));
        Ok(TaskProcess {
            child: Some(child),
            pgid: Pid::from_raw(pid as i32),
            start_time: start_time_of(pid as i32),
            sandbox: sandbox.to_path_buf(),
            sent_sigkill: false,
            cgroup,
        })
    }

    /// Takes back a task started earlier (by an agent that has since died)
    /// as process group `pid`, started at `start_time` (from
    /// [`TaskProcess::start_time`]; `None` if it was never learned, then the
    /// process must have `sandbox` as its working directory).
    ///
    /// # Behavior
    /// A process that no longer runs, or is not the one started (the pid
    /// was reused), is not touched: the result is [`Adoption::Ended`] with
    /// the code from the sandbox's exit file, if any.
    pub fn adopt(pid: i32, start_time: Option<u64>, sandbox: &Path) -> Adoption {
        let pgid = Pid::from_raw(pid);
        if pid > 1 && still_running(pgid, start_time, sandbox) {
            Adoption::Running(Box::new(TaskProcess {
                child: None,
                pgid,
                start_time: start_time.or_else(|| start_time_of(pid)),
                sandbox: sandbox.to_path_buf(),
                sent_sigkill: false,
                // Set by the agent (`in_group`) if it uses control groups.
                cgroup: None,
            }))
        } else {
            Adoption::Ended(recorded_exit(sandbox))
        }
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> i32 {
        self.pgid.as_raw()
    }

    /// When the process started (clock ticks after boot), where the system
    /// tells it: with the pid, what identifies it for [`TaskProcess::adopt`].
    pub fn start_time(&self) -> Option<u64> {
        self.start_time
    }

    /// The sandbox directory.
    pub fn sandbox(&self) -> &Path {
        &self.sandbox
    }

    fn running(&self) -> bool {
        still_running(self.pgid, self.start_time, &self.sandbox)
    }

    /// The code of an adopted task that has ended.
    fn adopted_exit(&self) -> i32 {
        match recorded_exit(&self.sandbox) {
            Some(code) => code,
            None if self.sent_sigkill => 128 + Signal::SIGKILL as i32,
            None => {
                tracing::warn!(
                    pid = self.pid(),
                    sandbox = %self.sandbox.display(),
                    "an adopted task ended without leaving its exit code (killed by SIGKILL from outside?)"
                );
                UNKNOWN_EXIT
            }
        }
    }

    /// A taken-back task's control group (made by the agent that started
    /// it), removed once the task has ended.
    pub fn in_group(mut self, enforcement: &Enforcement) -> TaskProcess {
        if let Enforcement::Cgroup { cgroups } = enforcement {
            self.cgroup = Some(cgroups.existing(&cgroup_name(&self.sandbox)));
        }
        self
    }

    /// Waits for the process to end; returns its exit code.
    ///
    /// # Behavior
    /// For an adopted task (not this agent's child) the group is checked
    /// every 100 ms and the code read from the sandbox's exit file.
    pub async fn wait(&mut self) -> Result<i32> {
        let Some(child) = self.child.as_mut() else {
            while self.running() {
                tokio::time::sleep(ADOPTED_POLL).await;
            }
            if let Some(group) = self.cgroup.take() {
                group.remove();
            }
            return Ok(self.adopted_exit());
        };
        let status = child.wait().await.map_err(|e| {
            Error::unexpected(format!(
                "waiting for task process {}: {e}",
                self.pgid.as_raw()
            ))
        })?;
        if let Some(group) = self.cgroup.take() {
            if group.oom_kills() > 0 {
                tracing::warn!(sandbox = %self.sandbox.display(), "the task went over its memory limit; the kernel stopped it");
            }
            // Whatever the task started is gone with its group's leader
            // only if it stayed in the group; make sure before removing.
            let _ = killpg(self.pgid, Signal::SIGKILL);
            group.remove();
        }
        Ok(exit_code(status))
    }

    /// Sends SIGTERM to the process group, then SIGKILL if the process has
    /// not ended after `grace`; returns the exit code.
    pub async fn kill(&mut self, grace: Duration) -> Result<i32> {
        if self.child.is_none() && !self.running() {
            return self.wait().await;
        }
        until_term_reaches_the_command(self.pgid.as_raw()).await;
        // ESRCH: already gone, which is what we want.
        let _ = killpg(self.pgid, Signal::SIGTERM);
        let ended = tokio::time::timeout(grace, self.wait()).await;
        if ended.is_err() {
            self.sent_sigkill = true;
        }
        // Either the grace period passed, or the leader is gone and
        // nothing it started may linger.
        let _ = killpg(self.pgid, Signal::SIGKILL);
        match ended {
            Ok(code) => code,
            Err(_) => self.wait().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: &str, args: &[&str]) -> TaskSpec {
        TaskSpec {
            command: command.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..TaskSpec::default()
        }
    }

    impl TaskProcess {
        fn spawn_plain(spec: &TaskSpec, sandbox: &Path) -> Result<TaskProcess> {
            TaskProcess::spawn(spec, sandbox, &Enforcement::None)
        }
    }

    fn sandbox(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("dprim-sandbox-{}-{name}", std::process::id()))
    }

    #[tokio::test]
    async fn a_kill_right_after_the_start_ends_the_task_with_sigterm() {
        // The agent listens for SIGTERM itself (to shut down gracefully).
        let _listening =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        // Killed at every moment of its start: before the wrapper has set
        // its traps, while it starts the command, once the command runs.
        for i in 0..80 {
            let dir = sandbox(&format!("early-kill-{i}"));
            let mut p = TaskProcess::spawn_plain(&spec("sleep", &["30"]), &dir).unwrap();
            let started = std::time::Instant::now();
            std::thread::sleep(Duration::from_micros(25 * i));
            let code = p.kill(Duration::from_secs(3)).await.unwrap();
            assert_eq!(code, 128 + 15, "round {i}: ended by SIGTERM, not SIGKILL");
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "round {i}: waited for the grace period"
            );
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    #[tokio::test]
    async fn exit_code_and_output_files() {
        let dir = sandbox("exit");
        let mut p =
            TaskProcess::spawn_plain(&spec("sh", &["-c", "echo out; echo err >&2; exit 3"]), &dir)
                .unwrap();
        assert_eq!(p.wait().await.unwrap(), 3);
        assert_eq!(
            std::fs::read_to_string(dir.join("stdout")).unwrap(),
            "out\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("stderr")).unwrap(),
            "err\n"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn kill_terminates_the_whole_group_and_escalates() {
        let dir = sandbox("kill");
        // A child that ignores SIGTERM and starts a grandchild in its group.
        let script = "trap '' TERM; sleep 30 & echo $! > grandchild; wait";
        let mut p = TaskProcess::spawn_plain(&spec("sh", &["-c", script]), &dir).unwrap();
        let grandchild_file = dir.join("grandchild");
        for _ in 0..100 {
            if std::fs::read_to_string(&grandchild_file).is_ok_and(|s| !s.trim().is_empty()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let grandchild: i32 = std::fs::read_to_string(&grandchild_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let code = p.kill(Duration::from_millis(300)).await.unwrap();
        assert_eq!(code, 128 + 9, "SIGKILL after the grace period");
        // The grandchild got the group's signal too (it may linger as a
        // zombie of init for a moment; kill(pid, 0) fails once it is reaped).
        let mut gone = false;
        for _ in 0..100 {
            if nix::sys::signal::kill(Pid::from_raw(grandchild), None).is_err() {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone, "grandchild {grandchild} survived the kill");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn sigterm_is_enough_for_a_cooperative_task() {
        let dir = sandbox("term");
        let mut p =
            TaskProcess::spawn_plain(&spec("sh", &["-c", "touch started; exec sleep 30"]), &dir)
                .unwrap();
        // A SIGTERM that beats the wrapper's trap is not what this checks.
        wait_for_file(&dir.join("started")).await;
        assert_eq!(p.kill(Duration::from_secs(10)).await.unwrap(), 128 + 15);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn memory_limit_is_enforced_with_rlimit() {
        let enforcement = Enforcement::rlimit(String::new());
        let Enforcement::Rlimit { .. } = enforcement else {
            return; // no prlimit on this machine: nothing to enforce with
        };
        let dir = sandbox("rlimit");
        let grab = "x = bytearray(300 * 1024 * 1024)";
        let mut small = spec("python3", &["-c", grab]);
        small.resources.mem_bytes = 64 << 20;
        let mut p = TaskProcess::spawn(&small, &dir, &enforcement).unwrap();
        assert_ne!(
            p.wait().await.unwrap(),
            0,
            "a 300 MiB allocation fit in 64 MiB"
        );
        let mut big = spec("python3", &["-c", grab]);
        big.resources.mem_bytes = 2 << 30;
        let mut p = TaskProcess::spawn(&big, &dir, &enforcement).unwrap();
        assert_eq!(p.wait().await.unwrap(), 0);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn limits_are_enforced_with_control_groups_where_they_can_be_made() {
        let agent = format!("ptest-{}", std::process::id());
        let enforcement = Enforcement::detect(&agent);
        let Enforcement::Cgroup { cgroups } = &enforcement else {
            eprintln!("no control groups here: {}", enforcement.describe());
            return;
        };
        let root = sandbox("cgroup");
        // Within its limit; it runs inside its own group.
        let dir = root.join("t1").join("1");
        let mut fits = spec("cat", &["/proc/self/cgroup"]);
        fits.resources.mem_bytes = 64 << 20;
        fits.resources.cpus = 0.5;
        let mut p = TaskProcess::spawn(&fits, &dir, &enforcement).unwrap();
        assert_eq!(p.wait().await.unwrap(), 0);
        let groups = std::fs::read_to_string(dir.join("stdout")).unwrap();
        assert!(
            groups.contains(&format!("dprim-{agent}/t1-1")),
            "the task ran outside its group: {groups}"
        );
        // Over it: dd allocates its whole 256 MiB block.
        let dir = root.join("t2").join("1");
        let mut over = spec(
            "dd",
            &["if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"],
        );
        over.resources.mem_bytes = 32 << 20;
        let mut p = TaskProcess::spawn(&over, &dir, &enforcement).unwrap();
        assert_eq!(p.wait().await.unwrap(), 128 + 9, "stopped by the kernel");
        // Taken back by a restarted agent (not its child any more): its
        // group goes when it ends, too.
        let dir = root.join("t3").join("1");
        let p = TaskProcess::spawn(&spec("sleep", &["30"]), &dir, &enforcement).unwrap();
        let (pid, start_time) = (p.pid(), p.start_time());
        drop(p);
        let Adoption::Running(adopted) = TaskProcess::adopt(pid, start_time, &dir) else {
            panic!("the task is still running");
        };
        let mut adopted = adopted.in_group(&enforcement);
        adopted.kill(Duration::from_secs(5)).await.unwrap();
        // Every group is gone with its task.
        let base = match cgroups.hierarchy() {
            super::super::cgroup::Hierarchy::V2 { base, .. } => base.clone(),
            super::super::cgroup::Hierarchy::V1 { memory, .. } => memory.clone(),
        };
        for name in ["t1-1", "t2-1", "t3-1"] {
            assert!(!base.join(name).exists(), "group {name} left behind");
        }
        let _ = std::fs::remove_dir(&base);
        if let super::super::cgroup::Hierarchy::V1 { cpu: Some(cpu), .. } = cgroups.hierarchy() {
            let _ = std::fs::remove_dir(cpu);
        }
        let _ = std::fs::remove_dir_all(root);
    }

    /// Waits until `path` exists (the task got that far).
    async fn wait_for_file(path: &Path) {
        for _ in 0..250 {
            if path.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{} never appeared", path.display());
    }

    #[tokio::test]
    async fn the_wrapper_records_the_exit_code_and_keeps_stderr_clean() {
        let dir = sandbox("exit-file");
        let mut p = TaskProcess::spawn_plain(&spec("sh", &["-c", "exit 7"]), &dir).unwrap();
        assert_eq!(p.wait().await.unwrap(), 7);
        assert_eq!(recorded_exit(&dir), Some(7));
        // Killed by SIGTERM: 128 + 15 both as the wrapper's status and in
        // the file, and no shell message ("Terminated") in the task's stderr.
        // (The command running means the wrapper has set its traps.)
        let mut p =
            TaskProcess::spawn_plain(&spec("sh", &["-c", "touch started; exec sleep 30"]), &dir)
                .unwrap();
        assert_eq!(
            recorded_exit(&dir),
            None,
            "a new launch clears the old file"
        );
        wait_for_file(&dir.join("started")).await;
        assert_eq!(p.kill(Duration::from_secs(10)).await.unwrap(), 143);
        assert_eq!(recorded_exit(&dir), Some(143));
        assert_eq!(std::fs::read_to_string(dir.join("stderr")).unwrap(), "");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn the_command_runs_as_itself_with_default_signals() {
        let dir = sandbox("argv");
        // A builtin name still runs the program found in PATH, with its
        // arguments untouched, and SIGTERM at its default (not inherited
        // from the wrapper's trap): `kill -TERM $$` ends it with 143.
        let script = "printf '%s|' \"$@\" > args; kill -TERM $$; sleep 5";
        let mut p =
            TaskProcess::spawn_plain(&spec("sh", &["-c", script, "x", "a b", "", "*"]), &dir)
                .unwrap();
        assert_eq!(p.wait().await.unwrap(), 143);
        assert_eq!(
            std::fs::read_to_string(dir.join("args")).unwrap(),
            "a b||*|"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn an_adopted_task_is_watched_until_it_ends() {
        let dir = sandbox("adopt");
        let script = "touch started; while [ ! -e go ]; do sleep 0.05; done; exit 5";
        let first = TaskProcess::spawn_plain(&spec("sh", &["-c", script]), &dir).unwrap();
        let (pid, start) = (first.pid(), first.start_time());
        assert!(start.is_some(), "/proc gives the start time");
        // The agent that started it goes away without waiting.
        drop(first);
        wait_for_file(&dir.join("started")).await;
        // A different start time is a different process: not adopted.
        assert!(matches!(
            TaskProcess::adopt(pid, start.map(|t| t + 1), &dir),
            Adoption::Ended(None)
        ));
        let Adoption::Running(mut adopted) = TaskProcess::adopt(pid, start, &dir) else {
            panic!("the task runs and should be adopted");
        };
        // Recorded before its start time was known: the sandbox identifies it.
        assert!(matches!(
            TaskProcess::adopt(pid, None, &dir),
            Adoption::Running(_)
        ));
        assert!(matches!(
            TaskProcess::adopt(pid, None, &std::env::temp_dir()),
            Adoption::Ended(_)
        ));
        std::fs::write(dir.join("go"), "").unwrap();
        let code = tokio::time::timeout(Duration::from_secs(10), adopted.wait())
            .await
            .expect("an adopted task's end is noticed")
            .unwrap();
        assert_eq!(code, 5);
        // Ended while nobody watched: the code comes from the exit file.
        assert!(matches!(
            TaskProcess::adopt(pid, start, &dir),
            Adoption::Ended(Some(5))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn an_adopted_task_can_be_killed_with_escalation() {
        let dir = sandbox("adopt-kill");
        let cooperative = spec("sh", &["-c", "touch started; exec sleep 30"]);
        let first = TaskProcess::spawn_plain(&cooperative, &dir).unwrap();
        let (pid, start) = (first.pid(), first.start_time());
        drop(first);
        wait_for_file(&dir.join("started")).await;
        std::fs::remove_file(dir.join("started")).unwrap();
        let Adoption::Running(mut adopted) = TaskProcess::adopt(pid, start, &dir) else {
            panic!("not adopted");
        };
        assert_eq!(adopted.kill(Duration::from_secs(10)).await.unwrap(), 143);

        // Ignores SIGTERM: SIGKILL after the grace period, which also ends
        // the wrapper before it can write the exit file; the agent knows it
        // sent SIGKILL.
        let stubborn = "trap '' TERM; touch started; while :; do sleep 0.05; done";
        let first = TaskProcess::spawn_plain(&spec("sh", &["-c", stubborn]), &dir).unwrap();
        let (pid, start) = (first.pid(), first.start_time());
        drop(first);
        wait_for_file(&dir.join("started")).await;
        let Adoption::Running(mut adopted) = TaskProcess::adopt(pid, start, &dir) else {
            panic!("not adopted");
        };
        assert_eq!(
            adopted.kill(Duration::from_millis(300)).await.unwrap(),
            128 + 9
        );
        assert_eq!(recorded_exit(&dir), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn proc_stat_reads_fields_after_a_tricky_name() {
        let me = std::process::id() as i32;
        let stat = proc_stat(me).unwrap();
        assert!(!matches!(stat.state, 'Z' | 'X'), "{}", stat.state);
        assert!(stat.start_time > 0);
        assert!(proc_stat(i32::MAX).is_none());
    }

    #[test]
    fn unknown_command_is_a_clear_error() {
        let dir = sandbox("missing");
        let e = TaskProcess::spawn_plain(&spec("/nonexistent/cmd", &[]), &dir).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("/nonexistent/cmd"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
