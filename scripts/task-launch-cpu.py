#!/usr/bin/env python3
"""Where the CPU of a task launch goes, per component, through etcd.

Runs the `task_launch` benchmark (100 in-process agents and the client)
against the etcd that `scripts/etcd.sh start` runs, with the supervisor as
its own `dprim supervisor` process on the benchmark's namespace, and prints
the CPU time per launch of: the supervisor, etcd, the benchmark process
(agents and client), and the task processes (the agents' `sh` wrappers and
the no-op `true` they run).

Usage (after `cargo bench -p dprim-runtime --bench task_launch --no-run`):

    scripts/task-launch-cpu.py [BATCH]        # BATCH launches, default 3000
"""
import glob
import os
import subprocess
import sys
import time

TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/dprim/target"))
RELEASE = os.path.join(TARGET, "release")
HERE = os.path.dirname(os.path.abspath(__file__))
ETCD_CONFIG = os.path.join(HERE, "..", "conformance-tests", "configs", "etcd.toml")
SEQUENTIAL = 200


def cpu_ticks(pid):
    """(own utime+stime, reaped children's utime+stime) of a process."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return utime + stime, cutime + cstime


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    benches = [p for p in glob.glob(os.path.join(RELEASE, "deps", "task_launch-*")) if not p.endswith(".d")]
    if not benches:
        sys.exit("error: no task_launch benchmark built; run `cargo bench -p dprim-runtime --bench task_launch --no-run`")
    bench = max(benches, key=os.path.getmtime)
    dprim = os.path.join(RELEASE, "dprim")
    if not os.path.exists(dprim):
        sys.exit("error: no release dprim; run `cargo build --release -p dprim-runtime --bin dprim`")
    try:
        etcd = int(subprocess.check_output(["pgrep", "-x", "etcd"]).split()[0])
    except subprocess.CalledProcessError:
        sys.exit("error: etcd is not running; start it with `scripts/etcd.sh start`")

    namespace = f"bench-cpu-{os.getpid()}"
    config = f"/tmp/dprim-bench-cpu-{os.getpid()}.toml"
    with open(config, "w") as f:
        f.write(f'[backend]\nkind = "etcd"\nendpoints = ["127.0.0.1:2379"]\nnamespace = "{namespace}"\n')
    clock = os.sysconf("SC_CLK_TCK")
    supervisor = subprocess.Popen(
        [dprim, "--config", config, "supervisor", "--name", "cpu", "--ttl", "5s"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1)
        etcd_before, sup_before = cpu_ticks(etcd)[0], cpu_ticks(supervisor.pid)[0]
        env = dict(
            os.environ,
            DPRIM_BENCH_SUPERVISOR="external",
            DPRIM_BENCH_NAMESPACE=namespace,
            DPRIM_BENCH_CONFIG=ETCD_CONFIG,
            DPRIM_BENCH_LAUNCHES=str(SEQUENTIAL),
            DPRIM_BENCH_BATCH=str(batch),
        )
        run = subprocess.Popen([bench], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        # The benchmark's own figures are read until just before it exits.
        last = (0, 0)
        while run.poll() is None:
            try:
                last = cpu_ticks(run.pid)
            except OSError:
                pass
            time.sleep(0.1)
        etcd_ticks = cpu_ticks(etcd)[0] - etcd_before
        sup_ticks = cpu_ticks(supervisor.pid)[0] - sup_before
    finally:
        supervisor.terminate()
        supervisor.wait()
        os.remove(config)
    lines = run.stdout.read().strip().splitlines()
    print(lines[-1] if lines else "the benchmark printed nothing")
    launches = SEQUENTIAL + batch
    for name, ticks in [
        ("supervisor (its own process)", sup_ticks),
        ("etcd", etcd_ticks),
        ("agents and client (benchmark process)", last[0]),
        ("task processes (sh wrapper and true)", last[1]),
    ]:
        print(f"  {name:40s} {ticks / clock / launches * 1000:6.3f} ms CPU per launch")


if __name__ == "__main__":
    main()
