//! Running one task as a child process on an agent: its own process group
//! (so a kill reaches everything it started), its own sandbox directory,
//! stdout and stderr kept in files there, and a kill that sends SIGTERM to
//! the group and SIGKILL after a grace period.

use dprim::tasks::TaskSpec;
use dprim::{Error, ErrorKind, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};

/// How an agent holds tasks to the resources they asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Memory as a data-segment rlimit (RLIMIT_DATA, which covers the heap
    /// and private anonymous mappings), applied through util-linux
    /// `prlimit`; CPU shares are not enforced.
    Rlimit {
        /// Path of the `prlimit` program.
        prlimit: PathBuf,
    },
    /// Nothing is enforced; resources only steer placement.
    None,
}

impl Enforcement {
    /// What this machine allows. cgroup v2 (memory.max / cpu.max) is not
    /// used yet; with `prlimit` available memory is limited by rlimit.
    pub fn detect() -> Enforcement {
        for dir in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
            let p = Path::new(dir).join("prlimit");
            if p.exists() {
                return Enforcement::Rlimit { prlimit: p };
            }
        }
        Enforcement::None
    }

    /// A one-line description for logs and the agent's registration.
    pub fn describe(&self) -> String {
        match self {
            Enforcement::Rlimit { .. } => "rlimit: memory as RLIMIT_DATA; cpu not enforced".into(),
            Enforcement::None => "none: resources steer placement only".into(),
        }
    }
}

/// A started task process.
#[derive(Debug)]
pub struct TaskProcess {
    child: Child,
    pgid: Pid,
    sandbox: PathBuf,
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

impl TaskProcess {
    /// Starts `spec` with `sandbox` as its working directory (created if
    /// needed), stdout in `sandbox/stdout`, stderr in `sandbox/stderr` and
    /// its process (group) id in `sandbox/pid`.
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
        let stdout = std::fs::File::create(sandbox.join("stdout"))
            .map_err(|e| io(e, "cannot create stdout"))?;
        let stderr = std::fs::File::create(sandbox.join("stderr"))
            .map_err(|e| io(e, "cannot create stderr"))?;
        let mut cmd = match enforcement {
            Enforcement::Rlimit { prlimit } if spec.resources.mem_bytes > 0 => {
                let mut c = Command::new(prlimit);
                c.arg(format!("--data={}", spec.resources.mem_bytes))
                    .arg("--")
                    .arg(&spec.command);
                c
            }
            _ => Command::new(&spec.command),
        };
        cmd.args(&spec.args)
            .envs(&spec.env)
            .env("DPRIM_SANDBOX", sandbox)
            .current_dir(sandbox)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            // Its own process group: a kill reaches the task's children too,
            // and a Ctrl-C aimed at the agent does not reach the task.
            .process_group(0)
            .kill_on_drop(false);
        let child = cmd
            .spawn()
            .map_err(|e| Error::invalid(format!("cannot start `{}`: {e}", spec.command)))?;
        let pid = child
            .id()
            .ok_or_else(|| Error::unexpected("the started process has no pid"))?;
        // The pid (which is also the process group id) is kept in the
        // sandbox for operators, and so an agent restarted on the same work
        // dir can find what still runs.
        let _ = std::fs::write(sandbox.join("pid"), format!("{pid}\n"));
        Ok(TaskProcess {
            child,
            pgid: Pid::from_raw(pid as i32),
            sandbox: sandbox.to_path_buf(),
        })
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> i32 {
        self.pgid.as_raw()
    }

    /// The sandbox directory.
    pub fn sandbox(&self) -> &Path {
        &self.sandbox
    }

    /// Waits for the process to end; returns its exit code.
    pub async fn wait(&mut self) -> Result<i32> {
        let status = self.child.wait().await.map_err(|e| {
            Error::unexpected(format!("waiting for task process {}: {e}", self.pid()))
        })?;
        Ok(exit_code(status))
    }

    /// Sends SIGTERM to the process group, then SIGKILL if the process has
    /// not ended after `grace`; returns the exit code.
    pub async fn kill(&mut self, grace: Duration) -> Result<i32> {
        // ESRCH: already gone, which is what we want.
        let _ = killpg(self.pgid, Signal::SIGTERM);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => {
                // The leader is gone; make sure nothing it started lingers.
                let _ = killpg(self.pgid, Signal::SIGKILL);
                status
                    .map(exit_code)
                    .map_err(|e| Error::unexpected(e.to_string()))
            }
            Err(_) => {
                let _ = killpg(self.pgid, Signal::SIGKILL);
                self.wait().await
            }
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
        let mut p = TaskProcess::spawn_plain(&spec("sleep", &["30"]), &dir).unwrap();
        assert_eq!(p.kill(Duration::from_secs(10)).await.unwrap(), 128 + 15);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn memory_limit_is_enforced_with_rlimit() {
        let Enforcement::Rlimit { .. } = Enforcement::detect() else {
            return; // no prlimit on this machine: nothing to enforce with
        };
        let dir = sandbox("rlimit");
        let grab = "x = bytearray(300 * 1024 * 1024)";
        let mut small = spec("python3", &["-c", grab]);
        small.resources.mem_bytes = 64 << 20;
        let mut p = TaskProcess::spawn(&small, &dir, &Enforcement::detect()).unwrap();
        assert_ne!(
            p.wait().await.unwrap(),
            0,
            "a 300 MiB allocation fit in 64 MiB"
        );
        let mut big = spec("python3", &["-c", grab]);
        big.resources.mem_bytes = 2 << 30;
        let mut p = TaskProcess::spawn(&big, &dir, &Enforcement::detect()).unwrap();
        assert_eq!(p.wait().await.unwrap(), 0);
        let _ = std::fs::remove_dir_all(dir);
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
