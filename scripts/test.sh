#!/usr/bin/env bash
# Installs what the tests need, starts the backend servers on loopback, and
# runs every test: the workspace's unit and integration tests, then the
# conformance suite against every backend (memory, and real etcd, ZooKeeper
# and NATS servers), with
# reports written to $CARGO_TARGET_DIR/conformance-report/<backend>/.
# Servers this script started are stopped when it exits.
set -euo pipefail
cd "$(dirname "$0")/.."

# A persistent target dir outside the clone keeps repeated runs fast.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dprim/target}"

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust from https://rustup.rs and re-run" >&2
    exit 2
fi

echo "==> installing servers and build tools"
scripts/etcd.sh install
scripts/zookeeper.sh install
scripts/nats.sh install

trap 'scripts/etcd.sh stop; scripts/zookeeper.sh stop; scripts/nats.sh stop' EXIT
echo "==> starting etcd (single node, 127.0.0.1:2379)"
scripts/etcd.sh start
echo "==> starting ZooKeeper (standalone, 127.0.0.1:2181)"
scripts/zookeeper.sh start
echo "==> starting nats-server (JetStream, 127.0.0.1:4222)"
scripts/nats.sh start

echo "==> cargo test --workspace"
# The multi-process tests (agent restart, task logs, `dprim pub`) run
# against the servers started above; the task scenarios themselves run once per backend
# below, as the conformance suite's `tasks::` group.
DPRIM_TEST_BACKENDS=etcd,zookeeper,nats cargo test --workspace --locked

dprim="$CARGO_TARGET_DIR/debug/dprim"
for backend in memory etcd zookeeper nats; do
    echo "==> conformance suite: $backend"
    config=()
    if [ "$backend" != memory ]; then
        config=(--config "conformance-tests/configs/$backend.toml")
    fi
    "$dprim" "${config[@]}" conformance --report "$CARGO_TARGET_DIR/conformance-report/$backend"
done
