//! A task's output read back through the backend (`TasksClient::logs` and
//! `dprim task logs`): in process on the in-memory backend (a supervisor and
//! an agent running real child processes), the command line's error paths,
//! and the command line across processes on the real backends named in
//! DPRIM_TEST_BACKENDS (e.g. `etcd,zookeeper,nats`; `scripts/test.sh` sets
//! it after starting the servers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dprim::tasks::{Constraint, Resources, RestartPolicy, TaskSpec, TaskState, TaskStatus};
use dprim::{Backend, BackendConfig, ErrorKind, Key, PutOptions, TaskId, Tasks, Value};
use dprim_memory::MemoryServer;
use dprim_runtime::tasks::agent::{Agent, AgentConfig, DEFAULT_SANDBOX_RETENTION};
use dprim_runtime::tasks::client::TasksClient;
use dprim_runtime::tasks::logs::{LogStream, CHUNK_BYTES};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use support::{code, dprim};

fn sh(script: &str) -> TaskSpec {
    support::shell(script, 0.1)
}

fn temp_dir(name: &str) -> PathBuf {
    support::temp_dir("logs", name)
}

/// A supervisor and agent `a1` on a fresh in-memory backend, in this
/// process.
struct Local {
    backend: Backend,
    client: TasksClient,
    work: PathBuf,
    stop: watch::Sender<bool>,
}

impl Local {
    fn start(name: &str) -> Local {
        Local::start_retaining(name, DEFAULT_SANDBOX_RETENTION)
    }

    /// As `start`, with an agent that deletes an ended launch's sandbox
    /// after `sandbox_retention`.
    fn start_retaining(name: &str, sandbox_retention: Duration) -> Local {
        let backend = MemoryServer::new()
            .connect(&BackendConfig::memory())
            .unwrap();
        let (stop, _) = watch::channel(false);
        let supervisor = support::supervisor(&backend, Duration::from_secs(2));
        tokio::spawn(supervisor.run(support::stopped(&stop)));
        let work = temp_dir(name);
        let config = AgentConfig {
            sandbox_retention,
            ..support::agent_config(
                work.clone(),
                Duration::from_secs(2),
                [("zone".to_string(), "z1".to_string())].into(),
            )
        };
        let agent = Agent::new(backend.clone(), config);
        tokio::spawn(agent.run(support::stopped(&stop)));
        Local {
            client: TasksClient::new(backend.clone()),
            backend,
            work,
            stop,
        }
    }

    async fn wait_for(&self, id: &TaskId, want: TaskState) -> TaskStatus {
        support::wait_for(&self.client, id, want).await
    }

