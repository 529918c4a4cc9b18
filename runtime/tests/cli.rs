//! Runs the `dprim` binary and checks what a user sees: output, messages and
//! exit codes. Without a config every invocation gets a fresh in-memory
//! backend, so each test checks what one invocation does.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod support;

use support::{code, dprim};

fn run(args: &[&str]) -> Output {
    dprim().args(args).output().expect("dprim runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn temp_dir(name: &str) -> PathBuf {
    support::temp_dir("cli", name)
}

fn write_config(name: &str, text: &str) -> PathBuf {
    let path = temp_dir(name).join("dprim.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn help_explains_the_in_memory_default_and_exit_codes() {
    let o = run(&["--help"]);
    assert_eq!(code(&o), 0);
    let out = stdout(&o);
    assert!(out.contains("in-memory backend"), "{out}");
    assert!(out.contains("only as long as that one"), "{out}");
    assert!(out.contains("Exit codes:"), "{out}");
    for command in [
        "kv",
        "lock",
        "elect",
        "pub",
        "sub",
        "queue",
        "check",
        "conformance",
    ] {
        assert!(out.contains(&format!("  {command} ")), "{command}: {out}");
    }
}

#[test]
fn kv_put_prints_a_version() {
    let o = run(&["kv", "put", "app/config", "hello"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    let version: u64 = out
        .trim()
        .strip_prefix("version: ")
        .unwrap_or_else(|| panic!("{out}"))
        .parse()
        .unwrap();
    assert!(version > 0);

    let o = run(&["--output", "json", "kv", "put", "app/config", "hello"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(json["key"], "app/config");
    assert!(json["version"].as_u64().unwrap() > 0);
}

#[test]
fn kv_put_reads_stdin() {
    let mut child = dprim()
        .args(["kv", "put", "from/stdin", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"piped value")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).starts_with("version: "), "{}", stdout(&o));
}

#[test]
fn kv_get_of_a_missing_key_exits_1_with_a_clear_message() {
    let o = run(&["kv", "get", "no/such/key"]);
    assert_eq!(code(&o), 1);
    let err = stderr(&o);
    assert!(err.contains("error: key `no/such/key` not found"), "{err}");
    assert!(err.contains("in-memory backend"), "{err}");
    assert!(stdout(&o).is_empty());

    let o = run(&["--output", "json", "kv", "get", "no/such/key"]);
    assert_eq!(code(&o), 1);
    let json: serde_json::Value = serde_json::from_str(stderr(&o).trim()).unwrap();
    assert_eq!(json["error"]["kind"], "not_found");
    assert_eq!(json["exit_code"], 1);
}

#[test]
fn bad_keys_exit_2_naming_the_character() {
    let o = run(&["kv", "put", "a b", "x"]);
    assert_eq!(code(&o), 2);
    let err = stderr(&o);
    assert!(
        err.contains("error: invalid key `a b`: character space at byte 1 is not portable"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    for (args, needle) in [
        (vec!["kv", "get", "a*b"], "`*`"),
        (vec!["lock", "jobs>", "--", "true"], "`>`"),
        (vec!["queue", "push", "a//b", "m"], "empty segment"),
        (vec!["pub", "topic=x", "m"], "`=`"),
    ] {
        let o = run(&args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn oversize_values_fail_naming_the_limit() {
    let path = temp_dir("oversize").join("big.bin");
    std::fs::write(&path, vec![b'x'; 300 * 1024]).unwrap();
    let o = run(&["kv", "put", "big", "--file", path.to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    let err = stderr(&o);
    assert!(err.contains("307200 bytes"), "{err}");
    assert!(err.contains("limit of 262144 bytes (256 KiB)"), "{err}");

    let o = run(&["queue", "push", "jobs", "--file", path.to_str().unwrap()]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("256 KiB"), "{}", stderr(&o));
}

#[test]
fn unknown_config_key_is_named_with_a_suggestion() {
    let config = write_config(
        "unknown-key",
        "[backend]\nkind = \"memory\"\nendpoint = [\"127.0.0.1:2379\"]\n",
    );
    let o = run(&["--config", config.to_str().unwrap(), "check"]);
    assert_eq!(code(&o), 2);
    let err = stderr(&o);
    assert!(err.contains("unknown field `endpoint`"), "{err}");
    assert!(err.contains("hint: did you mean `endpoints`?"), "{err}");
    assert!(err.contains(config.to_str().unwrap()), "{err}");
    assert!(err.contains("line: 3"), "{err}");

    // The same through the environment.
    let o = dprim()
        .args(["kv", "get", "k"])
        .env("DPRIM_CONFIG", &config)
        .output()
        .unwrap();
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("`endpoint`"), "{}", stderr(&o));
}

#[test]
fn unknown_backend_kind_lists_the_kinds() {
    let config = write_config("unknown-kind", "[backend]\nkind = \"redis\"\n");
    let o = run(&["--config", config.to_str().unwrap(), "check"]);
    assert_eq!(code(&o), 2);
    let err = stderr(&o);
    assert!(err.contains("unknown backend kind `redis`"), "{err}");
    assert!(err.contains("memory, etcd, zookeeper, nats"), "{err}");
}

#[test]
fn unreachable_servers_are_reported_with_what_to_check() {
    // Port 1 on loopback refuses connections: every backend says so at
    // once, naming the endpoints and what to check, not after a timeout.
    for kind in ["etcd", "zookeeper", "nats"] {
        let config = write_config(
            &format!("unreachable-{kind}"),
            &format!(
                "[backend]\nkind = \"{kind}\"\nendpoints = [\"127.0.0.1:1\"]\nconnect_timeout = \"20s\"\n"
            ),
        );
        let o = run(&["--config", config.to_str().unwrap(), "check"]);
        assert_ne!(code(&o), 0, "{kind}");
        let err = stderr(&o);
        assert!(err.contains("check `endpoints`"), "{kind}: {err}");
        assert!(err.contains("127.0.0.1:1"), "{kind}: {err}");
        assert!(!err.contains("panicked"), "{kind}: {err}");
    }
}

#[test]
fn missing_config_file_is_a_config_error() {
    let path = temp_dir("missing").join("nope.toml");
    let o = run(&["--config", path.to_str().unwrap(), "check"]);
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).contains("cannot read config file"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn check_prints_the_backend_and_every_capability() {
    let o = run(&["check"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    for needle in [
        "kind: memory",
        "namespace: dprim",
        "endpoints: (none)",
        "kv.linearizable",
        "kv.transactions",
        "kv.watch_history",
        "session.min_ttl",
        "lock.fair",
        "pubsub.subscriber_buffer",
        "pubsub.subscriber_buffer_bytes",
        "queue.fifo",
        "queue.dead_letter",
        "note: the in-memory backend lives inside this dprim process",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }

    let config = write_config(
        "check",
        "[backend]\nkind = \"memory\"\nnamespace = \"team/app\"\n",
    );
    let o = run(&[
        "--output",
        "json",
        "--config",
        config.to_str().unwrap(),
        "check",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(json["kind"], "memory");
    assert_eq!(json["namespace"], "team/app");
    assert!(json["capabilities"]["queue.fifo"].is_string());
}

#[test]
fn queue_push_then_exit_ok() {
    let o = run(&["queue", "push", "jobs", "work item"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).starts_with("id: "), "{}", stdout(&o));

    let o = run(&["queue", "pull", "jobs"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("queue `jobs` is empty"),
        "{}",
        stderr(&o)
    );

    let o = run(&["queue", "depth", "jobs"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("ready: 0"), "{}", stdout(&o));
}

#[test]
fn pub_without_subscribers_succeeds() {
    let o = run(&["pub", "news", "hello"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("published 5 bytes to news"),
        "{}",
        stdout(&o)
    );
}

/// `dprim pub` exits right after publishing, so its message must have left
/// with it: a NATS publish returns while the message is still queued in the
/// client, and one `dprim pub` in three used to exit with its message.
/// Runs on the real backends named in DPRIM_TEST_BACKENDS (`scripts/test.sh`
/// sets it), against the servers of their conformance configs.
#[test]
fn every_pub_reaches_a_subscriber_on_real_backends() {
    const MESSAGES: usize = 20;
    let Ok(list) = std::env::var("DPRIM_TEST_BACKENDS") else {
        eprintln!("DPRIM_TEST_BACKENDS is not set: `dprim pub` on real backends did not run (scripts/test.sh runs it on etcd, zookeeper and nats)");
        return;
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for kind in list.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        let config = root.join(format!("conformance-tests/configs/{kind}.toml"));
        let config = config.to_str().unwrap();
        let topic = format!("cli-pub-{}", std::process::id());
        let count = MESSAGES.to_string();
        let mut sub = dprim()
            .args(["--config", config, "sub", &topic, "--count", &count])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = sub.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if line.contains("subscribed to") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = sub.kill();
            panic!("{kind}: `dprim sub` never said it had subscribed");
        }
        for i in 0..MESSAGES {
            let o = run(&["--config", config, "pub", &topic, &format!("m{i}")]);
            assert_eq!(code(&o), 0, "{kind}: {}", stderr(&o));
        }
        if exit_within(&mut sub, Duration::from_secs(20)).is_none() {
            let _ = sub.kill();
            let out = sub.wait_with_output().unwrap();
            panic!(
                "{kind}: `dprim sub --count {MESSAGES}` got only {:?}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let out = sub.wait_with_output().unwrap();
        let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        let expected: Vec<String> = (0..MESSAGES).map(|i| format!("m{i}")).collect();
        assert_eq!(got, expected, "{kind}");
    }
}

#[test]
fn lock_runs_a_command_and_propagates_its_exit_code() {
    let o = run(&["lock", "jobs/nightly", "--", "true"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("fencing token"), "{}", stderr(&o));

    let o = run(&["lock", "jobs/nightly", "--", "false"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));

    let o = run(&["lock", "jobs/nightly", "--", "sh", "-c", "exit 7"]);
    assert_eq!(code(&o), 7, "{}", stderr(&o));

    let o = run(&[
        "lock",
        "jobs/nightly",
        "--",
        "sh",
        "-c",
        "echo \"token=$DPRIM_FENCING_TOKEN lock=$DPRIM_LOCK\"",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    let token = out
        .trim()
        .strip_prefix("token=")
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(token.parse::<u64>().is_ok(), "{out}");
    assert!(out.contains("lock=jobs/nightly"), "{out}");
}

#[test]
fn lock_with_a_missing_command_exits_127() {
    let o = run(&["lock", "l", "--", "dprim-no-such-command-xyz"]);
    assert_eq!(code(&o), 127);
    assert!(
        stderr(&o).contains("cannot run `dprim-no-such-command-xyz`"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_durations_are_usage_errors() {
    let o = run(&["lock", "l", "--ttl", "5", "--", "true"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("--ttl"), "{}", stderr(&o));
    // A negative value is named as the flag's bad value, not taken for an
    // unknown flag.
    for (args, needle) in [
        (
            &["lock", "l", "--ttl", "-1s", "--", "true"][..],
            "'-1s' for '--ttl",
        ),
        (
            &["queue", "pull", "q", "--visibility", "-5s"][..],
            "'-5s' for '--visibility",
        ),
        (&["kv", "cas", "k", "-3", "v"][..], "`-3` is not a version"),
        (
            &["kv", "del", "k", "--version", "-4"][..],
            "`-4` is not a version",
        ),
        (
            &["kv", "watch", "k", "--count", "-1"][..],
            "'-1' for '--count",
        ),
    ] {
        let o = run(args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn bad_task_launches_are_usage_errors_that_name_the_problem() {
    for (args, needle) in [
        // A negative number is the flag's value, not another flag.
        (
            &["task", "launch", "--cpus", "-1", "--", "true"][..],
            "zero or more",
        ),
        (
            &["task", "launch", "--cpus=-1", "--", "true"][..],
            "zero or more",
        ),
        (
            &["task", "launch", "--mem", "-5", "--", "true"][..],
            "not a size",
        ),
        (
            &["task", "launch", "--disk", "-1GiB", "--", "true"][..],
            "not a size",
        ),
        (
            &["task", "launch", "--mem", "lots", "--", "true"][..],
            "not a size",
        ),
        (&["task", "launch", "--cpus", "0.5"][..], "COMMAND"),
        (
            &["task", "launch", "--constraint", "zone", "--", "true"][..],
            "constraint",
        ),
        (
            &[
                "agent",
                "--resources",
                "cpus=-2",
                "--work-dir",
                "/nonexistent",
            ][..],
            "zero or more",
        ),
    ] {
        let o = run(args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{args:?}: {}", stderr(&o));
    }
}

/// The child's exit status, if it exits within `limit`.
fn exit_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `dprim args...`, waits for its first stdout line, sends SIGINT,
/// and returns (first line, stderr, exit code).
fn interrupt_after_first_line(args: &[&str]) -> (String, String, i32) {
    let mut child: Child = dprim()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut first = String::new();
        let _ = reader.read_line(&mut first);
        let _ = tx.send(first);
        // Keep draining so the child never blocks on a full pipe.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let first = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            panic!("no output from dprim {args:?}");
        }
    };
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let Some(status) = exit_within(&mut child, Duration::from_secs(20)) else {
        let _ = child.kill();
        panic!("dprim {args:?} did not stop after SIGINT");
    };
    let o = child.wait_with_output().unwrap();
    (
        first,
        String::from_utf8_lossy(&o.stderr).into_owned(),
        status.code().unwrap_or(-1),
    )
}

#[test]
fn lock_without_a_command_holds_until_interrupted() {
    let (first, err, code) = interrupt_after_first_line(&["lock", "backups", "--ttl", "2s"]);
    assert!(
        first.starts_with("acquired lock backups, fencing token "),
        "{first}"
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn elect_holds_leadership_until_interrupted() {
    let (first, err, code) =
        interrupt_after_first_line(&["elect", "scheduler", "node-a", "--ttl", "2s"]);
    assert!(
        first.starts_with("elected leader of scheduler, term "),
        "{first}"
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn elect_show_without_a_leader_exits_1() {
    let o = run(&["elect", "scheduler", "--show"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("has no leader"), "{}", stderr(&o));
}

#[test]
fn conformance_writes_a_report() {
    let dir = temp_dir("conformance").join("report");
    let o = run(&[
        "conformance",
        "--filter",
        "kv::",
        "--report",
        dir.to_str().unwrap(),
    ]);
    let c = code(&o);
    assert!(c == 0 || c == 1, "exit {c}: {}", stderr(&o));
    assert!(stdout(&o).contains("kv::"), "{}", stdout(&o));
    let json = std::fs::read_to_string(dir.join("report.json")).unwrap();
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(report["cases"].as_array().is_some_and(|c| !c.is_empty()));
    assert!(dir.join("report.md").exists());
}

#[test]
fn conformance_runs_the_tasks_group_with_a_task_cluster() {
    let dir = temp_dir("conformance-tasks").join("report");
    let o = run(&[
        "conformance",
        "--filter",
        "tasks::launch_and_finish",
        "--report",
        dir.to_str().unwrap(),
    ]);
    // Run, not skipped: the command gives the suite its task cluster.
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("PASS tasks::launch_and_finish"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn conformance_filter_matching_nothing_is_an_error() {
    let dir = temp_dir("conformance-empty").join("report");
    let o = run(&[
        "conformance",
        "--filter",
        "no-such-case-xyz",
        "--report",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no conformance case matched"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn demo_shows_a_crashed_agents_task_moving() {
    let out = run(&["demo", "--duration", "9s", "--crash-after", "2s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let service: Vec<&str> = text.lines().filter(|l| l.contains(" service ")).collect();
    for state in ["UNREACHABLE", "GONE"] {
        assert!(
            service.iter().any(|l| l.contains(state)),
            "no {state} in:\n{text}"
        );
    }
    assert!(
        service
            .iter()
            .any(|l| l.contains("RUNNING") && l.contains("agent-2")),
        "the service never ran on agent-2:\n{text}"
    );
    assert!(text.contains("more than any agent"), "{text}");
}

#[test]
fn agents_checkpoint_prints_what_an_agent_keeps() {
    let work = temp_dir("agent-work");
    let o = run(&["agents", "checkpoint", "--work-dir", work.to_str().unwrap()]);
    assert_eq!(code(&o), 1);
    let err = stderr(&o);
    assert!(err.contains("holds no agent checkpoint"), "{err}");

    let mut agent = dprim()
        .args([
            "agent",
            "--id",
            "a1",
            "--resources",
            "cpus=1,mem=1GiB,disk=1GiB",
        ])
        .arg("--work-dir")
        .arg(&work)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !work.join("agent.checkpoint.1").exists() {
        assert!(
            Instant::now() < deadline,
            "the agent never saved its checkpoint"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = run(&["agents", "checkpoint", "--work-dir", work.to_str().unwrap()]);
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(json["agent"], "a1");
    assert!(json["outbox"].is_array(), "{json}");
    let _ = std::fs::remove_dir_all(work);
}
