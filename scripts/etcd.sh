#!/usr/bin/env bash
# Installs etcd and runs it on loopback for dprim's tests.
#
#   scripts/etcd.sh install          apt-get etcd-server, etcd-client, protobuf-compiler
#   scripts/etcd.sh start            single node, client port 2379
#   scripts/etcd.sh start-cluster    3 members, client ports 12379 22379 32379
#   scripts/etcd.sh restart-member N restart cluster member cN (after a kill), keeping its data
#   scripts/etcd.sh stop             stop whatever this script started
#
# Data and pid files live under $DPRIM_SERVERS_DIR (default /tmp/dprim-servers).
# Test servers shrink heartbeat/election timeouts so ~1 s leases are allowed;
# production keeps etcd's defaults.
set -euo pipefail
# shellcheck source=stop-servers.sh
. "$(dirname "${BASH_SOURCE[0]}")/stop-servers.sh"
DIR="${DPRIM_SERVERS_DIR:-/tmp/dprim-servers}/etcd"
TIMING=(--heartbeat-interval 50 --election-timeout 500)

install() {
    if command -v etcd >/dev/null && command -v etcdctl >/dev/null && command -v protoc >/dev/null; then
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q etcd-server etcd-client protobuf-compiler >/dev/null ||
        { apt-get update -q >/dev/null && apt-get install -y -q etcd-server etcd-client protobuf-compiler >/dev/null; }
}

wait_healthy() { # url
    for _ in $(seq 1 200); do
        if curl -fsS "$1/health" 2>/dev/null | grep -q '"health":"true"'; then
            return 0
        fi
        sleep 0.1
    done
    echo "error: etcd at $1 did not become healthy within 20 s; see $DIR/*.log" >&2
    return 1
}

member() { # name client_port peer_port initial_cluster
    local name=$1 cport=$2 pport=$3 cluster=$4
    mkdir -p "$DIR/$name"
    etcd --name "$name" --data-dir "$DIR/$name/data" "${TIMING[@]}" \
        --listen-client-urls "http://127.0.0.1:$cport" \
        --advertise-client-urls "http://127.0.0.1:$cport" \
        --listen-peer-urls "http://127.0.0.1:$pport" \
        --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
        --initial-cluster "$cluster" --initial-cluster-state new \
        >"$DIR/$name.log" 2>&1 &
    echo $! >"$DIR/$name.pid"
}

start() {
    install
    mkdir -p "$DIR"
    if [ -f "$DIR/s1.pid" ] && kill -0 "$(cat "$DIR/s1.pid")" 2>/dev/null; then
        wait_healthy http://127.0.0.1:2379
        return
    fi
    rm -rf "$DIR/s1"
    member s1 2379 2380 "s1=http://127.0.0.1:2380"
    wait_healthy http://127.0.0.1:2379
    echo "etcd ready on 127.0.0.1:2379"
}

start_cluster() {
    install
    mkdir -p "$DIR"
    local cluster="c1=http://127.0.0.1:12380,c2=http://127.0.0.1:22380,c3=http://127.0.0.1:32380"
    for i in 1 2 3; do
        rm -rf "$DIR/c$i"
        member "c$i" "${i}2379" "${i}2380" "$cluster"
    done
    for i in 1 2 3; do wait_healthy "http://127.0.0.1:${i}2379"; done
    echo "etcd cluster ready on 127.0.0.1:12379,22379,32379"
}

restart_member() { # c1 | c2 | c3
    local name=$1 i=${1#c}
    local cluster="c1=http://127.0.0.1:12380,c2=http://127.0.0.1:22380,c3=http://127.0.0.1:32380"
    member "$name" "${i}2379" "${i}2380" "$cluster"
    wait_healthy "http://127.0.0.1:${i}2379"
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    start-cluster) start_cluster ;;
    restart-member) restart_member "${2:?member name (c1, c2 or c3)}" ;;
    stop) stop_servers "$DIR" ;;
    *) echo "usage: $0 install|start|start-cluster|restart-member N|stop" >&2; exit 2 ;;
esac