    async fn output(&self, id: &TaskId, stream: LogStream, launch: Option<u32>) -> Vec<u8> {
        let mut logs = self.client.logs(id, stream, launch).await.unwrap();
        logs.read_to_end(0).await.unwrap()
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_launch_output_is_deleted_after_the_sandbox_retention() {
    let retention = Duration::from_millis(300);
    let c = Local::start_retaining("retention", retention);
    let ended = c.client.launch(sh("echo bye")).await.unwrap();
    let running = c.client.launch(sh("echo hi; exec sleep 30")).await.unwrap();
    c.wait_for(&ended, TaskState::Finished).await;
    c.wait_for(&running, TaskState::Running).await;
    // The sandbox goes, and the task's directory with its last sandbox.
    let task_dir = c.work.join(&ended.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while task_dir.exists() {
        assert!(
            Instant::now() < deadline,
            "{} outlived its retention",
            task_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let read = async {
        let mut logs = c.client.logs(&ended, LogStream::Stdout, None).await?;
        logs.read_to_end(0).await
    }
    .await;
    assert_eq!(read.unwrap_err().kind(), ErrorKind::NotFound);
    // A running launch keeps its sandbox, however long it runs.
    tokio::time::sleep(retention * 3).await;
    assert_eq!(c.output(&running, LogStream::Stdout, None).await, b"hi\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_and_stderr_of_a_launch_come_back() {
    let c = Local::start("both");
    let id = c
        .client
        .launch(sh("printf 'line 1\\nline 2\\n'; echo oops >&2; exit 3"))
        .await
        .unwrap();
    c.wait_for(&id, TaskState::Failed).await;
    assert_eq!(
        c.output(&id, LogStream::Stdout, None).await,
        b"line 1\nline 2\n"
    );
    assert_eq!(c.output(&id, LogStream::Stderr, None).await, b"oops\n");
    let mut logs = c.client.logs(&id, LogStream::Stdout, None).await.unwrap();
    assert_eq!((logs.agent(), logs.launch()), ("a1", 1));
    assert_eq!(logs.size().await.unwrap(), 14);
    let tail = logs.read(7, 100).await.unwrap();
    assert_eq!((tail.offset, tail.size), (7, 14));
    assert_eq!(tail.data, b"line 2\n");
    assert!(logs.ended().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_binary_output_round_trips_exactly() {
    let c = Local::start("large");
    // More than four chunks of random bytes; the task keeps a copy to
    // compare against.
    let id = c
        .client
        .launch(sh("head -c 300000 /dev/urandom > copy; cat copy"))
        .await
        .unwrap();
    c.wait_for(&id, TaskState::Finished).await;
    let expected = std::fs::read(c.work.join(&id.0).join("1").join("copy")).unwrap();
    assert_eq!(expected.len(), 300_000);
    assert!(expected.len() > 4 * CHUNK_BYTES);
    let got = c.output(&id, LogStream::Stdout, None).await;
    assert!(got == expected, "output differs ({} bytes)", got.len());
    let mut logs = c.client.logs(&id, LogStream::Stdout, None).await.unwrap();
    let chunk = logs.read(0, usize::MAX).await.unwrap();
    assert_eq!(chunk.data.len(), CHUNK_BYTES, "a reply carries one chunk");
    assert_eq!(chunk.size, 300_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_of_a_running_task_grows_until_it_ends() {
    let c = Local::start("running");
    let id = c
        .client
        .launch(sh(
            "echo first; while [ ! -e go ]; do sleep 0.05; done; echo second",
        ))
        .await
        .unwrap();
    c.wait_for(&id, TaskState::Running).await;
    let mut logs = c.client.logs(&id, LogStream::Stdout, None).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..200 {
        seen = logs.read_to_end(0).await.unwrap();
        if !seen.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(seen, b"first\n");
    assert!(!logs.ended().await.unwrap());
    std::fs::write(c.work.join(&id.0).join("1").join("go"), b"").unwrap();
    c.wait_for(&id, TaskState::Finished).await;
    assert!(logs.ended().await.unwrap());
    assert_eq!(logs.read_to_end(6).await.unwrap(), b"second\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_launch_of_a_restarted_task_has_its_own_output() {
    let c = Local::start("launches");
    let mut spec =
        sh("if [ -e ../../flag ]; then echo second; else touch ../../flag; echo first; exit 1; fi");
    spec.restart = RestartPolicy::OnFailure;
    let id = c.client.launch(spec).await.unwrap();
    // Fails once, is relaunched after the first backoff (1 s), then finishes.
    c.wait_for(&id, TaskState::Finished).await;
    assert_eq!(c.output(&id, LogStream::Stdout, None).await, b"second\n");
    assert_eq!(c.output(&id, LogStream::Stdout, Some(2)).await, b"second\n");
    assert_eq!(c.output(&id, LogStream::Stdout, Some(1)).await, b"first\n");
    let e = c
        .client
        .logs(&id, LogStream::Stdout, Some(3))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(
        e.message()
            .contains("has no launch 3; its launches are 1 to 2"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_unplaced_and_unreachable_tasks_are_clear_errors() {
    let c = Local::start("errors");
    let e = c
        .client
        .logs(&TaskId("t-nope".into()), LogStream::Stdout, None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.message().contains("no task `t-nope`"), "{e}");

    let mut huge = sh("true");
    huge.resources.cpus = 64.0;
    let huge = c.client.launch(huge).await.unwrap();
    let e = c
        .client
        .logs(&huge, LogStream::Stdout, None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.message().contains("is not placed on an agent yet"), "{e}");

    // An agent that is registered but runs no log server (a stand-in for
    // one that is hung): the client gives up after its timeout, naming it.
    let session = c
        .backend
        .sessions()
        .open(Duration::from_secs(5))
        .await
        .unwrap();
    let ghost = serde_json::json!({
        "id": "ghost", "enforcement": "none",
        "resources": Resources { cpus: 1.0, mem_bytes: 1 << 30, disk_bytes: 0, ports: vec![] },
        "attributes": {"zone": "ghost"},
    });
    c.backend
        .kv()
        .put_with(
            &Key::new("_dprim/agents/ghost").unwrap(),
            Value::new(ghost.to_string().into_bytes()).unwrap(),
            PutOptions {
                session: Some(session.id()),
                ..PutOptions::default()
            },
        )
        .await
        .unwrap();
    let mut pinned = sh("true");
    pinned.constraints = vec![Constraint::Equals("zone".into(), "ghost".into())];
    let pinned = c.client.launch(pinned).await.unwrap();
    c.wait_for(&pinned, TaskState::Starting).await;
    let mut logs = c
        .client
        .logs(&pinned, LogStream::Stdout, None)
        .await
        .unwrap()
        .with_timeout(Duration::from_millis(200));
    let e = logs.read(0, 10).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(
        e.message()
            .contains("agent `ghost` did not answer within 200ms"),
        "{e}"
    );
    assert!(e.message().contains("is it running?"), "{e}");

    // Once it is gone, it is named as not registered, without waiting.
    session.close().await.unwrap();
    let e = c
        .client
        .logs(&pinned, LogStream::Stdout, None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(e.message().contains("agent `ghost`"), "{e}");
    assert!(e.message().contains("is not registered"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_answers_only_for_launches_it_has() {
    let c = Local::start("missing");
    let id = c.client.launch(sh("echo hi")).await.unwrap();
    c.wait_for(&id, TaskState::Finished).await;
    // The sandbox is gone (cleaned up by an operator): the agent says so.
    std::fs::remove_dir_all(c.work.join(&id.0)).unwrap();
    let mut logs = c.client.logs(&id, LogStream::Stdout, None).await.unwrap();
    let e = logs.read(0, 10).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(
        e.message()
            .contains(&format!("agent `a1` has no launch 1 of task `{id}`")),
        "{e}"
    );
}

// ---- the command line ----

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn cli_errors_without_a_cluster() {
    let o = dprim().args(["task", "logs", "t-nope"]).output().unwrap();
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains("error: no task `t-nope`"), "{err}");
    assert!(err.contains("in-memory backend"), "{err}");
    assert!(o.stdout.is_empty());

    for (args, needle) in [
        (&["task", "logs", "t1", "--launch", "0"][..], "--launch"),
        (&["task", "logs", "t1", "--tail", "lots"][..], "not a size"),
        (&["task", "logs"][..], "<ID>"),
    ] {
        let o = dprim().args(args).output().unwrap();
        assert_eq!(code(&o), 2, "{args:?}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains(needle),
            "{args:?}: {}",
            text(&o.stderr)
        );
    }

    let o = dprim().args(["task", "logs", "--help"]).output().unwrap();
    assert_eq!(code(&o), 0);
    let help = text(&o.stdout);
    for flag in ["--stderr", "--launch", "--follow", "--tail"] {
        assert!(help.contains(flag), "{flag}: {help}");
    }
}

/// A supervisor and an agent as `dprim` processes on a real backend, with
/// a fresh namespace.
struct Processes {
    config: PathBuf,
    dir: PathBuf,
    children: Vec<Child>,
}

impl Processes {
    fn start(kind: &str) -> Processes {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let base =
            std::fs::read_to_string(root.join(format!("conformance-tests/configs/{kind}.toml")))
                .unwrap_or_else(|e| panic!("no config for {kind}: {e}"));
        let dir = temp_dir(&format!("cli-{kind}"));
        let namespace = format!(
            "logs-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        let text = base
            .lines()
            .filter(|l| !l.trim_start().starts_with("namespace"))
            .chain([format!("namespace = \"{namespace}\"").as_str()])
            .collect::<Vec<_>>()
            .join("\n");
        let config = dir.join("config.toml");
        std::fs::write(&config, text).unwrap();
        let mut p = Processes {
            config,
            dir,
            children: Vec::new(),
        };
        let log = std::fs::File::create(p.dir.join("supervisor.log")).unwrap();
        let s = p
            .dprim()
            .args(["supervisor", "--name", "s1"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        p.children.push(s);
        let log = std::fs::File::create(p.dir.join("agent.log")).unwrap();
        let a = p
            .dprim()
            .args(["agent", "--id", "a1", "--resources", "cpus=2,mem=1GiB"])
            .arg("--work-dir")
            .arg(p.dir.join("a1"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        p.children.push(a);
        p
    }

    fn dprim(&self) -> Command {
        let mut c = dprim();
        c.arg("--config").arg(&self.config);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.dprim().args(args).output().unwrap()
    }

    fn launch(&self, script: &str) -> String {
        let o = self.run(&["task", "launch", "--cpus", "0.1", "--", "sh", "-c", script]);
        assert_eq!(code(&o), 0, "{}", text(&o.stderr));
        text(&o.stdout)
            .trim()
            .strip_prefix("task: ")
            .unwrap()
            .to_string()
    }

    fn wait_state(&self, id: &str, state: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = self.run(&["task", "status", id]);
            if text(&o.stdout).contains(&format!("state: {state}")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} never {state}: {}{}; logs in {}",
                text(&o.stdout),
                text(&o.stderr),
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop_agent(&mut self) {
        let mut agent = self.children.remove(1);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(agent.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let _ = agent.wait();
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn backends() -> Vec<String> {
    match std::env::var("DPRIM_TEST_BACKENDS") {
        Ok(list) => list
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        Err(_) => {
            eprintln!("DPRIM_TEST_BACKENDS is not set: `dprim task logs` across processes did not run (scripts/test.sh runs it on etcd, zookeeper and nats)");
            Vec::new()
        }
    }
}

#[test]
fn cli_reads_output_across_processes() {
    for kind in backends() {
        cli_on(&kind);
    }
}

fn cli_on(kind: &str) {
    let mut p = Processes::start(kind);

    let id = p.launch("printf 'out 1\\nout 2\\n'; echo 'err 1' >&2");
    p.wait_state(&id, "FINISHED");
    let o = p.run(&["task", "logs", &id]);
    assert_eq!(code(&o), 0, "{kind}: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "out 1\nout 2\n", "{kind}");
    let o = p.run(&["task", "logs", &id, "--stderr"]);
    assert_eq!(text(&o.stdout), "err 1\n", "{kind}");
    let o = p.run(&["task", "logs", &id, "--tail", "6"]);
    assert_eq!(text(&o.stdout), "out 2\n", "{kind}");
    let o = p.run(&["--output", "json", "task", "logs", &id, "--launch", "1"]);
    assert_eq!(code(&o), 0, "{kind}: {}", text(&o.stderr));
    let json: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert_eq!(json["data"], "out 1\nout 2\n", "{kind}");
    assert_eq!(json["encoding"], "utf8", "{kind}");
    assert_eq!(json["offset"], 0, "{kind}");

    // More than a chunk, byte for byte.
    let big = p.launch("seq 1 60000");
    p.wait_state(&big, "FINISHED");
    let o = p.run(&["task", "logs", &big]);
    assert_eq!(code(&o), 0, "{kind}: {}", text(&o.stderr));
    let expected: String = (1..=60000).map(|i| format!("{i}\n")).collect();
    assert!(expected.len() > 4 * CHUNK_BYTES);
    assert!(
        o.stdout == expected.as_bytes(),
        "{kind}: {} bytes",
        o.stdout.len()
    );

    // --follow prints output as it is written and exits once the launch
    // has ended and everything is printed.
    let slow = p.launch("for i in 1 2 3 4; do echo tick $i; sleep 0.4; done");
    p.wait_state(&slow, "RUNNING");
    let started = Instant::now();
    let o = p.run(&["task", "logs", &slow, "--follow"]);
    assert_eq!(code(&o), 0, "{kind}: {}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout),
        "tick 1\ntick 2\ntick 3\ntick 4\n",
        "{kind}"
    );
    assert!(started.elapsed() < Duration::from_secs(20), "{kind}");

    // Not placed: nothing to read yet.
    let o = p.run(&["task", "launch", "--cpus", "64", "--", "true"]);
    let huge = text(&o.stdout)
        .trim()
        .strip_prefix("task: ")
        .unwrap()
        .to_string();
    let o = p.run(&["task", "logs", &huge]);
    assert_eq!(code(&o), 1, "{kind}: {}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("is not placed on an agent yet"),
        "{kind}: {}",
        text(&o.stderr)
    );

    // The agent stops (and deregisters): its tasks' output is out of reach,
    // and the error says whose it is.
    p.stop_agent();
    let o = p.run(&["task", "logs", &id]);
    assert_eq!(code(&o), 3, "{kind}: {}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains("agent `a1`"), "{kind}: {err}");
    assert!(err.contains("is not registered"), "{kind}: {err}");
    assert!(err.contains("dprim agents ls"), "{kind}: {err}");
}
